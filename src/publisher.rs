//! The publisher: group commit for `POST /events`.
//!
//! Inserting each request on its own costs a statement and a commit (a WAL flush) per request in
//! PostgreSQL, and a pool checkout and a trip through the pooled connection's task per request in
//! the service: single-event requests from 16 or 64 connections stopped at about 9,000 a second
//! (NOTIFY trigger dropped; 4,000 with it), at about 150 us of CPU each, two thirds of it in
//! PostgreSQL, while another row in a statement costs a few. So requests are queued to one task,
//! which takes everything queued (up to [`MAX_ROWS`] events) and inserts it in one statement, in
//! one transaction. While that statement runs, the next requests queue up; the busier the service,
//! the more each statement carries. A lone request is inserted at once. The clients a statement
//! answered usually send their next request right away: the next statement waits for them (up to
//! about a millisecond, `LINGER`), so that they do not miss it and wait for a whole statement more.
//!
//! What each request still gets, as if it had been inserted alone:
//! - its events are durable (committed) before it is answered;
//! - its events are inserted next to each other, in its order, and its answer is its own ids (the
//!   trigger assigns ids in insertion order, and only this task inserts, one statement at a time,
//!   so a request's ids are contiguous unless some other producer inserts at the same moment);
//! - all or nothing for its own events, and nothing else's failure: when PostgreSQL refuses a
//!   combined statement (one request's payload it cannot store, say) nothing of it was inserted,
//!   so each request is retried alone and only the culprit fails. A lost connection is not
//!   retried: the statement's outcome is unknown, so every member is told the database is
//!   unavailable, as a request inserted alone would be.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::event::{EventId, NewEvent};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Events per combined statement. A request larger than this is still inserted whole, alone; the
/// bound keeps a statement (and the requests waiting on it) from growing without limit under load.
pub const MAX_ROWS: usize = 1000;

/// How long a statement waits, at most, for the clients the previous one answered (see `run`).
/// Tokio's timer counts whole milliseconds, so this is 1 to 2 ms; it is only reached when fewer
/// clients come back than last time, and the next statement then expects fewer.
const LINGER: Duration = Duration::from_millis(1);

/// Requests waiting for the publisher. A full queue makes handlers wait for room (backpressure),
/// it does not refuse them.
const QUEUE_CAPACITY: usize = 4096;

/// Why a request's events were not inserted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// Shared: one failed statement answers every request it carried.
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("the service is shutting down")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Vec<EventId>, PublishError>>;

struct Request {
    events: Vec<NewEvent>,
    reply: Reply,
}

/// The handle handlers publish through; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::Sender<Request>,
}

impl Publisher {
    /// Starts the publishing task on `tasks`. It ends once every handle is dropped and the queue
    /// is drained. `hub` is this instance's doorbell: it is rung after every statement, so that
    /// the hub reads what was just committed at once instead of at its next poll.
    pub fn start(
        store: Store,
        hub: Arc<Notify>,
        metrics: Metrics,
        tasks: &TaskTracker,
    ) -> Publisher {
        let (queue, requests) = mpsc::channel(QUEUE_CAPACITY);
        tasks.spawn(run(store, requests, hub, metrics));
        Publisher { queue }
    }

    /// Inserts `events` (all or nothing) and returns their ids, in order, once they are committed.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<Vec<EventId>, PublishError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Request { events, reply })
            .await
            .map_err(|_| PublishError::Stopped)?;
        answer.await.map_err(|_| PublishError::Stopped)?
    }
}

async fn run(
    store: Store,
    mut requests: mpsc::Receiver<Request>,
    hub: Arc<Notify>,
    metrics: Metrics,
) {
    // A request that did not fit in the previous statement opens the next one.
    let mut carried: Option<Request> = None;
    // How many requests the last statement answered. Clients that wait for their answer before
    // sending the next request (most producers, and every benchmark) send it right after: the
    // next statement waits a moment for them rather than leave without them and make them wait
    // for a whole statement more.
    let mut expected = 0;
    loop {
        let first = match carried.take() {
            Some(request) => request,
            None => match requests.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        // Handlers already woken (their requests read, on this or the other worker) run before
        // the group is closed: one yield makes a statement carry them too, at no cost to a lone
        // request but a scheduling pass.
        tokio::task::yield_now().await;
        let mut group = Group::new(first);
        carried = group.take_queued(&mut requests);
        if carried.is_none() && group.requests.len() < expected {
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while carried.is_none() && group.requests.len() < expected {
                tokio::select! {
                    biased;
                    next = requests.recv() => match next {
                        Some(next) => carried = group.add(next),
                        None => break,
                    },
                    _ = &mut linger => break,
                }
                if carried.is_none() {
                    carried = group.take_queued(&mut requests);
                }
            }
        }
        expected = group.requests.len();
        metrics.publish_group_requests.record(expected as f64);
        insert_group(&store, group.requests, &metrics).await;
        hub.notify_one();
    }
}

/// The requests one statement carries.
struct Group {
    requests: Vec<Request>,
    rows: usize,
}

impl Group {
    fn new(first: Request) -> Group {
        Group {
            rows: first.events.len(),
            requests: vec![first],
        }
    }

    /// Adds `request`, or hands it back when it would take the group past [`MAX_ROWS`].
    fn add(&mut self, request: Request) -> Option<Request> {
        if self.rows + request.events.len() > MAX_ROWS {
            return Some(request);
        }
        self.rows += request.events.len();
        self.requests.push(request);
        None
    }

    /// Adds what is queued, until a request does not fit (handed back).
    fn take_queued(&mut self, requests: &mut mpsc::Receiver<Request>) -> Option<Request> {
        while let Ok(next) = requests.try_recv() {
            if let Some(left) = self.add(next) {
                return Some(left);
            }
        }
        None
    }
}

/// Inserts the group's events in one statement and answers every request; on a refusal, retries
/// each request alone.
async fn insert_group(store: &Store, group: Vec<Request>, metrics: &Metrics) {
    metrics.publish_statements.increment(1);
    let events = group.iter().flat_map(|request| request.events.iter());
    let error = match store.publish(events).await {
        Ok(ids) => {
            let mut ids = ids.into_iter();
            for request in group {
                let own: Vec<EventId> = ids.by_ref().take(request.events.len()).collect();
                // The receiver is gone when the client went away; its events are in anyway.
                let _ = request.reply.send(Ok(own));
            }
            return;
        }
        Err(error) => error,
    };
    if group.len() == 1 || !refused(&error) {
        let error = PublishError::Store(Arc::new(error));
        for request in group {
            let _ = request.reply.send(Err(error.clone()));
        }
        return;
    }
    tracing::debug!(%error, requests = group.len(), "combined insert refused; retrying alone");
    metrics.publish_retries.increment(group.len() as u64);
    for request in group {
        metrics.publish_statements.increment(1);
        let result = store
            .publish(request.events.iter())
            .await
            .map_err(|error| PublishError::Store(Arc::new(error)));
        let _ = request.reply.send(result);
    }
}

/// PostgreSQL refused the statement (and so rolled it back whole), as opposed to a failure that
/// leaves its outcome unknown (a lost connection).
fn refused(error: &StoreError) -> bool {
    matches!(error, StoreError::Db(db) if db.as_db_error().is_some())
}
