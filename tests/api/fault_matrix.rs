//! The Qualia fault matrix: each fault class held for a while as
//! notifications keep arriving, then cleared. Every job must end done, none
//! dead, and the webhook's latency must not follow Qualia's trouble. Prints
//! one row per class (run with --nocapture to see them).

use std::time::{Duration, Instant};

use qualia_webhook::activity::ActivityType;
use qualia_webhook::standin::{Fault, sample_message};

use crate::helpers::*;

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[((v.len() as f64) * 0.99).ceil() as usize - 1]
}

/// Sends `n` notifications (30% messages the stand-in knows), `gap` apart;
/// returns each acknowledgement's latency.
async fn send(app: &TestApp, qualia: &Qualia, n: usize, gap: Duration) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let order = new_id();
        let t = if i % 10 < 3 {
            ActivityType::Message
        } else {
            ActivityType::ALL[i % 6]
        };
        let body = sample(t, &order);
        if let Some(mid) = body["message_id"].as_str() {
            qualia
                .standin
                .add_messages([sample_message(&order, mid, "matrix")]);
        }
        let started = Instant::now();
        let res = app.post(&body).await;
        latencies.push(started.elapsed());
        assert_eq!(res.status(), 200);
        tokio::time::sleep(gap).await;
    }
    latencies
}

enum Class {
    Fault(Fault),
    RefusedCredentials,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qualia_fault_class_clears_with_no_dead_job_and_no_webhook_slowdown() {
    let forever = Some(1_000_000);
    let classes: Vec<(&str, Class)> = vec![
        (
            "HTTP 500",
            Class::Fault(Fault {
                status: Some(500),
                count: forever,
                ..Default::default()
            }),
        ),
        (
            "HTTP 503",
            Class::Fault(Fault {
                status: Some(503),
                count: forever,
                ..Default::default()
            }),
        ),
        (
            "timeout",
            Class::Fault(Fault {
                delay_ms: Some(2_000),
                count: forever,
                ..Default::default()
            }),
        ),
        (
            "malformed body",
            Class::Fault(Fault {
                malformed: true,
                count: forever,
                ..Default::default()
            }),
        ),
        (
            "GraphQL errors",
            Class::Fault(Fault {
                graphql_error: Some("Internal error".into()),
                count: forever,
                ..Default::default()
            }),
        ),
        (
            "429 Retry-After 1",
            Class::Fault(Fault {
                status: Some(429),
                retry_after: Some(1),
                count: forever,
                ..Default::default()
            }),
        ),
        ("401 credentials", Class::RefusedCredentials),
    ];
    let mut rows = Vec::new();
    for (name, class) in classes {
        let (app, qualia) = spawn_with_qualia(|s| {
            s.qualia.timeout = Duration::from_millis(400);
            s.worker.max_attempts = 3; // transient faults must still never kill a job
        })
        .await;
        let calm = send(&app, &qualia, 60, Duration::from_millis(10)).await;
        eventually(Duration::from_secs(20), "calm jobs done", || async {
            app.job_count("pending").await == 0
        })
        .await;
        let calls_before = qualia.standin.calls().total();

        match &class {
            Class::Fault(f) => qualia.standin.inject(f.clone()),
            Class::RefusedCredentials => qualia.standin.set_credentials(QUALIA_USER, "revoked"),
        }
        let held = Instant::now();
        let during = send(&app, &qualia, 120, Duration::from_millis(12)).await;
        let held_for = held.elapsed();
        let calls_during = qualia.standin.calls().total() - calls_before;
        match class {
            Class::Fault(_) => qualia.standin.clear_faults(),
            Class::RefusedCredentials => {
                qualia.standin.set_credentials(QUALIA_USER, QUALIA_PASSWORD)
            }
        }
        let cleared = Instant::now();
        eventually(
            Duration::from_secs(30),
            &format!("{name}: all jobs done after the fault"),
            || async { app.job_count("pending").await == 0 },
        )
        .await;
        let drained = cleared.elapsed();
        let dead = app.job_count("dead").await;
        let done = app.job_count("done").await;
        assert_eq!(dead, 0, "{name}: dead jobs");
        let (p_calm, p_fault) = (p99(calm), p99(during));
        rows.push(format!(
            "{name:<18} held {:>5.1} s  calls {calls_during:>4}  p99 calm {:>6.2} ms  p99 during {:>6.2} ms  drained {:>5.2} s  done {done:>3}  dead {dead}",
            held_for.as_secs_f64(),
            p_calm.as_secs_f64() * 1000.0,
            p_fault.as_secs_f64() * 1000.0,
            drained.as_secs_f64(),
        ));
        // Isolation, with a wide margin for a loaded 2-core machine: the
        // acknowledgement does not wait for Qualia.
        assert!(
            p_fault < Duration::from_millis(300),
            "{name}: webhook p99 {p_fault:?} during the fault"
        );
    }
    eprintln!("fault matrix:\n{}", rows.join("\n"));
}
