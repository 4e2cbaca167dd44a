//! The DynamoDB backend: one table, the original service's single-table
//! layout, safe for several replicas.
//!
//! | item | PK | SK |
//! |---|---|---|
//! | activity | `ACTIVITY#{order_id}` | `{type}#{received_ms}#{activity_id}` |
//! | message | `MESSAGE#{order_id}` | `message#{message_id}` |
//! | dedup marker | `DEDUP#{sha256 of the key}` | `DEDUP` |
//! | job | `JOB#{job_id}` | `JOB` |
//! | quarantine slot / counter | `QUARANTINE` | `SLOT#{n}` / `COUNTER` |
//!
//! One global secondary index, `GSI1` (`GSI1PK`, `GSI1SK`, all attributes
//! projected), serves two listings: `GSI1PK = ACTIVITIES` (every activity,
//! by arrival) and `GSI1PK = JOBS#{state}` (jobs by state; for pending jobs
//! `GSI1SK` starts with the time the job may next be claimed, so due jobs
//! are one range query). Dedup markers carry `expiresAt` (epoch seconds),
//! the table's TTL attribute.
//!
//! Atomicity: an activity, its dedup marker and its job are written by one
//! `TransactWriteItems` whose marker put is conditional
//! (`attribute_not_exists(PK) OR expiresAtMs <= :now`), with the activity id
//! as client request token so that an SDK retry of a committed transaction
//! is recognised. Job completion is an ordering of idempotent writes: the
//! message is put (overwriting itself harmlessly), then the activity marked
//! enriched, and the job marked done last; a crash between them leaves the
//! job pending under a lease that runs out, and the next worker repeats the
//! same writes. (The crash harness found the opposite order wrong: a kill
//! between "job done" and "activity enriched" left the activity pending.)

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus, TransactWriteItem,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{StreamExt, TryStreamExt, stream};

use super::{
    ActivityQuery, ActivityRecord, Attachment, Claim, Enrichment, JobCounts, JobOutcome, JobRecord,
    JobState, MessageRecord, NewActivity, Page, QuarantineEntry, Recorded, Store, StoreError,
};
use crate::activity::{ActivityType, MessageId, OrderId};

pub const INDEX: &str = "GSI1";
pub const TTL_ATTRIBUTE: &str = "expiresAt";
const ACTIVITIES_PARTITION: &str = "ACTIVITIES";
/// How many conditional writes run at once.
const PARALLEL: usize = 16;
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

type Item = HashMap<String, AttributeValue>;

pub struct DynamoStore {
    client: Client,
    table: String,
    quarantine_max: u64,
}

fn unavailable<E>(e: E) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
{
    StoreError::unavailable(DisplayErrorContext(&e).to_string())
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Sortable text of a millisecond timestamp.
fn pad(ms: i64) -> String {
    format!("{:015}", ms.max(0))
}

fn get_s(item: &Item, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

fn get_n(item: &Item, name: &str) -> Option<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::unavailable(format!("unexpected item in the table: {what}"))
}

fn req_s(item: &Item, name: &str) -> Result<String, StoreError> {
    get_s(item, name).ok_or_else(|| corrupt(&format!("missing {name}")))
}

fn req_n(item: &Item, name: &str) -> Result<i64, StoreError> {
    get_n(item, name).ok_or_else(|| corrupt(&format!("missing {name}")))
}

fn order_id_of(item: &Item) -> Result<OrderId, StoreError> {
    OrderId::parse(req_s(item, "orderId")?).map_err(|_| corrupt("orderId"))
}

fn message_id_of(item: &Item) -> Result<Option<MessageId>, StoreError> {
    get_s(item, "messageId")
        .map(|m| MessageId::parse(m).map_err(|_| corrupt("messageId")))
        .transpose()
}

fn activity_pk(order_id: &str) -> String {
    format!("ACTIVITY#{order_id}")
}

/// The activity's sort key. Activity ids are ULIDs made at arrival, so the
/// key can be rebuilt from the id alone (a job only knows the id).
fn activity_sk(activity_type: ActivityType, activity_id: &str) -> String {
    let ms = ulid::Ulid::from_string(activity_id)
        .map(|u| u.timestamp_ms())
        .unwrap_or(0);
    format!("{activity_type}#{ms}#{activity_id}")
}

fn job_pk(job_id: &str) -> String {
    format!("JOB#{job_id}")
}

fn key(pk: String, sk: &str) -> Item {
    HashMap::from([("PK".to_owned(), s(pk)), ("SK".to_owned(), s(sk))])
}

fn encode_cursor(key: &Item) -> Option<String> {
    let map: serde_json::Map<String, serde_json::Value> = key
        .iter()
        .filter_map(|(k, v)| match v {
            AttributeValue::S(x) => Some((k.clone(), serde_json::Value::String(x.clone()))),
            _ => None,
        })
        .collect();
    serde_json::to_vec(&map)
        .ok()
        .map(|b| URL_SAFE_NO_PAD.encode(b))
}

fn decode_cursor(cursor: &str, index_partition: &str) -> Result<Item, StoreError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| StoreError::InvalidCursor)?;
    let map: HashMap<String, String> =
        serde_json::from_slice(&bytes).map_err(|_| StoreError::InvalidCursor)?;
    let ok = map.len() == 4
        && ["PK", "SK", "GSI1PK", "GSI1SK"]
            .iter()
            .all(|k| map.contains_key(*k))
        && map.get("GSI1PK").is_some_and(|p| p == index_partition);
    if !ok {
        return Err(StoreError::InvalidCursor);
    }
    Ok(map.into_iter().map(|(k, v)| (k, s(v))).collect())
}

/// The first `limit` of `items` (fetched as `limit + 1`) as a page, with a
/// cursor after the last one when more followed.
fn page_of<T>(
    mut items: Vec<Item>,
    limit: usize,
    convert: fn(&Item) -> Result<T, StoreError>,
) -> Result<Page<T>, StoreError> {
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().and_then(|last| {
            let k: Item = ["PK", "SK", "GSI1PK", "GSI1SK"]
                .iter()
                .filter_map(|a| last.get(*a).map(|v| ((*a).to_owned(), v.clone())))
                .collect();
            encode_cursor(&k)
        })
    } else {
        None
    };
    Ok(Page {
        items: items.iter().map(convert).collect::<Result<_, _>>()?,
        next_cursor,
    })
}

/// `Ok(Some(output))`, `Ok(None)` when the write's condition did not hold
/// (another worker was first, the state moved on), or the error.
fn unless_condition_failed<T, E>(
    result: Result<
        T,
        aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
    >,
) -> Result<Option<T>, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

fn activity_from_item(item: &Item) -> Result<ActivityRecord, StoreError> {
    let type_s = req_s(item, "activityType")?;
    let enrichment_s = req_s(item, "enrichment")?;
    let received_ms = req_n(item, "timestamp")?;
    Ok(ActivityRecord {
        activity_id: req_s(item, "activityId")?,
        order_id: order_id_of(item)?,
        activity_type: ActivityType::parse(&type_s).ok_or_else(|| corrupt("activityType"))?,
        description: get_s(item, "description").unwrap_or_default(),
        message_id: message_id_of(item)?,
        received_ms,
        request_id: get_s(item, "requestId").unwrap_or_default(),
        raw: get_s(item, "raw").unwrap_or_default(),
        enrichment: Enrichment::parse(&enrichment_s).ok_or_else(|| corrupt("enrichment"))?,
        deliveries: get_n(item, "deliveries").unwrap_or(1).max(1) as u64,
        last_delivery_ms: get_n(item, "lastDeliveryAt").unwrap_or(received_ms),
    })
}

fn job_from_item(item: &Item) -> Result<JobRecord, StoreError> {
    let state_s = req_s(item, "state")?;
    Ok(JobRecord {
        job_id: req_s(item, "jobId")?,
        kind: req_s(item, "kind")?,
        order_id: order_id_of(item)?,
        message_id: message_id_of(item)?,
        activity_id: req_s(item, "activityId")?,
        state: JobState::parse(&state_s).ok_or_else(|| corrupt("state"))?,
        attempts: get_n(item, "attempts").unwrap_or(0).max(0) as u32,
        next_attempt_ms: req_n(item, "nextAttemptAt")?,
        lease_until_ms: get_n(item, "leaseUntil"),
        last_error: get_s(item, "lastError"),
        created_ms: req_n(item, "createdAt")?,
        updated_ms: req_n(item, "updatedAt")?,
    })
}

fn attachment_value(a: &Attachment) -> AttributeValue {
    let mut m = HashMap::from([("id".to_owned(), s(&a.id))]);
    for (k, v) in [("name", &a.name), ("url", &a.url), ("tag", &a.tag)] {
        if let Some(v) = v {
            m.insert(k.to_owned(), s(v));
        }
    }
    AttributeValue::M(m)
}

fn message_from_item(item: &Item) -> Result<MessageRecord, StoreError> {
    let attachments = match item.get("attachments") {
        Some(AttributeValue::L(list)) => list
            .iter()
            .filter_map(|v| match v {
                AttributeValue::M(m) => Some(Attachment {
                    id: get_s(m, "id").unwrap_or_default(),
                    name: get_s(m, "name"),
                    url: get_s(m, "url"),
                    tag: get_s(m, "tag"),
                }),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(MessageRecord {
        order_id: order_id_of(item)?,
        message_id: message_id_of(item)?.ok_or_else(|| corrupt("messageId"))?,
        order_number: get_s(item, "orderNumber"),
        from_name: get_s(item, "fromName"),
        text: get_s(item, "text"),
        created_date: get_s(item, "createdDate"),
        read: match item.get("read") {
            Some(AttributeValue::Bool(b)) => Some(*b),
            _ => None,
        },
        attachments,
        stored_ms: get_n(item, "timestamp").unwrap_or(0),
    })
}

/// Builds the SDK client from the standard AWS chain (region, credentials,
/// `AWS_ENDPOINT_URL`), with bounded timeouts so that a store that does not
/// answer fails fast (503) instead of hanging a request.
///
/// `DYNAMODB_ATTEMPT_TIMEOUT` (default 3s) bounds one attempt; a whole
/// operation, retries included, gets three times that. DynamoDB answers in
/// milliseconds; a slow local emulator under test load may need more.
pub async fn client() -> Client {
    let attempt = match std::env::var("DYNAMODB_ATTEMPT_TIMEOUT") {
        Err(_) => DEFAULT_ATTEMPT_TIMEOUT,
        Ok(v) => crate::config::parse_duration(&v)
            .ok()
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| {
                tracing::warn!(value = %v, "DYNAMODB_ATTEMPT_TIMEOUT is not a duration; using 3s");
                DEFAULT_ATTEMPT_TIMEOUT
            }),
    };
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(4))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(attempt)
                .operation_timeout(attempt * 3)
                .build(),
        )
        .load()
        .await;
    Client::new(&config)
}

/// The attribute the table's TTL is on, `None` when TTL is off.
async fn ttl_attribute(client: &Client, table: &str) -> Result<Option<String>, String> {
    let ttl = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot read the TTL of {table}: {}",
                DisplayErrorContext(&e)
            )
        })?;
    Ok(ttl.time_to_live_description().and_then(|d| {
        let on = matches!(
            d.time_to_live_status(),
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        );
        d.attribute_name().filter(|_| on).map(str::to_owned)
    }))
}

/// What is wrong with a table, if anything.
pub async fn check_table(client: &Client, table: &str) -> Result<(), String> {
    let described = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| {
            let e = e.into_service_error();
            if e.is_resource_not_found_exception() {
                format!(
                    "table {table} does not exist; create it with `qualia-webhook table create --table {table}`"
                )
            } else {
                format!("cannot describe table {table}: {}", DisplayErrorContext(&e))
            }
        })?;
    let t = described
        .table()
        .ok_or_else(|| format!("table {table}: no description"))?;
    let keys: Vec<(String, String)> = t
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_owned(),
                k.key_type().as_str().to_owned(),
            )
        })
        .collect();
    if keys != [("PK".into(), "HASH".into()), ("SK".into(), "RANGE".into())] {
        return Err(format!(
            "table {table} has keys {keys:?}; expected PK (HASH) and SK (RANGE)"
        ));
    }
    let index_ok = t.global_secondary_indexes().iter().any(|g| {
        g.index_name() == Some(INDEX)
            && g.key_schema()
                .iter()
                .map(|k| (k.attribute_name(), k.key_type().as_str()))
                .eq([("GSI1PK", "HASH"), ("GSI1SK", "RANGE")])
    });
    if !index_ok {
        return Err(format!(
            "table {table} lacks index {INDEX} (GSI1PK HASH, GSI1SK RANGE); \
             run `qualia-webhook table create --table {table}`"
        ));
    }
    let ttl_ok = ttl_attribute(client, table).await?.as_deref() == Some(TTL_ATTRIBUTE);
    if !ttl_ok {
        return Err(format!(
            "table {table} has no TTL on {TTL_ATTRIBUTE}; expired dedup markers would stay \
             forever; run `qualia-webhook table create --table {table}`"
        ));
    }
    Ok(())
}

/// Creates the table (on-demand), its index and TTL; does what is missing
/// and nothing else when the table exists. Returns what it did.
pub async fn create_table(client: &Client, table: &str) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| e.to_string())
    };
    let key_el = |name: &str, kt: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kt)
            .build()
            .map_err(|e| e.to_string())
    };
    let exists = client.describe_table().table_name(table).send().await;
    match exists {
        Ok(_) => done.push(format!("table {table} exists")),
        Err(e) => {
            let e = e.into_service_error();
            if !e.is_resource_not_found_exception() {
                return Err(format!(
                    "cannot describe table {table}: {}",
                    DisplayErrorContext(&e)
                ));
            }
            let index = GlobalSecondaryIndex::builder()
                .index_name(INDEX)
                .key_schema(key_el("GSI1PK", KeyType::Hash)?)
                .key_schema(key_el("GSI1SK", KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(|e| e.to_string())?;
            client
                .create_table()
                .table_name(table)
                .billing_mode(BillingMode::PayPerRequest)
                .attribute_definitions(attr("PK")?)
                .attribute_definitions(attr("SK")?)
                .attribute_definitions(attr("GSI1PK")?)
                .attribute_definitions(attr("GSI1SK")?)
                .key_schema(key_el("PK", KeyType::Hash)?)
                .key_schema(key_el("SK", KeyType::Range)?)
                .global_secondary_indexes(index)
                .send()
                .await
                .map_err(|e| format!("cannot create table {table}: {}", DisplayErrorContext(&e)))?;
            done.push(format!(
                "created table {table} (on-demand) with index {INDEX}"
            ));
        }
    }
    // Wait until the table is active (a fresh table takes a moment on AWS).
    for _ in 0..120 {
        let status = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .ok()
            .and_then(|d| d.table().and_then(|t| t.table_status().cloned()));
        if status == Some(TableStatus::Active) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let enabled = ttl_attribute(client, table).await?.is_some();
    if enabled {
        done.push(format!("TTL already on ({TTL_ATTRIBUTE})"));
    } else {
        let spec = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL_ATTRIBUTE)
            .build()
            .map_err(|e| e.to_string())?;
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(spec)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot turn TTL on for {table}: {}",
                    DisplayErrorContext(&e)
                )
            })?;
        done.push(format!("turned TTL on ({TTL_ATTRIBUTE})"));
    }
    check_table(client, table).await?;
    Ok(done)
}

impl DynamoStore {
    /// Connects and checks that the table has the expected shape.
    pub async fn open(table: &str, quarantine_max: u64) -> Result<Self, StoreError> {
        let client = client().await;
        check_table(&client, table)
            .await
            .map_err(|e| StoreError::Open {
                location: format!("dynamodb://{table}"),
                source: e.into(),
            })?;
        Ok(DynamoStore {
            client,
            table: table.to_owned(),
            quarantine_max: quarantine_max.max(1),
        })
    }

    fn put(
        &self,
        item: Item,
        condition: Option<&str>,
        values: Option<Item>,
    ) -> Result<TransactWriteItem, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .set_condition_expression(condition.map(str::to_owned))
            .set_expression_attribute_values(values)
            .build()
            .map_err(StoreError::unavailable)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    async fn get(&self, key: Item) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(out.item)
    }

    /// Queries `GSI1` for one partition, following pages until `want` items
    /// matched or the partition ends. Returns the items and the key after the
    /// last one returned, if more may follow.
    async fn query_index(
        &self,
        partition: &str,
        range: Option<(&str, String)>,
        forward: bool,
        filter_type: Option<ActivityType>,
        start: Option<Item>,
        want: usize,
    ) -> Result<(Vec<Item>, Option<Item>), StoreError> {
        let mut items = Vec::new();
        let mut start = start;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(INDEX)
                .expression_attribute_values(":pk", s(partition))
                .scan_index_forward(forward)
                .limit((want - items.len()).clamp(1, 1000) as i32)
                .set_exclusive_start_key(start.take());
            q = match &range {
                None => q.key_condition_expression("GSI1PK = :pk"),
                Some((op, bound)) => q
                    .key_condition_expression(format!("GSI1PK = :pk AND GSI1SK {op} :bound"))
                    .expression_attribute_values(":bound", s(bound.clone())),
            };
            if let Some(t) = filter_type {
                q = q
                    .filter_expression("activityType = :type")
                    .expression_attribute_values(":type", s(t.as_str()));
            }
            let out = q.send().await.map_err(unavailable)?;
            items.extend(out.items.unwrap_or_default());
            let next = out.last_evaluated_key;
            if items.len() >= want || next.is_none() {
                return Ok((items, next));
            }
            start = next;
        }
    }

    /// Every item of one partition (optionally with a sort-key prefix),
    /// strongly consistent, following every page.
    async fn query_partition<T>(
        &self,
        pk: String,
        sk_prefix: Option<&str>,
        convert: fn(&Item) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(pk.clone()))
                .consistent_read(true)
                .set_exclusive_start_key(start);
            q = match sk_prefix {
                None => q.key_condition_expression("PK = :pk"),
                Some(prefix) => q
                    .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                    .expression_attribute_values(":prefix", s(prefix)),
            };
            let page = q.send().await.map_err(unavailable)?;
            for item in page.items() {
                out.push(convert(item)?);
            }
            match page.last_evaluated_key {
                Some(k) => start = Some(k),
                None => return Ok(out),
            }
        }
    }

    /// Updates the enrichment state of a job's activity.
    async fn set_enrichment(&self, job: &JobRecord, e: Enrichment) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                activity_pk(job.order_id.as_ref()),
                &activity_sk(ActivityType::Message, &job.activity_id),
            )))
            .update_expression("SET enrichment = :e")
            .condition_expression("attribute_exists(PK)")
            .expression_attribute_values(":e", s(e.as_str()))
            .send()
            .await;
        if unless_condition_failed(result)?.is_none() {
            tracing::warn!(job_id = %job.job_id, activity_id = %job.activity_id, "job's activity not found");
        }
        Ok(())
    }

    async fn finish_one(
        &self,
        token: &str,
        now_ms: i64,
        outcome: JobOutcome,
    ) -> Result<(), StoreError> {
        let job_key = |job: &JobRecord| key(job_pk(&job.job_id), "JOB");
        match outcome {
            JobOutcome::Done { job, message } => {
                let mut item = key(
                    format!("MESSAGE#{}", message.order_id),
                    &format!("message#{}", message.message_id),
                );
                item.insert("orderId".into(), s(message.order_id.as_ref()));
                item.insert("messageId".into(), s(message.message_id.as_ref()));
                item.insert("messageType".into(), s("message"));
                for (k, v) in [
                    ("fromName", &message.from_name),
                    ("text", &message.text),
                    ("createdDate", &message.created_date),
                    ("orderNumber", &message.order_number),
                ] {
                    if let Some(v) = v {
                        item.insert(k.into(), s(v));
                    }
                }
                if let Some(r) = message.read {
                    item.insert("read".into(), AttributeValue::Bool(r));
                }
                item.insert(
                    "attachments".into(),
                    AttributeValue::L(message.attachments.iter().map(attachment_value).collect()),
                );
                item.insert("timestamp".into(), n(message.stored_ms));
                item.insert("storedAt".into(), s(super::rfc3339_ms(message.stored_ms)));
                self.client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .send()
                    .await
                    .map_err(unavailable)?;
                // The activity before the job: the job is marked done last,
                // so a crash anywhere before leaves it pending and it is
                // repeated, never a done job beside a pending activity.
                self.set_enrichment(&job, Enrichment::Enriched).await?;
                let updated = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(job_key(&job)))
                    .update_expression(
                        "SET #st = :done, updatedAt = :now, GSI1PK = :gpk, GSI1SK = :gsk \
                         REMOVE leaseUntil, leaseOwner, lastError",
                    )
                    .condition_expression("#st = :pending")
                    .expression_attribute_names("#st", "state")
                    .expression_attribute_values(":done", s("done"))
                    .expression_attribute_values(":pending", s("pending"))
                    .expression_attribute_values(":now", n(now_ms))
                    .expression_attribute_values(":gpk", s("JOBS#done"))
                    .expression_attribute_values(
                        ":gsk",
                        s(format!("{}#{}", pad(now_ms), job.job_id)),
                    )
                    .send()
                    .await;
                // Already done by another worker: the message is stored either way.
                unless_condition_failed(updated).map(|_| ())
            }
            JobOutcome::Retry {
                job,
                next_attempt_ms,
                error,
                count_attempt,
            } => {
                let result = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(job_key(&job)))
                    .update_expression(
                        "SET attempts = attempts + :inc, nextAttemptAt = :next, lastError = :err, \
                         updatedAt = :now, GSI1SK = :gsk REMOVE leaseUntil, leaseOwner",
                    )
                    .condition_expression("#st = :pending AND leaseOwner = :token")
                    .expression_attribute_names("#st", "state")
                    .expression_attribute_values(":pending", s("pending"))
                    .expression_attribute_values(":token", s(token))
                    .expression_attribute_values(":inc", n(i64::from(count_attempt)))
                    .expression_attribute_values(":next", n(next_attempt_ms))
                    .expression_attribute_values(":err", s(error))
                    .expression_attribute_values(":now", n(now_ms))
                    .expression_attribute_values(
                        ":gsk",
                        s(format!("{}#{}", pad(next_attempt_ms), job.job_id)),
                    )
                    .send()
                    .await;
                // The lease was lost: the job is another worker's now.
                unless_condition_failed(result).map(|_| ())
            }
            JobOutcome::Dead { job, error } => {
                let result = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(job_key(&job)))
                    .update_expression(
                        "SET #st = :dead, attempts = attempts + :one, lastError = :err, \
                         updatedAt = :now, GSI1PK = :gpk, GSI1SK = :gsk REMOVE leaseUntil, leaseOwner",
                    )
                    .condition_expression("#st = :pending AND leaseOwner = :token")
                    .expression_attribute_names("#st", "state")
                    .expression_attribute_values(":pending", s("pending"))
                    .expression_attribute_values(":dead", s("dead"))
                    .expression_attribute_values(":token", s(token))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":err", s(error))
                    .expression_attribute_values(":now", n(now_ms))
                    .expression_attribute_values(":gpk", s("JOBS#dead"))
                    .expression_attribute_values(":gsk", s(format!("{}#{}", pad(now_ms), job.job_id)))
                    .send()
                    .await;
                match unless_condition_failed(result)? {
                    Some(_) => self.set_enrichment(&job, Enrichment::Failed).await,
                    None => Ok(()), // the lease was lost
                }
            }
        }
    }

    /// Tries to claim one candidate job; `None` if another worker was first
    /// or it is no longer due.
    async fn claim_one(
        &self,
        job_id: String,
        token: &str,
        now_ms: i64,
        until: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(&job_id), "JOB")))
            .update_expression(
                "SET leaseUntil = :until, leaseOwner = :token, updatedAt = :now, GSI1SK = :gsk",
            )
            .condition_expression(
                "#st = :pending AND nextAttemptAt <= :now \
                 AND (attribute_not_exists(leaseUntil) OR leaseUntil <= :now)",
            )
            .expression_attribute_names("#st", "state")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":gsk", s(format!("{}#{}", pad(until), job_id)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match unless_condition_failed(result)? {
            Some(out) => out.attributes.as_ref().map(job_from_item).transpose(),
            None => Ok(None),
        }
    }

    async fn retry_one(&self, job_id: &str, now_ms: i64) -> Result<JobRecord, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), "JOB")))
            .update_expression(
                "SET #st = :pending, attempts = :zero, nextAttemptAt = :now, updatedAt = :now, \
                 GSI1PK = :gpk, GSI1SK = :gsk REMOVE leaseUntil, leaseOwner",
            )
            .condition_expression("#st = :dead")
            .expression_attribute_names("#st", "state")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":dead", s("dead"))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":gpk", s("JOBS#pending"))
            .expression_attribute_values(":gsk", s(format!("{}#{}", pad(now_ms), job_id)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match unless_condition_failed(result)? {
            Some(out) => {
                let job = out
                    .attributes
                    .as_ref()
                    .map(job_from_item)
                    .transpose()?
                    .ok_or_else(|| corrupt("no job after update"))?;
                self.set_enrichment(&job, Enrichment::Pending).await?;
                Ok(job)
            }
            None => match self.get(key(job_pk(job_id), "JOB")).await? {
                None => Err(StoreError::NotFound),
                Some(item) => Err(StoreError::Conflict(format!(
                    "the job is {}, not dead",
                    get_s(&item, "state").unwrap_or_default()
                ))),
            },
        }
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn record_activity(&self, new: NewActivity) -> Result<Recorded, StoreError> {
        let nt = &new.notification;
        let order = nt.order_id.as_ref();
        let pk = activity_pk(order);
        let sk = activity_sk(nt.activity_type, &new.activity_id);
        let dedup = nt.dedup_key();
        let window_ms = new.dedup_window.as_millis() as i64;
        let use_dedup = dedup.forever || window_ms > 0;
        let dedup_pk = format!("DEDUP#{}", dedup.digest());

        let mut items = Vec::new();
        if use_dedup {
            let mut marker = key(dedup_pk.clone(), "DEDUP");
            marker.insert("activityPK".into(), s(&pk));
            marker.insert("activitySK".into(), s(&sk));
            marker.insert("activityId".into(), s(&new.activity_id));
            if !dedup.forever {
                let expires = new.received_ms + window_ms;
                marker.insert("expiresAtMs".into(), n(expires));
                // TTL deletes lazily; liveness is decided by expiresAtMs.
                marker.insert(TTL_ATTRIBUTE.into(), n(expires / 1000 + 1));
            }
            items.push(self.put(
                marker,
                Some("attribute_not_exists(PK) OR expiresAtMs <= :now"),
                Some(HashMap::from([(":now".to_owned(), n(new.received_ms))])),
            )?);
        }

        let mut activity = key(pk.clone(), &sk);
        activity.insert("orderId".into(), s(order));
        activity.insert("activityType".into(), s(nt.activity_type.as_str()));
        activity.insert("description".into(), s(&nt.description));
        if let Some(m) = &nt.message_id {
            activity.insert("messageId".into(), s(m.as_ref()));
        }
        activity.insert("timestamp".into(), n(new.received_ms));
        activity.insert("receivedAt".into(), s(super::rfc3339_ms(new.received_ms)));
        activity.insert("activityId".into(), s(&new.activity_id));
        activity.insert("requestId".into(), s(&new.request_id));
        activity.insert("raw".into(), s(&nt.raw));
        activity.insert("enrichment".into(), s(Enrichment::initial(nt).as_str()));
        activity.insert("deliveries".into(), n(1));
        activity.insert("lastDeliveryAt".into(), n(new.received_ms));
        activity.insert("GSI1PK".into(), s(ACTIVITIES_PARTITION));
        activity.insert(
            "GSI1SK".into(),
            s(format!("{}#{}", pad(new.received_ms), new.activity_id)),
        );
        items.push(self.put(activity, Some("attribute_not_exists(PK)"), None)?);

        if nt.needs_enrichment() {
            let job_id = ulid::Ulid::generate().to_string();
            let mut job = key(job_pk(&job_id), "JOB");
            job.insert("jobId".into(), s(&job_id));
            job.insert("kind".into(), s("fetch_message"));
            job.insert("orderId".into(), s(order));
            if let Some(m) = &nt.message_id {
                job.insert("messageId".into(), s(m.as_ref()));
            }
            job.insert("activityId".into(), s(&new.activity_id));
            job.insert("state".into(), s("pending"));
            job.insert("attempts".into(), n(0));
            job.insert("nextAttemptAt".into(), n(new.received_ms));
            job.insert("createdAt".into(), n(new.received_ms));
            job.insert("updatedAt".into(), n(new.received_ms));
            job.insert("GSI1PK".into(), s("JOBS#pending"));
            job.insert(
                "GSI1SK".into(),
                s(format!("{}#{}", pad(new.received_ms), job_id)),
            );
            items.push(self.put(job, Some("attribute_not_exists(PK)"), None)?);
        }

        let mut conflicts = 0;
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .client_request_token(&new.activity_id)
                .send()
                .await;
            let err = match result {
                Ok(_) => {
                    return Ok(Recorded {
                        activity_id: new.activity_id.clone(),
                        duplicate: false,
                        deliveries: 1,
                    });
                }
                Err(e) => e,
            };
            let reasons: Vec<String> = err
                .as_service_error()
                .and_then(|se| match se {
                    aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
                        Some(c.cancellation_reasons().iter().map(|r| r.code().unwrap_or("None").to_owned()).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let conflict = reasons.iter().any(|r| r == "TransactionConflict")
                || err.as_service_error().and_then(|e| e.code())
                    == Some("TransactionInProgressException");
            if use_dedup
                && reasons
                    .first()
                    .is_some_and(|r| r == "ConditionalCheckFailed")
            {
                return self.redelivered(&dedup_pk, new.received_ms).await;
            }
            if conflict && conflicts < 10 {
                conflicts += 1;
                tokio::time::sleep(Duration::from_millis(5 * conflicts + fastrand::u64(0..10)))
                    .await;
                continue;
            }
            return Err(unavailable(err));
        }
    }

    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), StoreError> {
        let counter = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key("QUARANTINE".into(), "COUNTER")))
            .update_expression("ADD seq :one")
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(unavailable)?;
        let seq = counter
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "seq"))
            .ok_or_else(|| corrupt("quarantine counter"))?;
        let slot = (seq as u64) % self.quarantine_max;
        let mut item = key("QUARANTINE".into(), &format!("SLOT#{slot:010}"));
        item.insert("seq".into(), n(seq));
        item.insert("receivedAt".into(), n(entry.received_ms));
        item.insert("requestId".into(), s(entry.request_id));
        item.insert("reason".into(), s(entry.reason));
        item.insert("body".into(), AttributeValue::B(Blob::new(entry.body)));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn order_activities(
        &self,
        order_id: &OrderId,
    ) -> Result<Vec<ActivityRecord>, StoreError> {
        let mut out = self
            .query_partition(activity_pk(order_id.as_ref()), None, activity_from_item)
            .await?;
        // The sort key starts with the type; the timeline is by arrival.
        out.sort_by(|a, b| (a.received_ms, &a.activity_id).cmp(&(b.received_ms, &b.activity_id)));
        Ok(out)
    }

    async fn recent_activities(
        &self,
        query: ActivityQuery,
    ) -> Result<Page<ActivityRecord>, StoreError> {
        let start = query
            .cursor
            .as_deref()
            .map(|c| decode_cursor(c, ACTIVITIES_PARTITION))
            .transpose()?;
        let limit = query.limit.max(1) as usize;
        let range = query.since_ms.map(|since| (">=", pad(since)));
        let (items, _) = self
            .query_index(
                ACTIVITIES_PARTITION,
                range,
                false,
                query.activity_type,
                start,
                limit + 1,
            )
            .await?;
        page_of(items, limit, activity_from_item)
    }

    async fn order_messages(&self, order_id: &OrderId) -> Result<Vec<MessageRecord>, StoreError> {
        let out = self
            .query_partition(
                format!("MESSAGE#{order_id}"),
                Some("message#"),
                message_from_item,
            )
            .await?;
        Ok(out)
    }

    async fn list_jobs(
        &self,
        state: JobState,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<Page<JobRecord>, StoreError> {
        let partition = format!("JOBS#{state}");
        let start = cursor
            .as_deref()
            .map(|c| decode_cursor(c, &partition))
            .transpose()?;
        let limit = limit.max(1) as usize;
        let (items, _) = self
            .query_index(&partition, None, true, None, start, limit + 1)
            .await?;
        page_of(items, limit, job_from_item)
    }

    async fn quarantined(&self, limit: u32) -> Result<Vec<QuarantineEntry>, StoreError> {
        let Some(counter) = self.get(key("QUARANTINE".into(), "COUNTER")).await? else {
            return Ok(Vec::new());
        };
        let last = get_n(&counter, "seq").unwrap_or(0);
        let oldest = (last - self.quarantine_max as i64 + 1)
            .max(1)
            .max(last - limit as i64 + 1);
        let seqs: Vec<i64> = (oldest..=last).rev().collect();
        let found: Vec<Option<QuarantineEntry>> = stream::iter(seqs)
            .map(|seq| async move {
                let slot = (seq as u64) % self.quarantine_max;
                let item = self
                    .get(key("QUARANTINE".into(), &format!("SLOT#{slot:010}")))
                    .await?;
                Ok::<_, StoreError>(item.filter(|i| get_n(i, "seq") == Some(seq)).map(|i| {
                    QuarantineEntry {
                        received_ms: get_n(&i, "receivedAt").unwrap_or(0),
                        request_id: get_s(&i, "requestId").unwrap_or_default(),
                        reason: get_s(&i, "reason").unwrap_or_default(),
                        body: match i.get("body") {
                            Some(AttributeValue::B(b)) => b.as_ref().to_vec(),
                            _ => Vec::new(),
                        },
                    }
                }))
            })
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    async fn claim_jobs(
        &self,
        now_ms: i64,
        lease: Duration,
        limit: u32,
    ) -> Result<Claim, StoreError> {
        let token = ulid::Ulid::generate().to_string();
        let until = now_ms + lease.as_millis() as i64;
        // Candidates: pending jobs whose claimable time has come. The index
        // is eventually consistent and other workers claim at the same time,
        // so each claim is a conditional write on the job itself; candidates
        // are tried in random order, and further pages are read while jobs
        // are lost to others, until `limit` are won or none are left.
        let limit = limit as usize;
        let page = (limit * 2).max(25);
        let bound = format!("{}~", pad(now_ms));
        let mut claimed: Vec<JobRecord> = Vec::new();
        let mut start = None;
        loop {
            let (mut candidates, next) = self
                .query_index(
                    "JOBS#pending",
                    Some(("<=", bound.clone())),
                    true,
                    None,
                    start,
                    page,
                )
                .await?;
            fastrand::shuffle(&mut candidates);
            let mut ids = candidates.iter().filter_map(|i| get_s(i, "jobId"));
            while claimed.len() < limit {
                let round: Vec<String> = ids.by_ref().take(limit - claimed.len()).collect();
                if round.is_empty() {
                    break;
                }
                let token_ref = token.as_str();
                let won: Vec<Option<JobRecord>> = stream::iter(round)
                    .map(|id| self.claim_one(id, token_ref, now_ms, until))
                    .buffer_unordered(PARALLEL)
                    .try_collect()
                    .await?;
                claimed.extend(won.into_iter().flatten());
            }
            match next {
                Some(k) if claimed.len() < limit => start = Some(k),
                _ => break,
            }
        }
        claimed.sort_by_key(|j| j.next_attempt_ms);
        Ok(Claim {
            token,
            jobs: claimed,
        })
    }

    async fn finish_jobs(
        &self,
        token: &str,
        now_ms: i64,
        outcomes: Vec<JobOutcome>,
    ) -> Result<(), StoreError> {
        stream::iter(outcomes)
            .map(|o| self.finish_one(token, now_ms, o))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn retry_job(&self, job_id: &str, now_ms: i64) -> Result<JobRecord, StoreError> {
        self.retry_one(job_id, now_ms).await
    }

    async fn retry_dead_jobs(&self, now_ms: i64) -> Result<u64, StoreError> {
        let (dead, _) = self
            .query_index("JOBS#dead", None, true, None, None, usize::MAX / 2)
            .await?;
        let ids: Vec<String> = dead.iter().filter_map(|i| get_s(i, "jobId")).collect();
        let results: Vec<Result<JobRecord, StoreError>> = stream::iter(ids)
            .map(|id| async move { self.retry_one(&id, now_ms).await })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut count = 0;
        for r in results {
            match r {
                Ok(_) => count += 1,
                // Retried by someone else meanwhile, or gone: not an error.
                Err(StoreError::Conflict(_) | StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(count)
    }

    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        let mut counts = JobCounts::default();
        for (state, slot) in [("pending", &mut counts.pending), ("dead", &mut counts.dead)] {
            let mut start = None;
            loop {
                let out = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .index_name(INDEX)
                    .key_condition_expression("GSI1PK = :pk")
                    .expression_attribute_values(":pk", s(format!("JOBS#{state}")))
                    .select(aws_sdk_dynamodb::types::Select::Count)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(unavailable)?;
                *slot += out.count.max(0) as u64;
                match out.last_evaluated_key {
                    Some(k) => start = Some(k),
                    None => break,
                }
            }
        }
        Ok(counts)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.get(key("PING".into(), "PING")).await.map(|_| ())
    }

    async fn close(&self) {}
}

impl DynamoStore {
    /// A redelivery: bump the original's delivery count.
    async fn redelivered(&self, dedup_pk: &str, now_ms: i64) -> Result<Recorded, StoreError> {
        let marker = self
            .get(key(dedup_pk.to_owned(), "DEDUP"))
            .await?
            .ok_or_else(|| StoreError::unavailable("dedup marker vanished"))?;
        let (pk, sk, activity_id) = (
            req_s(&marker, "activityPK")?,
            req_s(&marker, "activitySK")?,
            req_s(&marker, "activityId")?,
        );
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, &sk)))
            .update_expression("ADD deliveries :one SET lastDeliveryAt = :now")
            .condition_expression("attribute_exists(PK)")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now_ms))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(unavailable)?;
        let deliveries = out
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "deliveries"))
            .unwrap_or(2);
        Ok(Recorded {
            activity_id,
            duplicate: true,
            deliveries: deliveries.max(2) as u64,
        })
    }
}
