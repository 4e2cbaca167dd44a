//! Black-box tests: the real server on port 0 with a temporary store.

mod helpers;
mod ingest;
mod process;
mod read;
mod store_contract;
