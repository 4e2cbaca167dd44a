//! Command line: parse, then dispatch.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use qualia_webhook::config::{Settings, SettingsArgs};
use qualia_webhook::startup::{Application, shutdown_signal};
use qualia_webhook::telemetry;

/// Receives Qualia Marketplace activity notifications, keeps every one
/// durably, and serves them back.
#[derive(Debug, Parser)]
#[command(name = "qualia-webhook", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: the webhook receiver and the read API.
    Serve {
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

/// Exit code for a bad or missing setting.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure at run time (store, socket).
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    if let Err(e) = Settings::load_dotenv() {
        eprintln!("qualia-webhook: configuration error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { settings } => serve(&settings),
    }
}

fn serve(args: &SettingsArgs) -> ExitCode {
    let settings = match Settings::load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qualia-webhook: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qualia-webhook: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async {
        let app = match Application::build(&settings).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %qualia_webhook::http::error::chain(&e), "start-up failed");
                eprintln!("qualia-webhook: {}", qualia_webhook::http::error::chain(&e));
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        tracing::info!(
            address = %app.local_addr(),
            store = %settings.store,
            version = env!("CARGO_PKG_VERSION"),
            "listening"
        );
        match app.run_until(shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}
