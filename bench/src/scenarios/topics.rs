//! Scenario 11, topics (`GET /events?topic=`): what a topic stream costs the service beside the
//! consumer stream that did the same job before topics existed. Producers insert the paced
//! `--rate` (1,000) events/s as single-row SQL transactions, each event to one topic
//! (`INSERT INTO events (type, topics, payload) VALUES ('bench', ARRAY['t-k'], ...)`) or, in the
//! peer shapes, to one consumer (the `subscriber` column). Every shape runs on a fresh database and
//! service; `--topic-runs` repeats all four, alternating, to show the noise.
//!
//! (a) `--topics` (1,000) topics × `--topic-streams` (10) streams each, `GET /events?topic=t-k`
//!     with no consumer, the events round robin over the topics; beside it the peer shape of
//!     today: as many consumers × as many streams (`X-Consumer-Id`), the events round robin over
//!     the consumers. 10,000 streams, 10,000 frames/s at the defaults, each event to 10 streams.
//! (b) `--topics` (1,000) streams of which `--topic-streams` (10) follow topic `t-0` and every
//!     other one its own topic `t-1` ... `t-990` that receives nothing; every event goes to `t-0`.
//!     The service's CPU should follow the 10 streams, not the 1,000. Beside it the way before
//!     topics: 1,000 streams of one consumer, of which 10 ask for the published type with
//!     `X-Event-Types: bench.0` and the others for `bench.1`, never published: every event wakes
//!     every stream, and 990 of them drop it.
//!
//! Every stream is checked against the ledger, which records each event's topic (or consumer) and
//! type: exactly the events of its topic (its consumer's of its type), once, in id order, and
//! nothing else (a frame of another topic counts as misrouted). The service's CPU is read from
//! /proc (user + system) from the producers' start until the last frame arrived, and divided by
//! the wall time and by the frames delivered; it is also read for a few seconds with the streams
//! open and no events, which is what the streams cost by themselves (heartbeats).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::FutureExt;
use futures::future::try_join_all;
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, watch};
use tokio_postgres::{Client, Statement};

use super::{Bench, CpuMeter};
use crate::client;
use crate::consumer::{self, Shared};
use crate::delivery::{Arrival, Delivery, DeliverySummary};
use crate::latency::{Recorder, Summary};
use crate::ledger::{Commit, Ledger};
use crate::procfs;
use crate::producer::{self, Produced, Sink, Stamp, Targets};
use crate::progress::Progress;
use crate::report::{Table, count};
use crate::service::Service;
use crate::sse::{Frame, Parser};

/// How long the last frames may take to arrive after the producers stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the service's CPU is read with every stream open and no events.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// The type of every event; the type-filter shape's other streams ask for [`OTHER_TYPE`].
const PUBLISHED_TYPE: &str = "bench.0";
const OTHER_TYPE: &str = "bench.1";

/// One autocommit statement per event, to one topic.
const INSERT_TOPIC: &str = "INSERT INTO events (type, topics, payload) \
     VALUES ($3, ARRAY[$1::text], jsonb_build_object('seq', $2::bigint)) RETURNING id";

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let (topics, per_topic, runs) = (
        bench.args.topics,
        bench.args.topic_streams,
        bench.args.topic_runs.max(1),
    );
    ensure!(topics >= 1, "--topics must be at least 1");
    ensure!(
        (1..=topics).contains(&per_topic),
        "--topic-streams must be 1 to --topics ({topics})"
    );
    let rate = bench.args.rate;
    let mut a: Vec<[Measured; 2]> = Vec::new();
    let mut b: Vec<[Measured; 2]> = Vec::new();
    for round in 1..=runs {
        let topic_a = measure(bench, &format!("bench_topics_a_topic_{round}"), {
            a_topics(topics, per_topic)
        })
        .await?;
        let consumer_a = measure(bench, &format!("bench_topics_a_consumer_{round}"), {
            a_consumers(topics, per_topic)
        })
        .await?;
        a.push([topic_a, consumer_a]);
    }
    for round in 1..=runs {
        let topic_b = measure(bench, &format!("bench_topics_b_topic_{round}"), {
            b_topics(topics, per_topic)
        })
        .await?;
        let filter_b = measure(bench, &format!("bench_topics_b_filter_{round}"), {
            b_type_filter(topics, per_topic)
        })
        .await?;
        b.push([topic_b, filter_b]);
    }
    let a = table(
        format!(
            "11a. topics: {} streams over {topics} topics ({per_topic} each) vs {topics} consumers × {per_topic} connections, {rate} events/s each to one topic / consumer",
            topics * per_topic
        ),
        ["topics", "consumers"],
        rate,
        a,
    );
    let b = table(
        format!(
            "11b. topics: {topics} streams, {per_topic} of them on the events' topic, vs {topics} streams of one consumer, {per_topic} asking for the events' type, {rate} events/s"
        ),
        ["topics", "type filter"],
        rate,
        b,
    );
    Ok(vec![a, b])
}

/// Who receives events: topic `t-k` (the `topics` column) or consumer `top-k` (`subscriber`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Addressing {
    Topic,
    Consumer,
}

struct Shape {
    /// The topics or consumers the producers address, round robin; a stream's owner indexes it.
    targets: Arc<[Arc<str>]>,
    addressing: Addressing,
    streams: Vec<StreamSpec>,
}

#[derive(Debug, Clone)]
struct StreamSpec {
    path: String,
    headers: Vec<(&'static str, Arc<str>)>,
    /// The index in the shape's targets whose events this stream must get; at or beyond its end,
    /// a topic nobody publishes to.
    owner: u32,
    /// The type the stream asks for, as an index in the producers' list (0 is [`PUBLISHED_TYPE`]);
    /// `None`: every type.
    kind: Option<u16>,
}

fn topic_names(count: usize) -> Arc<[Arc<str>]> {
    super::names("t", count)
}

fn topic_stream(topic: usize) -> StreamSpec {
    StreamSpec {
        // The names are the bench's own (`t-N`): nothing to escape in the query.
        path: format!("/events?topic=t-{topic}"),
        headers: Vec::new(),
        owner: topic as u32,
        kind: None,
    }
}

fn consumer_stream(consumer: &Arc<str>, owner: usize, kind: Option<u16>) -> StreamSpec {
    let mut headers = vec![("x-consumer-id", Arc::clone(consumer))];
    if let Some(kind) = kind {
        let name = if kind == 0 {
            PUBLISHED_TYPE
        } else {
            OTHER_TYPE
        };
        headers.push(("x-event-types", Arc::from(name)));
    }
    StreamSpec {
        path: "/events".into(),
        headers,
        owner: owner as u32,
        kind,
    }
}

/// (a) `topics` topics × `per_topic` streams.
fn a_topics(topics: usize, per_topic: usize) -> Shape {
    Shape {
        targets: topic_names(topics),
        addressing: Addressing::Topic,
        streams: (0..topics * per_topic)
            .map(|i| topic_stream(i % topics))
            .collect(),
    }
}

/// (a)'s peer: `consumers` consumers × `per_consumer` streams.
fn a_consumers(consumers: usize, per_consumer: usize) -> Shape {
    let names = super::names("top", consumers);
    Shape {
        streams: (0..consumers * per_consumer)
            .map(|i| consumer_stream(&names[i % consumers], i % consumers, None))
            .collect(),
        targets: names,
        addressing: Addressing::Consumer,
    }
}

/// (b) `streams` streams, `selecting` on `t-0` (every event's topic), the others one topic each.
fn b_topics(streams: usize, selecting: usize) -> Shape {
    Shape {
        targets: topic_names(1),
        addressing: Addressing::Topic,
        streams: (0..streams)
            .map(|i| topic_stream(if i < selecting { 0 } else { 1 + i - selecting }))
            .collect(),
    }
}

/// (b)'s peer: `streams` streams of one consumer, `selecting` asking for the published type.
fn b_type_filter(streams: usize, selecting: usize) -> Shape {
    let names = super::names("top-filter", 1);
    Shape {
        streams: (0..streams)
            .map(|i| consumer_stream(&names[0], 0, Some(if i < selecting { 0 } else { 1 })))
            .collect(),
        targets: names,
        addressing: Addressing::Consumer,
    }
}

/// What one shape's run measured.
struct Measured {
    produced: Produced,
    delivery: DeliverySummary,
    expected: u64,
    latency: Summary,
    drain: Option<Duration>,
    connect_time: Duration,
    /// The service's CPU time from the producers' start to the last frame, and that wall time.
    service_cpu: Duration,
    wall: Duration,
    /// The service's cores with every stream open and no events.
    idle_cores: f64,
    /// All processes' CPU over the same window, for the record.
    cpu: String,
}

impl Measured {
    fn cores(&self) -> f64 {
        self.service_cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Service CPU per delivered frame, in microseconds.
    fn per_frame_us(&self) -> Option<f64> {
        (self.delivery.received > 0)
            .then(|| self.service_cpu.as_secs_f64() * 1e6 / self.delivery.received as f64)
    }

    /// As [`Measured::per_frame_us`], with the idle cost (heartbeats) taken out.
    fn per_frame_above_idle_us(&self) -> Option<f64> {
        let busy = (self.cores() - self.idle_cores).max(0.0) * self.wall.as_secs_f64();
        (self.delivery.received > 0).then(|| busy * 1e6 / self.delivery.received as f64)
    }

    fn errors(&self) -> u64 {
        self.delivery.errors() + self.produced.unrecorded
    }

    fn sustained(&self, rate: f64) -> bool {
        self.produced.rate() >= 0.95 * rate
            && self.drain.is_some_and(|d| d <= Duration::from_secs(1))
    }
}

async fn measure(bench: &Bench, database: &str, shape: Shape) -> Result<Measured> {
    let label = database.trim_start_matches("bench_").replace('_', " ");
    let url = bench.db.fresh(database).await?;
    let service = Service::start(&bench.launch, &url, database).await?;
    let measured = live(bench, &service, &url, label, shape).await;
    service.stop().await?;
    measured
}

/// Opens every stream, waits until all are live, reads the idle cost, produces for `--duration`,
/// waits for the last frame and settles every stream against the ledger.
async fn live(
    bench: &Bench,
    service: &Service,
    url: &str,
    label: String,
    shape: Shape,
) -> Result<Measured> {
    let (rate, duration, producers) = (bench.args.rate, bench.args.duration, bench.args.producers);
    let ledger = Arc::new(Ledger::new(super::live::next_id(url).await?, bench.epoch));
    let shared = Shared::new(Arc::clone(&ledger), true);
    let total = shape.streams.len();
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    // A backstop: every stream task ends by itself at the latest here.
    let deadline = Instant::now() + duration + Duration::from_secs(600);
    let (stop, stop_rx) = watch::channel(false);
    let connecting = Arc::new(Semaphore::new(bench.args.connect_concurrency.max(1)));
    let opened = Instant::now();
    let tasks: Vec<_> = shape
        .streams
        .iter()
        .cloned()
        .map(|spec| {
            tokio::spawn(follow(
                service.addr,
                spec,
                Arc::clone(&shared),
                Arc::clone(&connecting),
                stop_rx.clone(),
                deadline,
            ))
        })
        .collect();
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        label.clone(),
        Arc::clone(&counter),
        Some(Arc::clone(&shared)),
        total,
    );
    let all_live = consumer::wait_until(Duration::from_secs(180), || {
        shared.live.load(Ordering::Relaxed) == total || shared.failed.load(Ordering::Relaxed) > 0
    })
    .await;
    let failed = shared.failed.load(Ordering::Relaxed);
    if failed > 0 || !all_live {
        stop.send_replace(true);
        let mut first = None;
        for task in tasks {
            if let Ok(Report {
                error: Some(error), ..
            }) = task.await
            {
                first.get_or_insert(error);
            }
        }
        bail!(
            "{} of {total} streams live, {failed} failed (first error: {})",
            shared.live.load(Ordering::Relaxed),
            first.as_deref().unwrap_or("none")
        );
    }
    let connect_time = opened.elapsed();

    let idle_from = procfs::cpu(service.pid);
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cores = procfs::cpu(service.pid)
        .saturating_sub(idle_from)
        .as_secs_f64()
        / IDLE_WINDOW.as_secs_f64();
    eprintln!(
        "  {total} streams live in {:.1} s (service idle {idle_cores:.3} cores); producing {rate} events/s for {duration:?}",
        connect_time.as_secs_f64()
    );

    let meter = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let (started, service_from) = (Instant::now(), procfs::cpu(service.pid));
    let targets = Targets {
        consumers: Arc::clone(&shape.targets),
        types: Arc::from([Arc::from(PUBLISHED_TYPE)]),
        ledger: Some(Arc::clone(&ledger)),
        counter,
        stamp: Stamp::Committed,
    };
    let url_owned = url.to_owned();
    let produced = match shape.addressing {
        Addressing::Consumer => {
            bench
                .producers
                .spawn(async move {
                    producer::paced(&url_owned, producers, rate, duration, targets).await
                })
                .await
        }
        Addressing::Topic => {
            bench
                .producers
                .spawn(async move {
                    let sinks =
                        try_join_all((0..producers).map(|_| TopicSink::connect(&url_owned)))
                            .await?;
                    producer::paced_with(sinks, rate, duration, targets).await
                })
                .await
        }
    }
    .context("producer task")??;
    let stopped = Instant::now();
    let expected: u64 = shape
        .streams
        .iter()
        .map(|spec| rows_for(&produced, spec.owner, spec.kind))
        .sum();
    let drain = shared.drained(expected, DRAIN_TIMEOUT, stopped).await;
    let (service_cpu, wall) = (
        procfs::cpu(service.pid).saturating_sub(service_from),
        started.elapsed(),
    );
    let cpu = meter.describe();
    drop(progress);

    stop.send_replace(true);
    let mut delivery = DeliverySummary {
        connections: total,
        ..DeliverySummary::default()
    };
    let mut errors = 0;
    for task in tasks {
        let mut report = match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(report)) => report,
            Ok(Err(error)) => {
                delivery.failed += 1;
                eprintln!("  stream task failed: {error}");
                continue;
            }
            Err(_) => {
                delivery.failed += 1;
                eprintln!("  stream task did not stop within 30 s");
                continue;
            }
        };
        resolve(&mut report, &shared);
        let (lost, foreign) = report
            .delivery
            .settle(&ledger, report.spec.owner, report.spec.kind);
        delivery.received += report.delivery.received;
        delivery.lost += lost;
        delivery.duplicates += report.delivery.duplicates;
        delivery.out_of_order += report.delivery.out_of_order;
        delivery.foreign += foreign + report.delivery.malformed;
        if let Some(error) = report.error {
            delivery.failed += 1;
            if errors < 5 {
                eprintln!("  stream {}: {error}", report.spec.path);
            }
            errors += 1;
        }
    }
    Ok(Measured {
        latency: shared.latencies.summary(),
        produced,
        delivery,
        expected,
        drain,
        connect_time,
        service_cpu,
        wall,
        idle_cores,
        cpu,
    })
}

/// Events produced for target `owner`, of type `kind` only when given; 0 for a target (or type)
/// the producers never addressed.
fn rows_for(produced: &Produced, owner: u32, kind: Option<u16>) -> u64 {
    if owner as usize >= produced.per_consumer.len()
        || kind.is_some_and(|kind| kind as usize >= produced.types)
    {
        return 0;
    }
    produced.rows_for(owner, kind)
}

/// A producer connection inserting single-row autocommit transactions, each to one topic.
struct TopicSink {
    client: Client,
    statement: Statement,
}

impl TopicSink {
    async fn connect(url: &str) -> Result<TopicSink> {
        let client = producer::connect(url).await?;
        let statement = client.prepare(INSERT_TOPIC).await?;
        Ok(TopicSink { client, statement })
    }
}

impl Sink for TopicSink {
    async fn send(&mut self, topic: &str, event_type: &str, seq: i64) -> Result<i64> {
        let row = self
            .client
            .query_one(&self.statement, &[&topic, &seq, &event_type])
            .await
            .context("inserting an event")?;
        Ok(row.try_get(0)?)
    }
}

/// How a stream ended.
struct Report {
    spec: StreamSpec,
    delivery: Delivery,
    /// Frames whose commit time was not yet in the ledger when they arrived: (id, arrival ns).
    unresolved: Vec<(i64, u64)>,
    error: Option<String>,
}

/// Latency samples for frames that overtook the producer's bookkeeping (see consumer.rs).
fn resolve(report: &mut Report, shared: &Shared) {
    let mut recorder = Recorder::new(&shared.latencies);
    for (id, arrived) in report.unresolved.drain(..) {
        if let Commit::At(committed) = shared.ledger.commit(id) {
            recorder.record_nanos(arrived.saturating_sub(committed));
        }
    }
}

/// One stream until `stop` turns true or `deadline` passes.
async fn follow(
    addr: SocketAddr,
    spec: StreamSpec,
    shared: Arc<Shared>,
    connecting: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) -> Report {
    let mut report = Report {
        delivery: Delivery::new(shared.ledger.base()),
        unresolved: Vec::new(),
        error: None,
        spec,
    };
    if let Err(error) = read(addr, &mut report, &shared, connecting, &mut stop, deadline).await {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        report.error = Some(format!("{error:#}"));
    }
    report
}

/// Body frames taken in one go before the shared counters are updated.
const MAX_BATCH: usize = 64;

async fn read(
    addr: SocketAddr,
    report: &mut Report,
    shared: &Shared,
    connecting: Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
    deadline: Instant,
) -> Result<()> {
    let permit = connecting.acquire_owned().await?;
    let path = report.spec.path.clone();
    let headers: Vec<(&str, &str)> = report
        .spec
        .headers
        .iter()
        .map(|(name, value)| (*name, &**value))
        .collect();
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut open = tokio::time::timeout(timeout, client::get(addr, &path, &headers))
        .await
        .map_err(|_| anyhow::anyhow!("no response before the deadline"))??;
    ensure!(
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
        reader.body_frame(frame, report, Instant::now())?;
        for _ in 0..MAX_BATCH {
            match body.frame().now_or_never() {
                Some(frame) => reader.body_frame(frame, report, Instant::now())?,
                None => break,
            }
        }
        reader.flush(Instant::now());
    }
}

struct Reader<'a> {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    parser: Parser,
    recorder: Recorder<'a>,
    shared: &'a Shared,
    /// Event frames not yet added to the shared counter.
    events: u64,
}

impl Reader<'_> {
    fn body_frame(
        &mut self,
        frame: Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>,
        report: &mut Report,
        arrived: Instant,
    ) -> Result<()> {
        let Some(frame) = frame else {
            bail!("the service ended the stream");
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
                let (Some(id), Arrival::InOrder | Arrival::OutOfOrder) = (id, arrival) else {
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

/// One table per shape pair: for each run, each side's delivery check, rate, CPU; then the ratios.
fn table(title: String, names: [&str; 2], rate: f64, runs: Vec<[Measured; 2]>) -> Table {
    let mut table = Table::new(title);
    let several = runs.len() > 1;
    for (round, pair) in runs.iter().enumerate() {
        for (name, m) in names.iter().zip(pair) {
            let label = if several {
                format!("{name} (run {})", round + 1)
            } else {
                (*name).to_owned()
            };
            let produced = &m.produced;
            let delivery = &m.delivery;
            let elapsed = produced.elapsed.as_secs_f64().max(1e-9);
            let errors = m.errors();
            table
                .check(
                    format!("{label}: rate sustained"),
                    format!(
                        "{} events/s committed, {} frames/s delivered",
                        count(produced.rate()),
                        count(delivery.received as f64 / elapsed)
                    ),
                    format!(
                        "{} events/s, all delivered within 1 s of the end",
                        count(rate)
                    ),
                    m.sustained(rate),
                )
                .check(
                    format!(
                        "{label}: frames delivered / expected · lost · dup · out of order · misrouted · failed streams"
                    ),
                    format!(
                        "{} / {} · {} · {} · {} · {} · {}",
                        count(delivery.received as f64),
                        count(m.expected as f64),
                        delivery.lost,
                        delivery.duplicates,
                        delivery.out_of_order,
                        delivery.foreign,
                        delivery.failed
                    ),
                    "all, 0 errors",
                    errors == 0 && delivery.received == m.expected,
                )
                .info(
                    format!("{label}: service CPU per delivered frame (above idle)"),
                    format!(
                        "{} ({})",
                        micros(m.per_frame_us()),
                        micros(m.per_frame_above_idle_us())
                    ),
                )
                .info(
                    format!("{label}: service CPU while producing · idle, streams open"),
                    format!("{:.3} · {:.3} cores", m.cores(), m.idle_cores),
                )
                .info(
                    format!("{label}: latency p50 / p99 / max (commit returned → frame read)"),
                    m.latency.p50_p99_max(),
                )
                .info(
                    format!("{label}: streams live in · CPU"),
                    format!("{:.1} s · {}", m.connect_time.as_secs_f64(), m.cpu),
                );
            table.delivery_errors += errors;
        }
        let [ours, theirs] = pair;
        if let (Some(a), Some(b)) = (ours.per_frame_us(), theirs.per_frame_us()) {
            let label = if several {
                format!(" (run {})", round + 1)
            } else {
                String::new()
            };
            table.info(
                format!(
                    "{} / {} service CPU{label}: per frame · per second",
                    names[0], names[1]
                ),
                format!(
                    "× {:.2} · × {:.2}",
                    a / b.max(1e-9),
                    ours.cores() / theirs.cores().max(1e-9)
                ),
            );
        }
    }
    table
}

fn micros(value: Option<f64>) -> String {
    value.map_or("no frames".into(), |us| format!("{us:.1} µs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_address_what_the_scenario_says() {
        let a = a_topics(4, 3);
        assert_eq!(a.streams.len(), 12);
        assert_eq!(a.streams[5].path, "/events?topic=t-1");
        assert_eq!(a.streams[5].owner, 1);
        assert_eq!(&*a.targets[3], "t-3");

        let b = b_topics(5, 2);
        let paths: Vec<&str> = b.streams.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/events?topic=t-0",
                "/events?topic=t-0",
                "/events?topic=t-1",
                "/events?topic=t-2",
                "/events?topic=t-3"
            ]
        );
        assert_eq!(b.targets.len(), 1);

        let f = b_type_filter(5, 2);
        let kinds: Vec<Option<u16>> = f.streams.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [Some(0), Some(0), Some(1), Some(1), Some(1)]);
        assert_eq!(&*f.streams[4].headers[1].1, OTHER_TYPE);
    }
}
