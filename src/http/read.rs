//! The read API: stored messages, order timelines, recent activity, jobs.
//! Every route here needs the read credentials.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::activity::{ActivityType, MessageId, OrderId};
use crate::store::{
    ActivityQuery, ActivityRecord, Attachment, Enrichment, JobRecord, JobState, MessageRecord,
    rfc3339_ms,
};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.api_auth.allows(headers) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn order_id(raw: String) -> Result<OrderId, ApiError> {
    OrderId::parse(raw)
        .map_err(|e| ApiError::bad_request("invalid_order_id", format!("order_id {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

fn limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_limit", format!("limit must be 1 to {MAX_LIMIT}"))
            }),
    }
}

/// A stored message, in the field names of Qualia's `messages` query.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    #[schema(value_type = String)]
    pub order_id: OrderId,
    #[schema(value_type = String)]
    pub message_id: MessageId,
    pub message_type: &'static str,
    pub order_number: Option<String>,
    pub from_name: Option<String>,
    pub text: Option<String>,
    pub created_date: Option<String>,
    pub read: Option<bool>,
    pub attachments: Vec<Attachment>,
    pub timestamp: i64,
    pub stored_at: String,
}

impl From<MessageRecord> for MessageView {
    fn from(m: MessageRecord) -> Self {
        MessageView {
            order_id: m.order_id,
            message_id: m.message_id,
            message_type: "message",
            order_number: m.order_number,
            from_name: m.from_name,
            text: m.text,
            created_date: m.created_date,
            read: m.read,
            attachments: m.attachments,
            timestamp: m.stored_ms,
            stored_at: rfc3339_ms(m.stored_ms),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesParams {
    /// Prefix of `message#{message_id}` to keep [default: `message`, all].
    message_type: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagesAnswer {
    #[schema(value_type = String)]
    pub order_id: OrderId,
    pub message_type: String,
    pub count: usize,
    pub messages: Vec<MessageView>,
}

/// `GET /webhook/activity/{order_id}`: the original service's answer.
#[utoipa::path(get, path = "/webhook/activity/{order_id}", tag = "read",
    summary = "Stored messages of an order (the original service's answer shape)",
    params(("order_id" = String, Path, description = "Qualia order id"), MessagesParams),
    responses(
        (status = 200, description = "The order's stored messages", body = MessagesAnswer),
        (status = 400, description = "Invalid order id or query", body = ErrorBody),
        (status = 401, description = "Missing or wrong read credentials", body = ErrorBody),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    ),
    security(("read_basic" = [])))]
pub async fn order_messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw_order_id): Path<String>,
    params: Result<Query<MessagesParams>, QueryRejection>,
) -> Result<Json<MessagesAnswer>, ApiError> {
    authorize(&state, &headers)?;
    let order_id = order_id(raw_order_id)?;
    let message_type = query(params)?
        .message_type
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "message".to_owned());
    // As in the original layout, the filter is a prefix of `message#{message_id}`.
    let messages: Vec<MessageView> = state
        .store
        .order_messages(&order_id)
        .await?
        .into_iter()
        .filter(|m| format!("message#{}", m.message_id).starts_with(&message_type))
        .map(MessageView::from)
        .collect();
    Ok(Json(MessagesAnswer {
        order_id,
        message_type,
        count: messages.len(),
        messages,
    }))
}

/// A stored activity.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityView {
    pub activity_id: String,
    #[schema(value_type = String)]
    pub order_id: OrderId,
    pub activity_type: ActivityType,
    pub description: String,
    #[schema(value_type = Option<String>)]
    pub message_id: Option<MessageId>,
    pub received_at: String,
    pub timestamp: i64,
    pub request_id: String,
    pub enrichment: Enrichment,
    pub deliveries: u64,
    pub last_delivery_at: String,
    /// The notification exactly as received.
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
}

impl From<ActivityRecord> for ActivityView {
    fn from(a: ActivityRecord) -> Self {
        let payload = RawValue::from_string(a.raw.clone())
            .or_else(|_| serde_json::value::to_raw_value(&a.raw))
            .unwrap_or_else(|_| RawValue::NULL.to_owned());
        ActivityView {
            activity_id: a.activity_id,
            order_id: a.order_id,
            activity_type: a.activity_type,
            description: a.description,
            message_id: a.message_id,
            received_at: rfc3339_ms(a.received_ms),
            timestamp: a.received_ms,
            request_id: a.request_id,
            enrichment: a.enrichment,
            deliveries: a.deliveries,
            last_delivery_at: rfc3339_ms(a.last_delivery_ms),
            payload,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineAnswer {
    #[schema(value_type = String)]
    pub order_id: OrderId,
    pub count: usize,
    pub activities: Vec<ActivityView>,
}

/// `GET /orders/{order_id}/activities`: the order's timeline, in arrival order.
#[utoipa::path(get, path = "/orders/{order_id}/activities", tag = "read",
    summary = "An order's activities in arrival order, with enrichment state and deliveries",
    params(("order_id" = String, Path, description = "Qualia order id")),
    responses(
        (status = 200, description = "The order's timeline", body = TimelineAnswer),
        (status = 400, description = "Invalid order id", body = ErrorBody),
        (status = 401, description = "Missing or wrong read credentials", body = ErrorBody),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    ),
    security(("read_basic" = [])))]
pub async fn order_activities(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw_order_id): Path<String>,
) -> Result<Json<TimelineAnswer>, ApiError> {
    authorize(&state, &headers)?;
    let order_id = order_id(raw_order_id)?;
    let activities: Vec<ActivityView> = state
        .store
        .order_activities(&order_id)
        .await?
        .into_iter()
        .map(ActivityView::from)
        .collect();
    Ok(Json(TimelineAnswer {
        order_id,
        count: activities.len(),
        activities,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RecentParams {
    /// Only this activity type.
    #[serde(rename = "type")]
    activity_type: Option<String>,
    /// Only activities received at or after this time: RFC 3339 or milliseconds since the epoch.
    since: Option<String>,
    /// Page size, 1 to 500 [default: 50].
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One page of recent activities, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivitiesPage {
    pub count: usize,
    pub next_cursor: Option<String>,
    pub activities: Vec<ActivityView>,
}

/// `since` as RFC 3339 or milliseconds since the epoch.
fn parse_since(s: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_since",
                "since must be RFC 3339 (2026-01-31T12:00:00Z) or milliseconds since the epoch",
            )
        })
}

/// `GET /activities`: recent activities across orders, newest first.
#[utoipa::path(get, path = "/activities", tag = "read",
    summary = "Recent activities across orders, newest first",
    params(RecentParams),
    responses(
        (status = 200, description = "One page of activities", body = ActivitiesPage),
        (status = 400, description = "Invalid type, since, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or wrong read credentials", body = ErrorBody),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    ),
    security(("read_basic" = [])))]
pub async fn recent_activities(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<RecentParams>, QueryRejection>,
) -> Result<Json<ActivitiesPage>, ApiError> {
    authorize(&state, &headers)?;
    let p = query(params)?;
    let activity_type = p
        .activity_type
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|t| {
            ActivityType::parse(t).ok_or_else(|| {
                ApiError::bad_request("invalid_type", format!("unknown activity type {t:?}"))
            })
        })
        .transpose()?;
    let since_ms = p
        .since
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(parse_since)
        .transpose()?;
    let page = state
        .store
        .recent_activities(ActivityQuery {
            activity_type,
            since_ms,
            limit: limit(p.limit.as_deref())?,
            cursor: p.cursor.filter(|c| !c.is_empty()),
        })
        .await?;
    let activities: Vec<ActivityView> = page.items.into_iter().map(ActivityView::from).collect();
    Ok(Json(ActivitiesPage {
        count: activities.len(),
        next_cursor: page.next_cursor,
        activities,
    }))
}

/// An enrichment job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub job_id: String,
    pub kind: String,
    #[schema(value_type = String)]
    pub order_id: OrderId,
    #[schema(value_type = Option<String>)]
    pub message_id: Option<MessageId>,
    pub activity_id: String,
    pub state: JobState,
    pub attempts: u32,
    pub next_attempt_at: String,
    pub lease_until: Option<String>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<JobRecord> for JobView {
    fn from(j: JobRecord) -> Self {
        JobView {
            job_id: j.job_id,
            kind: j.kind,
            order_id: j.order_id,
            message_id: j.message_id,
            activity_id: j.activity_id,
            state: j.state,
            attempts: j.attempts,
            next_attempt_at: rfc3339_ms(j.next_attempt_ms),
            lease_until: j.lease_until_ms.map(rfc3339_ms),
            last_error: j.last_error,
            created_at: rfc3339_ms(j.created_ms),
            updated_at: rfc3339_ms(j.updated_ms),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsParams {
    /// pending, done or dead [default: pending].
    state: Option<String>,
    /// Page size, 1 to 500 [default: 50].
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One page of jobs in one state.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobsPage {
    pub count: usize,
    pub next_cursor: Option<String>,
    pub state: JobState,
    pub jobs: Vec<JobView>,
}

/// `GET /jobs?state=pending|dead|done`.
#[utoipa::path(get, path = "/jobs", tag = "jobs",
    summary = "Enrichment jobs in one state",
    params(JobsParams),
    responses(
        (status = 200, description = "One page of jobs", body = JobsPage),
        (status = 400, description = "Invalid state, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or wrong read credentials", body = ErrorBody),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    ),
    security(("read_basic" = [])))]
pub async fn list_jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<JobsParams>, QueryRejection>,
) -> Result<Json<JobsPage>, ApiError> {
    authorize(&state, &headers)?;
    let p = query(params)?;
    let job_state = match p.state.as_deref().filter(|s| !s.is_empty()) {
        None => JobState::Pending,
        Some(s) => JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request("invalid_state", "state must be pending, done or dead")
        })?,
    };
    let page = state
        .store
        .list_jobs(
            job_state,
            limit(p.limit.as_deref())?,
            p.cursor.filter(|c| !c.is_empty()),
        )
        .await?;
    let jobs: Vec<JobView> = page.items.into_iter().map(JobView::from).collect();
    Ok(Json(JobsPage {
        count: jobs.len(),
        next_cursor: page.next_cursor,
        state: job_state,
        jobs,
    }))
}

/// `POST /jobs/{job_id}/retry`: a dead job back to pending.
#[utoipa::path(post, path = "/jobs/{job_id}/retry", tag = "jobs",
    summary = "Put a dead job back to pending, due now, attempts reset",
    params(("job_id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, pending again", body = JobView),
        (status = 401, description = "Missing or wrong read credentials", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not dead", body = ErrorBody),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    ),
    security(("read_basic" = [])))]
pub async fn retry_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    authorize(&state, &headers)?;
    if ulid::Ulid::from_string(&job_id).is_err() {
        return Err(ApiError::NotFound(format!("no job {job_id:?}")));
    }
    let job = state
        .store
        .retry_job(&job_id, crate::store::now_ms())
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::NotFound(format!("no job {job_id}")),
            other => other.into(),
        })?;
    state.wake.notify_one();
    Ok(Json(JobView::from(job)))
}
