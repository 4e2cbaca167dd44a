//! `POST /webhook/activity`: every row of the status table, dedup,
//! durability, jobs and the quarantine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use qualia_webhook::activity::{ActivityType, OrderId};
use qualia_webhook::startup::Application;
use qualia_webhook::store::{
    self, ActivityQuery, ActivityRecord, Claim, JobCounts, JobOutcome, JobRecord, JobState,
    MessageRecord, NewActivity, Page, QuarantineEntry, Recorded, Store, StoreError,
};
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn each_sample_notification_is_stored_and_shown_in_the_timeline() {
    let app = spawn_app().await;
    let order = new_id();
    let mut sent = Vec::new();
    for t in ActivityType::ALL {
        let body = sample(t, &order);
        let answer = app.post_ok(&body).await;
        assert_eq!(answer["status"], "success");
        assert_eq!(answer["order_id"], order.as_str());
        assert_eq!(answer["activity_type"], t.as_str());
        assert_eq!(answer["duplicate"], false);
        assert!(
            answer["activity_id"]
                .as_str()
                .is_some_and(|s| s.len() == 26)
        );
        assert!(answer["request_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(answer["response_time_ms"].as_f64().is_some());
        sent.push((body, answer["activity_id"].clone()));
    }
    let timeline = app.timeline(&order).await;
    assert_eq!(timeline.len(), 6);
    for ((body, activity_id), stored) in sent.iter().zip(&timeline) {
        assert_eq!(&stored["activity_id"], activity_id);
        assert_eq!(stored["activity_type"], body["type"]);
        assert_eq!(stored["description"], body["description"]);
        assert_eq!(stored["deliveries"], 1);
        assert_eq!(stored["payload"], *body);
        if body["type"] == "message" {
            assert_eq!(stored["message_id"], body["message_id"]);
            assert_eq!(stored["enrichment"], "pending");
        } else {
            assert_eq!(stored["message_id"], Value::Null);
            assert_eq!(stored["enrichment"], "not_applicable");
        }
    }
}

#[tokio::test]
async fn unknown_fields_are_kept_in_the_stored_payload() {
    let app = spawn_app().await;
    let order = new_id();
    let mut body = sample(ActivityType::Documents, &order);
    body["new_field"] = json!({"nested": [1, 2, 3]});
    app.post_ok(&body).await;
    let timeline = app.timeline(&order).await;
    assert_eq!(
        timeline[0]["payload"]["new_field"],
        json!({"nested": [1, 2, 3]})
    );
}

async fn post_raw(
    app: &TestApp,
    body: impl Into<reqwest::Body>,
    content_type: Option<&str>,
    auth: Option<(&str, &str)>,
) -> reqwest::Response {
    let mut req = app.client.post(app.url("/webhook/activity")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await.expect("request sent")
}

async fn error_of(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    (status, res.json().await.expect("JSON error body"))
}

const JSON: Option<&str> = Some("application/json");
const GOOD: Option<(&str, &str)> = Some((USER, PASSWORD));

fn valid_body() -> String {
    sample(ActivityType::OrderRequest, &new_id()).to_string()
}

#[tokio::test]
async fn no_auth_is_401_with_a_challenge() {
    let app = spawn_app().await;
    let res = post_raw(&app, valid_body(), JSON, None).await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["www-authenticate"],
        "Basic realm=\"qualia-webhook\""
    );
    let (_, body) = error_of(res).await;
    assert_eq!(body["error"], "unauthorized");
}

#[tokio::test]
async fn wrong_password_is_401() {
    let app = spawn_app().await;
    let res = post_raw(&app, valid_body(), JSON, Some((USER, "wrong"))).await;
    assert_eq!(res.status(), 401);
    assert!(res.headers().contains_key("www-authenticate"));
    let res = post_raw(&app, valid_body(), JSON, Some(("someone-else", PASSWORD))).await;
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn rotated_password_is_accepted_during_rotation() {
    let app = spawn_with(|s| {
        s.webhook.passwords = vec![
            qualia_webhook::config::Secret::new("new-password"),
            qualia_webhook::config::Secret::new(PASSWORD),
        ];
    })
    .await;
    let res = post_raw(&app, valid_body(), JSON, Some((USER, "new-password"))).await;
    assert_eq!(res.status(), 200);
    let res = post_raw(&app, valid_body(), JSON, Some((USER, PASSWORD))).await;
    assert_eq!(res.status(), 200, "previous password still accepted");
    let res = post_raw(&app, valid_body(), JSON, Some((USER, "older-password"))).await;
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let app = spawn_app().await;
    let mut body = sample(ActivityType::Documents, &new_id());
    body["padding"] = json!("x".repeat(65 * 1024));
    let res = post_raw(&app, body.to_string(), JSON, GOOD).await;
    let (status, err) = error_of(res).await;
    assert_eq!(status, 413);
    assert_eq!(err["error"], "payload_too_large");

    // Without a Content-Length (chunked), the limit holds as well.
    let body = body.to_string();
    let (a, b) = body.split_at(40_000);
    let auth = base64_basic(USER, PASSWORD);
    let request = format!(
        "POST /webhook/activity HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let answer = raw_http(app.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn text_plain_is_415() {
    let app = spawn_app().await;
    let (status, err) =
        error_of(post_raw(&app, valid_body(), Some("text/plain"), GOOD).await).await;
    assert_eq!(status, 415);
    assert_eq!(err["error"], "unsupported_media_type");
}

#[tokio::test]
async fn missing_content_type_is_accepted() {
    let app = spawn_app().await;
    let res = post_raw(&app, valid_body(), None, GOOD).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn not_json_is_400() {
    let app = spawn_app().await;
    let (status, err) = error_of(post_raw(&app, "{not json", JSON, GOOD).await).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"], "invalid_json");
}

async fn assert_422(body: Value, field: &str) {
    let app = spawn_app().await;
    let (status, err) = error_of(post_raw(&app, body.to_string(), JSON, GOOD).await).await;
    assert_eq!(status, 422, "{body} -> {err}");
    assert_eq!(err["error"], "invalid_notification");
    assert_eq!(err["field"], field, "{err}");
    assert!(
        err["detail"].as_str().is_some_and(|d| d.contains(field)),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_type_is_422() {
    assert_422(
        json!({"type": "order_exploded", "order_id": "bK8bg5tajNkDpDk25"}),
        "type",
    )
    .await;
}

#[tokio::test]
async fn missing_type_is_422() {
    assert_422(
        json!({"order_id": "bK8bg5tajNkDpDk25", "description": "d"}),
        "type",
    )
    .await;
}

#[tokio::test]
async fn missing_order_id_is_422() {
    assert_422(
        json!({"type": "order_request", "description": "d"}),
        "order_id",
    )
    .await;
}

#[tokio::test]
async fn blank_order_id_is_422() {
    assert_422(
        json!({"type": "order_request", "order_id": "   "}),
        "order_id",
    )
    .await;
}

#[tokio::test]
async fn order_id_of_10000_characters_is_422() {
    assert_422(
        json!({"type": "order_request", "order_id": "a".repeat(10_000)}),
        "order_id",
    )
    .await;
}

#[tokio::test]
async fn order_id_as_a_number_is_422() {
    assert_422(
        json!({"type": "order_request", "order_id": 12345}),
        "order_id",
    )
    .await;
}

#[tokio::test]
async fn control_characters_in_ids_are_422() {
    assert_422(
        json!({"type": "message", "order_id": "o", "message_id": "a\nb"}),
        "message_id",
    )
    .await;
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let res = app
        .client
        .post(app.url("/webhook/activity"))
        .basic_auth(USER, Some(PASSWORD))
        .header("x-request-id", "trace-abc-123")
        .json(&sample(ActivityType::Documents, &new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-abc-123");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["request_id"], "trace-abc-123");

    // An insane one is replaced.
    let res = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 26, "a ULID, not the caller's 500 characters");
}

#[tokio::test]
async fn same_message_twice_is_one_activity_with_two_deliveries() {
    let app = spawn_app().await;
    let order = new_id();
    let body = sample(ActivityType::Message, &order);
    let first = app.post_ok(&body).await;
    let second = app.post_ok(&body).await;
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(first["activity_id"], second["activity_id"]);
    let timeline = app.timeline(&order).await;
    assert_eq!(timeline.len(), 1);
    assert_eq!(timeline[0]["deliveries"], 2);
    let jobs = app.get_json("/jobs?state=pending").await;
    let for_order = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["order_id"] == order.as_str())
        .count();
    assert_eq!(for_order, 1, "the redelivery adds no job");
}

#[tokio::test]
async fn message_redelivery_is_recognised_even_with_another_description() {
    let app = spawn_app().await;
    let order = new_id();
    let mut body = sample(ActivityType::Message, &order);
    app.post_ok(&body).await;
    body["description"] = json!("Marty McFly sent you a message (again).");
    assert_eq!(app.post_ok(&body).await["duplicate"], true);
}

#[tokio::test]
async fn same_cancellation_within_the_window_is_one_activity() {
    let app = spawn_app().await;
    let order = new_id();
    let body = sample(ActivityType::OrderCancelled, &order);
    let first = app.post_ok(&body).await;
    let second = app.post_ok(&body).await;
    assert_eq!(second["duplicate"], true);
    assert_eq!(first["activity_id"], second["activity_id"]);
    let timeline = app.timeline(&order).await;
    assert_eq!(timeline.len(), 1);
    assert_eq!(timeline[0]["deliveries"], 2);
}

#[tokio::test]
async fn same_cancellation_outside_the_window_is_two_activities() {
    let app = spawn_with(|s| s.dedup_window = Duration::from_millis(20)).await;
    let order = new_id();
    let body = sample(ActivityType::OrderCancelled, &order);
    app.post_ok(&body).await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    let second = app.post_ok(&body).await;
    assert_eq!(second["duplicate"], false);
    assert_eq!(app.timeline(&order).await.len(), 2);
}

#[tokio::test]
async fn a_zero_window_turns_dedup_off_for_non_messages_only() {
    let app = spawn_with(|s| s.dedup_window = Duration::ZERO).await;
    let order = new_id();
    let body = sample(ActivityType::Documents, &order);
    app.post_ok(&body).await;
    assert_eq!(app.post_ok(&body).await["duplicate"], false);
    let msg = sample(ActivityType::Message, &order);
    app.post_ok(&msg).await;
    assert_eq!(app.post_ok(&msg).await["duplicate"], true);
    assert_eq!(app.timeline(&order).await.len(), 3);
}

#[tokio::test]
async fn a_message_activity_leaves_exactly_one_pending_job() {
    let app = spawn_app().await;
    let order = new_id();
    let body = sample(ActivityType::Message, &order);
    let answer = app.post_ok(&body).await;
    app.post_ok(&sample(ActivityType::Documents, &order)).await;
    let jobs = app.get_json("/jobs?state=pending").await;
    assert_eq!(jobs["count"], 1);
    let job = &jobs["jobs"][0];
    assert_eq!(job["kind"], "fetch_message");
    assert_eq!(job["order_id"], order.as_str());
    assert_eq!(job["message_id"], body["message_id"]);
    assert_eq!(job["activity_id"], answer["activity_id"]);
    assert_eq!(job["attempts"], 0);
}

#[tokio::test]
async fn a_message_without_message_id_is_stored_with_enrichment_skipped() {
    let app = spawn_app().await;
    let order = new_id();
    app.post_ok(&json!({"type": "message", "order_id": order, "description": "x"}))
        .await;
    let timeline = app.timeline(&order).await;
    assert_eq!(timeline[0]["enrichment"], "skipped");
    assert_eq!(app.get_json("/jobs").await["count"], 0);
}

#[tokio::test]
async fn everything_survives_a_restart_on_the_same_file() {
    let app = spawn_app().await;
    let order = new_id();
    let mut ids = Vec::new();
    for t in ActivityType::ALL {
        ids.push(app.post_ok(&sample(t, &order)).await["activity_id"].clone());
    }
    let (settings, dir) = app.stop().await;

    let app = spawn_on(settings, dir).await;
    let timeline = app.timeline(&order).await;
    let stored: Vec<Value> = timeline.iter().map(|a| a["activity_id"].clone()).collect();
    assert_eq!(stored, ids);
    assert_eq!(app.get_json("/jobs").await["count"], 1);
    // Dedup markers survive too.
    let again = app.post_ok(&timeline[4]["payload"]).await;
    assert_eq!(again["duplicate"], true);
}

#[tokio::test]
async fn the_quarantine_keeps_authenticated_invalid_bodies_only() {
    let app = spawn_app().await;
    let refused = r#"{"type":"order_exploded","order_id":"q1"}"#;
    let res = post_raw(&app, refused, JSON, GOOD).await;
    assert_eq!(res.status(), 422);
    let res = post_raw(&app, "{not json", JSON, GOOD).await;
    assert_eq!(res.status(), 400);
    let res = post_raw(&app, r#"{"type":"unauth","order_id":"q2"}"#, JSON, None).await;
    assert_eq!(res.status(), 401);
    let res = post_raw(
        &app,
        r#"{"type":"wrong","order_id":"q3"}"#,
        JSON,
        Some((USER, "x")),
    )
    .await;
    assert_eq!(res.status(), 401);

    let kept = app.store.quarantined(100).await.unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].body, b"{not json");
    assert!(kept[0].reason.starts_with("invalid_json"));
    assert_eq!(kept[1].body, refused.as_bytes());
    assert!(kept[1].reason.contains("type"));
    assert!(kept[1].received_ms > 0);
}

#[tokio::test]
async fn the_quarantine_is_bounded() {
    let app = spawn_with(|s| s.quarantine_max = 3).await;
    for i in 0..5 {
        let res = post_raw(&app, format!("{{bad {i}"), JSON, GOOD).await;
        assert_eq!(res.status(), 400);
    }
    let kept = app.store.quarantined(100).await.unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[0].body, b"{bad 4");
    assert_eq!(kept[2].body, b"{bad 2");
}

#[tokio::test]
async fn two_hundred_concurrent_ingests_are_all_stored() {
    let app = Arc::new(spawn_app().await);
    let order = new_id();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let app = Arc::clone(&app);
        let order = order.clone();
        tasks.spawn(async move {
            let t = ActivityType::ALL[i % 6];
            let mut body = sample(t, &order);
            body["description"] = json!(format!("notification {i}"));
            app.post(&body).await.status().as_u16()
        });
    }
    let statuses = tasks.join_all().await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(app.timeline(&order).await.len(), 200);
}

/// A store that delegates to SQLite but can be told to fail every write, as
/// a full or broken disk would.
struct FailingStore {
    inner: Arc<dyn Store>,
    failing: AtomicBool,
}

#[async_trait]
impl Store for FailingStore {
    async fn record_activity(&self, new: NewActivity) -> Result<Recorded, StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("disk I/O error"));
        }
        self.inner.record_activity(new).await
    }
    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), StoreError> {
        self.inner.quarantine(entry).await
    }
    async fn order_activities(&self, o: &OrderId) -> Result<Vec<ActivityRecord>, StoreError> {
        self.inner.order_activities(o).await
    }
    async fn recent_activities(
        &self,
        q: ActivityQuery,
    ) -> Result<Page<ActivityRecord>, StoreError> {
        self.inner.recent_activities(q).await
    }
    async fn order_messages(&self, o: &OrderId) -> Result<Vec<MessageRecord>, StoreError> {
        self.inner.order_messages(o).await
    }
    async fn list_jobs(
        &self,
        s: JobState,
        l: u32,
        c: Option<String>,
    ) -> Result<Page<JobRecord>, StoreError> {
        self.inner.list_jobs(s, l, c).await
    }
    async fn quarantined(&self, l: u32) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.inner.quarantined(l).await
    }
    async fn claim_jobs(&self, now: i64, lease: Duration, limit: u32) -> Result<Claim, StoreError> {
        self.inner.claim_jobs(now, lease, limit).await
    }
    async fn finish_jobs(&self, t: &str, now: i64, o: Vec<JobOutcome>) -> Result<(), StoreError> {
        self.inner.finish_jobs(t, now, o).await
    }
    async fn retry_job(&self, id: &str, now: i64) -> Result<JobRecord, StoreError> {
        self.inner.retry_job(id, now).await
    }
    async fn retry_dead_jobs(&self, now: i64) -> Result<u64, StoreError> {
        self.inner.retry_dead_jobs(now).await
    }
    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        self.inner.job_counts().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("disk I/O error"));
        }
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[tokio::test]
async fn a_store_that_cannot_commit_gives_503_with_retry_after_never_200() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let settings = test_settings(&dir);
    let inner = store::open(&settings.store, 100).await.unwrap();
    let failing = Arc::new(FailingStore {
        inner,
        failing: AtomicBool::new(true),
    });
    let app = Application::with_store(&settings, failing.clone())
        .await
        .unwrap();
    let app = spawn_built(app, settings, dir);
    let order = new_id();
    let body = sample(ActivityType::OrderRequest, &order);

    let res = app.post(&body).await;
    assert_eq!(res.status(), 503);
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"], "store_unavailable");
    assert!(
        !err.to_string().contains("disk I/O"),
        "no internals in the answer"
    );
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    failing.failing.store(false, Ordering::SeqCst);
    assert_eq!(app.post(&body).await.status(), 200, "recovers by itself");
    assert_eq!(app.timeline(&order).await.len(), 1);
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}
