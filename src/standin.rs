//! A local stand-in for Qualia's vendor GraphQL API, for trying the whole
//! flow without a Qualia account, and for the tests and benchmarks.
//!
//! It answers the `messages`, `order` and `orders` queries in Qualia's shape,
//! checks Basic auth, counts calls, and injects faults on demand. Its admin
//! endpoints (no auth; bind it to loopback) live under `/__admin/`:
//!
//! | method | path | body | effect |
//! |---|---|---|---|
//! | POST | `/__admin/messages` | a message or a list of messages | adds them |
//! | POST | `/__admin/orders` | an order or a list of orders | adds them |
//! | POST | `/__admin/faults` | a `Fault` | queues a fault for the next `count` calls |
//! | DELETE | `/__admin/faults` | | clears queued faults |
//! | PUT | `/__admin/credentials` | `{username, password}` | changes the accepted credentials |
//! | PUT | `/__admin/latency` | `{ms}` | delay every answer |
//! | GET | `/__admin/calls` | | call counts by query |
//! | POST | `/__admin/reset` | | counts, faults, data and latency back to the start |

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::{Credentials, Secret};
use crate::http::auth::BasicAuth;

pub const GRAPHQL_PATH: &str = "/api/vendor/graphql";

/// A fault to inject into the next `count` GraphQL calls (default 1).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Fault {
    /// Answer this HTTP status (e.g. 500, 503, 401, 429) with an empty JSON body.
    pub status: Option<u16>,
    /// With a 429: the `Retry-After` header, in seconds.
    pub retry_after: Option<u64>,
    /// Wait this long before answering (longer than the client's timeout: a timeout).
    pub delay_ms: Option<u64>,
    /// Answer 200 with a body that is not JSON.
    #[serde(default)]
    pub malformed: bool,
    /// Answer 200 with `{"data": null, "errors": [{"message": ...}]}`.
    pub graphql_error: Option<String>,
    /// How many calls this fault applies to.
    pub count: Option<u32>,
}

/// Calls received, by query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Calls {
    pub messages: u64,
    pub order: u64,
    pub orders: u64,
    pub other: u64,
    pub unauthorized: u64,
    pub faulted: u64,
}

impl Calls {
    pub fn total(&self) -> u64 {
        self.messages + self.order + self.orders + self.other + self.unauthorized
    }
}

#[derive(Debug, Default)]
struct Data {
    messages: Vec<Value>,
    orders: Vec<Value>,
    faults: VecDeque<(Fault, u32)>,
    calls: Calls,
    latency: Duration,
    auth: Option<BasicAuth>,
    /// When each `messages` call arrived.
    message_call_times: Vec<std::time::Instant>,
}

/// The stand-in's state; cloned handles share it.
#[derive(Clone)]
pub struct StandIn {
    data: Arc<Mutex<Data>>,
    initial: Arc<(Vec<Value>, Vec<Value>, Credentials)>,
}

/// Messages and orders to start with, as in a fixture file:
/// `{"messages": [...], "orders": [...]}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Fixture {
    #[serde(default)]
    pub messages: Vec<Value>,
    #[serde(default)]
    pub orders: Vec<Value>,
}

fn one_or_many(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        other => vec![other],
    }
}

impl StandIn {
    pub fn new(username: &str, password: &str, fixture: Fixture) -> Self {
        let credentials = Credentials {
            username: username.to_owned(),
            passwords: vec![Secret::new(password)],
        };
        let data = Data {
            messages: fixture.messages.clone(),
            orders: fixture.orders.clone(),
            auth: Some(BasicAuth::new(&credentials)),
            ..Default::default()
        };
        StandIn {
            data: Arc::new(Mutex::new(data)),
            initial: Arc::new((fixture.messages, fixture.orders, credentials)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_messages(&self, messages: impl IntoIterator<Item = Value>) {
        self.lock().messages.extend(messages);
    }

    pub fn add_orders(&self, orders: impl IntoIterator<Item = Value>) {
        self.lock().orders.extend(orders);
    }

    pub fn inject(&self, fault: Fault) {
        let count = fault.count.unwrap_or(1);
        self.lock().faults.push_back((fault, count));
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn set_credentials(&self, username: &str, password: &str) {
        self.lock().auth = Some(BasicAuth::new(&Credentials {
            username: username.to_owned(),
            passwords: vec![Secret::new(password)],
        }));
    }

    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    pub fn calls(&self) -> Calls {
        self.lock().calls.clone()
    }

    /// When each `messages` call arrived, in order.
    pub fn message_call_times(&self) -> Vec<std::time::Instant> {
        self.lock().message_call_times.clone()
    }

    pub fn reset(&self) {
        let (messages, orders, credentials) = &*self.initial;
        let mut d = self.lock();
        *d = Data {
            messages: messages.clone(),
            orders: orders.clone(),
            auth: Some(BasicAuth::new(credentials)),
            ..Default::default()
        };
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(GRAPHQL_PATH, post(graphql))
            .route("/__admin/messages", post(admin_messages))
            .route("/__admin/orders", post(admin_orders))
            .route(
                "/__admin/faults",
                post(admin_fault).delete(admin_clear_faults),
            )
            .route("/__admin/credentials", put(admin_credentials))
            .route("/__admin/latency", put(admin_latency))
            .route("/__admin/calls", get(admin_calls))
            .route("/__admin/reset", post(admin_reset))
            .with_state(self.clone())
    }

    /// Serves on `addr` until the returned task is dropped or aborted; gives
    /// the bound address (port 0 picks one).
    pub async fn spawn(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let router = self.router();
        let handle = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "stand-in stopped");
            }
        });
        Ok((local, handle))
    }
}

/// A message in Qualia's shape, for tests and fixtures.
pub fn sample_message(order_id: &str, message_id: &str, text: &str) -> Value {
    json!({
        "order_id": order_id,
        "message_id": message_id,
        "order_number": "TEST-2018-1",
        "from_name": "Marty McFly",
        "read": false,
        "text": text,
        "created_date": "2026-11-11T10:30:00.000Z",
        "attachments": [
            {"_id": format!("att-{message_id}"), "name": "survey.pdf",
             "url": format!("https://files.example.com/{message_id}/survey.pdf"), "tag": "survey"}
        ]
    })
}

#[derive(Deserialize)]
struct GraphQlRequest {
    query: String,
    #[serde(default)]
    variables: Value,
}

enum Query {
    Messages,
    Order,
    Orders,
    Other,
}

fn classify(q: &str) -> Query {
    // The field after the operation's first `{`.
    let body = q.split_once('{').map(|(_, b)| b).unwrap_or("").trim_start();
    let field: String = body
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    match field.as_str() {
        "messages" => Query::Messages,
        "order" => Query::Order,
        "orders" => Query::Orders,
        _ => Query::Other,
    }
}

async fn graphql(
    State(s): State<StandIn>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (latency, authorized) = {
        let d = s.lock();
        (
            d.latency,
            d.auth.as_ref().is_none_or(|a| a.allows(&headers)),
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if !authorized {
        s.lock().calls.unauthorized += 1;
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Unauthorized"})),
        )
            .into_response();
    }
    let Ok(req) = serde_json::from_slice::<GraphQlRequest>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"errors": [{"message": "Must provide query string."}]})),
        )
            .into_response();
    };
    let query = classify(&req.query);
    let fault = {
        let mut d = s.lock();
        match query {
            Query::Messages => {
                d.calls.messages += 1;
                d.message_call_times.push(std::time::Instant::now());
            }
            Query::Order => d.calls.order += 1,
            Query::Orders => d.calls.orders += 1,
            Query::Other => d.calls.other += 1,
        }
        let fault = d.faults.front_mut().map(|(f, left)| {
            *left = left.saturating_sub(1);
            (f.clone(), *left == 0)
        });
        if let Some((_, true)) = fault {
            d.faults.pop_front();
        }
        if fault.is_some() {
            d.calls.faulted += 1;
        }
        fault.map(|(f, _)| f)
    };
    if let Some(f) = fault {
        if let Some(ms) = f.delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(status) = f.status {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut res = (code, Json(json!({"error": code.canonical_reason()}))).into_response();
            if let Some(secs) = f.retry_after {
                res.headers_mut().insert(header::RETRY_AFTER, secs.into());
            }
            return res;
        }
        if f.malformed {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "{\"data\": {\"messa",
            )
                .into_response();
        }
        if let Some(message) = f.graphql_error {
            return Json(json!({"data": null, "errors": [{"message": message}]})).into_response();
        }
    }
    let d = s.lock();
    let answer = match query {
        Query::Messages => json!({"data": {"messages": d.messages}}),
        Query::Orders => {
            let limit = req.query.split("limit:").nth(1).and_then(|r| {
                r.trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse::<usize>()
                    .ok()
            });
            let orders: Vec<Value> = d
                .orders
                .iter()
                .take(limit.unwrap_or(usize::MAX))
                .map(|o| json!({"_id": o["_id"], "order_number": o["order_number"], "status": o["status"]}))
                .collect();
            json!({"data": {"orders": {"orders": orders}}})
        }
        Query::Order => {
            let id = req
                .variables
                .get("input")
                .and_then(Value::as_str)
                .unwrap_or("");
            match d.orders.iter().find(|o| o["_id"] == id) {
                Some(order) => {
                    json!({"data": {"order": {"order": order, "outstanding_tasks": []}}})
                }
                None => {
                    json!({"data": {"order": null}, "errors": [{"message": "Order not found"}]})
                }
            }
        }
        Query::Other => json!({"data": null, "errors": [{
            "message": "Cannot query field on type \"Query\".",
            "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}]}),
    };
    Json(answer).into_response()
}

async fn admin_messages(State(s): State<StandIn>, Json(v): Json<Value>) -> StatusCode {
    s.add_messages(one_or_many(v));
    StatusCode::NO_CONTENT
}

async fn admin_orders(State(s): State<StandIn>, Json(v): Json<Value>) -> StatusCode {
    s.add_orders(one_or_many(v));
    StatusCode::NO_CONTENT
}

async fn admin_fault(State(s): State<StandIn>, Json(f): Json<Fault>) -> StatusCode {
    s.inject(f);
    StatusCode::NO_CONTENT
}

async fn admin_clear_faults(State(s): State<StandIn>) -> StatusCode {
    s.clear_faults();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct NewCredentials {
    username: String,
    password: String,
}

async fn admin_credentials(State(s): State<StandIn>, Json(c): Json<NewCredentials>) -> StatusCode {
    s.set_credentials(&c.username, &c.password);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Latency {
    ms: u64,
}

async fn admin_latency(State(s): State<StandIn>, Json(l): Json<Latency>) -> StatusCode {
    s.set_latency(Duration::from_millis(l.ms));
    StatusCode::NO_CONTENT
}

async fn admin_calls(State(s): State<StandIn>) -> Json<Value> {
    let c = s.calls();
    let total = c.total();
    let mut v = serde_json::to_value(c).unwrap_or_default();
    v["total"] = json!(total);
    Json(v)
}

async fn admin_reset(State(s): State<StandIn>) -> StatusCode {
    s.reset();
    StatusCode::NO_CONTENT
}
