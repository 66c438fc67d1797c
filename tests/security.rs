//! Authentication, limits and hostile input: every rejection by status code and reason, a
//! property test over request parsing, and an abuse test on loopback.

mod common;

use std::time::Duration;

use common::{PATIENCE, TestApp, insert};
use event_piper::auth::mint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "test-secret-test-secret-test-secret!";

fn token(sub: &str, publish: bool) -> String {
    mint(SECRET, sub, Duration::from_secs(600), publish).unwrap()
}

async fn assert_refused(response: reqwest::Response, status: u16, reason: &str) {
    assert_eq!(response.status(), status, "expected {status} ({reason})");
    let body = response.text().await.unwrap();
    assert!(body.contains(reason), "{reason:?} in {body:?}");
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_reads_and_who_publishes() {
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let toto = token("toto", false);
    let bearer = format!("Bearer {toto}");

    // 401s: no token, malformed, wrongly signed, expired.
    let response = app.get_with("/events", &[("X-Consumer-Id", "toto")]).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_refused(response, 401, "missing token").await;
    // A token presented with another scheme is a bad request (RFC 6750, invalid_request).
    let response = app
        .get_with("/events", &[("Authorization", "Basic dG90bzpwdw==")])
        .await;
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer error="invalid_request""#
    );
    assert_refused(response, 400, "expected Authorization: Bearer").await;
    let cases = [
        ("Bearer nonsense".to_owned(), "malformed token"),
        (
            format!(
                "Bearer {}",
                mint(
                    "another-secret-another-secret-12345",
                    "toto",
                    Duration::from_secs(60),
                    false
                )
                .unwrap()
            ),
            "invalid token signature",
        ),
        (format!("Bearer {}", expired_token()), "token expired"),
    ];
    for (authorization, reason) in cases {
        let response = app
            .get_with("/events", &[("Authorization", &authorization)])
            .await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer error="invalid_token""#
        );
        assert_refused(response, 401, reason).await;
    }

    // 403: a token for toto asking for titi.
    let response = app
        .get_with(
            "/events",
            &[("Authorization", &bearer), ("X-Consumer-Id", "titi")],
        )
        .await;
    assert_refused(response, 403, "may read consumer \"toto\"").await;

    // The header, the query parameter and the cookie all work; the consumer defaults to sub.
    let producer = app.producer().await;
    let id = insert(&producer, "toto", "{}").await;
    for (path, headers) in [
        (
            "/events".to_owned(),
            vec![("Authorization", bearer.clone())],
        ),
        (format!("/events?access_token={toto}"), vec![]),
        (
            "/events?consumer=toto".to_owned(),
            vec![("Cookie", format!("event_piper_token={toto}"))],
        ),
    ] {
        let mut headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        headers.push(("Last-Event-ID", "0"));
        let mut stream = app.stream(&path, &headers).await;
        assert_eq!(stream.next().await.id, id, "{path}");
    }

    // Publishing needs the publish claim.
    let body = r#"{"type": "t", "subscriber": "titi", "payload": {}}"#;
    let publish = async |authorization: &str| {
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", authorization),
        ];
        app.post_events_with(&headers, body).await
    };
    assert_refused(publish(&bearer).await, 403, "may not publish").await;
    let created = publish(&format!("Bearer {}", token("backend", true))).await;
    assert_eq!(created.status(), 201);
    let titis: serde_json::Value = created.json().await.unwrap();
    let titis = titis["ids"][0].as_i64().unwrap();

    // Single events: own and broadcast only.
    let response = app
        .get_with(&format!("/events/{titis}"), &[("Authorization", &bearer)])
        .await;
    assert_refused(response, 403, "may read consumer \"toto\" only").await;
    let response = app
        .get_with(&format!("/events/{id}"), &[("Authorization", &bearer)])
        .await;
    assert_eq!(response.status(), 200);
    let response = app.get_with(&format!("/events/{id}"), &[]).await;
    assert_refused(response, 401, "missing token").await;
}

fn expired_token() -> String {
    signed(event_piper::auth::Claims {
        sub: event_piper::event::ConsumerId::parse(b"toto").ok(),
        exp: 1_000_000,
        publish: false,
        types: None,
        subscriptions: false,
        authorization_details: None,
        topics: Default::default(),
    })
}

/// A token with exactly these claims, signed with the test secret.
fn signed(claims: event_piper::auth::Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_overall_and_per_consumer() {
    let app = TestApp::builder()
        .max_streams(3)
        .max_streams_per_consumer(2)
        .start()
        .await;
    let _a1 = app.consume("a", None).await;
    let _a2 = app.consume("a", None).await;
    let response = app.get_events(&[("X-Consumer-Id", "a")]).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_refused(response, 429, "too many open streams for this consumer").await;
    let b = app.consume("b", None).await;
    let response = app.get_events(&[("X-Consumer-Id", "c")]).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_refused(response, 503, "too many open streams on this instance").await;
    // Closing a stream frees its place.
    drop(b);
    let reopened = async {
        loop {
            if app.get_events(&[("X-Consumer-Id", "c")]).await.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, reopened)
        .await
        .expect("the place is freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_slow_headers_are_refused() {
    let app = TestApp::builder()
        .header_timeout(Duration::from_secs(1))
        .start()
        .await;
    let huge = "x".repeat(64 * 1024);
    let response = app.get_with("/health", &[("X-Filler", &huge)]).await;
    assert_eq!(response.status(), 431);

    // A client that sends half a request and then nothing is dropped.
    let address = app.base.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buffer = [0; 1024];
        loop {
            match slow.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    closed.await.expect("the server dropped the slow client");
}

/// Whether a consumer id is acceptable, stated independently of the service's parser.
fn valid_consumer(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_request_gets_a_proper_answer_never_a_5xx() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let app = TestApp::start().await;
    // Values a header can carry: visible ASCII, spaces, tabs and obs-text bytes.
    let header_text = "[ -~\t\u{80}-\u{ff}]{0,300}";
    let strategy = (
        prop::option::of(header_text),
        prop::option::of(prop_oneof![
            "[0-9]{1,25}",
            "-?[0-9a-z+ ]{0,12}",
            header_text
        ]),
        prop::option::of("[a-z0-9%&=_+.~-]{0,80}"),
        prop::collection::vec(any::<u8>(), 0..300),
        prop_oneof![
            Just("application/json"),
            Just("text/plain"),
            Just("application/json; charset=utf-8")
        ],
    );
    // The cases are generated up front (the runner is synchronous), then sent one by one.
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = std::sync::Mutex::new(Vec::new());
    runner
        .run(&strategy, |case| {
            cases.lock().unwrap().push(case);
            Ok(())
        })
        .unwrap();
    for (consumer, last_event_id, query, body, content_type) in cases.into_inner().unwrap() {
        let mut headers = Vec::new();
        if let Some(consumer) = &consumer {
            headers.push(("X-Consumer-Id", consumer.as_str()));
        }
        if let Some(id) = &last_event_id {
            headers.push(("Last-Event-ID", id.as_str()));
        }
        let path = format!("/events?{}", query.clone().unwrap_or_default());
        let response = app.get_with(&path, &headers).await;
        let status = response.status().as_u16();
        assert!(
            status == 200 || (400..500).contains(&status),
            "GET {consumer:?} {last_event_id:?} {query:?}: {status}"
        );
        if let Some(consumer) = &consumer {
            // HTTP itself trims spaces and tabs around a header value.
            let text = String::from_utf8(consumer.as_bytes().to_vec()).ok();
            let text = text.as_deref().map(|text| text.trim_matches([' ', '\t']));
            if !text.is_some_and(valid_consumer) {
                assert_eq!(status, 400, "invalid consumer {consumer:?} accepted");
            }
        }
        drop(response);

        let response = app.post_events(content_type, body.clone()).await;
        let status = response.status().as_u16();
        // Random bytes are never a valid event: 400 or 415, never 201 and never 5xx.
        assert!(matches!(status, 400 | 415), "POST {body:?}: {status}");
    }
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_do_not_disturb_a_normal_consumer() {
    let app = TestApp::builder()
        .header_timeout(Duration::from_secs(1))
        .write_timeout(Duration::from_secs(1))
        .start()
        .await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let producer = app.producer().await;
    let mut normal = app.consume("normal", None).await;

    let abuse = {
        let address = address.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for round in 0..3000 {
                let Ok(mut socket) = tokio::net::TcpStream::connect(&address).await else {
                    continue;
                };
                match round % 3 {
                    // Opened and dropped at once.
                    0 => drop(socket),
                    // Slow headers: half a request, then silence.
                    1 => {
                        let _ = socket
                            .write_all(b"GET /events HTTP/1.1\r\nX-Consumer")
                            .await;
                        held.push(socket);
                    }
                    // A stream that is never read.
                    _ => {
                        let _ = socket
                            .write_all(
                                b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: normal\r\n\r\n",
                            )
                            .await;
                        held.push(socket);
                    }
                }
                if held.len() > 500 {
                    held.drain(..250);
                }
            }
            held
        })
    };

    let payload = serde_json::json!({ "text": "z".repeat(2000) }).to_string();
    let mut expected = Vec::new();
    for _ in 0..300 {
        expected.push(insert(&producer, "normal", &payload).await);
    }
    let held = abuse.await.unwrap();
    assert_eq!(normal.ids(expected.len()).await, expected);
    drop(held);
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires_and_resumes_with_a_new_one() {
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let producer = app.producer().await;
    let short = mint(SECRET, "toto", Duration::from_secs(2), false).unwrap();
    let mut stream = app
        .stream("/events", &[("Authorization", &format!("Bearer {short}"))])
        .await;
    let first = insert(&producer, "toto", "{}").await;
    assert_eq!(stream.next().await.id, first);

    // It ends by itself, with a notice that carries no id.
    assert!(
        stream.ends_within(PATIENCE).await,
        "the stream outlived its token"
    );
    let notices: Vec<&str> = stream
        .notices
        .iter()
        .map(|(event, _)| event.as_str())
        .collect();
    assert_eq!(notices, ["event-piper.token-expired"]);
    assert_eq!(stream.last_event_id, Some(first));

    // The same token now gets a 401, even within the leeway the check allows for clock skew:
    // a client does not reconnect to a stream that would end at once.
    let response = app
        .get_with("/events", &[("Authorization", &format!("Bearer {short}"))])
        .await;
    assert_refused(response, 401, "token expired").await;

    // A fresh token resumes where the stream ended: nothing is lost.
    let missed = insert(&producer, "toto", "{}").await;
    let fresh = token("toto", false);
    let mut resumed = app
        .stream(
            "/events",
            &[
                ("Authorization", &format!("Bearer {fresh}")),
                ("Last-Event-ID", &first.to_string()),
            ],
        )
        .await;
    assert_eq!(resumed.next().await.id, missed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_types_reads_only_those() {
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let producer = app.producer().await;
    let orders_only = signed(event_piper::auth::Claims {
        sub: event_piper::event::ConsumerId::parse(b"toto").ok(),
        exp: 4_000_000_000,
        publish: false,
        types: Some(vec!["order.*".into()]),
        subscriptions: false,
        authorization_details: None,
        topics: Default::default(),
    });
    let bearer = format!("Bearer {orders_only}");
    let auth = [("Authorization", bearer.as_str())];

    // Asking for more than the token allows is refused; asking for less is fine.
    let response = app.get_with("/events?types=ping", &auth).await;
    assert_refused(response, 403, "this token may read types order.* only").await;
    let response = app.get_with("/events?types=order.*,ping", &auth).await;
    assert_refused(response, 403, "may read types order.* only").await;

    let mut narrower = app.stream("/events?types=order.created", &auth).await;
    let mut all_allowed = app.stream("/events", &auth).await;
    let typed = |event_type: &'static str| {
        let producer = &producer;
        async move {
            producer
                .query_one(
                    "insert into events (type, subscriber) values ($1::text, 'toto') returning id",
                    &[&event_type],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    typed("ping").await;
    let item = typed("order.item.added").await;
    let created = typed("order.created").await;
    assert_eq!(all_allowed.ids(2).await, [item, created]);
    assert_eq!(narrower.next().await.id, created);

    // History applies the same rules.
    let body: serde_json::Value = app.get_with("/history", &auth).await.json().await.unwrap();
    let types: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["order.item.added", "order.created"]);
    let response = app.get_with("/history?consumer=titi", &auth).await;
    assert_refused(response, 403, "may read consumer \"toto\"").await;
    let response = app.get_with("/history?consumer=toto", &[]).await;
    assert_refused(response, 401, "missing token").await;
}
