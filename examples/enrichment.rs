//! Measures enrichment: N message jobs queued in a fresh SQLite store, a
//! Qualia stand-in that knows every message and answers after a fixed
//! latency, and the real worker draining the queue. Prints the wall time and
//! the number of Qualia calls.
//!
//! cargo run --release --example enrichment -- [MESSAGES] [LATENCY_MS]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qualia_webhook::activity::Notification;
use qualia_webhook::config::{QualiaCredentials, Secret, Settings, StoreLocation};
use qualia_webhook::qualia::QualiaClient;
use qualia_webhook::standin::{StandIn, sample_message};
use qualia_webhook::store::{self, JobState, NewActivity};
use qualia_webhook::worker::{Step, Worker, WorkerStatus};
use serde_json::json;
use tokio::sync::Notify;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let latency_ms: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);

    let dir = tempfile::tempdir()?;
    let location = StoreLocation::Sqlite {
        path: dir.path().join("bench.db"),
    };
    let store = store::open(&location, 100).await?;

    let standin = StandIn::new("vendor", "vendor-password", Default::default());
    standin.set_latency(Duration::from_millis(latency_ms));
    let (addr, _server) = standin.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await?;

    let now = store::now_ms();
    for i in 0..count {
        let order = format!("order{i:012}");
        let message = format!("msg{i:014}");
        standin.add_messages([sample_message(&order, &message, "benchmark")]);
        let body = json!({"type": "message", "order_id": order, "message_id": message,
                          "description": "Marty McFly sent you a message."});
        let notification = Notification::parse(body.to_string().as_bytes())?;
        store
            .record_activity(NewActivity {
                activity_id: ulid::Ulid::generate().to_string(),
                notification,
                received_ms: now,
                request_id: format!("bench-{i}"),
                dedup_window: Duration::from_secs(600),
            })
            .await?;
    }

    let mut settings = Settings::new("u", "p", location);
    settings.qualia.url = format!("http://{addr}{}", qualia_webhook::standin::GRAPHQL_PATH);
    settings.qualia.credentials = Some(QualiaCredentials {
        username: "vendor".into(),
        password: Secret::new("vendor-password"),
    });
    let client = QualiaClient::new(&settings.qualia)?.ok_or("no client")?;
    let mut worker = Worker::new(
        Arc::clone(&store),
        client,
        settings.worker.clone(),
        Arc::new(WorkerStatus::default()),
        Arc::new(Notify::new()),
    );

    let started = Instant::now();
    let mut done = 0;
    loop {
        match worker.step().await? {
            Step::Idle => break,
            Step::Completed { done: d, .. } => done += d,
            other => return Err(format!("unexpected step {other:?}").into()),
        }
    }
    let wall = started.elapsed();
    let pending = store
        .list_jobs(JobState::Pending, 10, None)
        .await?
        .items
        .len();
    println!(
        "enrichment: {count} queued messages, Qualia latency {latency_ms} ms -> {done} done, \
         {pending} pending, {} messages calls, wall {:.1} ms",
        standin.calls().messages,
        wall.as_secs_f64() * 1000.0
    );
    store.close().await;
    if done != count {
        return Err(format!("only {done} of {count} enriched").into());
    }
    Ok(())
}
