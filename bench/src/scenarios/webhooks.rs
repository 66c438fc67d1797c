//! Scenario 10, webhooks: one consumer's events delivered to one local receiver (the bench's own,
//! [`crate::receiver`]) through a subscription. The issue asks for events/s with batching (goal:
//! at least 20,000 events/s) and without (batch_size 1), latency to the receiver, and the database
//! statements per delivered batch.
//!
//! - (a) backlog: `--webhook-backlog` events already in the table, then a subscription from
//!   before them, for each of `--webhook-batch-sizes`: the delivery path alone (page read, two
//!   writes and one POST per batch), no producer competing for the cores.
//! - (b) live: `--webhook-producers` single-row producers as fast as they go for `--duration`,
//!   for each batch size: what the receiver acknowledged while they ran, against what committed.
//! - (c) latency: `--rate` events/s from `--producers` connections, batch_size 100, with one SSE
//!   stream of the same consumer beside the receiver as the reference; both timed from the insert
//!   being sent, against the same ledger.
//! - (d) statements: pg_stat_statements (which restarts the managed cluster, so it comes last)
//!   over (a) at batch_size 100 and over (c), by kind, per batch the receiver acknowledged.
//!
//! Every run checks that the receiver got each of the consumer's events once, in order, under a
//! valid signature, and that the subscription's stored position and count agree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::live::{self, Plan};
use super::{Bench, CpuMeter};
use crate::consumer;
use crate::database;
use crate::latency::ms;
use crate::ledger::Ledger;
use crate::producer::{self, Produced, Stamp, Targets};
use crate::receiver::{Received, Receiver};
use crate::report::{Table, count};
use crate::service::{Launch, Service};

/// The one consumer every shape delivers.
const CONSUMER: &str = "hook-0";

/// The batch size of the latency shape: the API's default.
const LATENCY_BATCH: i32 = 100;

/// The goal for a batching subscription.
const GOAL: f64 = 20_000.0;

/// How long a backlog may take to reach the receiver before the run gives up on it.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(180);

/// How long the receiver may take to catch up once live producers stop. A subscription slower
/// than its producers (batch_size 1) would take minutes; the run is cut there and what had
/// arrived is checked up to the last id received.
const CATCH_UP: Duration = Duration::from_secs(10);

/// History rows per transaction when filling a backlog.
const HISTORY_CHUNK: u64 = 10_000;

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let receiver = Receiver::start().await?;
    eprintln!("  webhook receiver at {}", receiver.url);
    let mut launch = bench.launch.clone();
    // The receiver is on loopback, which subscriptions may not reach by default.
    launch.extra_args.push("--webhook-allow-private".into());
    let sizes = bench.args.webhook_batch_sizes.clone();

    let mut backlog = Table::new(format!(
        "10a. webhooks, backlog: {} events in the table, one subscription from before them, one local receiver",
        count(bench.args.webhook_backlog as f64)
    ));
    for &size in &sizes {
        let drained = drain_backlog(bench, &launch, &receiver, size, false).await?;
        drained.describe(&mut backlog, size);
    }
    backlog.note(
        "Timed from POST /subscriptions sent to the last batch's arrival at the receiver. \
         batch_size 1 delivers a twentieth of the backlog (the same path, one event a batch).",
    );

    let mut flood = Table::new(format!(
        "10b. webhooks, live: {} single-row producers as fast as they go (synchronous_commit on), one local receiver",
        bench.args.webhook_producers
    ));
    for &size in &sizes {
        let flooded = live_flood(bench, &launch, &receiver, size).await?;
        flooded.describe(&mut flood, size);
    }
    flood.note(format!(
        "Acknowledged/s counts what the receiver got while producers ran. If the receiver had not \
         caught up {} after they stopped, the run is cut and checked up to the last id received.",
        humantime::format_duration(CATCH_UP)
    ));

    let mut latency = Table::new(format!(
        "10c. webhooks, latency: {} events/s, single-row transactions from {} connections, batch_size {LATENCY_BATCH}, beside one SSE stream of the same consumer",
        bench.args.rate, bench.args.producers
    ));
    let paced = paced_with_stream(bench, &launch, &receiver, false).await?;
    paced.describe(&mut latency);

    let mut cost = Table::new(
        "10d. webhooks, database statements per delivered batch (pg_stat_statements)".to_owned(),
    );
    if bench.db.enable_statement_stats().await? {
        let drained = drain_backlog(bench, &launch, &receiver, LATENCY_BATCH, true).await?;
        cost.info(
            "backlog, batch_size 100: events/s acknowledged (pg_stat_statements loaded)",
            format!(
                "{} events/s ({:.0} µs a batch)",
                count(drained.rate()),
                1e6 / drained.requests_per_second().max(1e-9)
            ),
        );
        describe_statements(&mut cost, "backlog, batch_size 100", &drained.run);
        let paced = paced_with_stream(bench, &launch, &receiver, true).await?;
        describe_statements(
            &mut cost,
            &format!("{} events/s, batch_size 100", bench.args.rate),
            &paced.run,
        );
        cost.note(
            "Writes: begin = the batch recorded before it is sent (pending_upto), delivered = \
             the position moved after the 2xx. Page reads: the consumer's events and broadcasts \
             from the table (the follower's replay; the SSE stream's own in the paced run). Hub \
             reads: new events after the published id, shared by every stream and subscription. \
             Behind counts: the delivery's count of what is left, every 5 s while behind. \
             Subscription reads: the supervisor's claims and looks, and the bench's GET.",
        );
    } else {
        cost.info(
            "statements",
            "pg_stat_statements unavailable (external database)",
        );
    }
    let stray = receiver.stray();
    cost.check(
        "requests with no run armed",
        stray.to_string(),
        "0",
        stray == 0,
    );
    cost.delivery_errors += stray;

    let mut tables = vec![backlog, flood, latency, cost];
    for table in &mut tables {
        table.note(format!(
            "One subscription (consumer {CONSUMER}) to the bench's receiver on 127.0.0.1, which \
             answers 200 at once and checks every request: signature, ids once and in order."
        ));
    }
    Ok(tables)
}

/// What one run did, whatever its shape.
struct RunOutcome {
    received: Received,
    /// The subscription's stored `position` and `delivered` afterwards.
    shown: Value,
    /// Events the receiver may hold beyond the stored count: a run cut while a batch was in
    /// flight stopped the service before the batch's acknowledgement was written (it would be
    /// sent again, under the same webhook-id, after a restart).
    in_flight: u64,
    cpu: String,
    /// Statements the service ran, when counted.
    statements: Option<Statements>,
}

impl RunOutcome {
    fn errors(&self) -> u64 {
        self.received.errors() + u64::from(!self.stored_agrees())
    }

    /// The subscription's stored position and count are what the receiver got (but for a batch
    /// in flight when a run was cut).
    fn stored_agrees(&self) -> bool {
        let received = &self.received;
        let (Some(delivered), Some(position)) = (
            self.shown["delivered"].as_u64(),
            self.shown["position"].as_i64(),
        ) else {
            return false;
        };
        let (got, highest) = (received.delivery.received, received.highest.unwrap_or(0));
        if self.in_flight == 0 {
            delivered == got && position >= highest
        } else {
            delivered <= got && got - delivered <= self.in_flight && position <= highest
        }
    }

    /// The checks every shape reports.
    fn check(&self, table: &mut Table, label: &str) {
        let received = &self.received;
        table.check(
            format!("{label}: exactly once, in order, signed"),
            received.describe(),
            "all 0",
            received.errors() == 0,
        );
        table.check(
            format!("{label}: subscription's stored delivered · position"),
            format!(
                "{} · {} (receiver: {} events, last id {})",
                self.shown["delivered"],
                self.shown["position"],
                count(received.delivery.received as f64),
                received.highest.map_or("none".into(), |id| id.to_string())
            ),
            "agree",
            self.stored_agrees(),
        );
        table.delivery_errors += self.errors();
    }
}

/// Shape (a): the backlog's events/s.
struct Drained {
    events: u64,
    /// From POST /subscriptions sent to the last batch's arrival.
    took: Option<Duration>,
    /// From POST /subscriptions sent to the first batch's arrival.
    first_after: Option<Duration>,
    run: RunOutcome,
}

impl Drained {
    fn rate(&self) -> f64 {
        self.took.map_or(0.0, |took| {
            self.run.received.delivery.received as f64 / took.as_secs_f64()
        })
    }

    fn describe(&self, table: &mut Table, size: i32) {
        let label = format!("batch_size {size}");
        let received = &self.run.received;
        let value = format!(
            "{} events/s ({} of {} events in {}; first batch after {})",
            count(self.rate()),
            count(received.delivery.received as f64),
            count(self.events as f64),
            self.took.map_or("never".into(), ms),
            self.first_after.map_or("never".into(), ms),
        );
        if size >= LATENCY_BATCH {
            table.check(
                format!("{label}: events/s acknowledged"),
                value,
                format!("≥ {}", count(GOAL)),
                self.rate() >= GOAL,
            );
        } else {
            table.info(format!("{label}: events/s acknowledged"), value);
        }
        table
            .info(
                format!("{label}: requests · events a request (mean, largest)"),
                format!(
                    "{} · {:.1}, {} · {:.0} requests/s ({} µs a batch)",
                    count(received.requests as f64),
                    received.mean_batch(),
                    received.largest,
                    self.requests_per_second(),
                    (1e6 / self.requests_per_second().max(1e-9)).round()
                ),
            )
            .info(format!("{label}: CPU"), self.run.cpu.clone());
        self.run.check(table, &label);
    }

    fn requests_per_second(&self) -> f64 {
        self.took.map_or(0.0, |took| {
            self.run.received.requests as f64 / took.as_secs_f64()
        })
    }
}

/// Fills the backlog, subscribes from before it and times the receiver getting all of it.
async fn drain_backlog(
    bench: &Bench,
    launch: &Launch,
    receiver: &Receiver,
    size: i32,
    count_statements: bool,
) -> Result<Drained> {
    let name = format!("bench_webhooks_backlog_{size}");
    let url = bench.db.fresh(&name).await?;
    let service = Service::start(launch, &url, &name).await?;
    let result = drain_backlog_with(bench, &service, &url, receiver, size, count_statements).await;
    service.stop().await?;
    result
}

async fn drain_backlog_with(
    bench: &Bench,
    service: &Service,
    url: &str,
    receiver: &Receiver,
    size: i32,
    count_statements: bool,
) -> Result<Drained> {
    // batch_size 1 is a hundred times slower per event: a twentieth of the backlog shows its
    // rate as well in far less time.
    let events = if size == 1 {
        bench.args.webhook_backlog / 20
    } else {
        bench.args.webhook_backlog
    };
    let ledger = Arc::new(Ledger::new(live::next_id(url).await?, bench.epoch));
    producer::history(url, CONSUMER, events, HISTORY_CHUNK, &ledger).await?;
    let monitor = database::connect(url).await?;
    // The history's dead tuples and unset hint bits would otherwise be cleaned up by the first
    // page reads, inside the measured run.
    monitor.batch_execute("VACUUM ANALYZE events").await?;
    receiver.reset();
    receiver.arm(Arc::clone(&ledger), CONSUMER, 0);
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    if count_statements {
        monitor
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
    }
    eprintln!("  backlog of {events} events, batch_size {size}: subscribing from before it");
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let started = Instant::now();
    let id = subscribe(service.addr, receiver, size, json!(0)).await?;
    let arrived = consumer::wait_until(BACKLOG_TIMEOUT, || receiver.events() >= events).await;
    let cpu = cpu.describe();
    let statements = if count_statements {
        Some(statements(&monitor).await?)
    } else {
        None
    };
    if !arrived {
        eprintln!(
            "  !!! the receiver got {} of {events} events in {BACKLOG_TIMEOUT:?}",
            receiver.events()
        );
    }
    let shown = show(service.addr, id).await?;
    let received = receiver.finish(false).context("the receiver's run")?;
    let since = |at: Option<Instant>| at.map(|at| at.saturating_duration_since(started));
    Ok(Drained {
        events,
        took: arrived.then(|| since(received.last)).flatten(),
        first_after: since(received.first),
        run: RunOutcome {
            received,
            shown,
            in_flight: 0,
            cpu,
            statements,
        },
    })
}

/// Shape (b): live producers as fast as they go.
struct Flooded {
    produced: Produced,
    /// Events the receiver had when the producers stopped.
    acknowledged: u64,
    /// From the producers' stop to the last event; `None` if the run was cut.
    caught_up: Option<Duration>,
    run: RunOutcome,
}

impl Flooded {
    fn describe(&self, table: &mut Table, size: i32) {
        let label = format!("batch_size {size}");
        let produced = &self.produced;
        let elapsed = produced.elapsed.as_secs_f64().max(1e-9);
        let acknowledged = self.acknowledged as f64 / elapsed;
        let received = &self.run.received;
        table
            .info(
                format!("{label}: committed/s · acknowledged/s while producing"),
                format!(
                    "{} · {} ({} committed in {:.1} s)",
                    count(produced.rate()),
                    count(acknowledged),
                    count(produced.rows as f64),
                    elapsed
                ),
            )
            .check(
                format!("{label}: acknowledged / committed while producing"),
                format!("{:.2}", acknowledged / produced.rate().max(1e-9)),
                "≥ 0.95 (keeps up)",
                acknowledged >= 0.95 * produced.rate(),
            )
            .info(
                format!("{label}: after producers stopped"),
                match self.caught_up {
                    Some(took) => format!("caught up in {}", ms(took)),
                    None => format!(
                        "cut: {} of {} events had arrived",
                        count(received.delivery.received as f64),
                        count(produced.rows as f64)
                    ),
                },
            )
            .info(
                format!("{label}: requests · events a request (mean, largest)"),
                format!(
                    "{} · {:.1}, {}",
                    count(received.requests as f64),
                    received.mean_batch(),
                    received.largest
                ),
            )
            .info(
                format!("{label}: latency p50 / p99 / max (INSERT sent → receiver)"),
                received.latency.p50_p99_max(),
            )
            .info(
                format!("{label}: producers' insert round trip p50 / p99"),
                format!("{} / {}", ms(produced.commit.p50), ms(produced.commit.p99)),
            )
            .info(format!("{label}: CPU"), self.run.cpu.clone());
        self.run.check(table, &label);
        table.delivery_errors += produced.unrecorded;
    }
}

async fn live_flood(
    bench: &Bench,
    launch: &Launch,
    receiver: &Receiver,
    size: i32,
) -> Result<Flooded> {
    let name = format!("bench_webhooks_live_{size}");
    let url = bench.db.fresh(&name).await?;
    let service = Service::start(launch, &url, &name).await?;
    let result = live_flood_with(bench, &service, &url, receiver, size).await;
    // Stopped before the receiver is settled and the stored position read: a cut run's deliveries
    // go on until then.
    service.stop().await?;
    let (produced, acknowledged, caught_up, cpu, id) = result?;
    let monitor = database::connect(&url).await?;
    let row = monitor
        .query_one(
            "SELECT position, delivered FROM event_piper_subscriptions WHERE id = $1",
            &[&id],
        )
        .await?;
    let shown = json!({
        "position": row.try_get::<_, i64>(0)?,
        "delivered": row.try_get::<_, i64>(1)?,
    });
    // A cut run is checked up to the last id received: the rest was still on its way.
    let received = receiver
        .finish(caught_up.is_none())
        .context("the receiver's run")?;
    Ok(Flooded {
        produced,
        acknowledged,
        caught_up,
        run: RunOutcome {
            received,
            shown,
            in_flight: if caught_up.is_some() { 0 } else { size as u64 },
            cpu,
            statements: None,
        },
    })
}

/// Produces, waits for the receiver to catch up: (produced, events acknowledged while producing,
/// catch-up time, CPU, subscription id).
async fn live_flood_with(
    bench: &Bench,
    service: &Service,
    url: &str,
    receiver: &Receiver,
    size: i32,
) -> Result<(Produced, u64, Option<Duration>, String, i64)> {
    let ledger = Arc::new(Ledger::new(live::next_id(url).await?, bench.epoch));
    receiver.reset();
    receiver.arm(Arc::clone(&ledger), CONSUMER, 0);
    let id = subscribe(service.addr, receiver, size, json!("now")).await?;
    let producers = bench.args.webhook_producers;
    let sinks = producer::walkthrough_sinks(url, producers, "events", true).await?;
    // Also gives the service time to claim the subscription before the first event.
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    eprintln!(
        "  batch_size {size}: {producers} producers as fast as they go for {:?}",
        bench.args.duration
    );
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let targets = Targets {
        consumers: super::names("hook", 1),
        types: producer::one_type(),
        ledger: Some(Arc::clone(&ledger)),
        counter: Arc::new(AtomicU64::new(0)),
        stamp: Stamp::Sent,
    };
    let produced = bench
        .producers
        .spawn(producer::flood_with(sinks, bench.args.duration, targets))
        .await
        .context("producer task")??;
    let acknowledged = receiver.events();
    let stopped = Instant::now();
    let caught_up = consumer::wait_until(CATCH_UP, || receiver.events() >= produced.rows)
        .await
        .then(|| stopped.elapsed());
    Ok((produced, acknowledged, caught_up, cpu.describe(), id))
}

/// Shape (c): the paced run, the receiver beside an SSE stream.
struct Paced {
    outcome: live::Outcome,
    run: RunOutcome,
    /// The target rate and the producer connections, for [`live::describe`].
    rate: f64,
    producers: usize,
}

impl Paced {
    fn describe(&self, table: &mut Table) {
        let received = &self.run.received;
        let outcome = &self.outcome;
        table
            .info(
                "webhook: latency p50 / p99 / p99.9 / max (INSERT sent → receiver)",
                received.latency.p50_p99_p999_max(),
            )
            .info(
                "SSE stream, same events: latency p50 / p99 / p99.9 / max (INSERT sent → frame read)",
                outcome.latency.p50_p99_p999_max(),
            )
            .info(
                "webhook: requests · events a request (mean, largest)",
                format!(
                    "{} · {:.2}, {}",
                    count(received.requests as f64),
                    received.mean_batch(),
                    received.largest
                ),
            );
        live::describe(table, outcome, self.rate, self.producers);
        self.run.check(table, "webhook");
    }
}

async fn paced_with_stream(
    bench: &Bench,
    launch: &Launch,
    receiver: &Receiver,
    count_statements: bool,
) -> Result<Paced> {
    let name = "bench_webhooks_paced";
    let url = bench.db.fresh(name).await?;
    let service = Service::start(launch, &url, name).await?;
    let result = paced_with_stream_with(bench, &service, &url, receiver, count_statements).await;
    service.stop().await?;
    result
}

async fn paced_with_stream_with(
    bench: &Bench,
    service: &Service,
    url: &str,
    receiver: &Receiver,
    count_statements: bool,
) -> Result<Paced> {
    receiver.reset();
    let id = subscribe(service.addr, receiver, LATENCY_BATCH, json!("now")).await?;
    let monitor = database::connect(url).await?;
    if count_statements {
        monitor
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
    }
    let (producers, rate, duration) = (bench.args.producers, bench.args.rate, bench.args.duration);
    let mut plan = Plan::one_connection_each("webhooks paced".into(), "hook", 1, rate);
    plan.stamp = Stamp::Sent;
    let url_owned = url.to_owned();
    let outcome = live::run_with(bench, service, url, plan, |targets: Targets| {
        // The run's ledger exists only now: the receiver checks against the same one as the
        // stream, and nothing was produced before this.
        if let Some(ledger) = &targets.ledger {
            receiver.arm(Arc::clone(ledger), CONSUMER, 0);
        }
        async move { producer::paced(&url_owned, producers, rate, duration, targets).await }
    })
    .await?;
    let rows = outcome.produced.rows;
    if !consumer::wait_until(CATCH_UP, || receiver.events() >= rows).await {
        eprintln!(
            "  !!! the receiver got {} of {rows} events",
            receiver.events()
        );
    }
    let statements = if count_statements {
        Some(statements(&monitor).await?)
    } else {
        None
    };
    let shown = show(service.addr, id).await?;
    let received = receiver.finish(false).context("the receiver's run")?;
    Ok(Paced {
        run: RunOutcome {
            received,
            shown,
            in_flight: 0,
            cpu: outcome.cpu.clone(),
            statements,
        },
        outcome,
        rate,
        producers,
    })
}

/// `POST /subscriptions` for [`CONSUMER`] to the receiver; hands the secret to the receiver and
/// returns the subscription's id.
async fn subscribe(addr: SocketAddr, receiver: &Receiver, size: i32, after: Value) -> Result<i64> {
    subscribe_for(addr, receiver, CONSUMER, size, after).await
}

/// `POST /subscriptions` for `consumer` to the receiver (see [`subscribe`]); also used by the
/// producers scenario's webhook shape, one subscription and one receiver per consumer.
pub(super) async fn subscribe_for(
    addr: SocketAddr,
    receiver: &Receiver,
    consumer: &str,
    size: i32,
    after: Value,
) -> Result<i64> {
    let body = json!({
        "consumer": consumer,
        "url": receiver.url,
        "batch_size": size,
        "after": after,
    });
    let (status, created) = request(addr, Method::POST, "/subscriptions", Some(body)).await?;
    if status != StatusCode::CREATED {
        bail!("POST /subscriptions answered {status}: {created}");
    }
    receiver.verify_with(created["secret"].as_str().context("no secret")?)?;
    created["id"].as_i64().context("no subscription id")
}

/// `DELETE /subscriptions/{id}`: the producers scenario removes its subscriptions after each
/// run, so that they do not go on receiving the next run's events.
pub(super) async fn unsubscribe(addr: SocketAddr, id: i64) -> Result<()> {
    let path = format!("/subscriptions/{id}");
    let (status, answer) = request(addr, Method::DELETE, &path, None).await?;
    if status != StatusCode::NO_CONTENT {
        bail!("DELETE {path} answered {status}: {answer}");
    }
    Ok(())
}

/// `GET /subscriptions/{id}`.
pub(super) async fn show(addr: SocketAddr, id: i64) -> Result<Value> {
    let path = format!("/subscriptions/{id}");
    let (status, shown) = request(addr, Method::GET, &path, None).await?;
    if status != StatusCode::OK {
        bail!("GET {path} answered {status}: {shown}");
    }
    Ok(shown)
}

/// One request on a connection of its own; the JSON answer.
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, HeaderValue::from_str(&addr.to_string())?);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let body = body.map_or_else(Bytes::new, |body| Bytes::from(body.to_string()));
    let response = sender.send_request(request.body(Full::new(body))?).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    driver.abort();
    let answer = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    Ok((status, answer))
}

/// What the service ran during a run, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Statements {
    begin_batch: u64,
    delivered: u64,
    other_writes: u64,
    page_reads: u64,
    hub_reads: u64,
    gap_checks: u64,
    behind_counts: u64,
    subscription_reads: u64,
    other: u64,
}

impl Statements {
    fn total(&self) -> u64 {
        self.begin_batch
            + self.delivered
            + self.other_writes
            + self.page_reads
            + self.hub_reads
            + self.gap_checks
            + self.behind_counts
            + self.subscription_reads
            + self.other
    }
}

/// Statements run in this database since the reset, classified by their text.
async fn statements(client: &tokio_postgres::Client) -> Result<Statements> {
    let mut statements = Statements::default();
    for (text, calls) in super::dbcost::service_statements(client).await? {
        let kind = if text.contains("UPDATE event_piper_subscriptions SET pending_upto") {
            &mut statements.begin_batch
        } else if text.contains("UPDATE event_piper_subscriptions SET position") {
            &mut statements.delivered
        } else if text.contains("UPDATE event_piper_subscriptions") {
            &mut statements.other_writes
        } else if text.contains("pg_locks") {
            &mut statements.gap_checks
        } else if text.contains("count(*)") {
            &mut statements.behind_counts
        } else if text.contains("FROM events") && text.contains("subscriber =") {
            &mut statements.page_reads
        } else if text.contains("FROM events") && text.contains("id >") {
            &mut statements.hub_reads
        } else if text.contains("event_piper_subscriptions") {
            &mut statements.subscription_reads
        } else {
            &mut statements.other
        };
        *kind += calls;
    }
    Ok(statements)
}

fn describe_statements(table: &mut Table, label: &str, run: &RunOutcome) {
    let Some(s) = run.statements else {
        return;
    };
    let batches = run.received.requests.max(1) as f64;
    let per = |calls: u64| format!("{calls} ({:.2})", calls as f64 / batches);
    table
        .info(
            format!("{label}: batches acknowledged · events"),
            format!(
                "{} · {}",
                count(run.received.requests as f64),
                count(run.received.delivery.received as f64)
            ),
        )
        .info(
            format!("{label}: statements (per batch)"),
            format!(
                "{} ({:.2} a batch, {:.3} an event)",
                s.total(),
                s.total() as f64 / batches,
                s.total() as f64 / run.received.delivery.received.max(1) as f64
            ),
        )
        .info(
            format!("{label}: writes: begin · delivered · other (per batch)"),
            format!(
                "{} · {} · {}",
                per(s.begin_batch),
                per(s.delivered),
                per(s.other_writes)
            ),
        )
        .info(
            format!("{label}: reads: pages · hub · gap checks · behind counts (per batch)"),
            format!(
                "{} · {} · {} · {}",
                per(s.page_reads),
                per(s.hub_reads),
                per(s.gap_checks),
                per(s.behind_counts)
            ),
        )
        .info(
            format!("{label}: subscription reads · other (per batch)"),
            format!("{} · {}", per(s.subscription_reads), per(s.other)),
        )
        .info(format!("{label}: CPU"), run.cpu.clone());
    run.check(table, label);
}
