//! `GET /history`: searching a consumer's past events.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use crate::event::EventId;
use crate::replicas::Need;

use super::request::{EventsQuery, Follows, Reading, parse_last_event_id};
use super::{ApiError, AppState};

/// Events per page of `GET /history` unless the client asks, and at most.
const HISTORY_PAGE: i64 = 100;
const MAX_HISTORY_PAGE: i64 = 1000;

/// `GET /history`: a consumer's past events (and the broadcasts) as JSON, oldest first, filtered
/// by type, id range, time range and payload containment, a bounded page at a time with a link
/// to the next.
pub(super) async fn history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let reading = Reading::check(
        &state,
        &headers,
        raw_query.as_deref(),
        query,
        Follows::ConsumersAndTopics,
    )?;
    let consumer = reading.consumer_only()?.clone();
    let Reading { query, types, .. } = reading;
    let id = |name: &str, value: &Option<String>, default: i64| match value {
        Some(text) => parse_last_event_id(text.as_bytes())
            .map_err(|_| ApiError::BadRequest(format!("invalid {name}: expected an event id"))),
        None => Ok(EventId(default)),
    };
    let time = |name: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|text| {
                humantime::parse_rfc3339_weak(text).map_err(|_| {
                    ApiError::BadRequest(format!(
                        "invalid {name}: expected a time such as 2026-11-27T10:00:00Z"
                    ))
                })
            })
            .transpose()
    };
    if let Some(payload) = &query.payload {
        match serde_json::from_str::<serde_json::Value>(payload) {
            Err(_) => {
                return Err(ApiError::BadRequest(
                    "invalid payload: expected JSON".into(),
                ));
            }
            // jsonb cannot hold U+0000, so the database would refuse the search (a 500).
            Ok(value) if crate::publish::contains_nul(&value) => {
                return Err(ApiError::BadRequest(
                    "invalid payload: U+0000 cannot be stored, so no payload contains it".into(),
                ));
            }
            Ok(_) => {}
        }
    }
    let count = |name: &str, text: &str| {
        text.parse::<i64>()
            .ok()
            .filter(|count| (1..=MAX_HISTORY_PAGE).contains(count))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("invalid {name}: expected 1 to {MAX_HISTORY_PAGE}"))
            })
    };
    let (limit, newest) = match (&query.limit, &query.last) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("give limit or last, not both".into()));
        }
        (Some(limit), None) => (count("limit", limit)?, false),
        (None, Some(last)) => (count("last", last)?, true),
        (None, None) => (HISTORY_PAGE, false),
    };
    let search = crate::store::HistorySearch {
        consumer: &consumer,
        after: id("after", &query.after, 0)?,
        upto: id("upto", &query.upto, i64::MAX)?,
        since: time("since", &query.since)?,
        until: time("until", &query.until)?,
        payload: query.payload.as_deref(),
        types: types.as_ref(),
        limit,
        newest,
    };
    // On a replica that has replayed at least what the hub has published: the search sees
    // every event a stream has been sent.
    let search = &search;
    let page = state
        .replicas
        .read(&state.store, Need::Published, |store| async move {
            store.history(search).await
        })
        .await
        .map_err(|error| ApiError::from_store(&error, state.streams.retry_after()))?;
    // A full page may have more after it: the same search, after its last id.
    let next = match page.last() {
        Some((last, _)) if !newest && page.len() as i64 == limit => {
            let mut next = form_urlencoded::Serializer::new(String::new());
            for (key, value) in form_urlencoded::parse(raw_query.unwrap_or_default().as_bytes()) {
                if key != "after" && key != "access_token" {
                    next.append_pair(&key, &value);
                }
            }
            next.append_pair("after", &last.to_string());
            serde_json::Value::from(format!("/history?{}", next.finish()))
        }
        _ => serde_json::Value::Null,
    };
    let events = page
        .iter()
        .map(|(_, json)| json.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let body = format!("{{\"events\":[{events}],\"next\":{next}}}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
