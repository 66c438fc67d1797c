//! `/subscriptions`: webhook subscriptions, created, read, changed and deleted. They are rows of
//! `event_piper_subscriptions`; the instance delivering one notices a change at its next write
//! or look (`webhook::supervisor`), this instance at once.
//!
//! With authentication on, a token needs the `subscriptions` claim, and it sees and manages only
//! the subscriptions of its own consumer (`sub`): a subscription sends the consumer's events to
//! any URL, which is reading them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Claims;
use crate::event::{ConsumerId, EventId};
use crate::filter::TypeFilter;
use crate::store::subscriptions::{NewSubscription, SubscriptionChange, SubscriptionRow};
use crate::webhook::client::check_url;
use crate::webhook::delivery::MAX_BATCH;
use crate::webhook::signing::Secret;

use super::request::{require_json, token_types, types_refused};
use super::{ApiError, AppState};

/// Events behind are counted up to this many.
const BEHIND_CAP: i64 = 1_000_000;
/// A batch size when none is given.
const DEFAULT_BATCH: i32 = 100;

/// What the API needs to know of webhooks.
#[derive(Clone)]
pub struct WebhookSettings {
    /// `--webhook-allow-private`: URLs to loopback and private addresses are accepted.
    pub allow_private: bool,
    /// `--webhook-failing-after`: a subscription failing this long shows as `failing`.
    pub failing_after: Duration,
    /// Wakes this instance's supervisor after a change.
    pub changed: Arc<tokio::sync::Notify>,
}

/// Where a subscription starts, or moves to: after an event id, or after the newest event.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum After {
    Id(i64),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    consumer: Option<String>,
    url: String,
    types: Option<Vec<String>>,
    batch_size: Option<i32>,
    after: Option<After>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    url: Option<String>,
    /// `null` removes the filter; absent leaves it.
    #[serde(default, deserialize_with = "present")]
    types: Option<Option<Vec<String>>>,
    batch_size: Option<i32>,
    paused: Option<bool>,
    after: Option<After>,
}

/// Tells a field given as `null` (Some(None)) from one left out (None).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    consumer: Option<String>,
}

/// `POST /subscriptions`: 201 with the subscription and its signing secret, shown this once.
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = manager(&state, &headers)?;
    require_json(&headers)?;
    let body: CreateBody = parse(&body)?;
    let consumer = managed_consumer(claims.as_ref(), body.consumer)?
        .ok_or_else(|| ApiError::BadRequest("consumer is required".into()))?;
    let url = checked_url(&state, &body.url)?;
    let types = checked_types(body.types, claims.as_ref())?;
    let batch_size = checked_batch_size(body.batch_size.unwrap_or(DEFAULT_BATCH))?;
    let position = start(&state, body.after.unwrap_or(After::Word("now".into())))?;
    let secret = Secret::generate().to_string();
    let row = state
        .store
        .create_subscription(&NewSubscription {
            consumer: &consumer,
            url: &url,
            secret: &secret,
            types: types.as_deref(),
            batch_size,
            position,
        })
        .await
        .map_err(|error| store_error(&state, &error))?;
    state.webhooks.changed.notify_one();
    tracing::info!(subscription = row.id, consumer = %consumer, url = %row.url, "webhook subscription created");
    let mut shown = render(&state, &row, 0);
    shown["secret"] = Value::from(secret);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/subscriptions/{}", row.id))],
        axum::Json(shown),
    )
        .into_response())
}

/// `GET /subscriptions`: every subscription the caller may see, oldest first.
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let claims = manager(&state, &headers)?;
    let consumer = managed_consumer(claims.as_ref(), query.consumer)?;
    let rows = state
        .store
        .subscriptions(consumer.as_ref())
        .await
        .map_err(|error| store_error(&state, &error))?;
    let mut shown = Vec::with_capacity(rows.len());
    for row in &rows {
        shown.push(shown_with_behind(&state, row).await?);
    }
    Ok(axum::Json(json!({ "subscriptions": shown })).into_response())
}

/// `GET /subscriptions/{id}`.
pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let claims = manager(&state, &headers)?;
    let row = visible(&state, claims.as_ref(), &id).await?;
    Ok(axum::Json(shown_with_behind(&state, &row).await?).into_response())
}

/// `PATCH /subscriptions/{id}`: pause, resume, move the position, or change the URL, types or
/// batch size.
pub(super) async fn change(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = manager(&state, &headers)?;
    require_json(&headers)?;
    let body: ChangeBody = parse(&body)?;
    let row = visible(&state, claims.as_ref(), &id).await?;
    let change = SubscriptionChange {
        url: body.url.map(|url| checked_url(&state, &url)).transpose()?,
        types: body
            .types
            .map(|types| checked_types(types, claims.as_ref()))
            .transpose()?,
        batch_size: body.batch_size.map(checked_batch_size).transpose()?,
        paused: body.paused,
        position: body.after.map(|after| start(&state, after)).transpose()?,
    };
    let row = state
        .store
        .change_subscription(row.id, &change)
        .await
        .map_err(|error| store_error(&state, &error))?
        .ok_or_else(|| no_such(&id))?;
    state.webhooks.changed.notify_one();
    tracing::info!(
        subscription = row.id,
        ?change,
        "webhook subscription changed"
    );
    Ok(axum::Json(shown_with_behind(&state, &row).await?).into_response())
}

/// `DELETE /subscriptions/{id}`: 204.
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let claims = manager(&state, &headers)?;
    let row = visible(&state, claims.as_ref(), &id).await?;
    let deleted = state
        .store
        .delete_subscription(row.id)
        .await
        .map_err(|error| store_error(&state, &error))?;
    if !deleted {
        return Err(no_such(&id));
    }
    state.webhooks.changed.notify_one();
    tracing::info!(subscription = row.id, "webhook subscription deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The caller's claims when authentication is on; 403 without the `subscriptions` grant.
fn manager(state: &AppState, headers: &HeaderMap) -> Result<Option<Claims>, ApiError> {
    let claims = state.claims(headers, None)?;
    if claims.as_ref().is_some_and(|claims| !claims.subscriptions) {
        return Err(ApiError::Forbidden(
            "this token may not manage subscriptions (it lacks the subscriptions claim)".into(),
        ));
    }
    Ok(claims)
}

/// The consumer a request manages: the one it names (checked), or its token's; 403 when a token
/// names another one. None: no token and none named.
fn managed_consumer(
    claims: Option<&Claims>,
    named: Option<String>,
) -> Result<Option<ConsumerId>, ApiError> {
    let named = named
        .map(|consumer| {
            ConsumerId::parse(consumer.as_bytes())
                .map_err(|why| ApiError::BadRequest(format!("invalid consumer: {why}")))
        })
        .transpose()?;
    match claims.map(|claims| claims.sub.as_ref()) {
        Some(None) => Err(ApiError::Forbidden(
            "this token names no consumer (sub) whose subscriptions it could manage".into(),
        )),
        Some(Some(sub)) if named.as_ref().is_some_and(|named| named != sub) => {
            Err(ApiError::Forbidden(format!(
                "this token manages the subscriptions of consumer {sub} only"
            )))
        }
        Some(Some(sub)) => Ok(Some(sub.clone())),
        None => Ok(named),
    }
}

/// The subscription `id`, if the caller may see it; 404 otherwise (another consumer's
/// subscription does not exist for this token).
async fn visible(
    state: &AppState,
    claims: Option<&Claims>,
    id: &str,
) -> Result<SubscriptionRow, ApiError> {
    let number = id.parse::<i64>().map_err(|_| no_such(id))?;
    let row = state
        .store
        .subscription(number)
        .await
        .map_err(|error| store_error(state, &error))?
        .ok_or_else(|| no_such(id))?;
    match claims {
        Some(claims)
            if claims
                .sub
                .as_ref()
                .is_none_or(|sub| sub.as_str() != row.consumer) =>
        {
            Err(no_such(id))
        }
        _ => Ok(row),
    }
}

fn no_such(id: &str) -> ApiError {
    ApiError::NotFound(format!("no such subscription: {id}"))
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("invalid body: {error}")))
}

fn checked_url(state: &AppState, url: &str) -> Result<String, ApiError> {
    check_url(url, state.webhooks.allow_private)
        .map(|url| url.to_string())
        .map_err(|error| ApiError::BadRequest(error.to_string()))
}

/// The types a subscription delivers: valid patterns, within the token's; the token's own when
/// none are given.
fn checked_types(
    requested: Option<Vec<String>>,
    claims: Option<&Claims>,
) -> Result<Option<Vec<String>>, ApiError> {
    let filter = requested
        .as_ref()
        .map(|patterns| {
            TypeFilter::from_patterns(patterns.iter().map(String::as_str))
                .map_err(|why| ApiError::BadRequest(format!("invalid types: {why}")))
        })
        .transpose()?;
    let Some((allowed, patterns)) = token_types(claims)? else {
        return Ok(requested);
    };
    match filter {
        None => Ok(Some(patterns.to_vec())),
        Some(filter) if filter.within(&allowed) => Ok(requested),
        Some(_) => Err(types_refused(patterns)),
    }
}

fn checked_batch_size(size: i32) -> Result<i32, ApiError> {
    if (1..=MAX_BATCH).contains(&size) {
        Ok(size)
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid batch_size: expected 1 to {MAX_BATCH}"
        )))
    }
}

/// The position `after` stands for: an id, or "now" (the newest published event).
fn start(state: &AppState, after: After) -> Result<EventId, ApiError> {
    match after {
        After::Id(id) if id >= 0 => Ok(EventId(id)),
        After::Word(word) if word == "now" => (*state.streams.sources.published.borrow())
            .ok_or_else(|| ApiError::Unavailable {
                reason: "not ready: the service has not yet reached the database".into(),
                retry_after: state.streams.retry_after(),
            }),
        _ => Err(ApiError::BadRequest(
            "invalid after: expected an event id or \"now\"".into(),
        )),
    }
}

/// A subscription as shown, with how many events it is behind (one count in the database).
async fn shown_with_behind(state: &AppState, row: &SubscriptionRow) -> Result<Value, ApiError> {
    let types = row
        .types
        .as_ref()
        .and_then(|patterns| TypeFilter::from_patterns(patterns.iter().map(String::as_str)).ok());
    let behind = state
        .store
        .count_after(&row.consumer, row.position, types.as_ref(), BEHIND_CAP)
        .await
        .map_err(|error| store_error(state, &error))?;
    Ok(render(state, row, behind))
}

fn store_error(state: &AppState, error: &crate::store::StoreError) -> ApiError {
    ApiError::from_store(error, state.streams.retry_after())
}

/// A subscription as the API shows it (never its secret).
fn render(state: &AppState, row: &SubscriptionRow, behind: i64) -> Value {
    let time = |at: Option<SystemTime>| {
        at.map(|at| Value::from(humantime::format_rfc3339_millis(at).to_string()))
            .unwrap_or(Value::Null)
    };
    json!({
        "id": row.id,
        "consumer": row.consumer,
        "url": row.url,
        "types": row.types,
        "batch_size": row.batch_size,
        "status": status(row, state.webhooks.failing_after),
        "position": row.position,
        "behind": behind,
        "delivered": row.delivered,
        "failed_attempts": row.failed_attempts,
        "last_attempt_at": time(row.last_attempt_at),
        "last_outcome": row.last_outcome,
        "last_error": row.last_error,
        "last_success_at": time(row.last_success_at),
        "failing_since": time(row.failing_since),
        "next_retry_at": time(row.next_retry_at),
        "created_at": time(Some(row.created_at)),
    })
}

/// `active`, `retrying` (its last attempt failed), `failing` (for longer than
/// `--webhook-failing-after`), `paused` or `disabled` (the receiver answered 410 Gone).
fn status(row: &SubscriptionRow, failing_after: Duration) -> &str {
    match (row.state.as_str(), row.failing_since) {
        ("active", Some(since)) if since.elapsed().unwrap_or_default() >= failing_after => {
            "failing"
        }
        ("active", Some(_)) => "retrying",
        (state, _) => state,
    }
}
