//! Refusals: every error a handler returns, as a status and a one-line reason.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// A request the service refuses, with the status and one-line reason the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// No token where one is needed: 401 with a bare `Bearer` challenge (RFC 6750, 3.1).
    #[error("{0}")]
    Unauthorized(String),
    /// A token that does not verify: 401 with `error="invalid_token"`.
    #[error("{0}")]
    InvalidToken(String),
    /// A token presented wrongly (an Authorization header of another scheme): 400 with
    /// `error="invalid_request"`.
    #[error("{0}")]
    InvalidRequest(String),
    /// A valid token that does not allow what was asked: 403 with `error="insufficient_scope"`.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PayloadTooLarge(String),
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
    pub(super) fn from_store(error: &StoreError, retry_after: u64) -> ApiError {
        match error {
            StoreError::Db(db) if db.as_db_error().is_some() => {
                ApiError::Internal(format!("the database refused the request: {error}"))
            }
            StoreError::Unexpected(_) => ApiError::Internal(error.to_string()),
            StoreError::Shared(error) => ApiError::from_store(error, retry_after),
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
        let challenge = |status: StatusCode, value: &'static str| {
            (status, [(header::WWW_AUTHENTICATE, value)], body.clone()).into_response()
        };
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => return challenge(StatusCode::UNAUTHORIZED, "Bearer"),
            ApiError::InvalidToken(_) => {
                return challenge(StatusCode::UNAUTHORIZED, r#"Bearer error="invalid_token""#);
            }
            ApiError::InvalidRequest(_) => {
                return challenge(StatusCode::BAD_REQUEST, r#"Bearer error="invalid_request""#);
            }
            ApiError::Forbidden(_) => {
                return challenge(
                    StatusCode::FORBIDDEN,
                    r#"Bearer error="insufficient_scope""#,
                );
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
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
