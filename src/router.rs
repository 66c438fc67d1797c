//! The router: consumer id -> live channel of rendered frames.
//!
//! A consumer's channel exists while at least one of its streams is open: created by the first
//! subscription and dropped with the last, so an event costs work only for consumers that are
//! listening. Each channel is a bounded `broadcast`: every open stream of the consumer receives
//! every frame, and a stream that falls too far behind is told so (lag) instead of holding the
//! others back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

use crate::sse::Frame;

pub struct Router {
    channels: Mutex<HashMap<String, broadcast::Sender<Frame>>>,
    capacity: usize,
}

impl Router {
    pub fn new(capacity: usize) -> Arc<Router> {
        Arc::new(Router {
            channels: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        })
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<Frame>>> {
        // The map stays consistent even if a holder panicked: every critical section is a single
        // map operation.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to `consumer`'s frames from now on.
    pub fn subscribe(self: &Arc<Self>, consumer: &str) -> Subscription {
        let receiver = self
            .channels()
            .entry(consumer.to_owned())
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe();
        Subscription {
            receiver: Some(receiver),
            consumer: consumer.to_owned(),
            router: Arc::clone(self),
        }
    }

    /// Hands a batch of frames, in id order, to the channels of their consumers; a frame with no
    /// consumer is a broadcast and goes to every channel. One lock for the whole batch; a frame for
    /// a consumer with no open stream costs a map lookup.
    pub fn route<'a>(&self, frames: impl IntoIterator<Item = (Option<&'a str>, Frame)>) {
        let channels = self.channels();
        for (consumer, frame) in frames {
            // A send error means no receiver is left: the last one is about to remove the channel.
            match consumer {
                Some(consumer) => {
                    if let Some(sender) = channels.get(consumer) {
                        let _ = sender.send(frame);
                    }
                }
                None => {
                    for sender in channels.values() {
                        let _ = sender.send(frame.clone());
                    }
                }
            }
        }
    }

    /// Consumers with at least one open stream.
    pub fn consumers(&self) -> usize {
        self.channels().len()
    }
}

/// A stream's end of its consumer's channel. Dropping the last one removes the channel.
pub struct Subscription {
    receiver: Option<broadcast::Receiver<Frame>>,
    consumer: String,
    router: Arc<Router>,
}

impl Subscription {
    pub fn receiver(&mut self) -> &mut broadcast::Receiver<Frame> {
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
        if channels
            .get(&self.consumer)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&self.consumer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(id: i64) -> Frame {
        Frame {
            id,
            bytes: Bytes::new(),
        }
    }

    #[test]
    fn channels_live_as_long_as_their_subscriptions() {
        let router = Router::new(8);
        let mut a1 = router.subscribe("a");
        let mut a2 = router.subscribe("a");
        let mut b = router.subscribe("b");
        assert_eq!(router.consumers(), 2);

        router.route([
            (Some("a"), frame(1)),
            (Some("b"), frame(2)),
            (Some("c"), frame(3)),
            (None, frame(4)),
        ]);
        assert_eq!(a1.receiver().try_recv().unwrap().id, 1);
        assert_eq!(a1.receiver().try_recv().unwrap().id, 4);
        assert_eq!(a2.receiver().try_recv().unwrap().id, 1);
        assert_eq!(a2.receiver().try_recv().unwrap().id, 4);
        assert_eq!(b.receiver().try_recv().unwrap().id, 2);
        assert_eq!(b.receiver().try_recv().unwrap().id, 4);
        assert!(b.receiver().try_recv().is_err());

        drop(a1);
        assert_eq!(router.consumers(), 2);
        drop(a2);
        assert_eq!(router.consumers(), 1);
        drop(b);
        assert_eq!(router.consumers(), 0);
    }
}
