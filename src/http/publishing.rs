//! `POST /events`: publishing over HTTP.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

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
