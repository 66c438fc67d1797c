//! The router: consumer id -> live channel of rendered frames.
//!
//! A consumer's channel exists while at least one of its streams is open: created by the first
//! subscription and dropped with the last, so an event costs work only for consumers that are
//! listening. Each channel is a bounded broadcast ([`crate::channel`]): every open stream of the
//! consumer receives every frame, and a stream that falls too far behind is told so (lag) instead
//! of holding the others back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::channel::{self, Receiver, Sender};
use crate::event::ConsumerId;
use crate::sse::Frame;

pub struct Router {
    channels: Mutex<HashMap<ConsumerId, Sender>>,
    capacity: usize,
    limits: Limits,
    /// Open subscriptions; changed only under the `channels` lock.
    open: AtomicUsize,
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
            channels: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            limits,
            open: AtomicUsize::new(0),
        })
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<ConsumerId, Sender>> {
        // The map stays consistent even if a holder panicked: every critical section is a single
        // map operation.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to `consumer`'s frames from now on, within the limits.
    pub fn subscribe(self: &Arc<Self>, consumer: &ConsumerId) -> Result<Subscription, Refused> {
        let mut channels = self.channels();
        if self.open.load(Ordering::Relaxed) >= self.limits.streams {
            return Err(Refused::TooManyStreams);
        }
        let for_consumer = channels
            .get(consumer.as_str())
            .map_or(0, |s| s.receiver_count());
        if for_consumer >= self.limits.streams_per_consumer {
            return Err(Refused::TooManyForConsumer);
        }
        let receiver = channels
            .entry(consumer.clone())
            .or_insert_with(|| channel::channel(self.capacity))
            .subscribe();
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            receiver: Some(receiver),
            consumer: consumer.clone(),
            router: Arc::clone(self),
        })
    }

    /// Hands a batch of frames, in id order, to the channels of their consumers; a frame with no
    /// consumer is a broadcast and goes to every channel. One lock for the whole batch; a frame for
    /// a consumer with no open stream costs a map lookup.
    pub fn route<'a>(&self, frames: impl IntoIterator<Item = (Option<&'a str>, Frame)>) {
        let channels = self.channels();
        for (consumer, frame) in frames {
            match consumer {
                Some(consumer) => {
                    if let Some(sender) = channels.get(consumer) {
                        sender.send(frame);
                    }
                }
                None => {
                    for sender in channels.values() {
                        sender.send(frame.clone());
                    }
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
        self.channels().len()
    }
}

/// A stream's end of its consumer's channel. Dropping the last one removes the channel.
pub struct Subscription {
    receiver: Option<Receiver>,
    consumer: ConsumerId,
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
        if channels
            .get(self.consumer.as_str())
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(self.consumer.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    fn frame(id: i64) -> Frame {
        Frame::render(EventId(id), "t", "1")
    }

    fn consumer(name: &str) -> ConsumerId {
        ConsumerId::parse(name.as_bytes()).unwrap()
    }

    #[test]
    fn channels_live_as_long_as_their_subscriptions() {
        let router = Router::new(8, Limits::NONE);
        let mut a1 = router.subscribe(&consumer("a")).unwrap();
        let mut a2 = router.subscribe(&consumer("a")).unwrap();
        let mut b = router.subscribe(&consumer("b")).unwrap();
        assert_eq!(router.consumers(), 2);

        router.route([
            (Some("a"), frame(1)),
            (Some("b"), frame(2)),
            (Some("c"), frame(3)),
            (None, frame(4)),
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
}
