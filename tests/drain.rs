//! Deploys: an instance told to shut down stops being ready and stops accepting at once, and
//! ends its open streams over its drain period, each with a `retry:` of its own; their clients
//! resume on another instance of the same database and lose nothing, repeat nothing, while
//! producers keep writing throughout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{PATIENCE, Read, TestApp, ids_for};
use futures::future::join_all;

const CONSUMERS: usize = 6;
const STREAMS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_hands_its_streams_over_without_loss() {
    let db_url = common::fresh_database().await;
    let stopping = TestApp::builder()
        .database(&db_url)
        .with(|config| config.drain_period = Duration::from_secs(2))
        .start()
        .await;
    let other = TestApp::builder().database(&db_url).start().await;
    let producer = other.producer().await;
    let start: i64 = producer
        .query_one("SELECT coalesce(max(id), 0) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    let consumer = |n: usize| format!("c-{}", n % CONSUMERS);
    let mut clients = Vec::new();
    for n in 0..STREAMS {
        clients.push(stopping.consume(&consumer(n), Some(start)).await);
    }

    // Producers write throughout, one event at a time.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn({
        let writing = Arc::clone(&writing);
        let db_url = db_url.clone();
        async move {
            let producer = common::connect(&db_url).await;
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                common::insert(&producer, &consumer(n), "{}").await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // SIGTERM.
    let address = stopping.address();
    let stopped = tokio::spawn(stopping.stop());
    let http = reqwest::Client::new();
    let not_ready = async {
        loop {
            match http.get(format!("http://{address}/ready")).send().await {
                Ok(response) if response.status() == 200 => {}
                // 503, or the connection refused: either way a load balancer stops sending.
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, not_ready)
        .await
        .expect("the draining instance stops being ready");

    // Every stream ends on its own (the drain period is within the patience), then resumes on
    // the other instance where it left off.
    let ended = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| async move {
            let mut got = Vec::new();
            loop {
                match client.read_within(PATIENCE).await {
                    Read::Event(event) => got.push(event.id),
                    Read::Ended => break,
                    Read::Quiet => panic!("stream {n} neither ended nor received within the drain"),
                }
            }
            assert!(client.notices.is_empty(), "{:?}", client.notices);
            (n, got, client.last_event_id.unwrap_or(start))
        });
    let ended = join_all(ended).await;
    stopped
        .await
        .unwrap()
        .expect("the draining instance stops cleanly");
    assert!(
        http.get(format!("http://{address}/ready"))
            .send()
            .await
            .is_err(),
        "no longer accepting"
    );
    let mut resumed = Vec::new();
    for (n, got, last) in ended {
        let client = other.consume(&consumer(n), Some(last)).await;
        resumed.push((n, got, client));
    }
    writing.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    let last: i64 = producer
        .query_one(
            "INSERT INTO events (type, payload) VALUES ('last', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    for (n, mut got, mut client) in resumed {
        loop {
            let id = client.next().await.id;
            got.push(id);
            if id == last {
                break;
            }
        }
        let want: Vec<i64> = ids_for(&producer, &consumer(n))
            .await
            .into_iter()
            .filter(|&id| id > start)
            .collect();
        assert_eq!(
            got, want,
            "stream {n}: every event once, in order, across the hand-over"
        );
    }
}
