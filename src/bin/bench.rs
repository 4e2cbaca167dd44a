//! The ingest benchmark. In one run, on one machine, with one load generator:
//!
//! 1. **baseline**: a bare axum handler (in its own process) that reads the
//!    same JSON body, checks Basic auth with the same code and answers 200:
//!    the ceiling for any axum service here;
//! 2. **qualia-webhook on SQLite**, durable as shipped (default settings,
//!    default log level);
//! 3. **qualia-webhook on DynamoDB**, against the local emulator (moto),
//!    which the benchmark starts itself when it has a Python with moto
//!    (`--moto-python` or `QW_MOTO_PYTHON`, as `scripts/test` installs it).
//!
//! For each: requests/s at saturation (closed loop, `--connections`
//! keep-alive senders), the ratio to the baseline, errors, peak RSS and CPU
//! time of the server process; then latency p50/p99/p99.9 at fixed offered
//! rates (open loop, shares of the baseline's rate; for the emulator, shares
//! of its own rate), measured from each request's *intended* start, so a
//! server that falls behind cannot hide its queue (coordinated omission
//! corrected). Afterwards every acknowledged notification is looked up
//! through the read API: one missing fails the run.
//!
//! Then enrichment: `--enrich` message notifications are queued in a
//! service that has no worker; a second start with the worker, against the
//! Qualia stand-in answering after 50 ms, is timed until every job is done,
//! and the stand-in counts the `messages` calls.
//!
//! ```sh
//! cargo build --release && target/release/bench              # a full run
//! target/release/bench --smoke                                # a few seconds
//! target/release/bench --json bench.json                      # also as JSON
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::routing::post;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use qualia_webhook::config::{Credentials, Secret};
use qualia_webhook::http::auth::BasicAuth;
use qualia_webhook::standin::{GRAPHQL_PATH, StandIn, sample_message};
use serde_json::{Value, json};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password-0123";
const QUALIA_USER: &str = "vendor";
const QUALIA_PASSWORD: &str = "vendor-password-0123";
/// Longest a single request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "bench",
    about = "Ingest benchmark: a bare axum baseline, qualia-webhook on SQLite and on the local \
             DynamoDB emulator, under the same load; then enrichment against the Qualia stand-in",
    after_help = "A full run takes a few minutes; --smoke takes a few seconds (CI runs it). \
                  Results: docs/performance.md."
)]
struct Args {
    /// Seconds of each closed-loop and open-loop phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Offered rates of the open loop, as shares of the baseline's rate.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    rates: Vec<f64>,
    /// Further open-loop rates, as shares of each service's own closed-loop
    /// rate: its latency at a load it sustains.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    own_rates: Vec<f64>,
    /// Connections against the DynamoDB emulator, which serves one request
    /// at a time.
    #[arg(long, default_value_t = 16)]
    dynamodb_connections: usize,
    /// Python with moto, to start the DynamoDB emulator [env: QW_MOTO_PYTHON].
    /// Without it the DynamoDB row is skipped.
    #[arg(long)]
    moto_python: Option<PathBuf>,
    /// Skip the DynamoDB row.
    #[arg(long)]
    no_dynamodb: bool,
    /// Message notifications for the enrichment measurement (0: skip).
    #[arg(long, default_value_t = 1000)]
    enrich: usize,
    /// Latency of the Qualia stand-in, in milliseconds.
    #[arg(long, default_value_t = 50)]
    qualia_latency_ms: u64,
    /// A few seconds in all: 1 s phases, 32 connections, one open-loop rate,
    /// 100 messages to enrich. Keeps the harness alive in CI.
    #[arg(long)]
    smoke: bool,
    /// The qualia-webhook binary [default: beside this one].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: serve the baseline handler on this address.
    #[arg(long, hide = true)]
    baseline_server: Option<SocketAddr>,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.smoke {
            self.seconds = 1;
            self.connections = self.connections.min(32);
            self.dynamodb_connections = self.dynamodb_connections.min(4);
            self.rates = vec![0.1];
            self.enrich = self.enrich.min(100);
        }
        if self.moto_python.is_none() {
            self.moto_python = std::env::var_os("QW_MOTO_PYTHON").map(PathBuf::from);
        }
        self
    }
}

// ---------------------------------------------------------------- baseline

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

// ----------------------------------------------------------------- processes

/// A server process of the run, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Peak resident memory (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // utime and stime are fields 14 and 15 of the whole line.
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// Starts a server and waits for its `listening` log line; its other output
/// is read and dropped, as a log collector would.
fn spawn(mut cmd: Command) -> Result<Server, String> {
    use std::io::{BufRead, BufReader};
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "listening"
            {
                let _ = tx.send(v["address"].as_str().unwrap_or_default().to_owned());
                break;
            }
            line.clear();
        }
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let addr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(a) => a,
        Err(_) => {
            stop(&mut child);
            return Err(format!("{cmd:?} did not start"));
        }
    };
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    Ok(Server { child, addr })
}

fn service_command(bin: &Path, dir: &Path, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("WEBHOOK_USERNAME", USER)
        .env("WEBHOOK_PASSWORD", PASSWORD)
        .env("BIND", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// The DynamoDB emulator, stopped when dropped.
struct Emulator {
    child: Child,
    url: String,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn start_emulator(python: &Path) -> Result<Emulator, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dynamodb-server.py");
    let mut child = Command::new(python)
        .arg(script)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            stop(&mut child);
            return Err(format!("the DynamoDB emulator ({script}) did not start"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Emulator {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

// ------------------------------------------------------------ load generator

/// Spreads keys over the whole range, invertibly (an odd multiplier is a
/// bijection modulo 2^64): order ids come out in random order, as Qualia's
/// do, and not as a few sequential runs that would flatter a B-tree.
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

/// `SPREAD`'s inverse modulo 2^64 (Newton's iteration doubles the correct
/// bits each step).
fn unspread(x: u64) -> u64 {
    let mut inv = SPREAD;
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(SPREAD.wrapping_mul(inv)));
    }
    x.wrapping_mul(inv)
}

/// The order id of a key: `bench` and 16 hex digits of the spread key.
fn order_id(key: u64) -> String {
    format!("bench{:016x}", key.wrapping_mul(SPREAD))
}

/// The key an order id spells, so the stored activities can be matched back.
fn key_of(order_id: &str) -> Option<u64> {
    u64::from_str_radix(order_id.strip_prefix("bench")?, 16)
        .ok()
        .map(unspread)
}

fn key(phase: u64, sender: u64, n: u64) -> u64 {
    (phase << 56) | (sender << 36) | n
}

/// A distinct, valid notification: the six types in turn.
fn notification(key: u64) -> Bytes {
    const TYPES: [&str; 6] = [
        "order_request",
        "order_cancelled",
        "order_completed",
        "order_revision_requested",
        "message",
        "documents",
    ];
    let t = TYPES[(key % 6) as usize];
    let order = order_id(key);
    // Formatted directly: the generator shares the machine, so it is kept
    // cheap. Every field is plain ASCII, nothing needs escaping.
    let body = if t == "message" {
        format!(
            r#"{{"type":"message","order_id":"{order}","message_id":"m{order}","description":"Marty McFly sent you a message."}}"#
        )
    } else {
        format!(
            r#"{{"type":"{t}","order_id":"{order}","description":"Boston Legal has sent you additional documents on order #TEST-2018-1"}}"#
        )
    };
    Bytes::from(body)
}

/// One keep-alive connection of the load generator (hyper's client, so the
/// generator costs little of the machine it shares).
struct Conn {
    addr: SocketAddr,
    auth: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        let auth = HeaderValue::from_str(&format!("Basic {token}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Conn {
            addr,
            auth,
            sender: None,
        }
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        self.sender.as_mut().ok_or_else(|| "no connection".into())
    }

    /// Posts one notification; whether it was answered 200.
    async fn post(&mut self, body: Bytes) -> bool {
        let auth = self.auth.clone();
        let attempt = async {
            let sender = self.connect().await?;
            sender.ready().await.map_err(|e| e.to_string())?;
            let req = Request::post("/webhook/activity")
                .header(header::HOST, "bench")
                .header(header::AUTHORIZATION, auth)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| e.to_string())?;
            let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let ok = res.status() == StatusCode::OK;
            res.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<bool, String>(ok)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(ok)) => ok,
            _ => {
                self.sender = None;
                false
            }
        }
    }
}

/// What one phase of load produced.
#[derive(Default)]
struct Outcome {
    /// Keys of the notifications answered 200.
    acked: Vec<u64>,
    errors: u64,
    /// Latency of each answered request (open loop only).
    latencies: Vec<Duration>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.acked.extend(other.acked);
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }
}

/// Closed loop: `connections` senders, each waiting for its answer before
/// its next request, for a 1 s warm-up and then `seconds`. Returns the rate
/// after the warm-up and what every request (warm-up included) produced.
async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    seconds: u64,
    phase: u64,
) -> (f64, Outcome) {
    let ok = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(1 + seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let ok = Arc::clone(&ok);
        tasks.spawn(async move {
            let mut conn = Conn::new(addr);
            let mut out = Outcome::default();
            let mut n = 0;
            while Instant::now() < stop_at {
                let k = key(phase, c as u64, n);
                n += 1;
                if conn.post(notification(k)).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                    out.acked.push(k);
                } else {
                    out.errors += 1;
                }
            }
            out
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok0, started) = (ok.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let rate = (ok.load(Ordering::Relaxed) - ok0) as f64 / started.elapsed().as_secs_f64();
    let mut all = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(out) = done {
            all.merge(out);
        }
    }
    (rate, all)
}

/// Open loop at `rate` requests/s for `seconds`, over `connections` senders
/// (wrk2's model): request i is due at start + i/rate, the next free sender
/// takes it, and its latency counts from when it was due. A server that
/// falls behind makes requests wait for a sender, and that wait is counted.
async fn open_loop(
    addr: SocketAddr,
    connections: usize,
    rate: f64,
    seconds: u64,
    phase: u64,
) -> Outcome {
    let total = (rate * seconds as f64).max(1.0) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut conn = Conn::new(addr);
            let mut out = Outcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due).await;
                let k = key(phase, 0, i);
                if conn.post(notification(k)).await {
                    out.latencies.push(due.elapsed());
                    out.acked.push(k);
                } else {
                    out.errors += 1;
                }
            }
            out
        });
    }
    let mut all = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(out) = done {
            all.merge(out);
        }
    }
    all.latencies.sort_unstable();
    all
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

// ------------------------------------------------------------------ checks

/// Reads every page of a paged read-API list (`path` with its query, which
/// takes `&cursor=`), handing each page to `on_page`.
async fn for_each_page(
    addr: SocketAddr,
    path: &str,
    mut on_page: impl FnMut(&Value),
) -> Result<(), String> {
    let client = reqwest::Client::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("http://{addr}{path}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client
            .get(&url)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("GET {path}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        on_page(&page);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(()),
        }
    }
}

/// Pages through every stored activity and checks that each acknowledged
/// key is among them. Returns (stored, acknowledged but missing).
async fn check_stored(addr: SocketAddr, acked: &[u64]) -> Result<(u64, u64), String> {
    let mut missing: HashSet<u64> = acked.iter().copied().collect();
    let mut stored = 0u64;
    for_each_page(addr, "/activities?limit=500", |page| {
        for a in page["activities"].as_array().into_iter().flatten() {
            stored += 1;
            if let Some(k) = a["order_id"].as_str().and_then(key_of) {
                missing.remove(&k);
            }
        }
    })
    .await?;
    Ok((stored, missing.len() as u64))
}

// ----------------------------------------------------------------- targets

/// One measured server.
struct Row {
    name: &'static str,
    rps: f64,
    errors: u64,
    peak_rss_mib: f64,
    /// CPU seconds of the server during the closed loop.
    cpu_s: f64,
    /// CPU seconds of the store's own process (the emulator), if any.
    store_cpu_s: Option<f64>,
    open: Vec<OpenRow>,
    acked: u64,
    stored: Option<u64>,
    lost: Option<u64>,
}

struct OpenRow {
    share: f64,
    /// What the share is of.
    of: &'static str,
    offered: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
}

/// How to drive one server.
struct Plan {
    name: &'static str,
    connections: usize,
    /// The rate the open loop's shares are of (`None`: the server's own).
    reference: Option<f64>,
    /// The store's own process, whose CPU time is reported beside.
    store_pid: Option<u32>,
    /// First key phase of this server's notifications.
    phase: u64,
    /// Whether to read every acknowledged notification back.
    check: bool,
}

/// Drives one server: closed loop, open loop at shares of the reference
/// rate, then the stored check.
async fn measure(server: &Server, plan: Plan, args: &Args) -> Result<Row, String> {
    let Plan {
        name,
        connections,
        reference,
        store_pid: extra_pid,
        phase,
        check,
    } = plan;
    let pid = server.child.id();
    let (cpu0, extra0) = (cpu_seconds(pid), extra_pid.map(cpu_seconds));
    let (rps, closed) = closed_loop(server.addr, connections, args.seconds, phase).await;
    let cpu_s = cpu_seconds(pid) - cpu0;
    let store_cpu_s = extra_pid.zip(extra0).map(|(p, c0)| cpu_seconds(p) - c0);
    let mut all = closed;
    let errors = all.errors;
    let mut open = Vec::new();
    // Shares of the baseline's rate (or of the server's own, without one),
    // then shares of the server's own rate: latency at a load it sustains.
    let mut shares: Vec<(f64, &'static str, f64)> = match reference {
        Some(r) => args.rates.iter().map(|s| (*s, "baseline", r)).collect(),
        None => args.rates.iter().map(|s| (*s, "own rate", rps)).collect(),
    };
    if reference.is_some() {
        shares.extend(args.own_rates.iter().map(|s| (*s, "own rate", rps)));
    }
    for (i, (share, of, base)) in shares.into_iter().enumerate() {
        let offered = (base * share).max(1.0);
        let out = open_loop(
            server.addr,
            connections,
            offered,
            args.seconds,
            phase + 1 + i as u64,
        )
        .await;
        open.push(OpenRow {
            share,
            of,
            offered,
            p50: percentile_ms(&out.latencies, 0.50),
            p99: percentile_ms(&out.latencies, 0.99),
            p999: percentile_ms(&out.latencies, 0.999),
            errors: out.errors,
        });
        all.merge(Outcome {
            latencies: Vec::new(),
            ..out
        });
    }
    let (stored, lost) = if check {
        let (s, l) = check_stored(server.addr, &all.acked).await?;
        (Some(s), Some(l))
    } else {
        (None, None)
    };
    Ok(Row {
        name,
        rps,
        errors,
        peak_rss_mib: peak_rss_mib(pid),
        cpu_s,
        store_cpu_s,
        open,
        acked: all.acked.len() as u64,
        stored,
        lost,
    })
}

/// The enrichment measurement.
struct Enrichment {
    messages: usize,
    latency_ms: u64,
    wall_ms: f64,
    done: u64,
    calls: u64,
}

async fn count_jobs(addr: SocketAddr, state: &str) -> Result<u64, String> {
    let mut count = 0;
    for_each_page(addr, &format!("/jobs?state={state}&limit=500"), |page| {
        count += page["count"].as_u64().unwrap_or(0);
    })
    .await?;
    Ok(count)
}

async fn enrichment(bin: &Path, args: &Args) -> Result<Enrichment, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let standin = StandIn::new(QUALIA_USER, QUALIA_PASSWORD, Default::default());
    standin.set_latency(Duration::from_millis(args.qualia_latency_ms));
    let (qualia, _task) = standin
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| e.to_string())?;
    let env = [
        (
            "STORE",
            format!("sqlite://{}", dir.path().join("enrich.db").display()),
        ),
        ("QUALIA_API_URL", format!("http://{qualia}{GRAPHQL_PATH}")),
        ("QUALIA_API_USERNAME", QUALIA_USER.to_owned()),
        ("QUALIA_API_PASSWORD", QUALIA_PASSWORD.to_owned()),
    ];

    // Queue: a service without a worker takes the notifications.
    let queued = spawn(service_command(
        bin,
        dir.path(),
        &env,
        &["serve", "--no-worker"],
    ))?;
    let mut conn = Conn::new(queued.addr);
    for i in 0..args.enrich {
        let order = format!("enrich{i:08}");
        let message = format!("msg{i:08}");
        standin.add_messages([sample_message(&order, &message, "benchmark")]);
        let body = json!({"type": "message", "order_id": order, "message_id": message,
                          "description": "Marty McFly sent you a message."});
        if !conn.post(Bytes::from(body.to_string())).await {
            return Err(format!("queueing message {i} was refused"));
        }
    }
    drop(conn);
    drop(queued);

    // Drain: a service with its worker, timed until no job is pending.
    let calls_before = standin.calls().messages;
    let started = Instant::now();
    let server = spawn(service_command(bin, dir.path(), &env, &["serve"]))?;
    loop {
        if count_jobs(server.addr, "pending").await? == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err("enrichment did not finish within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let done = count_jobs(server.addr, "done").await?;
    Ok(Enrichment {
        messages: args.enrich,
        latency_ms: args.qualia_latency_ms,
        wall_ms,
        done,
        calls: standin.calls().messages - calls_before,
    })
}

// ------------------------------------------------------------------ report

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn print_report(rows: &[Row], base_rps: f64, enrich: Option<&Enrichment>) {
    println!(
        "{:<24} {:>9} {:>6} {:>7} {:>8} {:>10} {:>9} {:>9} {:>5}",
        "target", "req/s", "ratio", "errors", "RSS MiB", "CPU s", "acked", "stored", "lost"
    );
    for r in rows {
        let cpu = match r.store_cpu_s {
            Some(s) => format!("{:.1}+{:.1}", r.cpu_s, s),
            None => format!("{:.1}", r.cpu_s),
        };
        println!(
            "{:<24} {:>9.0} {:>6.2} {:>7} {:>8.1} {:>10} {:>9} {:>9} {:>5}",
            r.name,
            r.rps,
            r.rps / base_rps,
            r.errors,
            r.peak_rss_mib,
            cpu,
            r.acked,
            fmt_opt(r.stored),
            fmt_opt(r.lost),
        );
    }
    println!("open loop (latency from each request's intended start):");
    for r in rows {
        for o in &r.open {
            println!(
                "  {:<22} {:>4.0}% of {:<8} = {:>7.0} req/s: p50 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  errors {}",
                r.name,
                o.share * 100.0,
                o.of,
                o.offered,
                o.p50,
                o.p99,
                o.p999,
                o.errors
            );
        }
    }
    if let Some(s) = rows.iter().find_map(|r| r.store_cpu_s.map(|s| (r, s))) {
        let (r, store) = s;
        println!(
            "{}: the service used {:.1} CPU s, the emulator {:.1} CPU s ({:.0}% of the pair's CPU was the service)",
            r.name,
            r.cpu_s,
            store,
            100.0 * r.cpu_s / (r.cpu_s + store)
        );
    }
    if let Some(e) = enrich {
        println!(
            "enrichment: {} messages, Qualia latency {} ms -> {} done in {:.0} ms with {} messages calls",
            e.messages, e.latency_ms, e.done, e.wall_ms, e.calls
        );
    }
}

fn report_json(rows: &[Row], base_rps: f64, enrich: Option<&Enrichment>, args: &Args) -> Value {
    let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    json!({
        "seconds": args.seconds,
        "connections": args.connections,
        "targets": rows.iter().map(|r| json!({
            "target": r.name,
            "rps": num(r.rps),
            "ratio": num(r.rps / base_rps),
            "errors": r.errors,
            "peak_rss_mib": num(r.peak_rss_mib),
            "cpu_s": num(r.cpu_s),
            "store_cpu_s": r.store_cpu_s.map(num),
            "acked": r.acked,
            "stored": r.stored,
            "lost": r.lost,
            "open_loop": r.open.iter().map(|o| json!({
                "share": o.share, "of": o.of, "offered_rps": num(o.offered),
                "p50_ms": num(o.p50), "p99_ms": num(o.p99), "p999_ms": num(o.p999),
                "errors": o.errors,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "enrichment": enrich.map(|e| json!({
            "messages": e.messages, "qualia_latency_ms": e.latency_ms,
            "wall_ms": num(e.wall_ms), "done": e.done, "messages_calls": e.calls,
        })),
    })
}

// -------------------------------------------------------------------- main

async fn run(args: Args) -> Result<bool, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = match &args.server {
        Some(p) => p.clone(),
        None => me
            .parent()
            .map(|d| d.join("qualia-webhook"))
            .ok_or("no folder for this binary")?,
    };
    let mut rows = Vec::new();

    // 1. Baseline, in its own process.
    let mut cmd = Command::new(&me);
    cmd.args(["--baseline-server", "127.0.0.1:0"]);
    let baseline = spawn(cmd)?;
    let plan = Plan {
        name: "baseline (bare axum)",
        connections: args.connections,
        reference: None,
        store_pid: None,
        phase: 0,
        check: false,
    };
    let no_open_loop = Args {
        rates: Vec::new(),
        own_rates: Vec::new(),
        ..args.clone()
    };
    let row = measure(&baseline, plan, &no_open_loop).await?;
    drop(baseline);
    let base_rps = row.rps;
    rows.push(row);

    // 2. SQLite, durable, settings and log level as shipped.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let env = [(
        "STORE",
        format!("sqlite://{}", dir.path().join("bench.db").display()),
    )];
    let server = spawn(service_command(&bin, dir.path(), &env, &["serve"]))?;
    let plan = Plan {
        name: "qualia-webhook, SQLite",
        connections: args.connections,
        reference: Some(base_rps),
        store_pid: None,
        phase: 16,
        check: true,
    };
    rows.push(measure(&server, plan, &args).await?);
    drop(server);

    // 3. DynamoDB, on the local emulator.
    match (&args.moto_python, args.no_dynamodb) {
        (Some(python), false) => {
            let emulator = start_emulator(python)?;
            let env = [
                ("STORE", "dynamodb://bench".to_owned()),
                ("AWS_ENDPOINT_URL", emulator.url.clone()),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ACCESS_KEY_ID", "testing".into()),
                ("AWS_SECRET_ACCESS_KEY", "testing".into()),
                ("AWS_EC2_METADATA_DISABLED", "true".into()),
                ("DYNAMODB_ATTEMPT_TIMEOUT", "30s".into()),
            ];
            let created = service_command(&bin, dir.path(), &env, &["table", "create"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| e.to_string())?;
            if !created.status.success() {
                return Err(format!(
                    "table create: {}",
                    String::from_utf8_lossy(&created.stderr)
                ));
            }
            let server = spawn(service_command(&bin, dir.path(), &env, &["serve"]))?;
            let plan = Plan {
                name: "qualia-webhook, DynamoDB",
                connections: args.dynamodb_connections,
                reference: None,
                store_pid: Some(emulator.child.id()),
                phase: 32,
                check: true,
            };
            rows.push(measure(&server, plan, &args).await?);
        }
        (None, false) => {
            println!("(DynamoDB skipped: no --moto-python and no QW_MOTO_PYTHON)");
        }
        (_, true) => {}
    }

    // 4. Enrichment.
    let enrich = if args.enrich > 0 {
        Some(enrichment(&bin, &args).await?)
    } else {
        None
    };

    print_report(&rows, base_rps, enrich.as_ref());
    if let Some(path) = &args.json {
        let doc = report_json(&rows, base_rps, enrich.as_ref(), &args);
        std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }

    let lost: u64 = rows.iter().filter_map(|r| r.lost).sum();
    let enriched = enrich.as_ref().is_none_or(|e| e.done == e.messages as u64);
    if lost > 0 {
        eprintln!("bench: {lost} acknowledged notifications are not in the store");
    }
    if !enriched {
        eprintln!("bench: not every queued message was enriched");
    }
    Ok(lost == 0 && enriched)
}

fn main() -> ExitCode {
    let args = Args::parse().effective();
    if let Some(addr) = args.baseline_server {
        return serve_baseline(addr);
    }
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_ids_map_back_to_their_keys() {
        for k in [
            0,
            1,
            7,
            key(16, 255, 123_456),
            key(35, 0, u32::MAX as u64),
            u64::MAX,
        ] {
            assert_eq!(key_of(&order_id(k)), Some(k), "{k}");
        }
        assert_eq!(key_of("other"), None);
    }
}
