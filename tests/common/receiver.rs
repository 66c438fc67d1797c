//! A webhook receiver for the tests: a real HTTP server on loopback that verifies every request's
//! Standard Webhooks signature with a library this project did not write, records it, and answers
//! as the test tells it (accept, fail, be slow, answer 410).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

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
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub webhook_id: String,
    pub subscription: i64,
    pub consumer: String,
    /// (id, type, payload) of each event, in the body's order.
    pub events: Vec<(i64, String, serde_json::Value)>,
    /// Whether the receiver answered 2xx.
    pub accepted: bool,
}

struct Inner {
    secret: Option<String>,
    answers: Box<dyn FnMut(usize) -> Answer + Send>,
    requests: Vec<Request>,
    bad_signatures: usize,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    /// A receiver that accepts everything, on 127.0.0.1.
    pub async fn start() -> Receiver {
        let inner = Arc::new(Mutex::new(Inner {
            secret: None,
            answers: Box::new(|_| Answer::Accept),
            requests: Vec::new(),
            bad_signatures: 0,
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&inner));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, inner }
    }

    /// The secret to verify signatures with (the one `POST /subscriptions` returned).
    pub fn verify_with(&self, secret: &str) {
        self.inner.lock().unwrap().secret = Some(secret.to_owned());
    }

    /// How to answer request number n (counted from 0, over the receiver's life).
    pub fn answer(&self, answers: impl FnMut(usize) -> Answer + Send + 'static) {
        self.inner.lock().unwrap().answers = Box::new(answers);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub fn bad_signatures(&self) -> usize {
        self.inner.lock().unwrap().bad_signatures
    }

    /// The ids of the events in accepted requests, in the order they came.
    pub fn accepted_ids(&self) -> Vec<i64> {
        self.requests()
            .iter()
            .filter(|request| request.accepted)
            .flat_map(|request| request.events.iter().map(|(id, _, _)| *id))
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
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut inner = inner.lock().unwrap();
        if let Some(secret) = &inner.secret {
            let verified = standardwebhooks::Webhook::new(secret)
                .and_then(|webhook| webhook.verify(&body, &headers));
            if verified.is_err() {
                inner.bad_signatures += 1;
            }
        }
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
            webhook_id: headers
                .get("webhook-id")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            subscription: json["subscription"].as_i64().expect("subscription"),
            consumer: json["consumer"].as_str().expect("consumer").to_owned(),
            events,
            accepted: matches!(answer, Answer::Accept | Answer::Slow(_)),
        });
        answer
    };
    match answer {
        Answer::Accept => StatusCode::OK.into_response(),
        Answer::Slow(delay) => {
            tokio::time::sleep(delay).await;
            StatusCode::OK.into_response()
        }
        Answer::Status(status, retry_after) => {
            let status = StatusCode::from_u16(status).unwrap();
            match retry_after {
                Some(seconds) => (status, [("retry-after", seconds.to_string())]).into_response(),
                None => status.into_response(),
            }
        }
    }
}
