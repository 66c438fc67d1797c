//! The HTTP API beyond the stream itself: query parameters for EventSource, publishing, single
//! events, health, readiness, metrics, CORS, and every status code they answer with.

mod common;

use std::time::Duration;

use common::{TestApp, insert};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_one_event_and_a_batch() {
    let app = TestApp::start().await;
    let mut toto = app.consume("toto", None).await;
    let mut everyone = app.consume("titi", None).await;

    let response = app
        .post_events(
            "application/json",
            r#"{"type": "greeting", "subscriber": "toto", "payload": {"hello": "world"}}"#,
        )
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["location"], "/events/1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "ids": [1] }));
    let event = toto.next().await;
    assert_eq!((event.id, event.event.as_str()), (1, "greeting"));
    assert_eq!(event.data, r#"{"hello":"world"}"#);

    let response = app
        .post_events(
            "application/json; charset=utf-8",
            r#"[{"type": "a", "subscriber": "toto", "payload": 1},
                {"type": "b", "subscriber": null, "payload": [true]}]"#,
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "ids": [2, 3] }));
    assert_eq!(toto.ids(2).await, vec![2, 3]);
    let broadcast = everyone.next().await;
    assert_eq!((broadcast.id, broadcast.data.as_str()), (3, "[true]"));

    let one: serde_json::Value = app.get("/events/1").await.json().await.unwrap();
    assert_eq!(one["type"], "greeting");
    assert_eq!(one["subscriber"], "toto");
    assert_eq!(one["payload"], serde_json::json!({ "hello": "world" }));
    assert_eq!(app.get("/events/999").await.status(), 404);
    assert_eq!(app.get("/events/abc").await.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_bad_requests_and_inserts_nothing() {
    let app = TestApp::builder().max_body(1000).start().await;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("text/plain", r#"{"type":"t","subscriber":null,"payload":1}"#.into(), 415, "Content-Type"),
        ("application/json", "{not json".into(), 400, "malformed JSON"),
        ("application/json", r#"{"subscriber":null,"payload":1}"#.into(), 400, "missing field \"type\""),
        ("application/json", "[]".into(), 400, "empty batch"),
        // The second event is invalid: the first must not be inserted either.
        (
            "application/json",
            r#"[{"type":"ok","subscriber":"c","payload":1},{"type":"","subscriber":"c","payload":1}]"#.into(),
            400,
            "event 1:",
        ),
        (
            "application/json",
            format!(r#"{{"type":"t","subscriber":null,"payload":"{}"}}"#, "x".repeat(2000)),
            413,
            "",
        ),
    ];
    for (content_type, body, status, reason) in cases {
        let response = app.post_events(content_type, body.clone()).await;
        assert_eq!(response.status(), status, "{content_type} {body:.80}");
        let text = response.text().await.unwrap();
        assert!(text.contains(reason), "{body:.80}: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    }
    let producer = app.producer().await;
    let count: i64 = producer
        .query_one("select count(*) from events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "nothing half-inserted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_style_query_parameters() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    for _ in 0..3 {
        insert(&producer, "toto", "{}").await;
    }
    // What a page's first EventSource connection sends.
    let mut stream = app
        .stream("/events?consumer=toto&last_event_id=1", &[])
        .await;
    assert_eq!(stream.ids(2).await, vec![2, 3]);

    // What its automatic reconnect sends: the header wins over the query parameter.
    let mut stream = app
        .stream(
            "/events?consumer=toto&last_event_id=0",
            &[("Last-Event-ID", "2")],
        )
        .await;
    assert_eq!(stream.next().await.id, 3);

    for (query, reason) in [
        ("", "missing X-Consumer-Id"),
        ("?consumer=", "invalid consumer parameter: empty"),
        // Decoded byte for byte: not turned into U+FFFD and accepted.
        ("?consumer=%FF", "invalid consumer parameter: not UTF-8"),
        (
            "?consumer=a%09b",
            "invalid consumer parameter: contains control characters",
        ),
        ("?consumer=toto&last_event_id=x", "invalid Last-Event-ID"),
    ] {
        let response = app.get(&format!("/events{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        assert!(response.text().await.unwrap().contains(reason), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_get_a_reason() {
    let app = TestApp::start().await;
    let response = app.get("/nope").await;
    assert_eq!(response.status(), 404);
    let body = response.text().await.unwrap();
    assert!(
        body.starts_with("no such path: /nope; the API is"),
        "{body}"
    );
    assert_eq!(body.lines().count(), 1, "{body}");

    let response = reqwest::Client::new()
        .delete(format!("{}/events", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert_eq!(
        response.text().await.unwrap(),
        "DELETE is not allowed on /events\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_carries_the_type_for_pages() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let replayed = insert(&producer, "toto", r#"{"n": 1}"#).await;
    let mut stream = app
        .stream("/events?consumer=toto&last_event_id=0&envelope=true", &[])
        .await;
    let live = insert(&producer, "toto", r#"{"n": 2}"#).await;
    // Replayed and live events look the same: no `event:` line, the type inside the data.
    for (id, n) in [(replayed, 1), (live, 2)] {
        let event = stream.next().await;
        assert_eq!((event.id, event.event.as_str()), (id, "message"));
        let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(
            data,
            serde_json::json!({"type": "insert", "payload": {"n": n}})
        );
    }

    let response = app.get("/events?consumer=toto&envelope=yes").await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("envelope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_page() {
    let app = TestApp::start().await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["ready"],
        true
    );

    let mut stream = app.consume("toto", None).await;
    insert(&app.producer().await, "toto", "{}").await;
    stream.next().await;
    let metrics = app.metrics().await;
    for name in [
        "event_piper_events_published_total",
        "event_piper_frames_delivered_total",
        "event_piper_streams{state=\"live\"}",
        "event_piper_consumers",
        "event_piper_pool_connections",
        "event_piper_hub_batch_size",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }
    // Every metric says what it is: each `# TYPE name kind` has a `# HELP name text` before it.
    let typed: Vec<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| rest.split_whitespace().next().unwrap())
        .collect();
    assert!(
        typed.len() >= 17,
        "every metric has a # TYPE line:\n{metrics}"
    );
    for name in typed {
        let help = format!("# HELP {name} ");
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with(&help) && line.len() > help.len()),
            "{name} has no # HELP line in\n{metrics}"
        );
    }

    let page = app.get("/").await;
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_configurable() {
    let closed = TestApp::start().await;
    let response = closed
        .get_with("/health", &[("Origin", "https://app.example")])
        .await;
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );

    let open = TestApp::builder()
        .cors_origin("https://app.example")
        .start()
        .await;
    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{}/events", open.base))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let other = open
        .get_with("/health", &[("Origin", "https://evil.example")])
        .await;
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_events_and_tells_resuming_clients() {
    let db_url = common::fresh_database().await;
    // A first start creates the schema; then three old events and two recent ones.
    let app = TestApp::builder().database(&db_url).start().await;
    let producer = app.producer().await;
    producer
        .batch_execute(
            "insert into events (type, timestamp, subscriber, payload, topics, update_id) \
             select 'old', now() - interval '2 days', 'toto', '{}', array['/t', '/alt'], \
               'urn:old' || n from generate_series(1, 3) n;",
        )
        .await
        .unwrap();
    // The hub keys the old events in stretches of their own (src/keys.rs) before the new ones.
    common::keyed_upto(&producer, 3).await;
    producer
        .batch_execute(
            "insert into events (type, subscriber, payload, topics, update_id) \
             select 'new', 'toto', '{}', array['/t', '/alt'], 'urn:new' || n \
             from generate_series(1, 2) n;",
        )
        .await
        .unwrap();
    app.stop().await.unwrap();

    let app = TestApp::builder()
        .database(&db_url)
        .retention(Duration::from_secs(24 * 3600))
        .start()
        .await;
    let query = "select count(*) from events";
    let what = "retention deleted the old events";
    common::until_value(&producer, query, &[], |left: &i64| *left == 2, what).await;
    // With their keys (src/keys.rs), in the same statement: the new events' two stretches and
    // publishers' ids are left.
    let keys: Vec<i64> = producer
        .query_one(
            "select (select count(*) from event_piper_topics), \
                    (select count(*) from event_piper_update_ids)",
            &[],
        )
        .await
        .map(|row| vec![row.get(0), row.get(1)])
        .unwrap();
    assert_eq!(keys, [2, 2]);

    let mut resumed = app.consume("toto", Some(1)).await;
    assert_eq!(resumed.ids(2).await, vec![4, 5]);
    assert_eq!(
        resumed.notices,
        vec![(
            "event-piper.truncated".to_owned(),
            r#"{"last_event_id":1,"deleted_upto":3}"#.to_owned()
        )]
    );
    // A resume point after what was deleted is not told anything.
    let mut later = app.consume("toto", Some(4)).await;
    assert_eq!(later.next().await.id, 5);
    assert!(later.notices.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_searchable_and_paginated() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let add =
        |event_type: &'static str, subscriber: Option<&'static str>, payload: &'static str| {
            let producer = &producer;
            async move {
                producer
                    .query_one(
                        "insert into events (type, subscriber, payload) \
                     values ($1::text, $2::text, $3::text::jsonb) returning id",
                        &[&event_type, &subscriber, &payload],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
            }
        };
    let created = add("order.created", Some("c"), r#"{"n": 1, "tag": "x"}"#).await;
    let ping = add("ping", Some("c"), "{}").await;
    add("order.created", Some("d"), r#"{"tag": "x"}"#).await;
    let broadcast = add("news", None, "{}").await;
    let paid = add("order.paid", Some("c"), r#"{"n": 2, "tag": "x"}"#).await;

    let search = |query: &str| {
        let path = format!("/history?consumer=c{query}");
        let app = &app;
        async move {
            let response = app.get(&path).await;
            assert_eq!(response.status(), 200, "{path}");
            let body: serde_json::Value = response.json().await.unwrap();
            let ids: Vec<i64> = body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|event| event["id"].as_i64().unwrap())
                .collect();
            (ids, body["next"].as_str().map(str::to_owned), body)
        }
    };
    let (ids, next, body) = search("").await;
    assert_eq!(ids, [created, ping, broadcast, paid]);
    assert_eq!(next, None);
    assert_eq!(body["events"][0]["type"], "order.created");
    assert_eq!(body["events"][0]["payload"]["n"], 1);
    assert_eq!(body["events"][2]["subscriber"], serde_json::Value::Null);

    assert_eq!(search("&types=order.*").await.0, [created, paid]);
    assert_eq!(
        search("&payload=%7B%22tag%22%3A%22x%22%7D").await.0,
        [created, paid]
    );
    assert_eq!(
        search(&format!("&after={created}&upto={broadcast}"))
            .await
            .0,
        [ping, broadcast]
    );
    assert_eq!(
        search("&since=2999-01-01T00:00:00Z").await.0,
        Vec::<i64>::new()
    );
    assert_eq!(search("&until=2999-01-01T00:00:00Z").await.0.len(), 4);

    // Keyset pages: a full page links to the next one, the last one to nothing.
    let (first, next, _) = search("&limit=3").await;
    assert_eq!(first, [created, ping, broadcast]);
    let next = next.expect("a link to the next page");
    let body: serde_json::Value = app.get(&next).await.json().await.unwrap();
    assert_eq!(body["events"][0]["id"], paid);
    assert_eq!(body["next"], serde_json::Value::Null);

    let (newest, next, _) = search("&last=2").await;
    assert_eq!((newest, next), (vec![broadcast, paid], None));

    for (query, reason) in [
        ("&limit=0", "invalid limit"),
        ("&last=0", "invalid last"),
        ("&last=2&limit=2", "not both"),
        ("&limit=1001", "invalid limit"),
        ("&since=yesterday", "invalid since"),
        ("&after=x", "invalid after"),
        ("&payload=nope", "invalid payload"),
        ("&types=or*der", "invalid types parameter"),
    ] {
        let response = app.get(&format!("/history?consumer=c{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        assert!(response.text().await.unwrap().contains(reason), "{query}");
    }
    let response = app.get("/history").await;
    assert_eq!(response.status(), 400);
}

/// Found by schemathesis (tests/openapi.rs): U+0000 reached PostgreSQL, whose jsonb and text
/// refuse it, and each of these answered 500 "the database refused the request". Each is now a
/// 400 that says why, and the service goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_refused_with_a_reason_not_a_server_error() {
    let app = TestApp::start().await;
    for body in [
        r#"{"type": "t", "subscriber": null, "payload": "a\u0000b"}"#,
        r#"{"type": "t", "subscriber": "c", "payload": {"key\u0000": 1}}"#,
        r#"[{"type": "t", "subscriber": "c", "payload": 1},
            {"type": "t", "subscriber": "c", "payload": [[{"deep": "\u0000"}]]}]"#,
    ] {
        let response = app.post_events("application/json", body).await;
        assert_eq!(response.status(), 400, "{body}");
        let text = response.text().await.unwrap();
        assert!(text.contains("U+0000"), "{body}: {text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    }
    // An escaped backslash before "u0000" is no NUL: stored as it is.
    let response = app
        .post_events(
            "application/json",
            r#"{"type": "t", "subscriber": "c", "payload": "\\u0000"}"#,
        )
        .await;
    assert_eq!(response.status(), 201);

    // A history search for a payload containing U+0000.
    let response = app
        .get("/history?consumer=c&payload=%7B%22a%22%3A%22%5Cu0000%22%7D")
        .await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("U+0000"));

    // A Mercure resume point with U+0000 (only a parameter can carry one).
    let response = app
        .get("/.well-known/mercure?match=a&last_event_id=%00")
        .await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("U+0000"));

    let response = app.get("/history?consumer=c").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["events"].as_array().unwrap().len(), 1, "{body}");
}
