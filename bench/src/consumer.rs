//! One consumer connection: `GET /events` over its own socket, SSE parsing, the delivery check
//! and latency samples.
//!
//! The connection counts as live once it has read the `retry:` frame: from then on the service
//! guarantees that every event committed afterwards reaches it, so producers start only when
//! every connection is live.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, watch};

use crate::client;
use crate::delivery::{Arrival, Delivery};
use crate::latency::{Latencies, Recorder};
use crate::ledger::{Commit, Ledger};
use crate::sse::{Frame, Parser};

/// Who a connection is.
#[derive(Debug, Clone)]
pub struct ConnSpec {
    pub consumer: Arc<str>,
    /// Index of the consumer in the scenario's consumer list (the ledger's owner).
    pub index: u32,
    pub last_event_id: Option<i64>,
    /// Ask for one event type only; `None`: every type.
    pub only_type: Option<OnlyType>,
}

/// A stream that asks for one event type: `GET /events?types={name}`.
#[derive(Debug, Clone)]
pub struct OnlyType {
    /// The type's index in the producers' list, as the ledger records it.
    pub kind: u16,
    pub name: Arc<str>,
}

/// What every connection of a fleet shares: counters for progress and the latency histogram.
pub struct Shared {
    pub ledger: Arc<Ledger>,
    pub latencies: Latencies,
    /// Record latency samples (off for history replay, which has no commit times).
    pub measure_latency: bool,
    pub live: AtomicUsize,
    pub failed: AtomicUsize,
    pub frames: AtomicU64,
    /// Nanoseconds after the ledger's epoch at which the last event frame arrived.
    pub last_frame_ns: AtomicU64,
}

impl Shared {
    /// Waits up to `timeout` until `expected` frames have arrived or a connection failed; the
    /// time since `since` if they all arrived, None otherwise.
    pub async fn drained(
        &self,
        expected: u64,
        timeout: Duration,
        since: Instant,
    ) -> Option<Duration> {
        let all = || self.frames.load(Ordering::Relaxed) >= expected;
        wait_until(timeout, || all() || self.failed.load(Ordering::Relaxed) > 0).await;
        all().then(|| since.elapsed())
    }

    pub fn new(ledger: Arc<Ledger>, measure_latency: bool) -> Arc<Shared> {
        Arc::new(Shared {
            ledger,
            latencies: Latencies::new(),
            measure_latency,
            live: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            frames: AtomicU64::new(0),
            last_frame_ns: AtomicU64::new(0),
        })
    }
}

/// How a connection ended.
pub struct ConnReport {
    pub spec: ConnSpec,
    pub delivery: Delivery,
    /// Frames whose commit time was not yet in the ledger when they arrived: (id, arrival ns).
    pub unresolved: Vec<(i64, u64)>,
    pub error: Option<String>,
}

/// Runs one connection until `stop` turns true or `deadline` passes. `connecting` bounds how many
/// connections are being opened at once: the permit is held until the stream is live.
pub async fn run(
    addr: SocketAddr,
    h2: Option<client::SharedH2>,
    spec: ConnSpec,
    shared: Arc<Shared>,
    connecting: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) -> ConnReport {
    let mut report = ConnReport {
        delivery: Delivery::new(shared.ledger.base()),
        unresolved: Vec::new(),
        error: None,
        spec,
    };
    let result = stream(
        addr,
        h2.as_ref(),
        &mut report,
        &shared,
        connecting,
        &mut stop,
        deadline,
    )
    .await;
    if let Err(error) = result {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        report.error = Some(format!("{error:#}"));
    }
    report
}

async fn stream(
    addr: SocketAddr,
    h2: Option<&client::SharedH2>,
    report: &mut ConnReport,
    shared: &Shared,
    connecting: Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let permit = connecting.acquire_owned().await?;
    let resume = report.spec.last_event_id.map(|id| id.to_string());
    let mut headers = vec![("x-consumer-id", &*report.spec.consumer)];
    if let Some(resume) = &resume {
        headers.push(("last-event-id", resume));
    }
    // The type names are the bench's own (`bench.N`): nothing to escape in the query.
    let path = match &report.spec.only_type {
        Some(only) => format!("/events?types={}", only.name),
        None => "/events".to_owned(),
    };
    let timeout = deadline.saturating_duration_since(Instant::now());
    let open = async {
        match h2 {
            Some(shared) => client::get_h2(addr, shared, &path, &headers).await,
            None => client::get(addr, &path, &headers).await,
        }
    };
    let mut open = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| anyhow::anyhow!("no response before the deadline"))??;
    anyhow::ensure!(
        open.response.status().is_success(),
        "GET {path} answered {}",
        open.response.status()
    );

    let mut reader = Reader {
        permit: Some(permit),
        parser: Parser::default(),
        recorder: Recorder::new(&shared.latencies),
        shared,
        events: 0,
    };
    let body = open.response.body_mut();
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            frame = body.frame() => frame,
        };
        let arrived = Instant::now();
        reader.body_frame(frame, report, arrived)?;
        // Take whatever else is already buffered before touching the shared counters: under load
        // this turns two contended atomic operations per frame into two per batch, which keeps
        // the bench's own cost per frame well below the service's.
        for _ in 0..MAX_BATCH {
            match body.frame().now_or_never() {
                Some(frame) => reader.body_frame(frame, report, Instant::now())?,
                None => break,
            }
        }
        reader.flush(Instant::now());
    }
}

/// Body frames taken in one go before the shared counters are updated.
const MAX_BATCH: usize = 64;

/// The per-connection reading state.
struct Reader<'a> {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    parser: Parser,
    recorder: Recorder<'a>,
    shared: &'a Shared,
    /// Event frames not yet added to the shared counter.
    events: u64,
}

impl Reader<'_> {
    /// Handles one body frame (`None`: the body ended).
    fn body_frame(
        &mut self,
        frame: Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>,
        report: &mut ConnReport,
        arrived: Instant,
    ) -> anyhow::Result<()> {
        let Some(frame) = frame else {
            anyhow::bail!("the service ended the stream");
        };
        let Ok(data) = frame?.into_data() else {
            return Ok(()); // trailers
        };
        let (shared, ledger) = (self.shared, &self.shared.ledger);
        let (permit, recorder, events) = (&mut self.permit, &mut self.recorder, &mut self.events);
        let now = ledger.nanos(arrived);
        self.parser.feed(&data, |frame| match frame {
            Frame::Retry => {
                if permit.take().is_some() {
                    shared.live.fetch_add(1, Ordering::Relaxed);
                }
            }
            Frame::Heartbeat => {}
            Frame::Event(id) => {
                *events += 1;
                let arrival = report.delivery.observe(id);
                if !shared.measure_latency || arrival == Arrival::Malformed {
                    return;
                }
                let (Some(id), true) = (id, arrival != Arrival::Duplicate) else {
                    return;
                };
                match ledger.commit(id) {
                    Commit::At(committed) => recorder.record_nanos(now.saturating_sub(committed)),
                    Commit::Untimed => {}
                    Commit::Unknown => report.unresolved.push((id, now)),
                }
            }
        });
        Ok(())
    }

    fn flush(&mut self, arrived: Instant) {
        if self.events > 0 {
            let shared = self.shared;
            shared.frames.fetch_add(self.events, Ordering::Relaxed);
            shared
                .last_frame_ns
                .fetch_max(shared.ledger.nanos(arrived), Ordering::Relaxed);
            self.events = 0;
        }
    }
}

/// Latency samples for frames that arrived before the producer recorded their commit: looked up
/// again once producers are done. A frame cannot really precede its commit, so such a sample is
/// the producer task's own scheduling delay; it is recorded as the (small or zero) difference.
pub fn resolve(report: &mut ConnReport, shared: &Shared) -> usize {
    let mut recorder = Recorder::new(&shared.latencies);
    let mut missing = 0;
    for (id, arrived) in report.unresolved.drain(..) {
        match shared.ledger.commit(id) {
            Commit::At(committed) => recorder.record_nanos(arrived.saturating_sub(committed)),
            Commit::Untimed => {}
            Commit::Unknown => missing += 1,
        }
    }
    missing
}

/// Waits until `done` holds, checking every 20 ms, for at most `timeout`. True if it held.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
