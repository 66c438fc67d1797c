//! The HTTP server loop: accepts connections and serves the router on each, with the bounds a
//! service facing untrusted clients needs.
//!
//! - A write timeout on every socket: a client that stops reading fills its TCP window; the
//!   server's writes then stay pending and, without a bound, the connection (and its stream's
//!   memory) would live forever. With it, a write that makes no progress for that long fails,
//!   the connection closes and everything the stream held is dropped; the client can resume.
//! - A header read timeout (slow-header clients are dropped) and a cap on the header size.
//! - Graceful shutdown: stop accepting, let open connections finish (streams end on their own
//!   when the service stops), then return.
//!
//! HTTP/1.1 only: browsers speak HTTP/2 only over TLS, which a proxy in front terminates, and
//! every open stream's task is sized for the largest connection state it could hold; without
//! HTTP/2 an idle stream costs about 2 kB less (BENCHMARKS.md, scenario 4).

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;
use futures::FutureExt;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;

/// A loopback port that is free now. Whoever binds it a moment later may find it taken: the
/// window is tiny, and a clash fails loudly at start rather than silently.
pub fn free_loopback_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Connection-level bounds.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    pub write_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `app` on `listener` until `shutdown` completes and every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        // hyper refuses less than 8 KiB.
        .max_buf_size(settings.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
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
        let mut socket = TimeoutStream::new(socket);
        socket.set_write_timeout(Some(settings.write_timeout));
        let io = TokioIo::new(Box::pin(socket));
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(io, service);
        let connection = graceful.watch(connection);
        // A combinator, not `async move { connection.await }`: an async block keeps room for the
        // captured connection and for the connection being awaited, doubling the task of every
        // open stream (1,560 bytes instead of 776: an idle stream 9.7 -> 9.0 kB, BENCHMARKS.md).
        tokio::spawn(connection.map(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
