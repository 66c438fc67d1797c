//! The fault suite: exactly-once, in-order delivery per consumer and on a stream of two topics
//! across reconnects, two service instances on one database, while producers (addressing
//! consumers, broadcasts and topics), slow and flaky consumers and injected faults (killed
//! notification, pool and webhook lease connections, a PostgreSQL restart) all run at once.
//! Webhook subscriptions of some consumers are delivered at the same time to receivers
//! that fail, answer slowly, go away and answer 410: each must get every event of its consumer,
//! in order, at least once, repeated only where the rules allow it (see [`check_deliveries`]).
//! Two more tests kill a real `event-piper` process while it delivers: mid-batch, and while the
//! other instance is claiming the subscription.
//!
//! Seeded: a failure prints its seed; `EVENT_PIPER_FAULT_SEED=N` replays the same decisions (the
//! interleaving itself still depends on timing). `EVENT_PIPER_FAULT_SECS=N` sets how long load
//! and faults run (default 30): raise it for a soak. A hot standby (`pg_basebackup -R` of this
//! binary's cluster) is part of the run, read from by the first instance;
//! `EVENT_PIPER_FAULT_REPLICA=0` leaves it out.
//!
//! This binary has its own PostgreSQL cluster (it restarts it), separate from the other tests.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_postgres::Client;

use event_piper::store::subscriptions::LEASE_APPLICATION;

use common::process::ServiceProcess;
use common::receiver::{Answer, Receiver, Request};
use common::{PATIENCE, Read, SseClient, TestApp};

const CONSUMERS: [&str; 4] = ["alice", "bob", "carol", "slow"];
/// The topics some events are addressed to; the topic stream selects the first two.
const TOPICS: [&str; 3] = [
    "https://example.com/rooms/1",
    "https://example.com/rooms/2",
    "https://example.com/rooms/3",
];
/// An event's topics: one, or a canonical one and an alternate (selected through either).
const TOPIC_SETS: [&[&str]; 5] = [
    &[TOPICS[0]],
    &[TOPICS[2]],
    &[TOPICS[1], TOPICS[0]],
    &[TOPICS[2], TOPICS[1]],
    &[TOPICS[2], TOPICS[0]],
];
/// The stream that follows topics (`?topic=` TOPICS[0] and TOPICS[1]) instead of a consumer.
const TOPIC_STREAM: &str = "rooms";
/// Reads one event every this long: slower than the producers' bursts, so it lags its channel.
const SLOW_READ: Duration = Duration::from_millis(4);

/// `--webhook-timeout` of the instances: short, so that a slow receiver makes attempts fail.
/// Not so short that an ordinary answer on a busy machine misses it.
const WEBHOOK_TIMEOUT: Duration = Duration::from_millis(500);
/// What a slow receiver takes to answer: always past the timeout.
const SLOW_ANSWER_MS: std::ops::Range<u64> = 700..1500;
/// The first key of a subscription's advisory lock (`store::subscriptions::LOCK_CLASS`).
const LOCK_CLASS: i64 = 1_702_260_855;
/// How long before a request the instance that sent it may have last written through its lease
/// (the write before a retry, then at most a Retry-After of 1 s, then connecting), generously:
/// a lease lost since then may have kept the instance from storing the position.
const LEASE_SLACK: Duration = Duration::from_secs(3);

/// A webhook subscription of the randomized run.
struct Hook {
    consumer: &'static str,
    batch_size: i32,
    /// Exact type names, or None for every type.
    types: Option<&'static [&'static str]>,
}

const HOOKS: [Hook; 3] = [
    Hook {
        consumer: "alice",
        batch_size: 5,
        types: None,
    },
    Hook {
        consumer: "bob",
        batch_size: 100,
        types: None,
    },
    Hook {
        consumer: "slow",
        batch_size: 20,
        types: Some(&["copied"]),
    },
];

/// The two tests of this binary share its PostgreSQL, which the randomized run restarts: they
/// run one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Counters {
    transactions_committed: AtomicU64,
    transactions_rolled_back: AtomicU64,
    producer_errors: AtomicU64,
    reconnects: AtomicU64,
    refused_503: AtomicU64,
    faults: AtomicU64,
    lease_kills: AtomicU64,
    takeovers: AtomicU64,
    processes_started: AtomicU64,
    deliverers_killed: AtomicU64,
}

/// When instances may have lost their webhook lease: (what, from, to).
type LeaseLosses = Arc<Mutex<Vec<(&'static str, Instant, Instant)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_is_exactly_once_and_in_order_under_faults() {
    let _serial = SERIAL.lock().await;
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
    // A hot standby of the cluster (unless `EVENT_PIPER_FAULT_REPLICA=0`) serves the first instance's
    // reads (replays, lag recoveries, webhook catch-ups), which has no recent tail so that they
    // all read the table; the primary's restart and the killed connections go on around it.
    let standby = match std::env::var("EVENT_PIPER_FAULT_REPLICA").as_deref() {
        Ok("0") => None,
        _ => Some(
            tokio::task::spawn_blocking(|| {
                let dir = std::env::temp_dir()
                    .join(format!("event-piper-fault-standby-{}", std::process::id()));
                common::cluster()
                    .start_standby(&dir)
                    .expect("starting a standby")
            })
            .await
            .unwrap(),
        ),
    };
    let replica_url = standby
        .as_ref()
        .map(|standby| standby.url(db_url.rsplit('/').next().unwrap_or_default()));
    println!(
        "fault suite: {}",
        match &replica_url {
            Some(_) => "the first instance reads from a standby",
            None => "no replica (EVENT_PIPER_FAULT_REPLICA=0)",
        }
    );
    // A small live channel so that the slow consumer falls behind it and recovers from the
    // table; small batches so that the hub reads in many steps. No safety read within the run:
    // a hub that slept through a ring it needed would stall its streams and fail the run. The
    // two hubs fall asleep after different idle times, so that one wakes while the other sleeps.
    let instance = |idle_after, replica: Option<String>| {
        TestApp::builder()
            .database(&db_url)
            .with(move |config| {
                if let Some(url) = replica {
                    config.replica_urls = vec![url];
                    config.recent_bytes = 0;
                }
            })
            .channel_capacity(32)
            .batch_size(100)
            .heartbeat(Duration::from_secs(1))
            .idle_poll(Duration::from_secs(3600))
            .idle_after(idle_after)
            .webhooks_for_tests()
            .webhook_timeout(WEBHOOK_TIMEOUT)
            .start()
    };
    // Shared with the consumers, which switch instances on every reconnect.
    let instances: Arc<[TestApp]> = Arc::new([
        instance(Duration::from_millis(5), replica_url.clone()).await,
        instance(Duration::from_millis(200), None).await,
    ]);
    let counters = Arc::new(Counters::default());
    let losses = LeaseLosses::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // Subscribed before anything is produced, from the start of the table.
    let mut hooks = Vec::new();
    for (i, hook) in HOOKS.iter().enumerate() {
        let rng = StdRng::seed_from_u64(seed.wrapping_add(400 + i as u64));
        hooks.push(HookRun::start(hook, rng, &instances, deadline).await);
    }

    let consumers: Vec<_> = CONSUMERS
        .iter()
        .chain([&TOPIC_STREAM])
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
        Arc::clone(&losses),
    ));
    // A third instance, a real process, delivers webhooks too and is SIGKILLed while it holds
    // subscriptions, then started again.
    let killer = tokio::spawn(kill_deliverers(
        StdRng::seed_from_u64(seed.wrapping_add(500)),
        db_url.clone(),
        deadline,
        Arc::clone(&counters),
        Arc::clone(&losses),
    ));

    for producer in producers {
        producer.await.expect("producer task");
    }
    faults.await.expect("fault task");
    killer.await.expect("killer task");

    // The table is the truth: what committed, in id order.
    let client = connect_retrying(&db_url).await;
    let rows = client
        .query(
            "select id, subscriber, type, topics, private from events order by id",
            &[],
        )
        .await
        .unwrap();
    let mut expected: HashMap<&str, Vec<i64>> = HashMap::new();
    for row in &rows {
        let id: i64 = row.get(0);
        for name in CONSUMERS {
            if for_consumer(row, name) {
                expected.entry(name).or_default().push(id);
            }
        }
        // Its public events whose topics, canonical or alternate, it selects; a private event
        // reaches no topic stream without authentication.
        let topics: Option<Vec<String>> = row.get(3);
        let private: Option<bool> = row.get(4);
        let selected = topics.is_some_and(|topics| topics.iter().any(|t| selects(t)));
        if selected && private != Some(true) {
            expected.entry(TOPIC_STREAM).or_default().push(id);
        }
    }
    let last_id = rows.last().map(|row| row.get::<_, i64>(0)).unwrap_or(0);

    // Every stream must reach the last id addressed to it (or broadcast, or to its topics).
    let (mut delivered, mut on_topics) = (0, 0);
    for (name, task) in CONSUMERS.iter().chain([&TOPIC_STREAM]).zip(consumers) {
        let want = expected.remove(name).unwrap_or_default();
        let target = want.last().copied().unwrap_or(0);
        task.handle.target.store(target as u64, Ordering::SeqCst);
        let received = tokio::time::timeout(Duration::from_secs(120), task.join)
            .await
            .unwrap_or_else(|_| panic!("{name} did not catch up to {target} (seed {seed})"))
            .expect("consumer task");
        delivered += received.ids.len();
        if *name == TOPIC_STREAM {
            on_topics = received.ids.len();
        }
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

    // Then the webhooks: receivers stop failing once the load is over, so that every
    // subscription catches up.
    let mut webhook_counts = Vec::new();
    for hook in hooks {
        let want: Vec<i64> = rows
            .iter()
            .filter(|row| {
                let event_type: &str = row.get(2);
                for_consumer(row, hook.spec.consumer)
                    && hook
                        .spec
                        .types
                        .is_none_or(|types| types.contains(&event_type))
            })
            .map(|row| row.get(0))
            .collect();
        webhook_counts.push(hook.finish(&want, &losses, seed).await);
    }
    let replica_reads = match &standby {
        Some(_) => instances[0].metrics().await,
        None => String::new(),
    };
    drop(instances);

    println!(
        "fault suite passed: {} events committed (last id {last_id}) in {} transactions \
         ({} rolled back, {} producer errors from faults); {delivered} delivered ({on_topics} on \
         the topic stream), 0 lost, 0 duplicated, 0 misrouted; {} reconnects ({} refused with 503); {} faults injected",
        rows.len(),
        counters.transactions_committed.load(Ordering::SeqCst),
        counters.transactions_rolled_back.load(Ordering::SeqCst),
        counters.producer_errors.load(Ordering::SeqCst),
        counters.reconnects.load(Ordering::SeqCst),
        counters.refused_503.load(Ordering::SeqCst),
        counters.faults.load(Ordering::SeqCst),
    );
    println!(
        "webhooks: {} lease connections killed, each time every active subscription held \
         again afterwards ({} waits); {} PostgreSQL restart(s)",
        counters.lease_kills.load(Ordering::SeqCst),
        counters.takeovers.load(Ordering::SeqCst),
        losses
            .lock()
            .unwrap()
            .iter()
            .filter(|(what, _, _)| *what == "restart")
            .count(),
    );
    println!(
        "webhooks: {} processes started, {} killed while delivering",
        counters.processes_started.load(Ordering::SeqCst),
        counters.deliverers_killed.load(Ordering::SeqCst),
    );
    for counts in webhook_counts {
        println!("{counts}");
    }
    if let Some(standby) = standby {
        for line in replica_reads
            .lines()
            .filter(|line| line.starts_with("event_piper_replica_"))
        {
            // Process-wide counters: both in-process instances count there.
            println!("replica: {line}");
        }
        tokio::task::spawn_blocking(move || standby.stop())
            .await
            .unwrap();
    }
}

/// Whether a committed row is for `consumer`: its own, or a broadcast (an event addressed to
/// neither a subscriber nor topics).
fn for_consumer(row: &tokio_postgres::Row, consumer: &str) -> bool {
    let subscriber: Option<&str> = row.get(1);
    let topics: Option<Vec<String>> = row.get(3);
    match subscriber {
        Some(subscriber) => subscriber == consumer,
        None => topics.is_none(),
    }
}

/// Whether the topic stream selects `topic`.
fn selects(topic: &str) -> bool {
    topic == TOPICS[0] || topic == TOPICS[1]
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

/// Who an event is for: a consumer, topics, both, or neither (a broadcast).
#[derive(Clone, Copy)]
struct Address {
    subscriber: Option<&'static str>,
    topics: Option<&'static [&'static str]>,
    /// Only with topics: no topic stream may get it here (it has no token).
    private: bool,
}

fn pick_address(rng: &mut StdRng) -> Address {
    let consumer = CONSUMERS[rng.random_range(0..CONSUMERS.len())];
    let topics = TOPIC_SETS[rng.random_range(0..TOPIC_SETS.len())];
    let (subscriber, topics) = match rng.random_range(0..100) {
        0..70 => (Some(consumer), None),
        70..80 => (None, None),
        80..95 => (None, Some(topics)),
        _ => (Some(consumer), Some(topics)),
    };
    Address {
        subscriber,
        topics,
        private: topics.is_some() && rng.random_bool(0.1),
    }
}

async fn insert_rows(
    tx: &tokio_postgres::Transaction<'_>,
    to: Address,
    count: i32,
) -> Result<u64, tokio_postgres::Error> {
    let topics = to.topics.map(<[&str]>::to_vec);
    let private = to.private.then_some(true);
    tx.execute(
        "insert into events (type, subscriber, topics, private, payload) \
         select 'fault', $1::text, $3::text[], $4::boolean, \
                jsonb_build_object('to', $1::text, 'topics', $3::text[], 'n', n) \
         from generate_series(1, $2::int) n",
        &[&to.subscriber, &count, &topics, &private],
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
                .copy_in("copy events (type, subscriber, topics, private, payload) from stdin")
                .await?;
            let mut rows = String::new();
            for n in 0..size {
                let to = pick_address(rng);
                let (column, json) = match to.subscriber {
                    Some(name) => (name.to_string(), format!("\"{name}\"")),
                    None => ("\\N".to_string(), "null".to_string()),
                };
                let (array, topics) = match to.topics {
                    Some(topics) => (format!("{{{}}}", topics.join(",")), json!(topics)),
                    None => ("\\N".to_string(), Value::Null),
                };
                let private = if to.private { "t" } else { "\\N" };
                rows.push_str(&format!(
                    "copied\t{column}\t{array}\t{private}\t{{\"to\": {json}, \"topics\": {topics}, \
                     \"p\": {producer}, \"n\": {n}}}\n"
                ));
            }
            futures::pin_mut!(sink);
            futures::SinkExt::send(&mut sink, bytes::Bytes::from(rows)).await?;
            sink.finish().await?;
        }
        // A savepoint whose rows are rolled back inside a transaction that commits others.
        10..=19 => {
            insert_rows(&tx, pick_address(rng), size / 2 + 1).await?;
            tx.batch_execute("savepoint s").await?;
            insert_rows(&tx, pick_address(rng), size / 2 + 1).await?;
            tx.batch_execute("rollback to savepoint s").await?;
            insert_rows(&tx, pick_address(rng), 3).await?;
        }
        _ => {
            let mut left = size;
            while left > 0 {
                let chunk = rng.random_range(1..=left);
                insert_rows(&tx, pick_address(rng), chunk).await?;
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

/// Kills notification, pool and webhook lease connections every second or two, and restarts
/// PostgreSQL once, midway. After a lease connection is killed, every active subscription must
/// be held again (by the other instance, or by the same one on a new connection).
async fn inject_faults(
    mut rng: StdRng,
    url: String,
    deadline: Instant,
    counters: Arc<Counters>,
    losses: LeaseLosses,
) {
    let start = Instant::now();
    let restart_at = start + (deadline - start) / 2;
    let mut restarted = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(700..2000))).await;
        if !restarted && Instant::now() >= restart_at {
            restarted = true;
            let cluster = common::cluster();
            let from = Instant::now();
            tokio::task::spawn_blocking(move || cluster.restart())
                .await
                .unwrap()
                .expect("restarting PostgreSQL");
            lost_leases(&losses, "restart", from);
            counters.faults.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let application = match rng.random_range(0..10) {
            0..4 => "event-piper-listener",
            4..7 => "event-piper",
            _ => LEASE_APPLICATION,
        };
        let client = connect_retrying(&url).await;
        let from = Instant::now();
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
        if application == LEASE_APPLICATION {
            lost_leases(&losses, "lease kill", from);
            counters
                .lease_kills
                .fetch_add(killed as u64, Ordering::SeqCst);
            wait_until_held(&client).await;
            counters.takeovers.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Runs a webhook-delivering `event-piper` process until the deadline, and SIGKILLs it now and
/// then while it holds subscriptions (so, most likely, mid-batch under this load), starting a
/// new one after each kill. While it holds none, the in-process instances' lease connections
/// are killed so that it gets some.
async fn kill_deliverers(
    mut rng: StdRng,
    url: String,
    deadline: Instant,
    counters: Arc<Counters>,
    losses: LeaseLosses,
) {
    let client = connect_retrying(&url).await;
    while Instant::now() < deadline {
        // Starting waits for the log (and killing for the exit) on this thread: off the two
        // runtime threads the in-process instances need.
        let starting = url.clone();
        let process =
            tokio::task::spawn_blocking(move || start_deliverer(&starting, Some(WEBHOOK_TIMEOUT)))
                .await
                .expect("starting a process");
        counters.processes_started.fetch_add(1, Ordering::SeqCst);
        // Until it holds a subscription, or the load is over.
        loop {
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
            if Instant::now() >= deadline {
                kill_deliverer(process, &losses).await;
                return;
            }
            let ports = process.local_ports();
            let held: i64 = client
                .query_one(
                    "select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid \
                     where l.locktype = 'advisory' and l.classid = $1::bigint::oid \
                     and l.objsubid = 2 and l.granted and a.client_port = any($2)",
                    &[&LOCK_CLASS, &ports],
                )
                .await
                .map(|row| row.get(0))
                .unwrap_or(0);
            if held > 0 {
                break;
            }
            // The in-process instances hold everything: take their leases away, so that the
            // process (which polls as often and does not have to reconnect) claims some.
            let from = Instant::now();
            let killed: i64 = client
                .query_one(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity \
                     where application_name = $1 and datname = current_database() \
                     and not client_port = any($2)",
                    &[&LEASE_APPLICATION, &ports],
                )
                .await
                .map(|row| row.get(0))
                .unwrap_or(0);
            lost_leases(&losses, "lease kill", from);
            counters
                .lease_kills
                .fetch_add(killed as u64, Ordering::SeqCst);
        }
        kill_deliverer(process, &losses).await;
        counters.deliverers_killed.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
    }
}

/// Waits until every active subscription's lock is held by some instance. (pg_locks shows the
/// whole cluster: the other tests' databases have subscriptions with the same ids.)
async fn wait_until_held(client: &Client) {
    let wait = async {
        loop {
            let free: Result<i64, _> = client
                .query_one(
                    "select count(*) from event_piper_subscriptions s where state = 'active' \
                     and not exists (select 1 from pg_locks l where l.locktype = 'advisory' \
                       and l.classid = $1::bigint::oid and l.objid = s.id::oid \
                       and l.objsubid = 2 and l.granted \
                       and l.database = (select oid from pg_database \
                                         where datname = current_database()))",
                    &[&LOCK_CLASS],
                )
                .await
                .map(|row| row.get(0));
            if free.is_ok_and(|free| free == 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Generous: this bounds a failure, it does not time the takeover.
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("every active subscription is held again after its lease was lost");
}

/// Notes that instances may have lost their webhook lease from `from` until now.
fn lost_leases(losses: &LeaseLosses, what: &'static str, from: Instant) {
    losses.lock().unwrap().push((what, from, Instant::now()));
}

/// A real `event-piper` process that delivers webhooks with the settings the in-process
/// instances get from `webhooks_for_tests`, and this `--webhook-timeout` (None: the default).
/// Blocks until it has logged its address.
fn start_deliverer(db_url: &str, webhook_timeout: Option<Duration>) -> ServiceProcess {
    let mut args: Vec<String> = [
        "--webhook-allow-private",
        "--webhook-poll",
        "100ms",
        "--webhook-retry-min",
        "20ms",
        "--webhook-retry-max",
        "200ms",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(timeout) = webhook_timeout {
        args.push("--webhook-timeout".to_owned());
        args.push(format!("{}ms", timeout.as_millis()));
    }
    ServiceProcess::start(Some(db_url), args)
}

/// SIGKILLs a deliverer (waiting for its exit off the runtime's threads) and notes that its
/// subscriptions lost their lease meanwhile.
async fn kill_deliverer(mut process: ServiceProcess, losses: &LeaseLosses) {
    let from = Instant::now();
    tokio::task::spawn_blocking(move || process.kill())
        .await
        .expect("killing a process");
    lost_leases(losses, "kill", from);
}

/// Subscribes `receiver` to toto's events through the process's API, in batches of 5 from the
/// start of the table, and gives the receiver the secret; returns the subscription's id.
async fn subscribe_toto(process: &ServiceProcess, receiver: &Receiver) -> i64 {
    let response = reqwest::Client::new()
        .post(format!("{}/subscriptions", process.base))
        .json(&json!({"consumer": "toto", "url": receiver.url, "batch_size": 5, "after": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    receiver.verify_with(created["secret"].as_str().unwrap());
    created["id"].as_i64().unwrap()
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
        let mut headers = vec![("Last-Event-ID", last_event_id.as_str())];
        let path = if name == TOPIC_STREAM {
            format!("/events?topic={}&topic={}", TOPICS[0], TOPICS[1])
        } else {
            headers.push(("X-Consumer-Id", name.as_str()));
            "/events".to_owned()
        };
        let response = app.try_get(&path, &headers).await;
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
            if misrouted(&name, &event.data) {
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

/// Whether stream `name` should not have received this event, by its payload: "to", the
/// consumer it was inserted for, and "topics", the topics it was addressed to.
fn misrouted(name: &str, data: &str) -> bool {
    let payload: serde_json::Value = serde_json::from_str(data).expect("JSON payload");
    if name == TOPIC_STREAM {
        let topics = payload["topics"].as_array().into_iter().flatten();
        !topics.filter_map(Value::as_str).any(selects)
    } else {
        match payload["to"].as_str() {
            Some(to) => to != name,
            // Addressed to topics only: for topic streams, not consumers.
            None => !payload["topics"].is_null(),
        }
    }
}

/// One webhook subscription of the randomized run: its receiver and seeded answers, the
/// receiver's absences, and an operator who resumes the subscription after a 410.
struct HookRun {
    spec: &'static Hook,
    id: i64,
    receiver: Arc<Receiver>,
    /// Set once the load is over: the receiver then accepts everything.
    calm: Arc<AtomicBool>,
    absences: tokio::task::JoinHandle<u64>,
    operator: tokio::task::JoinHandle<u64>,
    stop: tokio_util::sync::CancellationToken,
    instances: Arc<[TestApp]>,
}

impl HookRun {
    async fn start(
        spec: &'static Hook,
        mut rng: StdRng,
        instances: &Arc<[TestApp]>,
        deadline: Instant,
    ) -> HookRun {
        let receiver = Arc::new(Receiver::start().await);
        let mut body = json!({
            "consumer": spec.consumer,
            "url": receiver.url,
            "batch_size": spec.batch_size,
            "after": 0,
        });
        if let Some(types) = spec.types {
            body["types"] = json!(types);
        }
        let response = instances[0]
            .send(Method::POST, "/subscriptions", &[], Some(body))
            .await;
        assert_eq!(response.status(), 201, "creating a subscription");
        let created: Value = response.json().await.unwrap();
        receiver.verify_with(created["secret"].as_str().expect("the secret"));
        let calm = Arc::new(AtomicBool::new(false));
        receiver.answer(answers(
            StdRng::seed_from_u64(rng.random()),
            Arc::clone(&calm),
        ));
        let id = created["id"].as_i64().expect("an id");
        let absences = tokio::spawn(go_away_at_times(
            StdRng::seed_from_u64(rng.random()),
            Arc::clone(&receiver),
            deadline,
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let operator = tokio::spawn(resume_when_disabled(
            Arc::clone(instances),
            id,
            stop.clone(),
        ));
        HookRun {
            spec,
            id,
            receiver,
            calm,
            absences,
            operator,
            stop,
            instances: Arc::clone(instances),
        }
    }

    /// Waits until the receiver has `want` (the consumer's events the subscription delivers),
    /// checks what it got, and says what happened.
    async fn finish(self, want: &[i64], losses: &LeaseLosses, seed: u64) -> String {
        self.calm.store(true, Ordering::SeqCst);
        let absences = self.absences.await.expect("absences task");
        let name = self.spec.consumer;
        if let Some(&target) = want.last() {
            let caught_up = async {
                loop {
                    let (ids, _) = deduplicated(&self.receiver.requests());
                    if ids.last().is_some_and(|&last| last >= target) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            // Generous: a subscription far behind catches up batch by batch.
            if tokio::time::timeout(Duration::from_secs(180), caught_up)
                .await
                .is_err()
            {
                let shown = self.instances[0]
                    .get(&format!("/subscriptions/{}", self.id))
                    .await
                    .text()
                    .await
                    .unwrap_or_default();
                let (ids, _) = deduplicated(&self.receiver.requests());
                panic!(
                    "webhook of {name} did not catch up to {target}: last accepted {:?}; \
                     subscription {shown} (seed {seed})",
                    ids.last()
                );
            }
        }
        self.stop.cancel();
        let resumed = self.operator.await.expect("operator task");
        let losses = losses.lock().unwrap().clone();
        let deliveries = self.receiver.requests();
        let stats = check_deliveries(name, &deliveries, want, &losses, WEBHOOK_TIMEOUT, seed);
        assert!(
            resumed <= stats.gone,
            "webhook of {name}: resumed {resumed} times after {} 410s (seed {seed})",
            stats.gone
        );
        format!(
            "webhook of {name} (batch {}, types {:?}): {} events received in order, 0 lost; \
             {} requests ({} accepted, {} refused with 5xx, {} answered too late, {} answered \
             410 and {resumed} resumed), {absences} absences; {} repeated batches ({} after a \
             late answer, {} after a kill or a lost lease), 0 unexplained; every signature verified",
            self.spec.batch_size,
            self.spec.types,
            want.len(),
            stats.requests,
            stats.accepted,
            stats.refused,
            stats.late,
            stats.gone,
            stats.repeats_late + stats.repeats_lease,
            stats.repeats_late,
            stats.repeats_lease,
        )
    }
}

/// The receiver's seeded decisions while the load runs: mostly 200, sometimes 500 or 503 (with
/// a Retry-After of 0 or 1 s, or none), an answer past the service's timeout, and a 410 now and
/// then (at most three).
fn answers(mut rng: StdRng, calm: Arc<AtomicBool>) -> impl FnMut(usize) -> Answer + Send {
    let mut gone = 0;
    move |_| {
        if calm.load(Ordering::SeqCst) {
            return Answer::Accept;
        }
        match rng.random_range(0..1000) {
            0..30 => Answer::Status(500, None),
            30..60 => Answer::Status(503, None),
            60..80 => Answer::Status(503, Some(0)),
            80..95 => Answer::Status(503, Some(1)),
            95..120 => Answer::Slow(Duration::from_millis(rng.random_range(SLOW_ANSWER_MS))),
            120..126 if gone < 3 => {
                gone += 1;
                Answer::Status(410, None)
            }
            _ => Answer::Accept,
        }
    }
}

/// The receiver goes away (connections refused) for a while, every few seconds, until the
/// deadline; it is back when this returns. Returns how many times it went away.
async fn go_away_at_times(mut rng: StdRng, receiver: Arc<Receiver>, deadline: Instant) -> u64 {
    let mut absences = 0;
    loop {
        let at = Instant::now() + Duration::from_millis(rng.random_range(2000..8000));
        if at >= deadline {
            return absences;
        }
        tokio::time::sleep_until(at.into()).await;
        receiver.go_away().await;
        absences += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        receiver.come_back().await;
    }
}

/// What an operator does about a receiver that answered 410: looks at the subscription now and
/// then, and resumes it when it is disabled. Returns how many times it resumed it.
async fn resume_when_disabled(
    instances: Arc<[TestApp]>,
    id: i64,
    stop: tokio_util::sync::CancellationToken,
) -> u64 {
    let path = format!("/subscriptions/{id}");
    let mut resumed = 0;
    for look in 0usize.. {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => return resumed,
        }
        // Either instance: the API reads and writes the table (503 while PostgreSQL restarts).
        let app = &instances[look % instances.len()];
        let response = app.get(&path).await;
        if response.status() != 200 {
            continue;
        }
        let shown: Value = response.json().await.unwrap();
        if shown["status"] != "disabled" {
            continue;
        }
        let response = app
            .send(Method::PATCH, &path, &[], Some(json!({"paused": false})))
            .await;
        if response.status() == 200 {
            resumed += 1;
        }
    }
    unreachable!()
}

#[derive(Default)]
struct HookStats {
    requests: usize,
    accepted: usize,
    refused: usize,
    late: usize,
    gone: u64,
    repeats_late: usize,
    repeats_lease: usize,
}

/// The events the receiver accepted, in arrival order, each webhook-id's first accepted
/// request only; and the repeats left out, as (repeat, the accepted request it repeats).
fn deduplicated(deliveries: &[Request]) -> (Vec<i64>, Vec<(&Request, &Request)>) {
    let mut first: HashMap<&str, &Request> = HashMap::new();
    let mut ids = Vec::new();
    let mut repeats = Vec::new();
    for delivery in deliveries.iter().filter(|d| d.accepted()) {
        match first.get(delivery.webhook_id.as_str()) {
            None => ids.extend(delivery.ids()),
            Some(previous) => repeats.push((delivery, *previous)),
        }
        // The latest acceptance: a repeat is explained by what happened since then.
        first.insert(&delivery.webhook_id, delivery);
    }
    (ids, repeats)
}

/// The rules of a webhook receiver's deliveries: every signature verifies; one webhook-id is
/// always the same events; the accepted events, repeats removed by webhook-id only, are exactly
/// the consumer's (`want`, in id order); and a webhook-id is accepted again only after its
/// previous acceptance was answered too late (the sender counted a failure) or the instance
/// may have lost its lease (a killed lease connection or a PostgreSQL restart within
/// [`LEASE_SLACK`] before that acceptance and before the repeat arrived).
fn check_deliveries(
    consumer: &str,
    deliveries: &[Request],
    want: &[i64],
    losses: &[(&'static str, Instant, Instant)],
    timeout: Duration,
    seed: u64,
) -> HookStats {
    let name = format!("webhook of {consumer}");
    let bad: Vec<usize> = deliveries
        .iter()
        .filter(|d| d.signature_ok != Some(true))
        .map(|d| d.number)
        .collect();
    assert!(
        bad.is_empty(),
        "{name}: requests {bad:?} have no valid signature (seed {seed})"
    );
    assert!(
        deliveries.iter().all(|d| d.consumer == consumer),
        "{name}: a request for another consumer (seed {seed})"
    );
    let mut contents: HashMap<&str, &Request> = HashMap::new();
    for delivery in deliveries {
        let first = contents
            .entry(delivery.webhook_id.as_str())
            .or_insert(delivery);
        assert_eq!(
            first.ids(),
            delivery.ids(),
            "{name}: webhook-id {} carried different events in requests {} and {} (seed {seed})",
            delivery.webhook_id,
            first.number,
            delivery.number
        );
    }

    let (ids, repeats) = deduplicated(deliveries);
    if ids != want {
        let at = ids
            .iter()
            .zip(want)
            .position(|(got, wanted)| got != wanted)
            .unwrap_or(ids.len().min(want.len()));
        let lost: Vec<_> = want
            .iter()
            .filter(|id| !ids.contains(id))
            .take(10)
            .collect();
        let unexpected: Vec<_> = ids
            .iter()
            .filter(|id| !want.contains(id))
            .take(10)
            .collect();
        panic!(
            "{name}: accepted {} events (repeats removed by webhook-id), expected {}; first \
             difference at index {at}: got {:?}, expected {:?}; lost {lost:?}, unexpected \
             {unexpected:?} (seed {seed})",
            ids.len(),
            want.len(),
            &ids[at..ids.len().min(at + 5)],
            &want[at..want.len().min(at + 5)],
        );
    }

    let mut stats = HookStats {
        requests: deliveries.len(),
        accepted: deliveries.iter().filter(|d| d.accepted()).count(),
        refused: deliveries
            .iter()
            .filter(|d| matches!(d.answer, Answer::Status(status, _) if status >= 500))
            .count(),
        late: deliveries.iter().filter(|d| d.late(timeout)).count(),
        gone: deliveries
            .iter()
            .filter(|d| d.answer == Answer::Status(410, None))
            .count() as u64,
        ..HookStats::default()
    };
    let mut unexplained = Vec::new();
    for (repeat, previous) in repeats {
        if previous.late(timeout) {
            stats.repeats_late += 1;
        } else if losses
            .iter()
            .any(|(_, from, to)| *from <= repeat.arrived && *to + LEASE_SLACK >= previous.arrived)
        {
            stats.repeats_lease += 1;
        } else {
            unexplained.push(format!(
                "{} accepted in request {} ({:?}) again in request {} {:?} later",
                repeat.webhook_id,
                previous.number,
                previous.answer,
                repeat.number,
                repeat.arrived - previous.arrived
            ));
        }
    }
    assert!(
        unexplained.is_empty(),
        "{name}: repeats no fault explains: {unexplained:?}; lease losses at {:?} (seed {seed})",
        losses
            .iter()
            .map(|(what, from, _)| (what, from.elapsed()))
            .collect::<Vec<_>>()
    );
    stats
}

/// The backend pids holding the lock of subscription `id` in this database, with their
/// application_name.
async fn lock_holders(client: &Client, id: i64) -> Vec<(i32, String)> {
    client
        .query(
            "select l.pid, a.application_name from pg_locks l join pg_stat_activity a \
             on a.pid = l.pid where l.locktype = 'advisory' and l.classid = $1::bigint::oid \
             and l.objid = $2::bigint::oid and l.objsubid = 2 and l.granted \
             and a.datname = current_database()",
            &[&LOCK_CLASS, &id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The process's `--webhook-timeout`: longer than the test waits before the kill, so that the
/// second request is in flight until then, never timed out.
const KILL_TEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The deliverer dies mid-batch: a real process, SIGKILLed while its request waits for a slow
/// receiver. An in-process instance on the same database takes over: the receiver gets the
/// batch in flight again under the same webhook-id, then everything after it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliverer_killed_mid_batch_is_taken_over_under_the_same_webhook_id() {
    let _serial = SERIAL.lock().await;
    let db_url = common::fresh_database().await;
    let mut process = start_deliverer(&db_url, Some(KILL_TEST_TIMEOUT));
    process.wait_until_ready().await;
    let receiver = Receiver::start().await;
    // The first batch is accepted, the second is held (in flight) until the process dies; the
    // receiver takes whatever comes after at once.
    receiver.answer(|n| match n {
        1 => Answer::Slow(KILL_TEST_TIMEOUT / 2),
        _ => Answer::Accept,
    });
    let id = subscribe_toto(&process, &receiver).await;

    let producer = common::connect(&db_url).await;
    let mut want = Vec::new();
    let insert = "insert into events (type, subscriber, payload) \
                  select 'kill', s, jsonb_build_object('n', n) \
                  from generate_series(1, 12) n, \
                  lateral (select case when n % 4 = 0 then null else 'toto' end) t(s) \
                  returning id";
    for row in producer.query(insert, &[]).await.unwrap() {
        want.push(row.get::<_, i64>(0));
    }
    receiver
        .wait_until("the second batch in flight", |d| d.len() >= 2)
        .await;
    // Only the process runs yet: the holder is its lease connection.
    let holders = lock_holders(&producer, id).await;
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_eq!(holders[0].1, LEASE_APPLICATION);

    // The instance that will take over runs before the kill, and cannot claim meanwhile.
    let app = TestApp::builder()
        .database(&db_url)
        .webhooks_for_tests()
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lock_holders(&producer, id).await,
        holders,
        "the process still delivers"
    );
    let in_flight = receiver.requests()[1].clone();
    assert_eq!(
        receiver.requests().len(),
        2,
        "the second batch is in flight"
    );
    assert!(in_flight.accepted() && !in_flight.events.is_empty());

    process.kill();
    for row in producer.query(insert, &[]).await.unwrap() {
        want.push(row.get::<_, i64>(0));
    }
    want.sort_unstable();
    let target = *want.last().unwrap();
    receiver
        .wait_until("every event after the takeover", |d| {
            deduplicated(d).0.last().is_some_and(|&last| last >= target)
        })
        .await;

    let deliveries = receiver.requests();
    let repeated = &deliveries[2];
    assert_eq!(
        (&repeated.webhook_id, repeated.ids()),
        (&in_flight.webhook_id, in_flight.ids()),
        "the batch in flight comes first, again, under the same webhook-id: {deliveries:?}"
    );
    let kill = [("kill", in_flight.arrived, repeated.arrived)];
    let stats = check_deliveries("toto", &deliveries, &want, &kill, KILL_TEST_TIMEOUT, 0);
    assert_eq!(
        stats.repeats_lease, 1,
        "one repeat, the batch in flight: {deliveries:?}"
    );
    let holders = lock_holders(&producer, id).await;
    assert_eq!(holders.len(), 1, "{holders:?}");
    println!(
        "killed deliverer: {} events, {} requests; the batch in flight ({} events, {}) was sent \
         again by the instance that took over, 1 repeat, 0 lost",
        want.len(),
        stats.requests,
        in_flight.events.len(),
        in_flight.webhook_id
    );
    app.stop().await.unwrap();
}

/// An instance that takes a subscription over must start from what the last deliverer stored
/// before it died, not from an older state of the row.
///
/// The claim (`Lease::claim`) reads the subscription row in the same statement that takes its
/// advisory lock, so the row comes from the statement's snapshot, taken *before* the lock was
/// granted. If the deliverer stores positions and dies while that statement runs, the new
/// deliverer starts from an older position and sends again batches the receiver acknowledged
/// and the old deliverer stored, re-cut into batches of its own, under webhook-ids the receiver
/// never saw. On a busy machine a statement can take any time between its snapshot and its
/// lock; here a row-level security policy makes every read of the row by an instance that
/// does not hold its lock wait 300 ms (the policy's only effect), so that the kill lands in
/// that window at once. The service runs as a role of its own, as RLS does not apply to
/// superusers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_starts_from_the_position_stored_last() {
    let _serial = SERIAL.lock().await;
    let db_url = common::fresh_database().await;
    let admin = common::connect(&db_url).await;
    let database = db_url.rsplit('/').next().unwrap().to_owned();
    admin
        .batch_execute(&format!(
            "do $$ begin create role claimer login; \
             exception when duplicate_object then null; end $$; \
             alter database {database} owner to claimer"
        ))
        .await
        .unwrap();
    let service_url = db_url.replacen("://event_piper@", "://claimer@", 1);
    assert_ne!(service_url, db_url);

    let mut process = start_deliverer(&service_url, None);
    process.wait_until_ready().await;
    // The schema exists now (the process applied it, as its owner).
    admin
        .batch_execute(&format!(
            "create function public.unless_holder_wait(sub bigint) returns boolean \
               language sql volatile as $$ \
               select exists (select 1 from pg_locks where pid = pg_backend_pid() \
                 and locktype = 'advisory' and classid = {LOCK_CLASS}::bigint::oid \
                 and objid = sub::oid and objsubid = 2 and granted) \
               or pg_sleep(0.3) is not null $$; \
             alter table event_piper_subscriptions enable row level security; \
             alter table event_piper_subscriptions force row level security; \
             create policy reads on event_piper_subscriptions for select using \
               (current_setting('application_name') <> '{LEASE_APPLICATION}' \
                or public.unless_holder_wait(id)); \
             create policy inserts on event_piper_subscriptions for insert with check (true); \
             create policy updates on event_piper_subscriptions for update using (true); \
             create policy deletes on event_piper_subscriptions for delete using (true)"
        ))
        .await
        .unwrap();

    let receiver = Receiver::start().await;
    let id = subscribe_toto(&process, &receiver).await;

    // A steady trickle, so that the process delivers a batch every few milliseconds.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let producing = Arc::clone(&producing);
        let client = common::connect(&db_url).await;
        tokio::spawn(async move {
            while producing.load(Ordering::SeqCst) {
                client
                    .execute(
                        "insert into events (type, subscriber) \
                         select 'trickle', 'toto' from generate_series(1, 3)",
                        &[],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    receiver
        .wait_until("the process delivering", |d| d.len() >= 20)
        .await;
    let holders = lock_holders(&admin, id).await;
    assert_eq!(holders.len(), 1, "{holders:?}");
    let process_lease = holders[0].0;

    let app = TestApp::builder()
        .database(&service_url)
        .webhooks_for_tests()
        .start()
        .await;
    // Kill the process while the other instance's claim has been running for a while: its
    // snapshot is older than what the process stored since.
    let claiming = async {
        loop {
            let age: Option<f64> = admin
                .query_opt(
                    "select extract(epoch from clock_timestamp() - query_start)::float8 \
                     from pg_stat_activity where application_name = $1 and pid <> $2 \
                     and datname = current_database() and state = 'active' \
                     and query like '%pg_try_advisory_lock%'",
                    &[&LEASE_APPLICATION, &process_lease],
                )
                .await
                .unwrap()
                .map(|row| row.get(0));
            if age.is_some_and(|age| age >= 0.15) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, claiming)
        .await
        .expect("the other instance claims");
    // What the process stored last (the superuser reads past the policy); it can only store
    // more before it dies.
    let stored: i64 = admin
        .query_one(
            "select position from event_piper_subscriptions where id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    process.kill();
    let before_kill = receiver.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    producing.store(false, Ordering::SeqCst);
    producer.await.unwrap();

    let want = common::ids_for(&admin, "toto").await;
    let target = *want.last().unwrap();
    receiver
        .wait_until("every event after the takeover", |d| {
            d.iter()
                .any(|d| d.accepted() && d.ids().last() == Some(&target))
        })
        .await;
    let deliveries = receiver.requests();
    // Each event under one webhook-id only, and nothing acknowledged before the kill sent
    // again except the batch in flight at the kill (the one request that had not been answered
    // then, or whose answer the process could not store).
    let mut ids_of: HashMap<i64, Vec<&str>> = HashMap::new();
    for delivery in deliveries.iter().filter(|d| d.accepted()) {
        for event in delivery.ids() {
            let ids = ids_of.entry(event).or_default();
            if !ids.contains(&delivery.webhook_id.as_str()) {
                ids.push(&delivery.webhook_id);
            }
        }
    }
    let mut under_two_ids: Vec<_> = ids_of
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(event, ids)| (*event, ids.clone()))
        .collect();
    under_two_ids.sort();
    let (_, repeats) = deduplicated(&deliveries);
    let resent: Vec<(usize, usize)> = deliveries[before_kill..]
        .iter()
        .filter(|after| after.accepted())
        .filter_map(|after| {
            deliveries[..before_kill]
                .iter()
                .find(|before| {
                    before.accepted() && before.ids().iter().any(|id| after.ids().contains(id))
                })
                .map(|before| (before.number, after.number))
        })
        .collect();
    let stored_sent_again: Vec<i64> = deliveries[before_kill..]
        .iter()
        .flat_map(Request::ids)
        .filter(|&event| event <= stored)
        .collect();
    println!(
        "takeover after a kill during the other instance's claim: {} requests before the \
         kill, {} after; {} repeats by webhook-id; requests after the kill that carry events \
         accepted before it (before, after): {resent:?}; events under two webhook-ids: {}; \
         position stored before the kill {stored}, events at or below it sent after the \
         kill: {}",
        before_kill,
        deliveries.len() - before_kill,
        repeats.len(),
        under_two_ids.len(),
        stored_sent_again.len(),
    );
    assert!(
        stored_sent_again.is_empty(),
        "the new deliverer went back before the position stored before the kill ({stored}): \
         it sent {stored_sent_again:?} again"
    );
    assert!(
        under_two_ids.is_empty(),
        "events delivered again under a new webhook-id, so a receiver cannot drop them: \
         {:?}",
        &under_two_ids[..under_two_ids.len().min(10)]
    );
    assert!(
        resent.len() <= 1,
        "more than the batch in flight was sent again: {resent:?}"
    );
    app.stop().await.unwrap();
}
