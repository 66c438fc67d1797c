//! `GET /events` (a stream of a consumer, topics, or both) and `GET /events/{id}` (one event).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::follower::StartError;
use crate::router::Refused;
use crate::sse::Format;
use crate::stream::OpenError;

use super::request::{EventsQuery, Follows, Reading, last_event_id, parse_last_event_id};
use super::{ApiError, AppState};

/// `GET /events`: the consumer's event stream.
pub(super) async fn events(
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
        Follows::ConsumersAndTopics,
    )?;
    let reader = reading.reader();
    let Reading {
        query,
        token_expires,
        ..
    } = reading;
    // A token past its `exp` but within the check's leeway would open a stream that ends at
    // once, and a client would reconnect to the same end until the leeway ran out.
    if token_expires.is_some_and(|expires| expires <= std::time::SystemTime::now()) {
        return Err(ApiError::Unauthorized("token expired".into()));
    }
    let cursor = last_event_id(&headers, &query)?;
    let format = match query.envelope.as_deref() {
        None | Some("false") => Format::Named,
        Some("true") => Format::Envelope,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "envelope must be true or false".into(),
            ));
        }
    };
    let streams = &state.streams;
    let retry_after = streams.retry_after();
    let stream = streams
        .open(reader, cursor, format, token_expires)
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

/// `GET /events/{id}`: one event as JSON.
pub(super) async fn event_by_id(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let claims = state.claims(&headers, None)?;
    let id = parse_last_event_id(id.as_bytes()).map_err(|_| {
        ApiError::BadRequest("invalid event id: expected a non-negative integer".into())
    })?;
    let (subscriber, json) = state
        .store
        .event_json(id)
        .await
        .map_err(|error| ApiError::from_store(&error, state.streams.retry_after()))?
        .ok_or_else(|| ApiError::NotFound(format!("no event with id {id}")))?;
    // A reader sees its own events and broadcasts; a publisher sees everything.
    if let (Some(claims), Some(subscriber)) = (claims, subscriber)
        && !claims.publish
        && claims
            .sub
            .as_ref()
            .is_none_or(|sub| sub.as_str() != subscriber)
    {
        return Err(ApiError::Forbidden(match claims.sub {
            Some(sub) => format!("this token may read consumer {:?} only", sub.as_str()),
            None => "this token names no consumer (sub)".into(),
        }));
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            state.hub.discovery(),
        ],
        json,
    )
        .into_response())
}
