//! Publishing under concurrency: requests coalesced into one statement (group commit) must each
//! get their own ids, their own events in their order, and their own outcome.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::TestApp;
use serde_json::{Value, json};

/// POSTs `body`; returns the status and, on 201, the ids (checked against `Location`).
async fn post(app: &TestApp, body: &Value) -> (u16, Vec<i64>) {
    let response = app.post_events("application/json", body.to_string()).await;
    let status = response.status().as_u16();
    if status != 201 {
        let reason = response.text().await.unwrap();
        assert_eq!(reason.trim_end().lines().count(), 1, "one line: {reason}");
        return (status, Vec::new());
    }
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let ids: Vec<i64> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_i64().unwrap())
        .collect();
    assert_eq!(location, format!("/events/{}", ids[0]));
    (status, ids)
}

fn event(subscriber: &str, tag: &str) -> Value {
    json!({"type": "t", "subscriber": subscriber, "payload": {"tag": tag}})
}

/// Every row's id -> its payload's tag.
async fn tags_in_table(app: &TestApp) -> BTreeMap<i64, String> {
    app.producer()
        .await
        .query("select id, payload->>'tag' from events order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The events' (id, tag) in the order a stream delivers them, for `count` events.
async fn delivered(stream: &mut common::SseClient, count: usize) -> Vec<(i64, String)> {
    let mut seen = Vec::with_capacity(count);
    for _ in 0..count {
        let event = stream.next().await;
        let data: Value = serde_json::from_str(&event.data).unwrap();
        seen.push((event.id, data["tag"].as_str().unwrap().to_owned()));
    }
    seen
}

/// The stream delivers exactly `expected` (id, tag), in that order, and then nothing more.
async fn assert_delivered_exactly(stream: &mut common::SseClient, expected: &[(i64, String)]) {
    assert_eq!(delivered(stream, expected.len()).await, expected);
    assert!(
        stream
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_events_get_their_own_ids_and_arrive_once_in_order() {
    // Shared with the requesting tasks.
    let app = Arc::new(TestApp::start().await);
    let mut stream = app.consume("load", None).await;
    const TASKS: usize = 32;
    const EACH: usize = 25;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..EACH {
                let tag = format!("{task}-{n}");
                let (status, ids) = post(&app, &event("load", &tag)).await;
                assert_eq!(status, 201);
                assert_eq!(ids.len(), 1);
                mine.push((ids[0], tag));
            }
            mine
        }));
    }
    let mut answered = BTreeMap::new();
    for task in tasks {
        for (id, tag) in task.await.unwrap() {
            assert!(answered.insert(id, tag).is_none(), "id {id} given twice");
        }
    }
    assert_eq!(answered.len(), TASKS * EACH);
    // Each answer names the row holding that request's event.
    assert_eq!(tags_in_table(&app).await, answered);
    // Delivered once each, in id order, and nothing more.
    let expected: Vec<(i64, String)> = answered.into_iter().collect();
    assert_delivered_exactly(&mut stream, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_does_not_fail_the_requests_coalesced_with_it() {
    // Shared with the requesting tasks.
    let app = Arc::new(TestApp::start().await);
    let mut stream = app.consume("c", None).await;

    // A row the service accepts and the database refuses: the service itself refuses what it
    // knows jsonb cannot hold (\u0000), so the test adds a rule of its own.
    let mut blocker = app.producer().await;
    blocker
        .batch_execute(
            "ALTER TABLE events ADD CONSTRAINT test_refuses \
             CHECK (payload->>'tag' IS DISTINCT FROM 'refused')",
        )
        .await
        .unwrap();
    // Hold inserts back, so that the requests below queue up and go into one statement.
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN SHARE MODE")
        .await
        .unwrap();
    let first = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { post(&app, &event("c", "first")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let refused = json!({"type": "t", "subscriber": "c", "payload": {"tag": "refused"}});
    let mut bodies: Vec<(String, Value)> = Vec::new();
    for n in 0..10 {
        bodies.push((format!("single-{n}"), event("c", &format!("single-{n}"))));
        if n == 4 {
            bodies.push(("refused".into(), refused.clone()));
            bodies.push((
                "batch".into(),
                json!([
                    event("c", "batch-0"),
                    event("c", "batch-1"),
                    event("c", "batch-2")
                ]),
            ));
            // A batch is all or nothing: one refused event refuses its others.
            bodies.push((
                "refused-batch".into(),
                json!([event("c", "lost-0"), refused.clone()]),
            ));
        }
    }
    let mut requests = Vec::new();
    for (name, body) in bodies {
        let app = Arc::clone(&app);
        requests.push((name, tokio::spawn(async move { post(&app, &body).await })));
    }
    // Time for the service to read them all and queue them behind the blocked statement (a loaded
    // machine is slow; too short only makes the retry check below fail, never pass wrongly).
    tokio::time::sleep(Duration::from_secs(1)).await;
    lock.commit().await.unwrap();

    let (status, first_ids) = first.await.unwrap();
    assert_eq!(status, 201);
    let mut expected = vec![(first_ids[0], "first".to_owned())];
    for (name, request) in requests {
        let (status, ids) = request.await.unwrap();
        match name.as_str() {
            "refused" | "refused-batch" => assert_eq!(status, 500, "{name}"),
            "batch" => {
                assert_eq!(status, 201);
                assert_eq!(ids.len(), 3);
                for (n, id) in ids.into_iter().enumerate() {
                    expected.push((id, format!("batch-{n}")));
                }
            }
            _ => {
                assert_eq!(status, 201, "{name}");
                expected.push((ids[0], name));
            }
        }
    }
    expected.sort();
    assert_eq!(
        tags_in_table(&app).await,
        expected.iter().cloned().collect::<BTreeMap<_, _>>()
    );
    assert_delivered_exactly(&mut stream, &expected).await;
    // The refusals were met in a combined statement, and its members retried alone.
    let metrics = app.metrics().await;
    let retries = metrics
        .lines()
        .find_map(|line| line.strip_prefix("event_piper_publish_retries_total "))
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(
        retries > 0.0,
        "no combined statement was retried:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_contiguous_and_in_order_among_concurrent_requests() {
    // Shared with the requesting tasks.
    let app = Arc::new(TestApp::start().await);
    let mut tasks = Vec::new();
    for task in 0..16 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..20 {
                let size = 1 + (task + n) % 7;
                let tags: Vec<String> = (0..size).map(|k| format!("{task}-{n}-{k}")).collect();
                let body = Value::Array(tags.iter().map(|tag| event("b", tag)).collect());
                let (status, ids) = post(&app, &body).await;
                assert_eq!(status, 201);
                assert_eq!(ids.len(), size);
                assert!(
                    ids.windows(2).all(|pair| pair[1] == pair[0] + 1),
                    "a batch's ids are contiguous and in order: {ids:?}"
                );
                mine.extend(ids.into_iter().zip(tags));
            }
            mine
        }));
    }
    let mut answered = BTreeMap::new();
    let mut seen = HashSet::new();
    for task in tasks {
        for (id, tag) in task.await.unwrap() {
            assert!(seen.insert(id), "id {id} given twice");
            answered.insert(id, tag);
        }
    }
    assert_eq!(tags_in_table(&app).await, answered);
}
