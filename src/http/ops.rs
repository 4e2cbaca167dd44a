//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::json;

use super::AppState;
use super::error::{ApiError, chain};

/// `GET /health`: the process answers.
pub async fn health() -> impl IntoResponse {
    Json(json!({
        "status": "healthy",
        "service": "qualia-webhook",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /ready`: 200 when the store answers, else 503 with the reason.
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let reason = match tokio::time::timeout(Duration::from_secs(3), state.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(chain(&e)),
        Err(_) => Some("the store did not answer within 3 s".to_owned()),
    };
    let worker = state.worker.state();
    match reason {
        None => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "worker": worker })),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "reason": reason, "worker": worker })),
        ),
    }
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
