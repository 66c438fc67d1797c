//! Authentication (opt-in): signed tokens (JWT) that name the consumer the bearer may read (`sub`)
//! and whether it may publish (`publish: true`), and Mercure's access tokens, whose
//! `authorization_details` grant `publish` and `subscribe` on topic matchers (draft-08,
//! "Authorization Details"). One token may carry both.
//!
//! HS256 with a shared secret, or RS256 / ES256 with a public key (the backend that mints tokens
//! keeps the private key). A token travels as `Authorization: Bearer`, or, for `EventSource` which
//! cannot send headers, as the `access_token` (or Mercure's `authorization`) query parameter or the
//! `event_piper_token` (or Mercure's `mercureAuthorization`) cookie. The header wins over a cookie,
//! as the draft asks. The audience and issuer a token must carry are configurable
//! (`--jwt-audience`, `--jwt-issuer`); a token with Mercure authorization details must be typed
//! `at+jwt` (RFC 9068), so that a token minted for another purpose cannot grant topics.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::event::ConsumerId;
use crate::filter::TypeFilter;
use crate::topic::{Matcher, MatcherType};

/// The cookie a browser page may carry its token in.
pub const COOKIE: &str = "event_piper_token";
/// Mercure's cookie.
pub const MERCURE_COOKIE: &str = "mercureAuthorization";
/// The type of a Mercure authorization detail.
pub const MERCURE_DETAIL: &str = "https://mercure.rocks/authorization-detail";
/// Limits on what one token may carry (beyond them it is refused as invalid).
const MAX_DETAILS: usize = 32;
const MAX_DETAIL_TOPICS: usize = 64;

/// What a token grants on topics: the matchers of its Mercure authorization details, by action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicGrants {
    pub publish: Vec<Matcher>,
    pub subscribe: Vec<Matcher>,
}

impl TopicGrants {
    /// Whether every one of `topics` may be published.
    pub fn may_publish<S: AsRef<str>>(&self, topics: &[S]) -> bool {
        topics.iter().all(|topic| {
            self.publish
                .iter()
                .any(|grant| grant.matches(topic.as_ref()))
        })
    }
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The consumer whose events the bearer may read (a Mercure token may have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<ConsumerId>,
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
    /// RFC 9396 authorization details, as carried; read into `topics` when verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_details: Option<serde_json::Value>,
    /// What the Mercure authorization details grant.
    #[serde(skip)]
    pub topics: TopicGrants,
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
    /// The token's presentation, not the token, is wrong (answered with 400).
    #[error("{0}")]
    BadRequest(String),
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
    #[error("invalid --hub-url {0}")]
    BadHubUrl(String),
}

/// Verifies tokens.
#[derive(Clone)]
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    /// The hub's URL, against which relative URL patterns of grants are resolved.
    hub_url: url::Url,
}

/// What tokens must carry besides a valid signature and `exp`.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// `aud` must be or contain this (`--jwt-audience`).
    pub audience: Option<String>,
    /// `iss` must be exactly this (`--jwt-issuer`).
    pub issuer: Option<String>,
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

    /// Requires `aud` and `iss` as configured, and resolves relative patterns against `hub_url`.
    pub fn expecting(mut self, expect: &Expect, hub_url: url::Url) -> Auth {
        match &expect.audience {
            Some(audience) => {
                self.validation.set_audience(&[audience]);
                self.validation.validate_aud = true;
            }
            None => self.validation.validate_aud = false,
        }
        if let Some(issuer) = &expect.issuer {
            self.validation.set_issuer(&[issuer]);
        }
        self.hub_url = hub_url;
        self
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
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        validation.leeway = 5;
        Auth {
            key,
            validation,
            hub_url: url::Url::parse(crate::config::DEFAULT_HUB_URL).expect("a valid URL"),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| match error.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(error.to_string()),
            },
        )?;
        let mut claims = data.claims;
        if let Some(details) = &claims.authorization_details {
            // RFC 9068: an access token is typed at+jwt (or application/at+jwt).
            let typ = data.header.typ.as_deref().unwrap_or_default();
            let typ = typ
                .strip_prefix("application/")
                .or_else(|| typ.strip_prefix("APPLICATION/"))
                .unwrap_or(typ);
            if !typ.eq_ignore_ascii_case("at+jwt") {
                return Err(AuthError::Malformed(
                    "a token with authorization_details must have the typ at+jwt".into(),
                ));
            }
            claims.topics = topic_grants(details, &self.hub_url).map_err(AuthError::Malformed)?;
        }
        Ok(claims)
    }

    /// The request's token, from the Authorization header, the query parameter (`access_token`
    /// or `authorization`, which the caller reads), or a cookie, in that order; then verified.
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
                    .or_else(|| {
                        // The scheme is case-insensitive (RFC 9110).
                        let (scheme, token) = value.split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then_some(token)
                    })
                    .ok_or_else(|| {
                        AuthError::BadRequest("expected Authorization: Bearer <token>".into())
                    })
            })
            .transpose()?;
        let token = bearer
            .or(query_token)
            .or_else(|| cookie(headers, COOKIE))
            .or_else(|| cookie(headers, MERCURE_COOKIE))
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

/// Reads the Mercure authorization details of a token. Any detail of Mercure's type that does
/// not parse makes the whole token invalid (the draft forbids acting on the rest); details of
/// other types are someone else's and ignored, as are actions this hub does not know.
fn topic_grants(details: &serde_json::Value, hub_url: &url::Url) -> Result<TopicGrants, String> {
    use serde_json::Value;
    let details = details
        .as_array()
        .ok_or("authorization_details must be an array")?;
    let mut grants = TopicGrants::default();
    let mercure = details
        .iter()
        .filter(|detail| detail.get("type").and_then(Value::as_str) == Some(MERCURE_DETAIL));
    for (index, detail) in mercure.enumerate() {
        if index >= MAX_DETAILS {
            return Err(format!(
                "more than {MAX_DETAILS} Mercure authorization details"
            ));
        }
        let invalid = |why: &str| format!("authorization detail {index}: {why}");
        let actions = detail
            .get("actions")
            .and_then(Value::as_array)
            .filter(|actions| !actions.is_empty())
            .ok_or_else(|| invalid("actions must be a non-empty array"))?;
        let topics = detail
            .get("topics")
            .and_then(Value::as_array)
            .filter(|topics| !topics.is_empty() && topics.len() <= MAX_DETAIL_TOPICS)
            .ok_or_else(|| {
                invalid(&format!(
                    "topics must be an array of 1 to {MAX_DETAIL_TOPICS} matchers"
                ))
            })?;
        if detail
            .get("payload")
            .is_some_and(|payload| !payload.is_object())
        {
            return Err(invalid("payload must be an object"));
        }
        let mut matchers = Vec::with_capacity(topics.len());
        for topic in topics {
            let text = topic
                .get("match")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("each topic must be an object with a string \"match\""))?;
            let kind = match topic.get("match_type") {
                None => MatcherType::Exact,
                Some(Value::String(name)) => {
                    MatcherType::from_name(name).map_err(|why| invalid(&why.0))?
                }
                Some(_) => return Err(invalid("match_type must be a string")),
            };
            matchers.push(Matcher::parse(kind, text, hub_url).map_err(|why| invalid(&why.0))?);
        }
        for action in actions {
            match action.as_str() {
                Some("publish") => grants.publish.extend(matchers.iter().cloned()),
                Some("subscribe") => grants.subscribe.extend(matchers.iter().cloned()),
                Some(_) => {}
                None => return Err(invalid("actions must be strings")),
            }
        }
    }
    Ok(grants)
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
        sub: Some(
            ConsumerId::parse(sub.as_bytes())
                .map_err(|why| KeyError::BadSubject(why.to_string()))?,
        ),
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
        authorization_details: None,
        topics: TopicGrants::default(),
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
        assert_eq!(
            (claims.sub.as_ref().map(ConsumerId::as_str), claims.publish),
            (Some("toto"), true)
        );

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
            Err(AuthError::BadRequest(_))
        ));
    }

    fn mercure_token(typ: &str, details: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(typ.into());
        let claims = serde_json::json!({
            "exp": 4102444800u64,
            "aud": "https://hub.example/.well-known/mercure",
            "iss": "https://example.com",
            "authorization_details": details,
        });
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn mercure_authorization_details() {
        let hub: url::Url = "https://hub.example/.well-known/mercure".parse().unwrap();
        let expect = Expect {
            audience: Some(hub.to_string()),
            issuer: Some("https://example.com".into()),
        };
        let auth = Auth::from_secret(SECRET).unwrap().expecting(&expect, hub);
        let details = serde_json::json!([
            {"type": MERCURE_DETAIL, "actions": ["publish", "future-action"],
             "topics": [{"match": "https://example.com/books/:id", "match_type": "urlpattern"}]},
            {"type": MERCURE_DETAIL, "actions": ["subscribe"], "topics": [{"match": "*"}]},
            {"type": "https://someone.else/detail", "anything": 1},
        ]);
        let claims = auth
            .verify(&mercure_token("at+jwt", details.clone()))
            .unwrap();
        assert!(claims.sub.is_none());
        assert!(claims.topics.may_publish(&["https://example.com/books/1"]));
        assert!(
            !claims
                .topics
                .may_publish(&["https://example.com/books/1", "x"])
        );
        assert_eq!(claims.topics.subscribe, [Matcher::Any]);
        // Another typ, a bad match_type, a non-string action: the whole token is refused.
        assert!(auth.verify(&mercure_token("JWT", details)).is_err());
        for bad in [
            serde_json::json!([{"type": MERCURE_DETAIL, "actions": ["subscribe"],
                                "topics": [{"match": "a", "match_type": "regex"}]}]),
            serde_json::json!([{"type": MERCURE_DETAIL, "actions": [1], "topics": [{"match": "a"}]}]),
            serde_json::json!([{"type": MERCURE_DETAIL, "actions": ["publish"], "topics": []}]),
            serde_json::json!([{"type": MERCURE_DETAIL, "actions": ["publish"], "topics": ["a"]}]),
        ] {
            assert!(
                auth.verify(&mercure_token("at+jwt", bad.clone())).is_err(),
                "{bad}"
            );
        }
        // The audience and the issuer are checked when configured.
        let other_hub = Auth::from_secret(SECRET).unwrap().expecting(
            &Expect {
                audience: Some("https://other/.well-known/mercure".into()),
                issuer: None,
            },
            "https://other/.well-known/mercure".parse().unwrap(),
        );
        let token = mercure_token("at+jwt", serde_json::json!([]));
        assert!(other_hub.verify(&token).is_err());
        assert!(auth.verify(&token).is_ok());
    }
}
