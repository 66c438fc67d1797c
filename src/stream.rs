//! One SSE stream per request: replay from the table, hand-over to live, heartbeats, and
//! recovery from the table when the stream falls behind its live channel.
//!
//! The hand-over never loses or repeats an event:
//! 1. subscribe to the consumer's live channel (from now on its frames queue there);
//! 2. read the hub's published id P: every event at or below it is final in the table;
//! 3. replay `(cursor, P]` from the table in keyset pages, fetching a page only once the client
//!    has taken the previous one (memory stays flat for any history);
//! 4. go live, dropping every frame at or below the last id covered.
//!
//! A lagging receiver (the channel overwrote frames this stream had not taken) goes back to step 2
//! from the last id it sent.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tokio::time::MissedTickBehavior;

use crate::hub::Published;
use crate::router::Router;
use crate::sse::{self, Frame};
use crate::store::Store;

/// What every stream shares.
pub struct Streams {
    pub store: Store,
    pub router: Arc<Router>,
    pub published: watch::Receiver<Published>,
    /// Whether the notification connection is listening (for readiness).
    pub listening: watch::Receiver<bool>,
    pub shutdown: watch::Receiver<bool>,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub page_size: i64,
}

/// What the live phase ran into.
enum Live {
    Frame(Frame),
    Heartbeat,
    Lagged,
    End,
}

impl Streams {
    /// The body of `GET /events` for `consumer`, resuming after `cursor` when given (live only
    /// otherwise). Ends on shutdown or when the database fails mid-replay: the client resumes
    /// with `Last-Event-ID`.
    pub fn open(
        self: &Arc<Self>,
        consumer: String,
        cursor: Option<i64>,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        // Subscribe before anything else, so that no frame published from here on is missed.
        let mut subscription = self.router.subscribe(&consumer);
        let streams = Arc::clone(self);
        let mut published = self.published.clone();
        let mut shutdown = self.shutdown.clone();
        async_stream::stream! {
            let _log = StreamLog::new(&consumer, cursor);
            let ready = tokio::select! {
                ready = published.wait_for(Option::is_some) => ready.ok().and_then(|p| *p),
                _ = shutdown.wait_for(|stop| *stop) => None,
            };
            let Some(start) = ready else { return };
            // Sent once the starting point is fixed: a client that has read it knows that every
            // event committed from now on will reach it.
            yield Ok(sse::retry(streams.retry));
            // The stream covers ids above `floor`; `(floor, replay_upto]` comes from the table.
            let mut floor = cursor.unwrap_or(start);
            let mut replay_upto = start;
            let mut heartbeat = tokio::time::interval_at(
                tokio::time::Instant::now() + streams.heartbeat,
                streams.heartbeat,
            );
            heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

            loop {
                while floor < replay_upto {
                    let page = match streams
                        .store
                        .read_consumer(&consumer, floor, replay_upto, streams.page_size)
                        .await
                    {
                        Ok(page) => page,
                        Err(error) => {
                            tracing::warn!(%consumer, %error, after = floor, "replay failed; ending the stream");
                            return;
                        }
                    };
                    let complete = (page.len() as i64) < streams.page_size;
                    for row in page {
                        floor = row.id;
                        yield Ok(row.frame().bytes);
                    }
                    if complete {
                        floor = replay_upto;
                    }
                }
                floor = floor.max(replay_upto);

                loop {
                    let next = tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|stop| *stop) => Live::End,
                        received = subscription.receiver().recv() => match received {
                            Ok(frame) => Live::Frame(frame),
                            Err(broadcast::error::RecvError::Lagged(_)) => Live::Lagged,
                            Err(broadcast::error::RecvError::Closed) => Live::End,
                        },
                        _ = heartbeat.tick() => Live::Heartbeat,
                    };
                    match next {
                        Live::Frame(frame) if frame.id > floor => {
                            floor = frame.id;
                            yield Ok(frame.bytes);
                        }
                        Live::Frame(_) => {} // already covered by the replay
                        Live::Heartbeat => yield Ok(sse::HEARTBEAT),
                        Live::Lagged => {
                            // Frames this stream never took were overwritten: take them from the
                            // table, up to what is published now, then carry on live.
                            replay_upto = (*published.borrow()).unwrap_or(floor);
                            tracing::debug!(%consumer, after = floor, upto = replay_upto, "lagging stream recovers from the table");
                            break;
                        }
                        Live::End => return,
                    }
                }
            }
        }
    }
}

/// Logs a stream's opening and, when it is dropped (client gone, shutdown), its closing.
struct StreamLog<'a> {
    consumer: &'a str,
}

impl<'a> StreamLog<'a> {
    fn new(consumer: &'a str, cursor: Option<i64>) -> Self {
        tracing::info!(consumer, resume_after = ?cursor, "stream opened");
        StreamLog { consumer }
    }
}

impl Drop for StreamLog<'_> {
    fn drop(&mut self) {
        tracing::info!(consumer = self.consumer, "stream closed");
    }
}
