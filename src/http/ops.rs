//! Liveness, readiness, metrics and the API description.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody, chain};
use crate::metrics::StateLabel;

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthAnswer {
    /// Always `healthy`.
    pub status: &'static str,
    /// Always `qualia-webhook`.
    pub service: &'static str,
    pub version: &'static str,
}

/// `GET /health`: the process answers.
#[utoipa::path(get, path = "/health", tag = "ops", summary = "Liveness",
    responses((status = 200, description = "The process answers", body = HealthAnswer)))]
pub async fn health() -> Json<HealthAnswer> {
    Json(HealthAnswer {
        status: "healthy",
        service: "qualia-webhook",
        version: env!("CARGO_PKG_VERSION"),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyAnswer {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    /// Why the store is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The enrichment worker of this process: `running`, `paused` (Qualia
    /// refused the credentials) or `off`.
    pub worker: &'static str,
}

/// `GET /ready`: 200 when the store answers, else 503 with the reason.
#[utoipa::path(get, path = "/ready", tag = "ops", summary = "Readiness: the store answers",
    responses(
        (status = 200, description = "Ready", body = ReadyAnswer),
        (status = 503, description = "The store does not answer", body = ReadyAnswer),
    ))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<ReadyAnswer>) {
    let reason = match tokio::time::timeout(Duration::from_secs(3), state.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            state.metrics.store_error("ping");
            Some(chain(&e))
        }
        Err(_) => Some("the store did not answer within 3 s".to_owned()),
    };
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let answer = ReadyAnswer {
        status: if reason.is_none() {
            "ready"
        } else {
            "unavailable"
        },
        reason,
        worker: state.worker.state(),
    };
    (status, Json(answer))
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "ops", summary = "Prometheus metrics",
    description = "OpenMetrics text. Needs the read credentials when METRICS_AUTH is on.",
    responses(
        (status = 200, description = "The metrics", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "METRICS_AUTH is on and the read credentials are missing or wrong", body = ErrorBody),
    ))]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.metrics_auth && !state.api_auth.allows(&headers) {
        return ApiError::Unauthorized.into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.job_counts()).await {
        Ok(Ok(counts)) => {
            for (name, n) in [("pending", counts.pending), ("dead", counts.dead)] {
                state
                    .metrics
                    .jobs
                    .get_or_create(&StateLabel {
                        state: name.to_owned(),
                    })
                    .set(n as i64);
            }
        }
        Ok(Err(_)) | Err(_) => state.metrics.store_error("job_counts"),
    }
    state
        .metrics
        .worker_paused
        .set(i64::from(state.worker.is_paused()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", summary = "This API's OpenAPI 3 document",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
        .into_response()
}

pub async fn not_found(
    State(state): State<AppState>,
    method: axum::http::Method,
    uri: Uri,
) -> ApiError {
    state
        .metrics
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            route: "unmatched".to_owned(),
            method: method.to_string(),
            status: 404,
        })
        .inc();
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
