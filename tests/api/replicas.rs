//! DynamoDB end to end: the HTTP API on DynamoDB, and two `serve` processes
//! sharing one table. Skipped (and saying so) without the test server that
//! `scripts/test` starts.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use qualia_webhook::activity::ActivityType;
use qualia_webhook::config::StoreLocation;
use qualia_webhook::standin::sample_message;
use serde_json::Value;

use crate::helpers::*;
use crate::process::start_server;

#[tokio::test]
async fn the_api_behaves_the_same_on_dynamodb_and_survives_a_restart() {
    let Some(table) = dynamodb_table().await else {
        return;
    };
    let qualia = spawn_qualia().await;
    let app = spawn_with(|s| {
        s.store = StoreLocation::DynamoDb {
            table: table.clone(),
        };
        use_qualia(s, &qualia.url);
    })
    .await;
    let order = new_id();
    let mut sent = Vec::new();
    for t in ActivityType::ALL {
        let body = sample(t, &order);
        if t == ActivityType::Message {
            let mid = body["message_id"].as_str().unwrap();
            qualia
                .standin
                .add_messages([sample_message(&order, mid, "hello from Qualia")]);
        }
        let answer = app.post_ok(&body).await;
        assert_eq!(answer["duplicate"], false);
        sent.push(body);
    }
    // Redeliveries are recognised on DynamoDB too.
    let again = app.post_ok(&sent[4]).await;
    assert_eq!(again["duplicate"], true);
    let cancel_again = app.post_ok(&sent[1]).await;
    assert_eq!(cancel_again["duplicate"], true);

    eventually(Duration::from_secs(30), "message enriched", || async {
        app.messages_of(&order).await.len() == 1
    })
    .await;
    let timeline = app.timeline(&order).await;
    assert_eq!(timeline.len(), 6);
    for (body, stored) in sent.iter().zip(&timeline) {
        assert_eq!(stored["activity_type"], body["type"]);
        assert_eq!(stored["payload"], *body);
    }
    assert_eq!(timeline[4]["deliveries"], 2);
    assert_eq!(timeline[1]["deliveries"], 2);
    eventually(Duration::from_secs(30), "activity enriched", || async {
        app.timeline(&order).await[4]["enrichment"] == "enriched"
    })
    .await;

    // Quarantine and a bad body behave as on SQLite.
    let res = app
        .client
        .post(app.url("/webhook/activity"))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(app.store.quarantined(10).await.unwrap()[0].body, b"{nope");

    let (settings, dir) = app.stop().await;
    let app = spawn_on(settings, dir).await;
    assert_eq!(app.timeline(&order).await.len(), 6);
    assert_eq!(
        app.messages_of(&order).await[0]["text"],
        "hello from Qualia"
    );
    let ready = app.get_json("/ready").await;
    assert_eq!(ready["status"], "ready");
}

#[tokio::test]
async fn a_missing_table_stops_start_up_with_a_clear_error() {
    if !dynamodb_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = crate::process::command(dir.path())
        .args(["serve"])
        .env("WEBHOOK_USERNAME", "qualia")
        .env("WEBHOOK_PASSWORD", "a-long-password")
        .env("BIND", "127.0.0.1:0")
        .env("DYNAMODB_TABLE", "no-such-table-here")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not exist") && stderr.contains("table create"),
        "{stderr}"
    );

    // `table create` makes it, twice without harm, and then serve starts.
    for _ in 0..2 {
        let out = crate::process::command(dir.path())
            .args(["table", "create", "--table", "no-such-table-here"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("is ready"));
    }
}

#[tokio::test]
async fn two_replicas_on_one_table_share_the_work_and_lose_nothing() {
    let Some(table) = dynamodb_table().await else {
        return;
    };
    const N: usize = 500;
    let qualia = spawn_qualia().await;
    let store = format!("dynamodb://{table}");
    let env = [
        ("STORE", store.as_str()),
        ("QUALIA_API_URL", qualia.url.as_str()),
        ("QUALIA_API_USERNAME", QUALIA_USER),
        ("QUALIA_API_PASSWORD", QUALIA_PASSWORD),
        ("WORKER_BATCH_WINDOW", "100ms"),
        ("WORKER_POLL_INTERVAL", "200ms"),
        ("RETRY_BASE", "50ms"),
        ("RETRY_CAP", "500ms"),
        ("JOB_LEASE", "60s"),
        ("LOG_FORMAT", "json"),
    ];
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = start_server(dir_a.path(), &env);
    let b = start_server(dir_b.path(), &env);
    let urls = Arc::new([format!("http://{}", a.addr), format!("http://{}", b.addr)]);

    let mut notifications = Vec::new();
    for _ in 0..N {
        let order = new_id();
        let body = sample(ActivityType::Message, &order);
        let mid = body["message_id"].as_str().unwrap().to_owned();
        qualia
            .standin
            .add_messages([sample_message(&order, &mid, "replicated")]);
        notifications.push((order, body));
    }
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let bodies: Vec<(usize, Value)> = notifications
        .iter()
        .map(|(_, b)| b.clone())
        .enumerate()
        .collect();
    let statuses: Vec<u16> = futures_util::stream::iter(bodies)
        .map(|(i, body)| {
            let client = client.clone();
            let urls = Arc::clone(&urls);
            async move {
                client
                    .post(format!("{}/webhook/activity", urls[i % 2]))
                    .basic_auth(USER, Some(PASSWORD))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).count()
    );
    eprintln!(
        "replicas: {N} notifications acknowledged in {:?}",
        started.elapsed()
    );

    let get = |path: String| {
        let client = client.clone();
        let base = urls[0].clone();
        async move {
            client
                .get(format!("{base}{path}"))
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let done = get("/jobs?state=done&limit=500".into()).await["count"]
            .as_u64()
            .unwrap_or(0);
        if done as usize == N {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {N} jobs done"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("replicas: all jobs done after {:?}", started.elapsed());
    assert_eq!(get("/jobs?state=pending".into()).await["count"], 0);
    assert_eq!(get("/jobs?state=dead".into()).await["count"], 0);

    // 500 activities across orders, each once.
    let mut seen = HashSet::new();
    let mut path = "/activities?limit=200".to_owned();
    loop {
        let page = get(path.clone()).await;
        for a in page["activities"].as_array().unwrap() {
            assert!(
                seen.insert(a["activity_id"].as_str().unwrap().to_owned()),
                "listed twice"
            );
            assert_eq!(a["deliveries"], 1);
            assert_eq!(a["enrichment"], "enriched");
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/activities?limit=200&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), N);
    // One message per order, readable through either replica.
    for (i, (order, body)) in notifications.iter().enumerate() {
        let v = client
            .get(format!("{}/webhook/activity/{order}", urls[i % 2]))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert_eq!(v["count"], 1, "{order}");
        assert_eq!(v["messages"][0]["message_id"], body["message_id"]);
    }
    let calls = qualia.standin.calls().messages;
    eprintln!("replicas: {N} messages enriched with {calls} Qualia messages calls");
    assert!(calls <= 60, "batching: {calls} calls for {N} messages");

    let (sa, logs_a) = a.terminate();
    let (sb, logs_b) = b.terminate();
    assert!(sa.success() && sb.success());
    let done_by = |logs: &str| {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "enrichment batch finished")
            .map(|v| v["done"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (da, db) = (done_by(&logs_a), done_by(&logs_b));
    eprintln!("replicas: replica A completed {da} jobs, replica B {db}");
    assert_eq!(da + db, N as u64, "each job completed exactly once");
}
