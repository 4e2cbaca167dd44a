//! Black-box tests: the real server on port 0 with a temporary store.

mod bench;
mod crash;
mod enrichment;
mod fault_matrix;
mod helpers;
mod hostile;
mod ingest;
mod outage;
mod process;
mod qualia_client;
mod read;
mod replicas;
mod store_contract;
mod tools;
