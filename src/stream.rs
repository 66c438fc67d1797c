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

use bytes::{Bytes, BytesMut};
use futures::Stream;
use metrics::Gauge;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::channel::{Receiver, RecvError};
use crate::hub::Published;
use crate::metrics::Metrics;
use crate::router::{Refused, Router};
use crate::sse::{self, Format, Frame};
use crate::store::{EventRow, Store, StoreError};

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
    pub metrics: Metrics,
}

/// What the live phase ran into.
enum Live {
    Frame(Frame),
    Heartbeat,
    Lagged,
    End,
}

/// Why a stream cannot be opened now; the client should retry shortly.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("not ready: the service has not yet reached the database")]
    NotReady,
    #[error("cannot replay from the database right now: {0}")]
    Replay(#[from] StoreError),
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// How long a new stream waits for the hub to become ready before it is refused with 503.
const READY_WAIT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Streams {
    /// Opens the body of `GET /events` for `consumer`, resuming after `cursor` when given (live
    /// only otherwise), writing events in `format`. The first page of a replay is read here, so
    /// that a resume point the database cannot serve now is refused up front instead of starting
    /// a stream that would stall. Once open, the stream survives database outages (later pages
    /// are retried while heartbeats continue) and ends only on shutdown.
    pub async fn open(
        self: &Arc<Self>,
        consumer: String,
        cursor: Option<i64>,
        format: Format,
    ) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, OpenError> {
        // Subscribe before reading the published id, so that no frame published after it is missed.
        let mut subscription = self.router.subscribe(&consumer)?;
        // Just after start-up the hub may need a moment to find its starting point; a client
        // that connects then (a browser reconnecting to a restarted service) waits rather than
        // being refused.
        let mut published = self.published.clone();
        let start = tokio::time::timeout(READY_WAIT, published.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|ready| ready.ok().and_then(|published| *published))
            .ok_or(OpenError::NotReady)?;
        // The stream covers ids above `floor`; `(floor, replay_upto]` comes from the table.
        let mut floor = cursor.unwrap_or(start);
        let mut replay_upto = start;
        let mut page = if floor < replay_upto {
            Some(self.read_page(&consumer, floor, replay_upto).await?)
        } else {
            None
        };
        // Retention may have deleted part of what a resuming client asks for: it gets what is
        // kept, and is told so.
        let truncated = match cursor {
            Some(cursor) => {
                let deleted_upto = self.store.deleted_upto().await?;
                (cursor < deleted_upto).then(|| format.truncated(cursor, deleted_upto))
            }
            None => None,
        };

        let streams = Arc::clone(self);
        let mut shutdown = self.shutdown.clone();
        Ok(async_stream::stream! {
            let mut guard = StreamGuard::new(&consumer, cursor, &streams.metrics);
            // A client that has read this knows every event committed from now on will reach it.
            yield Ok(sse::retry(streams.retry));
            if let Some(notice) = truncated {
                yield Ok(notice);
            }
            let mut heartbeat = tokio::time::interval_at(
                tokio::time::Instant::now() + streams.heartbeat,
                streams.heartbeat,
            );
            heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

            loop {
                let mut backoff = MIN_BACKOFF;
                while floor < replay_upto {
                    if *shutdown.borrow() {
                        return;
                    }
                    let rows = match page.take() {
                        Some(rows) => rows,
                        // Boxed: a query future is large, and every idle stream would carry
                        // its space in its state all its life.
                        None => match Box::pin(streams.read_page(&consumer, floor, replay_upto))
                            .await
                        {
                            Ok(rows) => rows,
                            Err(error) => {
                                tracing::warn!(%consumer, %error, after = floor, retry_in = ?backoff, "replay page failed");
                                let wait = tokio::select! {
                                    _ = tokio::time::sleep(backoff) => None,
                                    _ = heartbeat.tick() => Some(sse::HEARTBEAT),
                                    _ = shutdown.wait_for(|stop| *stop) => return,
                                };
                                if let Some(heartbeat) = wait {
                                    yield Ok(heartbeat);
                                }
                                backoff = (backoff * 2).min(MAX_BACKOFF);
                                continue;
                            }
                        },
                    };
                    let complete = (rows.len() as i64) < streams.page_size;
                    streams.metrics.replay_rows.increment(rows.len() as u64);
                    streams.metrics.frames_delivered.increment(rows.len() as u64);
                    if let Some(last) = rows.last() {
                        floor = last.id;
                        yield Ok(render_page(&rows, format));
                    }
                    if complete {
                        floor = replay_upto;
                    }
                }
                floor = floor.max(replay_upto);
                guard.set_live(true);

                // A lag seen while taking queued frames, handled once those are sent.
                let mut lagged = false;
                loop {
                    let next = if lagged { Live::Lagged } else { tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|stop| *stop) => Live::End,
                        received = subscription.receiver().recv() => match received {
                            Ok(frame) => Live::Frame(frame),
                            Err(RecvError::Lagged(_)) => Live::Lagged,
                            Err(RecvError::Closed) => Live::End,
                        },
                        _ = heartbeat.tick() => Live::Heartbeat,
                    }};
                    match next {
                        Live::Frame(frame) if frame.id > floor => {
                            let (bytes, count, lag) =
                                take_queued(subscription.receiver(), format, frame, &mut floor);
                            lagged = lag;
                            streams.metrics.frames_delivered.increment(count);
                            yield Ok(bytes);
                        }
                        Live::Frame(_) => {} // already covered by the replay
                        Live::Heartbeat => yield Ok(sse::HEARTBEAT),
                        Live::Lagged => {
                            // Frames this stream never took were overwritten: take them from the
                            // table, up to what is published now, then carry on live.
                            replay_upto = (*streams.published.borrow()).unwrap_or(floor);
                            streams.metrics.lag_recoveries.increment(1);
                            guard.set_live(false);
                            tracing::debug!(%consumer, after = floor, upto = replay_upto, "lagging stream recovers from the table");
                            break;
                        }
                        Live::End => return,
                    }
                }
            }
        })
    }

    /// The `Retry-After` seconds for refused requests: the same delay as the SSE `retry:` hint.
    pub fn retry_after(&self) -> u64 {
        self.retry.as_secs().max(1)
    }

    async fn read_page(
        &self,
        consumer: &str,
        after: i64,
        upto: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        self.store
            .read_consumer(consumer, after, upto, self.page_size)
            .await
    }
}

/// At most this much is gathered into one write (see [`take_queued`]).
const GATHER_BYTES: usize = 64 * 1024;

/// `first` and the frames already queued behind it, as one buffer: under load a stream sends
/// many frames per wake-up and per write instead of one (the copy costs less than the write).
/// Returns the bytes, how many frames they hold, and whether the channel reported a lag.
fn take_queued(
    receiver: &mut Receiver,
    format: Format,
    first: Frame,
    floor: &mut i64,
) -> (Bytes, u64, bool) {
    *floor = first.id;
    let first = format.live(first);
    let mut gathered: Option<BytesMut> = None;
    let mut count = 1;
    let mut lagged = false;
    while gathered.as_ref().map_or(first.len(), BytesMut::len) < GATHER_BYTES {
        match receiver.try_recv() {
            Some(Ok(frame)) if frame.id > *floor => {
                *floor = frame.id;
                count += 1;
                let buf = gathered.get_or_insert_with(|| {
                    let mut buf = BytesMut::with_capacity(GATHER_BYTES.min(first.len() * 16));
                    buf.extend_from_slice(&first);
                    buf
                });
                buf.extend_from_slice(&format.live(frame));
            }
            Some(Ok(_)) => {} // already covered by the replay
            Some(Err(RecvError::Lagged(_))) => {
                lagged = true;
                break;
            }
            Some(Err(RecvError::Closed)) | None => break,
        }
    }
    (gathered.map_or(first, BytesMut::freeze), count, lagged)
}

/// A page of replayed rows as one buffer of frames.
fn render_page(rows: &[EventRow], format: Format) -> Bytes {
    let size: usize = rows
        .iter()
        .map(|row| 32 + row.event_type.len() + row.payload.len())
        .sum();
    let mut buf = BytesMut::with_capacity(size);
    for row in rows {
        format.put_event(&mut buf, row.id, &row.event_type, &row.payload);
    }
    buf.freeze()
}

/// Logs a stream's opening and closing, and keeps the open-streams gauges by state.
struct StreamGuard<'a> {
    consumer: &'a str,
    metrics: &'a Metrics,
    live: bool,
}

impl<'a> StreamGuard<'a> {
    fn new(consumer: &'a str, cursor: Option<i64>, metrics: &'a Metrics) -> Self {
        tracing::info!(consumer, resume_after = ?cursor, "stream opened");
        metrics.streams_replaying.increment(1.0);
        StreamGuard {
            consumer,
            metrics,
            live: false,
        }
    }

    fn gauge(&self) -> &Gauge {
        if self.live {
            &self.metrics.streams_live
        } else {
            &self.metrics.streams_replaying
        }
    }

    fn set_live(&mut self, live: bool) {
        if self.live != live {
            self.gauge().decrement(1.0);
            self.live = live;
            self.gauge().increment(1.0);
        }
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.gauge().decrement(1.0);
        tracing::info!(consumer = self.consumer, "stream closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel;

    fn frame(id: i64) -> Frame {
        Frame::render(id, "t", "1")
    }

    #[test]
    fn queued_frames_go_out_in_one_buffer() {
        let sender = channel::channel(8);
        let mut receiver = sender.subscribe();
        for id in [2, 3, 4] {
            sender.send(frame(id));
        }
        let mut floor = 1;
        let first = receiver.try_recv().unwrap().unwrap();
        let (bytes, count, lagged) = take_queued(&mut receiver, Format::Named, first, &mut floor);
        assert_eq!((count, lagged, floor), (3, false, 4));
        let expected = [frame(2).bytes, frame(3).bytes, frame(4).bytes].concat();
        assert_eq!(&bytes[..], &expected[..]);
    }

    #[test]
    fn a_lag_met_while_gathering_is_reported_after_what_was_taken() {
        let sender = channel::channel(2);
        let mut receiver = sender.subscribe();
        sender.send(frame(1));
        let first = receiver.try_recv().unwrap().unwrap();
        for id in 2..=4 {
            sender.send(frame(id));
        }
        let mut floor = 0;
        let (bytes, count, lagged) = take_queued(&mut receiver, Format::Named, first, &mut floor);
        assert_eq!((count, lagged, floor), (1, true, 1));
        assert_eq!(bytes, frame(1).bytes);
    }
}
