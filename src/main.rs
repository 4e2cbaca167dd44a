//! Command line: parse, then dispatch.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use qualia_webhook::config::{Settings, SettingsArgs, StoreArgs};
use qualia_webhook::http::error::chain;
use qualia_webhook::startup::{Application, run_worker_only, shutdown_signal};
use qualia_webhook::store::{self, JobState, Store};
use qualia_webhook::telemetry;

/// Receives Qualia Marketplace activity notifications, keeps every one
/// durably, completes message details from Qualia's API, and serves it all
/// back.
#[derive(Debug, Parser)]
#[command(name = "qualia-webhook", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: the webhook receiver, the read API and the enrichment worker.
    Serve(Box<ServeArgs>),
    /// List or retry enrichment jobs (works beside a running service).
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Manage the DynamoDB table.
    #[command(subcommand)]
    Table(TableCommand),
    /// Check the setup: settings, credentials, store, Qualia API, listen
    /// address. One line each; exit 0 only when all pass.
    Check(Box<CheckArgs>),
    /// Send Qualia's six sample notifications and the invalid cases to a
    /// running service and check every answer.
    Fire(FireArgs),
    /// Exit 0 when a running service answers /health (for container health checks).
    Health {
        /// The health URL.
        #[arg(long, default_value = "http://127.0.0.1:8000/health")]
        url: String,
    },
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FireArgs {
    /// The service: http://HOST:PORT or the full /webhook/activity URL.
    #[arg(long)]
    url: String,
    /// Webhook username [default: WEBHOOK_USERNAME].
    #[arg(long, env = "WEBHOOK_USERNAME")]
    username: Option<String>,
    /// Webhook password [default: WEBHOOK_PASSWORD].
    #[arg(long, env = "WEBHOOK_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Use this order id instead of a fresh one.
    #[arg(long)]
    order_id: Option<String>,
    /// Send only the sample of this type (no invalid cases).
    #[arg(long = "type", value_name = "TYPE", value_parser = ["order_request", "order_cancelled", "order_completed", "order_revision_requested", "message", "documents"])]
    activity_type: Option<String>,
    /// Timeout of each request.
    #[arg(long, default_value = "10s", value_parser = qualia_webhook::config::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Debug, Subcommand)]
enum TableCommand {
    /// Create the DynamoDB table (on-demand billing), its index GSI1 and its
    /// TTL; on an existing table, add only what is missing. Uses the standard
    /// AWS settings (AWS_REGION, credentials, AWS_ENDPOINT_URL).
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// Table name [default: from STORE=dynamodb://TABLE or DYNAMODB_TABLE].
        #[arg(long)]
        table: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Do not run the enrichment worker in this process (run it elsewhere).
    #[arg(long, conflicts_with = "no_http")]
    no_worker: bool,
    /// Run only the enrichment worker, without HTTP (to scale it separately).
    #[arg(long)]
    no_http: bool,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// List jobs in one state (pending by default).
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// List dead jobs (same as --state dead).
        #[arg(long, conflicts_with = "state")]
        dead: bool,
        /// pending, done or dead.
        #[arg(long, value_parser = ["pending", "done", "dead"])]
        state: Option<String>,
        /// Most jobs to list.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
        limit: u32,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put a dead job (or every dead job) back to pending.
    Retry {
        #[command(flatten)]
        store: StoreArgs,
        /// The job's id (from `jobs list --dead`).
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        id: Option<String>,
        /// Retry every dead job.
        #[arg(long)]
        all_dead: bool,
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
        Command::Serve(args) => serve(&args),
        Command::Jobs(cmd) => jobs(cmd),
        Command::Table(TableCommand::Create { store, table }) => table_create(&store, table),
        Command::Check(args) => check(&args),
        Command::Fire(args) => fire(&args),
        Command::Health { url } => health(&url),
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let lines = rt.block_on(qualia_webhook::tools::check::run(&args.settings));
    let ok = lines.iter().all(|l| l.ok);
    if args.json {
        let doc = serde_json::json!({ "ok": ok, "checks": lines });
        println!("{doc}");
    } else {
        for line in &lines {
            println!("{}", line.render());
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

fn fire(args: &FireArgs) -> ExitCode {
    use qualia_webhook::tools::fire;
    let url = match fire::ingest_url(&args.url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("qualia-webhook: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (Some(username), Some(password)) = (
        args.username.as_deref().filter(|s| !s.is_empty()),
        args.password.as_deref().filter(|s| !s.is_empty()),
    ) else {
        eprintln!(
            "qualia-webhook: configuration error: fire needs --username and --password \
             (or WEBHOOK_USERNAME and WEBHOOK_PASSWORD)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let order_id = match args.order_id.as_deref() {
        None => None,
        Some(o) => match qualia_webhook::activity::OrderId::parse(o) {
            Ok(_) => Some(o),
            Err(e) => {
                eprintln!("qualia-webhook: configuration error: --order-id {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let only = args
        .activity_type
        .as_deref()
        .and_then(qualia_webhook::activity::ActivityType::parse);
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let cases = fire::cases(order_id, only);
    match rt.block_on(fire::fire(&url, username, password, cases, args.timeout)) {
        Ok(outcomes) => {
            print!("{}", fire::report(&outcomes));
            if outcomes.iter().all(fire::Outcome::passed) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("qualia-webhook: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn health(url: &str) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let healthy = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(3))
            .build()
            .ok()?;
        let res = client.get(url).send().await.ok()?;
        let v: serde_json::Value = res.error_for_status().ok()?.json().await.ok()?;
        (v["status"] == "healthy").then_some(())
    });
    match healthy {
        Some(()) => ExitCode::SUCCESS,
        None => {
            eprintln!("qualia-webhook: {url} is not healthy");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn table_create(store: &StoreArgs, table: Option<String>) -> ExitCode {
    let table = match table {
        Some(t) => match qualia_webhook::config::StoreLocation::parse(&format!("dynamodb://{t}")) {
            Ok(_) => t,
            Err(e) => {
                eprintln!("qualia-webhook: configuration error: --table {t:?}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => match store.location() {
            Ok((qualia_webhook::config::StoreLocation::DynamoDb { table }, _)) => table,
            Ok(_) => {
                eprintln!(
                    "qualia-webhook: configuration error: table create is for DynamoDB: \
                     give --table NAME, or STORE=dynamodb://TABLE or DYNAMODB_TABLE"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                eprintln!("qualia-webhook: configuration error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    rt.block_on(async {
        let client = store::dynamodb::client().await;
        match store::dynamodb::create_table(&client, &table).await {
            Ok(done) => {
                for line in done {
                    println!("✓ {line}");
                }
                println!("✓ table {table} is ready");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("✗ {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("qualia-webhook: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        })
}

fn serve(args: &ServeArgs) -> ExitCode {
    let mut settings = match Settings::load(&args.settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qualia-webhook: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.no_worker {
        settings.worker.enabled = false;
    }
    telemetry::init(settings.log_format);
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async {
        if args.no_http {
            tracing::info!(store = %settings.store, "running the enrichment worker only");
            return match run_worker_only(&settings, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("qualia-webhook: {}", chain(&e));
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        let app = match Application::build(&settings).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %chain(&e), "start-up failed");
                eprintln!("qualia-webhook: {}", chain(&e));
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

fn open_store(
    args: &StoreArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<std::sync::Arc<dyn Store>, ExitCode> {
    let location = match args.location() {
        Ok((l, _)) => l,
        Err(e) => {
            eprintln!("qualia-webhook: configuration error: {e}");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    rt.block_on(store::open(
        &location,
        qualia_webhook::config::DEFAULT_QUARANTINE_MAX,
    ))
    .map_err(|e| {
        eprintln!("qualia-webhook: {}", chain(&e));
        ExitCode::from(EXIT_FAILURE)
    })
}

fn jobs(cmd: JobsCommand) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let store_args = match &cmd {
        JobsCommand::List { store, .. } | JobsCommand::Retry { store, .. } => store,
    };
    let store = match open_store(store_args, &rt) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let code = rt.block_on(async {
        match cmd {
            JobsCommand::List {
                dead,
                state,
                limit,
                json,
                ..
            } => {
                let state = if dead {
                    JobState::Dead
                } else {
                    state
                        .as_deref()
                        .and_then(JobState::parse)
                        .unwrap_or(JobState::Pending)
                };
                list_jobs(&*store, state, limit, json).await
            }
            JobsCommand::Retry { id, all_dead, .. } => {
                let now = store::now_ms();
                if all_dead {
                    match store.retry_dead_jobs(now).await {
                        Ok(n) => {
                            println!("{n} dead job(s) put back to pending");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("qualia-webhook: {}", chain(&e));
                            ExitCode::from(EXIT_FAILURE)
                        }
                    }
                } else {
                    let id = id.unwrap_or_default();
                    match store.retry_job(&id, now).await {
                        Ok(job) => {
                            println!(
                                "job {} is pending again (order {})",
                                job.job_id, job.order_id
                            );
                            ExitCode::SUCCESS
                        }
                        Err(store::StoreError::NotFound) => {
                            eprintln!("qualia-webhook: no job {id}");
                            ExitCode::from(EXIT_FAILURE)
                        }
                        Err(e) => {
                            eprintln!("qualia-webhook: job {id}: {}", chain(&e));
                            ExitCode::from(EXIT_FAILURE)
                        }
                    }
                }
            }
        }
    });
    rt.block_on(store.close());
    code
}

async fn list_jobs(store: &dyn Store, state: JobState, limit: u32, json: bool) -> ExitCode {
    let mut left = limit;
    let mut cursor = None;
    let mut rows = Vec::new();
    while left > 0 {
        match store.list_jobs(state, left.min(500), cursor).await {
            Ok(page) => {
                left = left.saturating_sub(page.items.len() as u32);
                rows.extend(page.items);
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            Err(e) => {
                eprintln!("qualia-webhook: {}", chain(&e));
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    if json {
        for j in rows {
            let view = qualia_webhook::http::read::JobView::from(j);
            println!("{}", serde_json::to_string(&view).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    if rows.is_empty() {
        println!("no {state} jobs");
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<26}  {:<7}  {:>8}  {:<20}  {:<20}  {:<24}  LAST ERROR",
        "JOB", "STATE", "ATTEMPTS", "ORDER", "MESSAGE", "NEXT ATTEMPT"
    );
    for j in &rows {
        println!(
            "{:<26}  {:<7}  {:>8}  {:<20}  {:<20}  {:<24}  {}",
            j.job_id,
            j.state,
            j.attempts,
            j.order_id,
            j.message_id.as_ref().map(|m| m.as_ref()).unwrap_or("-"),
            store::rfc3339_ms(j.next_attempt_ms),
            j.last_error.as_deref().unwrap_or("-")
        );
    }
    println!("{} {state} job(s)", rows.len());
    ExitCode::SUCCESS
}
