//! The real binary as an operator runs it: start-up errors, signals, logs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qualia_webhook::activity::ActivityType;
use serde_json::Value;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_qualia-webhook");

/// The binary with a clean environment (no stray settings) in `dir`; only
/// PATH and the AWS settings of the test DynamoDB server are passed on.
pub fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(dir)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in std::env::vars_os() {
        let k_s = k.to_string_lossy();
        if k_s.starts_with("AWS_") || k_s == "DYNAMODB_ATTEMPT_TIMEOUT" {
            cmd.env(&k, v);
        }
    }
    cmd
}

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub output: Arc<Mutex<String>>,
}

/// Starts `serve` and waits for its "listening" line.
pub fn start_server(dir: &Path, extra: &[(&str, &str)]) -> Server {
    let mut cmd = command(dir);
    cmd.args(["serve"])
        .env("WEBHOOK_USERNAME", USER)
        .env("WEBHOOK_PASSWORD", PASSWORD)
        .env("BIND", "127.0.0.1:0")
        .env(
            "STORE",
            format!("sqlite://{}", dir.join("data/q.db").display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("binary starts");
    let output = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    for (stream, tx) in [
        (Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)),
        (Box::new(stderr), None),
    ] {
        let output = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(tx) = &tx
                    && let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "listening"
                {
                    let _ = tx.send(v["address"].as_str().unwrap_or("").to_owned());
                }
                output.lock().unwrap().push_str(&line);
                output.lock().unwrap().push('\n');
            }
        });
    }
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server says where it listens")
        .parse()
        .expect("an address");
    Server {
        child,
        addr,
        output,
    }
}

impl Server {
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("server exits");
        std::thread::sleep(Duration::from_millis(100)); // let the readers drain
        let out = self.output.lock().unwrap().clone();
        (status, out)
    }
}

#[test]
fn a_missing_password_stops_start_up_with_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path())
        .args(["serve"])
        .env("WEBHOOK_USERNAME", "qualia")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("WEBHOOK_PASSWORD"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "nothing created before the settings are right"
    );
}

#[test]
fn a_malformed_setting_is_named_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("MAX_BODY_BYTES", "lots"),
        ("DEDUP_WINDOW", "soonish"),
        ("BIND", "not-an-address"),
        ("STORE", "mysql://db"),
        ("LOG_FORMAT", "xml"),
    ] {
        let out = command(dir.path())
            .args(["serve"])
            .env("WEBHOOK_USERNAME", "qualia")
            .env("WEBHOOK_PASSWORD", "a-long-password")
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(name), "{stderr}");
    }
}

#[test]
fn settings_come_from_a_dotenv_file_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "WEBHOOK_USERNAME=qualia\nWEBHOOK_PASSWORD=from-dotenv\nMAX_BODY_BYTES=12\n",
    )
    .unwrap();
    // The .env value is read (and refused: too small)...
    let out = command(dir.path()).args(["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAX_BODY_BYTES"));
    // ...and a flag overrides it; the next problem is then BIND.
    let out = command(dir.path())
        .args(["serve", "--max-body-bytes", "4096", "--bind", "bad"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("BIND") && !stderr.contains("MAX_BODY_BYTES"),
        "{stderr}"
    );
}

#[test]
fn a_corrupt_store_stops_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.db"), vec![0x42u8; 8192]).unwrap();
    let out = command(dir.path())
        .args(["serve", "--store", "sqlite://broken.db"])
        .env("WEBHOOK_USERNAME", "qualia")
        .env("WEBHOOK_PASSWORD", "a-long-password")
        .env("BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.db") && stderr.contains("not a database"),
        "{stderr}"
    );
}

#[test]
fn an_unwritable_store_path_stops_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), b"x").unwrap();
    let out = command(dir.path())
        .args(["serve", "--store", "sqlite://a-file/sub/q.db"])
        .env("WEBHOOK_USERNAME", "qualia")
        .env("WEBHOOK_PASSWORD", "a-long-password")
        .env("BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot create folder"), "{stderr}");
}

#[test]
fn help_lists_the_settings_without_their_secret_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path())
        .args(["serve", "--help"])
        .env("WEBHOOK_PASSWORD", "hunter2-super-secret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for name in [
        "BIND",
        "WEBHOOK_USERNAME",
        "WEBHOOK_PASSWORD",
        "STORE",
        "DEDUP_WINDOW",
        "MAX_BODY_BYTES",
    ] {
        assert!(help.contains(name), "{name} in --help");
    }
    assert!(!help.contains("hunter2-super-secret"));
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_logs_never_hold_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let previous = "previous-password-42";
    let qualia_password = "qualia-api-secret-77";
    let server = start_server(
        dir.path(),
        &[
            ("WEBHOOK_PASSWORD_PREVIOUS", previous),
            // A Qualia that is not there: the worker fails and logs it.
            ("QUALIA_API_URL", "http://127.0.0.1:9/api/vendor/graphql"),
            ("QUALIA_API_USERNAME", "vendor"),
            ("QUALIA_API_PASSWORD", qualia_password),
            ("WORKER_BATCH_WINDOW", "10ms"),
        ],
    );
    let client = reqwest::Client::new();
    let url = format!("http://{}/webhook/activity", server.addr);
    let order = new_id();
    for (user, pass) in [
        (USER, PASSWORD),
        (USER, previous),
        (USER, "guess-1"),
        ("admin", PASSWORD),
    ] {
        let _ = client
            .post(&url)
            .basic_auth(user, Some(pass))
            .json(&sample(ActivityType::Message, &order))
            .send()
            .await
            .unwrap();
    }
    let _ = client
        .post(&url)
        .basic_auth(USER, Some(PASSWORD))
        .body("{oops")
        .send()
        .await
        .unwrap();
    let (status, logs) = server.terminate();
    assert!(status.success(), "exit status {status:?}\n{logs}");

    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a JSON log line: {l}")))
        .collect();
    let ingest: Vec<&Value> = lines.iter().filter(|l| l["message"] == "ingest").collect();
    assert_eq!(ingest.len(), 5, "one line per request:\n{logs}");
    let first = ingest[0];
    for field in [
        "request_id",
        "order_id",
        "activity_type",
        "message_id",
        "response_time_ms",
        "status",
    ] {
        assert!(!first[field].is_null(), "{field} in {first}");
    }
    assert!(lines.iter().any(|l| l["message"] == "stopped"), "{logs}");
    for secret in [
        PASSWORD,
        previous,
        &base64_basic(USER, PASSWORD)["Basic ".len()..],
    ] {
        assert!(!logs.contains(secret), "a secret reached the logs:\n{logs}");
    }
}

#[tokio::test]
async fn a_restarted_binary_serves_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &[]);
    let client = reqwest::Client::new();
    let order = new_id();
    for t in ActivityType::ALL {
        let res = client
            .post(format!("http://{}/webhook/activity", server.addr))
            .basic_auth(USER, Some(PASSWORD))
            .json(&sample(t, &order))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let (status, _) = server.terminate();
    assert!(status.success());

    let server = start_server(dir.path(), &[]);
    let v: Value = client
        .get(format!("http://{}/orders/{order}/activities", server.addr))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["count"], 6);
    server.terminate();
}

#[tokio::test]
async fn jobs_list_and_retry_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let location = qualia_webhook::config::StoreLocation::Sqlite {
        path: dir.path().join("data/q.db"),
    };
    let store_url = format!("sqlite://{}", dir.path().join("data/q.db").display());
    {
        let s = qualia_webhook::store::open(&location, 10).await.unwrap();
        for _ in 0..2 {
            let order = new_id();
            let n = qualia_webhook::activity::Notification::parse(
                sample(ActivityType::Message, &order).to_string().as_bytes(),
            )
            .unwrap();
            s.record_activity(qualia_webhook::store::NewActivity {
                activity_id: ulid::Ulid::generate().to_string(),
                notification: n,
                received_ms: 1,
                request_id: "r".into(),
                dedup_window: Duration::from_secs(600),
            })
            .await
            .unwrap();
        }
        let claim = s.claim_jobs(1, Duration::from_secs(60), 10).await.unwrap();
        let outcomes = claim
            .jobs
            .iter()
            .map(|j| qualia_webhook::store::JobOutcome::Dead {
                job: j.clone(),
                error: "not_found: gone".into(),
            })
            .collect();
        s.finish_jobs(&claim.token, 2, outcomes).await.unwrap();
        s.close().await;
    }
    let run = |args: &[&str]| {
        let out = command(dir.path())
            .args(args)
            .env("STORE", &store_url)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["jobs", "list", "--dead"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("not_found: gone") && out.contains("2 dead job(s)"),
        "{out}"
    );
    let first_id = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();

    let (code, out, _) = run(&["jobs", "retry", &first_id]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("pending again"));
    let (code, _, err) = run(&["jobs", "retry", &first_id]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not dead"), "{err}");
    let (code, out, _) = run(&["jobs", "retry", "--all-dead"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("1 dead job(s)"), "{out}");
    let (code, out, _) = run(&["jobs", "list", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 2);
    for line in out.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["state"], "pending");
    }
    let (code, _, err) = run(&["jobs", "retry"]);
    assert_eq!(code, Some(2), "an id or --all-dead is required: {err}");
}
