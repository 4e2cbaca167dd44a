//! Prometheus metrics, one registry per application (so that tests, and
//! several apps in one process, never mix their counts).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The activity type (the label is `type`).
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: String,
}

/// Every metric the service exports; names get the `qualia_webhook_` prefix.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub ingest_duration: Histogram,
    pub activities_stored: Family<TypeLabel, Counter>,
    pub duplicates: Family<TypeLabel, Counter>,
    pub quarantined: Family<ReasonLabel, Counter>,
    pub jobs: Family<StateLabel, Gauge>,
    pub jobs_finished: Family<OutcomeLabel, Counter>,
    pub qualia_calls: Family<OutcomeLabel, Counter>,
    pub qualia_call_duration: Histogram,
    pub worker_paused: Gauge,
    pub store_errors: Family<OperationLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qualia_webhook");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            http_requests.clone(),
        );
        // 0.25 ms to about 4 s.
        let ingest_duration = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        registry.register(
            "ingest_duration_seconds",
            "Time from receiving a notification to answering it (authenticated requests)",
            ingest_duration.clone(),
        );
        let activities_stored = Family::<TypeLabel, Counter>::default();
        registry.register(
            "activities_stored",
            "Notifications stored, by activity type",
            activities_stored.clone(),
        );
        let duplicates = Family::<TypeLabel, Counter>::default();
        registry.register(
            "duplicates",
            "Redeliveries recognised (not stored again), by activity type",
            duplicates.clone(),
        );
        let quarantined = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "quarantined",
            "Authenticated bodies refused and kept in the quarantine, by reason",
            quarantined.clone(),
        );
        let jobs = Family::<StateLabel, Gauge>::default();
        registry.register(
            "jobs",
            "Enrichment jobs in the store, by state (pending, dead), read at scrape time",
            jobs.clone(),
        );
        let jobs_finished = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "jobs_finished",
            "Job attempts finished by this process's worker, by outcome (done, retried, dead)",
            jobs_finished.clone(),
        );
        let qualia_calls = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "qualia_calls",
            "Calls to Qualia's GraphQL API, by outcome (ok, retryable, rate_limited, auth, permanent)",
            qualia_calls.clone(),
        );
        let qualia_call_duration = Histogram::new(exponential_buckets(0.005, 2.0, 13));
        registry.register(
            "qualia_call_duration_seconds",
            "Duration of calls to Qualia's GraphQL API",
            qualia_call_duration.clone(),
        );
        let worker_paused = Gauge::default();
        registry.register(
            "worker_paused",
            "1 while the enrichment worker is paused because Qualia refused the credentials",
            worker_paused.clone(),
        );
        let store_errors = Family::<OperationLabel, Counter>::default();
        registry.register(
            "store_errors",
            "Store operations that failed (the store did not commit or answer), by operation",
            store_errors.clone(),
        );
        // Known label values start at zero, so every series exists from the
        // first scrape (rates and alerts need no special case for "absent").
        for t in crate::activity::ActivityType::ALL {
            let label = TypeLabel { r#type: t.as_str() };
            let _ = activities_stored.get_or_create(&label);
            let _ = duplicates.get_or_create(&label);
        }
        for reason in [
            "invalid_json",
            "invalid_notification",
            "payload_too_large",
            "unsupported_media_type",
            "request_timeout",
        ] {
            let _ = quarantined.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        for outcome in ["ok", "retryable", "rate_limited", "auth", "permanent"] {
            let _ = qualia_calls.get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            });
        }
        for outcome in ["done", "retried", "dead"] {
            let _ = jobs_finished.get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            });
        }
        for operation in [
            "record_activity",
            "quarantine",
            "claim_jobs",
            "finish_jobs",
            "ping",
            "job_counts",
        ] {
            let _ = store_errors.get_or_create(&OperationLabel {
                operation: operation.to_owned(),
            });
        }
        Metrics {
            registry,
            http_requests,
            ingest_duration,
            activities_stored,
            duplicates,
            quarantined,
            jobs,
            jobs_finished,
            qualia_calls,
            qualia_call_duration,
            worker_paused,
            store_errors,
        }
    }

    pub fn store_error(&self, operation: &str) {
        self.store_errors
            .get_or_create(&OperationLabel {
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
