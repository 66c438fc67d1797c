//! `GET /openapi.json`: the OpenAPI 3.1 description of the HTTP API.
//!
//! The document is a checked-in file (`openapi.json` beside this module), written by hand and
//! embedded at compile time. A generator such as utoipa would need annotations on every handler
//! and typed response structs, where the handlers build their JSON with `json!` or in SQL, and
//! it would still leave what matters most to a client to be written by hand: the byte-level
//! rules of consumers and topics, what wins between a header and a parameter, the error bodies
//! and challenges. Drift is caught by tests instead: `tests/openapi.rs` checks that the
//! document's paths and methods are exactly the router's, and runs schemathesis against the
//! running service with it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /openapi.json`.
pub(super) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_json() {
        let document: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert_eq!(document["openapi"], "3.1.0");
        assert!(
            document["paths"]
                .as_object()
                .is_some_and(|paths| !paths.is_empty())
        );
    }
}
