//! The Server-Sent Events wire format: frames rendered once into shared bytes.
//!
//! axum's `Sse`/`Event` render an event per response, which would copy every payload once per
//! open stream. The hub renders each event exactly once here, and every stream that carries it
//! sends the same reference-counted `Bytes`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::{EventId, EventRow};
use crate::selection::Address;

/// A rendered event: its id (for ordering and de-duplication) and its bytes on the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: EventId,
    pub bytes: Bytes,
    /// Where the event is addressed, and its other renderings; one allocation per event, shared
    /// by every stream that carries it.
    meta: Arc<Meta>,
    /// Where the type is in `bytes`, so a stream's type filter reads it without parsing.
    type_at: (u32, u32),
}

#[derive(Debug, Default)]
struct Meta {
    /// The same event in [`Format::Envelope`] and [`Format::Mercure`], rendered by the first
    /// stream that sends it in that format and shared with the others, like `bytes`.
    envelope: OnceLock<Bytes>,
    mercure: OnceLock<Bytes>,
    subscriber: Option<String>,
    topics: Option<Vec<String>>,
    private: bool,
    update_id: Option<String>,
    retry: Option<i32>,
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.id == other.id && self.bytes == other.bytes
    }
}

impl Frame {
    /// Renders `id:`, `event:` and `data:` lines. `payload` is PostgreSQL's text form of a jsonb
    /// value; it is sent compact (no whitespace outside strings). The schema forbids line breaks
    /// in `event_type`, but a type from a database whose schema is managed elsewhere might have
    /// them, so they are replaced rather than allowed to break the framing. The frame is a
    /// broadcast; [`Frame::from_row`] keeps a row's address.
    pub fn render(id: EventId, event_type: &str, payload: &str) -> Frame {
        Frame::with_meta(id, event_type, payload, Meta::default())
    }

    /// Renders a row read from the table, keeping where it is addressed.
    pub fn from_row(row: EventRow) -> Frame {
        let meta = Meta {
            subscriber: row.subscriber,
            topics: row.topics,
            private: row.private,
            update_id: row.update_id,
            retry: row.retry,
            ..Meta::default()
        };
        Frame::with_meta(row.id, &row.event_type, &row.payload, meta)
    }

    fn with_meta(id: EventId, event_type: &str, payload: &str, meta: Meta) -> Frame {
        let mut buf = BytesMut::with_capacity(32 + event_type.len() + payload.len());
        let at = put_event(&mut buf, id, event_type, payload);
        let type_at = (at.start as u32, at.end as u32);
        Frame {
            id,
            bytes: buf.freeze(),
            meta: Arc::new(meta),
            type_at,
        }
    }

    /// The event's id, type and compact payload, as rendered (webhooks send them as JSON).
    pub fn parts(&self) -> Option<(EventId, &str, &str)> {
        split_named(&self.bytes)
    }

    /// The event's type, as sent.
    pub fn event_type(&self) -> &str {
        let (start, end) = self.type_at;
        std::str::from_utf8(&self.bytes[start as usize..end as usize]).unwrap_or_default()
    }

    /// Where the event is addressed.
    pub fn address(&self) -> Address<'_> {
        Address {
            subscriber: self.meta.subscriber.as_deref(),
            topics: self.meta.topics.as_deref(),
            private: self.meta.private,
        }
    }
}

/// Appends one event's frame to `buf` (see [`Frame::render`]); a replay renders a whole page into
/// one buffer this way, so that a page costs one write instead of one per event. Returns where
/// the type is in `buf`.
pub fn put_event(
    buf: &mut BytesMut,
    id: EventId,
    event_type: &str,
    payload: &str,
) -> std::ops::Range<usize> {
    buf.reserve(32 + event_type.len() + payload.len());
    buf.put_slice(b"id: ");
    buf.put_slice(itoa::Buffer::new().format(id.0).as_bytes());
    buf.put_slice(b"\nevent: ");
    let type_start = buf.len();
    if event_type.contains(['\r', '\n']) {
        buf.put_slice(event_type.replace(['\r', '\n'], " ").as_bytes());
    } else {
        buf.put_slice(event_type.as_bytes());
    }
    let type_at = type_start..buf.len();
    buf.put_slice(b"\ndata: ");
    put_compact_json(buf, payload);
    buf.put_slice(b"\n\n");
    type_at
}

/// How a stream writes events. Browsers' `EventSource` fires `onmessage` only for frames without
/// an `event:` line and offers no listener for "any type", so a page that shows every type asks
/// for the envelope (`GET /events?envelope=true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `id:`, `event:` type, `data:` payload: the default, as EventPiper sends it.
    #[default]
    Named,
    /// `id:` and `data: {"type": ..., "payload": ...}`, no `event:` line.
    Envelope,
    /// Mercure's: the publisher's id (else `#` and the event's id), `event:` only for a type
    /// other than `message`, the publisher's `retry:`, and the data one `data:` line per line
    /// (a JSON string payload is sent as its text, any other payload as compact JSON).
    Mercure,
}

impl Format {
    /// Appends one row (a replay renders its page through this).
    pub fn put_row(self, buf: &mut BytesMut, row: &EventRow) {
        match self {
            Format::Named => {
                put_event(buf, row.id, &row.event_type, &row.payload);
            }
            Format::Envelope => put_envelope(buf, Some(row.id), &row.event_type, &row.payload),
            Format::Mercure => put_mercure(
                buf,
                row.id,
                row.update_id.as_deref(),
                &row.event_type,
                row.retry,
                &row.payload,
            ),
        }
    }

    /// A live frame as this stream sends it. The hub renders every frame once in the named
    /// format; its other formats are rendered from that at most once, whatever the number of
    /// streams.
    pub fn live(self, frame: Frame) -> Bytes {
        let cell = match self {
            Format::Named => return frame.bytes,
            Format::Envelope => &frame.meta.envelope,
            Format::Mercure => &frame.meta.mercure,
        };
        cell.get_or_init(|| {
            let Some((id, event_type, data)) = split_named(&frame.bytes) else {
                return frame.bytes.clone();
            };
            let mut buf = BytesMut::with_capacity(frame.bytes.len() + 24);
            // `data` is already compact: the compaction finds nothing to strip.
            match self {
                Format::Mercure => put_mercure(
                    &mut buf,
                    id,
                    frame.meta.update_id.as_deref(),
                    event_type,
                    frame.meta.retry,
                    data,
                ),
                _ => put_envelope(&mut buf, Some(id), event_type, data),
            }
            buf.freeze()
        })
        .clone()
    }

    /// The notice a stream ends with when its token expires (`token_expired`) or it reached
    /// `--max-stream-lifetime`: without an `id:` line, so the client resumes where it was.
    pub fn ending(self, token_expired: bool) -> Bytes {
        let (event, data) = if token_expired {
            (
                TOKEN_EXPIRED_EVENT,
                r#"{"reason":"the token expired: reconnect with a new one"}"#,
            )
        } else {
            (
                LIFETIME_EVENT,
                r#"{"reason":"the stream reached its maximum lifetime: reconnect"}"#,
            )
        };
        let mut buf = BytesMut::new();
        match self {
            Format::Named | Format::Mercure => {
                buf.put_slice(format!("event: {event}\ndata: {data}\n\n").as_bytes())
            }
            Format::Envelope => put_envelope(&mut buf, None, event, data),
        }
        buf.freeze()
    }

    /// The notice a resuming client gets when retention deleted events after its resume point:
    /// an event without an `id:` line, so it does not move the client's Last-Event-ID.
    pub fn truncated(self, last_event_id: EventId, deleted_upto: EventId) -> Bytes {
        let data = format!("{{\"last_event_id\":{last_event_id},\"deleted_upto\":{deleted_upto}}}");
        let mut buf = BytesMut::new();
        match self {
            Format::Named | Format::Mercure => {
                buf.put_slice(format!("event: {TRUNCATED_EVENT}\ndata: {data}\n\n").as_bytes())
            }
            Format::Envelope => put_envelope(&mut buf, None, TRUNCATED_EVENT, &data),
        }
        buf.freeze()
    }
}

fn put_envelope(buf: &mut BytesMut, id: Option<EventId>, event_type: &str, payload: &str) {
    buf.reserve(48 + event_type.len() + payload.len());
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        buf.put_slice(itoa::Buffer::new().format(id.0).as_bytes());
        buf.put_slice(b"\n");
    }
    buf.put_slice(b"data: {\"type\":");
    // A JSON string escapes line breaks, so any type is safe inside the data line.
    let quoted = serde_json::Value::from(event_type).to_string();
    buf.put_slice(quoted.as_bytes());
    buf.put_slice(b",\"payload\":");
    put_compact_json(buf, payload);
    buf.put_slice(b"}\n\n");
}

/// The id a Mercure subscriber sees for an event: its publisher's, else `#` and the event's id
/// (the draft asks a hub's own ids to be IRIs or fragments).
pub fn mercure_id(id: EventId, update_id: Option<&str>) -> String {
    match update_id {
        Some(update_id) => update_id.to_owned(),
        None => format!("#{id}"),
    }
}

/// The Mercure event type of a publish request without `type`: an `EventSource` delivers it to
/// `onmessage`, so the frame carries no `event:` line.
pub const DEFAULT_TYPE: &str = "message";

fn put_mercure(
    buf: &mut BytesMut,
    id: EventId,
    update_id: Option<&str>,
    event_type: &str,
    retry: Option<i32>,
    payload: &str,
) {
    buf.reserve(48 + event_type.len() + payload.len());
    buf.put_slice(b"id: ");
    put_line(buf, &mercure_id(id, update_id));
    if event_type != DEFAULT_TYPE {
        buf.put_slice(b"event: ");
        put_line(buf, event_type);
    }
    if let Some(retry) = retry.filter(|retry| *retry >= 0) {
        buf.put_slice(b"retry: ");
        buf.put_slice(itoa::Buffer::new().format(retry).as_bytes());
        buf.put_slice(b"\n");
    }
    // A string payload is Mercure's `data` as published; anything else is sent as JSON.
    let text = match payload.trim_start().starts_with('"') {
        true => serde_json::from_str::<String>(payload).ok(),
        false => None,
    };
    match text {
        Some(text) => {
            for line in text.split("\r\n").flat_map(|line| line.split(['\r', '\n'])) {
                buf.put_slice(b"data: ");
                buf.put_slice(line.as_bytes());
                buf.put_slice(b"\n");
            }
        }
        None => {
            buf.put_slice(b"data: ");
            put_compact_json(buf, payload);
            buf.put_slice(b"\n");
        }
    }
    buf.put_slice(b"\n");
}

/// One field's value and its line end; a line break in the value cannot end the field early.
fn put_line(buf: &mut BytesMut, value: &str) {
    if value.contains(['\r', '\n']) {
        buf.put_slice(value.replace(['\r', '\n'], " ").as_bytes());
    } else {
        buf.put_slice(value.as_bytes());
    }
    buf.put_slice(b"\n");
}

/// Takes a frame rendered by [`put_event`] apart: id, type, compact payload.
fn split_named(frame: &[u8]) -> Option<(EventId, &str, &str)> {
    let text = std::str::from_utf8(frame).ok()?;
    let rest = text.strip_prefix("id: ")?;
    let (id, rest) = rest.split_once("\nevent: ")?;
    let (event_type, rest) = rest.split_once("\ndata: ")?;
    let data = rest.strip_suffix("\n\n")?;
    Some((EventId(id.parse().ok()?), event_type, data))
}

/// The `retry:` hint sent first on every stream.
pub fn retry(delay: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", delay.as_millis()))
}

/// The event type of the retention notice.
pub const TRUNCATED_EVENT: &str = "event-piper.truncated";
/// The notice before a stream ends because its token expired.
pub const TOKEN_EXPIRED_EVENT: &str = "event-piper.token-expired";
/// The notice before a stream ends because it reached `--max-stream-lifetime`.
pub const LIFETIME_EVENT: &str = "event-piper.stream-lifetime";

/// A comment line: ignored by clients, but it keeps proxies and idle-timeouts from closing the
/// stream and lets a client tell a live stream from a dead one.
pub const HEARTBEAT: Bytes = Bytes::from_static(b":\n\n");

/// Copies JSON text without the whitespace between tokens. The input is valid JSON (PostgreSQL
/// rendered it), so tracking string literals and their escapes is all it takes; line breaks can
/// only occur as whitespace between tokens, since JSON strings escape them.
pub fn put_compact_json(buf: &mut BytesMut, json: &str) {
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    let bytes = json.as_bytes();
    for (i, &byte) in bytes.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b' ' | b'\n' | b'\r' | b'\t' => {
                    buf.put_slice(&bytes[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
    }
    buf.put_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &Frame) -> &str {
        std::str::from_utf8(&frame.bytes).unwrap()
    }

    #[test]
    fn renders_the_walkthrough_frame() {
        let frame = Frame::render(EventId(1), "insert", r#"{"foo": "bar"}"#);
        assert_eq!(
            text(&frame),
            "id: 1\nevent: insert\ndata: {\"foo\":\"bar\"}\n\n"
        );
        assert_eq!(frame.event_type(), "insert");
        let long_id = Frame::render(EventId(1234567), "a\nb", "1");
        assert_eq!(long_id.event_type(), "a b");
    }

    #[test]
    fn keeps_whitespace_and_escapes_inside_strings() {
        let frame = Frame::render(
            EventId(42),
            "t",
            r#"{"a b": [1, 2, {"c": "x \" y\\"}], "d": "line\nbreak"}"#,
        );
        assert_eq!(
            text(&frame),
            "id: 42\nevent: t\ndata: {\"a b\":[1,2,{\"c\":\"x \\\" y\\\\\"}],\"d\":\"line\\nbreak\"}\n\n"
        );
    }

    #[test]
    fn line_breaks_in_types_cannot_break_framing() {
        let frame = Frame::render(EventId(7), "a\nb\rc", "null");
        assert_eq!(text(&frame), "id: 7\nevent: a b c\ndata: null\n\n");
    }

    #[test]
    fn envelope_carries_the_type_in_the_data() {
        let frame = Frame::render(EventId(3), "say \"hi\"", r#"{"foo": "bar"}"#);
        let live = Format::Envelope.live(frame.clone());
        let expected =
            "id: 3\ndata: {\"type\":\"say \\\"hi\\\"\",\"payload\":{\"foo\":\"bar\"}}\n\n";
        assert_eq!(std::str::from_utf8(&live).unwrap(), expected);
        // A replayed page renders the same bytes as the live path.
        let mut replayed = BytesMut::new();
        let row = EventRow::to_consumer(EventId(3), "say \"hi\"", None, r#"{"foo": "bar"}"#);
        Format::Envelope.put_row(&mut replayed, &row);
        assert_eq!(&replayed[..], expected.as_bytes());
        // Rendered once: another stream sending the same frame gets the same bytes.
        let again = Format::Envelope.live(frame);
        assert_eq!(again.as_ptr(), live.as_ptr());
    }

    #[test]
    fn truncated_notice_has_no_id_in_either_format() {
        let named = Format::Named.truncated(EventId(5), EventId(9));
        assert_eq!(
            &named[..],
            b"event: event-piper.truncated\ndata: {\"last_event_id\":5,\"deleted_upto\":9}\n\n"
        );
        let envelope = Format::Envelope.truncated(EventId(5), EventId(9));
        assert_eq!(
            &envelope[..],
            b"data: {\"type\":\"event-piper.truncated\",\"payload\":{\"last_event_id\":5,\"deleted_upto\":9}}\n\n"
        );
    }

    #[test]
    fn mercure_frames() {
        let mut row = EventRow::to_consumer(EventId(4), DEFAULT_TYPE, None, r#""a\n\nb\r\nc""#);
        let mut buf = BytesMut::new();
        Format::Mercure.put_row(&mut buf, &row);
        assert_eq!(&buf[..], b"id: #4\ndata: a\ndata: \ndata: b\ndata: c\n\n");
        row.update_id = Some("urn:x".into());
        row.event_type = "changed".into();
        row.retry = Some(500);
        let live = Format::Mercure.live(Frame::from_row(row.clone()));
        let mut replayed = BytesMut::new();
        Format::Mercure.put_row(&mut replayed, &row);
        assert_eq!(&live[..], &replayed[..]);
        assert_eq!(
            &live[..],
            b"id: urn:x\nevent: changed\nretry: 500\ndata: a\ndata: \ndata: b\ndata: c\n\n"
        );
        // A JSON object goes out as compact JSON on one line.
        let object = EventRow::to_consumer(EventId(5), "t", None, r#"{"a": [1, 2]}"#);
        let mut buf = BytesMut::new();
        Format::Mercure.put_row(&mut buf, &object);
        assert_eq!(&buf[..], b"id: #5\nevent: t\ndata: {\"a\":[1,2]}\n\n");
    }
}
