//! Ingest benchmark (first version): a baseline bare axum handler that reads
//! the same JSON body and checks Basic auth, then qualia-webhook on SQLite,
//! each in its own process, driven by the same closed-loop load; then the
//! open-loop latency of qualia-webhook at fixed shares of the baseline's
//! rate, measured from each request's intended start (corrected for
//! coordinated omission). Afterwards every acknowledged notification is
//! looked up in the store.
//!
//! cargo run --release --bin bench -- --seconds 10
//! cargo run --release --bin bench -- --seconds 2 --connections 16   (a smoke run)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Parser;
use qualia_webhook::config::{Credentials, Secret};
use qualia_webhook::http::auth::BasicAuth;
use serde_json::{Value, json};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password-0123";

#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Seconds of each closed-loop and open-loop phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections in the closed loop.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Offered rates for the open loop, as shares of the baseline's rate.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    rates: Vec<f64>,
    /// The qualia-webhook binary [default: beside this one].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Write the table as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: serve the baseline handler on this address.
    #[arg(long, hide = true)]
    baseline_server: Option<SocketAddr>,
}

/// The baseline: read the body, check Basic auth, parse the JSON, answer 200.
async fn baseline_handler(
    axum::extract::State(auth): axum::extract::State<Arc<BasicAuth>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if !auth.allows(&headers) {
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

fn serve_baseline(addr: SocketAddr) -> ExitCode {
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async {
        let auth = Arc::new(BasicAuth::new(&Credentials {
            username: USER.into(),
            passwords: vec![Secret::new(PASSWORD)],
        }));
        let app = Router::new()
            .route("/webhook/activity", post(baseline_handler))
            .with_state(auth);
        let Ok(listener) = tokio::net::TcpListener::bind(addr).await else {
            return ExitCode::FAILURE;
        };
        if let Ok(a) = listener.local_addr() {
            println!("{{\"message\":\"listening\",\"address\":\"{a}\"}}");
        }
        let _ = axum::serve(listener, app).await;
        ExitCode::SUCCESS
    })
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Peak resident memory of the server process, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }
}

fn spawn(mut cmd: Command) -> Result<Server, String> {
    use std::io::{BufRead, BufReader};
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "listening"
            {
                let _ = tx.send(v["address"].as_str().unwrap_or_default().to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "server did not start".to_owned())?;
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    Ok(Server { child, addr })
}

/// A distinct notification: a mix of the six types, unique ids.
fn notification(worker: usize, n: u64) -> Vec<u8> {
    const TYPES: [&str; 6] = [
        "order_request",
        "order_cancelled",
        "order_completed",
        "order_revision_requested",
        "message",
        "documents",
    ];
    let t = TYPES[(n % 6) as usize];
    let order = format!("b{worker:03}x{n:012}");
    let body = if t == "message" {
        json!({"type": t, "order_id": order, "message_id": format!("m{order}"),
               "description": "Marty McFly sent you a message."})
    } else {
        json!({"type": t, "order_id": order, "description": "Boston Legal has sent you additional documents on order #TEST-2018-1"})
    };
    body.to_string().into_bytes()
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// Closed loop: `connections` senders, each waiting for its answer before
/// the next request. Returns (requests/s, errors).
async fn closed_loop(url: &str, connections: usize, seconds: u64, id_base: usize) -> (f64, u64) {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let (url, tally, stop) = (url.to_owned(), Arc::clone(&tally), Arc::clone(&stop));
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let res = client
                    .post(&url)
                    .basic_auth(USER, Some(PASSWORD))
                    .header("content-type", "application/json")
                    .body(notification(id_base + c, n))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => tally.ok.fetch_add(1, Ordering::Relaxed),
                    _ => tally.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let (ok0, started) = (tally.ok.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let ok = tally.ok.load(Ordering::Relaxed) - ok0;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    (ok as f64 / elapsed, tally.errors.load(Ordering::Relaxed))
}

/// Open loop at `rate` requests/s: request i is due at start + i/rate and its
/// latency counts from then, so a stalled server cannot hide its queue.
async fn open_loop(url: &str, rate: f64, seconds: u64, id_base: usize) -> (Vec<Duration>, u64) {
    let total = (rate * seconds as f64) as u64;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap_or_default();
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move {
            let res = client
                .post(&url)
                .basic_auth(USER, Some(PASSWORD))
                .header("content-type", "application/json")
                .body(notification(id_base, i))
                .send()
                .await;
            let ok = matches!(&res, Ok(r) if r.status() == 200);
            (due.elapsed(), ok)
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((d, true)) => latencies.push(d),
            _ => errors += 1,
        }
    }
    latencies.sort();
    (latencies, errors)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn stored_count(base: &str) -> Result<u64, String> {
    let client = reqwest::Client::new();
    let mut count = 0;
    let mut path = format!("{base}/activities?limit=500");
    loop {
        let page: Value = client
            .get(&path)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        count += page["count"].as_u64().unwrap_or(0);
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("{base}/activities?limit=500&cursor={c}"),
            None => return Ok(count),
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let server_bin = match &args.server {
        Some(p) => p.clone(),
        None => me
            .parent()
            .map(|d| d.join("qualia-webhook"))
            .ok_or("no folder for this binary")?,
    };
    let mut rows = Vec::new();

    // Baseline, in its own process.
    let mut cmd = Command::new(&me);
    cmd.args(["--baseline-server", "127.0.0.1:0"]);
    let baseline = spawn(cmd)?;
    let url = format!("http://{}/webhook/activity", baseline.addr);
    let (base_rps, base_errors) = closed_loop(&url, args.connections, args.seconds, 0).await;
    rows.push(
        json!({"target": "baseline (bare axum)", "rps": base_rps, "errors": base_errors,
                     "ratio": 1.0, "peak_rss_mib": baseline.peak_rss_mib()}),
    );
    drop(baseline);

    // qualia-webhook on SQLite, durable as shipped.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&server_bin);
    cmd.arg("serve")
        .env("WEBHOOK_USERNAME", USER)
        .env("WEBHOOK_PASSWORD", PASSWORD)
        .env("BIND", "127.0.0.1:0")
        .env(
            "STORE",
            format!("sqlite://{}", dir.path().join("bench.db").display()),
        )
        .env("RUST_LOG", "warn,qualia_webhook=info")
        .current_dir(dir.path());
    let server = spawn(cmd)?;
    let base = format!("http://{}", server.addr);
    let url = format!("{base}/webhook/activity");
    let (rps, errors) = closed_loop(&url, args.connections, args.seconds, 1000).await;
    let mut acked_estimate = 0u64;
    let mut row = json!({"target": "qualia-webhook, SQLite", "rps": rps, "errors": errors,
                         "ratio": rps / base_rps});
    for (k, share) in args.rates.iter().enumerate() {
        let rate = (base_rps * share).max(1.0);
        let (lat, errs) = open_loop(&url, rate, args.seconds, 2000 + k).await;
        acked_estimate += lat.len() as u64;
        row[format!("open_{share}")] = json!({
            "offered_rps": rate, "p50_ms": percentile(&lat, 0.50), "p99_ms": percentile(&lat, 0.99),
            "p999_ms": percentile(&lat, 0.999), "errors": errs,
        });
    }
    row["peak_rss_mib"] = json!(server.peak_rss_mib());
    let stored = stored_count(&base).await?;
    row["stored"] = json!(stored);
    rows.push(row);
    drop(server);

    println!(
        "{:<26} {:>10} {:>7} {:>7} {:>9}",
        "target", "req/s", "ratio", "errors", "RSS MiB"
    );
    for r in &rows {
        println!(
            "{:<26} {:>10.0} {:>7.2} {:>7} {:>9.1}",
            r["target"].as_str().unwrap_or_default(),
            r["rps"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0),
            r["errors"],
            r["peak_rss_mib"].as_f64().unwrap_or(0.0)
        );
    }
    println!("open loop on qualia-webhook, SQLite (latency from each request's intended start):");
    for share in &args.rates {
        let o = &rows[1][format!("open_{share}")];
        println!(
            "  {:>4.0}% of baseline = {:>8.0} req/s offered: p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
            share * 100.0,
            o["offered_rps"].as_f64().unwrap_or(0.0),
            o["p50_ms"].as_f64().unwrap_or(f64::NAN),
            o["p99_ms"].as_f64().unwrap_or(f64::NAN),
            o["p999_ms"].as_f64().unwrap_or(f64::NAN),
            o["errors"]
        );
    }
    println!(
        "stored {stored} activities; open-loop acknowledgements alone were {acked_estimate} (the closed loop's come on top)"
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(stored >= acked_estimate)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(addr) = args.baseline_server {
        return serve_baseline(addr);
    }
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: fewer activities stored than acknowledged");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(2)
        }
    }
}
