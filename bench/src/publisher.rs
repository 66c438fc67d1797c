//! Publishers: HTTP keep-alive connections sending single events with `POST /events`, as a web
//! application would. A `201` means the event is durable; its id (from the `{"ids":[...]}` body)
//! goes into the ledger like a SQL producer's.
//!
//! One socket and hyper's low-level HTTP/1.1 connection per publisher, reused for every request:
//! a pooled client would add its own bookkeeping to each request on the cores the service needs.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::producer::Sink;

pub struct HttpSink {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
    host: HeaderValue,
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl HttpSink {
    pub async fn connect(addr: SocketAddr) -> Result<HttpSink> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting a publisher to {addr}"))?;
        // Each request is one small write: Nagle would hold it back behind the previous ACK.
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(HttpSink {
            sender,
            driver,
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }

    pub async fn connect_all(addr: SocketAddr, count: usize) -> Result<Vec<HttpSink>> {
        futures::future::try_join_all((0..count).map(|_| HttpSink::connect(addr))).await
    }
}

impl Sink for HttpSink {
    async fn send(&mut self, consumer: &str, event_type: &str, seq: i64) -> Result<i64> {
        // Consumer names and types are the bench's own (`prefix-N`, `bench.N`): nothing to escape.
        let body = format!(
            r#"{{"type":"{event_type}","subscriber":"{consumer}","payload":{{"seq":{seq}}}}}"#
        );
        let request = Request::post("/events")
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        self.sender
            .ready()
            .await
            .context("the publishing connection closed")?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status != StatusCode::CREATED {
            bail!(
                "POST /events answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        first_id(&body).with_context(|| {
            format!(
                "no id in the answer to POST /events: {}",
                String::from_utf8_lossy(&body)
            )
        })
    }
}

/// The first id of `{"ids":[12]}`.
fn first_id(body: &[u8]) -> Option<i64> {
    let open = body.iter().position(|&b| b == b'[')?;
    let digits: Vec<u8> = body[open + 1..]
        .iter()
        .copied()
        .skip_while(u8::is_ascii_whitespace)
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_id_of_a_201() {
        assert_eq!(first_id(br#"{"ids":[12]}"#), Some(12));
        assert_eq!(first_id(br#"{"ids": [ 7, 8]}"#), Some(7));
        assert_eq!(first_id(br#"{"ids":[]}"#), None);
        assert_eq!(first_id(b"oops"), None);
    }
}
