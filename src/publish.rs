//! Publishing over HTTP: the JSON body of `POST /events`, validated into rows to insert.
//!
//! The same rules as the schema, checked up front so that a client gets a precise one-line reason
//! instead of a database error, and so that nothing is inserted unless every event is valid.

use serde_json::{Map, Value};

use crate::event::{ConsumerId, NewEvent};
use crate::topic::{MAX_TOPICS, check_text};

/// The longest event type accepted, in bytes.
pub const MAX_TYPE_BYTES: usize = 256;

/// Parses a body that is one event object or a non-empty array of them. The error is a one-line
/// reason for the client.
pub fn parse_body(body: &[u8]) -> Result<Vec<NewEvent>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    match value {
        Value::Array(items) if items.is_empty() => {
            Err("empty batch: send at least one event".into())
        }
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| parse_event(item).map_err(|why| format!("event {index}: {why}")))
            .collect(),
        item => parse_event(item).map(|event| vec![event]),
    }
}

fn parse_event(item: Value) -> Result<NewEvent, String> {
    let Value::Object(mut fields) = item else {
        return Err(
            "expected an object {\"type\": ..., \"subscriber\": ... | null, \"payload\": ...}"
                .into(),
        );
    };
    let event_type = match take(&mut fields, "type")? {
        Value::String(text) => validate_type(text)?,
        _ => return Err("\"type\" must be a string".into()),
    };
    let topics = match fields.remove("topics") {
        None | Some(Value::Null) => None,
        Some(value) => Some(parse_topics(value)?),
    };
    let private = match fields.remove("private") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(private)) => private,
        Some(_) => return Err("\"private\" must be true or false".into()),
    };
    if private && topics.is_none() {
        return Err(
            "\"private\" needs \"topics\": it decides who reads an event through them".into(),
        );
    }
    // Required even when null, unless topics address the event: a forgotten subscriber must not
    // turn into a broadcast.
    let subscriber = match fields.remove("subscriber") {
        None if topics.is_some() => None,
        None => return Err("missing field \"subscriber\"".into()),
        Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            ConsumerId::parse(text.as_bytes())
                .map_err(|_| "\"subscriber\" must be 1 to 256 bytes without control characters")?,
        ),
        Some(_) => return Err("\"subscriber\" must be a string or null".into()),
    };
    let payload = take(&mut fields, "payload")?;
    if contains_nul(&payload) {
        return Err(NUL_IN_PAYLOAD.into());
    }
    let payload = payload.to_string();
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("unknown field {unknown:?}"));
    }
    Ok(NewEvent {
        topics,
        private,
        ..NewEvent::to_consumer(event_type, subscriber, payload)
    })
}

/// An event's topics: 1 to [`MAX_TOPICS`] strings, the first canonical. `*` is every topic's
/// matcher, so no event may be addressed to it.
pub fn parse_topics(value: Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err("\"topics\" must be an array of strings".into());
    };
    if items.is_empty() || items.len() > MAX_TOPICS {
        return Err(format!("\"topics\" must hold 1 to {MAX_TOPICS} topics"));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::String(topic) => check_topic(topic),
            _ => Err("\"topics\" must be an array of strings".into()),
        })
        .collect()
}

/// A topic an event may be addressed to.
pub fn check_topic(topic: String) -> Result<String, String> {
    check_text("a topic", &topic).map_err(|why| why.0)?;
    if topic == "*" {
        return Err("the topic \"*\" is reserved: it matches every topic".into());
    }
    Ok(topic)
}

/// Why a payload with U+0000 is refused.
const NUL_IN_PAYLOAD: &str =
    "\"payload\" may not contain U+0000 (PostgreSQL's jsonb cannot store it)";

/// Whether a string of `value`, or a key, holds U+0000: PostgreSQL's jsonb refuses it, so a
/// payload (or a containment filter) with one is refused up front rather than by the database.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key.contains('\0') || contains_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn take(fields: &mut Map<String, Value>, name: &str) -> Result<Value, String> {
    fields
        .remove(name)
        .ok_or_else(|| format!("missing field {name:?}"))
}

fn validate_type(text: String) -> Result<String, String> {
    if text.is_empty() || text.len() > MAX_TYPE_BYTES {
        return Err(format!("\"type\" must be 1 to {MAX_TYPE_BYTES} bytes"));
    }
    if text.chars().any(char::is_control) {
        return Err("\"type\" must not contain control characters".into());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(body: &str) -> String {
        parse_body(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn one_event_or_a_batch() {
        let one =
            parse_body(br#"{"type": "t", "subscriber": "toto", "payload": {"a": [1]}}"#).unwrap();
        assert_eq!(
            one,
            vec![NewEvent::to_consumer(
                "t".into(),
                ConsumerId::parse(b"toto").ok(),
                r#"{"a":[1]}"#.into(),
            )]
        );
        let batch = parse_body(
            br#"[{"type": "a", "subscriber": null, "payload": 1},
                 {"type": "b", "subscriber": "x", "payload": null}]"#,
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].subscriber, None);
        assert_eq!(batch[1].payload, "null");
    }

    #[test]
    fn invalid_bodies_say_why() {
        assert!(reason("{").starts_with("malformed JSON"));
        assert_eq!(reason("[]"), "empty batch: send at least one event");
        assert!(reason("42").starts_with("expected an object"));
        assert_eq!(
            reason(r#"{"subscriber": null, "payload": 1}"#),
            "missing field \"type\""
        );
        assert_eq!(
            reason(r#"{"type": "t", "payload": 1}"#),
            "missing field \"subscriber\""
        );
        assert_eq!(
            reason(r#"{"type": "t", "subscriber": null}"#),
            "missing field \"payload\""
        );
        assert_eq!(
            reason(r#"{"type": "", "subscriber": null, "payload": 1}"#),
            "\"type\" must be 1 to 256 bytes"
        );
        assert!(
            reason(r#"{"type": "a\nb", "subscriber": null, "payload": 1}"#).contains("control")
        );
        assert!(reason(r#"{"type": 1, "subscriber": null, "payload": 1}"#).contains("string"));
        assert!(
            reason(r#"{"type": "t", "subscriber": 5, "payload": 1}"#).contains("string or null")
        );
        assert_eq!(
            reason(r#"{"type": "t", "subscriber": null, "payload": 1, "id": 3}"#),
            "unknown field \"id\""
        );
        assert!(
            reason(r#"[{"type": "t", "subscriber": null, "payload": 1}, 7]"#)
                .starts_with("event 1:")
        );
        assert!(reason(r#"{"type": "t", "topics": [], "payload": 1}"#).contains("1 to 32"));
        assert!(reason(r#"{"type": "t", "topics": ["*"], "payload": 1}"#).contains("reserved"));
        assert!(reason(r#"{"type": "t", "topics": [1], "payload": 1}"#).contains("strings"));
        assert!(
            reason(r#"{"type": "t", "subscriber": null, "private": true, "payload": 1}"#)
                .contains("needs \"topics\"")
        );
    }

    #[test]
    fn topics_address_an_event_without_a_subscriber() {
        let events = parse_body(
            br#"{"type": "t", "topics": ["room/1", "users/7"], "private": true, "payload": 1}"#,
        )
        .unwrap();
        assert_eq!(events[0].subscriber, None);
        assert_eq!(
            events[0].topics.as_deref(),
            Some(&["room/1".to_owned(), "users/7".to_owned()][..])
        );
        assert!(events[0].private);
    }
}
