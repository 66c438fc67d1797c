//! A webhook receiver inside the bench: an HTTP server on 127.0.0.1 that answers every delivery
//! 200 at once, checks it, and times it.
//!
//! For each request it verifies the Standard Webhooks signature (with the secret the service
//! returned when the subscription was created), reads the event ids from the body, runs them
//! through the same exactly-once, in-order check as an SSE connection, and records a latency
//! sample per event against the ledger. One subscription delivers one batch at a time, so the
//! lock around the check is never contended.
//!
//! It answers 200 even to a request it finds wrong (counted as an error): answering anything else
//! would make the service retry, and the run would measure retries instead of delivery.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde::de::IgnoredAny;
use sha2::Sha256;
use tokio::sync::watch;

use crate::delivery::{Arrival, Delivery, DeliverySummary};
use crate::latency::{Summary, new_histogram};
use crate::ledger::{Commit, Ledger};

/// How long a request waits for the subscription's secret: the service may deliver the first
/// batch before the bench has read the `201` that carries it.
const SECRET_WAIT: Duration = Duration::from_secs(10);

pub struct Receiver {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    /// The key of the subscription being received (`None` until the bench has it).
    key: watch::Sender<Option<Arc<[u8]>>>,
    run: Mutex<Option<Run>>,
    /// Events received in the current run, read by the bench while it waits.
    events: AtomicU64,
    /// Requests that came while no run was armed (must be 0).
    stray: AtomicU64,
}

/// What one run received.
struct Run {
    ledger: Arc<Ledger>,
    consumer: String,
    /// The consumer's index in the ledger.
    index: u32,
    delivery: Delivery,
    latency: Histogram<u64>,
    /// Events that arrived before their producer recorded them: (id, arrival ns).
    unresolved: Vec<(i64, u64)>,
    requests: u64,
    largest: u64,
    bad_signatures: u64,
    /// Bodies that are not a delivery of this consumer.
    malformed: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// What a run received, settled against the ledger.
pub struct Received {
    pub delivery: DeliverySummary,
    pub requests: u64,
    /// The most events one request carried.
    pub largest: u64,
    pub bad_signatures: u64,
    pub malformed: u64,
    pub latency: Summary,
    /// The samples behind `latency`, for merging several receivers' runs.
    pub histogram: Histogram<u64>,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// The highest event id received.
    pub highest: Option<i64>,
}

impl Received {
    pub fn errors(&self) -> u64 {
        self.delivery.errors() + self.bad_signatures + self.malformed
    }

    pub fn describe(&self) -> String {
        format!(
            "{} · bad signatures {} · malformed {}",
            self.delivery.describe(),
            self.bad_signatures,
            self.malformed
        )
    }

    /// Events per request.
    pub fn mean_batch(&self) -> f64 {
        self.delivery.received as f64 / self.requests.max(1) as f64
    }
}

#[derive(Deserialize)]
struct Body {
    consumer: String,
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    id: i64,
    // Read only to prove it is there: the bench's events all have one type.
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    #[serde(rename = "payload")]
    _payload: IgnoredAny,
}

impl Receiver {
    /// Listens on a free loopback port; deliveries go to `url` (`/hook`).
    pub async fn start() -> Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the webhook receiver")?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let shared = Arc::new(Shared {
            key: watch::channel(None).0,
            run: Mutex::new(None),
            events: AtomicU64::new(0),
            stray: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("webhook receiver: {error}");
            }
        });
        Ok(Receiver { url, shared, task })
    }

    /// Forgets the previous run and its secret: nothing is received until [`Receiver::arm`].
    pub fn reset(&self) {
        self.shared.key.send_replace(None);
        *self.lock() = None;
        self.shared.events.store(0, Ordering::Relaxed);
    }

    /// Receives `consumer`'s events (index `index` in `ledger`) from now on.
    pub fn arm(&self, ledger: Arc<Ledger>, consumer: &str, index: u32) {
        *self.lock() = Some(Run {
            delivery: Delivery::new(ledger.base()),
            ledger,
            consumer: consumer.to_owned(),
            index,
            latency: new_histogram(),
            unresolved: Vec::new(),
            requests: 0,
            largest: 0,
            bad_signatures: 0,
            malformed: 0,
            first: None,
            last: None,
        });
    }

    /// The subscription's secret (`whsec_<base64>`), as `POST /subscriptions` returned it.
    pub fn verify_with(&self, secret: &str) -> Result<()> {
        let encoded = secret
            .strip_prefix("whsec_")
            .context("the secret does not start with whsec_")?;
        let key = STANDARD.decode(encoded).context("the secret's base64")?;
        self.shared.key.send_replace(Some(Arc::from(key)));
        Ok(())
    }

    /// Events received in this run so far.
    pub fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    /// Requests that came with no run armed, over the receiver's life.
    pub fn stray(&self) -> u64 {
        self.shared.stray.load(Ordering::Relaxed)
    }

    /// Ends the run and settles it against the ledger: every event of the consumer the ledger
    /// knows must have come, or with `cut`, every one up to the highest id received (the rest
    /// was still on its way when the run was cut).
    pub fn finish(&self, cut: bool) -> Option<Received> {
        let mut run = self.lock().take()?;
        let mut latency = std::mem::replace(&mut run.latency, new_histogram());
        for (id, arrived) in run.unresolved.drain(..) {
            if let Commit::At(committed) = run.ledger.commit(id) {
                latency.saturating_record((arrived.saturating_sub(committed) / 1000).max(1));
            }
        }
        let highest = (run.delivery.received > 0).then(|| run.delivery.last());
        let upto = match (cut, highest) {
            (true, Some(highest)) => highest,
            (true, None) => run.ledger.base() - 1,
            (false, _) => run.ledger.highest(),
        };
        let (lost, foreign) = run.delivery.settle_upto(&run.ledger, run.index, None, upto);
        Some(Received {
            delivery: DeliverySummary {
                connections: 1,
                received: run.delivery.received,
                lost,
                duplicates: run.delivery.duplicates,
                out_of_order: run.delivery.out_of_order,
                foreign: foreign + run.delivery.malformed,
                failed: 0,
            },
            requests: run.requests,
            largest: run.largest,
            bad_signatures: run.bad_signatures,
            malformed: run.malformed,
            latency: Summary::of(&latency),
            histogram: latency,
            first: run.first,
            last: run.last,
            highest,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.shared
            .run
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let arrived = Instant::now();
    let mut key = shared.key.subscribe();
    let key = match tokio::time::timeout(SECRET_WAIT, key.wait_for(Option::is_some)).await {
        Ok(Ok(key)) => key.clone(),
        _ => None,
    };
    let mut run = shared
        .run
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(run) = run.as_mut() else {
        shared.stray.fetch_add(1, Ordering::Relaxed);
        return StatusCode::OK;
    };
    let verified = key.is_some_and(|key| signed(&key, &headers, &body));
    let events = run.take(arrived, verified, &body);
    shared.events.fetch_add(events, Ordering::Relaxed);
    StatusCode::OK
}

impl Run {
    /// One request: checks it and records its events; returns how many it carried.
    fn take(&mut self, arrived: Instant, verified: bool, body: &[u8]) -> u64 {
        self.requests += 1;
        self.first.get_or_insert(arrived);
        self.last = Some(arrived);
        if !verified {
            self.bad_signatures += 1;
        }
        let body = match serde_json::from_slice::<Body>(body) {
            Ok(body) if body.consumer == self.consumer => body,
            _ => {
                self.malformed += 1;
                return 0;
            }
        };
        let now = self.ledger.nanos(arrived);
        for event in &body.events {
            let arrival = self.delivery.observe(Some(event.id));
            if matches!(arrival, Arrival::Duplicate | Arrival::Malformed) {
                continue;
            }
            match self.ledger.commit(event.id) {
                Commit::At(sent) => {
                    let micros = now.saturating_sub(sent) / 1000;
                    self.latency.saturating_record(micros.max(1));
                }
                Commit::Untimed => {}
                Commit::Unknown => self.unresolved.push((event.id, now)),
            }
        }
        let count = body.events.len() as u64;
        self.largest = self.largest.max(count);
        count
    }
}

/// Whether the request carries a valid Standard Webhooks signature: `v1,<base64>` of
/// HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}"), among space-separated others.
fn signed(key: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    signatures
        .split(' ')
        .filter_map(|signature| signature.strip_prefix("v1,"))
        .any(|signature| signature == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_piper::webhook::signing::Secret;

    #[test]
    fn accepts_the_services_signature_and_nothing_else() {
        let secret = Secret::generate();
        let text = secret.to_string();
        let key = STANDARD
            .decode(text.strip_prefix("whsec_").unwrap())
            .unwrap();
        let body = br#"{"subscription":1,"consumer":"hook-0","events":[]}"#;
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "evp_1_0_7".parse().unwrap());
        headers.insert("webhook-timestamp", "1700000000".parse().unwrap());
        let signature = secret.sign("evp_1_0_7", 1_700_000_000, body);
        // A receiver must accept any of several space-separated signatures.
        let header = format!("v1,bm90IGl0 {signature}");
        headers.insert("webhook-signature", header.parse().unwrap());
        assert!(signed(&key, &headers, body));
        assert!(!signed(&key, &headers, b"{}"));
        headers.insert("webhook-timestamp", "1700000001".parse().unwrap());
        assert!(!signed(&key, &headers, body));
    }
}
