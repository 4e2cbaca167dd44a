//! The read API and the ops endpoints.

use qualia_webhook::activity::ActivityType;
use qualia_webhook::config::{Credentials, Secret};
use serde_json::{Value, json};

use crate::helpers::*;

async fn status_of(app: &TestApp, path: &str, auth: Option<(&str, &str)>) -> u16 {
    let mut req = app.client.get(app.url(path));
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn every_read_route_needs_credentials() {
    let app = spawn_app().await;
    for path in [
        "/webhook/activity/bK8bg5tajNkDpDk25",
        "/orders/bK8bg5tajNkDpDk25/activities",
        "/activities",
        "/jobs",
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
        assert!(res.headers().contains_key("www-authenticate"));
        assert_eq!(
            status_of(&app, path, Some((USER, "nope"))).await,
            401,
            "{path}"
        );
        assert_eq!(
            status_of(&app, path, Some((USER, PASSWORD))).await,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn separate_read_credentials_do_not_open_the_webhook_and_vice_versa() {
    let app = spawn_with(|s| {
        s.api = Credentials {
            username: "reader".into(),
            passwords: vec![Secret::new("read-only-pass")],
        }
    })
    .await;
    assert_eq!(
        status_of(&app, "/activities", Some(("reader", "read-only-pass"))).await,
        200
    );
    assert_eq!(
        status_of(&app, "/activities", Some((USER, PASSWORD))).await,
        401
    );
    let res = app
        .client
        .post(app.url("/webhook/activity"))
        .basic_auth("reader", Some("read-only-pass"))
        .json(&sample(ActivityType::Documents, &new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn order_messages_keep_the_original_answer_shape() {
    let app = spawn_app().await;
    let order = new_id();
    app.post_ok(&sample(ActivityType::Message, &order)).await;
    let v = app.get_json(&format!("/webhook/activity/{order}")).await;
    // Until enrichment has run, no message details are stored.
    assert_eq!(
        v,
        json!({"order_id": order, "message_type": "message", "count": 0, "messages": []})
    );
    let v = app
        .get_json(&format!(
            "/webhook/activity/{order}?message_type=message%23LEP"
        ))
        .await;
    assert_eq!(v["message_type"], "message#LEP");
}

#[tokio::test]
async fn an_invalid_order_id_in_the_path_is_400() {
    let app = spawn_app().await;
    let long = "a".repeat(300);
    let res = app
        .client
        .get(app.url(&format!("/orders/{long}/activities")))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"], "invalid_order_id");
}

#[tokio::test]
async fn recent_activities_page_newest_first_with_filters() {
    let app = spawn_app().await;
    let order = new_id();
    let mut ids = Vec::new();
    for i in 0..7 {
        let t = if i % 2 == 0 {
            ActivityType::Documents
        } else {
            ActivityType::OrderRequest
        };
        let mut body = sample(t, &order);
        body["description"] = json!(format!("event {i}"));
        ids.push(
            app.post_ok(&body).await["activity_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids.reverse();

    let mut seen = Vec::new();
    let mut path = "/activities?limit=3".to_owned();
    loop {
        let page = app.get_json(&path).await;
        let items = page["activities"].as_array().unwrap();
        assert!(items.len() <= 3);
        assert_eq!(page["count"], items.len());
        seen.extend(
            items
                .iter()
                .map(|a| a["activity_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/activities?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ids, "all seven, newest first, each once");

    let docs = app.get_json("/activities?type=documents&limit=100").await;
    assert_eq!(docs["count"], 4);
    assert!(
        docs["activities"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["activity_type"] == "documents")
    );

    let future = app.get_json("/activities?since=2999-01-01T00:00:00Z").await;
    assert_eq!(future["count"], 0);
    let past = app.get_json("/activities?since=2020-01-01T00:00:00Z").await;
    assert_eq!(past["count"], 7);
    let ms = app.get_json("/activities?since=0").await;
    assert_eq!(ms["count"], 7);
}

#[tokio::test]
async fn bad_listing_parameters_are_400_with_a_code() {
    let app = spawn_app().await;
    for (path, code) in [
        ("/activities?limit=0", "invalid_limit"),
        ("/activities?limit=100000", "invalid_limit"),
        ("/activities?limit=ten", "invalid_limit"),
        ("/activities?type=nope", "invalid_type"),
        ("/activities?since=yesterday", "invalid_since"),
        ("/activities?cursor=garbage", "invalid_cursor"),
        ("/jobs?state=running", "invalid_state"),
        ("/jobs?cursor=zzz", "invalid_cursor"),
    ] {
        let res = app
            .client
            .get(app.url(path))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{path}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"], code, "{path}");
    }
}

#[tokio::test]
async fn health_ready_and_unknown_routes() {
    let app = spawn_app().await;
    let health: Value = app
        .client
        .get(app.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["service"], "qualia-webhook");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let missing = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let err: Value = missing.json().await.unwrap();
    assert_eq!(err["error"], "not_found");
}
