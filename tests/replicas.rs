//! Read replicas against a real hot standby of the test cluster (`pg_basebackup -R`, its own
//! port and data directory, removed afterwards): a replay storm is served by the replica, not
//! the primary; a replica whose replay is paused delays replays or leaves them to the primary,
//! never losing or repeating an event; a replica killed in the middle of a replay leaves the
//! stream to the primary, exactly. Its own test binary, as it reads the process-wide read
//! counters; one test at a time, each with a standby of its own.

mod common;

use std::time::Duration;

use common::{PATIENCE, TestApp, connect, fresh_database, ids_for, insert, until_value};
use event_piper::managed_postgres::ManagedPostgres;
use futures::future::join_all;

/// The read counters are process-wide: one test at a time reads them.
static COUNTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A standby of the test cluster, started for one test.
async fn standby() -> ManagedPostgres {
    tokio::task::spawn_blocking(|| {
        let cluster = common::cluster();
        let dir = std::env::temp_dir().join(format!(
            "event-piper-standby-{}-{}",
            std::process::id(),
            next_standby()
        ));
        cluster.start_standby(&dir).expect("starting a standby")
    })
    .await
    .unwrap()
}

fn next_standby() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The database name of a test cluster URL.
fn database_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// An instance on `database` reading from `replica`, with no recent tail (so that every replay
/// reads the table) and replay pages of `batch` rows.
async fn app_with_replica(database: &str, replica: &ManagedPostgres, batch: u32) -> TestApp {
    let replica_url = replica.url(database_of(database));
    TestApp::builder()
        .database(database)
        .batch_size(batch)
        .with(move |config| {
            config.recent_bytes = 0;
            config.replica_urls = vec![replica_url];
            config.replica_max_wait = Duration::from_millis(200);
        })
        .start()
        .await
}

/// What every test here starts with: a fresh database, a standby of it, an instance reading
/// from the standby ([`app_with_replica`]), a producer on the primary, a client on the standby.
struct Setup {
    replica: ManagedPostgres,
    app: TestApp,
    producer: tokio_postgres::Client,
    standby: tokio_postgres::Client,
}

impl Setup {
    async fn start(batch: u32) -> Setup {
        let database = fresh_database().await;
        let replica = standby().await;
        let app = app_with_replica(&database, &replica, batch).await;
        let producer = app.producer().await;
        let standby = connect(&replica.url(database_of(&database))).await;
        Setup {
            replica,
            app,
            producer,
            standby,
        }
    }

    /// Waits until the hub has published `id` and the standby has replayed all written so far.
    async fn published_and_replayed(&self, id: i64) {
        published(&self.app, id).await;
        caught_up(&self.producer, &self.standby).await;
    }

    async fn stop(self) {
        let Setup { replica, app, .. } = self;
        app.stop().await.unwrap();
        tokio::task::spawn_blocking(move || replica.stop())
            .await
            .unwrap();
    }
}

/// A counter from /metrics, by its full name with labels.
async fn counter(app: &TestApp, name: &str) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const BY_REPLICA: &str = "event_piper_replica_reads_total{served_by=\"replica\"}";
const BY_PRIMARY: &str = "event_piper_replica_reads_total{served_by=\"primary\"}";
const LAG: &str = "event_piper_replica_fallbacks_total{reason=\"lag\"}";
const ERROR: &str = "event_piper_replica_fallbacks_total{reason=\"error\"}";

/// Waits until the app has published `id`.
async fn published(app: &TestApp, id: i64) {
    let wait = async {
        loop {
            let ready: serde_json::Value = app.get("/ready").await.json().await.unwrap();
            if ready["published"]
                .as_i64()
                .is_some_and(|published| published >= id)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the hub published the events");
}

/// Waits until `replica` has replayed everything the primary has written so far.
async fn caught_up(primary: &tokio_postgres::Client, replica: &tokio_postgres::Client) {
    let target: String = primary
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let query = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn";
    let what = "the standby caught up";
    until_value(replica, query, &[&target], |done: &bool| *done, what).await;
}

/// Opens a stream of `consumer` resumed after 0, reads `expected.len()` events and checks they are
/// exactly `expected`; returns the stream, now live.
async fn replay_exactly(app: &TestApp, consumer: &str, expected: &[i64]) -> common::SseClient {
    let mut stream = app.consume(consumer, Some(0)).await;
    let got = stream.ids(expected.len()).await;
    assert_eq!(got, expected, "{consumer}: every event once, in order");
    stream
}

/// Inserts an event for `consumer` and reads `stream` up to it: every id on the way, the
/// sentinel last. A replay that missed events shows as a shorter list, not a stall.
async fn read_through_sentinel(
    producer: &tokio_postgres::Client,
    stream: &mut common::SseClient,
    consumer: &str,
) -> (Vec<i64>, i64) {
    let sentinel = insert(producer, consumer, "{}").await;
    let mut got = Vec::new();
    loop {
        let id = stream.next().await.id;
        got.push(id);
        if id >= sentinel {
            return (got, sentinel);
        }
    }
}

/// Replays `consumer` from the start through a live sentinel ([`read_through_sentinel`]) and
/// checks it got every event of its own once, in order, then the sentinel.
async fn replay_through_sentinel(
    app: &TestApp,
    producer: &tokio_postgres::Client,
    consumer: &str,
) -> (common::SseClient, i64) {
    let mut expected = ids_for(producer, consumer).await;
    let mut stream = app.consume(consumer, Some(0)).await;
    let (got, sentinel) = read_through_sentinel(producer, &mut stream, consumer).await;
    expected.push(sentinel);
    assert_eq!(
        got, expected,
        "every event once, in order, then the live one"
    );
    (stream, sentinel)
}

async fn fill(producer: &tokio_postgres::Client, consumers: usize, rounds: usize, bytes: i32) {
    for _ in 0..rounds {
        producer
            .execute(
                "INSERT INTO events (type, subscriber, payload) \
                 SELECT 'storm', 'c-' || n, jsonb_build_object('pad', repeat('x', $2)) \
                 FROM generate_series(0, $1::int - 1) n",
                &[&(consumers as i32), &bytes],
            )
            .await
            .unwrap();
        producer
            .batch_execute("INSERT INTO events (type, payload) VALUES ('everyone', '{}')")
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_storm_is_served_by_the_replica_and_not_the_primary() {
    let _one = COUNTERS.lock().await;
    let setup = Setup::start(25).await;
    let (app, producer) = (&setup.app, &setup.producer);
    fill(producer, 20, 10, 10).await;
    setup
        .published_and_replayed(insert(producer, "c-0", "{}").await)
        .await;

    let (replica_before, primary_before) = (
        counter(app, BY_REPLICA).await,
        counter(app, BY_PRIMARY).await,
    );
    let mut expected = Vec::new();
    for n in 0..20 {
        expected.push(ids_for(producer, &format!("c-{n}")).await);
    }
    let storm = (0..20).map(|n| {
        let (app, expected) = (app, &expected[n]);
        async move { replay_exactly(app, &format!("c-{n}"), expected).await }
    });
    let mut streams = join_all(storm).await;

    let served_by_replica = counter(app, BY_REPLICA).await - replica_before;
    let served_by_primary = counter(app, BY_PRIMARY).await - primary_before;
    assert_eq!(served_by_primary, 0.0, "no replay read on the primary");
    assert!(
        served_by_replica > 0.0,
        "the replica served the replays ({served_by_replica})"
    );
    // And the replica really was asked: the service's connections are there.
    let connections: i64 = setup
        .standby
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'event-piper-replica-reads'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(connections > 0, "the service is connected to the replica");

    // Live goes on from the primary's hub: the next event reaches every stream once.
    let next = insert(producer, "c-3", "{}").await;
    let broadcast: i64 = producer
        .query_one(
            "INSERT INTO events (type, payload) VALUES ('everyone', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for (n, stream) in streams.iter_mut().enumerate() {
        let id = stream.next().await.id;
        if n == 3 {
            assert_eq!(id, next);
            assert_eq!(stream.next().await.id, broadcast);
        } else {
            assert_eq!(id, broadcast, "c-{n}");
        }
    }
    drop(streams);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_delays_replays_or_leaves_them_to_the_primary_exactly() {
    let _one = COUNTERS.lock().await;
    let setup = Setup::start(10).await;
    let (app, producer, standby_client) = (&setup.app, &setup.producer, &setup.standby);
    fill(producer, 3, 10, 10).await;
    caught_up(producer, standby_client).await;

    standby_client
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    // The request takes effect at the startup process's next record: wait until it has.
    let query = "SELECT pg_get_wal_replay_pause_state()";
    let paused = |state: &String| state == "paused";
    until_value(standby_client, query, &[], paused, "the standby paused").await;
    // Written while the standby replays nothing: only the primary has these.
    fill(producer, 3, 5, 10).await;
    let last = insert(producer, "c-1", "{}").await;
    published(app, last).await;

    let lag_before = counter(app, LAG).await;
    let (stream, _) = replay_through_sentinel(app, producer, "c-1").await;
    assert!(
        counter(app, LAG).await > lag_before,
        "the replica was found behind and the primary read instead"
    );
    drop(stream);

    standby_client
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    caught_up(producer, standby_client).await;
    let replica_before = counter(app, BY_REPLICA).await;
    let (stream, sentinel) = replay_through_sentinel(app, producer, "c-1").await;
    assert!(
        counter(app, BY_REPLICA).await > replica_before,
        "the resumed replica serves again"
    );

    // History searches wait for the replica the same way, and see what was published.
    let history: serde_json::Value = app
        .get("/history?consumer=c-1&limit=1000")
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<i64> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.last(), Some(&sentinel));
    drop(stream);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_replay_leaves_the_stream_to_the_primary_exactly() {
    let _one = COUNTERS.lock().await;
    let setup = Setup::start(100).await;
    let (app, producer) = (&setup.app, &setup.producer);
    // 20 MB for one consumer: far more than socket buffers hold, so the replay is still reading
    // pages when the standby dies.
    fill(producer, 1, 10_000, 2_000).await;
    setup
        .published_and_replayed(insert(producer, "c-0", "{}").await)
        .await;

    let (replica_before, error_before) =
        (counter(app, BY_REPLICA).await, counter(app, ERROR).await);
    let expected = ids_for(producer, "c-0").await;
    let mut stream = app.consume("c-0", Some(0)).await;
    let mut got = stream.ids(500).await;
    assert!(
        counter(app, BY_REPLICA).await > replica_before,
        "the replay started on the replica"
    );
    tokio::task::block_in_place(|| setup.replica.kill_server()).expect("killing the standby");
    let (rest, sentinel) = read_through_sentinel(producer, &mut stream, "c-0").await;
    got.extend(rest);
    let mut expected = expected;
    expected.push(sentinel);
    assert_eq!(got.len(), expected.len(), "every event once");
    assert!(got == expected, "every event once, in order");
    assert!(
        counter(app, ERROR).await > error_before,
        "a read failed on the dead replica and went to the primary"
    );
    drop(stream);
    setup.stop().await;
}

#[tokio::test]
async fn a_bad_replica_url_stops_the_start_with_the_reason() {
    let database = fresh_database().await;
    let mut config = <event_piper::Config as clap::Parser>::try_parse_from([
        "event-piper",
        "--replica-url",
        "postgres://u:secret@127.0.0.1:notaport/x",
    ])
    .unwrap();
    config.database_url = Some(database.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = event_piper::serve_on(config, database, listener, None, async {})
        .await
        .expect_err("a replica URL that does not parse is refused");
    let text = error.to_string();
    assert!(text.contains("--replica-url"), "{text}");
    assert!(!text.contains("secret"), "the password is masked: {text}");
}
