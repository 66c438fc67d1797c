//! A minimal HTTP/1.1 client: one request per TCP connection, with hyper's low-level API.
//!
//! A full client (pooling, redirects, TLS) would cost memory and CPU per connection that the
//! bench then shares with the service on the same two cores; this is one socket, one hyper
//! connection task and the response body.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// An open response. Dropping it closes the connection.
pub struct Open {
    pub response: Response<Incoming>,
    // Kept so that hyper does not start closing the connection when the request side goes away.
    _sender: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Sends `GET path` with `headers` to `addr` and returns once the response head is in.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Open> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // Frames are small; Nagle would only add latency to the request.
    stream.set_nodelay(true)?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::get(path).header(header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::new())?;
    let response = sender.send_request(request).await?;
    Ok(Open {
        response,
        _sender: sender,
        driver,
    })
}

/// `GET path`'s status, reading (and dropping) a small body.
pub async fn status(addr: SocketAddr, path: &str) -> Result<StatusCode> {
    let mut open = get(addr, path, &[]).await?;
    let status = open.response.status();
    while let Some(frame) = open.response.body_mut().frame().await {
        frame?;
    }
    Ok(status)
}
