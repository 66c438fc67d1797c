//! Topics: what an event is addressed to besides its consumer, and the matchers a stream selects
//! them with.
//!
//! A topic is any string without control or invisible formatting characters (Mercure,
//! draft-dunglas-mercure-08, "Terminology"); an IRI is recommended, not required. A matcher is
//! exact (byte for byte), a URL pattern (the WHATWG URL Pattern standard, relative patterns and
//! topics resolved against the hub's URL), or `*`, which matches every topic. URL patterns are
//! compiled with the `regex` crate, whose matching time is linear in the input, so a crafted
//! pattern cannot make a match backtrack for ever (the draft's "URL-Pattern Denial of Service").

use std::fmt;
use std::sync::Arc;

use url::Url;
use urlpattern::{UrlPattern, UrlPatternInit, UrlPatternMatchInput};

/// The longest topic or matcher accepted, in bytes.
pub const MAX_TOPIC_BYTES: usize = 1024;
/// At most this many topics on one event, and matchers on one stream.
pub const MAX_TOPICS: usize = 32;

/// Why a topic or matcher was refused, as a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTopic(pub String);

/// Checks a topic, a matcher or a publisher's id: UTF-8 (the caller has a `&str`), 1 to
/// [`MAX_TOPIC_BYTES`] bytes, no C0 or C1 control characters, DEL, or format characters.
pub fn check_text(what: &str, text: &str) -> Result<(), InvalidTopic> {
    if text.is_empty() || text.len() > MAX_TOPIC_BYTES {
        return Err(InvalidTopic(format!(
            "{what} must be 1 to {MAX_TOPIC_BYTES} bytes"
        )));
    }
    if let Some(bad) = text.chars().find(|&c| c.is_control() || is_format(c)) {
        return Err(InvalidTopic(format!(
            "{what} {text:?} contains U+{:04X}, a control or format character",
            bad as u32
        )));
    }
    Ok(())
}

/// Unicode general category Cf (format characters, Unicode 15): invisible characters that make
/// two different topics look the same.
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

/// A topic matcher.
#[derive(Clone)]
pub enum Matcher {
    /// `*`: every topic.
    Any,
    Exact(Arc<str>),
    UrlPattern(Arc<CompiledPattern>),
}

/// A URL pattern, kept with its source text (for equality, hashing and messages).
pub struct CompiledPattern {
    source: String,
    pattern: UrlPattern,
    base: Url,
}

/// How a matcher was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatcherType {
    Exact,
    UrlPattern,
}

impl MatcherType {
    /// The matcher type of a subscribe parameter: `match` and `match_exact` are exact,
    /// `match_urlpattern` a URL pattern. Any other name in the reserved `match` namespace
    /// (compared case-insensitively) is an error; names outside it are None.
    pub fn from_parameter(name: &str) -> Option<Result<MatcherType, InvalidTopic>> {
        if !name
            .get(..5)
            .is_some_and(|head| head.eq_ignore_ascii_case("match"))
        {
            return None;
        }
        Some(match name {
            "match" | "match_exact" => Ok(MatcherType::Exact),
            "match_urlpattern" => Ok(MatcherType::UrlPattern),
            _ => Err(InvalidTopic(format!(
                "unsupported matcher parameter {name:?}: use match, match_exact or match_urlpattern"
            ))),
        })
    }

    /// The `match_type` of an authorization detail's topic matcher (absent: exact).
    pub fn from_name(name: &str) -> Result<MatcherType, InvalidTopic> {
        match name {
            "exact" => Ok(MatcherType::Exact),
            "urlpattern" => Ok(MatcherType::UrlPattern),
            _ => Err(InvalidTopic(format!("unsupported match_type {name:?}"))),
        }
    }
}

impl Matcher {
    /// Parses a matcher of the given type; `base` is the hub's URL, against which relative
    /// patterns are resolved.
    pub fn parse(kind: MatcherType, text: &str, base: &Url) -> Result<Matcher, InvalidTopic> {
        check_text("a topic matcher", text)?;
        if text == "*" {
            return Ok(Matcher::Any);
        }
        match kind {
            MatcherType::Exact => Ok(Matcher::Exact(text.into())),
            MatcherType::UrlPattern => {
                let invalid =
                    |why: String| InvalidTopic(format!("invalid URL pattern {text:?}: {why}"));
                let init = UrlPatternInit::parse_constructor_string::<regex::Regex>(
                    text,
                    Some(base.clone()),
                )
                .map_err(|error| invalid(error.to_string()))?;
                let pattern = UrlPattern::parse(init, Default::default())
                    .map_err(|error| invalid(error.to_string()))?;
                Ok(Matcher::UrlPattern(Arc::new(CompiledPattern {
                    source: text.to_owned(),
                    pattern,
                    base: base.clone(),
                })))
            }
        }
    }

    /// Whether this matcher selects `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::Exact(exact) => **exact == *topic,
            Matcher::UrlPattern(compiled) => compiled.matches(topic),
        }
    }

    /// Whether it matches one of `topics`.
    pub fn matches_any<S: AsRef<str>>(&self, topics: &[S]) -> bool {
        topics.iter().any(|topic| self.matches(topic.as_ref()))
    }

    /// The matcher's text, as given.
    pub fn as_str(&self) -> &str {
        match self {
            Matcher::Any => "*",
            Matcher::Exact(exact) => exact,
            Matcher::UrlPattern(compiled) => &compiled.source,
        }
    }

    /// A key that tells matchers apart (exact `x` and the pattern `x` are different matchers).
    pub fn key(&self) -> (u8, &str) {
        match self {
            Matcher::Any => (0, "*"),
            Matcher::Exact(exact) => (1, exact),
            Matcher::UrlPattern(compiled) => (2, &compiled.source),
        }
    }
}

impl CompiledPattern {
    fn matches(&self, topic: &str) -> bool {
        // A topic that is not a URL reference against the hub's URL matches no pattern.
        let Ok(url) = self.base.join(topic) else {
            return false;
        };
        self.pattern
            .test(UrlPatternMatchInput::Url(url))
            .unwrap_or(false)
    }
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Matcher) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Matcher {}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Any => f.write_str("Any"),
            Matcher::Exact(exact) => write!(f, "Exact({exact:?})"),
            Matcher::UrlPattern(compiled) => write!(f, "UrlPattern({:?})", compiled.source),
        }
    }
}

/// Whether `topic`, resolved against the hub's URL, addresses the hub's own namespace (its path,
/// or below it), which only the hub may publish to. Dot segments are removed and percent-encoded
/// unreserved characters decoded first, so `/.well-known/%6Dercure` is caught too.
pub fn is_reserved(topic: &str, hub: &Url) -> bool {
    let Ok(resolved) = hub.join(topic) else {
        return false;
    };
    let path = decode_unreserved(resolved.path());
    // Url::join already removed the dot segments; decoding may reveal new ones (%2E%2E).
    let path = Url::parse("http://x")
        .and_then(|base| base.join(&path))
        .map(|url| url.path().to_owned())
        .unwrap_or(path);
    let hub_path = hub.path().trim_end_matches('/');
    path == hub_path
        || path
            .strip_prefix(hub_path)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Decodes the percent-encoded octets that stand for unreserved characters (RFC 3986, 2.3).
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok())
                && (byte.is_ascii_alphanumeric() || b"-._~".contains(&byte))
            {
                out.push(byte as char);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Url {
        Url::parse("https://example.com/.well-known/mercure").unwrap()
    }

    fn pattern(text: &str) -> Matcher {
        Matcher::parse(MatcherType::UrlPattern, text, &hub()).unwrap()
    }

    #[test]
    fn exact_is_byte_for_byte() {
        let exact = Matcher::parse(MatcherType::Exact, "https://example.com/a", &hub()).unwrap();
        assert!(exact.matches("https://example.com/a"));
        assert!(!exact.matches("https://example.com/A"));
        assert!(!exact.matches("https://example.com/a/"));
        assert_eq!(
            Matcher::parse(MatcherType::Exact, "*", &hub()).unwrap(),
            Matcher::Any
        );
    }

    #[test]
    fn url_patterns_match_by_component() {
        let books = pattern("https://example.com/books/:id");
        assert!(books.matches("https://example.com/books/1"));
        assert!(
            books.matches("https://EXAMPLE.com/books/1"),
            "hosts are case-insensitive"
        );
        assert!(!books.matches("https://example.com/books/1/reviews"));
        assert!(!books.matches("https://example.com/Books/1"));
        assert!(!books.matches("https://example.net/books/1"));
        // Relative patterns and topics resolve against the hub's URL.
        let relative = pattern("/books/:id");
        assert!(relative.matches("https://example.com/books/7"));
        assert!(relative.matches("/books/7"));
        assert!(!pattern("https://example.com/:x").matches("not a url\u{0}"));
        assert!(Matcher::parse(MatcherType::UrlPattern, "https://example.com/(", &hub()).is_err());
    }

    #[test]
    fn text_constraints() {
        assert!(check_text("topic", "a").is_ok());
        assert!(check_text("topic", "").is_err());
        assert!(check_text("topic", "a\u{7f}").is_err());
        assert!(check_text("topic", "a\u{85}").is_err(), "C1");
        assert!(
            check_text("topic", "a\u{200b}b").is_err(),
            "zero-width space"
        );
        assert!(check_text("topic", &"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
    }

    #[test]
    fn matcher_parameters() {
        let kind = |name| MatcherType::from_parameter(name);
        assert_eq!(kind("match"), Some(Ok(MatcherType::Exact)));
        assert_eq!(kind("match_exact"), Some(Ok(MatcherType::Exact)));
        assert_eq!(kind("match_urlpattern"), Some(Ok(MatcherType::UrlPattern)));
        assert!(matches!(kind("matches"), Some(Err(_))));
        assert!(matches!(kind("MATCH"), Some(Err(_))));
        assert!(matches!(kind("match_uritemplate"), Some(Err(_))));
        assert_eq!(kind("topic"), None);
        assert_eq!(kind("mat"), None);
    }

    #[test]
    fn the_hub_namespace_is_reserved() {
        for reserved in [
            "/.well-known/mercure",
            "/.well-known/mercure/subscriptions/x",
            "https://other.example/.well-known/mercure",
            "/.well-known/%6Dercure/x",
            "/.well-known/mercure/../mercure/x",
            "/a/../.well-known/mercure",
        ] {
            assert!(is_reserved(reserved, &hub()), "{reserved}");
        }
        for free in [
            "/.well-known/mercurex",
            "https://example.com/books/1",
            "books",
            "urn:x",
        ] {
            assert!(!is_reserved(free, &hub()), "{free}");
        }
    }
}
