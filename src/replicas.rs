//! Read replicas: hot standbys that serve the read-heavy load (replay pages, history searches,
//! webhook catch-ups) instead of the primary.
//!
//! A standby lags. A read that must see every event up to an id the hub has published waits
//! until the standby has replayed the WAL up to the point where the hub read that id:
//! - the hub reads its tail together with `pg_current_wal_insert_lsn()`, in one statement, and
//!   records that LSN with the cursor it then publishes ([`Replicas::record`]). The statement's
//!   snapshot is taken before the function runs, and a transaction becomes visible only after
//!   its commit record is inserted into the WAL (also with `synchronous_commit = off`, which
//!   only skips the wait for the flush), so every commit the hub saw ends at or below that LSN.
//!   The write and flush positions would not do: an asynchronous commit is visible before
//!   it is written.
//! - a replica has replayed those commits once `pg_last_wal_replay_lsn()` reaches that LSN; the
//!   startup process moves it only after applying a record, so a snapshot taken *after* a
//!   statement saw it there includes them. A snapshot of the same statement would not: it is
//!   taken before the function is evaluated. So the replica's replayed LSN is asked for in a
//!   statement of its own, right before each read. It is not remembered across reads: a standby
//!   that restarts comes back at its last restartpoint, behind what it had replayed, and a new
//!   pooled connection would not tell. (Sending both statements pipelined on one connection
//!   would make it one round trip; the store's reads take their own pooled connection today.)
//! - it polls every few milliseconds for at most `--replica-max-wait`, then reads on the
//!   primary.
//!
//! A replica that fails (refused connection, any error) is skipped, with backoff, until it
//! answers again; the read that failed is made on the primary. Reads always go where the rows
//! are complete, so nothing is lost or repeated whichever server answers.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::event::EventId;
use crate::metrics::ReplicaCounters;
use crate::store::{Store, StoreError};

/// A WAL position as bytes since the start (`pg_lsn - '0/0'`).
pub type Lsn = i64;

/// Published cursors remembered with their LSN. A follower's replay ends at a cursor it read a
/// moment ago; an older one falls back to the oldest mark kept, whose LSN is only higher.
const MARKS: usize = 4096;
/// Between two looks at a lagging replica's replayed LSN.
const POLL: Duration = Duration::from_millis(2);
/// A look at a replica's replayed LSN that takes longer than this counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A failed replica is tried again after this, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How far a read must see.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Every event up to this published id.
    UpTo(EventId),
    /// Everything the hub has published so far (history searches).
    Published,
}

/// The replicas of an instance and the LSNs of what its hub published; cheap to clone. With no
/// replica configured every read goes to the primary at once.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    replicas: Vec<Replica>,
    /// (published cursor, LSN of the read that published it), oldest first.
    marks: Mutex<VecDeque<(EventId, Lsn)>>,
    max_wait: Duration,
    /// Where the next read starts looking, so that equal replicas share the load.
    next: AtomicUsize,
    counters: ReplicaCounters,
}

struct Replica {
    store: Store,
    /// The URL with its password masked, for logs.
    name: String,
    /// The replayed LSN last seen: only to prefer the replica furthest ahead, never to skip a
    /// look before a read.
    replayed: AtomicI64,
    health: Mutex<Health>,
}

struct Health {
    /// Skipped until then, after a failure.
    down_until: Option<Instant>,
    backoff: Backoff,
}

impl Replicas {
    /// `replicas` are (connection settings, name for logs); their pools open connections lazily.
    pub fn new(
        replicas: Vec<(tokio_postgres::Config, String)>,
        pool_size: usize,
        max_wait: Duration,
        counters: ReplicaCounters,
    ) -> Result<Replicas, StoreError> {
        let replicas = replicas
            .into_iter()
            .map(|(config, name)| {
                Ok(Replica {
                    store: Store::new(config, pool_size)?,
                    name,
                    replayed: AtomicI64::new(0),
                    health: Mutex::new(Health {
                        down_until: None,
                        backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
                    }),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Replicas::of(replicas, max_wait, counters))
    }

    fn of(replicas: Vec<Replica>, max_wait: Duration, counters: ReplicaCounters) -> Replicas {
        Replicas {
            inner: Arc::new(Inner {
                replicas,
                marks: Mutex::new(VecDeque::new()),
                max_wait,
                next: AtomicUsize::new(0),
                counters,
            }),
        }
    }

    /// Whether any replica is configured: else no read waits for an LSN.
    pub fn configured(&self) -> bool {
        !self.inner.replicas.is_empty()
    }

    /// The hub publishes `cursor`, read at `lsn`. Called before the cursor is published, so that
    /// every published id has a mark.
    pub fn record(&self, cursor: EventId, lsn: Lsn) {
        if self.inner.replicas.is_empty() {
            return;
        }
        let mut marks = lock(&self.inner.marks);
        if marks.len() == MARKS {
            marks.pop_front();
        }
        marks.push_back((cursor, lsn));
    }

    /// The LSN a replica must have replayed to serve `need`; None when nothing is recorded that
    /// covers it (then only the primary can serve it).
    fn required(&self, need: Need) -> Option<Lsn> {
        let marks = lock(&self.inner.marks);
        match need {
            Need::Published => marks.back().map(|&(_, lsn)| lsn),
            Need::UpTo(upto) => {
                // The first mark at or past `upto`: its read saw every commit up to `upto`.
                let at = marks.partition_point(|&(cursor, _)| cursor < upto);
                marks.get(at).map(|&(_, lsn)| lsn)
            }
        }
    }

    /// Runs `read` on a replica that has replayed far enough for `need`, or else on `primary`.
    /// A replica that fails is skipped for a while and the read made on the primary.
    pub async fn read<T, F, Fut>(
        &self,
        primary: &Store,
        need: Need,
        read: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Store) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        if !self.inner.replicas.is_empty()
            && let Some(required) = self.required(need)
            && let Some(replica) = self.pick()
        {
            match self.caught_up(replica, required).await {
                Ok(true) => match read(replica.store.clone()).await {
                    Ok(value) => {
                        replica.succeeded();
                        self.inner.counters.by_replica.increment(1);
                        return Ok(value);
                    }
                    Err(error) => {
                        replica.failed(&error);
                        self.inner.counters.error.increment(1);
                    }
                },
                Ok(false) => self.inner.counters.lag.increment(1),
                Err(error) => {
                    replica.failed(&error);
                    self.inner.counters.error.increment(1);
                }
            }
        }
        self.inner.counters.by_primary.increment(1);
        read(primary.clone()).await
    }

    /// A replica that is not skipped: the one furthest ahead, starting the search at a rotating
    /// place so that replicas equally far share the reads.
    fn pick(&self) -> Option<&Replica> {
        let replicas = &self.inner.replicas;
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..replicas.len())
            .map(|offset| &replicas[(start + offset) % replicas.len()])
            .filter(|replica| replica.usable(now))
            .max_by_key(|replica| replica.replayed.load(Ordering::Relaxed))
    }

    /// Whether `replica` has replayed up to `required`, waiting at most `--replica-max-wait`.
    async fn caught_up(&self, replica: &Replica, required: Lsn) -> Result<bool, StoreError> {
        let deadline = Instant::now() + self.inner.max_wait;
        loop {
            // Bounded: a replica that stopped answering (a dead host) would otherwise hold the
            // read for as long as the connection takes to fail.
            let replayed = tokio::time::timeout(PROBE_TIMEOUT, replica.store.replay_lsn())
                .await
                .unwrap_or(Err(StoreError::Timeout(PROBE_TIMEOUT)))?;
            replica.replayed.store(replayed, Ordering::Relaxed);
            if replayed >= required {
                return Ok(true);
            }
            if Instant::now() + POLL > deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Replica {
    fn usable(&self, now: Instant) -> bool {
        lock(&self.health)
            .down_until
            .is_none_or(|until| until <= now)
    }

    fn succeeded(&self) {
        let mut health = lock(&self.health);
        if health.down_until.take().is_some() {
            tracing::info!(replica = %self.name, "replica answers again");
        }
        health.backoff.reset();
    }

    fn failed(&self, error: &StoreError) {
        let mut health = lock(&self.health);
        let delay = health.backoff.next_delay();
        if health.down_until.is_none() {
            tracing::warn!(replica = %self.name, %error, retry_in = ?delay, "replica failed; reading from the primary");
        } else {
            tracing::debug!(replica = %self.name, %error, retry_in = ?delay, "replica still failing");
        }
        health.down_until = Some(Instant::now() + delay);
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data (marks, a
/// deadline) stays meaningful.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_needs_the_lsn_of_the_first_mark_at_or_past_its_end() {
        // The pool is built lazily: nothing connects here.
        let config: tokio_postgres::Config = "postgres://x@127.0.0.1:1/x".parse().unwrap();
        let replicas = Replicas::new(
            vec![(config, "r".into())],
            1,
            Duration::from_millis(1),
            ReplicaCounters::noop(),
        )
        .unwrap();
        assert_eq!(replicas.required(Need::UpTo(EventId(5))), None);
        assert_eq!(replicas.required(Need::Published), None);
        replicas.record(EventId(10), 100);
        replicas.record(EventId(20), 250);
        assert_eq!(replicas.required(Need::UpTo(EventId(3))), Some(100));
        assert_eq!(replicas.required(Need::UpTo(EventId(10))), Some(100));
        assert_eq!(replicas.required(Need::UpTo(EventId(11))), Some(250));
        assert_eq!(replicas.required(Need::UpTo(EventId(21))), None);
        assert_eq!(replicas.required(Need::Published), Some(250));
    }

    #[test]
    fn without_replicas_nothing_is_recorded() {
        let replicas = Replicas::of(Vec::new(), Duration::ZERO, ReplicaCounters::noop());
        replicas.record(EventId(10), 100);
        assert_eq!(replicas.required(Need::Published), None);
    }
}
