//! The doorbell: producers ring (`NOTIFY new_events`) only while a hub sleeps, and no interleaving
//! of a hub going to sleep with a producer deciding not to ring loses an event.
//!
//! The apps here run with `--idle-poll 1h`: their safety read never comes within a test, so every
//! event arrives through the mechanism under test or not at all.

mod common;

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use common::{PATIENCE, TestApp, connect};
use event_piper::bell::Bell;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls};

async fn insert(client: &impl GenericClient, consumer: &str) -> i64 {
    common::insert(client, consumer, "{}").await
}

const ARMED: bool = true;
const SILENT: bool = false;

/// Whether producers ring now: the bell is a deadline in milliseconds (schema.sql).
async fn bell(client: &impl GenericClient) -> bool {
    client
        .query_one(
            "select coalesce(pg_sequence_last_value('event_piper_bell') \
                            > date_part('epoch', clock_timestamp()) * 1000, false)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_for_bell(client: &Client, want: bool) {
    let poll = async {
        while bell(client).await != want {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let state = if want { "armed" } else { "silent" };
    tokio::time::timeout(PATIENCE, poll)
        .await
        .unwrap_or_else(|_| panic!("the bell never became {state}"));
}

/// Lease of the hand-driven bells below.
const LEASE: Duration = Duration::from_secs(600);

/// A connection that listens on `new_events`, as the service's listener does; each ring arrives
/// on the returned channel.
async fn listen(url: &str) -> (Client, mpsc::UnboundedReceiver<()>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (rings, rung) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(_) = message {
                let _ = rings.send(());
            }
        }
    });
    client.batch_execute("LISTEN new_events").await.unwrap();
    (client, rung)
}

/// Rings that arrive within a moment (a ring is delivered right after its commit).
async fn rings_so_far(client: &Client, rung: &mut mpsc::UnboundedReceiver<()>) -> usize {
    // A round trip on the listening connection: notifications committed before it are in.
    client.batch_execute("select 1").await.unwrap();
    let mut count = 0;
    while rung.try_recv().is_ok() {
        count += 1;
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_hub_is_woken_by_a_producer() {
    let app = TestApp::start_with(&["--idle-poll", "1h"]).await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    let (listener, mut rung) = listen(&app.db_url).await;

    for _ in 0..3 {
        // Idle: the hub has armed the bell and sleeps.
        wait_for_bell(&producer, ARMED).await;
        let id = insert(&producer, "c").await;
        assert_eq!(stream.next().await.id, id);
        assert_eq!(rings_so_far(&listener, &mut rung).await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_do_not_ring_while_the_hub_is_awake() {
    // Awake for a minute after each event (and after start-up).
    let app = TestApp::start_with(&["--idle-poll", "1h", "--idle-after", "60s"]).await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    assert_eq!(bell(&producer).await, SILENT);
    let (listener, mut rung) = listen(&app.db_url).await;

    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(insert(&producer, "c").await);
    }
    assert_eq!(stream.ids(50).await, ids);
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_decided_not_to_ring_before_the_hub_slept_is_not_lost() {
    let app = TestApp::start_with(&["--idle-poll", "1h", "--idle-after", "2s"]).await;
    let probe = app.producer().await;
    let mut late = app.producer().await;
    let mut stream = app.consume("c", None).await;

    // Wake the hub, and wait until it has disarmed the bell.
    wait_for_bell(&probe, ARMED).await;
    let first = insert(&probe, "c").await;
    assert_eq!(stream.next().await.id, first);
    wait_for_bell(&probe, SILENT).await;

    // A producer inserts while the hub is awake: it reads a silent bell and will not ring.
    let transaction = late.transaction().await.unwrap();
    let held = insert(&transaction, "c").await;
    assert_eq!(
        bell(&transaction).await,
        SILENT,
        "the producer saw a silent bell"
    );

    // The hub falls idle and arms the bell while that producer is still open; then it commits.
    wait_for_bell(&probe, ARMED).await;
    transaction.commit().await.unwrap();
    assert_eq!(stream.next().await.id, held);

    // And the hub sleeps again, woken by the next producer as usual.
    wait_for_bell(&probe, ARMED).await;
    let next = insert(&probe, "c").await;
    assert_eq!(stream.next().await.id, next);
}

/// A hub's switch on a connection of its own, as the service's listener would hold it.
async fn hub_bell(url: &str) -> (Bell, i32, watch::Sender<event_piper::bell::Line>) {
    let client = connect(url).await;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let (line, watched) = watch::channel(Some(Arc::new(client)));
    (Bell::new(watched), pid, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bell_stays_armed_while_any_hub_sleeps() {
    // The schema only, no service: two hubs' switches driven by hand.
    let url = common::fresh_database().await;
    let mut admin = connect(&url).await;
    let schema = admin.transaction().await.unwrap();
    schema
        .batch_execute(event_piper::store::SCHEMA)
        .await
        .unwrap();
    schema.commit().await.unwrap();
    let (listener, mut rung) = listen(&url).await;
    let (mut a, a_pid, _a_line) = hub_bell(&url).await;
    let (mut b, _, _b_line) = hub_bell(&url).await;

    a.disarm().await.unwrap();
    assert_eq!(bell(&admin).await, SILENT);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);

    a.arm(LEASE).await.unwrap();
    b.arm(LEASE).await.unwrap();
    assert_eq!(bell(&admin).await, ARMED);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);

    // B wakes; A still sleeps, so producers must go on ringing.
    b.disarm().await.unwrap();
    assert_eq!(bell(&admin).await, ARMED);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);

    a.disarm().await.unwrap();
    assert_eq!(bell(&admin).await, SILENT);

    // A hub whose connection dies stops counting as asleep.
    a.arm(LEASE).await.unwrap();
    admin
        .execute("select pg_terminate_backend($1)", &[&a_pid])
        .await
        .unwrap();
    let gone = async {
        while admin
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&a_pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, gone).await.unwrap();
    b.arm(LEASE).await.unwrap();
    b.disarm().await.unwrap();
    assert_eq!(bell(&admin).await, SILENT);

    // A hub that dies asleep with nobody left to disarm after it: its lease runs out.
    b.arm(Duration::from_millis(300)).await.unwrap();
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(bell(&admin).await, SILENT);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_hub_renews_the_bells_lease() {
    // A lease of two seconds, renewed every second.
    let app = TestApp::start_with(&["--idle-poll", "1s"]).await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    let (listener, mut rung) = listen(&app.db_url).await;

    wait_for_bell(&producer, ARMED).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(bell(&producer).await, ARMED);
    let id = insert(&producer, "c").await;
    assert_eq!(stream.next().await.id, id);
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);
}
