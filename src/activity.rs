//! Domain types of a Qualia activity notification, and the one place where raw
//! input becomes them (`Notification::parse`). Past this module no code sees an
//! unchecked string where an order id, a message id or an activity type belongs.

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

/// Longest id accepted. Qualia's ids are 17 characters; anything near this
/// bound is not an id but an attack or a bug on the sender's side.
pub const MAX_ID_CHARS: usize = 128;
/// Longest description accepted (Qualia's are one short sentence).
pub const MAX_DESCRIPTION_CHARS: usize = 4096;

/// The six kinds of activity Qualia notifies a vendor about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivityType {
    OrderRequest,
    OrderCancelled,
    OrderCompleted,
    OrderRevisionRequested,
    Message,
    Documents,
}

impl ActivityType {
    pub const ALL: [ActivityType; 6] = [
        ActivityType::OrderRequest,
        ActivityType::OrderCancelled,
        ActivityType::OrderCompleted,
        ActivityType::OrderRevisionRequested,
        ActivityType::Message,
        ActivityType::Documents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActivityType::OrderRequest => "order_request",
            ActivityType::OrderCancelled => "order_cancelled",
            ActivityType::OrderCompleted => "order_completed",
            ActivityType::OrderRevisionRequested => "order_revision_requested",
            ActivityType::Message => "message",
            ActivityType::Documents => "documents",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for ActivityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be blank")]
    Blank,
    #[error("must be at most {MAX_ID_CHARS} characters")]
    TooLong,
    #[error("must not contain control characters")]
    ControlCharacter,
}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.trim().is_empty() {
        return Err(IdError::Blank);
    }
    if s.chars().count() > MAX_ID_CHARS {
        return Err(IdError::TooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::ControlCharacter);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_id(&s)?;
                Ok(Self(s))
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

id_type!(
    /// A Qualia order id (`bK8bg5tajNkDpDk25`): not blank, at most 128
    /// characters, no control characters.
    OrderId
);
id_type!(
    /// A Qualia message id (`LEPAjMB43myH8aGcP`), same rules as an order id.
    MessageId
);

/// Why a body was refused: `NotJson` maps to 400, `Invalid` to 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("{field}: {detail}")]
    Invalid { field: &'static str, detail: String },
}

impl ParseError {
    fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        ParseError::Invalid {
            field,
            detail: detail.into(),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::NotJson(_) => "invalid_json",
            ParseError::Invalid { .. } => "invalid_notification",
        }
    }
}

/// One notification, checked. `raw` is the body exactly as received, so
/// fields Qualia may add later are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub activity_type: ActivityType,
    pub order_id: OrderId,
    pub description: String,
    pub message_id: Option<MessageId>,
    pub raw: String,
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The string value of `field`, `None` when absent or null.
fn optional_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, ParseError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ParseError::invalid(
            field,
            format!("must be a string, got {}", json_kind(other)),
        )),
    }
}

fn id_field<T>(
    obj: &Map<String, Value>,
    field: &'static str,
    parse: fn(String) -> Result<T, IdError>,
) -> Result<Option<T>, ParseError> {
    optional_str(obj, field)?
        .map(|s| parse(s.to_owned()).map_err(|e| ParseError::invalid(field, e.to_string())))
        .transpose()
}

impl Notification {
    /// Parses a webhook body. Unknown fields are accepted (and kept in `raw`).
    pub fn parse(body: &[u8]) -> Result<Self, ParseError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ParseError::invalid(
                "body",
                format!("must be a JSON object, got {}", json_kind(&value)),
            ));
        };

        let type_str = optional_str(&obj, "type")?
            .ok_or_else(|| ParseError::invalid("type", "is required"))?;
        let activity_type = ActivityType::parse(type_str).ok_or_else(|| {
            ParseError::invalid(
                "type",
                format!(
                    "unknown activity type {:?}; expected one of {}",
                    truncate_for_message(type_str),
                    ActivityType::ALL.map(ActivityType::as_str).join(", ")
                ),
            )
        })?;

        let order_id = id_field(&obj, "order_id", OrderId::parse)?
            .ok_or_else(|| ParseError::invalid("order_id", "is required"))?;
        let message_id = id_field(&obj, "message_id", MessageId::parse)?;

        let description = optional_str(&obj, "description")?.unwrap_or_default();
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(ParseError::invalid(
                "description",
                format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
            ));
        }

        // The body parsed as JSON, so it is valid UTF-8.
        let raw = String::from_utf8_lossy(body).into_owned();
        Ok(Notification {
            activity_type,
            order_id,
            description: description.to_owned(),
            message_id,
            raw,
        })
    }

    /// The key under which redeliveries of this notification are recognised.
    /// A message with an id is identified by `(order_id, message_id)` forever;
    /// anything else by `(type, order_id, description)` within the window.
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey::of(
            self.activity_type,
            self.order_id.as_ref(),
            &self.description,
            self.message_id.as_ref().map(AsRef::as_ref),
        )
    }

    /// Whether this notification needs its details fetched from Qualia.
    pub fn needs_enrichment(&self) -> bool {
        self.activity_type == ActivityType::Message && self.message_id.is_some()
    }
}

/// Identity of a notification for redelivery detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupKey {
    pub key: String,
    /// `true`: the key never expires (message ids); `false`: it lives for the
    /// dedup window.
    pub forever: bool,
}

impl DedupKey {
    /// The key of a notification with these fields (see
    /// `Notification::dedup_key`).
    pub fn of(
        activity_type: ActivityType,
        order_id: &str,
        description: &str,
        message_id: Option<&str>,
    ) -> DedupKey {
        // U+001F cannot appear in ids (control characters are refused), so the
        // parts cannot run into each other.
        match (activity_type, message_id) {
            (ActivityType::Message, Some(message_id)) => DedupKey {
                key: format!("message\u{1f}{order_id}\u{1f}{message_id}"),
                forever: true,
            },
            _ => DedupKey {
                key: format!("{activity_type}\u{1f}{order_id}\u{1f}{description}"),
                forever: false,
            },
        }
    }

    /// A fixed-length digest of the key (hex SHA-256), for stores whose keys
    /// are length-limited.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let hash = Sha256::digest(self.key.as_bytes());
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 8 bytes of the key's SHA-256 as a number: small enough to
    /// index beside an order id; a match is confirmed on the stored fields.
    pub fn short_hash(&self) -> i64 {
        use sha2::{Digest, Sha256};
        let hash = Sha256::digest(self.key.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        i64::from_be_bytes(first)
    }
}

fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Notification, ParseError> {
        Notification::parse(s.as_bytes())
    }

    fn field_of(r: Result<Notification, ParseError>) -> &'static str {
        match r {
            Err(ParseError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_sample_type() {
        for t in ActivityType::ALL {
            let n = parse(&format!(
                r#"{{"type":"{t}","order_id":"bK8bg5tajNkDpDk25","description":"d"}}"#
            ))
            .unwrap();
            assert_eq!(n.activity_type, t);
            assert_eq!(n.order_id.as_ref(), "bK8bg5tajNkDpDk25");
        }
    }

    #[test]
    fn keeps_unknown_fields_in_raw() {
        let body = r#"{"type":"documents","order_id":"o1","description":"d","extra":{"a":1}}"#;
        assert_eq!(parse(body).unwrap().raw, body);
    }

    #[test]
    fn message_id_is_checked() {
        let n =
            parse(r#"{"type":"message","order_id":"o","message_id":"LEPAjMB43myH8aGcP"}"#).unwrap();
        assert_eq!(n.message_id.unwrap().as_ref(), "LEPAjMB43myH8aGcP");
        assert_eq!(
            field_of(parse(r#"{"type":"message","order_id":"o","message_id":7}"#)),
            "message_id"
        );
        assert!(
            parse(r#"{"type":"message","order_id":"o","message_id":null}"#)
                .unwrap()
                .message_id
                .is_none()
        );
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        assert!(matches!(parse("{not json"), Err(ParseError::NotJson(_))));
        assert_eq!(field_of(parse("[1]")), "body");
        assert_eq!(field_of(parse(r#"{"order_id":"o"}"#)), "type");
        assert_eq!(field_of(parse(r#"{"type":"nope","order_id":"o"}"#)), "type");
        assert_eq!(field_of(parse(r#"{"type":5,"order_id":"o"}"#)), "type");
        assert_eq!(field_of(parse(r#"{"type":"message"}"#)), "order_id");
        assert_eq!(
            field_of(parse(r#"{"type":"message","order_id":"  "}"#)),
            "order_id"
        );
        assert_eq!(
            field_of(parse(r#"{"type":"message","order_id":12}"#)),
            "order_id"
        );
        assert_eq!(
            field_of(parse(r#"{"type":"message","order_id":"a\u0000b"}"#)),
            "order_id"
        );
        let long = "x".repeat(MAX_ID_CHARS + 1);
        assert_eq!(
            field_of(parse(&format!(
                r#"{{"type":"message","order_id":"{long}"}}"#
            ))),
            "order_id"
        );
        assert_eq!(
            field_of(parse(
                r#"{"type":"message","order_id":"o","description":[]}"#
            )),
            "description"
        );
    }

    #[test]
    fn dedup_keys_do_not_collide_across_fields() {
        let a = parse(r#"{"type":"documents","order_id":"a","description":"b c"}"#).unwrap();
        let b = parse(r#"{"type":"documents","order_id":"a b","description":"c"}"#).unwrap();
        assert_ne!(a.dedup_key(), b.dedup_key());
        let m = parse(r#"{"type":"message","order_id":"a","message_id":"m","description":"x"}"#)
            .unwrap();
        let m2 = parse(r#"{"type":"message","order_id":"a","message_id":"m","description":"y"}"#)
            .unwrap();
        assert_eq!(m.dedup_key(), m2.dedup_key());
        assert!(m.dedup_key().forever);
        assert_eq!(m.dedup_key().digest().len(), 64);
    }
}
