//! A webhook receiver for the tests: a real HTTP server on loopback that verifies every request's
//! Standard Webhooks signature with the `standardwebhooks` crate (a library this project did not
//! write), records each request with when it arrived, and answers as the test tells it (accept,
//! fail, be slow, answer 410, or hold the answer until the test releases it). It can also go away
//! (stop listening, so that connections are refused) and come back on the same port, and the
//! arrival times let the fault suite tell a repeat explained by a fault from one that is not.
//!
//! Its own accept loop (hyper, not `axum::serve`) because going away must close the listening
//! socket while the port is kept for coming back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use super::PATIENCE;

/// How the receiver answers the next requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    /// 200.
    Accept,
    /// This status (with `Retry-After` if given, in seconds).
    Status(u16, Option<u64>),
    /// Waits this long, then 200 (past the service's timeout, the attempt fails).
    Slow(Duration),
    /// Holds the answer until the test calls [`Receiver::release`], then 200: the test can
    /// change the subscription while the batch is in flight, and know that the answer comes
    /// after the change, with no timing involved.
    Held,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    /// Counted from 0 over the receiver's life, in arrival order.
    pub number: usize,
    pub webhook_id: String,
    pub subscription: i64,
    pub consumer: String,
    /// (id, type, payload) of each event, in the body's order.
    pub events: Vec<(i64, String, serde_json::Value)>,
    pub answer: Answer,
    /// Whether the signature verified; None if it arrived before the test gave the secret.
    pub signature_ok: Option<bool>,
    pub arrived: Instant,
}

impl Request {
    /// Whether the receiver took the events (answered 2xx, in time or not).
    pub fn accepted(&self) -> bool {
        matches!(self.answer, Answer::Accept | Answer::Slow(_) | Answer::Held)
    }

    /// Whether the receiver took the events but answered after `timeout`: the sender counts the
    /// attempt as failed and sends the batch again, under the same webhook-id.
    pub fn late(&self, timeout: Duration) -> bool {
        matches!(self.answer, Answer::Slow(delay) if delay >= timeout)
    }

    /// The ids of its events, in the body's order.
    pub fn ids(&self) -> Vec<i64> {
        self.events.iter().map(|(id, _, _)| *id).collect()
    }
}

type Answers = Box<dyn FnMut(usize) -> Answer + Send>;

struct Inner {
    secret: Option<String>,
    answers: Answers,
    requests: Vec<Request>,
    /// One permit per held answer the test released.
    released: Arc<Semaphore>,
}

/// The server while it listens: stopping it closes the listener at once and lets the requests
/// in progress finish.
struct Serving {
    away: CancellationToken,
    closed: oneshot::Receiver<()>,
}

pub struct Receiver {
    pub url: String,
    address: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    serving: tokio::sync::Mutex<Option<Serving>>,
}

impl Receiver {
    /// A receiver that accepts everything, on 127.0.0.1.
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            secret: None,
            answers: Box::new(|_| Answer::Accept),
            requests: Vec::new(),
            released: Arc::new(Semaphore::new(0)),
        }));
        let serving = serve(listener, Arc::clone(&inner));
        Receiver {
            url: format!("http://{address}/hook"),
            address,
            inner,
            serving: tokio::sync::Mutex::new(Some(serving)),
        }
    }

    /// The secret to verify signatures with (the one `POST /subscriptions` returned).
    pub fn verify_with(&self, secret: &str) {
        self.inner.lock().unwrap().secret = Some(secret.to_owned());
    }

    /// How to answer request number n (counted from 0, over the receiver's life).
    pub fn answer(&self, answers: impl FnMut(usize) -> Answer + Send + 'static) {
        self.inner.lock().unwrap().answers = Box::new(answers);
    }

    /// Lets one held answer (the oldest waiting, or the next to come) go out.
    pub fn release(&self) {
        self.inner.lock().unwrap().released.add_permits(1);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// How many requests came with a signature that did not verify (once the secret was given).
    pub fn bad_signatures(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|request| request.signature_ok == Some(false))
            .count()
    }

    /// The ids of the events in accepted requests, in the order they came.
    pub fn accepted_ids(&self) -> Vec<i64> {
        self.requests()
            .iter()
            .filter(|request| request.accepted())
            .flat_map(Request::ids)
            .collect()
    }

    /// Waits until accepted requests hold at least `count` events; their ids.
    pub async fn wait_for_accepted(&self, count: usize) -> Vec<i64> {
        let wait = async {
            loop {
                let ids = self.accepted_ids();
                if ids.len() >= count {
                    return ids;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(ids) => ids,
            Err(_) => panic!(
                "the receiver got {} of {count} events: {:?}",
                self.accepted_ids().len(),
                self.requests()
            ),
        }
    }

    /// Waits until `until` holds for the requests received so far.
    pub async fn wait_until(&self, what: &str, until: impl Fn(&[Request]) -> bool) {
        let wait = async {
            while !until(&self.requests()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(PATIENCE, wait).await.is_err() {
            panic!("waited in vain for {what}: {:?}", self.requests());
        }
    }

    /// Stops listening: new connections are refused, and the open ones are closed once their
    /// request in progress (if any) is answered. Returns once the port is free.
    pub async fn go_away(&self) {
        let mut serving = self.serving.lock().await;
        if let Some(serving) = serving.take() {
            serving.away.cancel();
            let _ = serving.closed.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&self) {
        let mut serving = self.serving.lock().await;
        if serving.is_some() {
            return;
        }
        // The port was ours a moment ago; binding it again can only race with an unrelated
        // program that grabbed it meanwhile, which is worth a few tries and then a failure.
        for _ in 0..100 {
            match TcpListener::bind(self.address).await {
                Ok(listener) => {
                    *serving = Some(serve(listener, Arc::clone(&self.inner)));
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("the receiver could not listen on {} again", self.address);
    }
}

fn serve(listener: TcpListener, inner: Arc<Mutex<Inner>>) -> Serving {
    let away = CancellationToken::new();
    let (closed_tx, closed) = oneshot::channel();
    let stop = away.clone();
    tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                _ = stop.cancelled() => break,
            };
            let inner = Arc::clone(&inner);
            let service = service_fn(move |request| receive(Arc::clone(&inner), request));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
        drop(listener);
        let _ = closed_tx.send(());
        graceful.shutdown().await;
    });
    Serving { away, closed }
}

async fn receive(
    inner: Arc<Mutex<Inner>>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|body| body.to_bytes()) else {
        return Ok(respond(400, None));
    };
    let (answer, released) = {
        let mut inner = inner.lock().unwrap();
        let signature_ok = inner.secret.as_ref().map(|secret| {
            standardwebhooks::Webhook::new(secret)
                .and_then(|webhook| webhook.verify(&body, &parts.headers))
                .is_ok()
        });
        let number = inner.requests.len();
        let answer = (inner.answers)(number);
        let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
        let events = json["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|event| {
                (
                    event["id"].as_i64().expect("an id"),
                    event["type"].as_str().expect("a type").to_owned(),
                    event["payload"].clone(),
                )
            })
            .collect();
        inner.requests.push(Request {
            number,
            webhook_id: parts
                .headers
                .get("webhook-id")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            subscription: json["subscription"].as_i64().expect("subscription"),
            consumer: json["consumer"].as_str().expect("consumer").to_owned(),
            events,
            answer,
            signature_ok,
            arrived,
        });
        (answer, Arc::clone(&inner.released))
    };
    Ok(match answer {
        Answer::Accept => respond(200, None),
        Answer::Slow(delay) => {
            tokio::time::sleep(delay).await;
            respond(200, None)
        }
        Answer::Status(status, retry_after) => respond(status, retry_after),
        Answer::Held => {
            // Bounded, so that a test that never releases fails instead of hanging.
            match tokio::time::timeout(PATIENCE, released.acquire()).await {
                Ok(Ok(permit)) => {
                    permit.forget();
                    respond(200, None)
                }
                _ => respond(500, None),
            }
        }
    })
}

fn respond(status: u16, retry_after: Option<u64>) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::builder().status(status);
    if let Some(seconds) = retry_after {
        response = response.header("retry-after", seconds.to_string());
    }
    response.body(Full::new(Bytes::new())).unwrap()
}
