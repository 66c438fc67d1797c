//! HTTP/2: over TLS (ALPN `h2`, and `http/1.1` through the same port), h2c with prior knowledge
//! on the plain port, many streams on one connection, the concurrent-stream limit, a client that
//! resets streams as fast as it can, a stream whose client withholds its window, a certificate
//! rotated under open streams, graceful shutdown, and the idle timeout of a connection without
//! streams. Real server, real PostgreSQL, certificates made by the test (`common::tls`).

mod common;

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use common::tls::TestCert;
use common::{PATIENCE, SseClient, TestApp, insert};
use futures::FutureExt;
use h2::RecvStream;
use h2::client::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An h2c connection made with the h2 crate, driven by a task of its own.
struct H2Connection {
    send: SendRequest<Bytes>,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, as the client read it.
    max_streams: usize,
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl H2Connection {
    async fn open(address: &str, builder: &h2::client::Builder) -> H2Connection {
        let tcp = TcpStream::connect(address).await.unwrap();
        let (send, mut connection) = builder.handshake::<_, Bytes>(tcp).await.unwrap();
        // The server's SETTINGS are read once the connection is polled; until then the client
        // assumes no limit.
        let settings = poll_fn(|cx| {
            if let Poll::Ready(result) = connection.poll_unpin(cx) {
                panic!("the connection ended before its settings: {result:?}");
            }
            match connection.max_concurrent_send_streams() {
                usize::MAX => Poll::Pending,
                max => Poll::Ready(max),
            }
        });
        let max_streams = tokio::time::timeout(PATIENCE, settings)
            .await
            .expect("the server's SETTINGS");
        H2Connection {
            send,
            max_streams,
            driver: tokio::spawn(connection),
        }
    }

    /// Opens `GET path`; returns the response's body once its head is in (status 200).
    async fn stream(&self, path: &str, release: bool) -> H2Sse {
        let request = hyper::Request::get(format!("http://localhost{path}"))
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.expect("a stream slot");
        let (response, _) = send.send_request(request, true).expect("sending a request");
        let response = tokio::time::timeout(PATIENCE, response)
            .await
            .expect("a response head")
            .expect("a response");
        assert_eq!(response.status(), 200, "GET {path}");
        H2Sse {
            body: response.into_body(),
            buffer: Vec::new(),
            release,
        }
    }
}

/// An SSE stream read from an h2 stream. `release: false` never hands back flow-control
/// capacity: the client reads nothing, as a stalled tab would, and the stream's window stays
/// shut once the server has filled it.
struct H2Sse {
    body: RecvStream,
    buffer: Vec<u8>,
    release: bool,
}

impl H2Sse {
    /// The next frame's text (up to its blank line).
    async fn frame(&mut self) -> String {
        let read = async {
            loop {
                if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                    let frame: Vec<u8> = self.buffer.drain(..end + 2).collect();
                    return String::from_utf8(frame).unwrap();
                }
                let chunk = self
                    .body
                    .data()
                    .await
                    .expect("the stream ended")
                    .expect("the stream failed");
                if self.release {
                    self.body
                        .flow_control()
                        .release_capacity(chunk.len())
                        .unwrap();
                }
                self.buffer.extend_from_slice(&chunk);
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("another frame")
    }

    /// Waits for the `retry:` hint that tells the stream is live.
    async fn live(mut self) -> H2Sse {
        while !self.frame().await.starts_with("retry:") {}
        self
    }

    /// True once the stream ends (cleanly or not), reading what is left.
    async fn ends(&mut self) -> bool {
        let drain = async { while let Some(Ok(_)) = self.body.data().await {} };
        tokio::time::timeout(PATIENCE, drain).await.is_ok()
    }

    /// The id of the next event (heartbeats skipped).
    async fn next_id(&mut self) -> i64 {
        loop {
            let frame = self.frame().await;
            if let Some(line) = frame.lines().find(|line| line.starts_with("id: ")) {
                return line[4..].parse().unwrap();
            }
        }
    }
}

/// The sum of the open-streams gauge (`event_piper_streams`, every state) in `/metrics`.
fn open_streams(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("event_piper_streams{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the app reports `count` open streams.
async fn until_open_streams(app: &TestApp, count: f64) {
    let wait = async {
        loop {
            if open_streams(&app.metrics().await) == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("the open-streams gauge never came to {count}"));
}

#[tokio::test]
async fn tls_serves_http2_and_http1_chosen_by_alpn() {
    let cert = TestCert::new("alpn");
    let app = TestApp::builder()
        .tls(&cert.cert_path, &cert.key_path)
        .start()
        .await;
    let tls = app.tls_address.clone().unwrap();
    let producer = app.producer().await;
    let url = format!("https://{tls}/events?consumer=alpn");

    let h2 = cert.client().build().unwrap();
    let response = h2.get(&url).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let mut over_h2 = SseClient::from_response(response).await;

    let h1 = cert.client().http1_only().build().unwrap();
    let response = h1.get(&url).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let mut over_h1 = SseClient::from_response(response).await;

    let id = insert(&producer, "alpn", r#"{"n": 1}"#).await;
    assert_eq!(over_h2.next().await.id, id);
    assert_eq!(over_h1.next().await.id, id);

    // The plain port is still plain HTTP/1.1 beside it.
    assert_eq!(
        app.get("/health").await.version(),
        reqwest::Version::HTTP_11
    );
    drop((over_h2, over_h1));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn plain_port_speaks_h2c_with_prior_knowledge() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/events?consumer=h2c", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let mut stream = SseClient::from_response(response).await;
    let id = insert(&producer, "h2c", "{}").await;
    assert_eq!(stream.next().await.id, id);

    // An HTTP/1.1 client on the same port is served as before.
    let mut h1 = app.consume("h2c", None).await;
    let next = insert(&producer, "h2c", "{}").await;
    assert_eq!(h1.next().await.id, next);
    assert_eq!(stream.next().await.id, next);
    drop((stream, h1));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn twenty_streams_share_one_connection() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let connection = H2Connection::open(&app.address(), &h2::client::Builder::new()).await;
    let mut streams = Vec::new();
    for n in 0..20 {
        let stream = connection
            .stream(&format!("/events?consumer=many-{n}"), true)
            .await;
        streams.push(stream.live().await);
    }
    until_open_streams(&app, 20.0).await;
    let mut own = Vec::new();
    for n in 0..20 {
        own.push(insert(&producer, &format!("many-{n}"), "{}").await);
    }
    for (stream, id) in streams.iter_mut().zip(&own) {
        assert_eq!(stream.next_id().await, *id, "each stream its own event");
    }
    drop(streams);
    until_open_streams(&app, 0.0).await;
    app.stop().await.expect("clean shutdown");
}

/// An HTTP/2 frame header: length, type, flags, stream id (RFC 9113, 4.1).
fn frame_header(length: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut header = (length as u32).to_be_bytes()[1..].to_vec();
    header.extend([kind, flags]);
    header.extend(stream.to_be_bytes());
    header
}

#[tokio::test]
async fn the_concurrent_stream_limit_is_announced_and_enforced() {
    let app = TestApp::builder()
        .http2_max_concurrent_streams(3)
        .start()
        .await;
    let connection = H2Connection::open(&app.address(), &h2::client::Builder::new()).await;
    assert_eq!(connection.max_streams, 3, "SETTINGS_MAX_CONCURRENT_STREAMS");
    drop(connection);

    // The h2 crate's client keeps to the limit by itself, so the fourth stream is sent by hand,
    // without waiting for the server's SETTINGS: four HEADERS frames (HPACK: :method GET,
    // :scheme http, :authority and :path as literals), each ending its stream.
    let mut socket = TcpStream::connect(app.address()).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame_header(0, 0x4, 0, 0)); // SETTINGS, none changed
    for stream in [1u32, 3, 5, 7] {
        let path = format!("/events?consumer=limit-{stream}");
        let mut block = vec![0x82, 0x86, 0x41, 9];
        block.extend(b"localhost");
        block.extend([0x44, path.len() as u8]);
        block.extend(path.as_bytes());
        out.extend(frame_header(block.len(), 0x1, 0x4 | 0x1, stream)); // END_HEADERS, END_STREAM
        out.extend(block);
    }
    socket.write_all(&out).await.unwrap();

    // Read frames until the server has answered all four streams one way or the other.
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    let read = async {
        while answered.len() + refused.len() < 4 {
            let mut header = [0u8; 9];
            socket.read_exact(&mut header).await.unwrap();
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let stream = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            socket.read_exact(&mut payload).await.unwrap();
            match header[3] {
                0x1 => answered.push(stream), // HEADERS: a response
                0x3 => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    refused.push((stream, code));
                }
                0x7 => panic!("GOAWAY: {payload:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("answers to the four streams");
    answered.sort();
    assert_eq!(answered, vec![1, 3, 5], "three streams served");
    assert_eq!(
        refused,
        vec![(7, 0x7)],
        "the fourth reset with REFUSED_STREAM"
    );
    drop(socket);
    until_open_streams(&app, 0.0).await;
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn rapid_reset_ends_the_connection_and_leaks_nothing() {
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let mut bystander = app.consume("bystander", None).await;

    // Open a stream and cancel it at once, thousands of times, on one connection.
    let attacker = H2Connection::open(&app.address(), &h2::client::Builder::new()).await;
    let mut sent = 0;
    let mut ended = None;
    for _ in 0..5000 {
        let request = hyper::Request::get("http://localhost/events?consumer=reset")
            .body(())
            .unwrap();
        let outcome = match attacker.send.clone().ready().await {
            Ok(mut send) => send.send_request(request, true).map(drop),
            Err(error) => Err(error),
        };
        // Dropping the response and the request stream resets the stream (CANCEL).
        match outcome {
            Ok(()) => sent += 1,
            Err(error) => {
                ended = Some(error);
                break;
            }
        }
    }
    let driver = tokio::time::timeout(PATIENCE, attacker.driver)
        .await
        .ok()
        .map(|joined| joined.unwrap());
    eprintln!(
        "rapid reset: {sent} streams opened and reset; send error {ended:?}; connection {driver:?}"
    );
    // The server told the client to calm down and closed the connection: either the client
    // saw it while sending, or its connection task ended with it. (The client queues what it
    // sends, so it may have handed all of them to its connection task first.)
    let calm = |error: &h2::Error| error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(
        ended.as_ref().is_some_and(calm) || matches!(&driver, Some(Err(error)) if calm(error)),
        "the flood got a GOAWAY (ENHANCE_YOUR_CALM) after {sent} resets"
    );

    // Everyone else is served, and no stream of the flood is left open.
    let id = insert(&producer, "bystander", "{}").await;
    assert_eq!(bystander.next().await.id, id);
    let fresh = H2Connection::open(&app.address(), &h2::client::Builder::new()).await;
    let mut stream = fresh
        .stream("/events?consumer=after", true)
        .await
        .live()
        .await;
    let id = insert(&producer, "after", "{}").await;
    assert_eq!(stream.next_id().await, id);
    drop((stream, bystander));
    until_open_streams(&app, 0.0).await;
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_stalled_stream_holds_neither_its_connection_nor_its_siblings() {
    // A short write timeout: shutdown waits that long for the stalled stream, then closes it.
    let app = TestApp::builder()
        .write_timeout(Duration::from_secs(1))
        .start()
        .await;
    let producer = app.producer().await;
    const WINDOW: u32 = 2048;
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(WINDOW);
    let connection = H2Connection::open(&app.address(), &builder).await;
    let mut stalled = connection.stream("/events?consumer=stall", false).await;
    let mut reader = connection
        .stream("/events?consumer=stall", true)
        .await
        .live()
        .await;

    // Twenty events of about 1 kB: far more than the stalled stream's window.
    let payload = format!(r#"{{"pad": "{}"}}"#, "x".repeat(1000));
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(insert(&producer, "stall", &payload).await);
    }
    for id in &ids {
        assert_eq!(reader.next_id().await, *id, "the sibling gets every event");
    }
    // A stream opened on the same connection afterwards is served too.
    let mut later = connection
        .stream("/events?consumer=stall", true)
        .await
        .live()
        .await;
    let id = insert(&producer, "stall", "{}").await;
    assert_eq!(reader.next_id().await, id);
    assert_eq!(later.next_id().await, id);

    // The stalled stream got at most its window: nothing beyond it was sent, so it holds at most
    // the server's bounded send buffer. It is still open (parked until its client reads or the
    // connection closes).
    let mut received = 0;
    while let Some(Some(Ok(chunk))) = stalled.body.data().now_or_never() {
        received += chunk.len();
    }
    assert!(
        received <= WINDOW as usize,
        "the stalled stream got {received} bytes, its window is {WINDOW}"
    );
    until_open_streams(&app, 3.0).await;

    // Shutdown ends the streams it can, gives up waiting for the parked one after the write
    // timeout, and returns.
    let stopping = tokio::spawn(app.stop());
    assert!(reader.ends().await, "the reading stream ended");
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("shutdown returned")
        .unwrap()
        .expect("clean shutdown");
}

#[tokio::test]
async fn a_rotated_certificate_is_used_by_new_connections_and_open_streams_go_on() {
    let mut cert = TestCert::new("rotate");
    let app = TestApp::builder()
        .tls(&cert.cert_path, &cert.key_path)
        .with(|config| config.tls_reload_interval = Duration::from_millis(50))
        .start()
        .await;
    let tls = app.tls_address.clone().unwrap();
    let producer = app.producer().await;
    let old_client = cert.client().build().unwrap();
    let response = old_client
        .get(format!("https://{tls}/events?consumer=rotate"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let mut open = SseClient::from_response(response).await;

    let old_ca = cert.ca_pem.clone();
    cert.rotate();
    // A client that trusts only the new CA succeeds once the service presents the new
    // certificate; a fresh connection each try.
    let wait = async {
        loop {
            let client = cert.client().pool_max_idle_per_host(0).build().unwrap();
            if let Ok(response) = client.get(format!("https://{tls}/health")).send().await {
                assert_eq!(response.status(), 200);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the new certificate presented");
    // And one that trusts only the old CA no longer connects afresh.
    let stale = common::tls::client_trusting(&old_ca).build().unwrap();
    let refused = stale.get(format!("https://{tls}/health")).send().await;
    assert!(
        refused.is_err(),
        "the old certificate is no longer presented"
    );

    // The stream opened before the swap is untouched.
    let id = insert(&producer, "rotate", "{}").await;
    assert_eq!(open.next().await.id, id);
    drop(open);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn graceful_shutdown_ends_http2_streams() {
    let cert = TestCert::new("shutdown");
    let app = TestApp::builder()
        .tls(&cert.cert_path, &cert.key_path)
        .start()
        .await;
    let tls = app.tls_address.clone().unwrap();
    let client = cert.client().build().unwrap();
    let mut streams = Vec::new();
    for n in 0..2 {
        let response = client
            .get(format!("https://{tls}/events?consumer=bye-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        streams.push(SseClient::from_response(response).await);
    }
    let stopping = tokio::spawn(app.stop());
    for stream in &mut streams {
        assert!(stream.ends_within(PATIENCE).await, "the stream ended");
    }
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("shutdown returned")
        .unwrap()
        .expect("clean shutdown");
}

#[tokio::test]
async fn a_connection_without_streams_is_closed_and_an_open_stream_keeps_its_own() {
    let idle = Duration::from_millis(300);
    let app = TestApp::builder().http2_idle_timeout(idle).start().await;
    let producer = app.producer().await;
    let builder = h2::client::Builder::new();

    // A connection whose only request has ended gets a GOAWAY once it has been idle long enough.
    let quiet = H2Connection::open(&app.address(), &builder).await;
    let mut health = quiet.stream("/health", true).await;
    assert!(health.ends().await, "the health response ended");
    tokio::time::timeout(PATIENCE, quiet.driver)
        .await
        .expect("the server closed the idle connection")
        .expect("the connection task")
        .expect("a clean close");

    // An open event stream keeps its connection, however long it stays quiet: the connection
    // still takes new streams (after a GOAWAY, the open stream would go on but a new one fail).
    let busy = H2Connection::open(&app.address(), &builder).await;
    let mut stream = busy
        .stream("/events?consumer=h2-idle", true)
        .await
        .live()
        .await;
    tokio::time::sleep(idle * 4).await;
    let mut health = busy.stream("/health", true).await;
    assert!(health.ends().await, "the health response ended");
    let id = insert(&producer, "h2-idle", "{}").await;
    assert_eq!(stream.next_id().await, id);
    assert!(!busy.driver.is_finished(), "the connection is still open");

    // Once the client drops (resets) its last stream, the connection is idle and closed too.
    drop(stream);
    tokio::time::timeout(PATIENCE, busy.driver)
        .await
        .expect("the server closed the connection after its last stream")
        .expect("the connection task")
        .expect("a clean close");
    app.stop().await.expect("clean shutdown");
}
