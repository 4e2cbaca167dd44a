//! The store: a small trait that speaks the domain, and one backend per
//! storage engine. Each backend keeps its own conversions in its own file.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::activity::{ActivityType, MessageId, Notification, OrderId};
use crate::config::StoreLocation;

pub mod dynamodb;
pub mod sqlite;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong in a store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not commit or answer; the caller may try again later.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store could not be opened at start-up (missing rights, corrupt file, ...).
    #[error("cannot open store {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: BoxError,
    },
    /// A pagination cursor that this store did not hand out.
    #[error("invalid cursor")]
    InvalidCursor,
    #[error("not found")]
    NotFound,
    /// The record is not in a state that allows the change.
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        StoreError::Unavailable(e.into())
    }
}

/// How far a notification's details have been completed from Qualia.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Enrichment {
    /// Nothing to fetch for this type.
    NotApplicable,
    /// A job will fetch the message.
    Pending,
    /// The message is stored.
    Enriched,
    /// A message notification without `message_id`: nothing can be fetched.
    Skipped,
    /// The job gave up (dead); it can be retried.
    Failed,
}

impl Enrichment {
    pub fn as_str(self) -> &'static str {
        match self {
            Enrichment::NotApplicable => "not_applicable",
            Enrichment::Pending => "pending",
            Enrichment::Enriched => "enriched",
            Enrichment::Skipped => "skipped",
            Enrichment::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Enrichment::NotApplicable,
            Enrichment::Pending,
            Enrichment::Enriched,
            Enrichment::Skipped,
            Enrichment::Failed,
        ]
        .into_iter()
        .find(|e| e.as_str() == s)
    }

    /// The state a freshly stored notification starts in.
    pub fn initial(n: &Notification) -> Self {
        match (n.activity_type, &n.message_id) {
            (ActivityType::Message, Some(_)) => Enrichment::Pending,
            (ActivityType::Message, None) => Enrichment::Skipped,
            _ => Enrichment::NotApplicable,
        }
    }
}

/// A notification to record, with what the receiver knows about its arrival.
#[derive(Debug, Clone)]
pub struct NewActivity {
    pub activity_id: String,
    pub notification: Notification,
    pub received_ms: i64,
    pub request_id: String,
    /// Redelivery window for notifications other than messages; zero is off.
    pub dedup_window: Duration,
}

/// The outcome of recording: the stored activity's id (the original's, for a
/// redelivery) and how many times it has been delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub activity_id: String,
    pub duplicate: bool,
    pub deliveries: u64,
}

/// One stored activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityRecord {
    pub activity_id: String,
    pub order_id: OrderId,
    pub activity_type: ActivityType,
    pub description: String,
    pub message_id: Option<MessageId>,
    pub received_ms: i64,
    pub request_id: String,
    pub raw: String,
    pub enrichment: Enrichment,
    pub deliveries: u64,
    pub last_delivery_ms: i64,
}

/// One attachment of a message, in Qualia's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Attachment {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: Option<String>,
    pub url: Option<String>,
    pub tag: Option<String>,
}

/// A message's details as fetched from Qualia.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub order_id: OrderId,
    pub message_id: MessageId,
    pub order_number: Option<String>,
    pub from_name: Option<String>,
    pub text: Option<String>,
    pub created_date: Option<String>,
    pub read: Option<bool>,
    pub attachments: Vec<Attachment>,
    pub stored_ms: i64,
}

/// The life of an enrichment job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its next attempt (or being worked on under a lease).
    Pending,
    /// Finished: the message is stored.
    Done,
    /// Gave up after its attempts; `retry` puts it back to pending.
    Dead,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Done => "done",
            JobState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [JobState::Pending, JobState::Done, JobState::Dead]
            .into_iter()
            .find(|j| j.as_str() == s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One enrichment job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub job_id: String,
    pub kind: String,
    pub order_id: OrderId,
    pub message_id: Option<MessageId>,
    pub activity_id: String,
    pub state: JobState,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub lease_until_ms: Option<i64>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Jobs waiting and given up, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub pending: u64,
    pub dead: u64,
}

/// Jobs claimed by one worker under one lease.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Proves the lease when the jobs are finished.
    pub token: String,
    pub jobs: Vec<JobRecord>,
}

/// What became of a claimed job.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    /// The message was fetched: store it, the job is done, the activity
    /// enriched. Applied even if the lease ran out meanwhile (storing a
    /// message twice leaves one record).
    Done {
        job: JobRecord,
        message: MessageRecord,
    },
    /// Try again at `next_attempt_ms`; `count_attempt` is false when the
    /// failure was not the job's (the worker was paused).
    Retry {
        job: JobRecord,
        next_attempt_ms: i64,
        error: String,
        count_attempt: bool,
    },
    /// Give up: the job is dead, the activity's enrichment failed.
    Dead { job: JobRecord, error: String },
}

/// An authenticated body that was refused, kept for an operator.
#[derive(Debug, Clone)]
pub struct QuarantineEntry {
    pub received_ms: i64,
    pub request_id: String,
    pub reason: String,
    pub body: Vec<u8>,
}

/// Filters of the recent-activity listing.
#[derive(Debug, Clone, Default)]
pub struct ActivityQuery {
    pub activity_type: Option<ActivityType>,
    pub since_ms: Option<i64>,
    pub limit: u32,
    pub cursor: Option<String>,
}

/// One page of a listing; `next_cursor` fetches the next.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Everything the service asks of a store. Every backend behaves the same;
/// one contract suite (`tests/`) checks that.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a notification, its redelivery marker and (for a message) its
    /// enrichment job in one atomic, durable write. A redelivery bumps the
    /// original's delivery count instead.
    async fn record_activity(&self, new: NewActivity) -> Result<Recorded, StoreError>;

    /// Keeps a refused body; the oldest entries go past the configured bound.
    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), StoreError>;

    /// An order's activities in arrival order.
    async fn order_activities(&self, order_id: &OrderId)
    -> Result<Vec<ActivityRecord>, StoreError>;

    /// Recent activities across orders, newest first.
    async fn recent_activities(
        &self,
        query: ActivityQuery,
    ) -> Result<Page<ActivityRecord>, StoreError>;

    /// An order's stored messages, in message-id order.
    async fn order_messages(&self, order_id: &OrderId) -> Result<Vec<MessageRecord>, StoreError>;

    /// Jobs in one state, oldest first.
    async fn list_jobs(
        &self,
        state: JobState,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<Page<JobRecord>, StoreError>;

    /// The quarantined bodies, newest first.
    async fn quarantined(&self, limit: u32) -> Result<Vec<QuarantineEntry>, StoreError>;

    /// Claims up to `limit` due jobs (pending, due, lease free or expired)
    /// for `lease`, oldest due first.
    async fn claim_jobs(
        &self,
        now_ms: i64,
        lease: Duration,
        limit: u32,
    ) -> Result<Claim, StoreError>;

    /// Records what became of claimed jobs, in one atomic write. Retry and
    /// dead outcomes apply only while the claim's lease is still held.
    async fn finish_jobs(
        &self,
        token: &str,
        now_ms: i64,
        outcomes: Vec<JobOutcome>,
    ) -> Result<(), StoreError>;

    /// Puts a dead job back to pending, due now, with its attempts reset.
    async fn retry_job(&self, job_id: &str, now_ms: i64) -> Result<JobRecord, StoreError>;

    /// Puts every dead job back to pending; returns how many.
    async fn retry_dead_jobs(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// How many jobs are pending and dead (for metrics).
    async fn job_counts(&self) -> Result<JobCounts, StoreError>;

    /// Answers when the store can be read and written.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Finishes pending writes and releases the store.
    async fn close(&self);
}

/// Opens the store the settings name.
pub async fn open(
    location: &StoreLocation,
    quarantine_max: u64,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match location {
        StoreLocation::Sqlite { path } => {
            let store = sqlite::SqliteStore::open(path, quarantine_max).await?;
            Ok(std::sync::Arc::new(store))
        }
        StoreLocation::DynamoDb { table } => {
            let store = dynamodb::DynamoStore::open(table, quarantine_max).await?;
            Ok(std::sync::Arc::new(store))
        }
    }
}

/// A new activity id: a ULID whose time part is the arrival time, so that
/// the id alone gives the activity's place in the stored layout.
pub fn new_activity_id(received_ms: i64) -> String {
    ulid::Ulid::from_parts(received_ms.max(0) as u64, fastrand::u128(..)).to_string()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a millisecond timestamp.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
