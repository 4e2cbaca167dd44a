//! The HTTP surface: router, shared state, and the handlers by area. Routes
//! and their OpenAPI description are registered together, so the document
//! cannot miss a route.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Notify;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Settings;
use crate::metrics::{HttpLabels, Metrics};
use crate::store::Store;
use crate::worker::WorkerStatus;

pub mod auth;
pub mod context;
pub mod error;
pub mod ingest;
pub mod ops;
pub mod read;
pub mod serve;

use auth::BasicAuth;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Arc<dyn Store>,
    pub webhook_auth: BasicAuth,
    pub api_auth: BasicAuth,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub dedup_window: Duration,
    /// The enrichment worker of this process, if any.
    pub worker: Arc<WorkerStatus>,
    /// Wakes the worker when a job is recorded.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Whether `/metrics` needs the read credentials.
    pub metrics_auth: bool,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
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
        metrics: Arc<Metrics>,
    ) -> Self {
        AppState(Arc::new(Inner {
            store,
            webhook_auth: BasicAuth::new(&settings.webhook),
            api_auth: BasicAuth::new(&settings.api),
            max_body_bytes: settings.max_body_bytes,
            body_timeout: settings.body_timeout,
            dedup_window: settings.dedup_window,
            worker,
            wake,
            metrics,
            metrics_auth: settings.metrics_auth,
            openapi: openapi_json().to_owned(),
        }))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qualia-webhook",
        description = "Receives Qualia Marketplace activity notifications, keeps every one durably, completes message details from Qualia's API, and serves it all back."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "webhook", description = "What Qualia calls"),
        (name = "read", description = "Stored activities and messages"),
        (name = "jobs", description = "Message enrichment jobs"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let basic = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "webhook_basic",
            basic("WEBHOOK_USERNAME and WEBHOOK_PASSWORD (or WEBHOOK_PASSWORD_PREVIOUS)"),
        );
        components.add_security_scheme(
            "read_basic",
            basic("API_USERNAME and API_PASSWORD (default: the webhook credentials)"),
        );
    }
}

/// Every route with its description, apart from state and middleware.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ingest::ingest))
        .routes(routes!(read::order_messages))
        .routes(routes!(read::order_activities))
        .routes(routes!(read::recent_activities))
        .routes(routes!(read::list_jobs))
        .routes(routes!(read::retry_job))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
}

/// The OpenAPI document of every route the router serves.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes().split_for_parts().1
}

fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| openapi_document().to_pretty_json().unwrap_or_default())
}

/// Counts requests by route (the matched pattern, not the raw path).
async fn count_request(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().to_string();
    let res = next.run(req).await;
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// The whole HTTP API, apart from any socket (tests can call it directly).
pub fn router(state: AppState) -> Router {
    let (routes, _) = api_routes().split_for_parts();
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_request,
        ))
        .fallback(ops::not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(context::request_context))
}
