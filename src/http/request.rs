//! What a request asks for, checked once for streams and history alike: the consumer, the
//! topics, the types, the resume point.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, HeaderName};
use serde::Deserialize;

use crate::auth::Claims;
use crate::event::{ConsumerId, EventId};
use crate::filter::TypeFilter;
use crate::selection::{Reader, Selection};
use crate::topic::{MAX_TOPICS, Matcher, MatcherType};

use super::{ApiError, AppState};

pub(super) const CONSUMER_HEADER: HeaderName = HeaderName::from_static("x-consumer-id");
pub(super) const LAST_EVENT_ID_HEADER: HeaderName = HeaderName::from_static("last-event-id");
pub(super) const TYPES_HEADER: HeaderName = HeaderName::from_static("x-event-types");

/// Query parameters of `GET /events` (for clients that cannot send headers: `EventSource`) and of
/// `GET /history`.
#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    pub consumer: Option<String>,
    pub last_event_id: Option<String>,
    /// A token, for `EventSource` (which cannot send an Authorization header).
    pub access_token: Option<String>,
    /// The same, under Mercure's name.
    pub authorization: Option<String>,
    /// Type patterns, comma-separated (for `EventSource`, which cannot send `X-Event-Types`).
    pub types: Option<String>,
    /// `true`: events as `data: {"type", "payload"}` without an `event:` line (see
    /// [`crate::sse::Format`]).
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

/// What a request that reads events (a stream or a history search) asked for, and may read.
pub(super) struct Reading {
    pub query: EventsQuery,
    /// The consumer it follows: None when it follows topics only.
    pub consumer: Option<ConsumerId>,
    /// The topics it follows (`topic=` and Mercure's `match`, `match_exact`, `match_urlpattern`).
    pub matchers: Vec<Matcher>,
    pub types: Option<TypeFilter>,
    /// When its token expires (None without authentication).
    pub token_expires: Option<SystemTime>,
    /// The topics its token grants `subscribe` on, for private events.
    pub private_topics: Vec<Matcher>,
}

/// What an endpoint can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Follows {
    /// `GET /events` and `/history`: a consumer, topics, or both.
    ConsumersAndTopics,
    /// The Mercure hub: topics, whatever the request says of consumers.
    TopicsOnly,
}

impl Reading {
    /// Checks the query, the topics, the token, the consumer and the types, in that order.
    pub(super) fn check(
        state: &AppState,
        headers: &HeaderMap,
        raw_query: Option<&str>,
        query: Result<Query<EventsQuery>, QueryRejection>,
        follows: Follows,
    ) -> Result<Reading, ApiError> {
        let Query(query) = query
            .map_err(|error| ApiError::BadRequest(format!("malformed query string: {error}")))?;
        let matchers = matchers(raw_query, &state.hub.url)?;
        if follows == Follows::TopicsOnly && matchers.is_empty() {
            return Err(ApiError::BadRequest(
                "missing topic matcher: add match=<topic> or match_urlpattern=<pattern>".into(),
            ));
        }
        let names_consumer =
            follows == Follows::ConsumersAndTopics && names_consumer(headers, &query);
        let query_token = query
            .access_token
            .as_deref()
            .or(query.authorization.as_deref());
        // Anonymous streams may follow topics, when allowed: they get public events only.
        let claims = match state.claims(headers, query_token) {
            Err(ApiError::Unauthorized(_))
                if state.hub.anonymous && !matchers.is_empty() && !names_consumer =>
            {
                None
            }
            claims => claims?,
        };
        let token_expires = claims
            .as_ref()
            .map(|claims| UNIX_EPOCH + Duration::from_secs(claims.exp));
        let types = event_types(headers, &query, claims.as_ref())?;
        let private_topics = claims
            .as_ref()
            .map(|claims| claims.topics.subscribe.clone())
            .unwrap_or_default();
        let consumer = if matchers.is_empty() || names_consumer {
            Some(reader(claims, headers, raw_query, &query)?)
        } else {
            None
        };
        Ok(Reading {
            query,
            consumer,
            matchers,
            types,
            token_expires,
            private_topics,
        })
    }

    /// The consumer, for what follows one only (history searches).
    pub(super) fn consumer_only(&self) -> Result<&ConsumerId, ApiError> {
        match (&self.consumer, self.matchers.is_empty()) {
            (Some(consumer), true) => Ok(consumer),
            _ => Err(ApiError::BadRequest(
                "history searches follow one consumer: topics are not supported here".into(),
            )),
        }
    }

    /// What the stream follows and may read.
    pub(super) fn reader(&mut self) -> Reader {
        let selection = Selection::new(self.consumer.clone(), std::mem::take(&mut self.matchers))
            .expect("a reading follows a consumer or topics");
        Reader {
            selection,
            types: self.types.take(),
            private_topics: std::mem::take(&mut self.private_topics).into(),
        }
    }
}

/// The topic matchers in a query string: `topic` (exact) and Mercure's `match`, `match_exact`
/// and `match_urlpattern`; any other name in the `match` namespace is refused.
pub(super) fn matchers(raw_query: Option<&str>, hub: &url::Url) -> Result<Vec<Matcher>, ApiError> {
    let mut matchers = Vec::new();
    for (name, value) in form_pairs(raw_query.unwrap_or_default().as_bytes()) {
        // Parameters that are not matchers are someone else's to decode.
        let name = String::from_utf8_lossy(&name);
        let kind = match MatcherType::from_parameter(&name) {
            Some(kind) => kind.map_err(|why| ApiError::BadRequest(why.0))?,
            None if name == "topic" => MatcherType::Exact,
            None => continue,
        };
        if matchers.len() == MAX_TOPICS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_TOPICS} topic matchers on one stream"
            )));
        }
        let value = text(&name, value)?;
        let matcher = Matcher::parse(kind, &value, hub)
            .map_err(|why| ApiError::BadRequest(format!("invalid {name}: {why}")))?;
        matchers.push(matcher);
    }
    Ok(matchers)
}

/// The pairs of an `application/x-www-form-urlencoded` text (a query string or a body),
/// decoded into bytes: `+` is a space, `%XX` a byte. Each user turns what it reads into text
/// with [`text`], which refuses what is not UTF-8 instead of turning it into U+FFFD.
pub(super) fn form_pairs(raw: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let decode = |part: &[u8]| -> Vec<u8> {
        let spaced: Vec<u8> = part
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        percent_encoding::percent_decode(&spaced).collect()
    };
    raw.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(at) => (decode(&pair[..at]), decode(&pair[at + 1..])),
            None => (decode(pair), Vec::new()),
        })
        .collect()
}

/// A form field's decoded value as text; 400 naming the field when it is not UTF-8.
pub(super) fn text(name: &str, value: Vec<u8>) -> Result<String, ApiError> {
    String::from_utf8(value).map_err(|_| ApiError::BadRequest(format!("invalid {name}: not UTF-8")))
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
        (Some(Claims { sub: Some(sub), .. }), Err(_)) if !names_consumer(headers, query) => sub,
        (Some(claims), requested) => {
            let requested = requested?;
            if claims.sub.as_ref() != Some(&requested) {
                return Err(ApiError::Forbidden(match &claims.sub {
                    Some(sub) => format!(
                        "this token may read consumer {:?}, not {:?}",
                        sub.as_str(),
                        requested.as_str()
                    ),
                    None => format!(
                        "this token names no consumer (sub), so it may not read {:?}",
                        requested.as_str()
                    ),
                }));
            }
            requested
        }
    })
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
    let Some((allowed, patterns)) = token_types(claims)? else {
        return Ok(requested);
    };
    match requested {
        None => Ok(Some(allowed)),
        Some(requested) if requested.within(&allowed) => Ok(Some(requested)),
        Some(_) => Err(types_refused(patterns)),
    }
}

/// The types a token limits its bearer to, as a filter and as the claim's patterns; None when
/// it reads every type.
pub(super) fn token_types(
    claims: Option<&Claims>,
) -> Result<Option<(TypeFilter, &[String])>, ApiError> {
    let Some(patterns) = claims.and_then(|claims| claims.types.as_ref()) else {
        return Ok(None);
    };
    let allowed = TypeFilter::from_patterns(patterns.iter().map(String::as_str))
        .map_err(|why| ApiError::Unauthorized(format!("the token's types claim: {why}")))?;
    Ok(Some((allowed, patterns)))
}

/// 403 for types outside those a token allows.
pub(super) fn types_refused(patterns: &[String]) -> ApiError {
    ApiError::Forbidden(format!(
        "this token may read types {} only",
        patterns.join(",")
    ))
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
pub(super) fn last_event_id(
    headers: &HeaderMap,
    query: &EventsQuery,
) -> Result<Option<EventId>, ApiError> {
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

/// 415 unless the body is declared as JSON.
pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(
            "expected Content-Type: application/json".into(),
        ))
    }
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
