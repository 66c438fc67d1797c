//! Filters by event type: which of a consumer's events a stream wants (`?types=`,
//! `X-Event-Types`) or a token allows (its `types` claim).
//!
//! A filter is a list of patterns: an exact type (`order.created`), or a prefix ending in `.*`
//! (`order.*` matches `order.created` and `order.item.added`, not `order` or `orders.x`). The
//! follower applies one filter to replayed rows and live frames alike, so the two can never
//! disagree.

/// The longest pattern accepted, in bytes (as long as the longest type `POST /events` accepts).
const MAX_PATTERN_BYTES: usize = 256;
/// At most this many patterns in one filter.
const MAX_PATTERNS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeFilter {
    exact: Vec<String>,
    /// Each ends with the `.` of its `.*`.
    prefixes: Vec<String>,
}

impl TypeFilter {
    /// Parses a comma-separated list of patterns; the error is a one-line reason.
    pub fn parse(text: &str) -> Result<TypeFilter, String> {
        Self::from_patterns(text.split(','))
    }

    /// Builds a filter from patterns (a token's `types` claim is a list).
    pub fn from_patterns<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> Result<TypeFilter, String> {
        let mut filter = TypeFilter {
            exact: Vec::new(),
            prefixes: Vec::new(),
        };
        for pattern in patterns {
            let pattern = pattern.trim();
            if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
                return Err(format!(
                    "a type pattern must be 1 to {MAX_PATTERN_BYTES} bytes"
                ));
            }
            if pattern.chars().any(char::is_control) {
                return Err(format!(
                    "type pattern {pattern:?} contains control characters"
                ));
            }
            match pattern.strip_suffix('*') {
                Some(prefix) if prefix.ends_with('.') && !prefix[..prefix.len() - 1].is_empty() => {
                    if prefix.contains('*') {
                        return Err(bad_wildcard(pattern));
                    }
                    filter.prefixes.push(prefix.to_owned());
                }
                Some(_) => return Err(bad_wildcard(pattern)),
                None if pattern.contains('*') => return Err(bad_wildcard(pattern)),
                None => filter.exact.push(pattern.to_owned()),
            }
        }
        if filter.exact.len() + filter.prefixes.len() > MAX_PATTERNS {
            return Err(format!("at most {MAX_PATTERNS} type patterns"));
        }
        Ok(filter)
    }

    /// The exact names, and the prefixes as SQL `LIKE` patterns (`order.%`), for a query that
    /// filters in the database.
    pub fn to_sql(&self) -> (Vec<String>, Vec<String>) {
        let like = |prefix: &String| {
            let escaped = prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("{escaped}%")
        };
        (self.exact.clone(), self.prefixes.iter().map(like).collect())
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.exact.iter().any(|exact| exact == event_type)
            || self
                .prefixes
                .iter()
                .any(|prefix| event_type.len() > prefix.len() && event_type.starts_with(prefix))
    }

    /// Whether every event this filter can match is also matched by `allowed`: a stream may ask
    /// for less than its token allows, not more.
    pub fn within(&self, allowed: &TypeFilter) -> bool {
        self.exact.iter().all(|exact| allowed.matches(exact))
            && self.prefixes.iter().all(|prefix| {
                allowed
                    .prefixes
                    .iter()
                    .any(|wider| prefix.starts_with(wider.as_str()))
            })
    }
}

fn bad_wildcard(pattern: &str) -> String {
    format!("type pattern {pattern:?}: `*` may only end a pattern, after a `.` (as in order.*)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(text: &str) -> TypeFilter {
        TypeFilter::parse(text).unwrap()
    }

    #[test]
    fn exact_names_and_prefixes() {
        let orders = filter("order.*, ping");
        for yes in ["order.created", "order.item.added", "ping"] {
            assert!(orders.matches(yes), "{yes}");
        }
        for no in ["order", "order.", "orders.x", "pingpong", "x.order.created"] {
            assert!(!orders.matches(no), "{no}");
        }
    }

    #[test]
    fn prefixes_become_escaped_like_patterns() {
        let (exact, like) = filter("a_b.*,c%d.*,ping").to_sql();
        assert_eq!(exact, ["ping"]);
        assert_eq!(like, ["a\\_b.%", "c\\%d.%"]);
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in [
            "", "a,,b", "*", ".*", "order*", "or*der", "a.*.b", "a.**", "a\tb",
        ] {
            assert!(TypeFilter::parse(bad).is_err(), "{bad:?}");
        }
        let many = vec!["t"; 65].join(",");
        assert_eq!(
            TypeFilter::parse(&many).unwrap_err(),
            "at most 64 type patterns"
        );
    }

    #[test]
    fn a_request_must_stay_within_what_a_token_allows() {
        let allowed = filter("order.*,ping");
        assert!(filter("order.created").within(&allowed));
        assert!(filter("order.item.*,ping").within(&allowed));
        assert!(!filter("pong").within(&allowed));
        assert!(!filter("order").within(&allowed));
        assert!(!filter("a.*").within(&filter("a.b")));
    }
}
