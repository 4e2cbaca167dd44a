//! Client of Qualia's vendor GraphQL API: the queries the service uses, typed
//! answers, and every failure sorted into a class the worker can act on.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::activity::OrderId;
use crate::config::{QualiaCredentials, QualiaSettings};
use crate::store::Attachment;

pub const SANDBOX_URL: &str = "https://sandbox-marketplace.qualia.io/api/vendor/graphql";
pub const PRODUCTION_URL: &str = "https://marketplace.qualia.io/api/vendor/graphql";

pub const MESSAGES_QUERY: &str = "query Messages { messages { order_id message_id order_number \
    from_name read text created_date attachments { _id name url tag } } }";

pub const ORDER_QUERY: &str = "query GetOrder($input: ID!) { order(_id: $input) { order { _id \
    order_number product_name product_type vertical status status_details { created_date \
    closed_date cancellation_reason revision_required_reason } customer_name due_date \
    properties { address_1 address_2 city state zipcode county } primary_document { _id name url \
    tag } additional_documents { _id name url tag } customer_files { _id name url tag } \
    activities { _id order_id created_date description customer_name activity_type order_number } \
    } outstanding_tasks } }";

pub const ORDERS_CHECK_QUERY: &str =
    "query CheckCredentials { orders(input: {limit: 1}) { orders { _id order_number status } } }";

/// Why a call to Qualia failed, sorted by what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QualiaError {
    /// Worth trying again later: timeout, connection error, 5xx, a body that
    /// is not the expected JSON, a GraphQL error that is not clearly permanent.
    #[error("Qualia call failed, will retry: {0}")]
    Retryable(String),
    /// 429: wait at least `retry_after` (when Qualia said).
    #[error("Qualia rate-limited the call{}", .retry_after.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    /// 401/403: the credentials are wrong or not allowed; nothing works until
    /// they are fixed.
    #[error("Qualia refused the credentials (HTTP {status})")]
    Auth { status: u16 },
    /// GraphQL errors that retrying the same query will not fix.
    #[error("Qualia answered with a permanent GraphQL error: {0}")]
    Permanent(String),
}

impl QualiaError {
    /// A short label for logs, metrics and a job's last error.
    pub fn class(&self) -> &'static str {
        match self {
            QualiaError::Retryable(_) => "retryable",
            QualiaError::RateLimited { .. } => "rate_limited",
            QualiaError::Auth { .. } => "auth",
            QualiaError::Permanent(_) => "permanent",
        }
    }
}

/// One message as Qualia's `messages` query returns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QualiaMessage {
    pub order_id: Option<String>,
    pub message_id: String,
    pub order_number: Option<String>,
    pub from_name: Option<String>,
    pub read: Option<bool>,
    pub text: Option<String>,
    pub created_date: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub attachments: Vec<Attachment>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// A document attached to an order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Document {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: Option<String>,
    pub url: Option<String>,
    pub tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Property {
    pub address_1: Option<String>,
    pub address_2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub zipcode: Option<String>,
    pub county: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusDetails {
    pub created_date: Option<String>,
    pub closed_date: Option<String>,
    pub cancellation_reason: Option<String>,
    pub revision_required_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderActivity {
    #[serde(rename = "_id")]
    pub id: String,
    pub order_id: Option<String>,
    pub created_date: Option<String>,
    pub description: Option<String>,
    pub customer_name: Option<String>,
    pub activity_type: Option<String>,
    pub order_number: Option<String>,
}

/// The selected fields of one order (`order(_id)`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Order {
    #[serde(rename = "_id")]
    pub id: String,
    pub order_number: Option<String>,
    pub product_name: Option<String>,
    pub product_type: Option<String>,
    pub vertical: Option<String>,
    pub status: Option<String>,
    pub status_details: Option<StatusDetails>,
    pub customer_name: Option<String>,
    pub due_date: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub properties: Vec<Property>,
    pub primary_document: Option<Document>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub additional_documents: Vec<Document>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub customer_files: Vec<Document>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub activities: Vec<OrderActivity>,
}

/// An order and its open tasks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OrderDetails {
    pub order: Order,
    #[serde(default)]
    pub outstanding_tasks: Value,
}

/// Talks to one Qualia endpoint with one set of credentials; cheap to clone
/// (the connection pool is shared).
#[derive(Clone)]
pub struct QualiaClient {
    http: reqwest::Client,
    url: String,
    authorization: HeaderValue,
}

impl std::fmt::Debug for QualiaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QualiaClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct GraphQlAnswer<T> {
    data: Option<T>,
    #[serde(default)]
    errors: Vec<GraphQlError>,
}

#[derive(Debug, Deserialize)]
struct GraphQlError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    extensions: Option<Value>,
}

/// GraphQL errors that a retry of the same query cannot fix: the query itself
/// is refused by the server's schema or validation.
fn is_permanent(e: &GraphQlError) -> bool {
    let code = e
        .extensions
        .as_ref()
        .and_then(|x| x.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("");
    matches!(
        code,
        "GRAPHQL_PARSE_FAILED" | "GRAPHQL_VALIDATION_FAILED" | "BAD_USER_INPUT"
    ) || e.message.starts_with("Cannot query field")
        || e.message.starts_with("Syntax Error")
        || e.message.starts_with("Unknown argument")
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_to_system_time(v)?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

fn httpdate_to_system_time(v: &str) -> Option<std::time::SystemTime> {
    // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT".
    let rest = v.split_once(", ")?.1.strip_suffix(" GMT")?;
    let mut parts = rest.split(' ');
    let (day, month, year, time) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? + 1;
    let rfc3339 = format!("{year}-{month:02}-{day:0>2}T{time}Z");
    humantime::parse_rfc3339(&rfc3339).ok()
}

impl QualiaClient {
    /// A client for the configured endpoint; `None` without credentials.
    pub fn new(settings: &QualiaSettings) -> Result<Option<Self>, String> {
        let Some(credentials) = &settings.credentials else {
            return Ok(None);
        };
        Self::with_credentials(&settings.url, credentials, settings.timeout).map(Some)
    }

    pub fn with_credentials(
        url: &str,
        credentials: &QualiaCredentials,
        timeout: Duration,
    ) -> Result<Self, String> {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            credentials.username,
            credentials.password.expose()
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
            "the Qualia credentials contain characters not allowed in a header".to_owned()
        })?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("qualia-webhook/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(QualiaClient {
            http,
            url: url.to_owned(),
            authorization,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one GraphQL query and returns its `data`.
    async fn query<T: DeserializeOwned>(
        &self,
        query: &str,
        variables: Value,
    ) -> Result<T, QualiaError> {
        let res = self
            .http
            .post(&self.url)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .map_err(|e| {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "request failed"
                };
                QualiaError::Retryable(format!("{kind}: {}", crate::http::error::chain(&e)))
            })?;
        let status = res.status();
        match status.as_u16() {
            401 | 403 => {
                return Err(QualiaError::Auth {
                    status: status.as_u16(),
                });
            }
            429 => {
                return Err(QualiaError::RateLimited {
                    retry_after: retry_after(res.headers()),
                });
            }
            200..=299 => {}
            code => return Err(QualiaError::Retryable(format!("HTTP {code}"))),
        }
        let body = res
            .bytes()
            .await
            .map_err(|e| QualiaError::Retryable(format!("reading the answer failed: {e}")))?;
        let answer: GraphQlAnswer<T> = serde_json::from_slice(&body)
            .map_err(|e| QualiaError::Retryable(format!("malformed answer: {e}")))?;
        match (answer.data, answer.errors) {
            (Some(data), _) => Ok(data),
            (None, errors) if errors.is_empty() => Err(QualiaError::Retryable(
                "answer without data or errors".into(),
            )),
            (None, errors) => {
                let text = errors
                    .iter()
                    .map(|e| e.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                if errors.iter().all(is_permanent) {
                    Err(QualiaError::Permanent(text))
                } else {
                    Err(QualiaError::Retryable(format!("GraphQL errors: {text}")))
                }
            }
        }
    }

    /// Every message visible to the vendor (`messages`).
    pub async fn messages(&self) -> Result<Vec<QualiaMessage>, QualiaError> {
        #[derive(Deserialize)]
        struct Data {
            messages: Option<Vec<Value>>,
        }
        let data: Data = self.query(MESSAGES_QUERY, json!({})).await?;
        // One odd entry must not hide all the others.
        Ok(data
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| serde_json::from_value(m).ok())
            .collect())
    }

    /// One order (`order(_id)`); `None` when Qualia knows no such order.
    pub async fn order(&self, order_id: &OrderId) -> Result<Option<OrderDetails>, QualiaError> {
        #[derive(Deserialize)]
        struct Data {
            order: Option<OrderDetails>,
        }
        let data: Data = self
            .query(ORDER_QUERY, json!({ "input": order_id.as_ref() }))
            .await?;
        Ok(data.order)
    }

    /// The cheapest authenticated query (`orders(input:{limit:1})`): succeeds
    /// when the endpoint answers and accepts the credentials.
    pub async fn check_credentials(&self) -> Result<(), QualiaError> {
        let _: Value = self.query(ORDERS_CHECK_QUERY, json!({})).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&h), None, "a date in the past means no wait");
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Fri, 01 Jan 2100 00:00:00 GMT"),
        );
        assert!(retry_after(&h).is_some_and(|d| d > Duration::from_secs(86_400)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn permanent_graphql_errors() {
        let e = |m: &str, code: Option<&str>| GraphQlError {
            message: m.into(),
            extensions: code.map(|c| json!({ "code": c })),
        };
        assert!(is_permanent(&e(
            "Cannot query field \"x\" on type \"Query\".",
            None
        )));
        assert!(is_permanent(&e(
            "whatever",
            Some("GRAPHQL_VALIDATION_FAILED")
        )));
        assert!(!is_permanent(&e("Internal server error", None)));
        assert!(!is_permanent(&e("timeout", Some("INTERNAL_SERVER_ERROR"))));
    }
}
