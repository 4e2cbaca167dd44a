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
