//! A minimal HTTP client: one HTTP/1.1 request per TCP connection, or streams multiplexed on
//! shared h2c connections (HTTP/2 with prior knowledge), with hyper's low-level API.
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
use hyper::client::conn::http2;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// An open response. Dropping it closes the connection (HTTP/1.1) or resets the stream (h2c).
pub struct Open {
    pub response: Response<Incoming>,
    // Kept so that hyper does not start closing the connection when the request side goes away.
    _sender: Option<SendRequest<Empty<Bytes>>>,
    driver: Option<JoinHandle<()>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

/// One h2c connection that several streams share, opened by the first of them.
pub type SharedH2 = std::sync::Arc<tokio::sync::OnceCell<http2::SendRequest<Empty<Bytes>>>>;

/// Sends `GET path` as a stream of the h2c connection `shared` (connecting it first if no stream
/// has yet) and returns once the response head is in.
pub async fn get_h2(
    addr: SocketAddr,
    shared: &SharedH2,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Open> {
    let sender = shared
        .get_or_try_init(|| async {
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            let (sender, connection) =
                http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
            // The connection lives as long as the process: the bench ends it by exiting.
            tokio::spawn(async move {
                let _ = connection.await;
            });
            anyhow::Ok(sender)
        })
        .await?;
    let mut sender = sender.clone();
    sender.ready().await?;
    let mut request = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender.send_request(request.body(Empty::new())?).await?;
    Ok(Open {
        response,
        _sender: None,
        driver: None,
    })
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
        _sender: Some(sender),
        driver: Some(driver),
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
