//! A local stand-in for Qualia's vendor GraphQL API (see `qualia_webhook::standin`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qualia_webhook::standin::{Fixture, GRAPHQL_PATH, StandIn};

/// Serves Qualia's `messages`, `order` and `orders` queries from memory, with
/// Basic auth, call counts and fault injection (admin endpoints under
/// /__admin/). For trying qualia-webhook without a Qualia account.
#[derive(Debug, Parser)]
#[command(name = "qualia-standin", version)]
struct Args {
    /// Address to listen on (keep it on loopback: the admin endpoints have no auth).
    #[arg(long, env = "STANDIN_BIND", default_value = "127.0.0.1:8700")]
    bind: SocketAddr,
    /// Username the stand-in accepts.
    #[arg(long, env = "STANDIN_USERNAME", default_value = "vendor")]
    username: String,
    /// Password the stand-in accepts.
    #[arg(
        long,
        env = "STANDIN_PASSWORD",
        default_value = "vendor-password",
        hide_env_values = true
    )]
    password: String,
    /// JSON file with {"messages": [...], "orders": [...]} in Qualia's shape.
    #[arg(long, value_name = "FILE")]
    fixture: Option<PathBuf>,
    /// Delay every answer by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qualia_webhook::telemetry::init(qualia_webhook::config::LogFormat::Json);
    let fixture = match &args.fixture {
        None => Fixture::default(),
        Some(path) => {
            let parsed = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Fixture>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("qualia-standin: fixture {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qualia-standin: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let standin = StandIn::new(&args.username, &args.password, fixture);
        standin.set_latency(Duration::from_millis(args.latency_ms));
        let (addr, server) = match standin.spawn(args.bind).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("qualia-standin: cannot listen on {}: {e}", args.bind);
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(address = %addr, url = %format!("http://{addr}{GRAPHQL_PATH}"), "listening");
        tokio::select! {
            _ = server => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        ExitCode::SUCCESS
    })
}
