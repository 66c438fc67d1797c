//! HTTP: the routes and what the handlers share. Each endpoint has a module of its own; what a
//! request asks for is checked in `request`, and every refusal is an `ApiError` (`error`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{Auth, AuthError, Claims};
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::replicas::Replicas;
use crate::store::Store;
use crate::stream::Streams;

mod error;
mod events;
mod history;
mod mercure;
mod openapi;
mod publishing;
mod request;
mod subscriptions;

pub use error::ApiError;
pub use openapi::DOCUMENT as OPENAPI_DOCUMENT;
use request::{CONSUMER_HEADER, EventsQuery, LAST_EVENT_ID_HEADER};
pub use subscriptions::WebhookSettings;

/// The built-in page: one file, no build step, no external assets.
const PAGE: &str = include_str!("../../static/index.html");

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub streams: Arc<Streams>,
    pub store: Store,
    /// Where history searches are read (a replica, or `store`).
    pub replicas: Replicas,
    pub publisher: Publisher,
    pub metrics: Metrics,
    /// None: authentication is off.
    pub auth: Option<Auth>,
    pub webhooks: WebhookSettings,
    pub hub: HubSettings,
}

/// The Mercure hub's settings.
#[derive(Clone)]
pub struct HubSettings {
    /// `--hub-url`, or its default: the base of relative topics and patterns.
    pub url: url::Url,
    /// What discovery links point to: `--hub-url` when set, else the hub's path.
    pub link: HeaderValue,
    /// With authentication on, whether a stream without a token may follow topics.
    pub anonymous: bool,
}

impl HubSettings {
    pub fn new(url: url::Url, explicit: bool, anonymous: bool) -> HubSettings {
        let target = if explicit {
            url.to_string()
        } else {
            url.path().to_owned()
        };
        let link =
            HeaderValue::from_str(&format!("<{target}>; rel=\"mercure\"")).unwrap_or_else(|_| {
                HeaderValue::from_static("</.well-known/mercure>; rel=\"mercure\"")
            });
        HubSettings {
            url,
            link,
            anonymous,
        }
    }

    /// The `Link` header that points a client to the hub (Mercure, "Discovery").
    pub(super) fn discovery(&self) -> (header::HeaderName, HeaderValue) {
        (header::LINK, self.link.clone())
    }
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
            .map_err(|error| match error {
                AuthError::Missing => ApiError::Unauthorized(error.to_string()),
                AuthError::BadRequest(why) => ApiError::InvalidRequest(why),
                _ => ApiError::InvalidToken(error.to_string()),
            })
    }
}

/// HTTP settings from the configuration.
pub struct HttpSettings {
    pub max_body_bytes: usize,
    /// Allowed CORS origins; empty: no CORS headers; `*`: any origin (without credentials).
    pub cors_origins: Vec<String>,
}

/// Every path the router serves, with its handlers: the router is built from this list, and
/// `tests/openapi.rs` holds the OpenAPI document to it through [`paths`].
fn endpoints() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/", get(page)),
        ("/openapi.json", get(openapi::document)),
        ("/events", get(events::events).post(publishing::publish)),
        ("/events/{id}", get(events::event_by_id)),
        ("/history", get(history::history)),
        (
            "/subscriptions",
            get(subscriptions::list).post(subscriptions::create),
        ),
        (
            "/subscriptions/{id}",
            get(subscriptions::show)
                .patch(subscriptions::change)
                .delete(subscriptions::delete),
        ),
        (
            "/.well-known/mercure",
            get(mercure::subscribe).post(mercure::publish),
        ),
        ("/health", get(health)),
        ("/ready", get(ready)),
        ("/metrics", get(metrics)),
    ]
}

/// The paths the router serves, as axum writes them (`/events/{id}`); which methods each takes
/// is the router's to say (a `405` lists them in `Allow`).
pub fn paths() -> Vec<&'static str> {
    endpoints().into_iter().map(|(path, _)| path).collect()
}

pub fn routes(state: AppState, settings: &HttpSettings) -> Router {
    let router = endpoints()
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| {
            router.route(path, methods)
        })
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
        "no such path: {}; the API is GET /events, POST /events, GET /events/{{id}}, \
         GET /history, /subscriptions, /.well-known/mercure, GET /health, GET /ready, \
         GET /metrics, GET /openapi.json (which describes them) and the page at GET /",
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
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            CONSUMER_HEADER,
            LAST_EVENT_ID_HEADER,
        ])
        .expose_headers([
            header::LOCATION,
            header::RETRY_AFTER,
            header::LINK,
            mercure::LAST_EVENT_ID_RESPONSE,
        ])
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
/// listening, 503 before that, while it reconnects, and from the moment the instance drains.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let published = *state.streams.sources.published.borrow();
    let listening = *state.streams.listening.borrow();
    let draining = state.streams.shutdown.is_cancelled();
    let status = if published.is_some() && listening && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": status == StatusCode::OK,
        "listening": listening,
        "draining": draining,
        "published": published,
    });
    (status, axum::Json(body)).into_response()
}
