//! The hub: the only reader of new events.
//!
//! One task, one cursor. It reads everything after its cursor in bounded batches, publishes only a
//! gap-free prefix of ids, renders each event's frame once and hands the batch to the router.
//! Database work is per batch, never per consumer or per stream.
//!
//! # Awake and asleep
//! While events keep coming the hub is awake: it reads again as soon as a batch is done, or after
//! `poll_interval` when there was nothing new, and producers do not ring ([`crate::bell`]). After
//! `idle_after` without a new event it arms the bell and sleeps until a producer rings, reading
//! anyway every `idle_poll` (a safety net for a ring lost in a way the listener could not see).
//! Ringing costs producers a cluster-wide serialization of their commits, so it is kept to the
//! moments when the hub is idle anyway.
//!
//! A producer decides whether to ring when it inserts, so one that decided just before the hub
//! armed the bell commits without ringing. Arming waits for exactly those producers to end
//! ([`crate::bell`]), and the hub reads once more before it sleeps.
//!
//! # Gaps
//! Ids are handed out in order but commit in any order, so a read may show id 7 while 6 is
//! missing. 6 is either still in flight (it will commit, or roll back) or gone for good. Every
//! transaction that holds an uncommitted id holds `events` in ROW EXCLUSIVE mode, taken before
//! its first id (PostgreSQL locks the table before it runs an insert), and PostgreSQL makes a
//! commit visible before it releases locks. So on a gap the hub notes the holders of that lock;
//! every id up to the highest it has seen was taken before that note, by one of those holders or
//! by a transaction already finished (the sequence hands out one id at a time, in order). Once
//! all of the noted holders are gone, a fresh read is final: an id still missing up to that
//! horizon never commits and is skipped. Transactions that started later can only hold higher
//! ids, and transactions that do not write to `events` hold nothing back. While the reads keep
//! moving past gaps the hub does not look at the holders at all: most gaps close on their own
//! within a poll.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bell::Bell;
use crate::event::EventId;
use crate::keys;
use crate::metrics::Metrics;
use crate::recent::Recent;
use crate::replicas::{Lsn, Replicas};
use crate::router::Router;
use crate::sse::Frame;
use crate::store::{Store, StoreError};

/// The highest id below which every event is final and handed to the router; `None` until the
/// hub has found its starting point.
pub type Published = Option<EventId>;

const MAX_RETRY: Duration = Duration::from_secs(5);
/// A gap is re-checked at `gap_poll` at first, backing off to this: a rolled-back id is resolved
/// within about this long, and a long producer transaction costs ten cheap queries a second.
const MAX_GAP_POLL: Duration = Duration::from_millis(100);
/// A pass that takes longer than this is abandoned and retried (a hung pooled connection).
const PASS_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows per read when the recent tail is loaded at start.
const WARM_PAGE: i64 = 10_000;
/// A gap held open this long is logged with the pids of the transactions holding it.
const SLOW_GAP: Duration = Duration::from_secs(5);

/// When the hub reads.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// First re-check of a gap that a read did not move past.
    pub gap_poll: Duration,
    /// Between reads while awake.
    pub poll_interval: Duration,
    /// How long without a new event before the hub sleeps.
    pub idle_after: Duration,
    /// How often a sleeping hub reads anyway: a safety net for a ring lost in a way the listener
    /// could not see. One cheap indexed query.
    pub idle_poll: Duration,
}

pub struct Hub {
    store: Store,
    router: Arc<Router>,
    /// The tail of what it published, for followers resuming a little behind.
    recent: Arc<Recent>,
    published: watch::Sender<Published>,
    /// Told the WAL position of every cursor before it is published, for reads on replicas.
    replicas: Replicas,
    batch_size: i64,
    timing: Timing,
    /// Every id at or below it is published or known never to commit.
    cursor: EventId,
    /// Ids at or below it that are missing from the table will never appear.
    dead_upto: EventId,
    pending: Option<PendingGap>,
    /// The cursor at which the last read stopped at a gap without moving: the holders are looked
    /// up only when a gap is still there one poll later.
    stuck_at: Option<EventId>,
    /// Whether a failure to arm the bell has been logged since it last worked.
    arm_failure_logged: bool,
    /// Writes the keys of what it published ([`crate::keys`]), once it has started.
    keys: Option<keys::Writer>,
    metrics: Metrics,
}

/// A gap the hub is waiting on.
struct PendingGap {
    /// The highest id seen when the holders were noted.
    horizon: EventId,
    /// The transactions (and their pids) that may still hold an id at or below `horizon`.
    holders: HashMap<String, i32>,
    since: Instant,
    /// The current re-check interval.
    poll: Duration,
    reported: bool,
}

/// What a pass over the new events did.
struct Pass {
    /// Events handed to the router.
    published: usize,
    /// Stopped at an id that is still in flight: read again after this long.
    blocked: Option<Duration>,
}

impl Pass {
    fn found_nothing(&self) -> bool {
        self.published == 0 && self.blocked.is_none()
    }
}

/// Why the hub stopped sleeping.
enum Woken {
    Events,
    /// It could not arm the bell, and waited a little instead.
    NotArmed,
    Shutdown,
}

/// Where the hub's output goes, in the order it is told: the recent tail, the replicas (the
/// LSN of each cursor), the published cursor, then the router.
pub struct Outputs {
    pub router: Arc<Router>,
    pub recent: Arc<Recent>,
    pub replicas: Replicas,
    pub published: watch::Sender<Published>,
}

impl Hub {
    pub fn new(
        store: Store,
        outputs: Outputs,
        batch_size: u32,
        timing: Timing,
        metrics: Metrics,
    ) -> Hub {
        let Outputs {
            router,
            recent,
            replicas,
            published,
        } = outputs;
        Hub {
            store,
            router,
            recent,
            published,
            replicas,
            batch_size: i64::from(batch_size),
            timing,
            cursor: EventId::default(),
            dead_upto: EventId::default(),
            pending: None,
            stuck_at: None,
            arm_failure_logged: false,
            keys: None,
            metrics,
        }
    }

    /// Runs until `shutdown` is cancelled. `doorbell` is rung by the listener.
    pub async fn run(mut self, mut bell: Bell, doorbell: Arc<Notify>, shutdown: CancellationToken) {
        let mut retry = Backoff::new(Duration::from_millis(100), MAX_RETRY);
        let (start, start_lsn) = loop {
            let attempt = tokio::select! {
                attempt = self.starting_point() => attempt,
                _ = shutdown.cancelled() => return,
            };
            match attempt {
                Ok(start) => break start,
                Err(error) => {
                    let delay = retry.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "hub cannot find its starting point");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        self.cursor = start;
        self.dead_upto = start;
        self.keys = Some(keys::Writer::spawn(self.store.clone(), start));
        tokio::select! {
            _ = self.warm(start) => {}
            _ = shutdown.cancelled() => return,
        }
        self.replicas.record(start, start_lsn);
        self.published.send_replace(Some(start));
        tracing::info!(published = %start, "hub ready");

        let mut last_event = Instant::now();
        loop {
            let pass = if bell.is_armed() {
                // Just woken: read at once, and disarm meanwhile; a ring is not worth a round trip
                // of latency.
                let (disarmed, pass) = tokio::join!(bell.disarm(), self.pass());
                if let Err(error) = disarmed {
                    tracing::warn!(%error, "cannot disarm the doorbell");
                }
                pass
            } else {
                self.pass().await
            };
            let wait = match pass {
                Ok(pass) => {
                    retry.reset();
                    if pass.published > 0 {
                        last_event = Instant::now();
                    }
                    match pass.blocked {
                        Some(poll) => poll,
                        None if last_event.elapsed() < self.timing.idle_after => {
                            self.timing.poll_interval
                        }
                        None => match self.sleep(&mut bell, &doorbell, &shutdown).await {
                            Woken::Shutdown => return,
                            Woken::NotArmed => continue,
                            Woken::Events => {
                                last_event = Instant::now();
                                continue;
                            }
                        },
                    }
                }
                Err(error) => {
                    let delay = retry.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "hub cannot read new events");
                    delay
                }
            };
            // Awake, nobody rings for new events; the doorbell still rings after the listener
            // reconnects.
            tokio::select! {
                _ = doorbell.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Arms the bell and sleeps until it rings (reading anyway every `idle_poll`). The caller
    /// has just read and found nothing new; it disarms the bell when this returns.
    async fn sleep(
        &mut self,
        bell: &mut Bell,
        doorbell: &Notify,
        shutdown: &CancellationToken,
    ) -> Woken {
        // A ring heard while awake is stale: the read after arming covers whatever it was for.
        let _ = doorbell.notified().now_or_never();
        // Producers ring from the moment the lock is asked for. Its grant waits for the ones that
        // did not ring; a long producer transaction can make that take a while, during which a
        // ring still wakes the hub.
        let armed = tokio::select! {
            armed = bell.arm() => armed,
            _ = doorbell.notified() => return Woken::Events,
            _ = shutdown.cancelled() => return Woken::Shutdown,
        };
        if let Err(error) = armed {
            // Nobody could ring: stay up, reading at the slowest gap poll.
            if self.arm_failure_logged {
                tracing::debug!(%error, "cannot arm the doorbell");
            } else {
                self.arm_failure_logged = true;
                tracing::warn!(%error, "cannot arm the doorbell; reading every {MAX_GAP_POLL:?}");
            }
            return tokio::select! {
                _ = tokio::time::sleep(MAX_GAP_POLL) => Woken::NotArmed,
                _ = doorbell.notified() => Woken::NotArmed,
                _ = shutdown.cancelled() => Woken::Shutdown,
            };
        }
        self.arm_failure_logged = false;
        self.metrics.hub_sleeps.increment(1);
        loop {
            // Every producer that did not ring has ended: this read sees what it committed.
            match self.pass().await {
                Ok(pass) if pass.found_nothing() => {}
                _ => return Woken::Events,
            }
            tokio::select! {
                _ = doorbell.notified() => return Woken::Events,
                _ = tokio::time::sleep(self.timing.idle_poll) => {}
                _ = shutdown.cancelled() => return Woken::Shutdown,
            }
        }
    }

    /// One [`Hub::catch_up`], bounded in time.
    async fn pass(&mut self) -> Result<Pass, StoreError> {
        tokio::time::timeout(PASS_TIMEOUT, self.catch_up())
            .await
            .unwrap_or(Err(StoreError::Timeout(PASS_TIMEOUT)))
    }

    /// The id to start publishing after: the current maximum, once every transaction that might
    /// still hold a lower id has ended (a lower id committing later would otherwise be missed
    /// by live streams and by replays bounded by it), and once the keys of every event up to it
    /// are in ([`crate::keys`]). With the WAL position after that: a replica that has replayed
    /// it sees every event up to the start, and their keys.
    async fn starting_point(&self) -> Result<(EventId, Lsn), StoreError> {
        let max = self.store.max_id().await?;
        let mut holders = self.store.in_flight_holders().await?;
        while !holders.is_empty() {
            tokio::time::sleep(self.timing.gap_poll).await;
            let current = self.store.in_flight_holders().await?;
            holders.retain(|holder, _| current.contains_key(holder));
        }
        keys::catch_up(&self.store, max).await?;
        Ok((max, self.store.insert_lsn().await?))
    }

    /// Starts the recent tail with the events just below the starting point, so that the clients
    /// that reconnect right after a restart are served from memory: a few reads at start instead
    /// of one per client. Read newest first, a page at a time, until the tail's budget is full
    /// (large payloads fill it with fewer rows). If a read fails, the tail holds what came
    /// before it, or starts empty.
    async fn warm(&self, start: EventId) {
        let mut pages = Vec::new();
        let mut upto = start;
        let mut room = self.recent.budget();
        while room > 0 {
            let rows = match self.store.read_before(upto, WARM_PAGE).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the recent events; older resumes read the table");
                    break;
                }
            };
            let Some(first) = rows.first() else { break };
            upto = EventId(first.id.0 - 1);
            let short = (rows.len() as i64) < WARM_PAGE;
            let frames: Vec<Frame> = rows.into_iter().map(Frame::from_row).collect();
            room = room.saturating_sub(frames.iter().map(Recent::cost).sum());
            pages.push(frames);
            if short {
                break;
            }
        }
        let before: Vec<Frame> = pages.into_iter().rev().flatten().collect();
        tracing::debug!(events = before.len(), "recent events loaded");
        self.recent.reset(start, before);
    }

    /// Reads and publishes until it is up to date or blocked on an id in flight.
    async fn catch_up(&mut self) -> Result<Pass, StoreError> {
        let mut published = 0;
        loop {
            let (rows, lsn) = self.store.read_tail(self.cursor, self.batch_size).await?;
            let full = rows.len() as i64 == self.batch_size;
            let Some(highest_seen) = rows.last().map(|row| row.id) else {
                self.pending = None;
                return Ok(Pass {
                    published,
                    blocked: None,
                });
            };

            // The gap-free prefix of the rows, up to `upto`.
            let mut upto = self.cursor;
            let mut ready = Vec::with_capacity(rows.len());
            let mut blocked = false;
            for row in rows {
                // Every id between the cursor and this one must be known dead to move past it.
                if row.id.0 - 1 > upto.max(self.dead_upto).0 {
                    blocked = true;
                    break;
                }
                upto = row.id;
                ready.push(row);
            }
            if !ready.is_empty() {
                if let Some(keys) = &self.keys {
                    keys.published(&ready, upto);
                }
                self.cursor = upto;
                let batch: Vec<Frame> = ready.into_iter().map(Frame::from_row).collect();
                published += batch.len();
                self.metrics.events_published.increment(batch.len() as u64);
                self.metrics.hub_batch_size.record(batch.len() as f64);
                // Into the recent tail, then publish the new cursor, then route: a stream that
                // subscribes meanwhile and reads the cursor replays these (from the tail or the
                // table) and drops the duplicates it then also receives live. Routing first
                // would lose them.
                // The LSN too, before the cursor: a replica read bounded by it must find it.
                self.recent.append(&batch, self.cursor);
                self.replicas.record(self.cursor, lsn);
                self.published.send_replace(Some(self.cursor));
                self.router.route(&batch);
            }

            if !blocked {
                if full {
                    continue;
                }
                self.pending = None;
                return Ok(Pass {
                    published,
                    blocked: None,
                });
            }
            // Most gaps close by themselves within a poll: the id's transaction is committing.
            // Asking pg_locks (which briefly takes every lock partition producers need) about
            // each one would cost a query per pass under load, so only a gap that a read after
            // a poll still stops at is looked into.
            if published > 0 || (self.pending.is_none() && self.stuck_at != Some(self.cursor)) {
                self.stuck_at = (published == 0).then_some(self.cursor);
                if let Some(pending) = &mut self.pending {
                    pending.poll = self.timing.gap_poll;
                }
                return Ok(Pass {
                    published,
                    blocked: Some(self.timing.poll_interval),
                });
            }
            match self.gap_resolved(highest_seen).await? {
                // Everything up to the horizon is final now: read again, skipping what is missing.
                None => continue,
                Some(poll) => {
                    return Ok(Pass {
                        published,
                        blocked: Some(poll),
                    });
                }
            }
        }
    }

    /// Notes or re-checks the holders of in-flight ids for the gap after the cursor. None once
    /// they have all finished, else how long to wait before checking again.
    async fn gap_resolved(
        &mut self,
        highest_seen: EventId,
    ) -> Result<Option<Duration>, StoreError> {
        let current = self.store.in_flight_holders().await?;
        let cursor = self.cursor;
        let pending = match &mut self.pending {
            Some(pending) if pending.horizon > cursor => {
                pending
                    .holders
                    .retain(|holder, _| current.contains_key(holder));
                pending.poll = (pending.poll * 2).min(MAX_GAP_POLL.max(self.timing.gap_poll));
                pending
            }
            _ => self.pending.insert(PendingGap {
                horizon: highest_seen,
                holders: current,
                since: Instant::now(),
                poll: self.timing.gap_poll,
                reported: false,
            }),
        };
        if !pending.holders.is_empty() {
            let age = pending.since.elapsed();
            self.metrics.oldest_unresolved_age.set(age.as_secs_f64());
            if !pending.reported && pending.since.elapsed() >= SLOW_GAP {
                pending.reported = true;
                let pids: Vec<i32> = pending.holders.values().copied().collect();
                tracing::warn!(
                    after = %cursor,
                    waited = ?pending.since.elapsed(),
                    ?pids,
                    "events are held back by producer transactions that are still open"
                );
            }
            return Ok(Some(pending.poll));
        }
        let waited = pending.since.elapsed();
        self.metrics.oldest_unresolved_age.set(0.0);
        self.dead_upto = pending.horizon;
        self.pending = None;
        tracing::debug!(upto = %self.dead_upto, ?waited, "gap resolved");
        Ok(None)
    }
}
