//! Reconnect storms: many clients resuming at once with `Last-Event-ID` are served from the
//! recent tail in memory, not a read each, and still get exactly their events, once, in order;
//! a restarted instance loads the tail before it serves; a resume from before the tail reads the
//! table and carries on from memory where the tail begins; without a tail, resumes that arrive
//! together are read by a few merged statements, still exactly. Its own test binary, as it reads
//! the process-wide replay counters.

mod common;

use common::{TestApp, TestAppBuilder, ids_for, insert};
use futures::future::join_all;

const CONSUMERS: usize = 40;

/// The replay counters are process-wide: one test at a time reads them.
static COUNTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Events for every consumer, with broadcasts and topic events between them; returns the id of
/// the last one, a broadcast.
async fn fill(producer: &tokio_postgres::Client, rounds: usize) -> i64 {
    for round in 0..rounds {
        producer
            .execute(
                "INSERT INTO events (type, subscriber, payload) \
                 SELECT 'storm', 'c-' || n, jsonb_build_object('round', $1::int) \
                 FROM generate_series(0, $2::int - 1) n",
                &[&(round as i32), &(CONSUMERS as i32)],
            )
            .await
            .unwrap();
        producer
            .batch_execute(
                "INSERT INTO events (type, payload) VALUES ('everyone', '{}'); \
                 INSERT INTO events (type, subscriber, topics, payload) \
                   VALUES ('topic', 'c-1', '{/rooms/1}', '{}'); \
                 INSERT INTO events (type, topics, payload) VALUES ('topic', '{/rooms/2}', '{}')",
            )
            .await
            .unwrap();
    }
    insert(producer, "nobody", "{}").await;
    producer
        .query_one(
            "INSERT INTO events (type, payload) VALUES ('last', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A process-wide counter from /metrics.
async fn counter(app: &TestApp, name: &str) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Starts an instance, fills the table ([`fill`], 10 rounds) and waits until the instance has
/// published all of it.
async fn filled(builder: TestAppBuilder) -> (TestApp, tokio_postgres::Client) {
    let app = builder.start().await;
    let producer = app.producer().await;
    let mut watcher = app.consume("watcher", None).await;
    let last = fill(&producer, 10).await;
    // Every event is published once the watcher has the last one (a broadcast).
    while watcher.next().await.id != last {}
    (app, producer)
}

/// Resumes `streams` streams per consumer at once, each from its own point within the
/// consumer's events, and checks each gets exactly what the table says follows its point, in
/// order. Returns how many events they got. With `hold`, the events table is locked while the
/// resumes arrive, so that they queue behind the first reads instead of finding the database
/// idle one after the other.
async fn storm(
    app: &TestApp,
    producer: &tokio_postgres::Client,
    streams: usize,
    hold: bool,
) -> usize {
    let mut resumes = Vec::new();
    for consumer in (0..CONSUMERS).map(|n| format!("c-{n}")) {
        let expected = ids_for(producer, &consumer).await;
        for stream in 0..streams {
            let from = expected[(stream * 3) % (expected.len() - 1)];
            let want: Vec<i64> = expected.iter().copied().filter(|&id| id > from).collect();
            let consumer = consumer.clone();
            resumes.push(async move {
                let mut client = app.consume(&consumer, Some(from)).await;
                let got = client.ids(want.len()).await;
                assert_eq!(got, want, "{consumer} resuming after {from}");
                assert!(client.notices.is_empty(), "{:?}", client.notices);
                (client, want.len())
            });
        }
    }
    let mut locker = app.producer().await;
    let lock = locker.transaction().await.unwrap();
    if hold {
        lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
    }
    let release = async {
        if hold {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        lock.commit().await.unwrap();
    };
    let (clients, ()) = tokio::join!(join_all(resumes), release);
    // Nothing more, nothing repeated: the next event each gets is the one inserted now.
    let next: i64 = producer
        .query_one(
            "INSERT INTO events (type, payload) VALUES ('after', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut total = 0;
    for (mut client, count) in clients {
        assert_eq!(client.next().await.id, next);
        total += count;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_served_from_memory_exactly() {
    let _counters = COUNTERS.lock().await;
    let db_url = common::fresh_database().await;
    let (app, producer) = filled(TestApp::builder().database(&db_url)).await;

    let read_before = counter(&app, "event_piper_replay_rows_total").await;
    let recent_before = counter(&app, "event_piper_replay_recent_total").await;
    let served = storm(&app, &producer, 5, false).await;
    assert_eq!(
        counter(&app, "event_piper_replay_rows_total").await,
        read_before,
        "no resume read the table"
    );
    assert_eq!(
        counter(&app, "event_piper_replay_recent_total").await - recent_before,
        served as f64
    );
    app.stop().await.unwrap();

    // A new instance loads the tail before it serves: the storm after a restart needs no read
    // either.
    let app = TestApp::builder().database(&db_url).start().await;
    app.wait_until_ready().await;
    let read_before = counter(&app, "event_piper_replay_rows_total").await;
    storm(&app, &producer, 2, false).await;
    assert_eq!(
        counter(&app, "event_piper_replay_rows_total").await,
        read_before,
        "the restarted instance read no resume from the table"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_the_tail_reads_the_table_then_memory() {
    let _counters = COUNTERS.lock().await;
    let db_url = common::fresh_database().await;
    // Room for a few dozen events, pages of 7: a replay from the start crosses from the table
    // into the tail.
    let (app, producer) = filled(
        TestApp::builder()
            .database(&db_url)
            .batch_size(7)
            .with(|config| config.recent_bytes = 12_000),
    )
    .await;

    let read_before = counter(&app, "event_piper_replay_rows_total").await;
    let recent_before = counter(&app, "event_piper_replay_recent_total").await;
    let expected = ids_for(&producer, "c-1").await;
    let mut client = app.consume("c-1", Some(0)).await;
    assert_eq!(client.ids(expected.len()).await, expected);
    assert!(counter(&app, "event_piper_replay_rows_total").await > read_before);
    assert!(
        counter(&app, "event_piper_replay_recent_total").await > recent_before,
        "the end of the replay came from memory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_beyond_the_tail_is_read_by_few_statements_exactly() {
    let _counters = COUNTERS.lock().await;
    let db_url = common::fresh_database().await;
    // No tail: every resume reads the table. Pages of 5: most resumes take several pages, and
    // their later pages are merged as well.
    let (app, producer) = filled(
        TestApp::builder()
            .database(&db_url)
            .batch_size(5)
            .with(|config| config.recent_bytes = 0),
    )
    .await;

    let statements_before = counter(&app, "event_piper_replay_statements_total").await;
    let rows_before = counter(&app, "event_piper_replay_rows_total").await;
    let resumes = 5 * CONSUMERS;
    storm(&app, &producer, 5, true).await;
    let statements = counter(&app, "event_piper_replay_statements_total").await - statements_before;
    assert!(
        counter(&app, "event_piper_replay_rows_total").await > rows_before,
        "the resumes read the table"
    );
    // Read alone, each resume would take at least two statements (more pages than one).
    assert!(
        statements < (resumes / 2) as f64,
        "{statements} statements for {resumes} resumes"
    );
}
