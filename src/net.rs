//! The HTTP listener: accepted sockets get TCP_NODELAY and a write timeout.
//!
//! A client that stops reading fills its TCP window; the server's writes then stay pending and,
//! without a bound, the connection (and its stream's memory) would live forever. With the write
//! timeout, a write that makes no progress for that long fails, hyper closes the connection, and
//! everything the stream held is dropped. The client can resume with `Last-Event-ID`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

pub struct StallGuardListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl StallGuardListener {
    pub fn new(inner: TcpListener, write_timeout: Duration) -> Self {
        StallGuardListener {
            inner,
            write_timeout,
        }
    }
}

impl axum::serve::Listener for StallGuardListener {
    type Io = Pin<Box<TimeoutStream<TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop, which also rides out transient errors such as EMFILE.
        let (socket, address) = axum::serve::Listener::accept(&mut self.inner).await;
        // Frames are small and latency matters more than packet count.
        if let Err(error) = socket.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let mut socket = TimeoutStream::new(socket);
        socket.set_write_timeout(Some(self.write_timeout));
        (Box::pin(socket), address)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
