//! qualia-webhook: a durable receiver for Qualia Marketplace activity
//! notifications.
#![forbid(unsafe_code)]

pub mod activity;
pub mod config;
pub mod http;
pub mod metrics;
pub mod qualia;
pub mod standin;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod worker;
