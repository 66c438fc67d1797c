//! Authentication (opt-in): signed tokens (JWT) that name the consumer the bearer may read (`sub`)
//! and whether it may publish (`publish: true`).
//!
//! HS256 with a shared secret, or RS256 / ES256 with a public key (the backend that mints tokens
//! keeps the private key). A token travels as `Authorization: Bearer`, or, for `EventSource` which
//! cannot send headers, as the `access_token` query parameter or the `event_piper_token` cookie.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::event::ConsumerId;
use crate::filter::TypeFilter;

/// The cookie a browser page may carry its token in.
pub const COOKIE: &str = "event_piper_token";

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The consumer whose events the bearer may read.
    pub sub: ConsumerId,
    /// Expiry, in seconds since the Unix epoch (required).
    pub exp: u64,
    /// Whether the bearer may publish events (POST /events).
    #[serde(default)]
    pub publish: bool,
    /// Type patterns (`order.*`, `ping`): the bearer reads only events of these types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// Whether the bearer may manage the webhook subscriptions of its consumer (`sub`): a
    /// subscription sends the consumer's events to any URL, so it is a grant of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub subscriptions: bool,
}

/// Why a request is not authenticated; answered with 401.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "missing token: send Authorization: Bearer <token> (or access_token=, or the event_piper_token cookie)"
    )]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token signature")]
    BadSignature,
    #[error("malformed token: {0}")]
    Malformed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: expected an RSA or EC (P-256) public key in PEM form")]
    NotAKey(String),
    #[error("the JWT secret must be at least 32 bytes")]
    ShortSecret,
    #[error("invalid consumer id for the token's subject: {0}")]
    BadSubject(String),
    #[error("invalid types for the token: {0}")]
    BadTypes(String),
}

/// Verifies tokens.
#[derive(Clone)]
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl Auth {
    /// From `--jwt-secret` (HS256).
    pub fn from_secret(secret: &str) -> Result<Auth, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError::ShortSecret);
        }
        Ok(Auth::new(
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        ))
    }

    /// From `--jwt-public-key` (a PEM file: RSA for RS256, EC P-256 for ES256).
    pub fn from_public_key(path: &Path) -> Result<Auth, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Auth::new(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Auth::new(key, Algorithm::ES256));
        }
        Err(KeyError::NotAKey(path.display().to_string()))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Auth {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Auth { key, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(error.to_string()),
            })
    }

    /// The request's token, from the Authorization header, the `access_token` query parameter,
    /// or the cookie, in that order; then verified.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Claims, AuthError> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        AuthError::Malformed("expected Authorization: Bearer <token>".into())
                    })
            })
            .transpose()?;
        let token = bearer
            .or(query_token)
            .or_else(|| cookie(headers, COOKIE))
            .ok_or(AuthError::Missing)?;
        self.verify(token.trim())
    }
}

/// The value of cookie `name`, if the request carries it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// Mints an HS256 token, as `event-piper token` does for a backend to copy.
pub fn mint(secret: &str, sub: &str, ttl: Duration, publish: bool) -> Result<String, KeyError> {
    let grants = Grants {
        publish,
        ..Grants::default()
    };
    mint_granting(secret, sub, ttl, grants)
}

/// What a minted token grants besides reading its consumer's events.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grants<'a> {
    pub publish: bool,
    pub subscriptions: bool,
    /// Only events of these type patterns (comma-separated, as in `?types=`).
    pub types: Option<&'a str>,
}

/// [`mint`], with every grant a token can carry.
pub fn mint_granting(
    secret: &str,
    sub: &str,
    ttl: Duration,
    Grants {
        publish,
        subscriptions,
        types,
    }: Grants<'_>,
) -> Result<String, KeyError> {
    if secret.len() < 32 {
        return Err(KeyError::ShortSecret);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Claims {
        sub: ConsumerId::parse(sub.as_bytes())
            .map_err(|why| KeyError::BadSubject(why.to_string()))?,
        exp: (now + ttl).as_secs(),
        publish,
        types: match types {
            Some(text) => {
                TypeFilter::parse(text).map_err(KeyError::BadTypes)?;
                Some(
                    text.split(',')
                        .map(|pattern| pattern.trim().to_owned())
                        .collect(),
                )
            }
            None => None,
        },
        subscriptions,
    };
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|error| KeyError::NotAKey(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify_and_others_do_not() {
        let auth = Auth::from_secret(SECRET).unwrap();
        let token = mint(SECRET, "toto", Duration::from_secs(60), true).unwrap();
        let claims = auth.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.publish), ("toto", true));

        let other = mint(
            "another secret, also 32 bytes long",
            "toto",
            Duration::from_secs(60),
            false,
        )
        .unwrap();
        assert_eq!(auth.verify(&other), Err(AuthError::BadSignature));
        assert!(matches!(
            auth.verify("not.a.token"),
            Err(AuthError::Malformed(_))
        ));
        assert!(Auth::from_secret("short").is_err());
    }

    #[test]
    fn tokens_come_from_header_query_or_cookie() {
        let auth = Auth::from_secret(SECRET).unwrap();
        let token = mint(SECRET, "toto", Duration::from_secs(60), false).unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(auth.authenticate(&headers, None), Err(AuthError::Missing));
        assert!(auth.authenticate(&headers, Some(&token)).is_ok());
        headers.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={token}").parse().unwrap(),
        );
        assert!(auth.authenticate(&headers, None).is_ok());
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(matches!(
            auth.authenticate(&headers, None),
            Err(AuthError::Malformed(_))
        ));
    }
}
