//! Store outages on the real stores: a full disk under SQLite. Ingest must
//! answer 503 with Retry-After (never 200 without a durable write), /ready
//! must say so, and both must recover by themselves with nothing lost.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qualia_webhook::config::StoreLocation;
use serde_json::json;

use crate::helpers::*;

/// A tmpfs of `size` mounted on `dir`; unmounted on drop.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk {
            dir: dir.to_owned(),
        })
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_503_never_200_and_recovers_with_nothing_lost() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mnt = dir.path().join("disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let Some(disk) = SmallDisk::mount(&mnt, "1M") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let mut settings = test_settings(&dir);
    settings.store = StoreLocation::Sqlite {
        path: mnt.join("q.db"),
    };
    let app = spawn_on(settings, Arc::clone(&dir)).await;

    // Fill the disk: 3 KiB descriptions until the store refuses.
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut first_refusal = None;
    for i in 0..2_000 {
        let order = format!("full{i}");
        let body = json!({"type": "documents", "order_id": order, "description": "d".repeat(3000)});
        let res = app.post(&body).await;
        match res.status().as_u16() {
            200 => {
                // A 200 after refusals began is fine: it must then be stored,
                // which the reconciliation below checks.
                acked.push(order);
            }
            503 => {
                assert!(
                    res.headers()["retry-after"]
                        .to_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                        > 0
                );
                refused += 1;
                first_refusal.get_or_insert(i);
                if refused >= 20 {
                    break;
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        refused >= 20,
        "the disk never filled ({} acked)",
        acked.len()
    );
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "/ready reports the full disk");

    // Free space: ingest and readiness come back by themselves.
    disk.resize("64M");
    let freed = Instant::now();
    let mut recovered = None;
    for i in 0..200 {
        let order = format!("after{i}");
        let res = app
            .post(&json!({"type": "documents", "order_id": order, "description": "x"}))
            .await;
        if res.status() == 200 {
            acked.push(order);
            recovered.get_or_insert(freed.elapsed());
        }
        if recovered.is_some() && i > 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = recovered.expect("ingest recovered after space was freed");
    // /ready keeps reporting a failed write for 5 s, then recovers by itself.
    eventually(Duration::from_secs(15), "/ready back to 200", || async {
        app.client
            .get(app.url("/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let ready_again = freed.elapsed();
    eprintln!(
        "outage (full disk): {} acked, {refused} answered 503, ingest recovered {recovered:?} and /ready {ready_again:?} after space was freed",
        acked.len()
    );

    // Everything acknowledged is there, after a restart too.
    let (settings, dir) = app.stop().await;
    let app = spawn_on(settings, dir).await;
    for order in &acked {
        assert_eq!(app.timeline(order).await.len(), 1, "{order} lost");
    }
    app.stop().await;
    drop(disk);
}

/// A DynamoDB emulator of this test's own, which it can pause.
struct Emulator {
    child: std::process::Child,
    url: String,
}

impl Emulator {
    fn start() -> Option<Self> {
        let python = std::env::var("QW_MOTO_PYTHON").ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/dynamodb-server.py"
            ))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Emulator {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "kill {sig}");
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamodb_outage_gives_503_and_recovers_with_nothing_lost() {
    if !dynamodb_enabled() {
        return;
    }
    let Some(emulator) = Emulator::start() else {
        panic!(
            "QW_TEST_DYNAMODB is set but the test's own emulator did not start (QW_MOTO_PYTHON)"
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("AWS_ENDPOINT_URL", emulator.url.as_str()),
        ("DYNAMODB_ATTEMPT_TIMEOUT", "1s"),
        ("STORE", "dynamodb://outage"),
        ("WORKER_POLL_INTERVAL", "200ms"),
    ];
    let mut create = crate::process::command(dir.path());
    create.args(["table", "create", "--table", "outage"]);
    for (k, v) in env {
        create.env(k, v);
    }
    let created = create.output().unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let server = crate::process::start_server(dir.path(), &env);
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let post = |order: String| {
        let client = client.clone();
        let url = format!("{base}/webhook/activity");
        async move {
            client
                .post(url)
                .basic_auth(USER, Some(PASSWORD))
                .json(&json!({"type": "order_request", "order_id": order, "description": "outage"}))
                .timeout(Duration::from_secs(20))
                .send()
                .await
        }
    };
    let mut acked = Vec::new();
    for i in 0..30 {
        let order = format!("before{i}");
        let res = post(order.clone()).await.unwrap();
        assert_eq!(res.status(), 200);
        acked.push(order);
    }

    // The store stops answering.
    emulator.signal("-STOP");
    let mut refused = 0;
    let mut i = 0;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        i += 1;
        let order = format!("during{i}");
        let res = post(order.clone()).await.unwrap();
        match res.status().as_u16() {
            503 => {
                assert!(res.headers().contains_key("retry-after"));
                refused += 1;
            }
            200 => acked.push(order),
            other => panic!("unexpected {other} during the outage"),
        }
    }
    assert!(refused >= 2, "{refused} refusals during the outage");
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "/ready reports the outage");

    // The store is back: ingest and readiness recover by themselves.
    emulator.signal("-CONT");
    let back = Instant::now();
    let mut recovered = None;
    for i in 0..200 {
        let order = format!("after{i}");
        let res = post(order.clone()).await.unwrap();
        if res.status() == 200 {
            acked.push(order);
            recovered.get_or_insert(back.elapsed());
            if i > 10 {
                break;
            }
        }
    }
    let recovered = recovered.expect("ingest recovered");
    eventually(Duration::from_secs(20), "/ready back", || async {
        client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    eprintln!(
        "outage (DynamoDB paused 8 s): {} acked, {refused} answered 503, ingest recovered {recovered:?} after the store came back",
        acked.len()
    );
    for order in &acked {
        let v: serde_json::Value = client
            .get(format!("{base}/orders/{order}/activities"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["count"], 1, "{order} lost or doubled");
    }
    server.terminate();
}
