//! The domain's own types: what an event id, a consumer and an event are.
//!
//! Everything else builds on these, and this module imports nothing from the crate, so that the
//! database layer, the wire format and the HTTP API can all share them without depending on each
//! other. A value of these types has been validated once, where it entered the service.

use std::fmt;
use std::sync::Arc;

/// An event's id: its position in the one order every consumer sees. Ids grow with time but
/// are not dense (a rolled-back insert leaves a hole).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct EventId(pub i64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The longest consumer id accepted, in bytes.
pub const MAX_CONSUMER_ID_BYTES: usize = 256;

/// Who events are addressed to (the `subscriber` column): 1 to 256 bytes of UTF-8 without
/// control characters, whether it came from a header, the query string, a token or a publish
/// body. Cheap to clone: every stream of a consumer shares the same text.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ConsumerId(Arc<str>);

/// Why a consumer id was refused, as a short reason ("empty", "not UTF-8", ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConsumerId(&'static str);

impl ConsumerId {
    pub fn parse(raw: &[u8]) -> Result<ConsumerId, InvalidConsumerId> {
        if raw.is_empty() {
            return Err(InvalidConsumerId("empty"));
        }
        if raw.len() > MAX_CONSUMER_ID_BYTES {
            return Err(InvalidConsumerId("longer than 256 bytes"));
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            return Err(InvalidConsumerId("not UTF-8"));
        };
        if text.chars().any(char::is_control) {
            return Err(InvalidConsumerId("contains control characters"));
        }
        Ok(ConsumerId(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A token's `sub` is a consumer id, checked when the token is decoded.
impl TryFrom<String> for ConsumerId {
    type Error = InvalidConsumerId;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        ConsumerId::parse(text.as_bytes())
    }
}

impl From<ConsumerId> for String {
    fn from(consumer: ConsumerId) -> String {
        consumer.0.as_ref().to_owned()
    }
}

/// Lets a map keyed by consumer be looked up with a row's `&str`.
impl std::borrow::Borrow<str> for ConsumerId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One event to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_type: String,
    /// None broadcasts to every consumer.
    pub subscriber: Option<ConsumerId>,
    /// The payload as JSON text.
    pub payload: String,
    /// Topics, the first canonical (None: addressed by `subscriber` only).
    pub topics: Option<Vec<String>>,
    /// Only streams whose token grants one of its topics receive it through them.
    pub private: bool,
    /// A Mercure publisher's own id for the event, sent as its SSE id on the Mercure endpoint.
    pub update_id: Option<String>,
    /// The SSE `retry:` a Mercure publisher asked for, in milliseconds.
    pub retry: Option<i32>,
}

impl NewEvent {
    /// An event addressed as before topics: to a consumer, or a broadcast.
    pub fn to_consumer(
        event_type: String,
        subscriber: Option<ConsumerId>,
        payload: String,
    ) -> Self {
        NewEvent {
            event_type,
            subscriber,
            payload,
            topics: None,
            private: false,
            update_id: None,
            retry: None,
        }
    }
}

/// One stored event, as read for delivery.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: EventId,
    pub event_type: String,
    /// None for a broadcast. Rows are read back as stored: a consumer id written over SQL is
    /// not validated, and needs not be to be routed.
    pub subscriber: Option<String>,
    /// PostgreSQL's text form of the jsonb payload.
    pub payload: String,
    pub topics: Option<Vec<String>>,
    pub private: bool,
    pub update_id: Option<String>,
    pub retry: Option<i32>,
}

impl EventRow {
    /// A row addressed to `subscriber` only, as before topics (tests, benches).
    pub fn to_consumer(
        id: EventId,
        event_type: &str,
        subscriber: Option<&str>,
        payload: &str,
    ) -> Self {
        EventRow {
            id,
            event_type: event_type.to_owned(),
            subscriber: subscriber.map(str::to_owned),
            payload: payload.to_owned(),
            topics: None,
            private: false,
            update_id: None,
            retry: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_ids_are_checked_once() {
        assert_eq!(ConsumerId::parse(b"toto").unwrap().as_str(), "toto");
        assert_eq!(ConsumerId::parse("é".as_bytes()).unwrap().as_str(), "é");
        let reason = |raw: &[u8]| ConsumerId::parse(raw).unwrap_err().to_string();
        assert_eq!(reason(b""), "empty");
        assert_eq!(reason(&[b'x'; 257]), "longer than 256 bytes");
        assert_eq!(reason(b"\xff"), "not UTF-8");
        assert_eq!(reason(b"a\tb"), "contains control characters");
        assert!(ConsumerId::parse(&[b'x'; 256]).is_ok());
    }
}
