//! What one stream follows and may read: a consumer, topic matchers, a type filter, and the
//! topics its token grants for private events.
//!
//! An event reaches a stream when the stream selects it and may read it:
//! - addressed to the stream's consumer (`subscriber`), or a broadcast (no subscriber, no
//!   topics) to a stream that follows a consumer: as before topics existed;
//! - addressed to a topic one of the stream's matchers selects: if the event is private, only
//!   when the stream's token grants `subscribe` on one of the event's topics (Mercure,
//!   draft-08, "Subscribers"); the matchers themselves never widen what a stream may read.
//!
//! Routing ([`crate::router`]), replay ([`crate::store`]) and the follower's final check all
//! decide from this one definition.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::event::ConsumerId;
use crate::filter::TypeFilter;
use crate::topic::Matcher;

/// The addresses a stream follows. Streams with equal selections share one live channel.
#[derive(Debug, Clone)]
pub struct Selection {
    consumer: Option<ConsumerId>,
    /// Sorted by [`Matcher::key`], without duplicates.
    matchers: Vec<Matcher>,
}

/// What an event is addressed to, and whether it is private.
#[derive(Debug, Clone, Copy)]
pub struct Address<'a> {
    pub subscriber: Option<&'a str>,
    pub topics: Option<&'a [String]>,
    pub private: bool,
}

impl Address<'_> {
    /// An event with neither a subscriber nor topics goes to every consumer.
    pub fn is_broadcast(&self) -> bool {
        self.subscriber.is_none() && self.topics.is_none()
    }
}

impl crate::event::EventRow {
    pub fn address(&self) -> Address<'_> {
        Address {
            subscriber: self.subscriber.as_deref(),
            topics: self.topics.as_deref(),
            private: self.private,
        }
    }
}

impl Selection {
    /// A consumer's events and the broadcasts, as `GET /events` has always followed them.
    pub fn consumer(consumer: ConsumerId) -> Selection {
        Selection {
            consumer: Some(consumer),
            matchers: Vec::new(),
        }
    }

    /// A consumer (optional) and topic matchers; None when it selects nothing at all.
    pub fn new(consumer: Option<ConsumerId>, mut matchers: Vec<Matcher>) -> Option<Selection> {
        matchers.sort_by(|a, b| a.key().cmp(&b.key()));
        matchers.dedup();
        // `*` selects every topic: any other matcher beside it adds nothing.
        if matchers.contains(&Matcher::Any) {
            matchers = vec![Matcher::Any];
        }
        (consumer.is_some() || !matchers.is_empty()).then_some(Selection { consumer, matchers })
    }

    pub fn followed_consumer(&self) -> Option<&ConsumerId> {
        self.consumer.as_ref()
    }

    pub fn matchers(&self) -> &[Matcher] {
        &self.matchers
    }

    /// The exact topics, which replay reads through the topic index.
    pub fn exact_topics(&self) -> impl Iterator<Item = &str> {
        self.matchers.iter().filter_map(|matcher| match matcher {
            Matcher::Exact(topic) => Some(&**topic),
            _ => None,
        })
    }

    /// Whether a matcher needs every topic event looked at (`*`, URL patterns): no index can
    /// serve it, so its replay reads the table in bounded ranges of ids.
    pub fn scans(&self) -> bool {
        self.matchers
            .iter()
            .any(|matcher| !matches!(matcher, Matcher::Exact(_)))
    }

    /// Whether the event is addressed to this selection through its consumer (or as a
    /// broadcast), which needs no grant.
    fn by_consumer(&self, address: &Address<'_>) -> bool {
        match &self.consumer {
            Some(consumer) => {
                address.is_broadcast() || address.subscriber == Some(consumer.as_str())
            }
            None => false,
        }
    }

    /// Whether one of its matchers selects one of the event's topics.
    fn by_topic(&self, address: &Address<'_>) -> bool {
        address.topics.is_some_and(|topics| {
            self.matchers
                .iter()
                .any(|matcher| matcher.matches_any(topics))
        })
    }

    /// Whether the event is routed to this selection's channel (before any grant).
    pub fn selects(&self, address: &Address<'_>) -> bool {
        self.by_consumer(address) || self.by_topic(address)
    }
}

impl PartialEq for Selection {
    fn eq(&self, other: &Selection) -> bool {
        self.consumer == other.consumer && self.matchers == other.matchers
    }
}

impl Eq for Selection {}

impl Hash for Selection {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.consumer.hash(state);
        for matcher in &self.matchers {
            matcher.key().hash(state);
        }
    }
}

/// A stream's whole reading: what it selects, which types it wants, and which topics its token
/// grants for private events.
#[derive(Debug, Clone)]
pub struct Reader {
    pub selection: Selection,
    pub types: Option<TypeFilter>,
    /// `subscribe` grants of the stream's token (Mercure authorization details).
    pub private_topics: Arc<[Matcher]>,
}

impl Reader {
    /// A consumer's reader without private topics (webhook deliveries, plain streams).
    pub fn consumer(consumer: ConsumerId, types: Option<TypeFilter>) -> Reader {
        Reader {
            selection: Selection::consumer(consumer),
            types,
            private_topics: Arc::new([]),
        }
    }

    /// Whether this reader gets the event: selected, of a wanted type, and readable.
    pub fn wants(&self, address: &Address<'_>, event_type: &str) -> bool {
        if self
            .types
            .as_ref()
            .is_some_and(|types| !types.matches(event_type))
        {
            return false;
        }
        if self.selection.by_consumer(address) {
            return true;
        }
        self.selection.by_topic(address) && (!address.private || self.may_read_private(address))
    }

    /// [`Reader::wants`] for an event the router queued on this reader's channel, which the
    /// selection selects already: only the type and a private event's grant are left to check.
    pub fn wants_routed(&self, address: &Address<'_>, event_type: &str) -> bool {
        if self
            .types
            .as_ref()
            .is_some_and(|types| !types.matches(event_type))
        {
            return false;
        }
        !address.private || self.selection.by_consumer(address) || self.may_read_private(address)
    }

    fn may_read_private(&self, address: &Address<'_>) -> bool {
        address.topics.is_some_and(|topics| {
            self.private_topics
                .iter()
                .any(|grant| grant.matches_any(topics))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::MatcherType;

    fn exact(topic: &str) -> Matcher {
        Matcher::Exact(topic.into())
    }

    fn topics(list: &[&str]) -> Vec<String> {
        list.iter().map(|topic| topic.to_string()).collect()
    }

    #[test]
    fn selections_are_canonical() {
        let a = Selection::new(None, vec![exact("b"), exact("a"), exact("b")]).unwrap();
        let b = Selection::new(None, vec![exact("a"), exact("b")]).unwrap();
        assert_eq!(a, b);
        let any = Selection::new(None, vec![exact("a"), Matcher::Any]).unwrap();
        assert_eq!(any.matchers(), [Matcher::Any]);
        assert!(Selection::new(None, vec![]).is_none());
    }

    #[test]
    fn consumers_topics_broadcasts_and_private_events() {
        let toto = ConsumerId::parse(b"toto").unwrap();
        let room = topics(&["room/1", "users/7/room/1"]);
        let base = url::Url::parse("https://example.com/hub").unwrap();
        let reader = Reader {
            selection: Selection::new(Some(toto), vec![exact("room/1")]).unwrap(),
            types: None,
            private_topics: Arc::new([Matcher::parse(
                MatcherType::UrlPattern,
                "/users/7/*",
                &base,
            )
            .unwrap()]),
        };
        fn address<'a>(
            subscriber: Option<&'a str>,
            topics: Option<&'a [String]>,
            private: bool,
        ) -> Address<'a> {
            Address {
                subscriber,
                topics,
                private,
            }
        }
        assert!(reader.wants(&address(Some("toto"), None, false), "t"));
        assert!(
            reader.wants(&address(Some("toto"), None, true), "t"),
            "its own"
        );
        assert!(reader.wants(&address(None, None, false), "t"), "broadcast");
        assert!(!reader.wants(&address(Some("other"), None, false), "t"));
        assert!(reader.wants(&address(None, Some(&room), false), "t"));
        // Private: granted through the alternate topic.
        assert!(reader.wants(&address(None, Some(&room), true), "t"));
        let room_only = topics(&["room/1"]);
        assert!(!reader.wants(&address(None, Some(&room_only), true), "t"));
        // Routed to its channel already: the grant is what is left to check.
        assert!(!reader.wants_routed(&address(None, Some(&room_only), true), "t"));
        assert!(reader.wants_routed(&address(None, Some(&room_only), false), "t"));
        assert!(reader.wants_routed(&address(Some("toto"), Some(&room_only), true), "t"));
        let topic_only = Selection::new(None, vec![exact("room/1")]).unwrap();
        assert!(
            !topic_only.selects(&address(None, None, false)),
            "no broadcasts"
        );
    }
}
