//! Crash harness: tries hard to lose acknowledged notifications.
//!
//! Starts the real `qualia-webhook serve` on a temporary store, drives
//! concurrent ingest load (distinct notifications, a share of them
//! `message`), `kill -9`s the server at a random moment, restarts it, and
//! repeats. Then it lets a last server drain the enrichment jobs against the
//! Qualia stand-in and reconciles: every notification answered 200 must be
//! stored exactly once, and every acknowledged message must end enriched.
//!
//! cargo run --release --bin crash-harness -- --cycles 50
//! cargo run --release --bin crash-harness -- --store dynamodb --cycles 20   (AWS_* set)

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use qualia_webhook::standin::{GRAPHQL_PATH, StandIn, sample_message};
use serde_json::{Value, json};

const USER: &str = "crash";
const PASSWORD: &str = "crash-harness-password-1";

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Sqlite,
    Dynamodb,
}

/// Kills the server again and again under load, then checks that nothing
/// acknowledged was lost or doubled.
#[derive(Debug, Parser)]
#[command(name = "crash-harness")]
struct Args {
    /// Store backend; dynamodb uses the AWS_* settings and a fresh table.
    #[arg(long, value_enum, default_value = "sqlite")]
    store: Backend,
    /// Kill-and-restart cycles.
    #[arg(long, default_value_t = 10)]
    cycles: u32,
    /// Concurrent senders.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of `message` notifications, 0 to 1.
    #[arg(long, default_value_t = 0.3)]
    message_share: f64,
    /// Shortest time a server runs under load before its kill, in ms.
    #[arg(long, default_value_t = 200)]
    min_run_ms: u64,
    /// Longest time a server runs under load before its kill, in ms.
    #[arg(long, default_value_t = 1500)]
    max_run_ms: u64,
    /// The server binary [default: qualia-webhook beside this one].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Print the figures as JSON too.
    #[arg(long)]
    json: bool,
}

/// One acknowledged notification.
#[derive(Debug, Clone)]
struct Acked {
    order_id: String,
    activity_id: String,
    message: bool,
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

fn server_binary(args: &Args) -> Result<PathBuf, String> {
    if let Some(p) = &args.server {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = me.parent().ok_or("no folder for this binary")?;
    let candidate = dir.join("qualia-webhook");
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(format!(
            "{} not found; build it or pass --server",
            candidate.display()
        ))
    }
}

fn start(bin: &PathBuf, env: &[(String, String)]) -> Result<Server, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(t) = &tx
                && let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "listening"
            {
                let _ = t.send(v["address"].as_str().unwrap_or_default().to_owned());
                tx = None;
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the server did not start within 60 s".into());
        }
    };
    let addr = addr
        .parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    Ok(Server { child, addr })
}

fn kill9(mut server: Server) {
    // Child::kill is SIGKILL on Unix: no shutdown, no flush, no goodbye.
    let _ = server.child.kill();
    let _ = server.child.wait();
}

/// What every sender shares.
#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    url: String,
    standin: StandIn,
    message_share: f64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    unknown: Arc<AtomicU64>,
}

/// Sends distinct notifications until `stop`; records every 200.
async fn load(l: Load, prefix: String) {
    let Load {
        client,
        url,
        standin,
        message_share,
        stop,
        acked,
        unknown,
    } = l;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let order_id = format!("{prefix}x{n}");
        let message = fastrand::f64() < message_share;
        let body = if message {
            let message_id = format!("m{order_id}");
            standin.add_messages([sample_message(&order_id, &message_id, "crash test")]);
            json!({"type": "message", "order_id": order_id, "message_id": message_id,
                   "description": "Marty McFly sent you a message."})
        } else {
            let t = [
                "order_request",
                "order_cancelled",
                "order_completed",
                "order_revision_requested",
                "documents",
            ][fastrand::usize(0..5)];
            json!({"type": t, "order_id": order_id, "description": format!("crash {n}")})
        };
        let res = client
            .post(&url)
            .basic_auth(USER, Some(PASSWORD))
            .json(&body)
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                Ok(v) => {
                    if let Ok(mut a) = acked.lock() {
                        a.push(Acked {
                            order_id,
                            activity_id: v["activity_id"].as_str().unwrap_or_default().to_owned(),
                            message,
                        });
                    }
                }
                // The 200 was sent but its body lost in the kill: the
                // notification may be stored; it counts as unknown.
                Err(_) => {
                    unknown.fetch_add(1, Ordering::Relaxed);
                }
            },
            Ok(r) if r.status() == 503 => {
                unknown.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => {
                eprintln!("unexpected answer {} for {body}", r.status());
                unknown.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // Connection refused or reset by the kill: not acknowledged.
                unknown.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    client
        .get(url)
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())
}

async fn run(args: Args) -> Result<bool, String> {
    let bin = server_binary(&args)?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = match args.store {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("crash.db").display()),
        Backend::Dynamodb => {
            let table = format!(
                "qw-crash-{}",
                ulid::Ulid::generate().to_string().to_lowercase()
            );
            let client = qualia_webhook::store::dynamodb::client().await;
            qualia_webhook::store::dynamodb::create_table(&client, &table).await?;
            format!("dynamodb://{table}")
        }
    };
    let standin = StandIn::new("vendor", "vendor-password", Default::default());
    let (qualia_addr, _qualia) = standin
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| e.to_string())?;
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_") || k == "DYNAMODB_ATTEMPT_TIMEOUT" || k == "PATH")
        .collect();
    for (k, v) in [
        ("WEBHOOK_USERNAME", USER.to_owned()),
        ("WEBHOOK_PASSWORD", PASSWORD.to_owned()),
        ("BIND", "127.0.0.1:0".to_owned()),
        ("STORE", store.clone()),
        (
            "QUALIA_API_URL",
            format!("http://{qualia_addr}{GRAPHQL_PATH}"),
        ),
        ("QUALIA_API_USERNAME", "vendor".to_owned()),
        ("QUALIA_API_PASSWORD", "vendor-password".to_owned()),
        ("QUALIA_TIMEOUT", "2s".to_owned()),
        ("JOB_LEASE", "8s".to_owned()),
        ("RETRY_BASE", "50ms".to_owned()),
        ("RETRY_CAP", "1s".to_owned()),
        ("WORKER_BATCH_WINDOW", "20ms".to_owned()),
        ("WORKER_POLL_INTERVAL", "200ms".to_owned()),
        ("RUST_LOG", "info".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
    ] {
        env.push((k.to_owned(), v));
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let unknown = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    for cycle in 0..args.cycles {
        let server = start(&bin, &env)?;
        let url = format!("http://{}/webhook/activity", server.addr);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Load {
            client: client.clone(),
            url,
            standin: standin.clone(),
            message_share: args.message_share,
            stop: Arc::clone(&stop),
            acked: Arc::clone(&acked),
            unknown: Arc::clone(&unknown),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..args.concurrency {
            tasks.spawn(load(shared.clone(), format!("c{cycle}t{task}")));
        }
        let run_for = fastrand::u64(args.min_run_ms..=args.max_run_ms.max(args.min_run_ms));
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        kill9(server);
        stop.store(true, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
        let so_far = acked.lock().map(|a| a.len()).unwrap_or(0);
        eprintln!(
            "cycle {}/{}: killed after {run_for} ms; {so_far} acknowledged so far",
            cycle + 1,
            args.cycles
        );
    }

    // A last server drains the jobs; then everything is counted.
    let server = start(&bin, &env)?;
    let base = format!("http://{}", server.addr);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let pending = get_json(&client, &format!("{base}/jobs?state=pending&limit=1")).await?;
        if pending["count"] == 0 {
            break;
        }
        if Instant::now() > deadline {
            kill9(server);
            return Err("jobs still pending after 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut stored: HashMap<String, Vec<Value>> = HashMap::new();
    let mut path = format!("{base}/activities?limit=500");
    loop {
        let page = get_json(&client, &path).await?;
        for a in page["activities"].as_array().cloned().unwrap_or_default() {
            let order = a["order_id"].as_str().unwrap_or_default().to_owned();
            stored.entry(order).or_default().push(a);
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("{base}/activities?limit=500&cursor={c}"),
            None => break,
        }
    }
    let dead = get_json(&client, &format!("{base}/jobs?state=dead&limit=1")).await?["count"]
        .as_u64()
        .unwrap_or(0);
    kill9(server);

    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let mut lost = 0u64;
    let mut jobs_lost = 0u64;
    for a in &acked {
        match stored.get(&a.order_id).and_then(|v| v.first()) {
            None => {
                lost += 1;
                eprintln!("LOST: {} (activity {})", a.order_id, a.activity_id);
            }
            Some(s) => {
                if s["activity_id"] != a.activity_id.as_str() {
                    eprintln!(
                        "MISMATCH: {} stored as {} but acknowledged as {}",
                        a.order_id, s["activity_id"], a.activity_id
                    );
                    lost += 1;
                }
                if a.message && s["enrichment"] != "enriched" {
                    jobs_lost += 1;
                    eprintln!(
                        "JOB NOT DONE: {} enrichment {}",
                        a.order_id, s["enrichment"]
                    );
                }
            }
        }
    }
    let duplicated = stored.values().filter(|v| v.len() > 1).count() as u64;
    let stored_total: usize = stored.values().map(Vec::len).sum();
    let figures = json!({
        "store": format!("{:?}", args.store).to_lowercase(),
        "cycles": args.cycles,
        "acked": acked.len(),
        "acked_messages": acked.iter().filter(|a| a.message).count(),
        "unknown": unknown.load(Ordering::Relaxed),
        "stored": stored_total,
        "lost": lost,
        "duplicated": duplicated,
        "jobs_lost": jobs_lost,
        "dead_jobs": dead,
        "seconds": started.elapsed().as_secs_f64().round(),
    });
    println!(
        "store {} | cycles {} | acked {} ({} messages) | unknown {} | stored {} | lost {} | duplicated {} | jobs lost {} | dead jobs {} | {} s",
        figures["store"].as_str().unwrap_or_default(),
        figures["cycles"],
        figures["acked"],
        figures["acked_messages"],
        figures["unknown"],
        figures["stored"],
        figures["lost"],
        figures["duplicated"],
        figures["jobs_lost"],
        figures["dead_jobs"],
        figures["seconds"],
    );
    if args.json {
        println!("{figures}");
    }
    Ok(lost == 0 && duplicated == 0 && jobs_lost == 0 && dead == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("crash-harness: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("crash-harness: something was lost or doubled (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("crash-harness: {e}");
            ExitCode::from(2)
        }
    }
}
