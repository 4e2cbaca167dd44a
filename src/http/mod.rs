//! The HTTP surface: router, shared state, and the handlers by area.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

use tokio::sync::Notify;

use crate::config::Settings;
use crate::store::Store;
use crate::worker::WorkerStatus;

pub mod auth;
pub mod context;
pub mod error;
pub mod ingest;
pub mod ops;
pub mod read;

use auth::BasicAuth;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Arc<dyn Store>,
    pub webhook_auth: BasicAuth,
    pub api_auth: BasicAuth,
    pub max_body_bytes: usize,
    pub dedup_window: Duration,
    /// The enrichment worker of this process, if any.
    pub worker: Arc<WorkerStatus>,
    /// Wakes the worker when a job is recorded.
    pub wake: Arc<Notify>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        settings: &Settings,
        store: Arc<dyn Store>,
        worker: Arc<WorkerStatus>,
        wake: Arc<Notify>,
    ) -> Self {
        AppState(Arc::new(Inner {
            store,
            webhook_auth: BasicAuth::new(&settings.webhook),
            api_auth: BasicAuth::new(&settings.api),
            max_body_bytes: settings.max_body_bytes,
            dedup_window: settings.dedup_window,
            worker,
            wake,
        }))
    }
}

/// The whole HTTP API, apart from any socket (tests can call it directly).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/webhook/activity", post(ingest::ingest))
        .route("/webhook/activity/{order_id}", get(read::order_messages))
        .route("/orders/{order_id}/activities", get(read::order_activities))
        .route("/activities", get(read::recent_activities))
        .route("/jobs", get(read::list_jobs))
        .route("/jobs/{job_id}/retry", post(read::retry_job))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .fallback(ops::not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(context::request_context))
}
