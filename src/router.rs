//! The router: selection -> live channel of rendered frames.
//!
//! A channel exists while at least one stream of its selection (a consumer, topic matchers, or
//! both: [`crate::selection`]) is open: created by the first subscription and dropped with the
//! last, so an event costs work only for the selections it is addressed to. Each channel is a
//! bounded broadcast ([`crate::channel`]): every open stream of the selection receives every
//! frame, and a stream that falls too far behind is told so (lag) instead of holding the others
//! back.
//!
//! Routing is per event, never per stream: a consumer's channels and an exact topic's channels
//! are found in maps; each distinct pattern is matched once per event, whatever the number of
//! streams behind it. An event addressed to several of a selection's topics is queued on its
//! channel once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::channel::{self, Receiver, Sender};
use crate::event::ConsumerId;
use crate::selection::Selection;
use crate::sse::Frame;
use crate::topic::Matcher;

pub struct Router {
    channels: Mutex<Channels>,
    capacity: usize,
    limits: Limits,
    /// Open subscriptions; changed only under the `channels` lock.
    open: AtomicUsize,
}

/// A channel's number, the key of the indexes.
type ChannelId = u64;

#[derive(Default)]
struct Channels {
    next: ChannelId,
    by_selection: HashMap<Selection, ChannelId>,
    senders: HashMap<ChannelId, (Sender, Selection)>,
    /// Channels of selections that follow a consumer (a consumer may be in several: with
    /// different topics beside it).
    by_consumer: HashMap<ConsumerId, Vec<ChannelId>>,
    by_topic: HashMap<Arc<str>, Vec<ChannelId>>,
    /// Patterns and `*`, each with the channels of the selections that hold it.
    patterns: Vec<(Matcher, Vec<ChannelId>)>,
    /// Open streams per followed consumer, for the per-consumer limit.
    consumer_streams: HashMap<ConsumerId, usize>,
}

impl Channels {
    fn index(&mut self, selection: &Selection, id: ChannelId) {
        if let Some(consumer) = selection.followed_consumer() {
            self.by_consumer
                .entry(consumer.clone())
                .or_default()
                .push(id);
        }
        for matcher in selection.matchers() {
            match matcher {
                Matcher::Exact(topic) => self.by_topic.entry(topic.clone()).or_default().push(id),
                _ => match self.patterns.iter_mut().find(|(held, _)| held == matcher) {
                    Some((_, ids)) => ids.push(id),
                    None => self.patterns.push((matcher.clone(), vec![id])),
                },
            }
        }
    }

    fn unindex(&mut self, selection: &Selection, id: ChannelId) {
        fn remove<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<ChannelId>>, key: &K, id: u64) {
            if let Some(ids) = map.get_mut(key) {
                ids.retain(|held| *held != id);
                if ids.is_empty() {
                    map.remove(key);
                }
            }
        }
        if let Some(consumer) = selection.followed_consumer() {
            remove(&mut self.by_consumer, consumer, id);
        }
        for matcher in selection.matchers() {
            match matcher {
                Matcher::Exact(topic) => remove(&mut self.by_topic, topic, id),
                _ => {
                    for (_, ids) in &mut self.patterns {
                        ids.retain(|held| *held != id);
                    }
                    self.patterns.retain(|(_, ids)| !ids.is_empty());
                }
            }
        }
    }

    /// The channels an event goes to, each once, into `targets`.
    fn targets(&self, frame: &Frame, targets: &mut Vec<ChannelId>) {
        targets.clear();
        let address = frame.address();
        if address.is_broadcast() {
            targets.extend(self.by_consumer.values().flatten());
        }
        if let Some(ids) = address
            .subscriber
            .and_then(|subscriber| self.by_consumer.get(subscriber))
        {
            targets.extend(ids);
        }
        if let Some(topics) = address.topics {
            for topic in topics {
                if let Some(ids) = self.by_topic.get(topic.as_str()) {
                    targets.extend(ids);
                }
            }
            for (matcher, ids) in &self.patterns {
                if matcher.matches_any(topics) {
                    targets.extend(ids);
                }
            }
            targets.sort_unstable();
            targets.dedup();
        }
    }
}

/// How many streams may be open at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub streams: usize,
    pub streams_per_consumer: usize,
}

impl Limits {
    pub const NONE: Limits = Limits {
        streams: usize::MAX,
        streams_per_consumer: usize::MAX,
    };
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many open streams on this instance")]
    TooManyStreams,
    #[error("too many open streams for this consumer")]
    TooManyForConsumer,
}

impl Router {
    pub fn new(capacity: usize, limits: Limits) -> Arc<Router> {
        Arc::new(Router {
            channels: Mutex::new(Channels::default()),
            capacity: capacity.max(1),
            limits,
            open: AtomicUsize::new(0),
        })
    }

    fn channels(&self) -> MutexGuard<'_, Channels> {
        // The maps stay consistent even if a holder panicked: no critical section can panic
        // between the updates of the maps that belong together.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to the frames `selection` selects from now on, within the limits.
    pub fn subscribe(self: &Arc<Self>, selection: &Selection) -> Result<Subscription, Refused> {
        let mut channels = self.channels();
        if self.open.load(Ordering::Relaxed) >= self.limits.streams {
            return Err(Refused::TooManyStreams);
        }
        if let Some(consumer) = selection.followed_consumer() {
            let open = channels
                .consumer_streams
                .get(consumer)
                .copied()
                .unwrap_or(0);
            if open >= self.limits.streams_per_consumer {
                return Err(Refused::TooManyForConsumer);
            }
            *channels
                .consumer_streams
                .entry(consumer.clone())
                .or_insert(0) += 1;
        }
        let id = match channels.by_selection.get(selection) {
            Some(id) => *id,
            None => {
                let id = channels.next;
                channels.next += 1;
                channels.by_selection.insert(selection.clone(), id);
                let sender = channel::channel(self.capacity);
                channels.senders.insert(id, (sender, selection.clone()));
                channels.index(selection, id);
                id
            }
        };
        let receiver = channels.senders[&id].0.subscribe();
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            receiver: Some(receiver),
            channel: id,
            router: Arc::clone(self),
        })
    }

    /// Hands a batch of frames, in id order, to the channels that select them. One lock for the
    /// whole batch; a frame nobody selects costs a few map lookups.
    pub fn route<'a>(&self, frames: impl IntoIterator<Item = &'a Frame>) {
        let channels = self.channels();
        let mut targets = Vec::new();
        for frame in frames {
            channels.targets(frame, &mut targets);
            for id in &targets {
                if let Some((sender, _)) = channels.senders.get(id) {
                    sender.send(frame.clone());
                }
            }
        }
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Consumers with at least one open stream.
    pub fn consumers(&self) -> usize {
        self.channels().consumer_streams.len()
    }

    /// Distinct exact topics and patterns with at least one open stream.
    pub fn topics(&self) -> usize {
        let channels = self.channels();
        channels.by_topic.len() + channels.patterns.len()
    }
}

/// A stream's end of its selection's channel. Dropping the last one removes the channel.
pub struct Subscription {
    receiver: Option<Receiver>,
    channel: ChannelId,
    router: Arc<Router>,
}

impl Subscription {
    pub fn receiver(&mut self) -> &mut Receiver {
        self.receiver
            .as_mut()
            .expect("the receiver is only taken in drop")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Drop the receiver first, then check under the lock: subscribe() also runs under it, so
        // a count of zero here means nobody can be about to use this channel.
        drop(self.receiver.take());
        let mut channels = self.router.channels();
        self.router.open.fetch_sub(1, Ordering::Relaxed);
        let Some((sender, selection)) = channels.senders.get(&self.channel) else {
            return;
        };
        let empty = sender.receiver_count() == 0;
        let selection = selection.clone();
        if let Some(consumer) = selection.followed_consumer()
            && let Some(open) = channels.consumer_streams.get_mut(consumer)
        {
            *open -= 1;
            if *open == 0 {
                channels.consumer_streams.remove(consumer);
            }
        }
        if empty {
            channels.senders.remove(&self.channel);
            channels.by_selection.remove(&selection);
            channels.unindex(&selection, self.channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, EventRow};
    use crate::topic::MatcherType;

    fn frame(id: i64, subscriber: Option<&str>) -> Frame {
        Frame::from_row(EventRow::to_consumer(EventId(id), "t", subscriber, "1"))
    }

    fn topic_frame(id: i64, topics: &[&str]) -> Frame {
        let mut row = EventRow::to_consumer(EventId(id), "t", None, "1");
        row.topics = Some(topics.iter().map(|topic| topic.to_string()).collect());
        Frame::from_row(row)
    }

    fn consumer(name: &str) -> Selection {
        Selection::consumer(ConsumerId::parse(name.as_bytes()).unwrap())
    }

    fn topics(matchers: Vec<Matcher>) -> Selection {
        Selection::new(None, matchers).unwrap()
    }

    fn ids(subscription: &mut Subscription) -> Vec<i64> {
        std::iter::from_fn(|| subscription.receiver().try_recv())
            .map(|frame| frame.unwrap().id.0)
            .collect()
    }

    #[test]
    fn channels_live_as_long_as_their_subscriptions() {
        let router = Router::new(8, Limits::NONE);
        let mut a1 = router.subscribe(&consumer("a")).unwrap();
        let mut a2 = router.subscribe(&consumer("a")).unwrap();
        let mut b = router.subscribe(&consumer("b")).unwrap();
        assert_eq!(router.consumers(), 2);

        router.route(&[
            frame(1, Some("a")),
            frame(2, Some("b")),
            frame(3, Some("c")),
            frame(4, None),
        ]);
        assert_eq!(a1.receiver().try_recv().unwrap().unwrap().id, EventId(1));
        assert_eq!(a1.receiver().try_recv().unwrap().unwrap().id, EventId(4));
        assert_eq!(a2.receiver().try_recv().unwrap().unwrap().id, EventId(1));
        assert_eq!(a2.receiver().try_recv().unwrap().unwrap().id, EventId(4));
        assert_eq!(b.receiver().try_recv().unwrap().unwrap().id, EventId(2));
        assert_eq!(b.receiver().try_recv().unwrap().unwrap().id, EventId(4));
        assert!(b.receiver().try_recv().is_none());

        drop(a1);
        assert_eq!(router.consumers(), 2);
        drop(a2);
        assert_eq!(router.consumers(), 1);
        drop(b);
        assert_eq!(router.consumers(), 0);
    }

    #[test]
    fn limits_are_enforced_and_freed() {
        let router = Router::new(
            8,
            Limits {
                streams: 3,
                streams_per_consumer: 2,
            },
        );
        let a1 = router.subscribe(&consumer("a")).unwrap();
        let _a2 = router.subscribe(&consumer("a")).unwrap();
        assert_eq!(
            router.subscribe(&consumer("a")).err(),
            Some(Refused::TooManyForConsumer)
        );
        let _b = router.subscribe(&consumer("b")).unwrap();
        assert_eq!(
            router.subscribe(&consumer("c")).err(),
            Some(Refused::TooManyStreams)
        );
        drop(a1);
        assert!(router.subscribe(&consumer("c")).is_ok());
    }

    #[test]
    fn topics_reach_only_the_selections_that_select_them_and_once() {
        let router = Router::new(8, Limits::NONE);
        let base = url::Url::parse("https://example.com/hub").unwrap();
        let books = Matcher::parse(MatcherType::UrlPattern, "/books/:id", &base).unwrap();
        let exact = |topic: &str| Matcher::Exact(topic.into());
        let mut room = router
            .subscribe(&topics(vec![exact("room/1"), exact("room/2")]))
            .unwrap();
        let mut pattern = router.subscribe(&topics(vec![books.clone()])).unwrap();
        let mut both = router
            .subscribe(&topics(vec![books, exact("https://example.com/books/1")]))
            .unwrap();
        let mut everything = router.subscribe(&topics(vec![Matcher::Any])).unwrap();
        let mut toto = router.subscribe(&consumer("toto")).unwrap();
        assert_eq!(
            router.topics(),
            5,
            "room/1, room/2, books/1, the pattern, *"
        );

        router.route(&[
            topic_frame(1, &["room/1", "room/2"]),
            topic_frame(2, &["https://example.com/books/1"]),
            topic_frame(3, &["room/3"]),
            frame(4, None),
        ]);
        assert_eq!(ids(&mut room), [1], "two of its topics: once");
        assert_eq!(ids(&mut pattern), [2]);
        assert_eq!(ids(&mut both), [2], "pattern and exact: once");
        assert_eq!(ids(&mut everything), [1, 2, 3]);
        assert_eq!(ids(&mut toto), [4], "broadcasts reach consumers only");

        drop((room, pattern, both, everything));
        assert_eq!(router.topics(), 0);
        drop(toto);
        assert_eq!(router.consumers(), 0);
    }
}
