//! The fault suite: exactly-once, in-order delivery per consumer across reconnects, two service
//! instances on one database, while producers, slow and flaky consumers and injected faults
//! (killed notification and pool connections, a PostgreSQL restart) all run at once.
//!
//! Seeded: a failure prints its seed; `EVENT_PIPER_FAULT_SEED=N` replays the same decisions (the
//! interleaving itself still depends on timing). `EVENT_PIPER_FAULT_SECS=N` sets how long load
//! and faults run (default 30): raise it for a soak.
//!
//! This binary has its own PostgreSQL cluster (it restarts it), separate from the other tests.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use common::{Read, SseClient, TestApp};

const CONSUMERS: [&str; 4] = ["alice", "bob", "carol", "slow"];
/// Reads one event every this long: slower than the producers' bursts, so it lags its channel.
const SLOW_READ: Duration = Duration::from_millis(4);

#[derive(Default)]
struct Counters {
    transactions_committed: AtomicU64,
    transactions_rolled_back: AtomicU64,
    producer_errors: AtomicU64,
    reconnects: AtomicU64,
    refused_503: AtomicU64,
    faults: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_is_exactly_once_and_in_order_under_faults() {
    let seed: u64 = std::env::var("EVENT_PIPER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let seconds: u64 = std::env::var("EVENT_PIPER_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    println!("fault suite: seed {seed} (EVENT_PIPER_FAULT_SEED={seed} to replay), {seconds} s");

    let db_url = common::fresh_database().await;
    // A small live channel so that the slow consumer falls behind it and recovers from the
    // table; small batches so that the hub reads in many steps. No safety read within the run:
    // a hub that slept through a ring it needed would stall its streams and fail the run. The
    // two hubs fall asleep after different idle times, so that one wakes while the other sleeps.
    let instance = |idle_after| {
        TestApp::builder()
            .database(&db_url)
            .channel_capacity(32)
            .batch_size(100)
            .heartbeat(Duration::from_secs(1))
            .idle_poll(Duration::from_secs(3600))
            .idle_after(idle_after)
            .start()
    };
    // Shared with the consumers, which switch instances on every reconnect.
    let instances: Arc<[TestApp]> = Arc::new([
        instance(Duration::from_millis(5)).await,
        instance(Duration::from_millis(200)).await,
    ]);
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);

    let consumers: Vec<_> = CONSUMERS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let rng = StdRng::seed_from_u64(seed.wrapping_add(100 + i as u64));
            consume(
                name.to_string(),
                rng,
                Arc::clone(&instances),
                Arc::clone(&counters),
            )
        })
        .collect();
    let producers: Vec<_> = (0..2)
        .map(|i| {
            let rng = StdRng::seed_from_u64(seed.wrapping_add(200 + i));
            tokio::spawn(produce(
                i,
                rng,
                db_url.clone(),
                deadline,
                Arc::clone(&counters),
            ))
        })
        .collect();
    let faults = tokio::spawn(inject_faults(
        StdRng::seed_from_u64(seed.wrapping_add(300)),
        db_url.clone(),
        deadline,
        Arc::clone(&counters),
    ));

    for producer in producers {
        producer.await.expect("producer task");
    }
    faults.await.expect("fault task");

    // The table is the truth: what committed, in id order.
    let client = connect_retrying(&db_url).await;
    let rows = client
        .query("select id, subscriber from events order by id", &[])
        .await
        .unwrap();
    let mut expected: HashMap<&str, Vec<i64>> = HashMap::new();
    for row in &rows {
        let id: i64 = row.get(0);
        let subscriber: Option<String> = row.get(1);
        for name in CONSUMERS {
            if subscriber.as_deref().is_none_or(|s| s == name) {
                expected.entry(name).or_default().push(id);
            }
        }
    }
    let last_id = rows.last().map(|row| row.get::<_, i64>(0)).unwrap_or(0);

    // Every consumer must reach the last id addressed to it (or broadcast).
    let mut delivered = 0;
    for (name, task) in CONSUMERS.iter().zip(consumers) {
        let want = expected.remove(name).unwrap_or_default();
        let target = want.last().copied().unwrap_or(0);
        task.handle.target.store(target as u64, Ordering::SeqCst);
        let received = tokio::time::timeout(Duration::from_secs(120), task.join)
            .await
            .unwrap_or_else(|_| panic!("{name} did not catch up to {target} (seed {seed})"))
            .expect("consumer task");
        delivered += received.ids.len();
        assert!(
            received.misrouted.is_empty(),
            "{name} received events of others: {:?} (seed {seed})",
            received.misrouted
        );
        if received.ids != want {
            let lost: Vec<_> = want
                .iter()
                .filter(|id| !received.ids.contains(id))
                .take(10)
                .collect();
            let extra: Vec<_> = received
                .ids
                .iter()
                .filter(|id| !want.contains(id))
                .take(10)
                .collect();
            panic!(
                "{name}: received {} events, expected {}; lost {lost:?}, unexpected {extra:?}, \
                 out of order or repeated: {:?} (seed {seed})",
                received.ids.len(),
                want.len(),
                received.order_violations
            );
        }
    }
    drop(instances);

    println!(
        "fault suite passed: {} events committed (last id {last_id}) in {} transactions \
         ({} rolled back, {} producer errors from faults); {delivered} delivered, 0 lost, \
         0 duplicated, 0 misrouted; {} reconnects ({} refused with 503); {} faults injected",
        rows.len(),
        counters.transactions_committed.load(Ordering::SeqCst),
        counters.transactions_rolled_back.load(Ordering::SeqCst),
        counters.producer_errors.load(Ordering::SeqCst),
        counters.reconnects.load(Ordering::SeqCst),
        counters.refused_503.load(Ordering::SeqCst),
        counters.faults.load(Ordering::SeqCst),
    );
}

/// A producer connection, retried while the database restarts.
async fn connect_retrying(url: &str) -> Client {
    for _ in 0..300 {
        if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the database did not come back");
}

/// Transactions of 1 to 200 rows for random consumers and broadcasts: most commit, some roll
/// back, some stay open for seconds, some roll back a savepoint, some use COPY.
async fn produce(
    index: u64,
    mut rng: StdRng,
    url: String,
    deadline: Instant,
    counters: Arc<Counters>,
) {
    let mut client = connect_retrying(&url).await;
    while Instant::now() < deadline {
        let result = transaction(&mut client, &mut rng, index).await;
        match result {
            Ok(true) => counters
                .transactions_committed
                .fetch_add(1, Ordering::SeqCst),
            Ok(false) => counters
                .transactions_rolled_back
                .fetch_add(1, Ordering::SeqCst),
            Err(_) => {
                counters.producer_errors.fetch_add(1, Ordering::SeqCst);
                if client.is_closed() {
                    client = connect_retrying(&url).await;
                }
                0
            }
        };
        let pause = rng.random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

fn pick_subscriber(rng: &mut StdRng) -> Option<&'static str> {
    if rng.random_bool(0.1) {
        None
    } else {
        Some(CONSUMERS[rng.random_range(0..CONSUMERS.len())])
    }
}

async fn insert_rows(
    tx: &tokio_postgres::Transaction<'_>,
    subscriber: Option<&str>,
    count: i32,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "insert into events (type, subscriber, payload) \
         select 'fault', $1::text, jsonb_build_object('to', $1::text, 'n', n) \
         from generate_series(1, $2::int) n",
        &[&subscriber, &count],
    )
    .await
}

/// One transaction; Ok(true) if it committed.
async fn transaction(
    client: &mut Client,
    rng: &mut StdRng,
    producer: u64,
) -> Result<bool, tokio_postgres::Error> {
    let size: i32 = rng.random_range(1..=200);
    let kind = rng.random_range(0..100);
    let tx = client.transaction().await?;
    match kind {
        // COPY, a few rows per consumer.
        0..=9 => {
            let sink = tx
                .copy_in("copy events (type, subscriber, payload) from stdin")
                .await?;
            let mut rows = String::new();
            for n in 0..size {
                let subscriber = pick_subscriber(rng);
                let (column, json) = match subscriber {
                    Some(name) => (name.to_string(), format!("\"{name}\"")),
                    None => ("\\N".to_string(), "null".to_string()),
                };
                rows.push_str(&format!(
                    "copied\t{column}\t{{\"to\": {json}, \"p\": {producer}, \"n\": {n}}}\n"
                ));
            }
            futures::pin_mut!(sink);
            futures::SinkExt::send(&mut sink, bytes::Bytes::from(rows)).await?;
            sink.finish().await?;
        }
        // A savepoint whose rows are rolled back inside a transaction that commits others.
        10..=19 => {
            insert_rows(&tx, pick_subscriber(rng), size / 2 + 1).await?;
            tx.batch_execute("savepoint s").await?;
            insert_rows(&tx, pick_subscriber(rng), size / 2 + 1).await?;
            tx.batch_execute("rollback to savepoint s").await?;
            insert_rows(&tx, pick_subscriber(rng), 3).await?;
        }
        _ => {
            let mut left = size;
            while left > 0 {
                let chunk = rng.random_range(1..=left);
                insert_rows(&tx, pick_subscriber(rng), chunk).await?;
                left -= chunk;
            }
        }
    }
    // Held open: every later id waits for this one.
    if rng.random_bool(0.05) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
    }
    if rng.random_bool(0.15) {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Kills notification connections and pool connections every second or two, and restarts
/// PostgreSQL once, midway.
async fn inject_faults(mut rng: StdRng, url: String, deadline: Instant, counters: Arc<Counters>) {
    let start = Instant::now();
    let restart_at = start + (deadline - start) / 2;
    let mut restarted = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(700..2000))).await;
        if !restarted && Instant::now() >= restart_at {
            restarted = true;
            let cluster = common::cluster();
            tokio::task::spawn_blocking(move || cluster.restart())
                .await
                .unwrap()
                .expect("restarting PostgreSQL");
            counters.faults.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let application = if rng.random_bool(0.5) {
            "event-piper-listener"
        } else {
            "event-piper"
        };
        let client = connect_retrying(&url).await;
        let killed: i64 = client
            .query_one(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity \
                 where application_name = $1 and datname = current_database()",
                &[&application],
            )
            .await
            .map(|row| row.get(0))
            .unwrap_or(0);
        counters.faults.fetch_add(killed as u64, Ordering::SeqCst);
    }
}

/// What a consumer received, stitched across its reconnects.
#[derive(Default)]
struct Received {
    ids: Vec<i64>,
    order_violations: Vec<(i64, i64)>,
    misrouted: Vec<i64>,
}

struct ConsumerHandle {
    /// The last id the consumer must reach before it stops (0 while load runs).
    target: AtomicU64,
}

struct ConsumerTask {
    handle: Arc<ConsumerHandle>,
    join: tokio::task::JoinHandle<Received>,
}

/// Reads `name`'s events, disconnecting at random and resuming with Last-Event-ID on the other
/// instance, until it has reached the target id set at the end.
fn consume(
    name: String,
    rng: StdRng,
    instances: Arc<[TestApp]>,
    counters: Arc<Counters>,
) -> ConsumerTask {
    let handle = Arc::new(ConsumerHandle {
        target: AtomicU64::new(0),
    });
    let join = tokio::spawn(consume_loop(
        name,
        rng,
        instances,
        counters,
        Arc::clone(&handle),
    ));
    ConsumerTask { handle, join }
}

async fn consume_loop(
    name: String,
    mut rng: StdRng,
    instances: Arc<[TestApp]>,
    counters: Arc<Counters>,
    handle: Arc<ConsumerHandle>,
) -> Received {
    let mut received = Received::default();
    let mut last: i64 = 0;
    let mut connection = 0usize;
    let done = |last: i64| {
        let target = handle.target.load(Ordering::SeqCst) as i64;
        target > 0 && last >= target
    };
    while !done(last) {
        let app = &instances[connection % instances.len()];
        connection += 1;
        if connection > 1 {
            counters.reconnects.fetch_add(1, Ordering::SeqCst);
        }
        let last_event_id = last.to_string();
        let headers = [
            ("X-Consumer-Id", name.as_str()),
            ("Last-Event-ID", &last_event_id),
        ];
        let response = app.try_get("/events", &headers).await;
        let response = match response {
            Ok(response) if response.status() == 200 => response,
            Ok(response) => {
                assert_eq!(
                    response.status(),
                    503,
                    "only 503 is acceptable for a refused stream"
                );
                assert!(response.headers().contains_key("retry-after"));
                counters.refused_503.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Stay for a random number of events or a random time, then drop the connection.
        let budget = rng.random_range(20..600);
        let stay = Duration::from_millis(rng.random_range(300..4000));
        let left = Instant::now() + stay;
        // Read from the first byte: this loop does not need the stream to be live, and it must
        // not fail where the stream ends early, as it may (it then resumes).
        let mut stream = SseClient::new(response);
        let mut taken = 0;
        while Instant::now() < left && !done(last) {
            let event = match stream.read_within(Duration::from_millis(500)).await {
                Read::Event(event) => event,
                Read::Ended => break,    // ended or failed: resume
                Read::Quiet => continue, // quiet: check the clock and the target
            };
            let id = event.id;
            if id <= last {
                received.order_violations.push((last, id));
            }
            if addressee(&event.data).is_some_and(|to| to != name) {
                received.misrouted.push(id);
            }
            received.ids.push(id);
            last = id;
            taken += 1;
            if name == "slow" {
                tokio::time::sleep(SLOW_READ).await;
            }
            // Leave mid-stream: whatever was read so far counts, the rest comes on resume.
            if taken >= budget {
                break;
            }
        }
    }
    received
}

/// The payload's "to": the consumer the event was inserted for (None for a broadcast).
fn addressee(data: &str) -> Option<String> {
    let payload: serde_json::Value = serde_json::from_str(data).expect("JSON payload");
    payload["to"].as_str().map(str::to_owned)
}
