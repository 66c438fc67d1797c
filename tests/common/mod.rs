//! Test harness: one throwaway PostgreSQL cluster per test binary, a fresh database per test, the
//! real app in-process on a loopback port, and a small SSE client.
#![allow(dead_code)] // each test binary uses its own part of the harness

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
    pub db_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), event_piper::Error>>>,
}

impl TestApp {
    pub async fn start() -> TestApp {
        TestApp::start_with(&[]).await
    }

    /// Starts the app on a fresh database with extra command-line flags.
    pub async fn start_with(flags: &[&str]) -> TestApp {
        let db_url = fresh_database().await;
        TestApp::start_on(&db_url, flags).await
    }

    /// Starts the app against an existing database.
    pub async fn start_on(db_url: &str, flags: &[&str]) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestApp::start_on_listener(listener, db_url, flags).await
    }

    /// Stops the app and starts it again on the same address and database, as an operator's
    /// restart would (clients see their streams end and reconnect).
    pub async fn restart(self, flags: &[&str]) -> TestApp {
        let (address, db_url) = (self.address(), self.db_url.clone());
        self.stop().await.expect("clean shutdown");
        TestApp::start_at(&address, &db_url, flags).await
    }

    /// Starts the app on a given address (where a stopped one ran) against an existing database.
    pub async fn start_at(address: &str, db_url: &str, flags: &[&str]) -> TestApp {
        let listener = TcpListener::bind(address)
            .await
            .expect("rebinding the address");
        TestApp::start_on_listener(listener, db_url, flags).await
    }

    /// `host:port` the app listens on.
    pub fn address(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    async fn start_on_listener(listener: TcpListener, db_url: &str, flags: &[&str]) -> TestApp {
        let args = [
            "event-piper",
            "--database-url",
            db_url,
            "--listen",
            "127.0.0.1:0",
        ];
        let config = Config::try_parse_from(args.iter().chain(flags)).expect("valid test flags");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(event_piper::serve(
            config,
            db_url.to_owned(),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let app = TestApp {
            base,
            db_url: db_url.to_owned(),
            stop: Some(stop),
            task: Some(task),
        };
        app.wait_until_ready().await;
        app
    }

    /// Polls `GET /ready` until it answers 200.
    pub async fn wait_until_ready(&self) {
        let client = reqwest::Client::new();
        let poll = async {
            loop {
                let response = client.get(format!("{}/ready", self.base)).send().await;
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

    pub async fn producer(&self) -> tokio_postgres::Client {
        connect(&self.db_url).await
    }

    /// A plain GET of `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("GET request")
    }

    /// `GET /events` with the given headers, as sent.
    pub async fn get_events(&self, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = reqwest::Client::new().get(format!("{}/events", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("GET /events")
    }

    /// Opens a stream for `consumer`, resuming after `last_event_id` when given, and waits until
    /// it is live (the service sends `retry:` once the stream's starting point is fixed).
    pub async fn consume(&self, consumer: &str, last_event_id: Option<i64>) -> SseClient {
        let id = last_event_id.map(|id| id.to_string());
        let mut headers = vec![("X-Consumer-Id", consumer)];
        if let Some(id) = &id {
            headers.push(("Last-Event-ID", id));
        }
        let response = self.get_events(&headers).await;
        assert_eq!(response.status(), 200, "GET /events for {consumer}");
        SseClient::from_response(response).await
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

type Body = std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// A minimal SSE reader: frames separated by a blank line, comments and `retry:` noted but not
/// returned as events.
pub struct SseClient {
    body: Body,
    buffer: BytesMut,
    /// Events without an id (service notices), as (event, data), in the order received.
    pub notices: Vec<(String, String)>,
}

enum Block {
    Event(Event),
    Notice(String, String),
    Retry,
    Comment,
}

impl SseClient {
    /// Reads the stream of a `GET /events` response, once it is live.
    pub async fn from_response(response: reqwest::Response) -> SseClient {
        let mut client = SseClient {
            body: Box::pin(response.bytes_stream()),
            buffer: BytesMut::new(),
            notices: Vec::new(),
        };
        client.wait_for_retry().await;
        client
    }

    /// The next frame's text, or None when the stream ended.
    async fn next_block(&mut self) -> Option<Block> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block = self.buffer.split_to(end + 2);
                let text = std::str::from_utf8(&block[..end]).expect("UTF-8 frame");
                return Some(parse_block(text));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(error)) => panic!("stream failed: {error}"),
                None => return None,
            }
        }
    }

    async fn wait_for_retry(&mut self) {
        let wait = async {
            while let Some(block) = self.next_block().await {
                if matches!(block, Block::Retry) {
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
        tokio::time::timeout(within, async {
            loop {
                match self.next_block().await? {
                    Block::Event(event) => return Some(event),
                    Block::Notice(event, data) => self.notices.push((event, data)),
                    Block::Retry | Block::Comment => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
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
                match self.next_block().await {
                    Some(Block::Comment) => count += 1,
                    Some(Block::Event(event)) => panic!("unexpected event {event:?}"),
                    Some(Block::Retry) => {}
                    Some(Block::Notice(event, data)) => panic!("unexpected notice {event} {data}"),
                    None => panic!("the stream ended"),
                }
            }
        })
        .await;
        count
    }

    /// True if the stream ended (cleanly) within `within`.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.next_block().await.is_some() {} })
            .await
            .is_ok()
    }
}

fn parse_block(text: &str) -> Block {
    let mut id = None;
    let mut event = None;
    let mut data = None;
    let mut retry = false;
    for line in text.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => {}
            "id" => id = Some(value.parse().expect("numeric id")),
            "event" => event = Some(value.to_owned()),
            "data" => data = Some(value.to_owned()),
            "retry" => retry = true,
            other => panic!("unexpected SSE field {other:?} in {text:?}"),
        }
    }
    // A frame without an `event:` line is of the default type, as EventSource sees it.
    let event = event.or_else(|| data.is_some().then(|| "message".to_owned()));
    match (id, event, data) {
        (Some(id), Some(event), Some(data)) => Block::Event(Event { id, event, data }),
        (None, Some(event), Some(data)) => Block::Notice(event, data),
        (None, None, None) if retry => Block::Retry,
        (None, None, None) => Block::Comment,
        _ => panic!("incomplete SSE frame {text:?}"),
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
