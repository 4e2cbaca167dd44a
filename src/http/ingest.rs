//! `POST /webhook/activity`: authenticate, check, parse, record durably, then
//! answer. The order of checks is fixed: credentials first (an unauthenticated
//! body is never read or kept), then content type, size, JSON, fields.

use std::time::{Duration, Instant};

use axum::Extension;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::context::{IngestLog, RequestId, round2};
use super::error::{ApiError, ErrorBody};
use crate::activity::{ActivityType, Notification, OrderId, ParseError};
use crate::metrics::{ReasonLabel, TypeLabel};
use crate::store::{NewActivity, QuarantineEntry, now_ms};

/// The answer to a stored (or recognised) notification.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestAnswer {
    /// Always `success`.
    pub status: &'static str,
    /// The stored activity (the original's, for a redelivery).
    pub activity_id: String,
    #[schema(value_type = String)]
    pub order_id: OrderId,
    pub activity_type: ActivityType,
    pub request_id: String,
    pub duplicate: bool,
    pub response_time_ms: f64,
}

/// A Qualia activity notification, as Qualia sends it. Other fields are
/// accepted and kept in the stored payload.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct NotificationBody {
    /// One of the six activity types.
    #[serde(rename = "type")]
    pub activity_type: ActivityType,
    /// Qualia order id (1 to 128 characters, no control characters).
    pub order_id: String,
    /// Human-readable sentence, at most 4096 characters.
    pub description: Option<String>,
    /// The message's id, on `message` notifications.
    pub message_id: Option<String>,
}

/// `POST /webhook/activity`.
#[utoipa::path(post, path = "/webhook/activity", tag = "webhook",
    summary = "Receive one Qualia activity notification",
    description = "Answered 200 only after the notification (and, for a message, its enrichment job) is durably stored.",
    request_body(content = NotificationBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored, or a recognised redelivery (`duplicate: true`)", body = IngestAnswer),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials; carries `WWW-Authenticate: Basic realm=\"qualia-webhook\"`", body = ErrorBody),
        (status = 408, description = "The body did not arrive within BODY_TIMEOUT (default 30 s)", body = ErrorBody),
        (status = 413, description = "The body is larger than MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "An explicit Content-Type that is not JSON", body = ErrorBody),
        (status = 422, description = "JSON, but not a valid notification; `field` names the field", body = ErrorBody),
        (status = 503, description = "The store cannot commit; carries `Retry-After`", body = ErrorBody),
    ),
    security(("webhook_basic" = [])))]
pub async fn ingest(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let response = ingest_checked(&state, request_id, headers, body, start).await;
    if response.status() != axum::http::StatusCode::UNAUTHORIZED {
        state
            .metrics
            .ingest_duration
            .observe(start.elapsed().as_secs_f64());
    }
    response
}

async fn ingest_checked(
    state: &AppState,
    request_id: String,
    headers: HeaderMap,
    body: Body,
    start: Instant,
) -> Response {
    if !state.webhook_auth.allows(&headers) {
        return with_log(
            ApiError::Unauthorized.into_response(),
            IngestLog {
                error: Some("unauthorized".into()),
                ..Default::default()
            },
        );
    }
    let received_ms = now_ms();

    let body = match read_body(&headers, body, state.max_body_bytes, state.body_timeout).await {
        Ok(b) => b,
        Err((err, partial)) => {
            return refuse(state, err, received_ms, &request_id, partial).await;
        }
    };
    let notification = match Notification::parse(&body) {
        Ok(n) => n,
        Err(e) => {
            let err = match e {
                ParseError::NotJson(d) => ApiError::BadJson(format!("body is not JSON: {d}")),
                ParseError::Invalid { field, detail } => ApiError::Invalid { field, detail },
            };
            return refuse(state, err, received_ms, &request_id, body).await;
        }
    };

    let mut log = IngestLog {
        order_id: Some(notification.order_id.to_string()),
        activity_type: Some(notification.activity_type.as_str()),
        message_id: notification.message_id.as_ref().map(ToString::to_string),
        ..Default::default()
    };
    let order_id = notification.order_id.clone();
    let activity_type = notification.activity_type;
    let wakes_worker = notification.needs_enrichment();
    let new = NewActivity {
        activity_id: crate::store::new_activity_id(received_ms),
        notification,
        received_ms,
        request_id: request_id.clone(),
        dedup_window: state.dedup_window,
    };
    match state.store.record_activity(new).await {
        Ok(recorded) => {
            if wakes_worker && !recorded.duplicate {
                state.wake.notify_one();
            }
            let label = TypeLabel {
                r#type: activity_type.as_str(),
            };
            if recorded.duplicate {
                state.metrics.duplicates.get_or_create(&label).inc();
            } else {
                state.metrics.activities_stored.get_or_create(&label).inc();
            }
            log.activity_id = Some(recorded.activity_id.clone());
            log.duplicate = Some(recorded.duplicate);
            let answer = IngestAnswer {
                status: "success",
                activity_id: recorded.activity_id,
                order_id,
                activity_type,
                request_id,
                duplicate: recorded.duplicate,
                response_time_ms: round2(start.elapsed().as_secs_f64() * 1000.0),
            };
            with_log(Json(answer).into_response(), log)
        }
        Err(e) => {
            state.metrics.store_error("record_activity");
            let err = ApiError::from(e);
            log.error = Some(err.code().to_owned());
            with_log(err.into_response(), log)
        }
    }
}

fn with_log(mut res: Response, log: IngestLog) -> Response {
    res.extensions_mut().insert(log);
    res
}

/// Reads the body within the size and time limits. On failure, also returns
/// what was read, for the quarantine.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, (ApiError, Bytes)> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("(not text)");
        if !is_json_content_type(ct) {
            let body = tokio::time::timeout(timeout, read_limited(body, limit))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err((ApiError::UnsupportedMediaType(ct.to_owned()), body));
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((ApiError::PayloadTooLarge { limit }, Bytes::new()));
    }
    match tokio::time::timeout(timeout, read_limited(body, limit)).await {
        Err(_) => Err((ApiError::Timeout, Bytes::new())),
        Ok(Err(TooLarge)) => Err((ApiError::PayloadTooLarge { limit }, Bytes::new())),
        Ok(Ok(b)) => Ok(b),
    }
}

struct TooLarge;

async fn read_limited(body: Body, limit: usize) -> Result<Bytes, TooLarge> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| TooLarge)
}

/// `application/json`, `application/json; charset=utf-8`, `application/*+json`.
fn is_json_content_type(ct: &str) -> bool {
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Answers a refused body after keeping it in the quarantine.
async fn refuse(
    state: &AppState,
    err: ApiError,
    received_ms: i64,
    request_id: &str,
    body: Bytes,
) -> Response {
    let entry = QuarantineEntry {
        received_ms,
        request_id: request_id.to_owned(),
        reason: format!("{}: {err}", err.code()),
        body: body.to_vec(),
    };
    state
        .metrics
        .quarantined
        .get_or_create(&ReasonLabel {
            reason: err.code().to_owned(),
        })
        .inc();
    if let Err(e) = state.store.quarantine(entry).await {
        state.metrics.store_error("quarantine");
        tracing::error!(request_id, error = %super::error::chain(&e), "could not quarantine a refused body");
    }
    let log = IngestLog {
        error: Some(err.to_string()),
        ..Default::default()
    };
    with_log(err.into_response(), log)
}

#[cfg(test)]
mod tests {
    use super::is_json_content_type;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.qualia+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/x-www-form-urlencoded"));
    }
}
