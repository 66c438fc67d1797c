//! Webhook subscriptions, end to end: the API, delivery in order with Standard Webhooks
//! signatures checked by a library this project did not write, retries, 410 Gone, pause and
//! replay, restarts, and two instances on one database.

mod common;

use std::time::Duration;

use common::receiver::{Answer, Receiver};
use common::{TestApp, insert};
use reqwest::Method;
use serde_json::{Value, json};

async fn subscribe(app: &TestApp, receiver: &Receiver, body: Value) -> Value {
    let mut body = body;
    body["url"] = Value::from(receiver.url.clone());
    let response = app
        .send(Method::POST, "/subscriptions", &[], Some(body))
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/subscriptions/{}", created["id"]));
    receiver.verify_with(
        created["secret"]
            .as_str()
            .expect("the secret is shown once"),
    );
    created
}

async fn show(app: &TestApp, id: &Value) -> Value {
    let response = app.get(&format!("/subscriptions/{id}")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn patch(app: &TestApp, id: &Value, body: Value) -> Value {
    let response = app
        .send(
            Method::PATCH,
            &format!("/subscriptions/{id}"),
            &[],
            Some(body),
        )
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Inserts `count` events for toto, one by one; their ids.
async fn insert_for_toto(producer: &tokio_postgres::Client, count: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(insert(producer, "toto", "{}").await);
    }
    ids
}

/// Polls the subscription until `until` holds.
async fn wait_for(app: &TestApp, id: &Value, what: &str, until: impl Fn(&Value) -> bool) -> Value {
    let wait = async {
        loop {
            let shown = show(app, id).await;
            if until(&shown) {
                return shown;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(common::PATIENCE, wait).await {
        Ok(shown) => shown,
        Err(_) => panic!("waited in vain for {what}: {}", show(app, id).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_a_consumers_events_and_broadcasts_in_order_signed_in_batches() {
    let app = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    let created = subscribe(
        &app,
        &receiver,
        json!({"consumer": "toto", "batch_size": 7}),
    )
    .await;
    assert_eq!(created["status"], "active");
    assert_eq!(created["batch_size"], 7);
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));

    let producer = app.producer().await;
    let mut expected = Vec::new();
    for n in 0..40 {
        let to = match n % 4 {
            0 => "titi",
            _ => "toto",
        };
        let id = insert(&producer, to, &format!(r#"{{"n": {n}}}"#)).await;
        if to == "toto" {
            expected.push(id);
        }
    }
    let broadcast: i64 = producer
        .query_one(
            "INSERT INTO events (type, payload) VALUES ('all', '{\"b\": 1}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    expected.push(broadcast);

    let ids = receiver.wait_for_accepted(expected.len()).await;
    assert_eq!(
        ids, expected,
        "every event of toto and the broadcast, in order, once"
    );
    let requests = receiver.requests();
    assert_eq!(receiver.bad_signatures(), 0, "every signature verifies");
    assert!(requests.iter().all(|request| request.events.len() <= 7));
    assert!(requests.iter().all(|request| request.consumer == "toto"));
    let first = &requests[0].events[0];
    assert_eq!((first.1.as_str(), &first.2), ("insert", &json!({"n": 1})));

    let shown = wait_for(&app, &created["id"], "the position to move", |shown| {
        shown["position"] == json!(broadcast)
    })
    .await;
    assert_eq!(shown["behind"], 0);
    assert_eq!(shown["delivered"], json!(expected.len()));
    assert_eq!(shown["last_outcome"], "HTTP 200");
    assert!(
        shown.get("secret").is_none(),
        "the secret is shown only once"
    );
    // The tests of this binary share one metrics recorder, and their databases number their
    // subscriptions alike: the counter holds at least this test's events.
    let metrics = app.metrics().await;
    let counter = format!(
        "event_piper_webhook_delivered_events_total{{subscription=\"{}\"}} ",
        created["id"]
    );
    let delivered: usize = metrics
        .lines()
        .find_map(|line| line.strip_prefix(&counter))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{counter}in {metrics}"));
    assert!(delivered >= expected.len(), "{delivered}");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_same_batch_again_until_it_accepts_it() {
    let app = TestApp::builder()
        .webhooks_for_tests()
        .webhook_failing_after(Duration::from_millis(100))
        .start()
        .await;
    let receiver = Receiver::start().await;
    receiver.answer(|_| Answer::Status(503, None));
    let created = subscribe(&app, &receiver, json!({"consumer": "toto"})).await;
    let id = &created["id"];
    let producer = app.producer().await;
    let first = insert(&producer, "toto", "{}").await;

    let shown = wait_for(&app, id, "the subscription to be failing", |shown| {
        shown["status"] == "failing"
    })
    .await;
    assert!(shown["failed_attempts"].as_i64().unwrap() >= 2);
    assert_eq!(shown["last_outcome"], "HTTP 503");
    assert!(shown["next_retry_at"].is_string(), "{shown}");
    assert_eq!(
        shown["position"], created["position"],
        "nothing acknowledged"
    );

    // More events while it fails: the failing batch is not skipped, nor grown.
    let second = insert(&producer, "toto", "{}").await;
    receiver.answer(|_| Answer::Accept);
    let ids = receiver.wait_for_accepted(2).await;
    assert_eq!(ids, [first, second]);
    let requests = receiver.requests();
    let retried: Vec<&str> = requests
        .iter()
        .filter(|request| request.events[0].0 == first)
        .map(|request| request.webhook_id.as_str())
        .collect();
    assert!(retried.len() >= 3, "{requests:?}");
    assert!(
        retried.iter().all(|id| *id == retried[0]),
        "every attempt of a batch has the same webhook-id: {retried:?}"
    );
    let shown = wait_for(&app, id, "recovery", |shown| shown["status"] == "active").await;
    assert!(shown["failing_since"].is_null());
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let app = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    receiver.answer(|n| match n {
        0 => Answer::Status(429, Some(1)),
        _ => Answer::Accept,
    });
    let created = subscribe(&app, &receiver, json!({"consumer": "toto"})).await;
    let producer = app.producer().await;
    insert(&producer, "toto", "{}").await;
    let shown = wait_for(&app, &created["id"], "the first attempt", |shown| {
        shown["last_outcome"] == "HTTP 429"
    })
    .await;
    // The retry is planned a second after the attempt, not at the 20 ms of the test schedule.
    let planned = humantime::parse_rfc3339(shown["next_retry_at"].as_str().unwrap()).unwrap();
    let attempted = humantime::parse_rfc3339(shown["last_attempt_at"].as_str().unwrap()).unwrap();
    let wait = planned.duration_since(attempted).unwrap();
    assert!(wait >= Duration::from_millis(900), "{wait:?}");
    receiver.wait_for_accepted(1).await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_subscription_until_it_is_resumed() {
    let app = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    receiver.answer(|n| match n {
        0 => Answer::Status(410, None),
        _ => Answer::Accept,
    });
    let created = subscribe(&app, &receiver, json!({"consumer": "toto"})).await;
    let id = &created["id"];
    let producer = app.producer().await;
    let first = insert(&producer, "toto", "{}").await;
    wait_for(&app, id, "disabled", |shown| shown["status"] == "disabled").await;
    let second = insert(&producer, "toto", "{}").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "a disabled subscription is not delivered"
    );

    patch(&app, id, json!({"paused": false})).await;
    assert_eq!(receiver.wait_for_accepted(2).await, [first, second]);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_deliveries_and_a_new_position_replays_from_it() {
    let app = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    let producer = app.producer().await;
    let before = insert(&producer, "toto", "{}").await;
    // "now" is the newest event the hub has published (one committed a moment ago may come
    // after it, and is then delivered): wait until it has this one.
    let published = async {
        loop {
            let ready: Value = app.get("/ready").await.json().await.unwrap();
            if ready["published"].as_i64() >= Some(before) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(common::PATIENCE, published)
        .await
        .unwrap();
    let created = subscribe(&app, &receiver, json!({"consumer": "toto"})).await;
    let id = &created["id"];
    assert_eq!(
        created["position"],
        json!(before),
        "it starts after the newest event"
    );

    let paused = patch(&app, id, json!({"paused": true})).await;
    assert_eq!(paused["status"], "paused");
    let during = insert(&producer, "toto", "{}").await;
    let shown = wait_for(&app, id, "an event behind", |shown| shown["behind"] == 1).await;
    assert_eq!(shown["position"], json!(before));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        receiver.requests().is_empty(),
        "nothing is sent while paused"
    );

    patch(&app, id, json!({"paused": false})).await;
    assert_eq!(receiver.wait_for_accepted(1).await, [during]);
    let after = insert(&producer, "toto", "{}").await;
    assert_eq!(receiver.wait_for_accepted(2).await, [during, after]);

    // Replay from the start: everything again, under new webhook-ids.
    patch(&app, id, json!({"after": 0})).await;
    let ids = receiver.wait_for_accepted(5).await;
    assert_eq!(ids, [during, after, before, during, after]);
    let requests = receiver.requests();
    let first_ids: Vec<&str> = requests[..2]
        .iter()
        .map(|r| r.webhook_id.as_str())
        .collect();
    assert!(
        requests[2..]
            .iter()
            .all(|request| !first_ids.contains(&request.webhook_id.as_str())),
        "{requests:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_narrow_what_a_subscription_delivers() {
    let app = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    let created = subscribe(
        &app,
        &receiver,
        json!({"consumer": "toto", "types": ["order.*"]}),
    )
    .await;
    let producer = app.producer().await;
    let mut wanted = Vec::new();
    for event_type in ["order.created", "ping", "order.paid", "orders"] {
        let id: i64 = producer
            .query_one(
                "INSERT INTO events (type, subscriber) VALUES ($1, 'toto') RETURNING id",
                &[&event_type],
            )
            .await
            .unwrap()
            .get(0);
        if event_type.starts_with("order.") {
            wanted.push(id);
        }
    }
    assert_eq!(receiver.wait_for_accepted(2).await, wanted);
    // The position moves past the events of other types too.
    let last: i64 = producer
        .query_one("SELECT max(id) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    let shown = show(&app, &created["id"]).await;
    assert!(shown["position"].as_i64().unwrap() >= wanted[1], "{shown}");
    assert!(shown["position"].as_i64().unwrap() <= last);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_published_while_the_service_is_down_is_delivered_after_a_restart() {
    let app = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    subscribe(
        &app,
        &receiver,
        json!({"consumer": "toto", "batch_size": 3}),
    )
    .await;
    let producer = app.producer().await;
    let first = insert(&producer, "toto", "{}").await;
    receiver.wait_for_accepted(1).await;
    let database = app.database_url().to_owned();
    app.stop().await.unwrap();

    let mut expected = vec![first];
    expected.extend(insert_for_toto(&producer, 10).await);
    let app = TestApp::builder()
        .webhooks_for_tests()
        .database(&database)
        .start()
        .await;
    assert_eq!(receiver.wait_for_accepted(11).await, expected);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_instances_delivers_and_the_other_takes_over_when_it_stops() {
    let first = TestApp::builder().webhooks_for_tests().start().await;
    let second = TestApp::builder()
        .webhooks_for_tests()
        .database(first.database_url())
        .start()
        .await;
    let receiver = Receiver::start().await;
    let created = subscribe(
        &first,
        &receiver,
        json!({"consumer": "toto", "batch_size": 5}),
    )
    .await;
    let producer = first.producer().await;
    let mut expected = insert_for_toto(&producer, 20).await;
    receiver.wait_for_accepted(20).await;
    let holders: i64 = producer
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1702260855 \
             AND objid = $1::bigint::oid AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&created["id"].as_i64().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 1, "exactly one instance holds the subscription");

    first.stop().await.unwrap();
    expected.extend(insert_for_toto(&producer, 20).await);
    let ids = receiver.wait_for_accepted(40).await;
    assert_eq!(ids, expected, "in order, nothing lost, nothing repeated");
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_refusal() {
    let app = TestApp::builder().start().await;
    let refused = |status: u16, body: Value, why: &'static str| {
        let app = &app;
        async move {
            let response = app
                .send(Method::POST, "/subscriptions", &[], Some(body.clone()))
                .await;
            assert_eq!(response.status(), status, "{body}");
            let text = response.text().await.unwrap();
            assert!(text.contains(why), "{body}: {text}");
        }
    };
    let url = "http://127.0.0.1:9/hook";
    refused(400, json!({"url": url}), "consumer is required").await;
    refused(
        400,
        json!({"consumer": "toto", "url": url}),
        "refused (loopback)",
    )
    .await;
    refused(
        400,
        json!({"consumer": "toto", "url": "http://10.1.2.3/"}),
        "refused",
    )
    .await;
    refused(
        400,
        json!({"consumer": "toto", "url": "ftp://example.com/"}),
        "url",
    )
    .await;
    let public = "https://receiver.example/hook";
    refused(
        400,
        json!({"consumer": "toto", "url": public, "batch_size": 0}),
        "batch_size",
    )
    .await;
    refused(
        400,
        json!({"consumer": "toto", "url": public, "after": "later"}),
        "after",
    )
    .await;
    refused(
        400,
        json!({"consumer": "toto", "url": public, "types": ["a*"]}),
        "types",
    )
    .await;
    refused(
        400,
        json!({"consumer": "toto", "url": public, "colour": 1}),
        "unknown field",
    )
    .await;
    refused(400, json!({"consumer": "", "url": public}), "consumer").await;

    let response = app.send(Method::POST, "/subscriptions", &[], None).await;
    assert_eq!(response.status(), 415);
    for path in ["/subscriptions/12345", "/subscriptions/nope"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 404, "{path}");
    }
    let response = app
        .send(Method::DELETE, "/subscriptions/12345", &[], None)
        .await;
    assert_eq!(response.status(), 404);

    // A public URL is accepted (nothing answers there; the subscription just retries).
    let response = app
        .send(
            Method::POST,
            "/subscriptions",
            &[],
            Some(json!({"consumer": "toto", "url": public})),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let path = format!("/subscriptions/{}", created["id"]);
    let response = app
        .send(Method::PATCH, &path, &[], Some(json!({"batch_size": 5000})))
        .await;
    assert_eq!(response.status(), 400);
    let response = app.send(Method::DELETE, &path, &[], None).await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.get(&path).await.status(), 404);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_a_token_needs_the_grant_and_sees_only_its_consumer() {
    let secret = "a-test-secret-that-is-long-enough-32";
    let app = TestApp::builder()
        .webhooks_for_tests()
        .jwt_secret(secret)
        .start()
        .await;
    let token = |sub: &str, subscriptions: bool| {
        let grants = event_piper::auth::Grants {
            subscriptions,
            ..Default::default()
        };
        let token = event_piper::auth::mint_granting(secret, sub, Duration::from_secs(600), grants)
            .unwrap();
        format!("Bearer {token}")
    };
    let receiver = Receiver::start().await;
    let body = json!({"url": receiver.url});

    let reader = token("toto", false);
    let response = app
        .send(
            Method::POST,
            "/subscriptions",
            &[("Authorization", &reader)],
            Some(body.clone()),
        )
        .await;
    assert_eq!(response.status(), 403);
    let response = app.send(Method::GET, "/subscriptions", &[], None).await;
    assert_eq!(response.status(), 401);

    let toto = token("toto", true);
    let toto = [("Authorization", toto.as_str())];
    let response = app
        .send(
            Method::POST,
            "/subscriptions",
            &toto,
            Some(json!({"url": receiver.url, "consumer": "titi"})),
        )
        .await;
    assert_eq!(response.status(), 403, "another consumer's events");
    let response = app
        .send(Method::POST, "/subscriptions", &toto, Some(body.clone()))
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["consumer"], "toto");

    let titi = token("titi", true);
    let titi = [("Authorization", titi.as_str())];
    let listed: Value = app
        .send(Method::GET, "/subscriptions", &titi, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["subscriptions"], json!([]));
    let path = format!("/subscriptions/{}", created["id"]);
    let response = app.send(Method::GET, &path, &titi, None).await;
    assert_eq!(response.status(), 404);
    let response = app.send(Method::DELETE, &path, &titi, None).await;
    assert_eq!(response.status(), 404);
    let listed: Value = app
        .send(Method::GET, "/subscriptions", &toto, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["subscriptions"].as_array().unwrap().len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answered_too_late_is_sent_again_under_the_same_webhook_id_by_the_next_instance() {
    let first = TestApp::builder()
        .webhooks_for_tests()
        .webhook_timeout(Duration::from_millis(500))
        .start()
        .await;
    let receiver = Receiver::start().await;
    // The first request is answered after the timeout: the receiver has the batch, the service
    // counts the attempt as failed, and stops before trying again.
    receiver.answer(|n| match n {
        0 => Answer::Slow(Duration::from_secs(2)),
        _ => Answer::Accept,
    });
    let created = subscribe(
        &first,
        &receiver,
        json!({"consumer": "toto", "batch_size": 3}),
    )
    .await;
    let producer = first.producer().await;
    let mut expected = insert_for_toto(&producer, 3).await;
    receiver
        .wait_until("the first batch to arrive", |requests| !requests.is_empty())
        .await;
    let second = TestApp::builder()
        .webhooks_for_tests()
        .database(first.database_url())
        .start()
        .await;
    // Events that come after the batch in flight must not join it when it is sent again.
    expected.extend(insert_for_toto(&producer, 2).await);
    first.stop().await.unwrap();

    receiver
        .wait_until("the rest after the batch sent again", |requests| {
            requests.iter().skip(1).flat_map(|r| &r.events).count() >= 5
        })
        .await;
    let requests = receiver.requests();
    assert_eq!(
        requests[1].webhook_id, requests[0].webhook_id,
        "{requests:?}"
    );
    assert_eq!(requests[1].ids(), requests[0].ids(), "the same batch");
    let mut seen = Vec::new();
    let mut webhook_ids = std::collections::HashSet::new();
    for request in &requests {
        if webhook_ids.insert(request.webhook_id.clone()) {
            seen.extend(request.ids());
        }
    }
    assert_eq!(
        seen, expected,
        "dropping repeats by webhook-id leaves every event once"
    );
    let shown = show(&second, &created["id"]).await;
    assert_eq!(shown["position"], json!(expected[4]));
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_subscriptions_and_one_takes_all_when_the_other_stops() {
    let first = TestApp::builder().webhooks_for_tests().start().await;
    let receiver = Receiver::start().await;
    let mut ids = Vec::new();
    for consumer in ["a", "b", "c", "d"] {
        let created = subscribe(&first, &receiver, json!({"consumer": consumer})).await;
        ids.push(created["id"].as_i64().unwrap());
    }
    let admin = first.producer().await;
    // Subscriptions held, by the backend holding them.
    let holders = || async {
        let rows = admin
            .query(
                "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' \
                   AND classid = 1702260855 AND objsubid = 2 AND granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 GROUP BY pid ORDER BY pid",
                &[],
            )
            .await
            .unwrap();
        let mut counts: Vec<i64> = rows.iter().map(|row| row.get(1)).collect();
        counts.sort_unstable();
        counts
    };
    let wait_for_holders = |expected: Vec<i64>| {
        let holders = &holders;
        async move {
            let wait = async {
                while holders().await != expected {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            if tokio::time::timeout(common::PATIENCE, wait).await.is_err() {
                panic!("held {:?}, expected {expected:?}", holders().await);
            }
        }
    };
    wait_for_holders(vec![4]).await;

    let second = TestApp::builder()
        .webhooks_for_tests()
        .database(first.database_url())
        .start()
        .await;
    wait_for_holders(vec![2, 2]).await;
    // Every subscription still delivers, wherever it went.
    for consumer in ["a", "b", "c", "d"] {
        insert(&admin, consumer, "{}").await;
    }
    receiver.wait_for_accepted(4).await;

    first.stop().await.unwrap();
    wait_for_holders(vec![4]).await;
    second.stop().await.unwrap();
}

// A change that lands while a batch is in flight. The receiver holds its answer to the first
// batch until the change has been applied (the PATCH has answered), so the acknowledgement
// always comes after the change: no timing involved. README, "What a change does to delivery".

/// An app whose attempts wait longer for an answer than the receiver ever holds one: a held
/// answer must never time out on a slow machine (that is another case, sent again).
async fn patient_app() -> TestApp {
    TestApp::builder()
        .webhooks_for_tests()
        .webhook_timeout(common::PATIENCE * 3)
        .start()
        .await
}

/// Subscribes toto with `body`, the receiver holding its first answer, and waits for the first
/// batch: the subscription as created (with its secret) and that batch's request. The events it
/// should hold are in the table already: it waits until the hub has published them, so that the
/// first batch holds as many of them as the batch size allows (otherwise it could start with
/// the ones published so far).
async fn hold_first_batch(
    app: &TestApp,
    receiver: &Receiver,
    body: Value,
) -> (Value, common::receiver::Request) {
    let newest: i64 = app
        .producer()
        .await
        .query_one("SELECT max(id) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    let published = async {
        loop {
            let ready: Value = app.get("/ready").await.json().await.unwrap();
            if ready["published"].as_i64() >= Some(newest) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(common::PATIENCE, published)
        .await
        .expect("the hub to publish the events");
    receiver.answer(|n| match n {
        0 => Answer::Held,
        _ => Answer::Accept,
    });
    let created = subscribe(app, receiver, body).await;
    receiver
        .wait_until("the first batch", |requests| !requests.is_empty())
        .await;
    let first = receiver.requests().remove(0);
    (created, first)
}

/// Issue 19, as reported: a pause right after the receiver answered used to discard the
/// acknowledgement, and the resume sent the batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_while_a_batch_is_in_flight_keeps_its_acknowledgement() {
    let app = patient_app().await;
    let receiver = Receiver::start().await;
    let producer = app.producer().await;
    let mut expected = insert_for_toto(&producer, 3).await;
    let (created, first) = hold_first_batch(
        &app,
        &receiver,
        json!({"consumer": "toto", "batch_size": 3, "after": expected[0] - 1}),
    )
    .await;
    let id = &created["id"];
    assert_eq!(first.ids(), expected, "the three events, in one batch");

    let paused = patch(&app, id, json!({"paused": true})).await;
    assert_eq!(paused["status"], "paused");
    receiver.release();
    let shown = wait_for(
        &app,
        id,
        "the acknowledgement to be stored while paused",
        |shown| shown["position"] == json!(expected[2]),
    )
    .await;
    assert_eq!(shown["status"], "paused");
    assert_eq!(shown["delivered"], 3);
    assert_eq!(shown["last_outcome"], "HTTP 200");

    let during = insert_for_toto(&producer, 5).await;
    wait_for(&app, id, "the events published while paused", |shown| {
        shown["behind"] == 5
    })
    .await;
    assert_eq!(receiver.requests().len(), 1, "nothing is sent while paused");
    expected.extend(&during);
    patch(&app, id, json!({"paused": false})).await;
    let ids = receiver.wait_for_accepted(expected.len()).await;
    assert_eq!(
        ids, expected,
        "every event once: the acknowledged batch is not sent again"
    );
    wait_for(&app, id, "the position to move past them", |shown| {
        shown["position"] == json!(expected[7])
    })
    .await;
    assert_eq!(receiver.bad_signatures(), 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_url_while_a_batch_is_in_flight_keeps_its_acknowledgement() {
    let app = patient_app().await;
    let old = Receiver::start().await;
    let new = Receiver::start().await;
    let producer = app.producer().await;
    let batch = insert_for_toto(&producer, 3).await;
    let (created, first) = hold_first_batch(
        &app,
        &old,
        json!({"consumer": "toto", "batch_size": 3, "after": batch[0] - 1}),
    )
    .await;
    let id = &created["id"];
    new.verify_with(created["secret"].as_str().unwrap());
    assert_eq!(first.ids(), batch);

    let moved = patch(&app, id, json!({"url": new.url})).await;
    assert_eq!(moved["url"], json!(new.url));
    old.release();
    wait_for(&app, id, "the acknowledgement to be stored", |shown| {
        shown["position"] == json!(batch[2])
    })
    .await;
    let later = insert_for_toto(&producer, 2).await;
    assert_eq!(
        new.wait_for_accepted(later.len()).await,
        later,
        "the new URL gets what follows, not the acknowledged batch again"
    );
    assert_eq!(old.requests().len(), 1, "the old URL got its one batch");
    assert_eq!(new.bad_signatures(), 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_batch_size_while_a_batch_is_in_flight_keeps_its_acknowledgement() {
    let app = patient_app().await;
    let receiver = Receiver::start().await;
    let producer = app.producer().await;
    // The next batch is ready (in the table) when the first is acknowledged: it was formed at
    // the old size, and must not go out.
    let expected = insert_for_toto(&producer, 8).await;
    let (created, first) = hold_first_batch(
        &app,
        &receiver,
        json!({"consumer": "toto", "batch_size": 3, "after": expected[0] - 1}),
    )
    .await;
    let id = &created["id"];
    assert_eq!(first.ids(), expected[..3]);

    patch(&app, id, json!({"batch_size": 2})).await;
    receiver.release();
    let ids = receiver.wait_for_accepted(expected.len()).await;
    assert_eq!(ids, expected, "every event once");
    let requests = receiver.requests();
    assert!(
        requests[1..]
            .iter()
            .all(|request| request.events.len() <= 2),
        "batches of the new size after the change: {requests:?}"
    );
    wait_for(&app, id, "the position to move past them", |shown| {
        shown["position"] == json!(expected[7])
    })
    .await;
    app.stop().await.unwrap();
}

/// Toto's events of these types, one statement each; their ids.
async fn insert_typed(producer: &tokio_postgres::Client, types: &[&str]) -> Vec<i64> {
    let mut ids = Vec::with_capacity(types.len());
    for event_type in types {
        let row = producer
            .query_one(
                "INSERT INTO events (type, subscriber) VALUES ($1, 'toto') RETURNING id",
                &[event_type],
            )
            .await
            .unwrap();
        ids.push(row.get(0));
    }
    ids
}

/// New types start over from the last acknowledged position: the batch in flight was chosen by
/// the old filter, and storing its end would skip the events the new filter adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_types_while_a_batch_is_in_flight_start_over_from_the_acknowledged_position() {
    let app = patient_app().await;
    let receiver = Receiver::start().await;
    let producer = app.producer().await;
    let ids = insert_typed(&producer, &["a", "b", "a"]).await;
    let (created, first) = hold_first_batch(
        &app,
        &receiver,
        json!({"consumer": "toto", "types": ["a"], "after": ids[0] - 1}),
    )
    .await;
    let id = &created["id"];
    assert_eq!(first.ids(), [ids[0], ids[2]]);

    patch(&app, id, json!({"types": ["b"]})).await;
    receiver.release();
    receiver
        .wait_until("the range again, of the new types", |requests| {
            requests.len() >= 2
        })
        .await;
    let requests = receiver.requests();
    assert_eq!(requests[1].ids(), [ids[1]], "{requests:?}");
    assert_ne!(
        requests[1].webhook_id, first.webhook_id,
        "a new batch, under a new webhook-id"
    );
    let shown = wait_for(&app, id, "the position to move", |shown| {
        shown["position"].as_i64() >= Some(ids[1])
    })
    .await;
    assert!(shown["position"].as_i64() <= Some(ids[2]), "{shown}");
    app.stop().await.unwrap();
}

/// A new position is a replay asked for: the acknowledgement of the batch in flight, which
/// comes after it, is refused, and delivery starts from the new position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_position_while_a_batch_is_in_flight_refuses_its_acknowledgement() {
    let app = patient_app().await;
    let receiver = Receiver::start().await;
    let producer = app.producer().await;
    let before = insert(&producer, "toto", "{}").await;
    let batch = insert_for_toto(&producer, 3).await;
    let (created, first) = hold_first_batch(
        &app,
        &receiver,
        json!({"consumer": "toto", "batch_size": 3, "after": before}),
    )
    .await;
    let id = &created["id"];
    assert_eq!(first.ids(), batch);

    let moved = patch(&app, id, json!({"after": 0})).await;
    assert_eq!(moved["position"], 0);
    receiver.release();
    let mut expected = batch.clone();
    expected.push(before);
    expected.extend(&batch);
    assert_eq!(receiver.wait_for_accepted(7).await, expected);
    let requests = receiver.requests();
    assert!(
        requests[1..]
            .iter()
            .all(|request| request.webhook_id != first.webhook_id),
        "the replay is new batches, under new webhook-ids: {requests:?}"
    );
    wait_for(&app, id, "the position to move past the replay", |shown| {
        shown["position"] == json!(batch[2])
    })
    .await;
    app.stop().await.unwrap();
}

/// A database of the previous version, with a batch in flight recorded in an earlier generation
/// (a pause and a resume came after it): upgraded in place, the batch goes out again under the
/// webhook-id it had, and the subscription goes on in an epoch no earlier webhook-id used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_the_previous_version_goes_on_under_its_webhook_ids() {
    let url = common::fresh_database().await;
    let admin = common::connect(&url).await;
    admin
        .batch_execute(include_str!("fixtures/schema-before-epoch.sql"))
        .await
        .unwrap();
    let events = insert_for_toto(&admin, 3).await;
    let receiver = Receiver::start().await;
    let secret = event_piper::webhook::signing::Secret::generate().to_string();
    receiver.verify_with(&secret);
    let id: i64 = admin
        .query_one(
            "INSERT INTO event_piper_subscriptions (consumer, url, secret, batch_size, position, \
               pending_upto, pending_generation, generation) \
             VALUES ('toto', $1, $2, 10, $3, $4, 4, 6) RETURNING id",
            &[&receiver.url, &secret, &(events[0] - 1), &events[1]],
        )
        .await
        .unwrap()
        .get(0);

    let app = TestApp::builder()
        .webhooks_for_tests()
        .database(&url)
        .start()
        .await;
    let epoch: i32 = admin
        .query_one(
            "SELECT epoch FROM event_piper_subscriptions WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, 6, "the epoch starts at the generation");
    assert_eq!(receiver.wait_for_accepted(3).await, events);
    let requests = receiver.requests();
    assert_eq!(
        requests[0].webhook_id,
        format!("evp_{id}_4_{}", events[1]),
        "the batch in flight, under its webhook-id: {requests:?}"
    );
    assert_eq!(requests[0].ids(), events[..2]);
    assert_eq!(requests[1].webhook_id, format!("evp_{id}_6_{}", events[2]));
    assert_eq!(receiver.bad_signatures(), 0);

    // A replay is a new epoch: the next generation, which no webhook-id was made of.
    patch(&app, &json!(id), json!({"after": events[1]})).await;
    receiver
        .wait_until("the replay", |requests| requests.len() >= 3)
        .await;
    assert_eq!(
        receiver.requests()[2].webhook_id,
        format!("evp_{id}_7_{}", events[2])
    );
    app.stop().await.unwrap();
}
