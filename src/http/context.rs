//! Per-request context: the request id (the caller's when sane, else a new
//! ULID), echoed on the answer, and one log line per request.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the request being served.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What the ingest handler adds to its request's log line.
#[derive(Debug, Clone, Default)]
pub struct IngestLog {
    pub order_id: Option<String>,
    pub activity_type: Option<&'static str>,
    pub message_id: Option<String>,
    pub activity_id: Option<String>,
    pub duplicate: Option<bool>,
    pub error: Option<String>,
}

/// A caller's request id is kept when it is 1 to 128 visible ASCII characters.
fn sane(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(s)
}

pub async fn request_context(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(sane)
        .map(str::to_owned)
        .unwrap_or_else(|| ulid::Ulid::generate().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let mut res = next.run(req).await;

    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let status = res.status().as_u16();
    let response_time_ms = round2(start.elapsed().as_secs_f64() * 1000.0);
    match res.extensions().get::<IngestLog>() {
        Some(l) => tracing::info!(
            request_id = %id,
            method = %method,
            path = %path,
            status,
            response_time_ms,
            order_id = l.order_id.as_deref(),
            activity_type = l.activity_type,
            message_id = l.message_id.as_deref(),
            activity_id = l.activity_id.as_deref(),
            duplicate = l.duplicate,
            error = l.error.as_deref(),
            "ingest"
        ),
        None if path == "/health" || path == "/ready" => tracing::debug!(
            request_id = %id, method = %method, path = %path, status, response_time_ms, "request"
        ),
        None => tracing::info!(
            request_id = %id, method = %method, path = %path, status, response_time_ms, "request"
        ),
    }
    res
}

/// Milliseconds rounded to two decimals, as the original service logged them.
pub fn round2(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}
