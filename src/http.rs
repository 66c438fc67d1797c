//! HTTP: the routes, request parsing, and the mapping of errors to responses (in one place).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::stream::Streams;

/// The longest consumer id accepted, in bytes.
pub const MAX_CONSUMER_ID_BYTES: usize = 256;

const CONSUMER_HEADER: HeaderName = HeaderName::from_static("x-consumer-id");
const LAST_EVENT_ID_HEADER: HeaderName = HeaderName::from_static("last-event-id");

/// A request the service refuses, with the status and one-line reason the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// Temporarily unable to serve; the client should retry after the given number of seconds.
    #[error("{reason}")]
    Unavailable { reason: String, retry_after: u64 },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // One line, whatever the underlying error's text looks like.
        let body = format!("{}\n", self.to_string().lines().next().unwrap_or_default());
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, body).into_response(),
            ApiError::Unavailable { retry_after, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, retry_after.to_string())],
                body,
            )
                .into_response(),
        }
    }
}

pub fn routes(streams: Arc<Streams>) -> Router {
    Router::new()
        .route("/events", get(events))
        .route("/ready", get(ready))
        .with_state(streams)
}

/// `GET /ready`: 200 once the hub has its starting point and the notification connection is
/// listening, 503 before that and while it reconnects.
async fn ready(State(streams): State<Arc<Streams>>) -> Response {
    let published = *streams.published.borrow();
    let listening = *streams.listening.borrow();
    let status = if published.is_some() && listening {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": status == StatusCode::OK,
        "listening": listening,
        "published": published,
    });
    (status, axum::Json(body)).into_response()
}

/// `GET /events`: the consumer's event stream.
async fn events(
    State(streams): State<Arc<Streams>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let consumer = consumer_id(&headers)?;
    let cursor = last_event_id(&headers)?;
    let stream = streams
        .open(consumer, cursor)
        .await
        .map_err(|error| ApiError::Unavailable {
            reason: error.to_string(),
            retry_after: streams.retry.as_secs().max(1),
        })?;
    let body = Body::from_stream(stream);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Tells nginx-style proxies not to buffer the stream.
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response())
}

fn consumer_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get(CONSUMER_HEADER)
        .ok_or_else(|| ApiError::BadRequest("missing X-Consumer-Id header".into()))?;
    parse_consumer_id(value.as_bytes())
}

/// A consumer id is 1 to 256 bytes of UTF-8 with no control characters.
pub fn parse_consumer_id(raw: &[u8]) -> Result<String, ApiError> {
    let bad = |why: &str| {
        Err(ApiError::BadRequest(format!(
            "invalid X-Consumer-Id: {why}"
        )))
    };
    if raw.is_empty() {
        return bad("empty");
    }
    if raw.len() > MAX_CONSUMER_ID_BYTES {
        return bad("longer than 256 bytes");
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return bad("not UTF-8");
    };
    if text.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(text.to_owned())
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    headers
        .get(LAST_EVENT_ID_HEADER)
        .map(|value| parse_last_event_id(value.as_bytes()))
        .transpose()
}

/// A resume point is a non-negative integer: the id of the last event the client received.
pub fn parse_last_event_id(raw: &[u8]) -> Result<i64, ApiError> {
    std::str::from_utf8(raw)
        .ok()
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse::<i64>().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(
                "invalid Last-Event-ID: expected a non-negative integer event id".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_ids() {
        assert_eq!(parse_consumer_id(b"toto").unwrap(), "toto");
        assert_eq!(
            parse_consumer_id("caf\u{e9} 1".as_bytes()).unwrap(),
            "caf\u{e9} 1"
        );
        assert!(parse_consumer_id(b"").is_err());
        assert!(parse_consumer_id(&[b'a'; 257]).is_err());
        assert!(parse_consumer_id(&[b'a'; 256]).is_ok());
        assert!(parse_consumer_id(b"a\tb").is_err());
        assert!(parse_consumer_id(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn last_event_ids() {
        assert_eq!(parse_last_event_id(b"5").unwrap(), 5);
        assert_eq!(parse_last_event_id(b" 0 ").unwrap(), 0);
        assert!(parse_last_event_id(b"-1").is_err());
        assert!(parse_last_event_id(b"+1").is_err());
        assert!(parse_last_event_id(b"abc").is_err());
        assert!(parse_last_event_id(b"").is_err());
        assert!(parse_last_event_id(b"99999999999999999999").is_err());
    }
}
