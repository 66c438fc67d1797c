//! The Mercure hub (draft-dunglas-mercure-08) at `/.well-known/mercure`: subscribing with topic
//! matchers (`GET`) and publishing updates (`POST`).
//!
//! An update is an event like any other: a row of `events` with topics, committed through the
//! same publisher as `POST /events`, read by the same hub, routed and replayed the same way. So a
//! Mercure subscriber also receives what producers insert over SQL with matching topics, and its
//! history is the table. What Mercure names differently:
//! - an event's SSE id is its publisher's `id`, else `#` and the table's id (the draft asks a
//!   hub's own ids to be IRIs or fragments); `Last-Event-ID` accepts either, and `earliest`;
//! - `data` is the event's payload when that is a JSON string, one `data:` line per line;
//! - `type` is the event's type, sent as `event:` unless it is the default, `message`.
//!
//! Not implemented (optional in the draft): active subscriptions and their API, encryption, the
//! `QUERY` method, protected resource metadata.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::event::{EventId, NewEvent};
use crate::follower::StartError;
use crate::publish::{MAX_TYPE_BYTES, check_topic};
use crate::publisher::PublishError;
use crate::router::Refused;
use crate::sse::{self, Format};
use crate::stream::OpenError;
use crate::topic::{MAX_TOPICS, check_text, is_reserved};

use super::request::{EventsQuery, Follows, LAST_EVENT_ID_HEADER, Reading, form_pairs, text};
use super::{ApiError, AppState};

/// The response field that tells a resuming subscriber where its stream starts.
pub(super) const LAST_EVENT_ID_RESPONSE: HeaderName =
    HeaderName::from_static("mercure-last-event-id");

/// The reserved resume point: everything the hub has.
const EARLIEST: &str = "earliest";

/// `GET /.well-known/mercure`: the updates of the selected topics, public ones for anyone and
/// private ones for a token that grants one of their topics.
pub(super) async fn subscribe(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut reading = Reading::check(
        &state,
        &headers,
        raw_query.as_deref(),
        query,
        Follows::TopicsOnly,
    )?;
    if reading
        .token_expires
        .is_some_and(|expires| expires <= std::time::SystemTime::now())
    {
        return Err(ApiError::InvalidToken("token expired".into()));
    }
    let requested = match headers.get(LAST_EVENT_ID_HEADER) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("invalid Last-Event-ID: not text".into()))?
                .trim()
                .to_owned(),
        ),
        None => reading.query.last_event_id.clone(),
    };
    let (cursor, resumes_from) = match requested {
        None => (None, None),
        Some(requested) => match resume_point(&state, &requested).await? {
            Some(after) => (Some(after), Some(requested)),
            None => (Some(EventId(0)), Some(EARLIEST.to_owned())),
        },
    };
    let reader = reading.reader();
    let streams = &state.streams;
    let retry_after = streams.retry_after();
    let stream = streams
        .open(reader, cursor, Format::Mercure, reading.token_expires)
        .await
        .map_err(|error| match error {
            OpenError::Start(StartError::Refused(Refused::TooManyForConsumer)) => {
                ApiError::TooManyRequests {
                    reason: error.to_string(),
                    retry_after,
                }
            }
            _ => ApiError::Unavailable {
                reason: error.to_string(),
                retry_after,
            },
        })?;
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    if let Some(from) = resumes_from.and_then(|from| HeaderValue::from_str(&from).ok()) {
        response.headers_mut().insert(LAST_EVENT_ID_RESPONSE, from);
    }
    Ok(response)
}

/// The table id a Mercure resume point stands for: `earliest` is before everything, `#N` is
/// event N, anything else a publisher's id (the first event that carries it). None: no event
/// has that id, so the stream starts from the earliest event kept.
async fn resume_point(state: &AppState, requested: &str) -> Result<Option<EventId>, ApiError> {
    if requested == EARLIEST {
        return Ok(Some(EventId(0)));
    }
    // PostgreSQL refuses text with U+0000 (a 500), and no publisher's id can hold one.
    if requested.contains('\0') {
        return Err(ApiError::BadRequest(
            "invalid Last-Event-ID: U+0000 is in no id".into(),
        ));
    }
    if let Some(id) = requested.strip_prefix('#') {
        return super::request::parse_last_event_id(id.as_bytes()).map(Some);
    }
    // Before the hub has started, nothing is served anyway.
    if state.streams.sources.published.borrow().is_none() {
        return Err(ApiError::Unavailable {
            reason: "not ready: the service has not yet reached the database".into(),
            retry_after: state.streams.retry_after(),
        });
    }
    state
        .store
        .find_update_id(requested)
        .await
        .map_err(|error| ApiError::from_store(&error, state.streams.retry_after()))
}

/// `POST /.well-known/mercure`: one update, form-encoded; 200 with its id once committed.
pub(super) async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(ApiError::UnsupportedMediaType(
            "expected Content-Type: application/x-www-form-urlencoded".into(),
        ));
    }
    let claims = state.claims(&headers, None)?;
    // Fields the draft defines must be UTF-8; any other is ignored, whatever it holds.
    let fields = form_pairs(&body)
        .into_iter()
        .filter_map(|(name, value)| {
            let name = String::from_utf8(name).ok()?;
            matches!(
                name.as_str(),
                "topic" | "data" | "private" | "id" | "type" | "retry"
            )
            .then(|| text(&name, value).map(|value| (name, value)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let event = update(&fields, &state.hub.url)?;
    if let Some(claims) = &claims
        && !super::publishing::may_publish(claims, &event)
    {
        return Err(ApiError::Forbidden(
            "this token may not publish to every topic of this update".into(),
        ));
    }
    let update_id = event.update_id.clone();
    let ids = state
        .publisher
        .publish(vec![event])
        .await
        .map_err(|error| match error {
            PublishError::Store(error) => ApiError::from_store(&error, state.streams.retry_after()),
            PublishError::Stopped => ApiError::Unavailable {
                reason: error.to_string(),
                retry_after: state.streams.retry_after(),
            },
        })?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        sse::mercure_id(ids[0], update_id.as_deref()),
    )
        .into_response())
}

/// The event a publish request's fields describe, checked as the draft asks: at least one
/// `topic`, none `*` or in the hub's own namespace; an `id` that is not `earliest` and does not
/// start with `#`; a `type` other than `mercure`; a `retry` of digits only. Fields it does not
/// know are ignored.
fn update(fields: &[(String, String)], hub: &url::Url) -> Result<NewEvent, ApiError> {
    let bad = ApiError::BadRequest;
    let mut topics = Vec::new();
    let (mut data, mut private, mut id, mut event_type, mut retry) =
        (None, false, None, None, None);
    for (name, value) in fields {
        match name.as_str() {
            "topic" => {
                if topics.len() == MAX_TOPICS {
                    return Err(ApiError::PayloadTooLarge(format!(
                        "at most {MAX_TOPICS} topics on one update"
                    )));
                }
                let topic = check_topic(value.clone()).map_err(bad)?;
                if is_reserved(&topic, hub) {
                    return Err(bad(format!(
                        "topic {topic:?} is in the hub's own namespace ({})",
                        hub.path()
                    )));
                }
                topics.push(topic);
            }
            "data" => data = Some(value),
            "private" => private = true,
            "id" => {
                check_text("id", value).map_err(|why| bad(why.0))?;
                if value.starts_with('#') || value == EARLIEST {
                    return Err(bad(format!(
                        "id {value:?}: an id may not start with # nor be \"earliest\""
                    )));
                }
                id = Some(value.clone());
            }
            "type" => {
                check_text("type", value).map_err(|why| bad(why.0))?;
                if value.len() > MAX_TYPE_BYTES {
                    return Err(bad(format!("type must be at most {MAX_TYPE_BYTES} bytes")));
                }
                if value == "mercure" {
                    return Err(bad("the type \"mercure\" is reserved for the hub".into()));
                }
                event_type = Some(value.clone());
            }
            "retry" => {
                let valid = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                let millis = valid.then(|| value.parse::<i32>().ok()).flatten();
                retry = Some(millis.ok_or_else(|| {
                    bad("retry must be a number of milliseconds (digits only)".into())
                })?);
            }
            _ => {}
        }
    }
    if topics.is_empty() {
        return Err(bad("missing topic: an update needs at least one".into()));
    }
    let data = data.map(String::as_str).unwrap_or_default();
    if data.contains('\0') {
        return Err(bad(
            "data may not contain U+0000 (PostgreSQL's jsonb cannot store it)".into(),
        ));
    }
    Ok(NewEvent {
        topics: Some(topics),
        private,
        update_id: id,
        retry,
        ..NewEvent::to_consumer(
            event_type.unwrap_or_else(|| sse::DEFAULT_TYPE.to_owned()),
            None,
            serde_json::Value::from(data).to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    fn reason(pairs: &[(&str, &str)]) -> String {
        let hub = url::Url::parse("https://example.com/.well-known/mercure").unwrap();
        update(&fields(pairs), &hub).unwrap_err().to_string()
    }

    #[test]
    fn updates_become_events() {
        let hub = url::Url::parse("https://example.com/.well-known/mercure").unwrap();
        let event = update(
            &fields(&[
                ("topic", "https://example.com/books/1"),
                ("topic", "https://example.com/users/7/books/1"),
                ("data", "a\nb"),
                ("private", ""),
                ("id", "urn:uuid:1"),
                ("retry", "1500"),
                ("unknown", "ignored"),
            ]),
            &hub,
        )
        .unwrap();
        assert_eq!(event.topics.as_ref().unwrap().len(), 2);
        assert!(event.private);
        assert_eq!(event.payload, r#""a\nb""#);
        assert_eq!(event.event_type, "message");
        assert_eq!(event.update_id.as_deref(), Some("urn:uuid:1"));
        assert_eq!(event.retry, Some(1500));
    }

    #[test]
    fn the_drafts_refusals() {
        assert!(reason(&[("data", "x")]).contains("missing topic"));
        assert!(reason(&[("topic", "*")]).contains("reserved"));
        assert!(reason(&[("topic", "/.well-known/mercure/subscriptions/x")]).contains("namespace"));
        assert!(reason(&[("topic", "a"), ("type", "mercure")]).contains("reserved"));
        assert!(reason(&[("topic", "a"), ("id", "#1")]).contains("may not start"));
        assert!(reason(&[("topic", "a"), ("id", "earliest")]).contains("earliest"));
        assert!(reason(&[("topic", "a"), ("id", "a\u{7}")]).contains("control"));
        assert!(reason(&[("topic", "a"), ("retry", "-1")]).contains("digits"));
        assert!(reason(&[("topic", "a"), ("retry", "99999999999")]).contains("digits"));
        assert!(reason(&[("topic", "a\u{200b}")]).contains("format"));
    }
}
