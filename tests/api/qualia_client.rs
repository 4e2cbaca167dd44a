//! The real Qualia client against the stand-in: typed answers and the class
//! of every failure.

use std::time::Duration;

use qualia_webhook::activity::OrderId;
use qualia_webhook::config::{QualiaCredentials, Secret};
use qualia_webhook::qualia::{QualiaClient, QualiaError};
use qualia_webhook::standin::{Fault, sample_message};
use serde_json::json;

use crate::helpers::*;

fn client(url: &str, password: &str, timeout: Duration) -> QualiaClient {
    QualiaClient::with_credentials(
        url,
        &QualiaCredentials {
            username: QUALIA_USER.into(),
            password: Secret::new(password),
        },
        timeout,
    )
    .unwrap()
}

#[tokio::test]
async fn typed_answers_for_messages_order_and_orders() {
    let q = spawn_qualia().await;
    q.standin.add_messages([
        sample_message(
            "bK8bg5tajNkDpDk25",
            "LEPAjMB43myH8aGcP",
            "Can you provide an update?",
        ),
        json!({"message_id": "NoExtras", "order_id": "o2", "attachments": null}),
        json!({"broken": true}),
    ]);
    q.standin.add_orders([json!({
        "_id": "bK8bg5tajNkDpDk25", "order_number": "TEST-2018-1", "status": "open",
        "product_name": "Title Search Plus", "properties": [{"city": "San Francisco", "state": "CA"}],
        "primary_document": {"_id": "d1", "name": "deed.pdf", "url": "https://x/d1", "tag": "deed"}
    })]);
    let c = client(&q.url, QUALIA_PASSWORD, Duration::from_secs(5));

    let messages = c.messages().await.unwrap();
    assert_eq!(
        messages.len(),
        2,
        "an entry without message_id is skipped, not fatal"
    );
    assert_eq!(
        messages[0].text.as_deref(),
        Some("Can you provide an update?")
    );
    assert_eq!(messages[0].attachments.len(), 1);
    assert!(messages[1].attachments.is_empty());

    let order = c
        .order(&OrderId::parse("bK8bg5tajNkDpDk25").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(order.order.order_number.as_deref(), Some("TEST-2018-1"));
    assert_eq!(
        order.order.properties[0].city.as_deref(),
        Some("San Francisco")
    );
    assert_eq!(
        order.order.primary_document.unwrap().name.as_deref(),
        Some("deed.pdf")
    );

    c.check_credentials().await.unwrap();
    let calls = q.standin.calls();
    assert_eq!((calls.messages, calls.order, calls.orders), (1, 1, 1));
}

#[tokio::test]
async fn every_failure_has_its_class() {
    let q = spawn_qualia().await;
    let c = client(&q.url, QUALIA_PASSWORD, Duration::from_millis(500));
    type Expect = fn(&QualiaError) -> bool;
    let cases: Vec<(Fault, Expect)> = vec![
        (
            Fault {
                status: Some(500),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Retryable(_)),
        ),
        (
            Fault {
                status: Some(503),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Retryable(_)),
        ),
        (
            Fault {
                status: Some(401),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Auth { status: 401 }),
        ),
        (
            Fault {
                status: Some(403),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Auth { status: 403 }),
        ),
        (
            Fault {
                status: Some(429),
                retry_after: Some(7),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::RateLimited { retry_after: Some(d) } if d.as_secs() == 7),
        ),
        (
            Fault {
                malformed: true,
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Retryable(m) if m.contains("malformed")),
        ),
        (
            Fault {
                graphql_error: Some("boom".into()),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Retryable(_)),
        ),
        (
            Fault {
                delay_ms: Some(2000),
                ..Default::default()
            },
            |e| matches!(e, QualiaError::Retryable(m) if m.contains("timed out")),
        ),
    ];
    for (fault, expected) in cases {
        let shown = format!("{fault:?}");
        q.standin.inject(fault);
        let err = c.messages().await.unwrap_err();
        assert!(expected(&err), "{shown} gave {err:?}");
    }
    // Wrong credentials, for real.
    let wrong = client(&q.url, "wrong", Duration::from_secs(5));
    assert!(matches!(
        wrong.check_credentials().await,
        Err(QualiaError::Auth { status: 401 })
    ));
    // Nobody listening.
    let gone = client(
        "http://127.0.0.1:9/api/vendor/graphql",
        QUALIA_PASSWORD,
        Duration::from_secs(2),
    );
    assert!(
        matches!(gone.messages().await, Err(QualiaError::Retryable(m)) if m.contains("connect"))
    );
}

#[tokio::test]
async fn a_query_refused_by_the_schema_is_permanent_and_an_unknown_order_is_none() {
    let q = spawn_qualia().await;
    let c = client(&q.url, QUALIA_PASSWORD, Duration::from_secs(5));
    q.standin.inject(Fault {
        graphql_error: Some("Cannot query field \"messages\" on type \"Query\".".into()),
        ..Default::default()
    });
    assert!(matches!(c.messages().await, Err(QualiaError::Permanent(_))));
    assert_eq!(
        c.order(&OrderId::parse("nope").unwrap()).await.unwrap(),
        None
    );
    let debug = format!("{c:?}");
    assert!(!debug.contains(QUALIA_PASSWORD), "{debug}");
}
