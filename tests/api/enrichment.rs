//! Message enrichment end to end: the real server, its worker, and the Qualia
//! stand-in with injected faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qualia_webhook::activity::ActivityType;
use qualia_webhook::standin::{Fault, sample_message};
use qualia_webhook::store;
use qualia_webhook::worker::{Step, Worker, WorkerStatus};
use serde_json::Value;
use tokio::sync::Notify;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(15);

/// Posts one message notification whose message the stand-in knows (or
/// not); returns (order_id, message_id).
async fn post_message(app: &TestApp, qualia: &Qualia, known: bool) -> (String, String) {
    let order = new_id();
    let body = sample(ActivityType::Message, &order);
    let message_id = body["message_id"].as_str().unwrap().to_owned();
    if known {
        qualia.standin.add_messages([sample_message(
            &order,
            &message_id,
            &format!("text of {message_id}"),
        )]);
    }
    app.post_ok(&body).await;
    (order, message_id)
}

async fn wait_enriched(app: &TestApp, order: &str) {
    eventually(WAIT, &format!("order {order} enriched"), || async {
        app.timeline(order)
            .await
            .iter()
            .all(|a| a["enrichment"] == "enriched")
    })
    .await;
}

#[tokio::test]
async fn a_message_notification_is_completed_with_the_full_message() {
    let (app, qualia) = spawn_with_qualia(|_| {}).await;
    let (order, message_id) = post_message(&app, &qualia, true).await;
    eventually(WAIT, "message served", || async {
        app.messages_of(&order).await.len() == 1
    })
    .await;

    let answer = app.get_json(&format!("/webhook/activity/{order}")).await;
    assert_eq!(answer["count"], 1);
    assert_eq!(answer["message_type"], "message");
    let m = &answer["messages"][0];
    assert_eq!(m["order_id"], order.as_str());
    assert_eq!(m["message_id"], message_id.as_str());
    assert_eq!(m["text"], format!("text of {message_id}"));
    assert_eq!(m["from_name"], "Marty McFly");
    assert_eq!(m["created_date"], "2026-11-11T10:30:00.000Z");
    assert_eq!(m["read"], false);
    assert_eq!(m["order_number"], "TEST-2018-1");
    assert_eq!(m["attachments"][0]["name"], "survey.pdf");
    assert_eq!(m["attachments"][0]["_id"], format!("att-{message_id}"));
    assert!(m["stored_at"].as_str().is_some());

    wait_enriched(&app, &order).await;
    assert_eq!(app.job_count("done").await, 1);
    assert_eq!(app.job_count("pending").await, 0);
    let ready = app.get_json("/ready").await;
    assert_eq!(ready["worker"], "running");
}

#[tokio::test]
async fn a_hundred_messages_are_enriched_with_at_most_five_calls() {
    let (app, qualia) = spawn_with_qualia(|_| {}).await;
    let app = Arc::new(app);
    let mut orders = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..100 {
        let order = new_id();
        let body = sample(ActivityType::Message, &order);
        let mid = body["message_id"].as_str().unwrap().to_owned();
        qualia
            .standin
            .add_messages([sample_message(&order, &mid, "hello")]);
        orders.push(order);
        bodies.push(body);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for body in bodies {
        let app = Arc::clone(&app);
        tasks.spawn(async move { app.post(&body).await.status().as_u16() });
    }
    assert!(tasks.join_all().await.iter().all(|s| *s == 200));
    eventually(WAIT, "100 jobs done", || async {
        app.job_count("done").await == 100
    })
    .await;
    for order in &orders {
        assert_eq!(app.messages_of(order).await.len(), 1);
    }
    let calls = qualia.standin.calls().messages;
    assert!(calls <= 5, "{calls} messages calls for 100 messages");
}

/// Posts a message under `fault`, then expects it enriched with no dead job.
async fn recovers_from(
    fault: Fault,
    adjust: impl FnOnce(&mut qualia_webhook::config::Settings),
) -> (TestApp, Qualia) {
    let (app, qualia) = spawn_with_qualia(adjust).await;
    qualia.standin.inject(fault);
    let (order, _) = post_message(&app, &qualia, true).await;
    wait_enriched(&app, &order).await;
    assert_eq!(app.job_count("dead").await, 0);
    assert_eq!(app.messages_of(&order).await.len(), 1);
    (app, qualia)
}

#[tokio::test]
async fn http_500_twice_then_ok() {
    let (app, qualia) = recovers_from(
        Fault {
            status: Some(500),
            count: Some(2),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    assert!(qualia.standin.calls().messages >= 3);
    let done = app.get_json("/jobs?state=done").await;
    assert_eq!(
        done["jobs"][0]["attempts"], 2,
        "two failed attempts recorded"
    );
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let (_, qualia) = recovers_from(
        Fault {
            delay_ms: Some(1500),
            count: Some(1),
            ..Default::default()
        },
        |s| s.qualia.timeout = Duration::from_millis(300),
    )
    .await;
    assert!(qualia.standin.calls().messages >= 2);
}

#[tokio::test]
async fn a_malformed_answer_is_retried() {
    let (_, qualia) = recovers_from(
        Fault {
            malformed: true,
            count: Some(2),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    assert!(qualia.standin.calls().messages >= 3);
}

#[tokio::test]
async fn graphql_errors_are_retried() {
    let (_, qualia) = recovers_from(
        Fault {
            graphql_error: Some("Internal error, try again".into()),
            count: Some(2),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    assert!(qualia.standin.calls().messages >= 3);
}

#[tokio::test]
async fn a_429_retry_after_is_honoured() {
    let (_, qualia) = recovers_from(
        Fault {
            status: Some(429),
            retry_after: Some(2),
            count: Some(1),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let times = qualia.standin.message_call_times();
    assert!(times.len() >= 2);
    let waited = times[1] - times[0];
    assert!(
        waited >= Duration::from_secs(2),
        "next call after {waited:?}"
    );
}

#[tokio::test]
async fn refused_credentials_pause_the_worker_and_nothing_is_lost() {
    let (app, qualia) = spawn_with_qualia(|_| {}).await;
    qualia
        .standin
        .set_credentials(QUALIA_USER, "rotated-by-someone-else");
    let mut orders = Vec::new();
    for _ in 0..5 {
        orders.push(post_message(&app, &qualia, true).await.0);
    }
    eventually(WAIT, "worker paused", || async {
        app.get_json("/ready").await["worker"] == "paused"
    })
    .await;
    let pending = app.get_json("/jobs?state=pending").await;
    assert_eq!(pending["count"], 5, "jobs stay pending");
    assert!(
        pending["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["attempts"] == 0)
    );
    assert_eq!(app.job_count("dead").await, 0);
    assert!(qualia.standin.calls().unauthorized >= 1);
    // The webhook keeps working while paused.
    post_message(&app, &qualia, true).await;

    qualia.standin.set_credentials(QUALIA_USER, QUALIA_PASSWORD);
    eventually(WAIT, "all done after the fix", || async {
        app.job_count("done").await == 6
    })
    .await;
    for order in &orders {
        assert_eq!(app.messages_of(order).await.len(), 1);
    }
    assert_eq!(app.get_json("/ready").await["worker"], "running");
}

#[tokio::test]
async fn a_message_that_never_appears_goes_dead_then_comes_back_by_retry() {
    let (app, qualia) = spawn_with_qualia(|s| s.worker.max_attempts = 3).await;
    let (order, message_id) = post_message(&app, &qualia, false).await;
    eventually(WAIT, "job dead", || async {
        app.job_count("dead").await == 1
    })
    .await;
    let dead = app.get_json("/jobs?state=dead").await;
    let job = &dead["jobs"][0];
    assert_eq!(job["attempts"], 3);
    assert!(
        job["last_error"].as_str().unwrap().starts_with("not_found"),
        "{job}"
    );
    assert_eq!(app.timeline(&order).await[0]["enrichment"], "failed");

    // The message shows up; an operator retries the job.
    qualia
        .standin
        .add_messages([sample_message(&order, &message_id, "late")]);
    let job_id = job["job_id"].as_str().unwrap();
    let res = app
        .client
        .post(app.url(&format!("/jobs/{job_id}/retry")))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let retried: Value = res.json().await.unwrap();
    assert_eq!(retried["state"], "pending");
    assert_eq!(retried["attempts"], 0);
    wait_enriched(&app, &order).await;
    assert_eq!(app.messages_of(&order).await[0]["text"], "late");

    // Retrying a job that is not dead, or does not exist, says so.
    let again = app
        .client
        .post(app.url(&format!("/jobs/{job_id}/retry")))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let missing = app
        .client
        .post(app.url(&format!("/jobs/{}/retry", ulid::Ulid::generate())))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let unauth = app
        .client
        .post(app.url(&format!("/jobs/{job_id}/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
}

#[tokio::test]
async fn a_claimed_job_of_a_killed_worker_is_completed_after_its_lease() {
    let qualia = spawn_qualia().await;
    // The app's own worker is off: we play the killed worker, then start one.
    let app = spawn_with(|s| {
        use_qualia(s, &qualia.url);
        s.worker.enabled = false;
    })
    .await;
    let (order, _) = post_message(&app, &qualia, true).await;
    let lease = Duration::from_millis(400);
    let claimed = app
        .store
        .claim_jobs(store::now_ms(), lease, 10)
        .await
        .unwrap();
    assert_eq!(claimed.jobs.len(), 1);
    // ...and the worker dies here, never finishing.

    let mut settings = app.settings.clone();
    settings.worker.lease = lease;
    let mut worker = new_worker(&app, &qualia, &settings);
    assert_eq!(
        worker.step().await.unwrap(),
        Step::Idle,
        "the lease still holds"
    );
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let step = worker.step().await.unwrap();
    assert_eq!(
        step,
        Step::Completed {
            done: 1,
            retried: 0,
            dead: 0
        }
    );
    assert_eq!(app.messages_of(&order).await.len(), 1);
    assert_eq!(app.job_count("done").await, 1);

    // The dead worker's late completion changes nothing.
    app.store
        .finish_jobs(&claimed.token, store::now_ms(), vec![])
        .await
        .unwrap();
    assert_eq!(app.job_count("done").await, 1);
}

fn new_worker(
    app: &TestApp,
    qualia: &Qualia,
    settings: &qualia_webhook::config::Settings,
) -> Worker {
    let client = qualia_webhook::qualia::QualiaClient::new(&settings.qualia)
        .unwrap()
        .unwrap();
    let _ = &qualia.url;
    Worker::new(
        Arc::clone(&app.store),
        client,
        settings.worker.clone(),
        Arc::new(WorkerStatus::default()),
        Arc::new(Notify::new()),
    )
}

#[tokio::test]
async fn two_workers_on_one_store_complete_each_job_exactly_once() {
    let qualia = spawn_qualia().await;
    let app = spawn_with(|s| {
        use_qualia(s, &qualia.url);
        s.worker.enabled = false;
        s.worker.batch_size = 7;
    })
    .await;
    let mut orders = Vec::new();
    for _ in 0..120 {
        orders.push(post_message(&app, &qualia, true).await.0);
    }
    // A second handle on the same file, as a second process would have.
    let second = store::open(&app.settings.store, 10).await.unwrap();
    let mut a = new_worker(&app, &qualia, &app.settings);
    let client = qualia_webhook::qualia::QualiaClient::new(&app.settings.qualia)
        .unwrap()
        .unwrap();
    let mut b = Worker::new(
        Arc::clone(&second),
        client,
        app.settings.worker.clone(),
        Arc::new(WorkerStatus::default()),
        Arc::new(Notify::new()),
    );
    async fn drain(w: &mut Worker) -> usize {
        let mut done = 0;
        loop {
            match w.step().await.unwrap() {
                Step::Idle => return done,
                Step::Completed { done: d, .. } => done += d,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let (da, db) = tokio::join!(drain(&mut a), drain(&mut b));
    assert_eq!(da + db, 120, "each job completed once: {da} + {db}");
    assert!(da > 0 && db > 0, "both workers took part: {da} + {db}");
    assert_eq!(app.job_count("done").await, 120);
    for order in &orders {
        assert_eq!(app.messages_of(order).await.len(), 1);
    }
    second.close().await;
}

#[tokio::test]
async fn the_webhook_answers_fast_while_qualia_answers_nothing() {
    // A Qualia that accepts connections and never answers.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/api/vendor/graphql",
        blackhole.local_addr().unwrap()
    );
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = blackhole.accept().await {
            held.push(socket);
        }
    });
    let app = spawn_with(|s| {
        use_qualia(s, &url);
        s.qualia.timeout = Duration::from_secs(30);
    })
    .await;
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let order = new_id();
        let started = Instant::now();
        let res = app.post(&sample(ActivityType::Message, &order)).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(res.status(), 200);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest ack took {slowest:?}"
    );
    assert_eq!(app.job_count("pending").await, 30);
}

#[tokio::test]
async fn without_credentials_jobs_wait_and_the_worker_is_off() {
    let app = spawn_app().await;
    let order = new_id();
    app.post_ok(&sample(ActivityType::Message, &order)).await;
    assert_eq!(app.get_json("/ready").await["worker"], "off");
    assert_eq!(app.job_count("pending").await, 1);
}
