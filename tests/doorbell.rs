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
use tokio::sync::{Notify, mpsc};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls};

async fn insert(client: &impl GenericClient, consumer: &str) -> i64 {
    common::insert(client, consumer, "{}").await
}

/// A safety read interval long enough never to come within a test: only a ring wakes the hub.
const HOUR: Duration = Duration::from_secs(3600);

const ARMED: bool = true;
const SILENT: bool = false;

/// Whether producers ring now: whether some hub holds or waits for the bell lock
/// exclusively (schema.sql, src/bell.rs).
async fn bell(client: &impl GenericClient) -> bool {
    client
        .query_one(
            "select exists (select from pg_locks where locktype = 'advisory' \
               and mode = 'ExclusiveLock' and objsubid = 1 \
               and database = (select oid from pg_database where datname = current_database()) \
               and classid = (7311142570156910960 >> 32)::oid \
               and objid = (7311142570156910960 & 4294967295)::oid)",
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

/// The backend of the connection that holds the bell (the bell lock, exclusively).
async fn bell_backend(client: &Client) -> i32 {
    client
        .query_one(
            "select pid from pg_locks where locktype = 'advisory' and granted \
               and mode = 'ExclusiveLock' and objsubid = 1 \
               and database = (select oid from pg_database where datname = current_database()) \
               and objid = (7311142570156910960 & 4294967295)::oid",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn terminate(client: &Client, pid: i32) {
    client
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let gone = async {
        while client
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&pid],
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
}

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
    let app = TestApp::builder().idle_poll(HOUR).start().await;
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
    let app = TestApp::builder()
        .idle_poll(HOUR)
        .idle_after(Duration::from_secs(60))
        .start()
        .await;
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
    let app = TestApp::builder()
        .idle_poll(HOUR)
        .idle_after(Duration::from_secs(2))
        .start()
        .await;
    let probe = app.producer().await;
    let mut late = app.producer().await;
    let mut stream = app.consume("c", None).await;

    // Wake the hub, and wait until it has disarmed the bell.
    wait_for_bell(&probe, ARMED).await;
    let first = insert(&probe, "c").await;
    assert_eq!(stream.next().await.id, first);
    wait_for_bell(&probe, SILENT).await;

    // A producer inserts while the hub is awake: the bell is silent, so it will not ring.
    let (listener, mut rung) = listen(&app.db_url).await;
    let transaction = late.transaction().await.unwrap();
    let held = insert(&transaction, "c").await;

    // The hub falls idle and arms the bell while that producer is still open; then it commits.
    wait_for_bell(&probe, ARMED).await;
    transaction.commit().await.unwrap();
    assert_eq!(
        rings_so_far(&listener, &mut rung).await,
        0,
        "it did not ring"
    );
    assert_eq!(stream.next().await.id, held);

    // And the hub sleeps again, woken by the next producer as usual.
    wait_for_bell(&probe, ARMED).await;
    let next = insert(&probe, "c").await;
    assert_eq!(stream.next().await.id, next);
}

/// A new database with `schema` applied, and a connection to it.
async fn database_with(schema: &str) -> (String, Client) {
    let url = common::fresh_database().await;
    let mut admin = connect(&url).await;
    let transaction = admin.transaction().await.unwrap();
    transaction.batch_execute(schema).await.unwrap();
    transaction.commit().await.unwrap();
    (url, admin)
}

fn hub_bell(url: &str) -> (Bell, Arc<Notify>) {
    let doorbell = Arc::new(Notify::new());
    let config = url.parse().expect("a database URL");
    (Bell::new(config, Arc::clone(&doorbell)), doorbell)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bell_rings_while_any_hub_sleeps() {
    // The schema only, no service: two hubs' switches driven by hand.
    let (url, admin) = database_with(event_piper::store::SCHEMA).await;
    let (listener, mut rung) = listen(&url).await;
    let (mut a, a_doorbell) = hub_bell(&url);
    let (mut b, _) = hub_bell(&url);

    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);

    a.arm().await.unwrap();
    assert_eq!(bell(&admin).await, ARMED);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);

    // B goes to sleep too: its request waits behind A's.
    let b_sleeps = tokio::spawn(async move {
        b.arm().await.unwrap();
        b
    });
    // A wakes; B's request is granted, so producers go on ringing.
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.disarm().await.unwrap();
    let mut b = tokio::time::timeout(PATIENCE, b_sleeps)
        .await
        .expect("B's request is granted once A wakes")
        .unwrap();
    assert_eq!(bell(&admin).await, ARMED);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);

    b.disarm().await.unwrap();
    assert_eq!(bell(&admin).await, SILENT);
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);

    // A hub whose bell connection dies stops sleeping, and is told.
    a.arm().await.unwrap();
    let pid = bell_backend(&admin).await;
    terminate(&admin, pid).await;
    tokio::time::timeout(PATIENCE, a_doorbell.notified())
        .await
        .expect("the hub's doorbell rings when its bell connection ends");
    assert_eq!(bell(&admin).await, SILENT);
    a.disarm().await.unwrap();
    a.arm().await.unwrap();
    assert_eq!(bell(&admin).await, ARMED);
    a.disarm().await.unwrap();

    // A request still waiting when the hub wakes is withdrawn.
    let mut open = connect(&url).await;
    let transaction = open.transaction().await.unwrap();
    insert(&transaction, "c").await;
    let waiting = tokio::time::timeout(Duration::from_millis(200), a.arm()).await;
    assert!(waiting.is_err(), "the grant waits for the open producer");
    assert_eq!(bell(&admin).await, ARMED);
    a.disarm().await.unwrap();
    assert_eq!(bell(&admin).await, SILENT);
    transaction.commit().await.unwrap();
    insert(&admin, "c").await;
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_bell_connection_drops_sleeps_again() {
    let app = TestApp::builder().idle_poll(HOUR).start().await;
    let producer = app.producer().await;
    let mut stream = app.consume("c", None).await;
    let (listener, mut rung) = listen(&app.db_url).await;

    wait_for_bell(&producer, ARMED).await;
    let first = bell_backend(&producer).await;
    terminate(&producer, first).await;
    // The hub wakes, reads, and sleeps again on a new connection.
    let poll = async {
        while !bell(&producer).await || bell_backend(&producer).await == first {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, poll)
        .await
        .expect("the hub re-arms");
    let id = insert(&producer, "c").await;
    assert_eq!(stream.next().await.id, id);
    assert_eq!(rings_so_far(&listener, &mut rung).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_earlier_versions_is_upgraded() {
    // What earlier versions installed: ids from a PL/pgSQL trigger (the previous schema, verbatim),
    // and before that a NOTIFY on every statement and a CHECK on the type.
    let (url, mut admin) = database_with(&format!(
        "{}; {}",
        include_str!("fixtures/schema-with-id-trigger.sql"),
        "create function event_piper_notify() returns trigger language plpgsql as $$ \
           begin perform pg_notify('new_events', ''); return null; end $$; \
         create trigger events_notify after insert on events \
           for each statement execute function event_piper_notify(); \
         alter table events add constraint events_type_check \
           check (type <> '' and type !~ '[\\r\\n]')"
    ))
    .await;
    // Two events, and an id taken by a transaction that rolled back.
    let old = [insert(&admin, "c").await, insert(&admin, "c").await];
    let rolled_back = admin.transaction().await.unwrap();
    let lost = insert(&rolled_back, "c").await;
    rolled_back.rollback().await.unwrap();

    let app = TestApp::builder()
        .database(&url)
        .idle_poll(HOUR)
        .idle_after(Duration::from_secs(60))
        .start()
        .await;
    let leftovers: i64 = admin
        .query_one(
            "select (select count(*) from pg_trigger \
                      where tgname in ('events_notify', 'events_assign_id')) \
                  + (select count(*) from pg_proc \
                      where proname in ('event_piper_notify', 'event_piper_assign_id')) \
                  + (select count(*) from pg_constraint where conname = 'events_type_check')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0);

    // The identity column goes on where the old sequence stopped.
    let mut stream = app.consume("c", Some(0)).await;
    assert_eq!([stream.next().await.id, stream.next().await.id], old);
    let (listener, mut rung) = listen(&url).await;
    let id = insert(&admin, "c").await;
    assert_eq!(id, lost + 1);
    assert_eq!(stream.next().await.id, id);
    assert_eq!(rings_so_far(&listener, &mut rung).await, 0);
    let error = admin
        .batch_execute("insert into events (id, type, subscriber) values (1000, 'x', 'c')")
        .await
        .expect_err("an explicit id is refused");
    assert_eq!(error.code(), Some(&SqlState::GENERATED_ALWAYS), "{error}");

    // The type is no longer checked in the database; a line break cannot break the framing.
    admin
        .execute(
            "insert into events (type, subscriber) values ($1, 'c')",
            &[&"a\nb"],
        )
        .await
        .unwrap();
    let event = stream.next().await;
    assert_eq!((event.id, event.event.as_str()), (id + 1, "a b"));
}
