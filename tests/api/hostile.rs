//! Hostile input: property tests on the notification parser and on the
//! real ingest endpoint. Only 200, 400, 413, 415 or 422 may come back, never
//! a panic, never a 5xx, never a secret or a stack trace.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use qualia_webhook::activity::{Notification, ParseError};
use serde_json::{Map, Value, json};

use crate::helpers::*;

/// Any JSON value: nulls, booleans, numbers, unicode strings, nested arrays
/// and objects.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((".{0,12}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Something close to a notification: each field valid, odd or missing.
fn near_notification() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        Just(json!("order_request")),
        Just(json!("message")),
        Just(json!("documents")),
        Just(json!("order_exploded")),
        Just(json!("")),
        ".{0,20}".prop_map(Value::String),
        any_json(),
    ];
    let id = prop_oneof![
        "[A-Za-z0-9]{17}".prop_map(Value::String),
        Just(json!("   ")),
        Just(json!("a\u{0}b")),
        "\\PC{0,200}".prop_map(Value::String),
        "x{129,300}".prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        Just(Value::Null),
        any_json(),
    ];
    (
        prop::option::of(kind),
        prop::option::of(id.clone()),
        prop::option::of(id),
        prop::option::of(prop_oneof![".{0,100}".prop_map(Value::String), any_json()]),
        prop::collection::vec((".{1,10}", any_json()), 0..3),
    )
        .prop_map(|(kind, order, message, description, extra)| {
            let mut m = Map::new();
            for (k, v) in extra {
                m.insert(k, v);
            }
            if let Some(v) = kind {
                m.insert("type".into(), v);
            }
            if let Some(v) = order {
                m.insert("order_id".into(), v);
            }
            if let Some(v) = message {
                m.insert("message_id".into(), v);
            }
            if let Some(v) = description {
                m.insert("description".into(), v);
            }
            Value::Object(m)
        })
}

/// A valid notification with unicode text and unknown extra fields.
fn valid_notification() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec![
            "order_request",
            "order_cancelled",
            "order_completed",
            "order_revision_requested",
            "message",
            "documents",
        ]),
        "[A-Za-z0-9]{17}",
        prop::option::of("[A-Za-z0-9]{17}"),
        "\\PC{0,300}",
        prop::collection::vec(("[a-z_]{1,10}", any_json()), 0..3),
    )
        .prop_map(|(t, order, message, description, extra)| {
            let mut v = json!({"type": t, "order_id": order, "description": description});
            if let Some(m) = message {
                v["message_id"] = json!(m);
            }
            for (k, x) in extra {
                if !matches!(
                    k.as_str(),
                    "type" | "order_id" | "message_id" | "description"
                ) {
                    v[k] = x;
                }
            }
            v
        })
}

/// The status the service answers for a parse outcome.
fn status_of(bytes: &[u8]) -> u16 {
    match Notification::parse(bytes) {
        Ok(_) => 200,
        Err(ParseError::NotJson(_)) => 400,
        Err(ParseError::Invalid { .. }) => 422,
    }
}

#[test]
fn the_parser_takes_ten_thousand_hostile_bodies_without_panicking() {
    let mut runner = TestRunner::new(Config {
        cases: 10_000,
        failure_persistence: None,
        ..Config::default()
    });
    let bodies = prop_oneof![
        valid_notification().prop_map(|v| v.to_string().into_bytes()),
        near_notification().prop_map(|v| v.to_string().into_bytes()),
        any_json().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..200),
        // Duplicated keys, as raw text.
        ("[a-z_]{1,8}", "[a-z_]{1,8}").prop_map(|(a, b)| {
            format!(r#"{{"type":"message","type":"{a}","order_id":"x","order_id":"{b}"}}"#)
                .into_bytes()
        }),
    ];
    let seen = std::cell::RefCell::new([0usize; 3]);
    runner
        .run(&bodies, |body| {
            let status = status_of(&body);
            prop_assert!(matches!(status, 200 | 400 | 422));
            seen.borrow_mut()[match status {
                200 => 0,
                400 => 1,
                _ => 2,
            }] += 1;
            Ok(())
        })
        .unwrap();
    let seen = seen.into_inner();
    assert!(
        seen.iter().all(|n| *n > 100),
        "every outcome was exercised: {seen:?}"
    );
}

#[test]
fn deep_nesting_and_huge_strings_are_refused_cleanly() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(status_of(deep.as_bytes()), 400);
    let deep_obj = format!(
        r#"{{"type":"message","order_id":"a","extra":{}1{}}}"#,
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    assert_eq!(status_of(deep_obj.as_bytes()), 400);
    let huge = json!({"type": "documents", "order_id": "x".repeat(1 << 20)}).to_string();
    assert_eq!(status_of(huge.as_bytes()), 422);
    let huge_description =
        json!({"type": "documents", "order_id": "a", "description": "d".repeat(1 << 20)});
    assert_eq!(status_of(huge_description.to_string().as_bytes()), 422);
    let unicode = json!({"type": "documents", "order_id": "ордер-🚀-\u{200b}", "description": "\u{feff}é\u{301}"});
    assert_eq!(status_of(unicode.to_string().as_bytes()), 200);
    assert_eq!(
        status_of(b"\xef\xbb\xbf{\"type\":\"documents\",\"order_id\":\"a\"}"),
        400,
        "a BOM is not JSON"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_only_expected_statuses_to_hostile_bodies() {
    let app = Arc::new(spawn_app().await);
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let bodies = prop_oneof![
        near_notification().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..100),
    ];
    let mut samples: Vec<Vec<u8>> = (0..400)
        .map(|_| {
            bodies
                .new_tree(&mut runner)
                .map(|t| t.current())
                .unwrap_or_default()
        })
        .collect();
    samples.push(vec![b'x'; 70_000]);
    for body in samples {
        let expected = if body.len() > 65_536 {
            413
        } else {
            status_of(&body)
        };
        let res = app
            .client
            .post(app.url("/webhook/activity"))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        assert_eq!(status, expected, "{}", String::from_utf8_lossy(&body));
        assert!(
            !text.contains(PASSWORD) && !text.contains("panicked") && !text.contains("src/"),
            "{text}"
        );
    }
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "the service is still fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_slow_clients_are_cut_off_without_holding_up_others() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = Arc::new(
        spawn_with(|s| {
            s.header_timeout = Duration::from_millis(400);
            s.body_timeout = Duration::from_millis(600);
        })
        .await,
    );
    // Twenty clients that never finish their headers...
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut c = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        c.write_all(b"POST /webhook/activity HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .await
            .unwrap();
        stalled.push(c);
    }
    // ...and one that sends its body a byte at a time.
    let auth = base64_basic(USER, PASSWORD);
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(
        format!(
            "POST /webhook/activity HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let dripping = tokio::spawn(async move {
        let mut answer = Vec::new();
        for _ in 0..20 {
            if slow.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    });

    // Good traffic is served meanwhile, promptly.
    let started = Instant::now();
    for _ in 0..20 {
        app.post_ok(&sample(
            qualia_webhook::activity::ActivityType::Documents,
            &new_id(),
        ))
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "good traffic took {:?}",
        started.elapsed()
    );

    // The stalled clients are disconnected after the header timeout.
    for mut c in stalled {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "a stalled connection was left open"
        );
    }
    let answer = dripping.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "slow body: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_auth_requests_do_not_hold_up_good_traffic() {
    use std::time::{Duration, Instant};

    let app = Arc::new(spawn_app().await);
    let mut attackers = tokio::task::JoinSet::new();
    for t in 0..8 {
        let app = Arc::clone(&app);
        attackers.spawn(async move {
            let mut unauthorized = 0;
            for i in 0..125 {
                let res = app
                    .client
                    .post(app.url("/webhook/activity"))
                    .basic_auth(USER, Some(format!("guess-{t}-{i}")))
                    .json(&json!({"type": "documents", "order_id": "x"}))
                    .send()
                    .await
                    .unwrap();
                if res.status() == 401 {
                    unauthorized += 1;
                }
            }
            unauthorized
        });
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        app.post_ok(&sample(
            qualia_webhook::activity::ActivityType::OrderRequest,
            &new_id(),
        ))
        .await;
        slowest = slowest.max(t.elapsed());
    }
    let refused: i32 = attackers.join_all().await.iter().sum();
    assert_eq!(refused, 1000, "every guess refused");
    eprintln!("slowest good ack during 1,000 bad-auth requests: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "slowest good ack {slowest:?}"
    );
    assert!(
        app.store.quarantined(10).await.unwrap().is_empty(),
        "nothing unauthenticated was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_client_waits_its_turn_and_is_then_served() {
    use std::time::Duration;

    let app = spawn_with(|s| s.max_connections = 2).await;
    let body = sample(
        qualia_webhook::activity::ActivityType::OrderRequest,
        &new_id(),
    );
    // Two connections take both slots (and send nothing yet).
    let holders = [
        tokio::net::TcpStream::connect(app.addr).await.unwrap(),
        tokio::net::TcpStream::connect(app.addr).await.unwrap(),
    ];
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(app.url("/webhook/activity"))
            .basic_auth(USER, Some(PASSWORD))
            .json(&body)
            .send()
    };
    // A third waits in the listen queue: no answer, no refusal.
    let waited = tokio::time::timeout(Duration::from_millis(700), send()).await;
    assert!(waited.is_err(), "answered past the limit: {waited:?}");
    // Once a slot is free, it is served.
    drop(holders);
    let res = tokio::time::timeout(Duration::from_secs(5), send())
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert_eq!(res.status(), 200);
    let stored = app
        .get_json(&format!(
            "/orders/{}/activities",
            body["order_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(stored["count"], 1, "{stored}");
}
