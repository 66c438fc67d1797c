//! `POST /events`: publishing over HTTP.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::Claims;
use crate::event::NewEvent;
use crate::publisher::PublishError;

use super::request::require_json;
use super::{ApiError, AppState};

/// `POST /events`: inserts one event or a batch (all or nothing, through the [`Publisher`], which
/// commits concurrent requests together); 201 with the ids once they are committed.
pub(super) async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let claims = state.claims(&headers, None)?;
    let events = crate::publish::parse_body(&body).map_err(ApiError::BadRequest)?;
    if let Some(claims) = &claims
        && !events.iter().all(|event| may_publish(claims, event))
    {
        return Err(ApiError::Forbidden("this token may not publish".into()));
    }
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

/// A token may publish an event with its `publish` claim, or, for an event addressed to topics
/// only, with Mercure grants of `publish` on every one of them.
pub(super) fn may_publish(claims: &Claims, event: &NewEvent) -> bool {
    claims.publish
        || (event.subscriber.is_none()
            && event
                .topics
                .as_ref()
                .is_some_and(|topics| claims.topics.may_publish(topics)))
}
