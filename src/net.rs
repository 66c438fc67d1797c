//! The HTTP server loop: accepts connections and serves the router on each, with the bounds a
//! service facing untrusted clients needs.
//!
//! - A write timeout on every socket: a client that stops reading fills its TCP window; the
//!   server's writes then stay pending and, without a bound, the connection (and its stream's
//!   memory) would live forever. With it, a write that makes no progress for that long fails,
//!   the connection closes and everything the stream held is dropped; the client can resume.
//! - A header read timeout (slow-header clients are dropped) and a cap on the header size.
//! - Graceful shutdown: stop accepting, let open connections finish (streams end on their own
//!   when the service stops; HTTP/2 connections get a GOAWAY), then return.
//!
//! Protocols. The plain port speaks HTTP/1.1, and HTTP/2 to a client that starts with the h2
//! preface ("h2c with prior knowledge": what a proxy in front speaks to its upstreams). The TLS
//! port, when configured ([`crate::tls`]), speaks what ALPN chose: `h2` (browsers, which use
//! HTTP/2 only over TLS) or `http/1.1`.
//!
//! Why the preface is peeked here rather than by hyper-util's `auto` connection: every open
//! HTTP/1.1 stream's task is sized for the largest state its connection future could hold, and
//! a future that could also be an HTTP/2 connection makes every idle HTTP/1.1 stream pay for it
//! (BENCHMARKS.md, "HTTP/2 and TLS"). A short task looks at the first bytes and spawns the plain
//! HTTP/1.1 connection future, exactly as before, or serves HTTP/2.
//!
//! HTTP/2 bounds: at most `--http2-max-concurrent-streams` streams per connection (SETTINGS), a
//! small send buffer per stream (a stream whose client withholds WINDOW_UPDATE holds at most that
//! and its last body chunk; hyper polls the body only once the stream has window, so the stalled
//! stream itself stays open, parked, without costing its connection or its siblings anything),
//! keep-alive pings (a dead client is dropped even when its socket never fills), header lists
//! capped like HTTP/1.1 heads, and the reset-flood limits of the h2 crate set explicitly (rapid
//! reset, CVE-2023-44487: a client that resets streams faster than they are served gets a GOAWAY).
//! Because a parked stream never ends by itself, shutdown waits at most the drain period and
//! `--write-timeout` for HTTP/2 connections to finish before closing them.
//!
//! Idle connections. An HTTP/1.1 connection between requests must send the next head within
//! `--header-timeout`. An HTTP/2 connection answers pings without ever opening a stream, so it
//! is counted in streams instead: one that has had none for `--http2-idle-timeout` gets a GOAWAY
//! and closes, as at shutdown. A stream counts from its request until its response body is
//! dropped, so an open event stream keeps its connection however quiet it is.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures::FutureExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

/// The HTTP/2 client preface: a connection that starts with it speaks HTTP/2 (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes buffered per HTTP/2 stream beyond what its window lets out (hyper's default, 400 kB,
/// would let every stalled stream hold that much). SSE frames are small; a larger one is still
/// sent whole, in pieces as the window opens.
const HTTP2_SEND_BUFFER: usize = 16 * 1024;

/// Streams a client may reset before the server accepted them, per connection, before it gets a
/// GOAWAY (ENHANCE_YOUR_CALM). The h2 crate's own default, set here so that it cannot be lost.
const HTTP2_MAX_PENDING_RESETS: usize = 20;

/// Streams the server may reset because the client broke the protocol on them, per connection,
/// before the connection is closed (RUSTSEC-2024-0003). hyper's default, set explicitly.
const HTTP2_MAX_LOCAL_RESETS: usize = 1024;

/// A loopback port that is free now. Whoever binds it a moment later may find it taken: the
/// window is tiny, and a clash fails loudly at start rather than silently.
pub fn free_loopback_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Connections the kernel queues for `accept` on a listener. A reconnect storm is thousands of
/// connections in the same instant: with std's 128, the rest are dropped and their clients
/// retransmit their SYN a second later, which alone makes the storm's slowest client a second
/// late. Linux caps it at `net.core.somaxconn` (4096 by default since 5.4).
pub const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a listener the way the service needs it: `SO_REUSEADDR` (a restart binds again at
/// once) and a deep accept backlog ([`ACCEPT_BACKLOG`]).
pub fn bind(address: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Connection-level bounds.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    pub write_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// How long an HTTP/2 connection without streams stays open.
    pub http2_idle_timeout: Duration,
    /// How often an idle HTTP/2 connection is pinged; an answer must come within
    /// `write_timeout`.
    pub http2_keep_alive_interval: Duration,
    /// How long open streams take to end once shutdown starts (`--drain-period`).
    pub drain: Duration,
}

/// Where the server accepts connections: the plain port, and the TLS port when configured.
pub struct Listeners {
    pub plain: TcpListener,
    pub tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

/// Serves `app` on `listener` (plain HTTP) until `shutdown` completes and every connection has
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let listeners = Listeners {
        plain: listener,
        tls: None,
    };
    serve_all(listeners, app, settings, shutdown).await
}

/// What every connection task shares: the two protocol builders and the app.
struct Server {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    app: Router,
    settings: ServeSettings,
    /// Cancelled when shutdown starts: HTTP/2 connections send their GOAWAY.
    stopping: CancellationToken,
    /// Cancelled when shutdown has waited long enough: HTTP/2 connections still open close.
    kill: CancellationToken,
}

/// Serves `app` on every listener until `shutdown` completes and every connection has closed.
pub async fn serve_all(
    listeners: Listeners,
    app: Router,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        // hyper refuses less than 8 KiB.
        .max_buf_size(settings.max_header_bytes.max(8192));
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_send_buf_size(HTTP2_SEND_BUFFER)
        .keep_alive_interval(settings.http2_keep_alive_interval)
        .keep_alive_timeout(settings.write_timeout)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_RESETS);
    let server = Arc::new(Server {
        http1,
        http2,
        app,
        settings,
        stopping: CancellationToken::new(),
        kill: CancellationToken::new(),
    });
    let Listeners { plain, tls } = listeners;
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tls_accept = async {
            match &tls {
                Some((listener, _)) => listener.accept().await,
                None => std::future::pending().await,
            }
        };
        let (accepted, secure) = tokio::select! {
            accepted = plain.accept() => (accepted, false),
            accepted = tls_accept => (accepted, true),
            _ = &mut shutdown => break,
        };
        let socket = match accepted {
            Ok((socket, _peer)) => socket,
            Err(error) => {
                // Out of file descriptors or a connection reset before accept: not fatal. Pause
                // briefly so that a full descriptor table does not turn into a busy loop.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Frames are small and latency matters more than packet count.
        let _ = socket.set_nodelay(true);
        let watcher = graceful.watcher();
        match &tls {
            Some((_, acceptor)) if secure => {
                tokio::spawn(Arc::clone(&server).tls(socket, acceptor.clone(), watcher));
            }
            _ => {
                tokio::spawn(Arc::clone(&server).plain(socket, watcher));
            }
        }
    }
    drop(plain);
    drop(tls);
    server.stopping.cancel();
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => {}
        _ = tokio::time::sleep(settings.drain + settings.write_timeout) => {
            // Only an HTTP/2 stream whose client withholds its window gets here: its body is not
            // polled, so it cannot see the service stopping.
            tracing::info!("closing the HTTP/2 connections whose streams did not end");
            server.kill.cancel();
            drained.await;
        }
    }
    Ok(())
}

impl Server {
    /// The socket with the write timeout every connection gets.
    fn timed(&self, socket: TcpStream) -> std::pin::Pin<Box<TimeoutStream<TcpStream>>> {
        let mut socket = TimeoutStream::new(socket);
        socket.set_write_timeout(Some(self.settings.write_timeout));
        Box::pin(socket)
    }

    fn service(&self) -> TowerToHyperService<Router> {
        TowerToHyperService::new(self.app.clone())
    }

    /// A plain connection: HTTP/2 if it starts with the preface, else HTTP/1.1.
    async fn plain(self: Arc<Self>, socket: TcpStream, watcher: Watcher) {
        let h2 = tokio::time::timeout(self.settings.header_timeout, starts_with_preface(&socket));
        match h2.await {
            Ok(Ok(true)) => {
                let io = self.timed(socket);
                self.serve_http2(io, watcher).await;
            }
            Ok(Ok(false)) => {
                let io = TokioIo::new(self.timed(socket));
                let connection = watcher.watch(self.http1.serve_connection(io, self.service()));
                // A task of its own, and a combinator rather than `async move {
                // connection.await }`: an async block keeps room for the captured connection and
                // for the connection being awaited, doubling the task of every open stream
                // (1,560 bytes instead of 776: an idle stream 9.7 -> 9.0 kB, BENCHMARKS.md).
                tokio::spawn(connection.map(log_end));
            }
            Ok(Err(error)) => tracing::debug!(%error, "reading a new connection failed"),
            Err(_) => tracing::debug!("a connection sent nothing within the header timeout"),
        }
    }

    /// A TLS connection: the handshake (within the header timeout), then the protocol ALPN chose.
    async fn tls(
        self: Arc<Self>,
        socket: TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
        watcher: Watcher,
    ) {
        let handshake = acceptor.accept(self.timed(socket));
        let stream = match tokio::time::timeout(self.settings.header_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return tracing::debug!(%error, "TLS handshake failed"),
            Err(_) => return tracing::debug!("TLS handshake not done within the header timeout"),
        };
        if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            self.serve_http2(stream, watcher).await;
        } else {
            let connection = self
                .http1
                .serve_connection(TokioIo::new(stream), self.service());
            log_end(watcher.watch(connection).await);
        }
    }

    /// Serves HTTP/2 on `io` until the connection ends, or shutdown gave up waiting for it. It
    /// is closed gracefully (GOAWAY: streams open go on, no new one starts) when shutdown starts
    /// or when it has had no stream for the idle timeout. `_watcher` is held, not used to close
    /// the connection (it cannot tell idleness): shutdown waits until it is dropped.
    async fn serve_http2<I>(&self, io: I, _watcher: Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let open = watch::Sender::new(0);
        let service = CountedStreams {
            inner: self.service(),
            open: open.clone(),
        };
        let connection = self.http2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => return log_end(result),
                _ = self.stopping.cancelled(), if !closing => {}
                _ = idle_for(&open, self.settings.http2_idle_timeout), if !closing => {
                    tracing::debug!("closing an HTTP/2 connection without streams");
                }
                _ = self.kill.cancelled() => return,
            }
            connection.as_mut().graceful_shutdown();
            closing = true;
        }
    }
}

/// The router, counting the streams of one HTTP/2 connection in `open`: each from its request
/// until its response body is dropped (ended, reset by the client, or the connection gone).
struct CountedStreams {
    inner: TowerToHyperService<Router>,
    open: watch::Sender<usize>,
}

impl Service<hyper::Request<hyper::body::Incoming>> for CountedStreams {
    type Response = hyper::Response<CountedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let stream = OpenStream::new(&self.open);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| CountedBody {
                body,
                _stream: stream,
            }))
        })
    }
}

/// One stream counted in its connection's `open`, for as long as this lives.
struct OpenStream(watch::Sender<usize>);

impl OpenStream {
    fn new(open: &watch::Sender<usize>) -> OpenStream {
        open.send_modify(|count| *count += 1);
        OpenStream(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

/// A response body that keeps its stream counted until it is dropped.
struct CountedBody {
    body: Body,
    _stream: OpenStream,
}

impl HttpBody for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Completes once `open` has counted no stream for `timeout` in a row.
async fn idle_for(open: &watch::Sender<usize>, timeout: Duration) {
    let mut count = open.subscribe();
    loop {
        // The sender lives as long as the caller, so neither wait can fail.
        let _ = count.wait_for(|open| *open == 0).await;
        let busy = count.wait_for(|open| *open > 0);
        if tokio::time::timeout(timeout, busy).await.is_err() {
            return;
        }
    }
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Whether the client's first bytes are the HTTP/2 preface; they stay in the socket for the
/// protocol to read. False as soon as they differ from it (an HTTP/1.1 request line), or at EOF.
async fn starts_with_preface(socket: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let read = socket.peek(&mut first).await?;
        if read == 0 || first[..read] != H2_PREFACE[..read] {
            return Ok(false);
        }
        if read == H2_PREFACE.len() {
            return Ok(true);
        }
        // Only part of the preface has arrived (clients send it in one write, so this is rare):
        // peek would return the same bytes at once, so give the rest a moment.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
