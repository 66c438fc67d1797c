//! Scenario 7, producers (issue 9): what event-piper costs the application's own writers.
//!
//! The `events` table lives in the application's database, so whatever event-piper adds to an
//! insert (the id trigger, its advisory lock, the NOTIFY doorbell) every producer pays. Measured
//! against a plain table the bench creates beside it in the same database (`bigserial` id, the
//! same columns and indexes, no trigger), in the same run:
//!
//! - 7a/7b: for `synchronous_commit` on and off (set per producer connection), and 1, 8, 32, 64
//!   connections (`--producer-connections`), each connection commits the walkthrough's
//!   single-row autocommit INSERT back to back for `--duration`: plain, then `events` with the
//!   service running and one stream per consumer reading every event (checked exactly once, in
//!   order), then plain again, so that machine noise shows. Target: events / plain >= 0.90.
//!   Between the two plain phases, besides the streamed one, the same INSERTs into `events`
//!   with the service stopped: what the table itself costs, apart from what delivering adds.
//!   Odd rounds (`--producer-rounds`) run it before the streamed phase, even rounds after: later
//!   phases of a round commit less, as the tables grow. Every phase starts after a VACUUM of
//!   both tables and a CHECKPOINT.
//!   `--pin-cores` puts PostgreSQL and the producers on one CPU and the service on the other.
//!   With the bench's own PostgreSQL, the streamed phase also reports the CPU of the service's
//!   database connections: what its statements take from that CPU, steady where commit rates
//!   are not.
//!   Latency is timed from the INSERT being sent, so it includes the producer's own commit.
//! - 7c: a multi-row `INSERT ... SELECT generate_series` and a `COPY` into `events` beside
//!   single-row producers: nothing lost or repeated.
//! - 7d: 1,000 events/s in total (`--rate`) from 1, 8, 32, 64 connections. Target: p99 < 10 ms
//!   from the INSERT being sent to the frame being read.
//! - 7e: as 7a (synchronous_commit on), but each consumer has a webhook subscription (batch_size
//!   100, from now) to a receiver of its own inside the bench instead of an SSE stream: every
//!   delivered batch costs one or two committed UPDATEs of `event_piper_subscriptions` on the
//!   producers' PostgreSQL. Checked exactly once, in order, signed, stored position agreeing;
//!   the service's UPDATEs of that table counted from pg_stat_user_tables.
//!
//! `--producer-shapes` picks which of them run.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use super::live::{self, Outcome, Plan};
use super::webhooks;
use super::{Bench, CpuMeter, median, names};
use crate::cli::ProducerShape;
use crate::consumer;
use crate::database;
use crate::delivery::DeliverySummary;
use crate::latency::{Summary, ms, new_histogram};
use crate::ledger::Ledger;
use crate::procfs;
use crate::producer::{self, Bulk, Produced, Stamp, Targets};
use crate::progress::Progress;
use crate::receiver::{Received, Receiver};
use crate::report::{Table, count};
use crate::service::{Launch, Service};

/// The plain table, beside `events` in the same database.
const PLAIN: &str = "plain_events";

/// What an application's table would be without event-piper (the file says what it holds); the
/// shell benchmarks beside the crate create the same table from it.
const PLAIN_SCHEMA: &str = include_str!("../../plain-table.sql");

/// Consumers the events are spread over, one stream each: every event is read by one stream.
const CONSUMERS: usize = 8;

/// The multi-row and COPY check: beside this many single-row producers, statements of this many
/// rows, one every pause.
const BULK_BESIDE: usize = 8;
const BULK_CHUNK: u64 = 1000;
const BULK_PAUSE: Duration = Duration::from_millis(100);

/// The paced phase's latency target.
const P99_TARGET: Duration = Duration::from_millis(10);

/// 7e's subscriptions: the API's default batch size.
const HOOK_BATCH: i32 = 100;

/// How long 7e's receivers may take to catch up once the producers stop.
const HOOK_CATCH_UP: Duration = Duration::from_secs(10);

/// How long to wait for the service's UPDATEs to show in pg_stat_user_tables. PostgreSQL 15
/// flushes a backend's table counters at most once a second, and a backend that goes idle less
/// than a second after a flush only flushes again 10 s later.
const STATS_SETTLE: Duration = Duration::from_secs(15);

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let url = bench.db.fresh("bench_producers").await?;
    database::connect(&url)
        .await?
        .batch_execute(PLAIN_SCHEMA)
        .await
        .context("creating the plain table")?;
    let storage = bench.db.storage().await?;
    eprintln!("  {storage}");
    // 7e's receivers are on loopback, which subscriptions may not reach by default. The flag
    // changes nothing else, so 7a to 7d run with it too and every shape sees the same service.
    let mut launch = bench.launch.clone();
    launch.extra_args.push("--webhook-allow-private".into());
    let mut service = Service::start(&launch, &url, "producers").await?;
    let measured = measure(bench, &mut service, &launch, &url).await;
    service.stop().await?;
    let mut tables = measured?;
    for table in &mut tables {
        table.note(storage.clone());
    }
    Ok(tables)
}

fn on_off(synchronous_commit: bool) -> &'static str {
    if synchronous_commit { "on" } else { "off" }
}

async fn measure(
    bench: &Bench,
    service: &mut Service,
    launch: &Launch,
    url: &str,
) -> Result<Vec<Table>> {
    let shapes = &bench.args.producer_shapes;
    let mut tables = Vec::new();
    for (shape, letter, synchronous_commit) in [
        (ProducerShape::A, "a", true),
        (ProducerShape::B, "b", false),
    ] {
        if !shapes.contains(&shape) {
            continue;
        }
        let setting = on_off(synchronous_commit);
        let mut table = Table::new(format!(
            "7{letter}. producers: single-row autocommit INSERTs as fast as they go, \
             synchronous_commit = {setting}; a plain table vs events with the service streaming \
             every event to {CONSUMERS} consumers"
        ));
        let rounds = bench.args.producer_rounds.max(1);
        for &producers in &bench.args.producer_connections {
            let mut ratios = Vec::new();
            for round in 1..=rounds {
                let label = match rounds {
                    1 => producers_label(producers),
                    _ => format!("{}, round {round}", producers_label(producers)),
                };
                let before = plain(bench, service, url, producers, synchronous_commit).await?;
                // Later phases of a round commit less than earlier ones (the tables grow), so
                // the two `events` phases take turns going first: odd rounds stop the service
                // first, even rounds stream first.
                let (alone, (events, backends)) = if round % 2 == 1 {
                    let alone =
                        stopped(bench, service, launch, url, producers, synchronous_commit).await?;
                    let streamed =
                        events(bench, service, url, producers, synchronous_commit).await?;
                    (alone, streamed)
                } else {
                    let streamed =
                        events(bench, service, url, producers, synchronous_commit).await?;
                    let alone =
                        stopped(bench, service, launch, url, producers, synchronous_commit).await?;
                    (alone, streamed)
                };
                let after = plain(bench, service, url, producers, synchronous_commit).await?;
                let phases = Phases {
                    plain: [&before, &after],
                    alone: &alone,
                    events: &events,
                    backends,
                };
                ratios.push(flood_rows(&mut table, &label, &phases, rounds == 1));
            }
            if rounds > 1 {
                median_rows(&mut table, &producers_label(producers), &ratios);
            }
        }
        table.note(
            "Plain: `plain_events` (bigserial id, the columns and indexes of `events`, no \
             trigger) in the same database, measured just before and just after each events \
             phase; the ratio is against the higher of the two. Each phase is `--duration` long.",
        );
        tables.push(table);
    }
    if shapes.contains(&ProducerShape::E) {
        tables.push(hooked(bench, service, url).await?);
    }
    if shapes.contains(&ProducerShape::C) {
        tables.push(bulk(bench, service, url).await?);
    }
    if shapes.contains(&ProducerShape::D) {
        tables.push(paced(bench, service, url).await?);
    }
    Ok(tables)
}

struct PlainRun {
    produced: Produced,
    cpu: String,
}

/// The CPU time of the service's own PostgreSQL backends (its connections name themselves
/// `event-piper...`), read from /proc. With PostgreSQL pinned to one core beside the producers,
/// that is what the service's statements take from them, steady where their commit rate is not.
struct ServiceBackends {
    started: Instant,
    before: HashMap<u32, Duration>,
}

impl ServiceBackends {
    /// None when PostgreSQL is not the bench's own (its backends are not ours to read) or the
    /// question fails: the row is then left out.
    async fn start(bench: &Bench, url: &str) -> Option<ServiceBackends> {
        bench.db.postmaster_pid()?;
        let before = Self::pids(url)
            .await
            .ok()?
            .into_iter()
            .map(|pid| (pid, procfs::cpu(pid)))
            .collect();
        Some(ServiceBackends {
            started: Instant::now(),
            before,
        })
    }

    /// Cores used since `start`; a backend the service opened meanwhile counts from zero.
    async fn cores(&self, url: &str) -> Option<f64> {
        let pids = Self::pids(url).await.ok()?;
        let used: Duration = pids
            .into_iter()
            .map(|pid| {
                let before = self.before.get(&pid).copied().unwrap_or_default();
                procfs::cpu(pid).saturating_sub(before)
            })
            .sum();
        Some(used.as_secs_f64() / self.started.elapsed().as_secs_f64().max(1e-9))
    }

    async fn pids(url: &str) -> Result<Vec<u32>> {
        let client = database::connect(url).await?;
        let rows = client
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name LIKE 'event-piper%'",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.get::<_, i32>(0).unsigned_abs())
            .collect())
    }
}

/// Before a phase: vacuums both tables and checkpoints, so that the autovacuum and checkpoint a
/// previous phase's rows call for do not land in this one (on one pinned core they swung two
/// plain phases of the same count by up to 2x). Best effort: a failure is reported, not fatal.
async fn settle(url: &str) {
    let settled = async {
        let client = crate::database::connect(url).await?;
        // One statement at a time: VACUUM cannot run in the transaction that several
        // statements of one query string share.
        for statement in [
            "VACUUM (ANALYZE) events".to_owned(),
            format!("VACUUM (ANALYZE) {PLAIN}"),
            "CHECKPOINT".to_owned(),
        ] {
            client.batch_execute(&statement).await?;
        }
        anyhow::Ok(())
    };
    if let Err(error) = settled.await {
        eprintln!("  warning: cannot settle the database before a phase: {error:#}");
    }
}

/// The producers against `events` with the service stopped: what the table itself costs them.
/// The service is started again afterwards.
async fn stopped(
    bench: &Bench,
    service: &mut Service,
    launch: &Launch,
    url: &str,
    producers: usize,
    synchronous_commit: bool,
) -> Result<PlainRun> {
    service.terminate().await?;
    let alone = flood(bench, None, url, producers, synchronous_commit, "events").await;
    *service = Service::start(launch, url, "producers").await?;
    alone
}

/// The same producers against the plain table (nothing streams it; the service idles).
async fn plain(
    bench: &Bench,
    service: &Service,
    url: &str,
    producers: usize,
    synchronous_commit: bool,
) -> Result<PlainRun> {
    flood(
        bench,
        Some(service.pid),
        url,
        producers,
        synchronous_commit,
        PLAIN,
    )
    .await
}

/// The producers' INSERTs into `table` for `--duration`, nothing reading them (the service,
/// when given, idles or is not running at all).
async fn flood(
    bench: &Bench,
    service: Option<u32>,
    url: &str,
    producers: usize,
    synchronous_commit: bool,
    table: &'static str,
) -> Result<PlainRun> {
    settle(url).await;
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let counter = Arc::new(AtomicU64::new(0));
    let label = format!("{table} {producers} sync {}", on_off(synchronous_commit));
    let progress = Progress::start(label, Arc::clone(&counter), None, 0);
    let cpu = CpuMeter::start(service, bench.db.postmaster_pid());
    let targets = Targets {
        consumers: names("plain", CONSUMERS),
        types: crate::producer::one_type(),
        ledger: None,
        counter,
        stamp: Stamp::Sent,
    };
    let (url, duration) = (url.to_owned(), bench.args.duration);
    let produced = bench
        .producers
        .spawn(async move {
            let sinks =
                producer::walkthrough_sinks(&url, producers, table, synchronous_commit).await?;
            producer::flood_with(sinks, duration, targets).await
        })
        .await
        .context("producer task")??;
    let cpu = cpu.describe();
    drop(progress);
    Ok(PlainRun { produced, cpu })
}

/// The same producers against `events`, every event streamed and checked; and the cores the
/// service's database connections used meanwhile ([`ServiceBackends`]).
async fn events(
    bench: &Bench,
    service: &Service,
    url: &str,
    producers: usize,
    synchronous_commit: bool,
) -> Result<(Outcome, Option<f64>)> {
    settle(url).await;
    let backends = ServiceBackends::start(bench, url).await;
    let label = format!("events {producers} sync {}", on_off(synchronous_commit));
    let mut plan = Plan::one_connection_each(label, "prod", CONSUMERS, 0.0);
    plan.stamp = Stamp::Sent;
    let (url_owned, duration) = (url.to_owned(), bench.args.duration);
    let outcome = live::run_with(bench, service, url, plan, move |targets| async move {
        let sinks =
            producer::walkthrough_sinks(&url_owned, producers, "events", synchronous_commit)
                .await?;
        producer::flood_with(sinks, duration, targets).await
    })
    .await?;
    let cores = match backends {
        Some(backends) => backends.cores(url).await,
        None => None,
    };
    Ok((outcome, cores))
}

/// "1 producer", "8 producers".
fn producers_label(producers: usize) -> String {
    format!(
        "{producers} producer{}",
        if producers == 1 { "" } else { "s" }
    )
}

/// The rows every producers shape shares: commits/s of plain, `what`, plain again; the ratio to
/// the faster plain phase (checked against 0.90 when `checked`, else only shown); the commit
/// round trips. Returns the ratio and that plain phase.
fn against_plain<'a>(
    table: &mut Table,
    label: &str,
    plain: [&'a PlainRun; 2],
    produced: &Produced,
    what: &str,
    checked: bool,
) -> (f64, &'a PlainRun) {
    let higher = if plain[0].produced.rate() >= plain[1].produced.rate() {
        plain[0]
    } else {
        plain[1]
    };
    let ratio = produced.rate() / higher.produced.rate().max(1e-9);
    table.info(
        format!("{label}: commits/s, plain before · {what} · plain after"),
        format!(
            "{} · {} · {}",
            count(plain[0].produced.rate()),
            count(produced.rate()),
            count(plain[1].produced.rate())
        ),
    );
    let metric = format!("{label}: events / plain");
    if checked {
        table.check(metric, format!("{ratio:.2}"), ">= 0.90", ratio >= 0.90);
    } else {
        table.info(metric, format!("{ratio:.2}"));
    }
    table.info(
        format!("{label}: commit round trip p50 / p99, plain · events"),
        format!(
            "{} / {} · {} / {}",
            ms(higher.produced.commit.p50),
            ms(higher.produced.commit.p99),
            ms(produced.commit.p50),
            ms(produced.commit.p99)
        ),
    );
    (ratio, higher)
}

/// One round of shapes a and b: plain, `events` with the service stopped, streamed, plain.
struct Phases<'a> {
    plain: [&'a PlainRun; 2],
    alone: &'a PlainRun,
    events: &'a Outcome,
    /// Cores the service's database connections used while streaming ([`ServiceBackends`]).
    backends: Option<f64>,
}

/// What one round came to: streamed / plain, stopped / plain, streamed / stopped, and the
/// service's database connections' cores.
struct Ratios {
    streamed: f64,
    stopped: f64,
    streamed_stopped: f64,
    backends: Option<f64>,
}

fn flood_rows(table: &mut Table, label: &str, phases: &Phases, checked: bool) -> Ratios {
    let events = phases.events;
    let (streamed, higher) = against_plain(
        table,
        label,
        phases.plain,
        &events.produced,
        "events",
        checked,
    );
    let rate = |produced: &Produced| produced.rate().max(1e-9);
    let alone = &phases.alone.produced;
    let ratios = Ratios {
        streamed,
        stopped: alone.rate() / rate(&higher.produced),
        streamed_stopped: events.produced.rate() / rate(alone),
        backends: phases.backends,
    };
    table.info(
        format!(
            "{label}: events with the service stopped: commits/s · / plain · streamed / stopped"
        ),
        format!(
            "{} · {:.2} · {:.2}",
            count(alone.rate()),
            ratios.stopped,
            ratios.streamed_stopped
        ),
    );
    live::describe_sent(table, label, events, "INSERT", None);
    table.info(format!("{label}: CPU, plain"), higher.cpu.clone());
    if let Some(cores) = ratios.backends {
        table.info(
            format!("{label}: the service's database connections, streamed"),
            format!("{cores:.3} cores"),
        );
    }
    ratios
}

/// The median of each ratio over the rounds of one producer count, checked against 0.90; on a
/// shared machine one round's phases can differ by more than the effect measured.
fn median_rows(table: &mut Table, label: &str, rounds: &[Ratios]) {
    let of = |value: fn(&Ratios) -> f64| median(&rounds.iter().map(value).collect::<Vec<_>>());
    let n = rounds.len();
    let streamed = of(|r| r.streamed);
    let each: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.streamed))
        .collect();
    table.check(
        format!("{label}: events / plain, median of {n} rounds"),
        format!("{streamed:.2} ({})", each.join(" · ")),
        ">= 0.90",
        streamed >= 0.90,
    );
    table.info(
        format!("{label}: medians of {n} rounds: stopped / plain · streamed / stopped"),
        format!(
            "{:.2} · {:.2}",
            of(|r| r.stopped),
            of(|r| r.streamed_stopped)
        ),
    );
    let backends: Vec<f64> = rounds.iter().filter_map(|r| r.backends).collect();
    if !backends.is_empty() {
        table.info(
            format!("{label}: the service's database connections, streamed, median"),
            format!("{:.3} cores", median(&backends)),
        );
    }
}

/// Multi-row statements and COPY beside single-row producers, synchronous_commit on.
async fn bulk(bench: &Bench, service: &Service, url: &str) -> Result<Table> {
    let mut plan = Plan::one_connection_each("bulk".into(), "bulk", CONSUMERS, 0.0);
    plan.stamp = Stamp::Sent;
    let done: Arc<OnceLock<(u64, Bulk)>> = Arc::new(OnceLock::new());
    let (url_owned, duration, record) = (url.to_owned(), bench.args.duration, Arc::clone(&done));
    let outcome = live::run_with(bench, service, url, plan, move |targets| async move {
        let sinks = producer::walkthrough_sinks(&url_owned, BULK_BESIDE, "events", true).await?;
        let (mut singles, (bulk, counts)) = tokio::try_join!(
            producer::flood_with(sinks, duration, targets.clone()),
            producer::bulk(&url_owned, BULK_CHUNK, BULK_PAUSE, duration, targets),
        )?;
        let _ = record.set((singles.rows, counts));
        singles.absorb(bulk);
        Ok(singles)
    })
    .await?;
    let (singles, counts) = done.get().copied().unwrap_or_default();

    let mut table = Table::new(format!(
        "7c. producers: multi-row INSERT ... SELECT and COPY into events beside {BULK_BESIDE} \
         single-row producers (synchronous_commit on)"
    ));
    let seconds = outcome.produced.elapsed.as_secs_f64();
    table
        .info(
            "single-row INSERTs committed",
            format!(
                "{} ({} /s)",
                count(singles as f64),
                count(singles as f64 / seconds)
            ),
        )
        .info(
            "INSERT ... SELECT generate_series",
            format!(
                "{} statements of {BULK_CHUNK} rows = {} rows",
                counts.statements,
                count(counts.statement_rows as f64)
            ),
        )
        .info(
            "COPY events FROM STDIN",
            format!(
                "{} COPYs of {BULK_CHUNK} rows = {} rows",
                counts.copies,
                count(counts.copy_rows as f64)
            ),
        );
    live::describe_sent(&mut table, "all rows", &outcome, "statement", None);
    table.note(
        "A bulk row's latency is timed from its statement being sent. COPY returns no ids: \
         each COPY tags its rows and the bench reads their ids back.",
    );
    Ok(table)
}

/// The paced latency run: `--rate` in total from each connection count, synchronous_commit on.
async fn paced(bench: &Bench, service: &Service, url: &str) -> Result<Table> {
    let rate = bench.args.rate;
    let mut table = Table::new(format!(
        "7d. producers: {} events/s in total, single-row autocommit INSERTs \
         (synchronous_commit on), to {CONSUMERS} consumers",
        count(rate)
    ));
    for &producers in &bench.args.producer_connections {
        let mut plan =
            Plan::one_connection_each(format!("paced {producers}"), "paced", CONSUMERS, rate);
        plan.stamp = Stamp::Sent;
        let (url_owned, duration) = (url.to_owned(), bench.args.duration);
        let outcome = live::run_with(bench, service, url, plan, move |targets| async move {
            let sinks = producer::walkthrough_sinks(&url_owned, producers, "events", true).await?;
            producer::paced_with(sinks, rate, duration, targets).await
        })
        .await?;
        paced_rows(
            &mut table,
            &format!(
                "{producers} connection{}",
                if producers == 1 { "" } else { "s" }
            ),
            &outcome,
            rate,
            "INSERT",
        );
    }
    Ok(table)
}

/// The rows of one paced run timed from the send (shared with the publish scenario).
pub fn paced_rows(table: &mut Table, label: &str, outcome: &Outcome, rate: f64, sent: &str) {
    let produced = &outcome.produced;
    table.check(
        format!("{label}: rate sustained"),
        format!(
            "{} in {:.1} s = {} /s; schedule lag max {}; round trip p50 / p99 {} / {}",
            count(produced.rows as f64),
            produced.elapsed.as_secs_f64(),
            count(produced.rate()),
            ms(produced.max_behind),
            ms(produced.commit.p50),
            ms(produced.commit.p99)
        ),
        format!("{} /s, all delivered within 1 s", count(rate)),
        outcome.sustained(rate),
    );
    live::describe_sent(table, label, outcome, sent, Some(P99_TARGET));
}

/// 7e: plain, events delivered to webhook subscriptions, plain, synchronous_commit on.
async fn hooked(bench: &Bench, service: &Service, url: &str) -> Result<Table> {
    // One receiver per consumer: a receiver checks one subscription's signatures and sequence.
    let mut receivers = Vec::with_capacity(CONSUMERS);
    for _ in 0..CONSUMERS {
        receivers.push(Receiver::start().await?);
    }
    let mut table = Table::new(format!(
        "7e. producers: single-row autocommit INSERTs as fast as they go, synchronous_commit = \
         on; a plain table vs events with the service delivering every event to {CONSUMERS} \
         consumers' webhook subscriptions (batch_size {HOOK_BATCH})"
    ));
    for &producers in &bench.args.producer_connections {
        let before = plain(bench, service, url, producers, true).await?;
        let events = webhook_events(bench, service, url, producers, &receivers).await?;
        let after = plain(bench, service, url, producers, true).await?;
        hook_rows(&mut table, producers, [&before, &after], &events);
    }
    let stray: u64 = receivers.iter().map(Receiver::stray).sum();
    table.check(
        "requests with no run armed",
        stray.to_string(),
        "0",
        stray == 0,
    );
    table.delivery_errors += stray;
    table.note(format!(
        "Plain as in 7a. Each events phase creates one subscription per consumer (batch_size \
         {HOOK_BATCH}, after = now) to a receiver of its own on 127.0.0.1 that answers 200 at \
         once, and deletes them once checked. UPDATEs: pg_stat_user_tables.n_tup_upd of \
         event_piper_subscriptions over the phase (the service's only writes to it: a batch \
         recorded before it is sent, and its position after the 2xx, one write for both when \
         the next batch is ready), per second of producing."
    ));
    Ok(table)
}

/// What one 7e events phase did.
struct Hooked {
    produced: Produced,
    received: Vec<Received>,
    latency: Summary,
    /// Subscriptions whose stored `delivered` and `position` agree with their receiver.
    stored_agree: usize,
    /// Events the receivers had when the producers stopped.
    acknowledged: u64,
    /// From the producers' stop to the last event; `None` if the receivers never caught up.
    caught_up: Option<Duration>,
    /// UPDATEs of event_piper_subscriptions over the phase; `None` if the counter never showed
    /// them all.
    updates: Option<i64>,
    cpu: String,
}

impl Hooked {
    fn requests(&self) -> u64 {
        self.received.iter().map(|received| received.requests).sum()
    }

    fn delivery(&self) -> DeliverySummary {
        let mut sum = DeliverySummary::default();
        for received in &self.received {
            let one = &received.delivery;
            sum.connections += one.connections;
            sum.received += one.received;
            sum.lost += one.lost;
            sum.duplicates += one.duplicates;
            sum.out_of_order += one.out_of_order;
            sum.foreign += one.foreign;
            sum.failed += one.failed;
        }
        sum
    }

    fn errors(&self) -> u64 {
        let signatures: u64 = self
            .received
            .iter()
            .map(|received| received.bad_signatures + received.malformed)
            .sum();
        self.delivery().errors() + signatures + self.produced.unrecorded
    }
}

/// The same producers against `events`, each consumer's events delivered to its subscription.
async fn webhook_events(
    bench: &Bench,
    service: &Service,
    url: &str,
    producers: usize,
    receivers: &[Receiver],
) -> Result<Hooked> {
    let consumers = names("hook", CONSUMERS);
    let ledger = Arc::new(Ledger::new(live::next_id(url).await?, bench.epoch));
    let mut ids = Vec::with_capacity(CONSUMERS);
    let mut subscribed = Ok(());
    for (index, (receiver, consumer)) in receivers.iter().zip(consumers.iter()).enumerate() {
        receiver.reset();
        receiver.arm(Arc::clone(&ledger), consumer, index as u32);
        match webhooks::subscribe_for(service.addr, receiver, consumer, HOOK_BATCH, json!("now"))
            .await
        {
            Ok(id) => ids.push(id),
            Err(error) => {
                subscribed = Err(error);
                break;
            }
        }
    }
    let result = match subscribed {
        Ok(()) => {
            let run = Subscribed {
                consumers: &consumers,
                ledger: &ledger,
                ids: &ids,
            };
            webhook_events_with(bench, service, url, producers, receivers, run).await
        }
        Err(error) => Err(error),
    };
    // Deleted whatever happened: the next phases use the same consumers' names.
    for id in ids {
        webhooks::unsubscribe(service.addr, id).await?;
    }
    result
}

/// A 7e phase's consumers, its ledger and their subscriptions (in the receivers' order).
struct Subscribed<'a> {
    consumers: &'a Arc<[Arc<str>]>,
    ledger: &'a Arc<Ledger>,
    ids: &'a [i64],
}

async fn webhook_events_with(
    bench: &Bench,
    service: &Service,
    url: &str,
    producers: usize,
    receivers: &[Receiver],
    run: Subscribed<'_>,
) -> Result<Hooked> {
    let Subscribed {
        consumers,
        ledger,
        ids,
    } = run;
    let sinks = producer::walkthrough_sinks(url, producers, "events", true).await?;
    // Also gives the service time to claim the subscriptions before the first event.
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let monitor = database::connect(url).await?;
    let updates_before = subscription_updates(&monitor).await?;
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        format!("webhooks {producers} sync on"),
        Arc::clone(&counter),
        None,
        0,
    );
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let targets = Targets {
        consumers: Arc::clone(consumers),
        types: producer::one_type(),
        ledger: Some(Arc::clone(ledger)),
        counter,
        stamp: Stamp::Sent,
    };
    let duration = bench.args.duration;
    let produced = bench
        .producers
        .spawn(producer::flood_with(sinks, duration, targets))
        .await
        .context("producer task")??;
    let acknowledged: u64 = receivers.iter().map(Receiver::events).sum();
    let stopped = Instant::now();
    let caught_up = consumer::wait_until(HOOK_CATCH_UP, || {
        receivers.iter().enumerate().all(|(index, receiver)| {
            receiver.events() >= produced.per_consumer.get(index).copied().unwrap_or(0)
        })
    })
    .await
    .then(|| stopped.elapsed());
    let cpu = cpu.describe();
    drop(progress);

    let mut stored_agree = 0;
    let mut received = Vec::with_capacity(receivers.len());
    for (receiver, &id) in receivers.iter().zip(ids) {
        let shown = webhooks::show(service.addr, id).await?;
        let got = receiver
            .finish(caught_up.is_none())
            .context("the receiver's run")?;
        let agrees = shown["delivered"].as_u64() == Some(got.delivery.received)
            && shown["position"]
                .as_i64()
                .is_some_and(|position| position >= got.highest.unwrap_or(0));
        stored_agree += usize::from(agrees);
        received.push(got);
    }
    let mut histogram = new_histogram();
    for got in &received {
        histogram
            .add(&got.histogram)
            .context("merging the receivers' latencies")?;
    }

    // Every batch acknowledged took at least one UPDATE, all of them on the one connection the
    // service writes subscriptions on, whose counters reach the table's together: once the
    // count covers the batches, it covers every write of the phase.
    let requests: u64 = received.iter().map(|got| got.requests).sum();
    let settle_by = Instant::now() + STATS_SETTLE;
    let updates = loop {
        let updates = subscription_updates(&monitor).await? - updates_before;
        if updates >= requests as i64 {
            break Some(updates);
        }
        if Instant::now() >= settle_by {
            eprintln!("  !!! n_tup_upd shows {updates} UPDATEs for {requests} batches");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    Ok(Hooked {
        produced,
        latency: Summary::of(&histogram),
        received,
        stored_agree,
        acknowledged,
        caught_up,
        updates,
        cpu,
    })
}

/// UPDATEs of event_piper_subscriptions so far, as the statistics have them.
async fn subscription_updates(client: &tokio_postgres::Client) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(n_tup_upd), 0)::bigint FROM pg_stat_user_tables \
             WHERE relname = 'event_piper_subscriptions'",
            &[],
        )
        .await
        .context("reading pg_stat_user_tables")?;
    Ok(row.try_get(0)?)
}

fn hook_rows(table: &mut Table, producers: usize, plain: [&PlainRun; 2], hooked: &Hooked) {
    let produced = &hooked.produced;
    let label = producers_label(producers);
    let (_, higher) = against_plain(table, &label, plain, produced, "events with webhooks", true);
    let delivery = hooked.delivery();
    let (bad_signatures, malformed) = hooked.received.iter().fold((0, 0), |(b, m), got| {
        (b + got.bad_signatures, m + got.malformed)
    });
    let errors = hooked.errors();
    let seconds = produced.elapsed.as_secs_f64().max(1e-9);
    let requests = hooked.requests();
    table
        .check(
            format!("{label}: delivered / committed, exactly once in order, signed"),
            format!(
                "{} / {} · {} · bad signatures {bad_signatures} · malformed {malformed}",
                count(delivery.received as f64),
                count(produced.rows as f64),
                delivery.describe()
            ),
            "all, 0 errors",
            errors == 0 && delivery.received == produced.rows && hooked.caught_up.is_some(),
        )
        .check(
            format!("{label}: subscriptions' stored delivered · position agree"),
            format!("{} of {}", hooked.stored_agree, hooked.received.len()),
            "all",
            hooked.stored_agree == hooked.received.len(),
        )
        .info(
            format!("{label}: acknowledged / committed while producing · after producers stopped"),
            format!(
                "{:.2} · {}",
                hooked.acknowledged as f64 / (produced.rows.max(1)) as f64,
                hooked
                    .caught_up
                    .map_or("not caught up (timed out)".into(), |took| format!(
                        "caught up in {}",
                        ms(took)
                    ))
            ),
        )
        .info(
            format!("{label}: webhook requests · events a request (mean)"),
            format!(
                "{} = {} /s · {:.1}",
                count(requests as f64),
                count(requests as f64 / seconds),
                delivery.received as f64 / requests.max(1) as f64
            ),
        )
        .info(
            format!("{label}: latency p50 / p99 / max (INSERT sent → receiver)"),
            hooked.latency.p50_p99_max(),
        )
        .info(
            format!("{label}: UPDATEs of event_piper_subscriptions (n_tup_upd)"),
            match hooked.updates {
                Some(updates) => format!(
                    "{} = {} /s · {:.2} a request",
                    count(updates as f64),
                    count(updates as f64 / seconds),
                    updates as f64 / requests.max(1) as f64
                ),
                None => "not all shown in pg_stat_user_tables".into(),
            },
        )
        .info(format!("{label}: CPU"), hooked.cpu.clone())
        .info(format!("{label}: CPU, plain"), higher.cpu.clone());
    table.delivery_errors += errors + u64::from(hooked.stored_agree != hooked.received.len());
}
