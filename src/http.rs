//! HTTP: the routes, request parsing, and the mapping of errors to responses (in one place).

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{Auth, Claims};
use crate::event::{ConsumerId, EventId};
use crate::filter::TypeFilter;
use crate::follower::StartError;
use crate::metrics::Metrics;
use crate::publisher::{PublishError, Publisher};
use crate::router::Refused;
use crate::sse::Format;
use crate::store::{Store, StoreError};
use crate::stream::{OpenError, Streams};

const CONSUMER_HEADER: HeaderName = HeaderName::from_static("x-consumer-id");
const LAST_EVENT_ID_HEADER: HeaderName = HeaderName::from_static("last-event-id");
const TYPES_HEADER: HeaderName = HeaderName::from_static("x-event-types");

/// The built-in page: one file, no build step, no external assets.
const PAGE: &str = include_str!("../static/index.html");

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub streams: Arc<Streams>,
    pub store: Store,
    pub publisher: Publisher,
    pub metrics: Metrics,
    /// None: authentication is off.
    pub auth: Option<Auth>,
}

impl AppState {
    /// The request's claims when authentication is on (401 without a valid token), None when
    /// it is off.
    fn claims(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Option<Claims>, ApiError> {
        self.auth
            .as_ref()
            .map(|auth| auth.authenticate(headers, query_token))
            .transpose()
            .map_err(|error| ApiError::Unauthorized(error.to_string()))
    }
}

/// HTTP settings from the configuration.
pub struct HttpSettings {
    pub max_body_bytes: usize,
    /// Allowed CORS origins; empty: no CORS headers; `*`: any origin (without credentials).
    pub cors_origins: Vec<String>,
}

/// A request the service refuses, with the status and one-line reason the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The client has too much open already; it may retry after the given number of seconds.
    #[error("{reason}")]
    TooManyRequests { reason: String, retry_after: u64 },
    /// Temporarily unable to serve; the client should retry after the given number of seconds.
    #[error("{reason}")]
    Unavailable { reason: String, retry_after: u64 },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A database failure: a connection problem is temporary (503), a refusal is not (500).
    fn from_store(error: &StoreError, retry_after: u64) -> ApiError {
        match error {
            StoreError::Db(db) if db.as_db_error().is_some() => {
                ApiError::Internal(format!("the database refused the request: {error}"))
            }
            StoreError::Unexpected(_) => ApiError::Internal(error.to_string()),
            _ => ApiError::Unavailable {
                reason: format!("database unavailable: {error}"),
                retry_after,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // One line, whatever the underlying error's text looks like.
        let body = format!("{}\n", self.to_string().lines().next().unwrap_or_default());
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    body,
                )
                    .into_response();
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable { retry_after, .. } => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, retry_after.to_string())],
                    body,
                )
                    .into_response();
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, retry_after.to_string())],
                    body,
                )
                    .into_response();
            }
        };
        (status, body).into_response()
    }
}

pub fn routes(state: AppState, settings: &HttpSettings) -> Router {
    let router = Router::new()
        .route("/", get(page))
        .route("/events", get(events).post(publish))
        .route("/events/{id}", get(event_by_id))
        .route("/history", get(history))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        // Shared, not cloned: every request would otherwise clone (and drop) each of its handles.
        .with_state(Arc::new(state));
    match cors(&settings.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Any other path: 404 with the paths there are.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no such path: {}; the API is GET /events, POST /events, GET /events/{{id}}, GET /health, \
         GET /ready, GET /metrics and the page at GET /",
        uri.path()
    ))
}

/// A known path with another method: 405 (axum adds the `Allow` header).
async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Every request's span names its consumer, so a stream's log lines can be told apart.
fn request_span(request: &axum::http::Request<Body>) -> tracing::Span {
    let from_query = || {
        Query::<EventsQuery>::try_from_uri(request.uri())
            .ok()
            .and_then(|Query(query)| query.consumer)
    };
    let consumer = request
        .headers()
        .get(CONSUMER_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(from_query);
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        consumer = consumer.as_deref().unwrap_or(""),
    )
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            CONSUMER_HEADER,
            LAST_EVENT_ID_HEADER,
        ])
        .expose_headers([header::LOCATION, header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(3600));
    if origins.iter().any(|origin| origin == "*") {
        return Some(layer.allow_origin(AllowOrigin::any()));
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    Some(
        layer
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true),
    )
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Query parameters of `GET /events` (for clients that cannot send headers: `EventSource`) and of
/// `GET /history`.
#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    pub consumer: Option<String>,
    pub last_event_id: Option<String>,
    /// A token, for `EventSource` (which cannot send an Authorization header).
    pub access_token: Option<String>,
    /// Type patterns, comma-separated (for `EventSource`, which cannot send `X-Event-Types`).
    pub types: Option<String>,
    /// `true`: events as `data: {"type", "payload"}` without an `event:` line (see [`Format`]).
    pub envelope: Option<String>,
    // `GET /history` only:
    /// Events with a higher id (the keyset of the next page).
    pub after: Option<String>,
    /// Events up to this id.
    pub upto: Option<String>,
    /// Events whose timestamp is at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Events whose timestamp is before this time (RFC 3339).
    pub until: Option<String>,
    /// JSON the payload must contain (`payload @> ...`).
    pub payload: Option<String>,
    /// Events per page (default 100, at most 1000).
    pub limit: Option<String>,
    /// Instead of `limit`: the newest this many events.
    pub last: Option<String>,
}

/// Events per page of `GET /history` unless the client asks, and at most.
const HISTORY_PAGE: i64 = 100;
const MAX_HISTORY_PAGE: i64 = 1000;

/// `GET /events`: the consumer's event stream.
async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|error| ApiError::BadRequest(format!("malformed query string: {error}")))?;
    let claims = state.claims(&headers, query.access_token.as_deref())?;
    // The stream ends when its token does.
    let token_expires = claims
        .as_ref()
        .map(|claims| std::time::UNIX_EPOCH + std::time::Duration::from_secs(claims.exp));
    // A token past its `exp` but within the check's leeway would open a stream that ends at
    // once, and a client would reconnect to the same end until the leeway ran out.
    if token_expires.is_some_and(|expires| expires <= std::time::SystemTime::now()) {
        return Err(ApiError::Unauthorized("token expired".into()));
    }
    let types = event_types(&headers, &query, claims.as_ref())?;
    let consumer = reader(claims, &headers, raw_query.as_deref(), &query)?;
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
        .open(consumer, cursor, format, token_expires, types)
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

/// The consumer a request reads: the one it names, which must be its token's when it has one; a
/// request with a token may leave it out.
fn reader(
    claims: Option<Claims>,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    query: &EventsQuery,
) -> Result<ConsumerId, ApiError> {
    Ok(match (claims, consumer_id(headers, raw_query)) {
        (None, requested) => requested?,
        // With a token the consumer may be left out: it is the token's.
        (Some(claims), Err(_)) if !names_consumer(headers, query) => claims.sub,
        (Some(claims), requested) => {
            let requested = requested?;
            if requested != claims.sub {
                return Err(ApiError::Forbidden(format!(
                    "this token may read consumer {:?}, not {:?}",
                    claims.sub.as_str(),
                    requested.as_str()
                )));
            }
            requested
        }
    })
}

/// `GET /history`: a consumer's past events (and the broadcasts) as JSON, oldest first, filtered
/// by type, id range, time range and payload containment, a bounded page at a time with a link
/// to the next.
async fn history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|error| ApiError::BadRequest(format!("malformed query string: {error}")))?;
    let claims = state.claims(&headers, query.access_token.as_deref())?;
    let types = event_types(&headers, &query, claims.as_ref())?;
    let consumer = reader(claims, &headers, raw_query.as_deref(), &query)?;
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
    if let Some(payload) = &query.payload
        && serde_json::from_str::<serde_json::Value>(payload).is_err()
    {
        return Err(ApiError::BadRequest(
            "invalid payload: expected JSON".into(),
        ));
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
    let page = state
        .store
        .history(&search)
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

/// `POST /events`: inserts one event or a batch (all or nothing, through the [`Publisher`], which
/// commits concurrent requests together); 201 with the ids once they are committed.
async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType(
            "expected Content-Type: application/json".into(),
        ));
    }
    let claims = state.claims(&headers, None)?;
    if claims.is_some_and(|claims| !claims.publish) {
        return Err(ApiError::Forbidden("this token may not publish".into()));
    }
    let events = crate::publish::parse_body(&body).map_err(ApiError::BadRequest)?;
    let ids = state
        .publisher
        .publish(events)
        .await
        .map_err(|error| match error {
            PublishError::Store(error) => ApiError::from_store(&error, state.streams.retry_after()),
            PublishError::Stopped => ApiError::Unavailable {
                reason: error.to_string(),
                retry_after: state.streams.retry_after(),
            },
        })?;
    let location = format!("/events/{}", ids[0]);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(serde_json::json!({ "ids": ids })),
    )
        .into_response())
}

/// `GET /events/{id}`: one event as JSON.
async fn event_by_id(
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
        && claims.sub.as_str() != subscriber
    {
        return Err(ApiError::Forbidden(format!(
            "this token may read consumer {:?} only",
            claims.sub.as_str()
        )));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// `GET /health`: the process is up (liveness); says nothing of the database.
async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let pool = state.store.pool_status();
    let read = crate::metrics::ReadGauges {
        consumers: state.streams.sources.router.consumers(),
        pool_size: pool.size,
        pool_available: pool.available,
        pool_waiting: pool.waiting,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(read),
    )
        .into_response()
}

/// `GET /ready`: 200 once the hub has its starting point and the notification connection is
/// listening, 503 before that and while it reconnects.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let published = *state.streams.sources.published.borrow();
    let listening = *state.streams.listening.borrow();
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

/// The consumer: the `X-Consumer-Id` header, else the `consumer` query parameter. The parameter
/// is decoded byte for byte (a lossy decoding would turn `%FF` into a valid consumer), and an
/// error names where the bad value came from.
fn consumer_id(headers: &HeaderMap, raw_query: Option<&str>) -> Result<ConsumerId, ApiError> {
    let invalid = |source: &str, why| ApiError::BadRequest(format!("invalid {source}: {why}"));
    if let Some(value) = headers.get(CONSUMER_HEADER) {
        return ConsumerId::parse(value.as_bytes()).map_err(|why| invalid("X-Consumer-Id", why));
    }
    match raw_query.and_then(|query| query_param(query, "consumer")) {
        Some(raw) => ConsumerId::parse(&raw).map_err(|why| invalid("consumer parameter", why)),
        None => Err(ApiError::BadRequest(
            "missing X-Consumer-Id header (or consumer query parameter)".into(),
        )),
    }
}

/// The types a stream asks for (`X-Event-Types`, else the `types` query parameter), within what
/// its token allows; the token's types when it asks for none.
fn event_types(
    headers: &HeaderMap,
    query: &EventsQuery,
    claims: Option<&Claims>,
) -> Result<Option<TypeFilter>, ApiError> {
    let requested = match (headers.get(TYPES_HEADER), &query.types) {
        (Some(value), _) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("invalid X-Event-Types: not ASCII".into()))
                .and_then(|text| {
                    TypeFilter::parse(text).map_err(|why| {
                        ApiError::BadRequest(format!("invalid X-Event-Types: {why}"))
                    })
                })?,
        ),
        (None, Some(text)) => Some(
            TypeFilter::parse(text)
                .map_err(|why| ApiError::BadRequest(format!("invalid types parameter: {why}")))?,
        ),
        (None, None) => None,
    };
    let Some(patterns) = claims.and_then(|claims| claims.types.as_ref()) else {
        return Ok(requested);
    };
    let allowed = TypeFilter::from_patterns(patterns.iter().map(String::as_str))
        .map_err(|why| ApiError::Unauthorized(format!("the token's types claim: {why}")))?;
    match requested {
        None => Ok(Some(allowed)),
        Some(requested) if requested.within(&allowed) => Ok(Some(requested)),
        Some(_) => Err(ApiError::Forbidden(format!(
            "this token may read types {} only",
            patterns.join(",")
        ))),
    }
}

/// The first value of `name` in a query string, percent-decoded into bytes (`+` is a space).
fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    let decode = |text: &str| -> Vec<u8> {
        percent_encoding::percent_decode_str(&text.replace('+', " ")).collect()
    };
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(key) == name.as_bytes()).then(|| decode(value))
    })
}

/// Whether the request names a consumer at all (valid or not).
fn names_consumer(headers: &HeaderMap, query: &EventsQuery) -> bool {
    headers.contains_key(CONSUMER_HEADER) || query.consumer.is_some()
}

/// The resume point: the `Last-Event-ID` header (which a browser's own reconnect sends), else the
/// `last_event_id` query parameter (which a page sets for its first connection).
fn last_event_id(headers: &HeaderMap, query: &EventsQuery) -> Result<Option<EventId>, ApiError> {
    match (headers.get(LAST_EVENT_ID_HEADER), &query.last_event_id) {
        (Some(value), _) => parse_last_event_id(value.as_bytes()).map(Some),
        (None, Some(text)) => parse_last_event_id(text.as_bytes()).map(Some),
        (None, None) => Ok(None),
    }
}

/// A resume point is a non-negative integer: the id of the last event the client received.
pub fn parse_last_event_id(raw: &[u8]) -> Result<EventId, ApiError> {
    std::str::from_utf8(raw)
        .ok()
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse::<i64>().ok())
        .map(EventId)
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
    fn last_event_ids() {
        assert_eq!(parse_last_event_id(b"5").unwrap(), EventId(5));
        assert_eq!(parse_last_event_id(b" 0 ").unwrap(), EventId(0));
        assert!(parse_last_event_id(b"-1").is_err());
        assert!(parse_last_event_id(b"+1").is_err());
        assert!(parse_last_event_id(b"abc").is_err());
        assert!(parse_last_event_id(b"").is_err());
        assert!(parse_last_event_id(b"99999999999999999999").is_err());
    }
}
