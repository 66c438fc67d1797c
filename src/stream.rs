//! One SSE stream per request: a [`Follower`] of the request's selection, written out as SSE frames, with
//! heartbeats while nothing happens and retries while the database is away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::Stream;
use metrics::Gauge;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::event::{EventId, EventRow};
use crate::follower::{Follower, Next, Replayed, Sources, StartError};
use crate::metrics::Metrics;
use crate::selection::Reader;
use crate::sse::{self, Format, Frame};
use crate::store::StoreError;

/// What every stream shares.
pub struct Streams {
    pub sources: Sources,
    /// Whether the notification connection is listening (for readiness).
    pub listening: watch::Receiver<bool>,
    /// Cancelled when the instance starts to shut down: streams end, spread over `drain`.
    pub shutdown: CancellationToken,
    /// `--drain-period`.
    pub drain: Duration,
    pub heartbeat: Duration,
    pub retry: Duration,
    /// `--max-stream-lifetime`.
    pub max_lifetime: Option<Duration>,
    pub metrics: Metrics,
}

/// Why a stream cannot be opened now; the client should retry shortly.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot replay from the database right now: {0}")]
    Replay(#[from] StoreError),
    #[error("this instance is shutting down; reconnect to another")]
    Draining,
}

/// What a stream waiting for its follower woke up for.
enum Wake {
    Next(Next),
    Heartbeat,
    Stop,
    /// The token expired or the stream reached its maximum lifetime.
    End,
}

/// How long a new stream waits for the hub to become ready before it is refused with 503.
const READY_WAIT: Duration = Duration::from_secs(5);
/// Between attempts at a replay page while the database is away.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

impl Streams {
    /// Opens the body of `GET /events` (or of the Mercure hub) for `reader`, resuming after
    /// `cursor` when given (live only otherwise), writing events in `format`. The first page of a replay is read here, so
    /// that a resume point the database cannot serve now is refused up front instead of starting
    /// a stream that would stall. Once open, the stream survives database outages (later pages
    /// are retried while heartbeats continue). It ends on shutdown, and with a notice when
    /// `token_expires` passes or it reaches `--max-stream-lifetime`, whichever comes first.
    pub async fn open(
        self: &Arc<Self>,
        reader: Reader,
        cursor: Option<EventId>,
        format: Format,
        token_expires: Option<SystemTime>,
    ) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, OpenError> {
        if self.shutdown.is_cancelled() {
            return Err(OpenError::Draining);
        }
        let mut follower = Follower::start(&self.sources, reader, cursor, READY_WAIT).await?;
        let first = match follower.next_page().await {
            Some(Ok(rows)) => Some(Next::Page(rows)),
            Some(Err(error)) => return Err(error.into()),
            None => None,
        };
        // Retention may have deleted part of what a resuming client asks for: it gets what is
        // kept, and is told so. What the recent tail covers was not lost, whatever the table
        // still holds, and needs no read.
        let truncated = match cursor {
            Some(cursor) if !self.sources.recent.covers(cursor) => {
                let deleted_upto = match follower.deleted_upto() {
                    Some(deleted_upto) => deleted_upto,
                    None => self.sources.store.deleted_upto().await?,
                };
                (cursor < deleted_upto).then(|| format.truncated(cursor, deleted_upto))
            }
            _ => None,
        };

        // When the stream ends, and whether that is because its token expires.
        let (ends_at, token_expired) = match self.end(token_expires) {
            Some((at, token)) => (Some(at), token),
            None => (None, false),
        };
        let streams = Arc::clone(self);
        let shutdown = self.shutdown.clone();
        Ok(async_stream::stream! {
            // Boxed: most streams have no end, and their state need not carry a timer.
            let mut ends = match ends_at {
                Some(at) => Box::pin(tokio::time::sleep_until(at)).left_future(),
                None => futures::future::pending().right_future(),
            };
            // Set once the instance drains and this stream's own moment to end is its end.
            let mut draining = false;
            let mut drained = false;
            let mut guard = StreamGuard::new(&follower, cursor, &streams.metrics);
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
            let mut backoff = BACKOFF;
            let mut pending = first;
            let mut lags = 0;
            loop {
                let wake = match pending.take() {
                    Some(next) => Wake::Next(next),
                    // A replay goes as fast as the client reads; heartbeats are for waiting.
                    None if !follower.position().is_live() => tokio::select! {
                        biased;
                        _ = shutdown.cancelled(), if !draining => Wake::Stop,
                        _ = &mut ends => Wake::End,
                        next = follower.next() => Wake::Next(next),
                    },
                    None => tokio::select! {
                        biased;
                        _ = shutdown.cancelled(), if !draining => Wake::Stop,
                        _ = &mut ends => Wake::End,
                        next = follower.next() => Wake::Next(next),
                        _ = heartbeat.tick() => Wake::Heartbeat,
                    },
                };
                let next = match wake {
                    Wake::Next(next) => next,
                    Wake::Heartbeat => {
                        yield Ok(sse::HEARTBEAT);
                        continue;
                    }
                    Wake::Stop => {
                        // Ends at a moment of its own within the drain period, unless it was to
                        // end before that anyway.
                        if streams.drain.is_zero() {
                            return;
                        }
                        draining = true;
                        let at = Instant::now() + jitter(streams.drain);
                        if ends_at.is_none_or(|end| at < end) {
                            ends = Box::pin(tokio::time::sleep_until(at)).left_future();
                            drained = true;
                        }
                        continue;
                    }
                    Wake::End if drained => {
                        // Spread the comebacks further: each client waits a little differently.
                        yield Ok(sse::retry(streams.retry / 2 + jitter(streams.retry)));
                        return;
                    }
                    Wake::End => {
                        yield Ok(format.ending(token_expired));
                        return;
                    }
                };
                if follower.lags() > lags {
                    streams.metrics.lag_recoveries.increment(follower.lags() - lags);
                    lags = follower.lags();
                }
                match next {
                    Next::Page(rows) => {
                        backoff.reset();
                        let source = match &rows {
                            Replayed::Table(_) => &streams.metrics.replay_rows,
                            Replayed::Recent(_) => &streams.metrics.replay_recent,
                        };
                        source.increment(rows.len() as u64);
                        streams.metrics.frames_delivered.increment(rows.len() as u64);
                        guard.set_live(follower.position().is_live());
                        yield Ok(render_page(rows, format));
                    }
                    Next::Live(frame) => {
                        guard.set_live(true);
                        let (bytes, count) = take_queued(&mut follower, format, frame);
                        streams.metrics.frames_delivered.increment(count);
                        yield Ok(bytes);
                    }
                    Next::Failed(error) => {
                        guard.set_live(false);
                        tracing::warn!(selection = ?follower.reader().selection, %error, after = %follower.position().cursor(), retry_in = ?backoff.peek(), "replay page failed");
                        let wake = tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => None,
                            _ = heartbeat.tick() => Some(Wake::Heartbeat),
                            _ = shutdown.cancelled() => Some(Wake::Stop),
                            _ = &mut ends => Some(Wake::End),
                        };
                        match wake {
                            Some(Wake::Heartbeat) => yield Ok(sse::HEARTBEAT),
                            Some(Wake::End) => {
                                yield Ok(format.ending(token_expired));
                                return;
                            }
                            Some(_) => return,
                            None => {}
                        }
                    }
                    Next::Closed => return,
                }
            }
        })
    }

    /// When a stream opened now must end, and whether that is because its token expires.
    fn end(&self, token_expires: Option<SystemTime>) -> Option<(Instant, bool)> {
        let now = Instant::now();
        let token = token_expires.map(|expires| {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            (now + left, true)
        });
        let lifetime = self.max_lifetime.map(|lifetime| (now + lifetime, false));
        match (token, lifetime) {
            (Some(token), Some(lifetime)) => Some(if token.0 <= lifetime.0 {
                token
            } else {
                lifetime
            }),
            (one, other) => one.or(other),
        }
    }

    /// The `Retry-After` seconds for refused requests: the same delay as the SSE `retry:` hint.
    pub fn retry_after(&self) -> u64 {
        self.retry.as_secs().max(1)
    }
}

/// A uniformly random delay in `[0, up_to)`.
fn jitter(up_to: Duration) -> Duration {
    let millis = up_to.as_millis().max(1) as u64;
    Duration::from_millis(rand::random_range(0..millis))
}

/// At most this much is gathered into one write (see [`take_queued`]).
const GATHER_BYTES: usize = 64 * 1024;

/// `first` and the frames already queued behind it, as one buffer: under load a stream sends
/// many frames per wake-up and per write instead of one (the copy costs less than the write).
/// Returns the bytes and how many frames they hold.
fn take_queued(follower: &mut Follower, format: Format, first: Frame) -> (Bytes, u64) {
    let first = format.live(first);
    let mut gathered: Option<BytesMut> = None;
    let mut count = 1;
    while gathered.as_ref().map_or(first.len(), BytesMut::len) < GATHER_BYTES {
        let Some(frame) = follower.try_next_live() else {
            break;
        };
        count += 1;
        let buf = gathered.get_or_insert_with(|| {
            let mut buf = BytesMut::with_capacity(GATHER_BYTES.min(first.len() * 16));
            buf.extend_from_slice(&first);
            buf
        });
        buf.extend_from_slice(&format.live(frame));
    }
    (gathered.map_or(first, BytesMut::freeze), count)
}

/// A page of a replay as one buffer of frames.
fn render_page(page: Replayed, format: Format) -> Bytes {
    match page {
        Replayed::Table(rows) => render_rows(&rows, format),
        Replayed::Recent(frames) => {
            let mut buf = BytesMut::new();
            for frame in frames {
                buf.extend_from_slice(&format.live(frame));
            }
            buf.freeze()
        }
    }
}

/// Replayed rows as one buffer of frames.
fn render_rows(rows: &[EventRow], format: Format) -> Bytes {
    let size: usize = rows
        .iter()
        .map(|row| 32 + row.event_type.len() + row.payload.len())
        .sum();
    let mut buf = BytesMut::with_capacity(size);
    for row in rows {
        format.put_row(&mut buf, row);
    }
    buf.freeze()
}

/// Logs a stream's opening and closing, and keeps the open-streams gauges by state.
struct StreamGuard<'a> {
    metrics: &'a Metrics,
    live: bool,
}

impl<'a> StreamGuard<'a> {
    fn new(follower: &Follower, cursor: Option<EventId>, metrics: &'a Metrics) -> Self {
        let selection = &follower.reader().selection;
        let topics: Vec<&str> = selection.matchers().iter().map(|m| m.as_str()).collect();
        tracing::info!(
            consumer = selection.followed_consumer().map(|c| c.as_str()).unwrap_or(""),
            ?topics,
            resume_after = ?cursor,
            "stream opened"
        );
        metrics.streams_replaying.increment(1.0);
        StreamGuard {
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
        // The request's span names the consumer.
        tracing::info!("stream closed");
    }
}
