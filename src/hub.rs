//! The hub: the only reader of new events.
//!
//! One task, one cursor. Woken by the listener's doorbell, it reads everything after its cursor
//! in bounded batches, publishes only a gap-free prefix of ids, renders each event's frame once and
//! hands the batch to the router. Database work is per batch, never per consumer or per stream.
//!
//! # Gaps
//! Ids are handed out in order but commit in any order, so a read may show id 7 while 6 is
//! missing. 6 is either still in flight (it will commit, or roll back) or gone for good. Every
//! transaction that holds an uncommitted id holds a shared advisory lock (schema.sql), and
//! PostgreSQL makes a commit visible before it releases locks. So on a gap the hub notes the
//! holders of that lock; every id up to the highest it has seen was taken before that note, by one
//! of those holders or by a transaction already finished. Once all of the noted holders are gone,
//! a fresh read is final: an id still missing up to that horizon never commits and is skipped.
//! Transactions that started later can only hold higher ids, and transactions that never insert
//! events never take the lock, so they hold nothing back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::router::Router;
use crate::store::{Store, StoreError};

/// The highest id below which every event is final and handed to the router; `None` until the
/// hub has found its starting point.
pub type Published = Option<i64>;

const MAX_RETRY: Duration = Duration::from_secs(5);
/// A gap is re-checked at `gap_poll` at first, backing off to this: a rolled-back id is resolved
/// within about this long, and a long producer transaction costs ten cheap queries a second.
const MAX_GAP_POLL: Duration = Duration::from_millis(100);
/// When nothing rings, the hub reads anyway this often: a safety net for a notification lost in
/// a way the listener could not see. One cheap indexed query.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// A pass that takes longer than this is abandoned and retried (a hung pooled connection).
const PASS_TIMEOUT: Duration = Duration::from_secs(30);
/// A gap held open this long is logged with the pids of the transactions holding it.
const SLOW_GAP: Duration = Duration::from_secs(5);

pub struct Hub {
    store: Store,
    router: Arc<Router>,
    published: watch::Sender<Published>,
    batch_size: i64,
    gap_poll: Duration,
    /// Every id at or below it is published or known never to commit.
    cursor: i64,
    /// Ids at or below it that are missing from the table will never appear.
    dead_upto: i64,
    pending: Option<PendingGap>,
    metrics: Metrics,
}

/// A gap the hub is waiting on.
struct PendingGap {
    /// The highest id seen when the holders were noted.
    horizon: i64,
    /// The transactions (and their pids) that may still hold an id at or below `horizon`.
    holders: HashMap<String, i32>,
    since: Instant,
    /// The current re-check interval.
    poll: Duration,
    reported: bool,
}

/// What a pass over the new events ended with.
enum Caught {
    Up,
    /// Blocked on an id that is still in flight; check again after this long.
    Waiting(Duration),
}

impl Hub {
    pub fn new(
        store: Store,
        router: Arc<Router>,
        published: watch::Sender<Published>,
        batch_size: u32,
        gap_poll: Duration,
        metrics: Metrics,
    ) -> Hub {
        Hub {
            store,
            router,
            published,
            batch_size: i64::from(batch_size),
            gap_poll,
            cursor: 0,
            dead_upto: 0,
            pending: None,
            metrics,
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, doorbell: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let mut retry = Duration::from_millis(100);
        let start = loop {
            let attempt = tokio::select! {
                attempt = self.starting_point() => attempt,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match attempt {
                Ok(start) => break start,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry, "hub cannot find its starting point");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        };
        self.cursor = start;
        self.dead_upto = start;
        self.published.send_replace(Some(start));
        tracing::info!(published = start, "hub ready");

        let mut wait = IDLE_POLL;
        loop {
            tokio::select! {
                _ = doorbell.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let pass = tokio::time::timeout(PASS_TIMEOUT, self.catch_up())
                .await
                .unwrap_or(Err(StoreError::Timeout(PASS_TIMEOUT)));
            wait = match pass {
                Ok(Caught::Up) => {
                    retry = Duration::from_millis(100);
                    IDLE_POLL
                }
                Ok(Caught::Waiting(poll)) => poll,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry, "hub cannot read new events");
                    let delay = retry;
                    retry = (retry * 2).min(MAX_RETRY);
                    delay
                }
            };
        }
    }

    /// The id to start publishing after: the current maximum, once every transaction that might
    /// still hold a lower id has ended (a lower id committing later would otherwise be missed
    /// by live streams and by replays bounded by it).
    async fn starting_point(&self) -> Result<i64, StoreError> {
        let max = self.store.max_id().await?;
        let mut holders = self.store.in_flight_holders().await?;
        while !holders.is_empty() {
            tokio::time::sleep(self.gap_poll).await;
            let current = self.store.in_flight_holders().await?;
            holders.retain(|holder, _| current.contains_key(holder));
        }
        Ok(max)
    }

    /// Reads and publishes until it is up to date or blocked on an id in flight.
    async fn catch_up(&mut self) -> Result<Caught, StoreError> {
        loop {
            let rows = self.store.read_after(self.cursor, self.batch_size).await?;
            let full = rows.len() as i64 == self.batch_size;
            let Some(highest_seen) = rows.last().map(|row| row.id) else {
                self.pending = None;
                return Ok(Caught::Up);
            };

            let mut batch = Vec::with_capacity(rows.len());
            let mut blocked = false;
            for row in rows {
                // Every id between the cursor and this one must be known dead to move past it.
                if row.id - 1 > self.cursor.max(self.dead_upto) {
                    blocked = true;
                    break;
                }
                self.cursor = row.id;
                let frame = row.frame();
                batch.push((row.subscriber, frame));
            }
            if !batch.is_empty() {
                self.metrics.events_published.increment(batch.len() as u64);
                self.metrics.hub_batch_size.record(batch.len() as f64);
                // Publish the new cursor before routing: a stream that subscribes meanwhile and
                // reads the cursor replays these from the table and drops the duplicates it then
                // also receives live. The other order would lose them.
                self.published.send_replace(Some(self.cursor));
                self.router.route(
                    batch
                        .iter()
                        .map(|(consumer, frame)| (consumer.as_deref(), frame.clone())),
                );
            }

            if !blocked {
                if full {
                    continue;
                }
                self.pending = None;
                return Ok(Caught::Up);
            }
            match self.gap_resolved(highest_seen).await? {
                // Everything up to the horizon is final now: read again, skipping what is missing.
                None => continue,
                Some(poll) => return Ok(Caught::Waiting(poll)),
            }
        }
    }

    /// Notes or re-checks the holders of in-flight ids for the gap after the cursor. None once
    /// they have all finished, else how long to wait before checking again.
    async fn gap_resolved(&mut self, highest_seen: i64) -> Result<Option<Duration>, StoreError> {
        let current = self.store.in_flight_holders().await?;
        let cursor = self.cursor;
        let pending = match &mut self.pending {
            Some(pending) if pending.horizon > cursor => {
                pending
                    .holders
                    .retain(|holder, _| current.contains_key(holder));
                pending.poll = (pending.poll * 2).min(MAX_GAP_POLL.max(self.gap_poll));
                pending
            }
            _ => self.pending.insert(PendingGap {
                horizon: highest_seen,
                holders: current,
                since: Instant::now(),
                poll: self.gap_poll,
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
                    after = cursor,
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
        tracing::debug!(upto = self.dead_upto, ?waited, "gap resolved");
        Ok(None)
    }
}
