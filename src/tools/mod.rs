//! The operator tools behind `check` and `fire`.

pub mod check;
pub mod fire;
