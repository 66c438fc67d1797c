//! Test harness: one throwaway PostgreSQL cluster per test binary, a fresh database per test, the
//! real app in-process on a loopback port, configured through a typed builder, and an SSE client
//! whose parsing is the `eventsource-stream` crate's; the real binary as a child process
//! ([`process`]) and a webhook receiver ([`receiver`]).
#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod process;
pub mod receiver;
pub mod tls;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use clap::Parser;
use event_piper::Config;
use event_piper::managed_postgres::{ManagedPostgres, OnStop};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for something that should happen before it calls it a failure. Long, as
/// the machine is shared: this bounds a failing test, it does not time a passing one.
pub const PATIENCE: Duration = Duration::from_secs(20);

static CLUSTER: OnceLock<ManagedPostgres> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// This test binary's PostgreSQL, started on first use and removed when the binary exits.
pub fn cluster() -> &'static ManagedPostgres {
    CLUSTER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("event-piper-test-{}", std::process::id()));
        ManagedPostgres::start(&dir, None, OnStop::Remove).expect("starting the test PostgreSQL")
    })
}

/// The in-process service's warnings and errors, into the output the test harness captures: a
/// failing test shows what the service said meanwhile, its libraries included (tower-http logs
/// every 5xx answer as an error). `EVENT_PIPER_TEST_LOG` sets another filter
/// (`tracing_subscriber`'s syntax), e.g. `event_piper=debug` or `off`.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVENT_PIPER_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Only the first call of a test binary installs it; the others find it there.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// A new, empty database on the test cluster; returns its URL.
pub async fn fresh_database() -> String {
    let cluster = tokio::task::spawn_blocking(cluster).await.unwrap();
    let name = format!("test_{}", DATABASES.fetch_add(1, Ordering::Relaxed));
    cluster.create_database(&name).await.unwrap();
    cluster.url(&name)
}

/// A plain client connection, as a producer would open with psql.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting to the test database");
    tokio::spawn(connection);
    client
}

/// The service, running in this process against its own database.
pub struct TestApp {
    pub base: String,
    /// `host:port` of the TLS listener, when the app serves TLS.
    pub tls_address: Option<String>,
    pub db_url: String,
    /// One HTTP client for every request of a test, as a real client would keep one.
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), event_piper::Error>>>,
}

/// How a test wants its app: the service's own [`Config`] with the defaults a user gets, changed
/// only through the typed methods below, plus where it runs.
pub struct TestAppBuilder {
    config: Config,
    database: Option<String>,
    address: Option<String>,
    tls_address: Option<String>,
}

impl TestAppBuilder {
    /// Runs against an existing database instead of a fresh one.
    pub fn database(mut self, url: &str) -> Self {
        self.database = Some(url.to_owned());
        self
    }

    /// Listens on a given `host:port` (where a stopped app ran) instead of a free port.
    pub fn address(mut self, address: &str) -> Self {
        self.address = Some(address.to_owned());
        self
    }

    /// `--tls-cert` and `--tls-key`: also serve TLS (HTTP/2 and HTTP/1.1 by ALPN) on a port of
    /// its own, [`TestApp::tls_address`].
    pub fn tls(mut self, cert: &std::path::Path, key: &std::path::Path) -> Self {
        self.config.tls_cert = Some(cert.to_owned());
        self.config.tls_key = Some(key.to_owned());
        self
    }

    /// The TLS listener's `host:port` (where a stopped app served TLS) instead of a free port.
    pub fn tls_address(mut self, address: &str) -> Self {
        self.tls_address = Some(address.to_owned());
        self
    }

    /// `--batch-size`: rows per query, for live reads and replay pages.
    pub fn batch_size(mut self, rows: u32) -> Self {
        self.config.batch_size = rows;
        self
    }

    /// `--channel-capacity`: frames held per consumer for live delivery.
    pub fn channel_capacity(mut self, frames: u32) -> Self {
        self.config.channel_capacity = frames;
        self
    }

    /// `--heartbeat`: interval between heartbeat comments.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.config.heartbeat = every;
        self
    }

    /// `--idle-after`: how long the hub stays awake after the last event.
    pub fn idle_after(mut self, after: Duration) -> Self {
        self.config.idle_after = after;
        self
    }

    /// `--idle-poll`: how often a sleeping hub reads anyway.
    pub fn idle_poll(mut self, every: Duration) -> Self {
        self.config.idle_poll = every;
        self
    }

    /// `--write-timeout`: how long a write to a client may make no progress.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// `--header-timeout`: how long a client may take to send its request headers.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.config.header_timeout = timeout;
        self
    }

    /// `--max-streams`: streams open at once on the instance.
    pub fn max_streams(mut self, streams: usize) -> Self {
        self.config.max_streams = streams;
        self
    }

    /// `--max-streams-per-consumer`: streams open at once for one consumer.
    pub fn max_streams_per_consumer(mut self, streams: usize) -> Self {
        self.config.max_streams_per_consumer = streams;
        self
    }

    /// `--http2-idle-timeout`: how long an HTTP/2 connection without streams stays open.
    pub fn http2_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.http2_idle_timeout = timeout;
        self
    }

    /// `--http2-max-concurrent-streams`: streams per HTTP/2 connection.
    pub fn http2_max_concurrent_streams(mut self, streams: u32) -> Self {
        self.config.http2_max_concurrent_streams = streams;
        self
    }

    /// `--max-body`: largest accepted body of `POST /events`, in bytes.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config.max_body = bytes;
        self
    }

    /// `--cors-origin`: one more origin allowed to call the API from a browser.
    pub fn cors_origin(mut self, origin: &str) -> Self {
        self.config.cors_origins.push(origin.to_owned());
        self
    }

    /// `--retention`: events older than this are deleted.
    pub fn retention(mut self, keep: Duration) -> Self {
        self.config.retention = Some(keep);
        self
    }

    /// `--max-stream-lifetime`: every stream ends after this long.
    pub fn max_stream_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.max_stream_lifetime = Some(lifetime);
        self
    }

    /// Any other setting: `.with(|config| config.anonymous_subscribers = true)`.
    pub fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self
    }

    /// `--jwt-secret`: turns authentication on with this HS256 secret.
    pub fn jwt_secret(mut self, secret: &str) -> Self {
        self.config.jwt_secret = Some(secret.to_owned());
        self
    }

    /// Webhooks as the tests need them: receivers on loopback allowed, quick retries, and a
    /// quick look for subscriptions to claim.
    pub fn webhooks_for_tests(mut self) -> Self {
        self.config.webhook_allow_private = true;
        self.config.webhook_retry_min = Duration::from_millis(20);
        self.config.webhook_retry_max = Duration::from_millis(200);
        self.config.webhook_poll = Duration::from_millis(100);
        self
    }

    pub fn webhook_timeout(mut self, timeout: Duration) -> Self {
        self.config.webhook_timeout = timeout;
        self
    }

    pub fn webhook_failing_after(mut self, after: Duration) -> Self {
        self.config.webhook_failing_after = after;
        self
    }

    /// Starts the app and waits until it is ready.
    pub async fn start(self) -> TestApp {
        capture_logs();
        let TestAppBuilder {
            mut config,
            database,
            address,
            tls_address,
        } = self;
        let db_url = match database {
            Some(url) => url,
            None => fresh_database().await,
        };
        let listener = TcpListener::bind(address.as_deref().unwrap_or("127.0.0.1:0"))
            .await
            .expect("binding the app's address");
        config.database_url = Some(db_url.clone());
        config.listen = listener.local_addr().unwrap();
        let base = format!("http://{}", config.listen);
        let tls_listener = match config.tls_cert {
            Some(_) => Some(
                TcpListener::bind(tls_address.as_deref().unwrap_or("127.0.0.1:0"))
                    .await
                    .expect("binding the app's TLS address"),
            ),
            None => None,
        };
        let tls_address = tls_listener
            .as_ref()
            .map(|listener| listener.local_addr().unwrap().to_string());
        if let Some(listener) = &tls_listener {
            config.tls_listen = listener.local_addr().unwrap();
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(event_piper::serve_on(
            config,
            db_url.clone(),
            listener,
            tls_listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let app = TestApp {
            base,
            tls_address,
            db_url,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        };
        app.wait_until_ready().await;
        app
    }
}

impl TestApp {
    /// The app with the defaults a user gets, on a fresh database.
    pub async fn start() -> TestApp {
        TestApp::builder().start().await
    }

    /// An app to configure before it starts: `TestApp::builder().batch_size(25).start().await`.
    pub fn builder() -> TestAppBuilder {
        // The defaults come from the service's own flag definitions, so that a test app differs
        // from a user's only in what its test sets.
        let mut config =
            Config::try_parse_from(["event-piper"]).expect("the default configuration");
        // Except the drain: every test that stops an app with streams open would wait for it.
        // tests/drain.rs sets one.
        config.drain_period = Duration::ZERO;
        TestAppBuilder {
            config,
            database: None,
            address: None,
            tls_address: None,
        }
    }

    /// `host:port` the app listens on.
    pub fn address(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    /// Polls `GET /ready` until it answers 200.
    pub async fn wait_until_ready(&self) {
        let poll = async {
            loop {
                let response = self.try_get("/ready", &[]).await;
                if response.is_ok_and(|r| r.status() == 200) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, poll)
            .await
            .expect("the app became ready");
    }

    /// Shuts the app down gracefully and returns how it ended.
    pub async fn stop(mut self) -> Result<(), event_piper::Error> {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .expect("the app task panicked")
    }

    /// The database the app serves, for a second instance or a restart.
    pub fn database_url(&self) -> &str {
        &self.db_url
    }

    pub async fn producer(&self) -> tokio_postgres::Client {
        connect(&self.db_url).await
    }

    /// A GET of `path` with the given headers; Err only if no answer came at all.
    pub async fn try_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = self.http.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await
    }

    /// A GET of `path` with the given headers, as sent.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.try_get(path, headers)
            .await
            .unwrap_or_else(|error| panic!("GET {path}: {error}"))
    }

    /// A plain GET of `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.get_with(path, &[]).await
    }

    /// `GET /events` with the given headers, as sent.
    pub async fn get_events(&self, headers: &[(&str, &str)]) -> reqwest::Response {
        self.get_with("/events", headers).await
    }

    /// A request of `method` on `path`, with a JSON body if given, as sent.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text")
    }

    /// `POST /events` with the given headers and body, as sent.
    pub async fn post_events_with(
        &self,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = self.http.post(format!("{}/events", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).send().await.expect("POST /events")
    }

    /// `POST /events` of `body` as `content_type`.
    pub async fn post_events(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.post_events_with(&[("Content-Type", content_type)], body)
            .await
    }

    /// A GET of `path` (an events stream, with its query) that must answer 200; returns the
    /// stream once it is live.
    pub async fn stream(&self, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let response = self.get_with(path, headers).await;
        assert_eq!(response.status(), 200, "GET {path} {headers:?}");
        SseClient::from_response(response).await
    }

    /// Opens a stream for `consumer`, resuming after `last_event_id` when given, and waits until
    /// it is live (the service sends `retry:` once the stream's starting point is fixed).
    pub async fn consume(&self, consumer: &str, last_event_id: Option<i64>) -> SseClient {
        let id = last_event_id.map(|id| id.to_string());
        let mut headers = vec![("X-Consumer-Id", consumer)];
        if let Some(id) = &id {
            headers.push(("Last-Event-ID", id));
        }
        self.stream("/events", &headers).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One event as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub event: String,
    pub data: String,
}

/// What a read within a time limit came to.
#[derive(Debug)]
pub enum Read {
    Event(Event),
    /// Nothing within the limit; the stream is still open.
    Quiet,
    /// The stream ended, or its connection failed.
    Ended,
}

type Body = std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// An SSE reader over a `GET /events` response. The fields of every frame are parsed by the
/// `eventsource-stream` crate, as an EventSource would; see [`parse_frame`] for what this adds.
pub struct SseClient {
    body: Body,
    buffer: BytesMut,
    /// How far `buffer` is known to hold no blank line.
    scanned: usize,
    /// Events without an id (service notices), as (event, data), in the order received.
    pub notices: Vec<(String, String)>,
    /// The id of the last event read: what an EventSource would send as Last-Event-ID. Notices
    /// carry no `id:` line and leave it as it is.
    pub last_event_id: Option<i64>,
}

/// One frame, as the tests tell them apart.
enum Frame {
    Event(Event),
    /// An event without an `id:` line: a service notice, as (event, data).
    Notice(String, String),
    /// The `retry:` hint that opens every stream.
    Retry,
    /// A comment: the service's heartbeat.
    Comment,
}

impl SseClient {
    /// Reads the stream of a `GET /events` response, once it is live.
    pub async fn from_response(response: reqwest::Response) -> SseClient {
        let mut client = SseClient::new(response);
        client.wait_for_retry().await;
        client
    }

    /// Reads the stream of a `GET /events` response from its first byte, without waiting for it
    /// to go live.
    pub fn new(response: reqwest::Response) -> SseClient {
        SseClient {
            body: Box::pin(response.bytes_stream()),
            buffer: BytesMut::new(),
            scanned: 0,
            notices: Vec::new(),
            last_event_id: None,
        }
    }

    /// The next frame; Ok(None) when the stream ended, Err when its connection failed.
    async fn try_next_frame(&mut self) -> reqwest::Result<Option<Frame>> {
        loop {
            // Frames end with a blank line (the service writes bare LFs). The split is the
            // harness's own: the crate does not tell where a frame ended (see `parse_frame`).
            let from = self.scanned.saturating_sub(1);
            if let Some(end) = self.buffer[from..].windows(2).position(|w| w == b"\n\n") {
                let frame = self.buffer.split_to(from + end + 2);
                self.scanned = 0;
                let text = std::str::from_utf8(&frame).expect("UTF-8 frame");
                return Ok(Some(self.note(parse_frame(text))));
            }
            self.scanned = self.buffer.len();
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(error)) => return Err(error),
                None => return Ok(None),
            }
        }
    }

    /// Keeps the client's state as an EventSource does: the last id, and notices on the side.
    fn note(&mut self, frame: Frame) -> Frame {
        match &frame {
            Frame::Event(event) => self.last_event_id = Some(event.id),
            Frame::Notice(event, data) => self.notices.push((event.clone(), data.clone())),
            Frame::Retry | Frame::Comment => {}
        }
        frame
    }

    /// The next frame, or None when the stream ended; fails the test if the connection failed.
    async fn next_frame(&mut self) -> Option<Frame> {
        self.try_next_frame()
            .await
            .unwrap_or_else(|error| panic!("stream failed: {error}"))
    }

    async fn wait_for_retry(&mut self) {
        let wait = async {
            while let Some(frame) = self.next_frame().await {
                if matches!(frame, Frame::Retry) {
                    return;
                }
            }
            panic!("stream ended before it went live");
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("stream did not go live");
    }

    /// The next event, or None if the stream ends or `within` passes first.
    pub async fn next_within(&mut self, within: Duration) -> Option<Event> {
        match self.read_within(within).await {
            Read::Event(event) => Some(event),
            Read::Quiet | Read::Ended => None,
        }
    }

    /// The next event within `within`, telling a quiet stream from one that ended or failed
    /// (which a client that reconnects on its own handles the same way).
    pub async fn read_within(&mut self, within: Duration) -> Read {
        let next = async {
            loop {
                match self.try_next_frame().await {
                    Ok(Some(Frame::Event(event))) => return Read::Event(event),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return Read::Ended,
                }
            }
        };
        tokio::time::timeout(within, next)
            .await
            .unwrap_or(Read::Quiet)
    }

    /// The next event; fails the test if none comes.
    pub async fn next(&mut self) -> Event {
        self.next_within(PATIENCE)
            .await
            .expect("expected another event")
    }

    /// The ids of the next `count` events.
    pub async fn ids(&mut self, count: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.next().await.id);
        }
        ids
    }

    /// How many heartbeats arrive within `within` (fails the test on an event or the end).
    pub async fn heartbeats_within(&mut self, within: Duration) -> usize {
        let mut count = 0;
        let _ = tokio::time::timeout(within, async {
            loop {
                match self.next_frame().await {
                    Some(Frame::Comment) => count += 1,
                    Some(Frame::Event(event)) => panic!("unexpected event {event:?}"),
                    Some(Frame::Retry) => {}
                    Some(Frame::Notice(event, data)) => panic!("unexpected notice {event} {data}"),
                    None => panic!("the stream ended"),
                }
            }
        })
        .await;
        count
    }

    /// True if the stream ended (cleanly) within `within`.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.next_frame().await.is_some() {} })
            .await
            .is_ok()
    }
}

/// Reads one frame (its text up to and including the blank line that ends it).
///
/// The fields are the crate's to parse: `id:`, `event:` (`message` when absent), `data:`
/// (lines joined), the optional space after the colon, unknown fields ignored. Each frame goes
/// to a parser of its own because of two things the crate, like an EventSource, keeps from its
/// user, and the tests assert:
/// - whether a frame had an `id:` line: a parser that lives across frames reports the previous
///   event's id for a notice without one (the spec's last-event-ID buffer), which would make a
///   notice look like a repeated event. A fresh parser reports `""` for it.
/// - frames without data, which the crate (as the spec says) never dispatches: the `retry:` hint
///   that tells the stream is live and the comments that are heartbeats. Only these are told
///   apart here, by their lines.
fn parse_frame(text: &str) -> Frame {
    use eventsource_stream::Eventsource;
    use futures::FutureExt;

    let mut parser = futures::stream::iter([Ok::<_, std::convert::Infallible>(text)]).eventsource();
    let parsed = parser
        .next()
        .now_or_never()
        .expect("the parser has the whole frame");
    match parsed {
        Some(Ok(event)) if event.id.is_empty() => Frame::Notice(event.event, event.data),
        Some(Ok(event)) => Frame::Event(Event {
            id: event.id.parse().expect("numeric id"),
            event: event.event,
            data: event.data,
        }),
        Some(Err(error)) => panic!("invalid SSE frame {text:?}: {error}"),
        None if text
            .lines()
            .all(|line| line.is_empty() || line.starts_with(':')) =>
        {
            Frame::Comment
        }
        None if text
            .strip_prefix("retry: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .is_some_and(|millis| millis.parse::<u64>().is_ok()) =>
        {
            Frame::Retry
        }
        None => panic!("a frame without data that is neither a comment nor retry: {text:?}"),
    }
}

/// Inserts one event the way EventPiper's README does.
pub async fn insert(
    client: &impl tokio_postgres::GenericClient,
    subscriber: &str,
    payload: &str,
) -> i64 {
    client
        .query_one(
            "INSERT INTO events (type, timestamp, subscriber, payload) \
             VALUES ('insert', now(), $1, $2::text::jsonb) RETURNING id",
            &[&subscriber, &payload],
        )
        .await
        .expect("insert")
        .get(0)
}

/// The ids of the events `consumer` is to receive (its own and the broadcasts, not topic-only
/// events), in id order: what the table says a stream or a webhook subscription must deliver.
pub async fn ids_for(client: &impl tokio_postgres::GenericClient, consumer: &str) -> Vec<i64> {
    client
        .query(
            "SELECT id FROM events WHERE subscriber = $1 OR (subscriber IS NULL AND topics IS NULL) \
             ORDER BY id",
            &[&consumer],
        )
        .await
        .expect("the ids of a consumer's events")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Runs `query` (one row, one column) every 10 ms until `done` holds for its value. After
/// [`PATIENCE`] the test fails, saying what it waited for: `what`.
pub async fn until_value<T>(
    client: &tokio_postgres::Client,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    done: impl Fn(&T) -> bool,
    what: &str,
) where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let wait = async {
        loop {
            let value: T = client.query_one(query, params).await.unwrap().get(0);
            if done(&value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait).await.expect(what);
}

/// Waits until the hubs have written the keys of every event up to `id` (src/keys.rs).
pub async fn keyed_upto(producer: &tokio_postgres::Client, id: i64) {
    let query = "select upto from event_piper_keyed";
    let what = "the hubs write the keys of what they published";
    until_value(producer, query, &[], |upto: &i64| *upto >= id, what).await;
}
