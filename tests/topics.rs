//! Topics and the Mercure hub (draft-dunglas-mercure-08), end to end against a real PostgreSQL
//! and the real HTTP server: events addressed to topics over SQL and `POST /events`, streams of
//! several topics (exact and URL patterns, alternates included) live and resumed, the hub's
//! subscribe and publish sides with the draft's ids, frames, resume points and refusals, private
//! updates and the grants of Mercure tokens wherever they travel, discovery, and event-piper's own
//! tokens on consumer streams of a table that also holds topics.
//!
//! Nothing here is timed: what must arrive is awaited with [`PATIENCE`], and what must not arrive
//! is shown absent by a later event that does arrive (ids only grow on a stream).

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use common::{PATIENCE, SseClient, TestApp, ids_for, insert};
use event_piper::auth::{Grants, mint, mint_granting};
use futures::{Stream, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};

const SECRET: &str = "topics-secret-topics-secret-topics!!";
const HUB: &str = "/.well-known/mercure";
const DETAIL: &str = "https://mercure.rocks/authorization-detail";
const ROOM: &str = "https://example.com/rooms/1";
const OTHER_ROOM: &str = "https://example.com/rooms/2";
const ELSEWHERE: &str = "https://example.com/elsewhere";
const BOOKS: &str = "https://example.com/books/:id";

fn book(n: u32) -> String {
    format!("https://example.com/books/{n}")
}

/// A query string of these pairs, form-encoded as a browser's `URLSearchParams` writes it.
fn query(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The hub's path with a query of these pairs.
fn hub(pairs: &[(&str, &str)]) -> String {
    format!("{HUB}?{}", query(pairs))
}

/// A live hub stream of the query `pairs`, opened with these headers.
async fn hub_stream(app: &TestApp, pairs: &[(&str, &str)], headers: &[(&str, &str)]) -> HubStream {
    HubStream::open(app.get_with(&hub(pairs), headers).await).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token of these claims, with this `typ`.
fn sign(typ: &str, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some(typ.into());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A Mercure access token (`typ` `at+jwt`) carrying these authorization details, valid 10 minutes.
fn mercure_token(details: &[Value]) -> String {
    sign(
        "at+jwt",
        &json!({"exp": now() + 600, "authorization_details": details}),
    )
}

/// A Mercure authorization detail granting `actions` on `topics` (see [`exact`], [`pattern`]).
fn grant(actions: &[&str], topics: &[Value]) -> Value {
    json!({"type": DETAIL, "actions": actions, "topics": topics})
}

/// An exact topic matcher of an authorization detail.
fn exact(topic: &str) -> Value {
    json!({"match": topic})
}

/// A URL pattern topic matcher of an authorization detail.
fn pattern(pattern: &str) -> Value {
    json!({"match": pattern, "match_type": "urlpattern"})
}

/// Inserts an event over SQL, as a producer would; returns its id.
async fn add_event(
    producer: &impl tokio_postgres::GenericClient,
    event_type: &str,
    subscriber: Option<&str>,
    topics: Option<&[&str]>,
    private: bool,
    payload: &str,
) -> i64 {
    let topics: Option<Vec<&str>> = topics.map(<[&str]>::to_vec);
    producer
        .query_one(
            "insert into events (type, subscriber, topics, private, payload) \
             values ($1, $2, $3, $4, $5::text::jsonb) returning id",
            &[&event_type, &subscriber, &topics, &private, &payload],
        )
        .await
        .expect("insert")
        .get(0)
}

/// Inserts a topic-only event over SQL (type `message`); returns its id.
async fn add(producer: &impl tokio_postgres::GenericClient, topics: &[&str], private: bool) -> i64 {
    add_event(
        producer,
        "message",
        None,
        Some(topics),
        private,
        r#"{"n": 1}"#,
    )
    .await
}

/// A refusal: the status, and a one-line reason that says `reason`.
async fn assert_refused(response: reqwest::Response, status: u16, reason: &str) {
    assert_eq!(response.status(), status, "expected {status} ({reason})");
    let body = response.text().await.unwrap();
    assert!(body.contains(reason), "{reason:?} in {body:?}");
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {body:?}");
}

/// The ids a `GET /events` stream delivers, up to and including `last`.
async fn ids_through(stream: &mut SseClient, last: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    loop {
        let event = stream.next().await;
        ids.push(event.id);
        if event.id >= last {
            return ids;
        }
    }
}

/// One update as a Mercure subscriber sees it: the frame's text, and its fields as the
/// `eventsource-stream` crate (an `EventSource`'s parsing) reads them.
#[derive(Debug, Clone)]
struct Update {
    raw: String,
    id: String,
    /// `message` when the frame has no `event:` line.
    event: String,
    data: String,
    retry: Option<Duration>,
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A reader of a hub's stream, whose ids are strings (a publisher's id, or `#` and the event's).
struct HubStream {
    body: Body,
    buffer: BytesMut,
    headers: reqwest::header::HeaderMap,
}

impl HubStream {
    /// The stream of a response that must be a 200 event stream, once it is live (its `retry:`
    /// hint came).
    async fn open(response: reqwest::Response) -> HubStream {
        let status = response.status();
        let headers = response.headers().clone();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            panic!("expected a stream, got {status}: {body}");
        }
        assert_eq!(headers["content-type"], "text/event-stream");
        let mut stream = HubStream {
            body: Box::pin(response.bytes_stream()),
            buffer: BytesMut::new(),
            headers,
        };
        let first = tokio::time::timeout(PATIENCE, stream.frame())
            .await
            .expect("the stream went live")
            .expect("the stream ended before it went live");
        assert!(first.starts_with("retry: "), "first frame {first:?}");
        stream
    }

    /// The next frame's text, up to and including its blank line; None when the stream ended.
    async fn frame(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let frame = self.buffer.split_to(end + 2);
                return Some(String::from_utf8(frame.to_vec()).expect("UTF-8 frame"));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    /// The next update (frames without data, heartbeats and hints, are skipped).
    async fn next(&mut self) -> Update {
        let next = async {
            loop {
                let raw = self.frame().await.expect("the stream ended");
                if let Some(update) = parse_update(&raw) {
                    return update;
                }
            }
        };
        tokio::time::timeout(PATIENCE, next)
            .await
            .expect("expected another update")
    }

    /// The updates up to and including the one with id `last`.
    async fn through(&mut self, last: &str) -> Vec<Update> {
        let mut updates = Vec::new();
        loop {
            let update = self.next().await;
            let done = update.id == last;
            updates.push(update);
            if done {
                return updates;
            }
        }
    }

    /// The ids of the updates up to and including `last`.
    async fn ids_through(&mut self, last: &str) -> Vec<String> {
        self.through(last)
            .await
            .into_iter()
            .map(|update| update.id)
            .collect()
    }

    /// The `Mercure-Last-Event-ID` response header, if any.
    fn resumed_from(&self) -> Option<&str> {
        self.headers
            .get("mercure-last-event-id")
            .map(|value| value.to_str().unwrap())
    }
}

/// Parses one frame with a fresh parser (so a frame's id is its own); None for frames without
/// data.
fn parse_update(raw: &str) -> Option<Update> {
    use eventsource_stream::Eventsource;
    use futures::FutureExt;
    let mut parser = futures::stream::iter([Ok::<_, Infallible>(raw.to_owned())]).eventsource();
    match parser
        .next()
        .now_or_never()
        .expect("the parser has the whole frame")
    {
        Some(Ok(event)) => Some(Update {
            raw: raw.to_owned(),
            id: event.id,
            event: event.event,
            data: event.data,
            retry: event.retry,
        }),
        Some(Err(error)) => panic!("invalid SSE frame {raw:?}: {error}"),
        None => None,
    }
}

fn hash(id: i64) -> String {
    format!("#{id}")
}

fn hashes(ids: &[i64]) -> Vec<String> {
    ids.iter().map(|&id| hash(id)).collect()
}

/// A form POST to the hub, with a bearer token if given.
async fn hub_post(
    app: &TestApp,
    token: Option<&str>,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}{HUB}", app.base))
        .form(fields);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("POST to the hub")
}

/// Publishes to the hub and returns the id it answers with (200, `text/plain; charset=utf-8`).
async fn hub_publish(app: &TestApp, token: Option<&str>, fields: &[(&str, &str)]) -> String {
    let response = hub_post(app, token, fields).await;
    let status = response.status();
    let content_type = response.headers().get("content-type").cloned();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{fields:?}: {body}");
    assert_eq!(
        content_type.as_ref().map(|value| value.to_str().unwrap()),
        Some("text/plain; charset=utf-8")
    );
    body
}

async fn max_id(producer: &tokio_postgres::Client) -> i64 {
    producer
        .query_one("select coalesce(max(id), 0) from events", &[])
        .await
        .unwrap()
        .get(0)
}

/// An event inserted over SQL with `topics` (the README's statement) reaches a topic's stream
/// (`GET /events?topic=`) and no consumer's stream: a topic-only event is no broadcast. An event
/// addressed by subscriber alone (the walkthrough's insert) reaches its consumer frame for frame
/// as before, and not the topic's stream; a stream that names a consumer and a topic gets both,
/// in one id order. History searches stay a consumer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_topics_reach_topic_streams_and_consumers_are_unchanged() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let topic_path = format!("/events?{}", query(&[("topic", ROOM)]));
    let mut room = app.stream(&topic_path, &[]).await;
    let mut toto = app.consume("toto", None).await;
    let mut both = app.stream(&topic_path, &[("X-Consumer-Id", "toto")]).await;

    let hi: i64 = producer
        .query_one(
            "insert into events (type, topics, payload) \
             values ('message', array['https://example.com/rooms/1'], '{\"text\": \"hi\"}') \
             returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let walkthrough: i64 = producer
        .query_one(
            "insert into events (type, timestamp, subscriber, payload) \
             values ('insert', now(), 'toto', '{\"foo\": \"bar\"}') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let broadcast = add_event(&producer, "news", None, None, false, "{}").await;
    let other_room = add(&producer, &[OTHER_ROOM], false).await;
    let titi = insert(&producer, "titi", "{}").await;
    let room_marker = add(&producer, &[ROOM], false).await;
    let toto_marker = insert(&producer, "toto", "{}").await;

    let first = room.next().await;
    assert_eq!(
        (first.id, first.event.as_str(), first.data.as_str()),
        (hi, "message", r#"{"text":"hi"}"#)
    );
    assert_eq!(
        room.next().await.id,
        room_marker,
        "the walkthrough's event, the broadcast, another room's and titi's event are not the room's"
    );

    let first = toto.next().await;
    assert_eq!(
        (first.id, first.event.as_str(), first.data.as_str()),
        (walkthrough, "insert", r#"{"foo":"bar"}"#),
        "the walkthrough's frame, unchanged; the topic-only event before it did not come"
    );
    assert_eq!(
        ids_through(&mut toto, toto_marker).await,
        vec![broadcast, toto_marker],
        "a consumer gets broadcasts, not topic-only events"
    );
    assert_eq!(
        ids_for(&producer, "toto").await,
        [walkthrough, broadcast, toto_marker]
    );

    assert_eq!(
        ids_through(&mut both, toto_marker).await,
        vec![hi, walkthrough, broadcast, room_marker, toto_marker],
        "a consumer and a topic: both, once, in id order"
    );
    let _ = (other_room, titi); // neither stream's: the later ids above arrived instead

    let history = app
        .get(&format!(
            "/history?consumer=toto&{}",
            query(&[("topic", ROOM)])
        ))
        .await;
    assert_refused(history, 400, "history searches follow one consumer").await;
}

/// One stream follows two exact topics and a URL pattern in one id order: an event that matches
/// several of its selectors arrives once, alternate topics (`topics[2..]` as well as the second)
/// select it like the canonical one, and events of other topics, of a path the pattern does not
/// match, or of a consumer, do not arrive. `match=*` follows every topic but no consumer's
/// events; more than 32 matchers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_follows_several_topics_in_one_order() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let path = format!(
        "/events?{}",
        query(&[
            ("topic", ROOM),
            ("topic", OTHER_ROOM),
            ("match_urlpattern", BOOKS),
        ])
    );
    let mut stream = app.stream(&path, &[]).await;
    let mut any = app
        .stream(&format!("/events?{}", query(&[("match", "*")])), &[])
        .await;

    let book1 = book(1);
    let book7 = book(7);
    let book9 = book(9);
    let reviews = format!("{}/reviews", book(1));
    let shapes: Vec<(Vec<&str>, bool)> = vec![
        (vec![ROOM], true),
        (vec![ELSEWHERE], false),
        (vec![ROOM, OTHER_ROOM, &book1], true), // all three selectors: once
        (vec![&book7], true),
        (vec![ELSEWHERE, OTHER_ROOM], true), // the second topic
        (vec![&reviews], false),             // not the pattern's path
        (vec![ELSEWHERE, "urn:example:x", &book9], true), // the third topic, by pattern
        (vec!["https://example.com/ROOMS/1"], false), // exact is byte for byte
        (vec![OTHER_ROOM, ROOM], true),
    ];
    let mut expected = Vec::new();
    let mut every_topic = Vec::new();
    for (topics, selected) in &shapes {
        let id = add(&producer, topics, false).await;
        every_topic.push(id);
        if *selected {
            expected.push(id);
        }
        // A consumer's event between the topic events: neither stream's.
        insert(&producer, "toto", "{}").await;
    }
    let marker = add(&producer, &[ROOM], false).await;
    expected.push(marker);
    every_topic.push(marker);

    assert_eq!(ids_through(&mut stream, marker).await, expected);
    assert_eq!(ids_through(&mut any, marker).await, every_topic);

    let too_many: Vec<(&str, String)> = (0..33)
        .map(|n| ("topic", format!("urn:example:{n}")))
        .collect();
    let too_many: Vec<(&str, &str)> = too_many.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = app.get(&format!("/events?{}", query(&too_many))).await;
    assert_refused(response, 400, "at most 32 topic matchers").await;
    let response = app
        .get(&format!("/events?{}", query(&[("match_regex", ROOM)])))
        .await;
    assert_refused(response, 400, "unsupported matcher parameter").await;
}

/// A stream of several topics resumed with `Last-Event-ID` (or `last_event_id`) gets exactly the
/// events it missed, in order, through pages of a small batch size (exact topics through their
/// index, the pattern by scanning), then goes on live with the events committed while it
/// replayed: nothing lost, nothing twice, alternates included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_several_topics_resumes_exactly_where_it_stopped() {
    let app = TestApp::builder().batch_size(2).start().await;
    let producer = app.producer().await;
    let path = format!(
        "/events?{}",
        query(&[
            ("topic", ROOM),
            ("topic", OTHER_ROOM),
            ("match_urlpattern", BOOKS),
        ])
    );
    let mut first = app.stream(&path, &[]).await;
    let a = add(&producer, &[ROOM], false).await;
    add(&producer, &[ELSEWHERE], false).await;
    let b = add(&producer, &[ELSEWHERE, OTHER_ROOM], false).await;
    assert_eq!(first.ids(2).await, vec![a, b]);
    let seen = first.last_event_id.unwrap();
    drop(first);

    let book1 = book(1);
    let book2 = book(2);
    let reviews = format!("{}/reviews", book(2));
    let book3 = book(3);
    let shapes: Vec<(Option<Vec<&str>>, bool)> = vec![
        (Some(vec![ROOM]), true),
        (Some(vec![ELSEWHERE]), false),
        (Some(vec![ELSEWHERE, &book1]), true),
        (Some(vec![&book2]), true),
        (Some(vec![&reviews]), false),
        (Some(vec![ELSEWHERE, "urn:example:x", OTHER_ROOM]), true),
        (None, false), // toto's
        (Some(vec![ROOM, OTHER_ROOM, &book3]), true),
    ];
    let add_round = async |expected: &mut Vec<i64>| {
        for (topics, selected) in &shapes {
            let id = match topics {
                Some(topics) => add(&producer, topics, false).await,
                None => insert(&producer, "toto", "{}").await,
            };
            if *selected {
                expected.push(id);
            }
        }
    };
    let mut missed = Vec::new();
    add_round(&mut missed).await;
    add_round(&mut missed).await;

    let seen_text = seen.to_string();
    let mut resumed = app.stream(&path, &[("Last-Event-ID", &seen_text)]).await;
    // Committed after the stream fixed its starting point, before it read its replay.
    let mut expected = missed.clone();
    add_round(&mut expected).await;
    let marker = add(&producer, &[OTHER_ROOM], false).await;
    expected.push(marker);
    assert_eq!(ids_through(&mut resumed, marker).await, expected);
    // And it stays live.
    let live = add(&producer, &[ELSEWHERE, ROOM], false).await;
    assert_eq!(resumed.next().await.id, live);

    // The query parameter resumes the same way (for an EventSource's first connection).
    let mut by_query = app
        .stream(&format!("{path}&last_event_id={seen}"), &[])
        .await;
    expected.push(live);
    assert_eq!(ids_through(&mut by_query, live).await, expected);
}

/// `POST /events` addresses events to topics: `subscriber` may then be left out, the first topic
/// is canonical and the others alternates; `"private": true` keeps an event from topic streams
/// without a grant (here, without authentication, every one), though its consumer still gets it.
/// The refusals: empty topics, the `*` topic, more than 32 topics, private without topics, and a
/// batch with one bad event inserts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_events_addresses_topics() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut room = app
        .stream(&format!("/events?{}", query(&[("topic", ROOM)])), &[])
        .await;
    let mut other = app
        .stream(&format!("/events?{}", query(&[("topic", OTHER_ROOM)])), &[])
        .await;
    let mut toto = app.consume("toto", None).await;
    let post = async |body: Value| app.send(Method::POST, "/events", &[], Some(body)).await;
    let created = async |body: Value| -> Vec<i64> {
        let response = post(body.clone()).await;
        assert_eq!(response.status(), 201, "{body}");
        let answer: Value = response.json().await.unwrap();
        answer["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_i64().unwrap())
            .collect()
    };

    let public = created(json!({"type": "message", "topics": [ROOM, OTHER_ROOM],
                                "payload": {"text": "hi"}}))
    .await[0];
    let private = created(json!({"type": "message", "topics": [ROOM], "private": true,
                                 "payload": {}}))
    .await[0];
    let private_for_toto = created(json!({"type": "message", "subscriber": "toto",
                                          "topics": [ROOM], "private": true, "payload": {}}))
    .await[0];
    let batch = created(json!([
        {"type": "a", "topics": [OTHER_ROOM], "payload": 1},
        {"type": "b", "subscriber": "toto", "payload": 2},
    ]))
    .await;
    assert_eq!(batch[1], batch[0] + 1);
    let many: Vec<String> = (0..32).map(|n| format!("urn:example:{n}")).collect();
    created(json!({"type": "m", "topics": many, "payload": {}})).await;
    let marker = created(json!({"type": "marker", "subscriber": "toto",
                                "topics": [ROOM, OTHER_ROOM], "payload": {}}))
    .await[0];

    let first = room.next().await;
    assert_eq!(
        (first.id, first.event.as_str(), first.data.as_str()),
        (public, "message", r#"{"text":"hi"}"#)
    );
    assert_eq!(
        room.next().await.id,
        marker,
        "no private event without a grant"
    );
    assert_eq!(
        ids_through(&mut other, marker).await,
        vec![public, batch[0], marker],
        "the alternate topic selects"
    );
    assert_eq!(
        ids_through(&mut toto, marker).await,
        vec![private_for_toto, batch[1], marker],
        "a private event still reaches its consumer; topic-only ones do not"
    );

    let row = producer
        .query_one(
            "select subscriber, topics, coalesce(private, false) from events where id = $1",
            &[&private],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, Vec<String>>(1), vec![ROOM.to_owned()]);
    assert!(row.get::<_, bool>(2));

    let before = max_id(&producer).await;
    let too_many: Vec<String> = (0..33).map(|n| format!("urn:example:{n}")).collect();
    for (body, reason) in [
        (json!({"type": "t", "topics": [], "payload": 1}), "1 to 32"),
        (
            json!({"type": "t", "topics": ["*"], "payload": 1}),
            "reserved",
        ),
        (
            json!({"type": "t", "topics": too_many, "payload": 1}),
            "1 to 32",
        ),
        (
            json!({"type": "t", "topics": ROOM, "payload": 1}),
            "array of strings",
        ),
        (
            json!({"type": "t", "subscriber": null, "private": true, "payload": 1}),
            "needs \"topics\"",
        ),
        (
            json!({"type": "t", "private": true, "payload": 1}),
            "needs \"topics\"",
        ),
        (
            json!({"type": "t", "payload": 1}),
            "missing field \"subscriber\"",
        ),
        (
            json!([{"type": "t", "topics": [ROOM], "payload": 1},
                   {"type": "t", "topics": ["*"], "payload": 1}]),
            "event 1:",
        ),
    ] {
        assert_refused(post(body).await, 400, reason).await;
    }
    assert_eq!(max_id(&producer).await, before, "nothing inserted");
}

/// The hub's subscribe side: `match`, `match_exact`, `topic` and `match_urlpattern` select
/// (another `match…` name and no matcher are 400s); frames carry the publisher's id, else `#` and
/// the event's id, no `event:` line for the type `message`, the publisher's `retry:`, one `data:`
/// line per line of text data and JSON payloads (inserted over SQL) on one line. Resuming with a
/// publisher's id (header or `last_event_id`), `#<id>` or `earliest` replays exactly what follows
/// it, says so in `Mercure-Last-Event-ID`, and goes on live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_subscribes_frames_and_resumes_as_the_draft_says() {
    let app = TestApp::start().await;
    let producer = app.producer().await;

    assert_refused(
        app.get(&hub(&[("match_foo", ROOM)])).await,
        400,
        "unsupported matcher parameter",
    )
    .await;
    // A hub stream without a matcher is a 400 (its reason: see
    // `the_hub_says_a_subscription_without_a_matcher_lacks_one`).
    assert_eq!(app.get(HUB).await.status(), 400);
    assert_refused(
        app.get(&hub(&[("match_urlpattern", "https://example.com/(")]))
            .await,
        400,
        "invalid URL pattern",
    )
    .await;

    let mut by_match = hub_stream(&app, &[("match", ROOM)], &[]).await;
    let mut by_exact = hub_stream(&app, &[("match_exact", ROOM)], &[]).await;
    let mut by_topic = hub_stream(&app, &[("topic", ROOM)], &[]).await;
    let mut by_pattern = hub_stream(&app, &[("match_urlpattern", BOOKS)], &[]).await;
    assert_eq!(by_match.resumed_from(), None);

    // Published on the hub (no authentication: anyone may).
    let first = hub_publish(
        &app,
        None,
        &[
            ("topic", ROOM),
            ("data", "line one\nline two"),
            ("id", "urn:uuid:first"),
        ],
    )
    .await;
    assert_eq!(first, "urn:uuid:first");
    let book3 = book(3);
    let changed = hub_publish(
        &app,
        None,
        &[
            ("topic", &book3),
            ("type", "changed"),
            ("retry", "1500"),
            ("data", "x"),
        ],
    )
    .await;
    let changed_id = max_id(&producer).await;
    assert_eq!(changed, hash(changed_id));
    // Inserted over SQL.
    let json_event = add_event(
        &producer,
        "message",
        None,
        Some(&[ROOM]),
        false,
        r#"{"a": [1, 2]}"#,
    )
    .await;
    let book4 = book(4);
    let sql_typed = add_event(
        &producer,
        "insert",
        None,
        Some(&[&book4]),
        false,
        r#""plain""#,
    )
    .await;

    let mut live_frames = Vec::new();
    for stream in [&mut by_match, &mut by_exact, &mut by_topic] {
        let updates = stream.through(&hash(json_event)).await;
        live_frames = updates.iter().map(|update| update.raw.clone()).collect();
        assert_eq!(updates.len(), 2, "{updates:?}");
        assert_eq!(
            updates[0].raw,
            "id: urn:uuid:first\ndata: line one\ndata: line two\n\n"
        );
        assert_eq!(
            (updates[0].event.as_str(), updates[0].data.as_str()),
            ("message", "line one\nline two")
        );
        assert_eq!(
            updates[1].raw,
            format!("id: #{json_event}\ndata: {{\"a\":[1,2]}}\n\n")
        );
    }
    let updates = by_pattern.through(&hash(sql_typed)).await;
    assert_eq!(updates.len(), 2, "{updates:?}");
    live_frames.insert(1, updates[0].raw.clone());
    live_frames.push(updates[1].raw.clone());
    assert_eq!(
        updates[0].raw,
        format!("id: #{changed_id}\nevent: changed\nretry: 1500\ndata: x\n\n")
    );
    assert_eq!(updates[0].retry, Some(Duration::from_millis(1500)));
    assert_eq!(
        (updates[1].event.as_str(), updates[1].data.as_str()),
        ("insert", "plain")
    );

    // Resuming a stream of both selectors.
    let both = [("match", ROOM), ("match_urlpattern", BOOKS)];
    let all = vec![
        "urn:uuid:first".to_owned(),
        hash(changed_id),
        hash(json_event),
        hash(sql_typed),
    ];
    let resume = async |headers: &[(&str, &str)], extra: &[(&str, &str)]| {
        let mut pairs = both.to_vec();
        pairs.extend_from_slice(extra);
        hub_stream(&app, &pairs, headers).await
    };
    let mut after_first = resume(&[("Last-Event-ID", "urn:uuid:first")], &[]).await;
    assert_eq!(after_first.resumed_from(), Some("urn:uuid:first"));
    assert_eq!(after_first.ids_through(&hash(sql_typed)).await, all[1..]);

    let mut by_parameter = resume(&[], &[("last_event_id", "urn:uuid:first")]).await;
    assert_eq!(by_parameter.resumed_from(), Some("urn:uuid:first"));
    assert_eq!(by_parameter.ids_through(&hash(sql_typed)).await, all[1..]);

    let mut by_hash = resume(&[("Last-Event-ID", &hash(json_event))], &[]).await;
    assert_eq!(by_hash.resumed_from(), Some(hash(json_event).as_str()));
    assert_eq!(by_hash.ids_through(&hash(sql_typed)).await, all[3..]);

    // The header wins over the parameter, as for a browser's own reconnect.
    let mut header_wins = resume(
        &[("Last-Event-ID", &hash(changed_id))],
        &[("last_event_id", "earliest")],
    )
    .await;
    assert_eq!(header_wins.ids_through(&hash(sql_typed)).await, all[2..]);

    let mut earliest = resume(&[("Last-Event-ID", "earliest")], &[]).await;
    assert_eq!(earliest.resumed_from(), Some("earliest"));
    let replayed: Vec<String> = earliest
        .through(&hash(sql_typed))
        .await
        .into_iter()
        .map(|update| update.raw)
        .collect();
    assert_eq!(
        replayed, live_frames,
        "a replay sends the live frames, byte for byte"
    );

    // An id the hub never saw: it sends everything it has, and says it started at the earliest.
    let mut unknown = resume(&[("Last-Event-ID", "urn:uuid:never-published")], &[]).await;
    assert_eq!(unknown.resumed_from(), Some("earliest"));
    assert_eq!(unknown.ids_through(&hash(sql_typed)).await, all);

    // The resumed streams go on live, once.
    let live = hub_publish(
        &app,
        None,
        &[("topic", ROOM), ("id", "urn:uuid:live"), ("data", "")],
    )
    .await;
    for stream in [
        &mut after_first,
        &mut by_parameter,
        &mut by_hash,
        &mut earliest,
    ] {
        let next = stream.next().await;
        assert_eq!((next.id.as_str(), next.data.as_str()), (live.as_str(), ""));
    }
}

/// The hub's publish side, with authentication on: a form with repeated `topic`, `data`,
/// `private`, `id`, `type` and `retry`, from a token whose Mercure grants allow `publish` on
/// every topic, is committed and answered `200 text/plain; charset=utf-8` with its id (the
/// publisher's, else `#` and the event's id); the row keeps all of it. The draft's 400s (a topic
/// in the hub's namespace, `*`, `type=mercure`, an id starting with `#` or `earliest`, a retry
/// that is not digits, no topic), 401 without or with a bad token, 403 when a topic is not
/// granted, 415 for another body type; refusals insert nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_publishes_forms_as_the_draft_says() {
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let producer = app.producer().await;
    let publisher = mercure_token(&[grant(&["publish"], &[pattern(BOOKS), exact(ROOM)])]);
    let reader = mercure_token(&[grant(&["subscribe"], &[exact("*")])]);
    let mut everything = hub_stream(
        &app,
        &[("match", "*")],
        &[("Authorization", &format!("Bearer {reader}"))],
    )
    .await;

    let book1 = book(1);
    let dune = hub_publish(
        &app,
        Some(&publisher),
        &[
            ("topic", &book1),
            ("topic", ROOM),
            ("data", "{\"title\": \"Dune\"}"),
            ("private", "on"),
            ("id", "urn:uuid:dune"),
            ("type", "book.changed"),
            ("retry", "2500"),
        ],
    )
    .await;
    assert_eq!(dune, "urn:uuid:dune");
    let row = producer
        .query_one(
            "select type, subscriber, topics, coalesce(private, false), update_id, retry, \
             payload #>> '{}' from events where update_id = 'urn:uuid:dune'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "book.changed");
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(
        row.get::<_, Vec<String>>(2),
        vec![book1.clone(), ROOM.to_owned()]
    );
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, Option<i32>>(5), Some(2500));
    assert_eq!(row.get::<_, String>(6), "{\"title\": \"Dune\"}");

    let plain = hub_publish(
        &app,
        Some(&publisher),
        &[("topic", ROOM), ("data", "hello")],
    )
    .await;
    let plain_id = max_id(&producer).await;
    assert_eq!(plain, hash(plain_id));

    let updates = everything.through(&plain).await;
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert_eq!(
        updates[0].raw,
        "id: urn:uuid:dune\nevent: book.changed\nretry: 2500\ndata: {\"title\": \"Dune\"}\n\n"
    );
    assert_eq!(updates[1].raw, format!("id: #{plain_id}\ndata: hello\n\n"));

    let before = max_id(&producer).await;
    let token = Some(publisher.as_str());
    for (fields, reason) in [
        (
            vec![("topic", "/.well-known/mercure/subscriptions/x")],
            "namespace",
        ),
        (
            vec![("topic", "https://localhost/.well-known/mercure")],
            "namespace",
        ),
        (vec![("topic", "*")], "reserved"),
        (vec![("topic", ROOM), ("type", "mercure")], "reserved"),
        (vec![("topic", ROOM), ("id", "#1")], "may not start with #"),
        (vec![("topic", ROOM), ("id", "earliest")], "earliest"),
        (vec![("topic", ROOM), ("retry", "soon")], "digits"),
        (vec![("topic", ROOM), ("retry", "-1")], "digits"),
        (vec![("data", "no topic")], "missing topic"),
    ] {
        assert_refused(hub_post(&app, token, &fields).await, 400, reason).await;
    }

    let response = hub_post(&app, None, &[("topic", ROOM), ("data", "x")]).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_refused(response, 401, "missing token").await;
    let response = hub_post(&app, Some("not-a-token"), &[("topic", ROOM)]).await;
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_refused(response, 401, "malformed token").await;
    for (token, topics) in [
        (&publisher, vec![ELSEWHERE]),
        (&publisher, vec![book1.as_str(), ELSEWHERE]),
        (&reader, vec![ROOM]),
    ] {
        let fields: Vec<(&str, &str)> = topics.iter().map(|topic| ("topic", *topic)).collect();
        let response = hub_post(&app, Some(token), &fields).await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer error="insufficient_scope""#
        );
        assert_refused(response, 403, "may not publish").await;
    }
    let response = reqwest::Client::new()
        .post(format!("{}{HUB}", app.base))
        .bearer_auth(&publisher)
        .json(&json!({"topic": ROOM}))
        .send()
        .await
        .unwrap();
    assert_refused(response, 415, "x-www-form-urlencoded").await;
    assert_eq!(max_id(&producer).await, before, "refusals insert nothing");
}

/// What a framework publisher sends, as Symfony's Mercure component does it: a form POST
/// (`topic=...&topic=...&data=...&private=on&id=...`) with `Authorization: Bearer` and an RFC
/// 9068 access token like the one its token factory mints (`typ` `at+jwt`, `iss`, `aud`, `sub`,
/// `client_id`, `iat`, `jti`, `exp`, a publish grant), against a hub that checks the audience and
/// issuer; the answer is the update's id, and a subscriber granted the topic gets the update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symfony_style_publisher_publishes_to_the_hub() {
    const HUB_URL: &str = "https://example.com/.well-known/mercure";
    const ISSUER: &str = "https://example.com";
    let app = TestApp::builder()
        .jwt_secret(SECRET)
        .with(|config| {
            config.hub_url = Some(HUB_URL.into());
            config.jwt_audience = Some(HUB_URL.into());
            config.jwt_issuer = Some(ISSUER.into());
        })
        .start()
        .await;
    let claims = |details: Value| {
        json!({
            "iss": ISSUER,
            "aud": [HUB_URL],
            "sub": "urn:uuid:backend",
            "client_id": ISSUER,
            "iat": now(),
            "jti": "0123456789abcdef0123456789abcdef",
            "exp": now() + 3600,
            "authorization_details": details,
        })
    };
    let publisher = sign(
        "at+jwt",
        &claims(json!([grant(
            &["publish"],
            &[pattern("/books/:id"), pattern("/users/:user/books/:id")]
        )])),
    );
    let subscriber = sign(
        "at+jwt",
        &claims(json!([grant(&["subscribe"], &[exact(&book(1))])])),
    );
    let mut stream = hub_stream(
        &app,
        &[("match_urlpattern", "/books/:id")],
        &[("Cookie", &format!("mercureAuthorization={subscriber}"))],
    )
    .await;

    let book1 = book(1);
    let book2 = book(2);
    let data = json!({"@id": "/books/1", "status": "OutOfStock"}).to_string();
    let response = reqwest::Client::new()
        .post(format!("{}{HUB}", app.base))
        .bearer_auth(&publisher)
        .form(&[
            ("topic", book1.as_str()),
            ("topic", "https://example.com/users/dunglas/books/1"),
            ("data", &data),
            ("private", "on"),
            ("id", "urn:uuid:6a1b9e0a-2d6c-4a4e-9a39-5a3f0e1c2b7d"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "urn:uuid:6a1b9e0a-2d6c-4a4e-9a39-5a3f0e1c2b7d"
    );
    // A second one, not private, on a book the subscriber has no grant for: public, it arrives.
    let second = hub_publish(&app, Some(&publisher), &[("topic", &book2), ("data", "x")]).await;

    let updates = stream.through(&second).await;
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert_eq!(
        updates[0].id,
        "urn:uuid:6a1b9e0a-2d6c-4a4e-9a39-5a3f0e1c2b7d"
    );
    assert_eq!(updates[0].data, data);
    assert_eq!(updates[0].event, "message");

    // A token for another audience is refused.
    let mut other = claims(json!([grant(&["publish"], &[pattern("/books/:id")])]));
    other["aud"] = json!(["https://other.example/.well-known/mercure"]);
    let response = hub_post(&app, Some(&sign("at+jwt", &other)), &[("topic", &book1)]).await;
    assert_refused(response, 401, "").await;
}

/// RFC 7519 NumericDates may be fractional, and some versions of Symfony's `LcobucciFactory`
/// (lcobucci/jwt's default formatter) mint `exp` and `iat` with microseconds (`1767225600.123456`).
/// Such a token should verify; event-piper reads `exp` as an integer and refuses it as malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "refused with 401: jsonwebtoken 11 validates exp and nbf as u64, and so does Claims::exp"]
async fn a_token_with_fractional_numeric_dates_verifies() {
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let exp = now() as f64 + 3600.25;
    let token = sign(
        "at+jwt",
        &json!({
            "iat": now() as f64 + 0.5,
            "exp": exp,
            "authorization_details": [grant(&["publish"], &[exact(ROOM)])],
        }),
    );
    let response = hub_post(&app, Some(&token), &[("topic", ROOM), ("data", "x")]).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// Private updates reach a topic's stream only when the stream's token grants `subscribe` on one
/// of the update's topics, canonical or alternate, by an exact or a URL pattern grant, whether
/// the token comes as `Authorization: Bearer` (on the hub and on `GET /events`), the
/// `mercureAuthorization` cookie or the `authorization` parameter; the grant may be through
/// another of the update's topics than the one the stream selects it by. An anonymous stream
/// (allowed by `--anonymous-subscribers`) and one granted none of an update's topics get the
/// public ones only. A bad token is a 401 `invalid_token` (not an anonymous stream), a token of another
/// scheme a 400 `invalid_request`, and a Mercure grant without the `at+jwt` type is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_updates_reach_only_the_streams_their_topics_are_granted_to() {
    let app = TestApp::builder()
        .jwt_secret(SECRET)
        .with(|config| config.anonymous_subscribers = true)
        .start()
        .await;
    let producer = app.producer().await;
    let selection = query(&[
        ("topic", ROOM),
        ("topic", OTHER_ROOM),
        ("match_urlpattern", BOOKS),
    ]);
    let hub = format!("{HUB}?{selection}");
    let room_token = mercure_token(&[grant(&["subscribe"], &[exact(ROOM)])]);
    let books_token = mercure_token(&[grant(&["subscribe"], &[pattern(BOOKS)])]);
    let other_room_token = mercure_token(&[grant(&["subscribe"], &[exact(OTHER_ROOM)])]);
    let elsewhere_token = mercure_token(&[grant(&["subscribe"], &[exact(ELSEWHERE)])]);
    let nothing_token = mercure_token(&[grant(&["subscribe"], &[exact("urn:example:nothing")])]);

    let open = async |path: &str, headers: &[(&str, &str)]| {
        HubStream::open(app.get_with(path, headers).await).await
    };
    let mut by_bearer = open(&hub, &[("Authorization", &format!("Bearer {room_token}"))]).await;
    let mut by_cookie = open(
        &hub,
        &[(
            "Cookie",
            &format!("theme=dark; mercureAuthorization={books_token}"),
        )],
    )
    .await;
    let mut by_parameter = open(
        &format!("{hub}&{}", query(&[("authorization", &other_room_token)])),
        &[],
    )
    .await;
    let mut anonymous = open(&hub, &[]).await;
    // Granted a topic the stream does not select: an update selected through one of its topics
    // and granted through another reaches it.
    let mut granted_elsewhere = open(
        &hub,
        &[("Authorization", &format!("Bearer {elsewhere_token}"))],
    )
    .await;
    let mut not_granted = open(
        &hub,
        &[("Authorization", &format!("Bearer {nothing_token}"))],
    )
    .await;
    let mut events_stream = app
        .stream(
            &format!("/events?{selection}"),
            &[("Authorization", &format!("Bearer {room_token}"))],
        )
        .await;

    let book1 = book(1);
    let book2 = book(2);
    let public = add(&producer, &[ROOM], false).await;
    let room_private = add(&producer, &[ROOM], true).await;
    let book_private = add(&producer, &[&book1], true).await;
    let alternate = add(&producer, &[ELSEWHERE, OTHER_ROOM], true).await;
    let both = add(&producer, &[&book2, ROOM], true).await;
    let toto_private = add_event(
        &producer,
        "message",
        Some("toto"),
        Some(&[ROOM]),
        true,
        "{}",
    )
    .await;
    let unselected = add(&producer, &[ELSEWHERE], true).await;
    let marker = add(&producer, &[OTHER_ROOM], false).await;
    let _ = unselected;

    let expected = [
        (
            &mut by_bearer,
            vec![public, room_private, both, toto_private, marker],
        ),
        (&mut by_cookie, vec![public, book_private, both, marker]),
        (&mut by_parameter, vec![public, alternate, marker]),
        (&mut granted_elsewhere, vec![public, alternate, marker]),
        (&mut anonymous, vec![public, marker]),
        (&mut not_granted, vec![public, marker]),
    ];
    for (index, (stream, ids)) in expected.into_iter().enumerate() {
        assert_eq!(
            stream.ids_through(&hash(marker)).await,
            hashes(&ids),
            "stream {index}"
        );
    }
    assert_eq!(
        ids_through(&mut events_stream, marker).await,
        vec![public, room_private, both, toto_private, marker],
        "GET /events applies the same grants"
    );

    // RFC 6750 refusals, on the hub and on GET /events.
    for path in [hub.clone(), format!("/events?{selection}")] {
        let response = app
            .get_with(&path, &[("Authorization", "Bearer nonsense")])
            .await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer error="invalid_token""#
        );
        assert_refused(response, 401, "malformed token").await;
        let response = app
            .get_with(&path, &[("Authorization", "Basic dG90bzpwdw==")])
            .await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer error="invalid_request""#
        );
        assert_refused(response, 400, "expected Authorization: Bearer").await;
    }
    let untyped = sign(
        "JWT",
        &json!({"exp": now() + 600,
                "authorization_details": [grant(&["subscribe"], &[exact(ROOM)])]}),
    );
    let response = app
        .get_with(&hub, &[("Authorization", &format!("Bearer {untyped}"))])
        .await;
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_refused(response, 401, "at+jwt").await;
    let expired = sign(
        "at+jwt",
        &json!({"exp": now() - 3600,
                "authorization_details": [grant(&["subscribe"], &[exact(ROOM)])]}),
    );
    let response = app
        .get_with(
            &hub,
            &[("Cookie", &format!("mercureAuthorization={expired}"))],
        )
        .await;
    assert_refused(response, 401, "expired").await;
}

/// With authentication on, a stream without a token is refused (401 `Bearer`) unless
/// `--anonymous-subscribers` is set; with it, an anonymous stream may follow topics (on the hub
/// and on `GET /events`), but not name a consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_subscribers_need_the_setting() {
    let topics = query(&[("topic", ROOM)]);
    let closed = TestApp::builder().jwt_secret(SECRET).start().await;
    for path in [format!("{HUB}?{topics}"), format!("/events?{topics}")] {
        let response = closed.get(&path).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_refused(response, 401, "missing token").await;
    }

    let open = TestApp::builder()
        .jwt_secret(SECRET)
        .with(|config| config.anonymous_subscribers = true)
        .start()
        .await;
    let producer = open.producer().await;
    let mut hub = HubStream::open(open.get(&format!("{HUB}?{topics}")).await).await;
    let mut events = open.stream(&format!("/events?{topics}"), &[]).await;
    let response = open.get(&format!("/events?{topics}&consumer=toto")).await;
    assert_refused(response, 401, "missing token").await;
    let id = add(&producer, &[ROOM], false).await;
    assert_eq!(hub.next().await.id, hash(id));
    assert_eq!(events.next().await.id, id);
}

/// Discovery: `GET /events/{id}` points to the hub with `Link: <...>; rel="mercure"`: its path
/// by default, `--hub-url` when set. And `--hub-url` is the base of relative patterns and
/// topics, and of the reserved namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_point_to_the_hub() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let id = insert(&producer, "toto", "{}").await;
    let response = app.get(&format!("/events/{id}")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["link"],
        r#"</.well-known/mercure>; rel="mercure""#
    );

    const HUB_URL: &str = "https://hub.example.com/.well-known/mercure";
    let app = TestApp::builder()
        .with(|config| config.hub_url = Some(HUB_URL.into()))
        .start()
        .await;
    let producer = app.producer().await;
    // On another host than the hub's: not the relative pattern's below. (A stream opened without
    // Last-Event-ID may still get an event committed just before it opened, if the service had
    // not read it yet: live means "everything committed from now on".)
    let id = add(&producer, &["https://example.com/books/0"], false).await;
    let response = app.get(&format!("/events/{id}")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["link"],
        format!("<{HUB_URL}>; rel=\"mercure\"")
    );

    let mut relative = hub_stream(&app, &[("match_urlpattern", "/books/:id")], &[]).await;
    add(&producer, &["https://example.com/books/1"], false).await; // another host
    let absolute = add(&producer, &["https://hub.example.com/books/1"], false).await;
    let relative_topic = add(&producer, &["/books/2"], false).await;
    assert_eq!(
        relative.ids_through(&hash(relative_topic)).await,
        hashes(&[absolute, relative_topic])
    );
    assert_refused(
        hub_post(
            &app,
            None,
            &[("topic", "https://hub.example.com/.well-known/mercure/x")],
        )
        .await,
        400,
        "namespace",
    )
    .await;
}

/// Event-piper's own tokens (`sub`, `publish`, `types`, minted by `event_piper::auth::mint`) work
/// as before on consumer streams of a table that also holds topic events: the consumer's events
/// (private topic events addressed to it included) and broadcasts, replayed and live, and no
/// topic-only event; a `types` claim still limits them; `publish: true` may publish to topics,
/// a reader's token may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_piper_tokens_keep_working_beside_topics() {
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let producer = app.producer().await;
    let reader = mint(SECRET, "toto", Duration::from_secs(600), false).unwrap();
    let orders = mint_granting(
        SECRET,
        "toto",
        Duration::from_secs(600),
        Grants {
            types: Some("order.*"),
            ..Grants::default()
        },
    )
    .unwrap();
    let backend = mint(SECRET, "backend", Duration::from_secs(600), true).unwrap();

    let add_mix = async || {
        let mut order_ids = Vec::new();
        add(&producer, &[ROOM], false).await;
        add(&producer, &[ROOM], true).await;
        order_ids.push(
            add_event(
                &producer,
                "order.created",
                Some("toto"),
                Some(&[ROOM]),
                true,
                "{}",
            )
            .await,
        );
        insert(&producer, "toto", "{}").await;
        add_event(&producer, "news", None, None, false, "{}").await;
        insert(&producer, "titi", "{}").await;
        order_ids.push(add_event(&producer, "order.paid", Some("toto"), None, false, "{}").await);
        add_event(
            &producer,
            "order.paid",
            None,
            Some(&[OTHER_ROOM]),
            false,
            "{}",
        )
        .await;
        order_ids
    };
    let mut order_ids = add_mix().await;

    let bearer = format!("Bearer {reader}");
    let mut stream = app
        .stream(
            "/events",
            &[("Authorization", &bearer), ("Last-Event-ID", "0")],
        )
        .await;
    let mut typed = app
        .stream(
            &format!("/events?access_token={orders}&last_event_id=0"),
            &[],
        )
        .await;
    order_ids.extend(add_mix().await);
    let marker = add_event(&producer, "order.marker", Some("toto"), None, false, "{}").await;
    order_ids.push(marker);

    assert_eq!(
        ids_through(&mut stream, marker).await,
        ids_for(&producer, "toto").await,
        "the consumer's events and broadcasts, no topic-only event"
    );
    assert_eq!(ids_through(&mut typed, marker).await, order_ids);

    let body = json!({"type": "t", "topics": [ROOM], "payload": {}}).to_string();
    let publish = async |token: &str| {
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {token}")),
        ];
        app.post_events_with(&headers, body.clone()).await
    };
    assert_eq!(publish(&backend).await.status(), 201);
    assert_refused(publish(&reader).await, 403, "may not publish").await;
}

/// A hub subscription without any topic matcher is refused with the hub's own reason (the draft
/// needs at least one `match`), not with a `GET /events` reason about consumers, which the hub
/// does not follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_says_a_subscription_without_a_matcher_lacks_one() {
    let app = TestApp::start().await;
    assert_refused(app.get(HUB).await, 400, "missing topic matcher").await;
    let secured = TestApp::builder().jwt_secret(SECRET).start().await;
    let token = mercure_token(&[grant(&["subscribe"], &[exact(ROOM)])]);
    let response = secured
        .get_with(HUB, &[("Authorization", &format!("Bearer {token}"))])
        .await;
    assert_refused(response, 400, "missing topic matcher").await;
}

/// Inserts an event over SQL with a Mercure publisher's id (type `message`); returns its id.
async fn add_with_update_id(
    producer: &impl tokio_postgres::GenericClient,
    topics: &[&str],
    update_id: &str,
) -> i64 {
    producer
        .query_one(
            "insert into events (type, topics, update_id) values ('message', $1, $2) returning id",
            &[&topics, &update_id],
        )
        .await
        .expect("insert")
        .get(0)
}

/// Replays from the table only: no recent tail to serve them from memory.
fn table_only(config: &mut event_piper::config::Config) {
    config.recent_bytes = 0;
}

/// The publishers' ids the service has indexed, in event order.
async fn indexed_update_ids(producer: &tokio_postgres::Client) -> Vec<String> {
    producer
        .query(
            "select update_id from event_piper_update_ids order by event_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Alternate topics and publishers' ids are looked up in tables the service keeps for them
/// (`src/keys.rs`), not through indexes on `events`. Each way a key can come to be is found by a
/// replay from the table: written while the service ran, written while no instance ran (the next
/// one adds those keys before it publishes anything), and a publisher's id of an event committed
/// but not published yet, because an id in flight before it holds the hub back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternates_and_publishers_ids_are_found_however_they_were_written() {
    let app = TestApp::builder().with(table_only).start().await;
    let url = app.db_url.clone();
    let producer = app.producer().await;
    let room_path = format!("/events?{}", query(&[("topic", ROOM)]));
    let mut room = app.stream(&room_path, &[]).await;
    let live = add(&producer, &[ELSEWHERE, ROOM], false).await;
    let live_urn = add_with_update_id(&producer, &[ELSEWHERE, ROOM], "urn:live").await;
    assert_eq!(room.ids(2).await, vec![live, live_urn]);
    drop(room);
    let mut replayed = app.stream(&room_path, &[("Last-Event-ID", "0")]).await;
    assert_eq!(
        ids_through(&mut replayed, live_urn).await,
        vec![live, live_urn]
    );
    drop(replayed);
    app.stop().await.unwrap();

    // No instance runs.
    let down = add(&producer, &[ELSEWHERE, ROOM], false).await;
    add_with_update_id(&producer, &[ELSEWHERE], "urn:down").await;
    let app = TestApp::builder()
        .database(&url)
        .with(table_only)
        .start()
        .await;
    let mut resumed = app.stream(&room_path, &[("Last-Event-ID", "0")]).await;
    assert_eq!(
        ids_through(&mut resumed, down).await,
        vec![live, live_urn, down]
    );
    let mut after_live = hub_stream(
        &app,
        &[("topic", ELSEWHERE)],
        &[("Last-Event-ID", "urn:live")],
    )
    .await;
    assert_eq!(after_live.resumed_from(), Some("urn:live"));
    assert_eq!(
        after_live.ids_through("urn:down").await,
        vec![hash(down), "urn:down".to_owned()]
    );

    // An id in flight holds the hub back; the event after it, committed, has a publisher's id.
    let mut holder = common::connect(&url).await;
    let in_flight = holder.transaction().await.unwrap();
    let held = add(&in_flight, &[ELSEWHERE], false).await;
    let late = add_with_update_id(&producer, &[ELSEWHERE], "urn:late").await;
    assert!(late > held);
    let mut after_late = hub_stream(
        &app,
        &[("topic", ELSEWHERE)],
        &[("Last-Event-ID", "urn:late")],
    )
    .await;
    assert_eq!(after_late.resumed_from(), Some("urn:late"));
    in_flight.commit().await.unwrap();
    let marker = add(&producer, &[ELSEWHERE], false).await;
    // Resumed after `late`: the held event, below it, is not sent again.
    assert_eq!(after_late.next().await.id, hash(marker));
    assert_eq!(
        after_live.ids_through(&hash(marker)).await,
        vec![hash(held), "urn:late".to_owned(), hash(marker)]
    );
    // The hub writes keys a moment after it publishes (src/keys.rs).
    let indexed = async {
        while indexed_update_ids(&producer).await != ["urn:live", "urn:down", "urn:late"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, indexed)
        .await
        .expect("every publisher's id indexed");
}

/// A table of two versions before: the alternates and publishers' ids had partial indexes on
/// `events` (the schema of then, verbatim). The first start moves the keys of the events there
/// into the service's tables, drops those indexes, and a replay finds the events by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_the_topic_indexes_of_earlier_versions_is_upgraded() {
    let url = common::fresh_database().await;
    let producer = common::connect(&url).await;
    producer
        .batch_execute(include_str!("fixtures/schema-with-topic-indexes.sql"))
        .await
        .unwrap();
    let plain = add(&producer, &[ROOM], false).await;
    let alternate = add(&producer, &[ELSEWHERE, ROOM, ROOM], false).await;
    let urn = add_with_update_id(&producer, &[ELSEWHERE], "urn:old").await;

    let app = TestApp::builder()
        .database(&url)
        .with(table_only)
        .start()
        .await;
    let left = relations_left(
        &producer,
        &[
            "events_alternate_topics_idx",
            "events_update_id_idx",
            "events_topic_id_idx",
        ],
    )
    .await;
    assert_eq!(left, 0, "the old indexes are dropped");
    let mut resumed = app
        .stream(
            &format!("/events?{}", query(&[("topic", ROOM)])),
            &[("Last-Event-ID", "0")],
        )
        .await;
    assert_eq!(
        ids_through(&mut resumed, alternate).await,
        vec![plain, alternate]
    );
    let mut after_old = hub_stream(
        &app,
        &[("topic", ELSEWHERE)],
        &[("Last-Event-ID", "urn:old")],
    )
    .await;
    assert_eq!(after_old.resumed_from(), Some("urn:old"));
    let marker = add(&producer, &[ELSEWHERE], false).await;
    assert_eq!(after_old.next().await.id, hash(marker));
    assert_eq!(indexed_update_ids(&producer).await, ["urn:old"]);
    assert!(urn > alternate);
}

/// A table of the version before: `events` indexed each event's first topic, and the service the
/// others in `event_piper_alternates` (the schema of then, verbatim), up to the mark its hubs had
/// moved past every event. The first start puts every topic into the service's table, drops the
/// old table and the index, and a replay finds the events by either topic, without writing any
/// key again (the mark was already past them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_the_canonical_topic_index_of_the_version_before_is_upgraded() {
    let url = common::fresh_database().await;
    let producer = common::connect(&url).await;
    producer
        .batch_execute(include_str!(
            "fixtures/schema-with-canonical-topic-index.sql"
        ))
        .await
        .unwrap();
    let canonical = add(&producer, &[ROOM], false).await;
    let alternate = add(&producer, &[ELSEWHERE, ROOM, ROOM], false).await;
    // What a hub of that version wrote for them.
    producer
        .execute(
            "insert into event_piper_alternates (topic, event_id) values ($1, $2)",
            &[&ROOM, &alternate],
        )
        .await
        .unwrap();
    producer
        .execute("update event_piper_keyed set upto = $1", &[&alternate])
        .await
        .unwrap();

    let app = TestApp::builder()
        .database(&url)
        .with(table_only)
        .start()
        .await;
    let left = relations_left(
        &producer,
        &["events_topic_id_idx", "event_piper_alternates"],
    )
    .await;
    assert_eq!(left, 0, "the old index and table are dropped");
    let indexes: Vec<String> = producer
        .query(
            "select indexname from pg_indexes where tablename = 'events' order by indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "events_broadcasts_idx",
            "events_pkey",
            "events_subscriber_id_idx"
        ],
        "events keeps the indexes a table of its own would have"
    );
    for (topic, expected) in [
        (ROOM, vec![canonical, alternate]),
        (ELSEWHERE, vec![alternate]),
    ] {
        let mut resumed = app
            .stream(
                &format!("/events?{}", query(&[("topic", topic)])),
                &[("Last-Event-ID", "0")],
            )
            .await;
        assert_eq!(ids_through(&mut resumed, alternate).await, expected);
    }
}

/// A replay of topics from the table reads the stretches of keys two instances wrote as they
/// went (src/keys.rs), and the events past the last, in pages of two rows: a topic has many more stretches than a page reads,
/// the types narrow what the database returns (to few of a topic's events, too), and a consumer's
/// events are merged in. Each instance replays every selected event once, in order, and nothing
/// else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_topics_from_the_table_pages_through_the_keys_of_two_instances() {
    let first = TestApp::builder()
        .batch_size(2)
        .with(table_only)
        .start()
        .await;
    let second = TestApp::builder()
        .database(&first.db_url)
        .batch_size(2)
        .with(table_only)
        .start()
        .await;
    let producer = first.producer().await;
    let (mut expected, mut rare_in_room) = (Vec::new(), Vec::new());
    for n in 0..60 {
        let kind = match n {
            _ if n % 20 == 4 => "rare",
            _ if n % 3 == 2 => "other",
            _ => "message",
        };
        let (subscriber, topics): (Option<&str>, Option<&[&str]>) = match n % 5 {
            0 => (None, Some(&[ROOM])),
            1 => (None, Some(&[ELSEWHERE])),
            2 => (None, Some(&[ELSEWHERE, OTHER_ROOM])),
            3 => (Some("toto"), None),
            _ => (Some("someone"), Some(&[ROOM, OTHER_ROOM])),
        };
        let id = add_event(&producer, kind, subscriber, topics, false, "{}").await;
        if kind == "message" && n % 5 != 1 {
            expected.push(id);
        }
        if kind == "rare" {
            rare_in_room.push(id);
        }
        // Every fifth event, the hubs write what they published: a stretch for each topic.
        if n % 5 == 4 {
            common::keyed_upto(&producer, id).await;
        }
    }
    let last = *expected.last().unwrap();
    let path = format!(
        "/events?{}",
        query(&[("topic", ROOM), ("topic", OTHER_ROOM)])
    );
    let headers = [
        ("Last-Event-ID", "0"),
        ("X-Consumer-Id", "toto"),
        ("X-Event-Types", "message"),
    ];
    let room_path = format!("/events?{}", query(&[("topic", ROOM)]));
    let room_headers = [("Last-Event-ID", "0"), ("X-Event-Types", "rare")];
    let last_rare = *rare_in_room.last().unwrap();
    for app in [&first, &second] {
        let mut replayed = app.stream(&path, &headers).await;
        assert_eq!(ids_through(&mut replayed, last).await, expected);
        // Most of the topic's stretches hold no event of the type: a page's read of them finds
        // fewer rows than it asked for, and must not take that as the end.
        let mut rare = app.stream(&room_path, &room_headers).await;
        assert_eq!(ids_through(&mut rare, last_rare).await, rare_in_room);
    }
    let stretches: i64 = producer
        .query_one(
            "select count(*) from event_piper_topics where topic = $1",
            &[&ROOM],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        stretches > 3,
        "{stretches} stretches of {ROOM}: more than a page reads"
    );
}

/// A write of keys lost with the mark (a crash of the database with `synchronous_commit` off
/// loses its last commits): until the next write, a replay scans the events past the mark; then
/// the writer, finding the mark below what it wrote, writes the keys from the mark on again,
/// from the table, and a replay finds every event by its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_lost_with_the_mark_are_written_again() {
    let app = TestApp::builder().with(table_only).start().await;
    let producer = app.producer().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(add(&producer, &[ROOM], false).await);
    }
    common::keyed_upto(&producer, ids[2]).await;
    producer
        .batch_execute(
            "delete from event_piper_topics; update event_piper_keyed set upto = 0, prev = 0",
        )
        .await
        .unwrap();
    let path = format!("/events?{}", query(&[("topic", ROOM)]));
    let mut scanned = app.stream(&path, &[("Last-Event-ID", "0")]).await;
    assert_eq!(ids_through(&mut scanned, ids[2]).await, ids);

    for _ in 0..2 {
        ids.push(add(&producer, &[ROOM], false).await);
    }
    common::keyed_upto(&producer, ids[4]).await;
    let keyed: Vec<i64> = producer
        .query(
            "select id from event_piper_topics, unnest(ids) as id where topic = $1 order by id",
            &[&ROOM],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keyed, ids);
    let mut replayed = app.stream(&path, &[("Last-Event-ID", "0")]).await;
    assert_eq!(ids_through(&mut replayed, ids[4]).await, ids);
}

/// How many of these tables and indexes are still there (an upgrade drops them).
async fn relations_left(producer: &tokio_postgres::Client, names: &[&str]) -> i64 {
    producer
        .query_one(
            "select count(*) from pg_class where relname = any($1)",
            &[&names],
        )
        .await
        .unwrap()
        .get(0)
}
