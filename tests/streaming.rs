//! End-to-end behaviour of `GET /events` against a real PostgreSQL and a real HTTP server.

mod common;

use std::time::Duration;

use common::{PATIENCE, TestApp, insert};
use tokio_postgres::error::SqlState;

const WALKTHROUGH_INSERT: &str = "insert into events (type, timestamp, subscriber, payload) \
     values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');";

/// A short wait used only to show that nothing arrives when nothing should.
const QUIET: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventpiper_walkthrough_word_for_word() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("toto", None).await;

    producer.batch_execute(WALKTHROUGH_INSERT).await.unwrap();
    let first = stream.next().await;
    assert_eq!(first.id, 1);
    assert_eq!(first.event, "insert");
    assert_eq!(first.data, r#"{"foo":"bar"}"#);

    for _ in 2..=8 {
        producer.batch_execute(WALKTHROUGH_INSERT).await.unwrap();
    }
    assert_eq!(stream.ids(7).await, (2..=8).collect::<Vec<_>>());

    // Reconnect with Last-Event-ID: 5: history first, then live on the same stream.
    let mut resumed = app.consume("toto", Some(5)).await;
    assert_eq!(resumed.ids(3).await, vec![6, 7, 8]);
    producer.batch_execute(WALKTHROUGH_INSERT).await.unwrap();
    assert_eq!(resumed.next().await.id, 9);
    assert_eq!(stream.next().await.id, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_nothing_to_replay_opens_at_once() {
    // Only another consumer's events lie after the resume point: the replay finds nothing, and
    // the stream must open without waiting for a live event of its own.
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut other = app.consume("d", None).await;
    let theirs = insert(&producer, "d", "{}").await;
    assert_eq!(other.next().await.id, theirs);
    let mut stream = tokio::time::timeout(PATIENCE, app.consume("c", Some(0)))
        .await
        .expect("the stream opens");
    let mine = insert(&producer, "c", "{}").await;
    assert_eq!(stream.next().await.id, mine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_of_a_consumer_gets_every_event_and_no_one_else_does() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut first = app.consume("toto", None).await;
    let mut second = app.consume("toto", None).await;
    let mut other = app.consume("titi", None).await;

    let a = insert(&producer, "toto", r#"{"n": 1}"#).await;
    let b = insert(&producer, "titi", r#"{"n": 2}"#).await;
    let c = insert(&producer, "toto", r#"{"n": 3}"#).await;

    assert_eq!(first.ids(2).await, vec![a, c]);
    assert_eq!(second.ids(2).await, vec![a, c]);
    assert_eq!(other.next().await.id, b);
    assert_eq!(other.next_within(QUIET).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_every_consumer_live_and_in_replay() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut toto = app.consume("toto", None).await;
    let mut titi = app.consume("titi", None).await;
    producer
        .batch_execute(
            "insert into events (type, subscriber, payload) values ('news', null, '{\"all\": true}')",
        )
        .await
        .unwrap();
    let own = insert(&producer, "toto", "{}").await;

    let broadcast = toto.next().await;
    assert_eq!(
        (broadcast.event.as_str(), broadcast.data.as_str()),
        ("news", r#"{"all":true}"#)
    );
    assert_eq!(toto.next().await.id, own);
    assert_eq!(titi.next().await.id, broadcast.id);
    assert_eq!(titi.next_within(QUIET).await, None);

    let mut replay = app.consume("titi", Some(0)).await;
    assert_eq!(replay.next().await.id, broadcast.id);
    assert_eq!(replay.next_within(QUIET).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_hands_over_to_live_while_a_producer_inserts() {
    // Small pages so that the replay takes many round trips while the producer runs.
    let app = TestApp::builder().batch_size(25).start().await;
    let producer = app.producer().await;
    producer
        .batch_execute(
            "insert into events (type, subscriber, payload) \
             select 'old', 'c', jsonb_build_object('n', n) from generate_series(1, 500) n",
        )
        .await
        .unwrap();

    let db_url = app.db_url.clone();
    let writer = tokio::spawn(async move {
        let producer = common::connect(&db_url).await;
        for n in 0..300 {
            let subscriber = if n % 3 == 0 { "other" } else { "c" };
            insert(&producer, subscriber, "{}").await;
        }
    });
    let mut stream = app.consume("c", Some(0)).await;
    writer.await.unwrap();

    let expected = common::ids_for(&producer, "c").await;
    assert_eq!(expected.len(), 700);
    assert_eq!(stream.ids(expected.len()).await, expected);
    assert_eq!(stream.next_within(QUIET).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_in_flight_holds_back_the_ids_after_it() {
    let app = TestApp::start().await;
    let mut slow = app.producer().await;
    let fast = app.producer().await;
    let mut stream = app.consume("c", None).await;

    let slow_tx = slow.transaction().await.unwrap();
    let first = insert(&slow_tx, "c", r#"{"from": "slow"}"#).await;
    let second = insert(&fast, "c", r#"{"from": "fast"}"#).await;
    assert!(first < second);

    // The second event is committed, but publishing it now would lose the first for good.
    assert_eq!(stream.next_within(QUIET).await, None);
    slow_tx.commit().await.unwrap();
    assert_eq!(stream.ids(2).await, vec![first, second]);

    // Replay gives the same order as live delivery did.
    let mut replay = app.consume("c", Some(0)).await;
    assert_eq!(replay.ids(2).await, vec![first, second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_id_holds_nothing_back() {
    let app = TestApp::start().await;
    let mut doomed = app.producer().await;
    let fast = app.producer().await;
    let mut stream = app.consume("c", None).await;

    let doomed_tx = doomed.transaction().await.unwrap();
    let lost = insert(&doomed_tx, "c", "{}").await;
    let kept = insert(&fast, "c", "{}").await;
    doomed_tx.rollback().await.unwrap();

    // No NOTIFY comes from a rollback; the hub notices the holder is gone on its own.
    assert_eq!(stream.next().await.id, kept);
    let next = insert(&fast, "c", "{}").await;
    assert_eq!(stream.next().await.id, next);
    assert!(lost < kept);

    // A failed insert (a constraint checked after the id was taken) leaves a gap too.
    let failed = fast
        .batch_execute("insert into events (type, subscriber) values (null, 'c')")
        .await;
    assert!(failed.is_err(), "a missing type is refused");
    let after = insert(&fast, "c", "{}").await;
    assert_eq!(stream.next().await.id, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_that_inserts_no_events_holds_nothing_back() {
    let app = TestApp::start().await;
    let mut batch_job = app.producer().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;

    let job = batch_job.transaction().await.unwrap();
    job.batch_execute(
        "create table job_output (n int); insert into job_output values (1); select txid_current();",
    )
    .await
    .unwrap();
    let id = insert(&producer, "c", "{}").await;
    assert_eq!(stream.next().await.id, id);
    job.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_beyond_notify_limits_are_delivered_whole() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;

    let text = "x".repeat(20_000);
    let payload = serde_json::json!({ "text": text }).to_string();
    insert(&producer, "c", &payload).await;
    let event = stream.next().await;
    assert_eq!(event.data, payload);
    assert!(event.data.len() > 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_row_statement_and_copy_arrive_complete_and_in_order() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;

    producer
        .batch_execute(
            "insert into events (type, subscriber, payload) \
             select 'bulk', 'c', jsonb_build_object('n', n) from generate_series(1, 1000) n",
        )
        .await
        .unwrap();
    let received = stream.ids(1000).await;
    assert_eq!(received, (1..=1000).collect::<Vec<_>>());

    let sink = producer
        .copy_in("copy events (type, subscriber, payload) from stdin")
        .await
        .unwrap();
    let rows: String = (0..200)
        .map(|n| format!("copied\tc\t{{\"n\": {n}}}\n"))
        .collect();
    futures::pin_mut!(sink);
    futures::SinkExt::send(&mut sink, bytes::Bytes::from(rows))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 200);
    let mut ids = Vec::new();
    for _ in 0..200 {
        let event = stream.next().await;
        assert_eq!(event.event, "copied");
        ids.push(event.id);
    }
    assert_eq!(ids, (1001..=1200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_the_notification_connection_being_killed() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    let mut expected = vec![insert(&producer, "c", "{}").await];
    assert_eq!(stream.next().await.id, expected[0]);

    let mut listener = listener_backend(&producer, None).await;
    for _ in 0..3 {
        producer
            .execute("select pg_terminate_backend($1)", &[&listener])
            .await
            .unwrap();
        // Inserted while nobody listens: found when the listener reconnects.
        for _ in 0..5 {
            expected.push(insert(&producer, "c", "{}").await);
        }
        listener = listener_backend(&producer, Some(listener)).await;
    }
    let received = stream.ids(expected.len() - 1).await;
    assert_eq!(received, expected[1..]);
}

/// The pid of the service's one notification connection, once it is not `previous`.
async fn listener_backend(client: &tokio_postgres::Client, previous: Option<i32>) -> i32 {
    let poll = async {
        loop {
            let pids: Vec<i32> = client
                .query(
                    "select pid from pg_stat_activity \
                     where application_name = 'event-piper-listener' and datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert!(
                pids.len() <= 1,
                "one notification connection at most: {pids:?}"
            );
            if let Some(&pid) = pids.first().filter(|pid| Some(**pid) != previous) {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, poll)
        .await
        .expect("the notification connection is (re)established")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_falls_behind_catches_up_from_the_table() {
    // A live channel of 4 frames, and 1000 events routed in one batch: the stream lags for sure.
    let app = TestApp::builder().channel_capacity(4).start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    producer
        .batch_execute(
            "insert into events (type, subscriber, payload) \
             select 'bulk', case when n % 2 = 0 then 'c' else 'd' end, '{}' \
             from generate_series(1, 2000) n",
        )
        .await
        .unwrap();
    let received = stream.ids(1000).await;
    assert_eq!(received, (1..=1000).map(|n| 2 * n).collect::<Vec<_>>());
    assert_eq!(stream.next_within(QUIET).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_cannot_choose_ids() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let error = producer
        .batch_execute("insert into events (id, type, subscriber) values (100, 'x', 'c')")
        .await
        .expect_err("an explicit id is refused");
    assert_eq!(error.code(), Some(&SqlState::GENERATED_ALWAYS), "{error}");
    let error = producer
        .batch_execute("update events set id = 100")
        .await
        .expect_err("an id cannot be changed");
    assert_eq!(error.code(), Some(&SqlState::GENERATED_ALWAYS), "{error}");

    // A cached sequence would hand out ids long after the lock that covers them was taken, and
    // an identity "by default" takes explicit ids: every start restores both.
    producer
        .batch_execute(
            "alter table events alter column id set cache 10; \
             alter table events alter column id set generated by default",
        )
        .await
        .unwrap();
    let restarted = TestApp::builder().database(&app.db_url).start().await;
    restarted.consume("c", None).await;
    let cache: i64 = producer
        .query_one(
            "select cache_size from pg_sequences where sequencename = 'events_id_seq'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cache, 1);
    let error = producer
        .batch_execute("insert into events (id, type, subscriber) values (100, 'x', 'c')")
        .await
        .expect_err("an explicit id is refused again");
    assert_eq!(error.code(), Some(&SqlState::GENERATED_ALWAYS), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_get_a_400_with_a_reason() {
    let app = TestApp::start().await;
    let long = "x".repeat(257);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![], "missing X-Consumer-Id"),
        (vec![("X-Consumer-Id", "")], "invalid X-Consumer-Id: empty"),
        (vec![("X-Consumer-Id", &long)], "longer than 256 bytes"),
        (vec![("X-Consumer-Id", "a\tb")], "control characters"),
        (
            vec![("X-Consumer-Id", "c"), ("Last-Event-ID", "abc")],
            "invalid Last-Event-ID",
        ),
        (
            vec![("X-Consumer-Id", "c"), ("Last-Event-ID", "-1")],
            "invalid Last-Event-ID",
        ),
    ];
    for (headers, reason) in cases {
        let response = app.get_events(&headers).await;
        assert_eq!(response.status(), 400, "{headers:?}");
        let body = response.text().await.unwrap();
        assert!(body.contains(reason), "{headers:?}: {body}");
        assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams() {
    let app = TestApp::start().await;
    let mut stream = app.consume("c", None).await;
    let stopping = tokio::spawn(app.stop());
    assert!(stream.ends_within(PATIENCE).await, "the stream ends");
    stopping.await.unwrap().expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::builder()
        .write_timeout(Duration::from_secs(1))
        .start()
        .await;
    let producer = app.producer().await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    socket
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: c\r\n\r\n")
        .await
        .unwrap();
    // Read the response head and the retry: hint, then never read again.
    let mut head = vec![0; 4096];
    let mut read = 0;
    while !String::from_utf8_lossy(&head[..read]).contains("retry:") {
        read += socket.read(&mut head[read..]).await.unwrap();
    }

    // Far more than the socket buffers hold: the server's writes stall on this client.
    let payload = serde_json::json!({ "text": "y".repeat(1 << 20) }).to_string();
    for _ in 0..40 {
        insert(&producer, "c", &payload).await;
    }
    // A normal consumer is not held back by the stalled one.
    let mut healthy = app.consume("c", Some(0)).await;
    assert_eq!(healthy.ids(40).await.len(), 40);

    // The server gave up on the stalled client: reading now drains what was buffered, then ends.
    let drained = tokio::time::timeout(PATIENCE, async {
        let mut buffer = vec![0; 1 << 16];
        let mut total = 0usize;
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the server closed the stalled connection");
    assert!(
        drained < 40 << 20,
        "the stalled client did not get everything: {drained} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_search_path_cannot_redirect_ids() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    producer
        .batch_execute(
            "create schema other; create sequence other.events_id_seq start 5000; \
             set search_path = other, public",
        )
        .await
        .unwrap();
    let id = insert(&producer, "c", "{}").await;
    assert_eq!(id, 1, "the id comes from the events table's own sequence");
    assert_eq!(stream.next().await.id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eventpiper_table_is_adopted() {
    // The Elixir service's table: a bigserial id with its own default.
    let db_url = common::fresh_database().await;
    let setup = common::connect(&db_url).await;
    setup
        .batch_execute(
            "create table events (id bigserial primary key, type text not null, \
             timestamp timestamp not null, subscriber text, payload jsonb); \
             insert into events (type, timestamp, subscriber, payload) \
             values ('old', now(), 'toto', '{\"n\": 1}'), ('old', now(), 'toto', null);",
        )
        .await
        .unwrap();
    let app = TestApp::builder().database(&db_url).start().await;
    let mut stream = app.consume("toto", Some(0)).await;
    assert_eq!(stream.next().await.data, r#"{"n":1}"#);
    assert_eq!(stream.next().await.data, "null");
    setup.batch_execute(WALKTHROUGH_INSERT).await.unwrap();
    let live = stream.next().await;
    assert_eq!((live.id, live.data.as_str()), (3, r#"{"foo":"bar"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_at_the_maximum_lifetime_and_resume() {
    let app = TestApp::builder()
        .max_stream_lifetime(Duration::from_secs(1))
        .start()
        .await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    let first = insert(&producer, "c", "{}").await;
    assert_eq!(stream.next().await.id, first);
    assert!(
        stream.ends_within(PATIENCE).await,
        "the stream outlived its lifetime"
    );
    let notices: Vec<&str> = stream
        .notices
        .iter()
        .map(|(event, _)| event.as_str())
        .collect();
    assert_eq!(notices, ["event-piper.stream-lifetime"]);

    let missed = insert(&producer, "c", "{}").await;
    let mut resumed = app.consume("c", Some(first)).await;
    assert_eq!(resumed.next().await.id, missed);
}

/// Inserts an event of `event_type` for `consumer`; returns its id.
async fn insert_typed(producer: &tokio_postgres::Client, consumer: &str, event_type: &str) -> i64 {
    producer
        .query_one(
            "insert into events (type, subscriber) values ($1::text, $2::text) returning id",
            &[&event_type, &consumer],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_filter_applies_to_replay_and_live_alike() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let created = insert_typed(&producer, "c", "order.created").await;
    let ping = insert_typed(&producer, "c", "ping").await;
    insert_typed(&producer, "c", "order").await;
    let added = insert_typed(&producer, "c", "order.item.added").await;

    // Replay, then live, through the query parameter.
    let mut stream = app
        .stream(
            "/events?types=order.*,ping",
            &[("X-Consumer-Id", "c"), ("Last-Event-ID", "0")],
        )
        .await;
    assert_eq!(stream.ids(3).await, [created, ping, added]);
    insert_typed(&producer, "c", "pong").await;
    let live = insert_typed(&producer, "c", "order.paid").await;
    assert_eq!(stream.next().await.id, live);

    // Through the header, resuming after an id: filtered ids are skipped, nothing else.
    let mut pings = app
        .stream(
            "/events",
            &[
                ("X-Consumer-Id", "c"),
                ("X-Event-Types", "ping"),
                ("Last-Event-ID", &created.to_string()),
            ],
        )
        .await;
    assert_eq!(pings.next().await.id, ping);
    let next_ping = insert_typed(&producer, "c", "ping").await;
    assert_eq!(pings.next().await.id, next_ping);

    // Prefixes are matched literally in the database too: `_`, `%` and `\` are no wildcards.
    let odd = insert_typed(&producer, "e", "a\\b_%.x").await;
    insert_typed(&producer, "e", "a\\bX%.x").await;
    let mut literal = app
        .stream(
            "/events?types=a%5Cb_%25.*",
            &[("X-Consumer-Id", "e"), ("Last-Event-ID", "0")],
        )
        .await;
    assert_eq!(literal.next().await.id, odd);
    assert_eq!(literal.next_within(Duration::from_millis(300)).await, None);

    for (path, headers, reason) in [
        ("/events?types=order*", vec![], "invalid types parameter"),
        (
            "/events",
            vec![("X-Event-Types", "a,,b")],
            "invalid X-Event-Types",
        ),
    ] {
        let mut headers = headers;
        headers.push(("X-Consumer-Id", "c"));
        let response = app.get_with(path, &headers).await;
        assert_eq!(response.status(), 400, "{path} {headers:?}");
        let body = response.text().await.unwrap();
        assert!(body.contains(reason), "{body}");
    }
}

/// The hub's reads stay a range scan of the primary key when the service starts on a table that
/// was vacuumed while empty. They keep one generic plan (src/store.rs, `Store::new`), and the one
/// PostgreSQL would make from such a table's statistics scans the whole table and sorts it, on
/// every read, for as long as the plan lives. Seen through the table's scan counters, which a busy
/// backend reports about once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_reads_scan_the_primary_key_of_a_table_that_started_empty() {
    let url = common::fresh_database().await;
    let setup = common::connect(&url).await;
    setup
        .batch_execute(event_piper::store::SCHEMA)
        .await
        .unwrap();
    setup.batch_execute("VACUUM events").await.unwrap();
    let app = TestApp::builder().database(&url).start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;

    // Three seconds of events, read as they come: hundreds of reads.
    for _ in 0..150 {
        let id = insert(&producer, "c", "{}").await;
        assert_eq!(stream.next().await.id, id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let scans = async {
        loop {
            let row = setup
                .query_one(
                    "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables \
                     WHERE relname = 'events'",
                    &[],
                )
                .await
                .unwrap();
            let (sequential, index): (i64, i64) = (row.get(0), row.get(1));
            if sequential + index >= 100 {
                return (sequential, index);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (sequential, index) = tokio::time::timeout(PATIENCE, scans)
        .await
        .expect("the hub's reads never showed in the table's scan counters");
    // Start-up statements on the empty table may scan it; the reads must not.
    assert!(
        sequential * 10 < index,
        "{sequential} sequential scans of `events` against {index} index scans"
    );
}
