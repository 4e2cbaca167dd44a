//! The store contract: every behaviour of the `Store` trait, run against each
//! backend through the same functions.

use std::sync::Arc;
use std::time::Duration;

use qualia_webhook::activity::{ActivityType, Notification, OrderId};
use qualia_webhook::config::StoreLocation;
use qualia_webhook::store::{
    self, ActivityQuery, Enrichment, JobOutcome, JobRecord, JobState, MessageRecord, NewActivity,
    QuarantineEntry, Store, StoreError,
};
use serde_json::json;

use crate::helpers::new_id;

/// A store of one backend, and what keeps it alive.
pub struct Handle {
    pub store: Arc<dyn Store>,
    /// Opens another handle on the same data, as a second process would.
    pub location: StoreLocation,
    _dir: tempfile::TempDir,
}

pub async fn open_sqlite() -> Option<Handle> {
    let dir = tempfile::tempdir().unwrap();
    let location = crate::helpers::db_location(&dir);
    let store = store::open(&location, 5).await.unwrap();
    Some(Handle {
        store,
        location,
        _dir: dir,
    })
}

/// A fresh table on the DynamoDB-compatible server that `scripts/test`
/// starts; `None` (the test is skipped, and says so) when none was started.
pub async fn open_dynamodb() -> Option<Handle> {
    let table = crate::helpers::dynamodb_table().await?;
    let location = StoreLocation::DynamoDb { table };
    let store = store::open(&location, 5).await.unwrap();
    Some(Handle {
        store,
        location,
        _dir: tempfile::tempdir().unwrap(),
    })
}

fn notification(
    t: ActivityType,
    order: &str,
    description: &str,
    message_id: Option<&str>,
) -> Notification {
    let mut v = json!({"type": t.as_str(), "order_id": order, "description": description});
    if let Some(m) = message_id {
        v["message_id"] = json!(m);
    }
    Notification::parse(v.to_string().as_bytes()).unwrap()
}

fn new_activity(n: Notification, received_ms: i64, window: Duration) -> NewActivity {
    NewActivity {
        activity_id: ulid::Ulid::generate().to_string(),
        notification: n,
        received_ms,
        request_id: "req".into(),
        dedup_window: window,
    }
}

const WINDOW: Duration = Duration::from_secs(600);

pub async fn records_and_reads_back_in_arrival_order(s: Arc<dyn Store>) {
    let order = new_id();
    let now = store::now_ms();
    let mut ids = Vec::new();
    for (i, t) in ActivityType::ALL.into_iter().enumerate() {
        let msg = (t == ActivityType::Message).then(new_id);
        let n = notification(t, &order, &format!("d{i}"), msg.as_deref());
        let r = s
            .record_activity(new_activity(n, now + i as i64, WINDOW))
            .await
            .unwrap();
        assert!(!r.duplicate);
        assert_eq!(r.deliveries, 1);
        ids.push(r.activity_id);
    }
    let got = s
        .order_activities(&OrderId::parse(order.clone()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        got.iter()
            .map(|a| a.activity_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(got[4].activity_type, ActivityType::Message);
    assert_eq!(got[4].enrichment, Enrichment::Pending);
    assert_eq!(got[0].enrichment, Enrichment::NotApplicable);
    assert_eq!(got[0].description, "d0");
    assert_eq!(got[0].received_ms, now);
    let other = s
        .order_activities(&OrderId::parse(new_id()).unwrap())
        .await
        .unwrap();
    assert!(other.is_empty());
}

pub async fn message_dedup_lasts_forever(s: Arc<dyn Store>) {
    let order = new_id();
    let msg = new_id();
    let n = notification(ActivityType::Message, &order, "a", Some(&msg));
    let first = s
        .record_activity(new_activity(n.clone(), 1_000, WINDOW))
        .await
        .unwrap();
    // Years later, with a zero window, still the same message.
    let later = 1_000 + 86_400_000 * 1000;
    let second = s
        .record_activity(new_activity(n, later, Duration::ZERO))
        .await
        .unwrap();
    assert!(second.duplicate);
    assert_eq!(second.activity_id, first.activity_id);
    assert_eq!(second.deliveries, 2);
    let got = s
        .order_activities(&OrderId::parse(order).unwrap())
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].deliveries, 2);
    assert_eq!(got[0].last_delivery_ms, later);
}

pub async fn other_dedup_holds_inside_the_window_only(s: Arc<dyn Store>) {
    let order = new_id();
    let n = notification(ActivityType::OrderCancelled, &order, "cancelled", None);
    let t0 = store::now_ms();
    let a = s
        .record_activity(new_activity(n.clone(), t0, WINDOW))
        .await
        .unwrap();
    let b = s
        .record_activity(new_activity(n.clone(), t0 + 599_999, WINDOW))
        .await
        .unwrap();
    assert!(b.duplicate);
    assert_eq!(b.activity_id, a.activity_id);
    let c = s
        .record_activity(new_activity(n.clone(), t0 + 600_000, WINDOW))
        .await
        .unwrap();
    assert!(!c.duplicate, "the window is over");
    // The new activity opens a new window.
    let d = s
        .record_activity(new_activity(n, t0 + 600_001, WINDOW))
        .await
        .unwrap();
    assert!(d.duplicate);
    assert_eq!(d.activity_id, c.activity_id);
    // Another description is another notification.
    let e = notification(ActivityType::OrderCancelled, &order, "other", None);
    assert!(
        !s.record_activity(new_activity(e, t0, WINDOW))
            .await
            .unwrap()
            .duplicate
    );
    assert_eq!(
        s.order_activities(&OrderId::parse(order).unwrap())
            .await
            .unwrap()
            .len(),
        3
    );
}

pub async fn a_zero_window_stores_every_delivery(s: Arc<dyn Store>) {
    let order = new_id();
    let n = notification(ActivityType::Documents, &order, "docs", None);
    for _ in 0..3 {
        let r = s
            .record_activity(new_activity(n.clone(), 5, Duration::ZERO))
            .await
            .unwrap();
        assert!(!r.duplicate);
    }
    assert_eq!(
        s.order_activities(&OrderId::parse(order).unwrap())
            .await
            .unwrap()
            .len(),
        3
    );
}

pub async fn jobs_are_created_with_message_activities_only(s: Arc<dyn Store>) {
    let order = new_id();
    let msg = new_id();
    let before = s
        .list_jobs(JobState::Pending, 500, None)
        .await
        .unwrap()
        .items
        .len();
    let n = notification(ActivityType::Message, &order, "m", Some(&msg));
    let r = s
        .record_activity(new_activity(n.clone(), 10, WINDOW))
        .await
        .unwrap();
    s.record_activity(new_activity(n, 11, WINDOW))
        .await
        .unwrap(); // redelivery
    let skipped = notification(ActivityType::Message, &order, "no id", None);
    s.record_activity(new_activity(skipped, 12, WINDOW))
        .await
        .unwrap();
    let docs = notification(ActivityType::Documents, &order, "docs", None);
    s.record_activity(new_activity(docs, 13, WINDOW))
        .await
        .unwrap();

    let jobs = s
        .list_jobs(JobState::Pending, 500, None)
        .await
        .unwrap()
        .items;
    assert_eq!(jobs.len(), before + 1);
    let job = jobs.iter().find(|j| j.order_id.as_ref() == order).unwrap();
    assert_eq!(job.kind, "fetch_message");
    assert_eq!(job.message_id.as_ref().map(|m| m.to_string()), Some(msg));
    assert_eq!(job.activity_id, r.activity_id);
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.attempts, 0);
    assert!(job.lease_until_ms.is_none());
    assert!(
        s.list_jobs(JobState::Dead, 10, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

pub async fn job_listing_pages(s: Arc<dyn Store>) {
    let order = new_id();
    for i in 0..5 {
        let n = notification(
            ActivityType::Message,
            &order,
            "m",
            Some(&format!("{}{i}", new_id())),
        );
        s.record_activity(new_activity(n, i, WINDOW)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s.list_jobs(JobState::Pending, 2, cursor).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|j| j.job_id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);
}

pub async fn recent_activities_page_and_filter(s: Arc<dyn Store>) {
    let order = new_id();
    let base = 1_700_000_000_000;
    for i in 0..9 {
        let t = if i < 3 {
            ActivityType::OrderRequest
        } else {
            ActivityType::Documents
        };
        let n = notification(t, &order, &format!("e{i}"), None);
        s.record_activity(new_activity(n, base + i, WINDOW))
            .await
            .unwrap();
    }
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .recent_activities(ActivityQuery {
                limit: 4,
                cursor,
                since_ms: Some(base),
                ..Default::default()
            })
            .await
            .unwrap();
        all.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let descriptions: Vec<_> = all.iter().map(|a| a.description.clone()).collect();
    assert_eq!(
        descriptions,
        (0..9).rev().map(|i| format!("e{i}")).collect::<Vec<_>>()
    );

    let requests = s
        .recent_activities(ActivityQuery {
            activity_type: Some(ActivityType::OrderRequest),
            since_ms: Some(base),
            limit: 100,
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(requests.items.len(), 3);
    assert!(requests.next_cursor.is_none());
    let since = s
        .recent_activities(ActivityQuery {
            since_ms: Some(base + 7),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(since.items.len(), 2);
    let bad = s
        .recent_activities(ActivityQuery {
            limit: 1,
            cursor: Some("bogus".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(bad, Err(StoreError::InvalidCursor)));
}

pub async fn quarantine_is_bounded_newest_first(s: Arc<dyn Store>) {
    // The contract stores are opened with a bound of 5.
    for i in 0..8u8 {
        s.quarantine(QuarantineEntry {
            received_ms: i as i64,
            request_id: format!("r{i}"),
            reason: "invalid_json".into(),
            body: vec![i],
        })
        .await
        .unwrap();
    }
    let kept = s.quarantined(100).await.unwrap();
    assert_eq!(kept.len(), 5);
    assert_eq!(kept[0].body, vec![7]);
    assert_eq!(kept[4].body, vec![3]);
    assert_eq!(kept[0].request_id, "r7");
}

pub async fn concurrent_records_are_all_kept_once(s: Arc<dyn Store>) {
    let order = new_id();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let s = Arc::clone(&s);
        let order = order.clone();
        tasks.spawn(async move {
            // Every notification is sent twice, concurrently.
            let n = notification(
                ActivityType::Documents,
                &order,
                &format!("c{}", i / 2),
                None,
            );
            s.record_activity(new_activity(n, store::now_ms(), WINDOW))
                .await
                .unwrap()
        });
    }
    let results = tasks.join_all().await;
    assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 150);
    assert_eq!(results.iter().filter(|r| r.duplicate).count(), 150);
    let stored = s
        .order_activities(&OrderId::parse(order).unwrap())
        .await
        .unwrap();
    assert_eq!(stored.len(), 150);
    assert!(stored.iter().all(|a| a.deliveries == 2));
}

/// Records `n` message activities; returns their order ids.
async fn messages(s: &Arc<dyn Store>, n: usize, received_ms: i64) -> Vec<String> {
    let mut orders = Vec::new();
    for _ in 0..n {
        let order = new_id();
        let n = notification(ActivityType::Message, &order, "m", Some(&new_id()));
        s.record_activity(new_activity(n, received_ms, WINDOW))
            .await
            .unwrap();
        orders.push(order);
    }
    orders
}

fn message_for(job: &JobRecord, text: &str) -> MessageRecord {
    MessageRecord {
        order_id: job.order_id.clone(),
        message_id: job.message_id.clone().unwrap(),
        order_number: Some("TEST-1".into()),
        from_name: Some("Marty McFly".into()),
        text: Some(text.into()),
        created_date: Some("2026-11-11T10:30:00Z".into()),
        read: Some(false),
        attachments: vec![store::Attachment {
            id: "a1".into(),
            name: Some("f.pdf".into()),
            url: Some("https://x/f.pdf".into()),
            tag: None,
        }],
        stored_ms: 42,
    }
}

const LEASE: Duration = Duration::from_secs(60);

pub async fn claims_respect_due_time_and_leases(s: Arc<dyn Store>) {
    let now = store::now_ms();
    messages(&s, 3, now).await;
    // Not yet due.
    assert!(
        s.claim_jobs(now - 1, LEASE, 10)
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    let first = s.claim_jobs(now, LEASE, 2).await.unwrap();
    assert_eq!(first.jobs.len(), 2, "the limit holds");
    assert!(
        first
            .jobs
            .iter()
            .all(|j| j.lease_until_ms == Some(now + 60_000))
    );
    let second = s.claim_jobs(now, LEASE, 10).await.unwrap();
    assert_eq!(second.jobs.len(), 1, "leased jobs are not claimed again");
    assert!(
        s.claim_jobs(now + 59_999, LEASE, 10)
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    // After the lease, everything is claimable again.
    let after = s.claim_jobs(now + 60_000, LEASE, 10).await.unwrap();
    assert_eq!(after.jobs.len(), 3);
    assert_ne!(after.token, first.token);
}

pub async fn done_jobs_store_the_message_once_and_enrich(s: Arc<dyn Store>) {
    let now = store::now_ms();
    let orders = messages(&s, 2, now).await;
    let claim = s.claim_jobs(now, LEASE, 10).await.unwrap();
    let outcomes: Vec<_> = claim
        .jobs
        .iter()
        .map(|j| JobOutcome::Done {
            job: j.clone(),
            message: message_for(j, "hello"),
        })
        .collect();
    s.finish_jobs(&claim.token, now, outcomes.clone())
        .await
        .unwrap();
    // Finishing again (a redelivered completion, another worker) changes nothing.
    s.finish_jobs("someone-else", now, outcomes).await.unwrap();
    for order in &orders {
        let id = OrderId::parse(order.clone()).unwrap();
        let msgs = s.order_messages(&id).await.unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].text.as_deref(), Some("hello"));
        assert_eq!(msgs[0].attachments.len(), 1);
        assert_eq!(
            s.order_activities(&id).await.unwrap()[0].enrichment,
            Enrichment::Enriched
        );
    }
    assert_eq!(
        s.list_jobs(JobState::Done, 10, None)
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    assert!(
        s.claim_jobs(now + 3_600_000, LEASE, 10)
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
}

pub async fn retries_count_attempts_and_reschedule(s: Arc<dyn Store>) {
    let now = store::now_ms();
    messages(&s, 1, now).await;
    let claim = s.claim_jobs(now, LEASE, 10).await.unwrap();
    let job = claim.jobs[0].clone();
    s.finish_jobs(
        &claim.token,
        now,
        vec![JobOutcome::Retry {
            job: job.clone(),
            next_attempt_ms: now + 5_000,
            error: "retryable: HTTP 500".into(),
            count_attempt: true,
        }],
    )
    .await
    .unwrap();
    assert!(
        s.claim_jobs(now + 4_999, LEASE, 10)
            .await
            .unwrap()
            .jobs
            .is_empty(),
        "not due yet"
    );
    let again = s.claim_jobs(now + 5_000, LEASE, 10).await.unwrap();
    assert_eq!(again.jobs.len(), 1);
    assert_eq!(again.jobs[0].attempts, 1);
    assert_eq!(
        again.jobs[0].last_error.as_deref(),
        Some("retryable: HTTP 500")
    );
    // A release that does not count (the worker was paused).
    s.finish_jobs(
        &again.token,
        now,
        vec![JobOutcome::Retry {
            job: again.jobs[0].clone(),
            next_attempt_ms: now + 5_000,
            error: "auth".into(),
            count_attempt: false,
        }],
    )
    .await
    .unwrap();
    let third = s.claim_jobs(now + 5_000, LEASE, 10).await.unwrap();
    assert_eq!(third.jobs[0].attempts, 1);
    // A stale token (the lease was lost) changes nothing.
    s.finish_jobs(
        &claim.token,
        now,
        vec![JobOutcome::Dead {
            job,
            error: "stale".into(),
        }],
    )
    .await
    .unwrap();
    assert!(
        s.list_jobs(JobState::Dead, 10, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

pub async fn dead_jobs_fail_the_activity_and_can_be_retried(s: Arc<dyn Store>) {
    let now = store::now_ms();
    let orders = messages(&s, 2, now).await;
    let claim = s.claim_jobs(now, LEASE, 10).await.unwrap();
    let outcomes = claim
        .jobs
        .iter()
        .map(|j| JobOutcome::Dead {
            job: j.clone(),
            error: "not_found: gone".into(),
        })
        .collect();
    s.finish_jobs(&claim.token, now, outcomes).await.unwrap();
    let dead = s.list_jobs(JobState::Dead, 10, None).await.unwrap().items;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].last_error.as_deref(), Some("not_found: gone"));
    assert_eq!(dead[0].attempts, 1);
    let id = OrderId::parse(orders[0].clone()).unwrap();
    assert_eq!(
        s.order_activities(&id).await.unwrap()[0].enrichment,
        Enrichment::Failed
    );

    let retried = s.retry_job(&dead[0].job_id, now + 10).await.unwrap();
    assert_eq!(retried.state, JobState::Pending);
    assert_eq!(retried.attempts, 0);
    assert_eq!(retried.next_attempt_ms, now + 10);
    let dead_order = s.order_activities(&dead[0].order_id).await.unwrap();
    assert_eq!(dead_order[0].enrichment, Enrichment::Pending);
    assert!(matches!(
        s.retry_job(&dead[0].job_id, now).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.retry_job(&ulid::Ulid::generate().to_string(), now).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.retry_dead_jobs(now + 10).await.unwrap(), 1);
    assert_eq!(
        s.claim_jobs(now + 10, LEASE, 10).await.unwrap().jobs.len(),
        2
    );
}

pub async fn concurrent_claims_by_two_handles_never_share_a_job(
    s: Arc<dyn Store>,
    other: Arc<dyn Store>,
) {
    let now = store::now_ms();
    messages(&s, 60, now).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let st = if i % 2 == 0 {
            Arc::clone(&s)
        } else {
            Arc::clone(&other)
        };
        tasks.spawn(async move { st.claim_jobs(now, LEASE, 7).await.unwrap().jobs });
    }
    let mut ids: Vec<String> = tasks
        .join_all()
        .await
        .into_iter()
        .flatten()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(ids.len(), 60, "every job claimed");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 60, "no job claimed twice");
}

pub async fn ping_answers(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
}

/// One module of tests per backend, each running every case of the list.
macro_rules! contract {
    (@backend $backend:ident, $open:ident, ($($case:ident),*)) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(h) = super::$open().await else { return };
                    super::$case(h.store.clone()).await;
                    h.store.close().await;
                }
            )*

            #[tokio::test]
            async fn concurrent_claims_by_two_handles_never_share_a_job() {
                let Some(h) = super::$open().await else { return };
                let other = qualia_webhook::store::open(&h.location, 5).await.unwrap();
                super::concurrent_claims_by_two_handles_never_share_a_job(h.store.clone(), other.clone()).await;
                other.close().await;
                h.store.close().await;
            }
        }
    };
    ([$($backend:ident => $open:ident),+ $(,)?] $cases:tt) => {
        $( contract!(@backend $backend, $open, $cases); )+
    };
}

contract!(
    [sqlite => open_sqlite, dynamodb => open_dynamodb]
    (
        records_and_reads_back_in_arrival_order,
        message_dedup_lasts_forever,
        other_dedup_holds_inside_the_window_only,
        a_zero_window_stores_every_delivery,
        jobs_are_created_with_message_activities_only,
        job_listing_pages,
        recent_activities_page_and_filter,
        quarantine_is_bounded_newest_first,
        concurrent_records_are_all_kept_once,
        claims_respect_due_time_and_leases,
        done_jobs_store_the_message_once_and_enrich,
        retries_count_attempts_and_reschedule,
        dead_jobs_fail_the_activity_and_can_be_retried,
        ping_answers
    )
);
