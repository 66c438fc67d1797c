//! Publishing over HTTP: the JSON body of `POST /events`, validated into rows to insert.
//!
//! The same rules as the schema, checked up front so that a client gets a precise one-line reason
//! instead of a database error, and so that nothing is inserted unless every event is valid.

use serde_json::{Map, Value};

use crate::event::{ConsumerId, NewEvent};

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
    // Required even when null: a forgotten subscriber must not turn into a broadcast.
    let subscriber = match take(&mut fields, "subscriber")? {
        Value::Null => None,
        Value::String(text) => Some(
            ConsumerId::parse(text.as_bytes())
                .map_err(|_| "\"subscriber\" must be 1 to 256 bytes without control characters")?,
        ),
        _ => return Err("\"subscriber\" must be a string or null".into()),
    };
    let payload = take(&mut fields, "payload")?.to_string();
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("unknown field {unknown:?}"));
    }
    Ok(NewEvent {
        event_type,
        subscriber,
        payload,
    })
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
            vec![NewEvent {
                event_type: "t".into(),
                subscriber: ConsumerId::parse(b"toto").ok(),
                payload: r#"{"a":[1]}"#.into(),
            }]
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
    }
}
