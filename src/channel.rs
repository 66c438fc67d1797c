//! One consumer's live channel: a broadcast queue of frames whose memory follows what is queued.
//!
//! tokio's `broadcast` allocates all its slots up front: at the default capacity of 1,024 that is
//! about 80 kB for every listening consumer, even one that never gets an event, and an instance
//! holds tens of thousands of them. This queue grows only with the frames some receiver has not
//! yet taken and drops each frame as soon as every receiver has it. The semantics are
//! `broadcast`'s: every receiver gets every frame sent after it subscribed, in order; a receiver
//! that falls more than `capacity` frames behind loses the oldest and is told so (the stream then
//! recovers them from the table).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::sse::Frame;

/// Above this many slots an empty queue gives its memory back (after a burst).
const KEEP_SLOTS: usize = 64;

/// The sending side, held by the router.
pub struct Sender {
    shared: Arc<Shared>,
}

/// One stream's position in the channel.
pub struct Receiver {
    shared: Arc<Shared>,
    /// Sequence number of the next frame this receiver takes.
    next: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    #[error("the receiver fell behind and missed {0} frames")]
    Lagged(u64),
    #[error("the channel is closed")]
    Closed,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Woken on every send (and on close); receivers with nothing to take wait here.
    sent: Notify,
}

struct Queue {
    /// Frames not yet taken by every receiver, each with how many receivers still have to take it.
    frames: VecDeque<(Frame, usize)>,
    /// Sequence number of `frames[0]`.
    head: u64,
    receivers: usize,
    capacity: usize,
    closed: bool,
}

impl Queue {
    fn tail(&self) -> u64 {
        self.head + self.frames.len() as u64
    }

    /// Drops the frames at the front that every receiver has taken.
    fn release(&mut self) {
        while self.frames.front().is_some_and(|(_, left)| *left == 0) {
            self.frames.pop_front();
            self.head += 1;
        }
        if self.frames.is_empty() && self.frames.capacity() > KEEP_SLOTS {
            self.frames.shrink_to_fit();
        }
    }
}

/// A channel that keeps at most `capacity` frames for a receiver that does not take them.
pub fn channel(capacity: usize) -> Sender {
    Sender {
        shared: Arc::new(Shared {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                head: 0,
                receivers: 0,
                capacity: capacity.max(1),
                closed: false,
            }),
            sent: Notify::new(),
        }),
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every critical section leaves the queue consistent, even if it panicked midway.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sender {
    /// Queues `frame` for every current receiver; with none, it is dropped at once.
    pub fn send(&self, frame: Frame) {
        let mut queue = self.shared.queue();
        if queue.receivers == 0 {
            return;
        }
        if queue.frames.len() == queue.capacity {
            // The slowest receiver loses its oldest frame; it sees a lag on its next receive.
            queue.frames.pop_front();
            queue.head += 1;
        }
        let receivers = queue.receivers;
        queue.frames.push_back((frame, receivers));
        drop(queue);
        self.shared.sent.notify_waiters();
    }

    /// A receiver of the frames sent from now on.
    pub fn subscribe(&self) -> Receiver {
        let mut queue = self.shared.queue();
        queue.receivers += 1;
        Receiver {
            shared: Arc::clone(&self.shared),
            next: queue.tail(),
        }
    }

    pub fn receiver_count(&self) -> usize {
        self.shared.queue().receivers
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.sent.notify_waiters();
    }
}

impl Receiver {
    /// The next frame; cancel-safe (nothing is taken unless it returns).
    pub async fn recv(&mut self) -> Result<Frame, RecvError> {
        loop {
            if let Some(result) = self.try_recv() {
                return result;
            }
            let shared = Arc::clone(&self.shared);
            let sent = shared.sent.notified();
            tokio::pin!(sent);
            // Registered before checking again, so a send in between is not missed.
            sent.as_mut().enable();
            if let Some(result) = self.try_recv() {
                return result;
            }
            sent.await;
        }
    }

    /// The next frame if one is queued (or the lag or close it ran into); None if it must wait.
    pub fn try_recv(&mut self) -> Option<Result<Frame, RecvError>> {
        let mut queue = self.shared.queue();
        if self.next < queue.head {
            let missed = queue.head - self.next;
            self.next = queue.head;
            return Some(Err(RecvError::Lagged(missed)));
        }
        let index = (self.next - queue.head) as usize;
        if let Some((frame, left)) = queue.frames.get_mut(index) {
            *left -= 1;
            let frame = frame.clone();
            self.next += 1;
            if index == 0 {
                queue.release();
            }
            return Some(Ok(frame));
        }
        queue.closed.then_some(Err(RecvError::Closed))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        queue.receivers -= 1;
        // The frames this receiver will never take no longer wait for it.
        let from = self.next.saturating_sub(queue.head) as usize;
        for (_, left) in queue.frames.iter_mut().skip(from) {
            *left -= 1;
        }
        queue.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: i64) -> Frame {
        Frame::render(crate::event::EventId(id), "t", "1")
    }

    fn ids(receiver: &mut Receiver) -> Vec<i64> {
        std::iter::from_fn(|| receiver.try_recv())
            .map(|result| result.unwrap().id.0)
            .collect()
    }

    fn queued(sender: &Sender) -> usize {
        sender.shared.queue().frames.len()
    }

    #[test]
    fn every_receiver_gets_every_frame_sent_after_it_subscribed() {
        let sender = channel(16);
        sender.send(frame(1)); // nobody listens: dropped
        let mut a = sender.subscribe();
        sender.send(frame(2));
        let mut b = sender.subscribe();
        sender.send(frame(3));
        assert_eq!(ids(&mut a), [2, 3]);
        assert_eq!(ids(&mut b), [3]);
        assert_eq!(queued(&sender), 0, "taken by all: released");
    }

    #[test]
    fn a_receiver_that_falls_behind_is_told_and_carries_on() {
        let sender = channel(2);
        let mut slow = sender.subscribe();
        let mut fast = sender.subscribe();
        for id in 1..=5 {
            sender.send(frame(id));
            assert_eq!(ids(&mut fast), [id]);
        }
        assert_eq!(slow.try_recv(), Some(Err(RecvError::Lagged(3))));
        assert_eq!(ids(&mut slow), [4, 5]);
        assert_eq!(queued(&sender), 0);
    }

    #[test]
    fn a_dropped_receiver_releases_what_it_had_not_taken() {
        let sender = channel(16);
        let mut a = sender.subscribe();
        let b = sender.subscribe();
        sender.send(frame(1));
        sender.send(frame(2));
        assert_eq!(ids(&mut a), [1, 2]);
        assert_eq!(queued(&sender), 2, "b still has to take them");
        drop(b);
        assert_eq!(queued(&sender), 0);
        assert_eq!(sender.receiver_count(), 1);
    }

    #[tokio::test]
    async fn recv_waits_for_a_send_and_sees_the_close() {
        let sender = channel(4);
        let mut receiver = sender.subscribe();
        let waiting = tokio::spawn(async move {
            let first = receiver.recv().await;
            (first, receiver.recv().await)
        });
        tokio::task::yield_now().await;
        sender.send(frame(7));
        drop(sender);
        let (first, second) = waiting.await.unwrap();
        assert_eq!(first.unwrap().id.0, 7);
        assert_eq!(second.unwrap_err(), RecvError::Closed);
    }
}
