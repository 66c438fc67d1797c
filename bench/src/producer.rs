//! Producers: real PostgreSQL connections inserting into `events`, as any client would.
//!
//! They run on their own runtime thread (see main.rs) so that the commit-return instant is taken
//! as soon as PostgreSQL answers, not whenever a worker busy with a thousand consumer sockets gets
//! round to it. Every insert uses `RETURNING id`, and the id, its consumer and an instant go into
//! the ledger: the commit returning, or (for the write-path scenarios, [`Stamp::Sent`]) the insert
//! being sent, so that latency includes what the producer's own commit cost.
//!
//! A [`Sink`] is one connection that turns an event into an id: a SQL connection here, an HTTP
//! keep-alive connection in publisher.rs. The paced and as-fast-as-possible drivers are shared.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::try_join_all;
use hdrhistogram::Histogram;
use tokio_postgres::{Client, NoTls};

use crate::latency::{Summary, new_histogram};
use crate::ledger::Ledger;

/// One autocommit statement is one transaction: the response to it is the commit returning.
const INSERT_ONE: &str = "INSERT INTO events (type, subscriber, payload) \
     VALUES ($3, $1, jsonb_build_object('seq', $2::bigint)) RETURNING id";

/// The event type of every event the bench writes, unless a scenario asks for several.
pub const BENCH_TYPE: &str = "bench";

/// [`BENCH_TYPE`] alone, for [`Targets::types`].
pub fn one_type() -> Arc<[Arc<str>]> {
    Arc::from([Arc::from(BENCH_TYPE)])
}

/// The EventPiper walkthrough's insert, into `table` (`events`, or the bench's plain table).
fn insert_walkthrough(table: &str) -> String {
    format!(
        "INSERT INTO {table} (type, timestamp, subscriber, payload) \
         VALUES ('{BENCH_TYPE}', now(), $1, jsonb_build_object('seq', $2::bigint)) RETURNING id"
    )
}

const INSERT_MANY: &str = "INSERT INTO events (type, subscriber, payload) \
     SELECT 'bench', $1, jsonb_build_object('seq', g) \
     FROM generate_series($2::bigint, $3::bigint) AS g RETURNING id";

/// What a set of producers did.
#[derive(Debug, Default)]
pub struct Produced {
    pub rows: u64,
    pub transactions: u64,
    pub elapsed: Duration,
    /// Rows per consumer index.
    pub per_consumer: Vec<u64>,
    /// Rows per consumer index and type index: `[consumer * types + kind]`.
    pub per_consumer_type: Vec<u64>,
    /// How many types the producers cycled through.
    pub types: usize,
    /// Round trip of each insert (send to commit returned).
    pub commit: Summary,
    /// How far the paced schedule fell behind at worst (0 when producers kept up).
    pub max_behind: Duration,
    /// Ids the ledger could not hold (must be 0).
    pub unrecorded: u64,
}

impl Produced {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Adds the rows of producers that ran beside these (bulk ones: their round trips are not
    /// single-event ones, so the histogram is left as it is).
    pub fn absorb(&mut self, other: Produced) {
        self.rows += other.rows;
        self.transactions += other.transactions;
        self.unrecorded += other.unrecorded;
        for (total, rows) in self.per_consumer.iter_mut().zip(other.per_consumer) {
            *total += rows;
        }
        // The bulk drivers write type 0 only; others' types are a prefix of ours.
        for (consumer, rows) in other
            .per_consumer_type
            .chunks(other.types.max(1))
            .enumerate()
        {
            for (kind, rows) in rows.iter().enumerate() {
                self.per_consumer_type[consumer * self.types + kind] += rows;
            }
        }
    }

    /// Rows produced for consumer `consumer`, of type `kind` only when given.
    pub fn rows_for(&self, consumer: u32, kind: Option<u16>) -> u64 {
        match kind {
            None => self.per_consumer[consumer as usize],
            Some(kind) => self
                .per_consumer_type
                .get(consumer as usize * self.types + kind as usize)
                .copied()
                .unwrap_or(0),
        }
    }
}

/// Which instant of an insert the ledger keeps, and latency is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// The commit returned to the producer: what the service adds.
    Committed,
    /// The insert was sent: what a producer waits for end to end, its own commit included.
    Sent,
}

/// Where events go: consumer `i % len` gets the i-th event.
#[derive(Clone)]
pub struct Targets {
    pub consumers: Arc<[Arc<str>]>,
    /// The event types the single-event drivers ([`paced_with`], [`flood_with`]) cycle through:
    /// the n-th event of each consumer has type `n % len`, so that every consumer gets every type
    /// in turn. The bulk drivers ([`flood`], [`bulk`], [`history`]) write one fixed type and
    /// record type index 0.
    pub types: Arc<[Arc<str>]>,
    pub ledger: Option<Arc<Ledger>>,
    /// Rows committed so far, for the progress line.
    pub counter: Arc<AtomicU64>,
    pub stamp: Stamp,
}

pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting a producer to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("producer connection: {error}");
        }
    });
    Ok(client)
}

struct Worker {
    rows: u64,
    transactions: u64,
    types: usize,
    /// `[consumer * types + kind]`.
    per_consumer_type: Vec<u64>,
    commit: Histogram<u64>,
    max_behind: Duration,
    unrecorded: u64,
}

impl Worker {
    fn new(consumers: usize, types: usize) -> Worker {
        Worker {
            rows: 0,
            transactions: 0,
            types,
            per_consumer_type: vec![0; consumers * types],
            commit: new_histogram(),
            max_behind: Duration::ZERO,
            unrecorded: 0,
        }
    }

    fn committed(
        &mut self,
        targets: &Targets,
        consumer: usize,
        kind: usize,
        ids: &[i64],
        sent: Instant,
    ) {
        let now = Instant::now();
        self.commit
            .saturating_record((now - sent).as_micros().max(1) as u64);
        if let Some(ledger) = &targets.ledger {
            let at = match targets.stamp {
                Stamp::Committed => now,
                Stamp::Sent => sent,
            };
            for &id in ids {
                if !ledger.record(id, consumer as u32, kind as u16, Some(at)) {
                    self.unrecorded += 1;
                }
            }
        }
        self.rows += ids.len() as u64;
        self.transactions += 1;
        self.per_consumer_type[consumer * self.types + kind] += ids.len() as u64;
        targets
            .counter
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
}

fn combine(workers: Vec<Worker>, elapsed: Duration, consumers: usize, types: usize) -> Produced {
    let mut commit = new_histogram();
    let mut produced = Produced {
        elapsed,
        per_consumer: vec![0; consumers],
        per_consumer_type: vec![0; consumers * types],
        types,
        ..Produced::default()
    };
    for worker in workers {
        produced.rows += worker.rows;
        produced.transactions += worker.transactions;
        produced.max_behind = produced.max_behind.max(worker.max_behind);
        produced.unrecorded += worker.unrecorded;
        for (total, rows) in produced
            .per_consumer_type
            .iter_mut()
            .zip(worker.per_consumer_type)
        {
            *total += rows;
        }
        let _ = commit.add(&worker.commit);
    }
    for (consumer, total) in produced.per_consumer.iter_mut().enumerate() {
        *total = produced.per_consumer_type[consumer * types..(consumer + 1) * types]
            .iter()
            .sum();
    }
    produced.commit = Summary::of(&commit);
    produced
}

/// One producer connection: sends one event and returns its id once it is durable (the commit
/// returned, or the service answered 201).
pub trait Sink: Send + 'static {
    fn send(
        &mut self,
        consumer: &str,
        event_type: &str,
        seq: i64,
    ) -> impl Future<Output = Result<i64>> + Send;
}

/// A PostgreSQL connection inserting single-row autocommit transactions.
pub struct SqlSink {
    client: Client,
    statement: tokio_postgres::Statement,
    /// The type written into the statement's text (the walkthrough's form), or `None` when the
    /// type is its third parameter.
    fixed_type: Option<&'static str>,
}

impl SqlSink {
    async fn new(client: Client, sql: &str, fixed_type: Option<&'static str>) -> Result<SqlSink> {
        let statement = client.prepare(sql).await?;
        Ok(SqlSink {
            client,
            statement,
            fixed_type,
        })
    }
}

impl Sink for SqlSink {
    async fn send(&mut self, consumer: &str, event_type: &str, seq: i64) -> Result<i64> {
        let row = match self.fixed_type {
            None => {
                self.client
                    .query_one(&self.statement, &[&consumer, &seq, &event_type])
                    .await
            }
            Some(fixed) => {
                // A scenario that wants several types must not get one silently.
                anyhow::ensure!(
                    event_type == fixed,
                    "this producer writes type {fixed:?} only, not {event_type:?}"
                );
                self.client
                    .query_one(&self.statement, &[&consumer, &seq])
                    .await
            }
        }
        .context("inserting an event")?;
        Ok(row.try_get(0)?)
    }
}

/// `producers` connections inserting the walkthrough's single-row form into `table`, with
/// `synchronous_commit` set on each (it is a per-session setting a producer chooses).
pub async fn walkthrough_sinks(
    url: &str,
    producers: usize,
    table: &str,
    synchronous_commit: bool,
) -> Result<Vec<SqlSink>> {
    let sql = insert_walkthrough(table);
    let setting = if synchronous_commit { "on" } else { "off" };
    try_join_all((0..producers).map(|_| async {
        let client = connect(url).await?;
        client
            .batch_execute(&format!("SET synchronous_commit = {setting}"))
            .await?;
        SqlSink::new(client, &sql, Some(BENCH_TYPE)).await
    }))
    .await
}

/// Single-row transactions at `rate` per second in total for `duration`, spread over `producers`
/// connections on a fixed schedule: event k is due at start + k / rate. A producer that falls
/// behind sends the overdue ones at once, so the average rate holds if PostgreSQL can take it;
/// one that is still sending at twice the duration stops there (the rate shows it fell short).
pub async fn paced(
    url: &str,
    producers: usize,
    rate: f64,
    duration: Duration,
    targets: Targets,
) -> Result<Produced> {
    let sinks = try_join_all(
        (0..producers).map(|_| async { SqlSink::new(connect(url).await?, INSERT_ONE, None).await }),
    )
    .await?;
    paced_with(sinks, rate, duration, targets).await
}

/// The paced schedule of [`paced`] over any sinks.
pub async fn paced_with<S: Sink>(
    sinks: Vec<S>,
    rate: f64,
    duration: Duration,
    targets: Targets,
) -> Result<Produced> {
    let producers = sinks.len();
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let cutoff = start + duration * 2;
    let (consumers, types) = (targets.consumers.len(), targets.types.len());
    let workers = sinks.into_iter().enumerate().map(|(p, mut sink)| {
        let targets = targets.clone();
        async move {
            let mut worker = Worker::new(consumers, types);
            for k in (p as u64..total).step_by(producers) {
                if tokio::time::Instant::now() >= cutoff {
                    break;
                }
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due).await;
                let sent = Instant::now();
                worker.max_behind = worker.max_behind.max(sent - due.into_std());
                let consumer = (k % consumers as u64) as usize;
                // The round of k over the consumers: each consumer's events go through the types.
                let kind = ((k / consumers as u64) % types as u64) as usize;
                let id = sink
                    .send(&targets.consumers[consumer], &targets.types[kind], k as i64)
                    .await?;
                worker.committed(&targets, consumer, kind, &[id], sent);
            }
            anyhow::Ok(worker)
        }
    });
    let workers = try_join_all(workers).await?;
    let elapsed = start.elapsed();
    Ok(combine(workers, elapsed, consumers, types))
}

/// Every sink sends single events back to back for `duration`: as fast as they are taken.
pub async fn flood_with<S: Sink>(
    sinks: Vec<S>,
    duration: Duration,
    targets: Targets,
) -> Result<Produced> {
    let start = Instant::now();
    let end = start + duration;
    let (consumers, types) = (targets.consumers.len(), targets.types.len());
    let workers = sinks.into_iter().enumerate().map(|(p, mut sink)| {
        let targets = targets.clone();
        async move {
            let mut worker = Worker::new(consumers, types);
            let mut seq = p as i64 * 1_000_000_000;
            // Bounded by time; each iteration is one round trip.
            while Instant::now() < end {
                // Every connection cycles through all consumers, each starting at its own, and
                // through the types once per round of consumers.
                let n = p + worker.transactions as usize;
                let (consumer, kind) = (n % consumers, (n / consumers) % types);
                let sent = Instant::now();
                let id = sink
                    .send(&targets.consumers[consumer], &targets.types[kind], seq)
                    .await?;
                worker.committed(&targets, consumer, kind, &[id], sent);
                seq += 1;
            }
            anyhow::Ok(worker)
        }
    });
    let workers = try_join_all(workers).await?;
    let elapsed = start.elapsed();
    Ok(combine(workers, elapsed, consumers, types))
}

/// Transactions of `batch` rows each, back to back on every connection, for `duration`: as fast
/// as PostgreSQL takes them.
pub async fn flood(
    url: &str,
    producers: usize,
    batch: u64,
    duration: Duration,
    targets: Targets,
) -> Result<Produced> {
    let clients = try_join_all((0..producers).map(|_| connect(url))).await?;
    let start = Instant::now();
    let end = start + duration;
    let consumers = targets.consumers.len();
    let workers = clients.into_iter().enumerate().map(|(p, client)| {
        let targets = targets.clone();
        async move {
            let statement = client.prepare(INSERT_MANY).await?;
            let mut worker = Worker::new(consumers, 1);
            let mut seq = p as i64 * 1_000_000_000;
            // Bounded by time; each iteration is one round trip.
            while Instant::now() < end {
                let consumer = (worker.transactions % consumers as u64) as usize;
                let sent = Instant::now();
                let rows = client
                    .query(
                        &statement,
                        &[
                            &&*targets.consumers[consumer],
                            &seq,
                            &(seq + batch as i64 - 1),
                        ],
                    )
                    .await
                    .context("inserting a batch of events")?;
                seq += batch as i64;
                let ids = rows
                    .iter()
                    .map(|row| row.try_get(0))
                    .collect::<Result<Vec<i64>, _>>()?;
                worker.committed(&targets, consumer, 0, &ids, sent);
            }
            anyhow::Ok(worker)
        }
    });
    let workers = try_join_all(workers).await?;
    let elapsed = start.elapsed();
    Ok(combine(workers, elapsed, consumers, 1))
}

/// Bulk history for `consumer` (index 0 in `ledger`): `count` rows in transactions of `chunk`
/// rows, then every id recorded (untimed) so that the replay can be checked exactly.
pub async fn history(
    url: &str,
    consumer: &str,
    count: u64,
    chunk: u64,
    ledger: &Ledger,
) -> Result<u64> {
    let client = connect(url).await?;
    let insert = client
        .prepare(
            "INSERT INTO events (type, subscriber, payload) \
             SELECT 'history', $1, jsonb_build_object('seq', g) \
             FROM generate_series($2::bigint, $3::bigint) AS g",
        )
        .await?;
    let started = Instant::now();
    let mut done = 0u64;
    while done < count {
        let rows = chunk.min(count - done);
        client
            .execute(
                &insert,
                &[&consumer, &(done as i64), &((done + rows) as i64 - 1)],
            )
            .await
            .context("inserting history")?;
        done += rows;
        eprintln!(
            "  history: {done}/{count} rows ({:.0} rows/s)",
            done as f64 / started.elapsed().as_secs_f64()
        );
    }
    let rows = client
        .query(
            "SELECT id FROM events WHERE subscriber = $1 ORDER BY id",
            &[&consumer],
        )
        .await?;
    let mut recorded = 0;
    for row in rows {
        if ledger.record(row.try_get(0)?, 0, 0, None) {
            recorded += 1;
        }
    }
    Ok(recorded)
}

/// What [`bulk`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bulk {
    pub statements: u64,
    pub statement_rows: u64,
    pub copies: u64,
    pub copy_rows: u64,
}

/// The other ways users fill `events`, beside single-row producers: a multi-row `INSERT ...
/// SELECT generate_series` and a `COPY ... FROM STDIN`, alternately, `chunk` rows each, one every
/// `pause`, for `duration`. COPY returns no ids, so each COPY tags its rows and reads their ids
/// back (through the (subscriber, id) index) to put them in the ledger.
pub async fn bulk(
    url: &str,
    chunk: u64,
    pause: Duration,
    duration: Duration,
    targets: Targets,
) -> Result<(Produced, Bulk)> {
    use futures::SinkExt;

    let client = connect(url).await?;
    let many = client
        .prepare(
            "INSERT INTO events (type, timestamp, subscriber, payload) \
             SELECT 'bulk', now(), $1, jsonb_build_object('seq', g) \
             FROM generate_series($2::bigint, $3::bigint) AS g RETURNING id",
        )
        .await?;
    let floor = client
        .prepare("SELECT coalesce(max(id), 0) FROM events")
        .await?;
    let tagged = client
        .prepare(
            "SELECT id FROM events WHERE subscriber = $1 AND id > $2 \
             AND payload->>'copy' = $3::bigint::text ORDER BY id",
        )
        .await?;
    let consumers = targets.consumers.len();
    let mut worker = Worker::new(consumers, 1);
    let mut counts = Bulk::default();
    let start = Instant::now();
    let end = start + duration;
    let mut round = 0i64;
    // Bounded by time: every iteration is two statements and a pause.
    while Instant::now() < end {
        let consumer = (round as usize) % consumers;
        let name = &*targets.consumers[consumer];
        let first = round * chunk as i64;
        let sent = Instant::now();
        let rows = client
            .query(&many, &[&name, &first, &(first + chunk as i64 - 1)])
            .await
            .context("multi-row INSERT ... SELECT")?;
        let ids = rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<i64>, _>>()?;
        worker.committed(&targets, consumer, 0, &ids, sent);
        counts.statements += 1;
        counts.statement_rows += ids.len() as u64;
        tokio::time::sleep(pause).await;

        // Every id handed out after this reading is above it.
        let below: i64 = client.query_one(&floor, &[]).await?.try_get(0)?;
        let mut text = String::with_capacity(chunk as usize * 48);
        for seq in 0..chunk {
            text.push_str(&format!(
                "copy\t{name}\t{{\"copy\": {round}, \"seq\": {seq}}}\n"
            ));
        }
        let sent = Instant::now();
        let sink = client
            .copy_in::<_, bytes::Bytes>("COPY events (type, subscriber, payload) FROM STDIN")
            .await?;
        let mut sink = std::pin::pin!(sink);
        sink.send(bytes::Bytes::from(text)).await?;
        let copied = sink.finish().await.context("COPY into events")?;
        let ids = client
            .query(&tagged, &[&name, &below, &round])
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<i64>, _>>()?;
        anyhow::ensure!(
            ids.len() as u64 == copied,
            "COPY wrote {copied} rows but {} carry its tag",
            ids.len()
        );
        worker.committed(&targets, consumer, 0, &ids, sent);
        counts.copies += 1;
        counts.copy_rows += copied;
        round += 1;
        tokio::time::sleep(pause).await;
    }
    Ok((combine(vec![worker], start.elapsed(), consumers, 1), counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Hands out ids 1, 2, 3, ... and remembers what each was sent with.
    struct FakeSink(Arc<Mutex<Vec<(String, String)>>>);

    impl Sink for FakeSink {
        async fn send(&mut self, consumer: &str, event_type: &str, _seq: i64) -> Result<i64> {
            let mut sent = self.0.lock().unwrap();
            sent.push((consumer.to_owned(), event_type.to_owned()));
            Ok(sent.len() as i64)
        }
    }

    #[tokio::test]
    async fn each_consumer_gets_the_types_in_turn_and_the_ledger_knows_them() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let ledger = Arc::new(Ledger::new(1, Instant::now()));
        let targets = Targets {
            consumers: ["c0", "c1"].into_iter().map(Arc::from).collect(),
            types: ["t0", "t1", "t2"].into_iter().map(Arc::from).collect(),
            ledger: Some(Arc::clone(&ledger)),
            counter: Arc::new(AtomicU64::new(0)),
            stamp: Stamp::Committed,
        };
        // 12 events over 120 ms: only who gets what is checked, never when. (The schedule stops
        // at twice the duration; a shorter one could be cut short on a busy machine.)
        let produced = paced_with(
            vec![FakeSink(Arc::clone(&sent))],
            100.0,
            Duration::from_millis(120),
            targets,
        )
        .await
        .unwrap();
        let sent = sent.lock().unwrap();
        let got: Vec<(&str, &str)> = sent.iter().map(|(c, t)| (&**c, &**t)).collect();
        assert_eq!(
            &got[..6],
            [
                ("c0", "t0"),
                ("c1", "t0"),
                ("c0", "t1"),
                ("c1", "t1"),
                ("c0", "t2"),
                ("c1", "t2")
            ]
        );
        assert_eq!(produced.rows, 12);
        assert_eq!(produced.per_consumer, [6, 6]);
        assert_eq!(produced.rows_for(1, Some(2)), 2);
        assert_eq!(produced.rows_for(0, None), 6);
        // Event 6 (the sixth id) went to c1 with t2.
        assert_eq!((ledger.owner(6), ledger.kind(6)), (Some(1), Some(2)));
    }
}
