//! Replay pages read from the table, merged: the pages that followers of plain consumers ask for
//! at the same time are read by one statement.
//!
//! A reconnect storm older than the recent tail ([`crate::recent`]) would otherwise cost a
//! statement per resume, and one more per resume for the truncation check. Here a request joins
//! a queue; a task takes whatever has queued, plans it into lanes, reads every lane with one
//! statement and splits the rows back into each request's page. Nothing waits on purpose: a lone
//! request is read at once, and requests gather only while earlier statements run (group
//! commit), with at most `in_flight` statements at a time.
//!
//! A lane is one index range scan: `(after, upto]` of one consumer's events, or of the
//! broadcasts, at most `limit` rows. Requests of one consumer whose resume points lie within
//! `limit` ids of each other share a lane, and all requests share broadcast lanes the same way.
//! That is enough for every page to move its request forward: a full lane holds `limit` distinct
//! ids above its start, so it reaches at least `after + limit`, beyond the resume point of every
//! request in it, and a short lane reaches its end.
//!
//! The statement also reads how far retention has deleted, in the same snapshot, so a resume
//! needs no second statement to learn whether it was truncated.
//!
//! Selections with topics or a type filter are read alone ([`Store::read_selection`]).
//!
//! Every read goes through [`Replicas`]: on a replica that has replayed past the point where the
//! hub published the end of its range, else on the primary. A merged read's rows and retention's
//! `deleted_upto` come from one snapshot of whichever server answered, so a truncation notice
//! agrees with the rows it comes with.

use std::sync::Arc;

use metrics::Counter;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::event::{ConsumerId, EventId, EventRow};
use crate::replicas::{Need, Replicas};
use crate::selection::Reader;
use crate::store::{Lane, Page, Store, StoreError};

/// Requests one statement reads at most: it bounds the rows one statement returns to this many
/// pages.
const MAX_REQUESTS: usize = 128;

/// What a read returns.
pub struct Read {
    pub page: Page,
    /// How far retention had deleted, as seen by the same statement (merged reads only).
    pub deleted_upto: Option<EventId>,
}

/// Reads replay pages; cheap to clone, shared by every follower of an instance.
#[derive(Clone)]
pub struct ReplayReads {
    store: Store,
    replicas: Replicas,
    /// Unbounded, yet bounded by the followers: each waits for its page before it asks again.
    queue: mpsc::UnboundedSender<Request>,
    /// Statements that read replay pages, merged or alone.
    statements: Counter,
}

struct Request {
    consumer: ConsumerId,
    range: (EventId, EventId),
    limit: i64,
    reply: oneshot::Sender<Result<Read, Arc<StoreError>>>,
}

impl ReplayReads {
    /// Starts the task that merges reads; it ends when the last clone is dropped.
    pub fn start(
        store: Store,
        replicas: Replicas,
        in_flight: usize,
        statements: Counter,
    ) -> ReplayReads {
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(merge(
            store.clone(),
            replicas.clone(),
            requests,
            in_flight.max(1),
            statements.clone(),
        ));
        ReplayReads {
            store,
            replicas,
            queue,
            statements,
        }
    }

    /// One page of `reader`'s events in `(after, upto]`, at most `limit` rows. A plain
    /// consumer's page is read together with the others asked for meanwhile; other selections
    /// are read alone.
    pub async fn read(
        &self,
        reader: &Reader,
        range: (EventId, EventId),
        limit: i64,
    ) -> Result<Read, StoreError> {
        let selection = &reader.selection;
        if let (Some(consumer), [], None) = (
            selection.followed_consumer(),
            selection.matchers(),
            &reader.types,
        ) {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                consumer: consumer.clone(),
                range,
                limit,
                reply,
            };
            if self.queue.send(request).is_ok()
                && let Ok(read) = answer.await
            {
                return read.map_err(StoreError::Shared);
            }
            // The task is gone (the runtime is shutting down): read alone.
        }
        self.statements.increment(1);
        let types = reader.types.as_ref();
        let page = self
            .replicas
            .read(&self.store, Need::UpTo(range.1), |store| async move {
                store.read_selection(selection, range, limit, types).await
            })
            .await?;
        Ok(Read {
            page,
            deleted_upto: None,
        })
    }
}

/// The task: takes what has queued, up to [`MAX_REQUESTS`], whenever a statement may start.
async fn merge(
    store: Store,
    replicas: Replicas,
    mut requests: mpsc::UnboundedReceiver<Request>,
    in_flight: usize,
    statements: Counter,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let Some(first) = requests.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_REQUESTS {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // A follower that went away (its stream closed) needs no page.
        batch.retain(|request| !request.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        statements.increment(1);
        let (store, replicas) = (store.clone(), replicas.clone());
        tokio::spawn(async move {
            answer(&store, &replicas, batch).await;
            drop(permit);
        });
    }
}

/// Reads one batch and answers each of its requests.
async fn answer(store: &Store, replicas: &Replicas, batch: Vec<Request>) {
    let asks: Vec<Ask> = batch
        .iter()
        .map(|request| Ask {
            consumer: &request.consumer,
            range: request.range,
            limit: request.limit,
        })
        .collect();
    let plan = Plan::new(&asks);
    // One snapshot serves every lane: it must reach the furthest end asked for.
    let upto = batch
        .iter()
        .map(|request| request.range.1)
        .max()
        .unwrap_or_default();
    let lanes = &plan.lanes;
    let read = replicas
        .read(store, Need::UpTo(upto), |store| async move {
            store.read_lanes(lanes).await
        })
        .await;
    match read {
        Ok((lanes, deleted_upto)) => {
            let pages: Vec<_> = (0..asks.len())
                .map(|at| plan.page(&asks, &lanes, at))
                .collect();
            for (request, page) in batch.into_iter().zip(pages) {
                let read = match page {
                    Some(page) => Ok(Read {
                        page,
                        deleted_upto: Some(deleted_upto),
                    }),
                    // Cannot happen with lanes planned as above; a page that would not move
                    // its request is refused rather than handed out.
                    None => Err(Arc::new(StoreError::Unexpected(
                        "a merged replay read made no progress".into(),
                    ))),
                };
                let _ = request.reply.send(read);
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for request in batch {
                let _ = request.reply.send(Err(Arc::clone(&error)));
            }
        }
    }
}

/// One request, as the planner sees it.
struct Ask<'a> {
    consumer: &'a ConsumerId,
    range: (EventId, EventId),
    limit: i64,
}

/// A batch's lanes, and the two each request takes its rows from.
struct Plan {
    lanes: Vec<Lane>,
    /// Per request: its consumer's lane and its broadcast lane, as indices into `lanes`.
    taken_from: Vec<(usize, usize)>,
}

impl<'a> Ask<'a> {
    /// What requests must have in common to share a lane: the consumer (none for broadcast
    /// lanes) and the limit.
    fn lane_key(&self, broadcasts: bool) -> (Option<&'a str>, i64) {
        let consumer: &'a ConsumerId = self.consumer;
        ((!broadcasts).then(|| consumer.as_str()), self.limit)
    }
}

impl Plan {
    fn new<'a>(asks: &[Ask<'a>]) -> Plan {
        let mut lanes: Vec<Lane> = Vec::new();
        let mut taken_from = vec![(0, 0); asks.len()];
        // Consumer lanes, then broadcast lanes: requests in order of (subscriber, limit, after),
        // each joining the lane before it when that lane's scan surely reaches past its resume
        // point.
        for broadcasts in [false, true] {
            let key = |ask: &Ask<'a>| ask.lane_key(broadcasts);
            let mut order: Vec<usize> = (0..asks.len()).collect();
            order.sort_by_key(|&at| (key(&asks[at]), asks[at].range.0));
            let mut open: Option<usize> = None;
            for at in order {
                let ask = &asks[at];
                let (after, upto) = ask.range;
                let joins = open.filter(|&lane| {
                    let lane = &lanes[lane];
                    (lane.subscriber.as_deref(), lane.limit) == key(ask)
                        && after.0 < lane.after.0.saturating_add(lane.limit)
                });
                let lane = match joins {
                    Some(lane) => {
                        lanes[lane].upto = lanes[lane].upto.max(upto);
                        lane
                    }
                    None => {
                        lanes.push(Lane {
                            subscriber: key(ask).0.map(str::to_owned),
                            after,
                            upto,
                            limit: ask.limit,
                        });
                        lanes.len() - 1
                    }
                };
                open = Some(lane);
                if broadcasts {
                    taken_from[at].1 = lane;
                } else {
                    taken_from[at].0 = lane;
                }
            }
        }
        Plan { lanes, taken_from }
    }

    /// Request `at`'s page from the rows of every lane (`rows[i]` for `lanes[i]`, in id order):
    /// its consumer's rows and the broadcasts in its range, as far as both lanes reach, at most
    /// its limit. None if that would not move it forward.
    fn page(&self, asks: &[Ask<'_>], rows: &[Vec<EventRow>], at: usize) -> Option<Page> {
        let (after, upto) = asks[at].range;
        let limit = usize::try_from(asks[at].limit).unwrap_or(usize::MAX);
        let (own, broadcasts) = self.taken_from[at];
        let reach = |lane: usize| {
            let lane_rows = &rows[lane];
            match lane_rows.last() {
                Some(last) if lane_rows.len() as i64 >= self.lanes[lane].limit => last.id,
                _ => self.lanes[lane].upto,
            }
        };
        let mut covered = upto.min(reach(own)).min(reach(broadcasts));
        if covered <= after {
            return None;
        }
        let within = |row: &&EventRow| row.id > after && row.id <= covered;
        let mut mine = rows[own].iter().filter(within).peekable();
        let mut shared = rows[broadcasts].iter().filter(within).peekable();
        let mut page = Vec::new();
        // The two are disjoint (a consumer's rows are not broadcasts): merge them in id order.
        while page.len() < limit {
            let next = match (mine.peek(), shared.peek()) {
                (Some(a), Some(b)) if a.id < b.id => mine.next(),
                (Some(_), Some(_)) => shared.next(),
                (Some(_), None) => mine.next(),
                (None, _) => shared.next(),
            };
            match next {
                Some(row) => page.push(row.clone()),
                None => break,
            }
        }
        if page.len() == limit
            && let Some(last) = page.last()
        {
            covered = last.id;
        }
        Some(Page {
            rows: page,
            covered,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An event of the table: for consumer `Some(c)`, a broadcast (None, no topics), or a
    /// topic event (None, with topics), which no plain consumer selects.
    fn row(id: i64, subscriber: Option<&str>, topic: bool) -> EventRow {
        EventRow {
            id: EventId(id),
            event_type: "t".into(),
            subscriber: subscriber.map(str::to_owned),
            payload: "{}".into(),
            topics: topic.then(|| vec!["/t".to_owned()]),
            private: false,
            update_id: None,
            retry: None,
        }
    }

    fn is_broadcast(row: &EventRow) -> bool {
        row.subscriber.is_none() && row.topics.is_none()
    }

    /// What the statement returns for a lane, computed from the whole table.
    fn read_lane(table: &[EventRow], lane: &Lane) -> Vec<EventRow> {
        table
            .iter()
            .filter(|row| row.id > lane.after && row.id <= lane.upto)
            .filter(|row| match &lane.subscriber {
                Some(consumer) => row.subscriber.as_deref() == Some(consumer),
                None => is_broadcast(row),
            })
            .take(lane.limit as usize)
            .cloned()
            .collect()
    }

    fn consumers() -> Vec<ConsumerId> {
        ["a", "b", "c"]
            .iter()
            .map(|name| ConsumerId::parse(name.as_bytes()).unwrap())
            .collect()
    }

    /// Plans `asks`, reads the lanes from `table`, and checks every page against the table: it
    /// moves its request forward, stays in its range and limit, and holds exactly the events
    /// its consumer selects up to where it says it covers.
    fn check(table: &[EventRow], asks: &[Ask<'_>]) -> Plan {
        let plan = Plan::new(asks);
        let rows: Vec<_> = plan
            .lanes
            .iter()
            .map(|lane| read_lane(table, lane))
            .collect();
        for (at, ask) in asks.iter().enumerate() {
            let (after, upto) = ask.range;
            let page = plan
                .page(asks, &rows, at)
                .expect("every page moves forward");
            assert!(
                page.covered > after && page.covered <= upto,
                "covered out of range"
            );
            assert!(page.rows.len() as i64 <= ask.limit, "over the limit");
            let expected: Vec<EventId> = table
                .iter()
                .filter(|row| row.id > after && row.id <= page.covered)
                .filter(|row| {
                    is_broadcast(row) || row.subscriber.as_deref() == Some(ask.consumer.as_str())
                })
                .map(|row| row.id)
                .collect();
            let got: Vec<EventId> = page.rows.iter().map(|row| row.id).collect();
            assert_eq!(got, expected, "request {at}: {:?}", ask.range);
        }
        plan
    }

    #[test]
    fn nearby_resumes_of_one_consumer_share_a_lane_and_all_share_the_broadcasts() {
        let table: Vec<EventRow> = (1..=100)
            .map(|id| match id % 4 {
                0 => row(id, None, false),
                1 => row(id, Some("a"), false),
                2 => row(id, Some("b"), false),
                _ => row(id, None, true),
            })
            .collect();
        let consumers = consumers();
        let ask = |consumer: usize, after: i64| Ask {
            consumer: &consumers[consumer],
            range: (EventId(after), EventId(100)),
            limit: 10,
        };
        // Three resumes of `a` within 10 ids of each other, one far behind them, one of `b`.
        let asks = [ask(0, 50), ask(0, 55), ask(0, 59), ask(0, 5), ask(1, 50)];
        let plan = check(&table, &asks);
        let consumer_lanes = plan.lanes.iter().filter(|l| l.subscriber.is_some()).count();
        assert_eq!(
            consumer_lanes, 3,
            "a from 5, a from 50 (with 55 and 59), b from 50"
        );
        let broadcast_lanes = plan.lanes.len() - consumer_lanes;
        assert_eq!(broadcast_lanes, 2, "from 5, and from 50 for the rest");
    }

    #[test]
    fn a_lane_read_short_covers_its_whole_range() {
        let table = vec![row(3, Some("a"), false), row(9, None, false)];
        let consumers = consumers();
        let asks = [Ask {
            consumer: &consumers[0],
            range: (EventId(0), EventId(20)),
            limit: 5,
        }];
        let plan = Plan::new(&asks);
        let rows: Vec<_> = plan
            .lanes
            .iter()
            .map(|lane| read_lane(&table, lane))
            .collect();
        let page = plan.page(&asks, &rows, 0).unwrap();
        assert_eq!(page.covered, EventId(20));
        assert_eq!(page.rows.len(), 2);
    }

    proptest! {
        #[test]
        fn every_page_is_exactly_its_consumers_events_up_to_what_it_covers(
            kinds in proptest::collection::vec(0u8..5, 1..120),
            asks in proptest::collection::vec((0usize..3, 0i64..120, 1i64..80, 1i64..6), 1..24),
        ) {
            let table: Vec<EventRow> = kinds
                .iter()
                .enumerate()
                .map(|(at, kind)| {
                    let id = at as i64 + 1;
                    match kind {
                        0 => row(id, Some("a"), false),
                        1 => row(id, Some("b"), false),
                        2 => row(id, Some("c"), false),
                        3 => row(id, None, false),
                        _ => row(id, None, true),
                    }
                })
                .collect();
            let consumers = consumers();
            let asks: Vec<Ask<'_>> = asks
                .iter()
                .map(|&(consumer, after, span, limit)| Ask {
                    consumer: &consumers[consumer],
                    range: (EventId(after), EventId(after + span)),
                    limit,
                })
                .collect();
            check(&table, &asks);
        }
    }
}
