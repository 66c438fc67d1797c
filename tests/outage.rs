//! Behaviour while PostgreSQL is down: open streams stay open, resume points that the recent
//! tail covers are served from memory, those that need the table are refused with 503 and
//! Retry-After, and delivery resumes when the database is back.
//! Its own test binary, as it stops the cluster.

mod common;

use std::time::Duration;

use common::{TestApp, insert};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_ride_out_a_database_outage() {
    let app = TestApp::builder()
        .heartbeat(Duration::from_millis(200))
        .start()
        .await;
    // The same database, without the recent tail: every resume needs the table.
    let cold = TestApp::builder()
        .database(&app.db_url)
        .with(|config| config.recent_bytes = 0)
        .start()
        .await;
    let producer = app.producer().await;
    let before = insert(&producer, "c", "{}").await;
    let mut live = app.consume("c", Some(0)).await;
    assert_eq!(live.next().await.id, before);
    // Published by the cold instance too before the outage (its hub read it).
    assert_eq!(cold.consume("c", Some(0)).await.next().await.id, before);

    let cluster = common::cluster();
    tokio::task::spawn_blocking(move || cluster.stop_server())
        .await
        .unwrap()
        .expect("stopping PostgreSQL");

    // A resume point the recent tail covers is served from memory.
    let mut recent = app.consume("c", Some(0)).await;
    assert_eq!(recent.next().await.id, before);

    // One that needs the table: refused, with a hint when to retry.
    let response = cold
        .get_events(&[("X-Consumer-Id", "c"), ("Last-Event-ID", "0")])
        .await;
    assert_eq!(response.status(), 503);
    let retry_after = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(retry_after.parse::<u64>().unwrap() >= 1);
    let body = response.text().await.unwrap();
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
    assert_eq!(
        cold.get("/ready").await.status(),
        503,
        "not ready while the database is down"
    );

    // The open stream stays open: heartbeats keep coming, no event is invented.
    assert!(live.heartbeats_within(Duration::from_secs(2)).await >= 2);

    tokio::task::spawn_blocking(move || cluster.start_server())
        .await
        .unwrap()
        .expect("starting PostgreSQL");
    let producer = common::connect(&app.db_url).await;
    let after = insert(&producer, "c", "{}").await;
    assert_eq!(live.next().await.id, after);

    app.wait_until_ready().await;
    let mut resumed = app.consume("c", Some(0)).await;
    assert_eq!(resumed.ids(2).await, vec![before, after]);
}
