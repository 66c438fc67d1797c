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
//!   Latency is timed from the INSERT being sent, so it includes the producer's own commit.
//! - 7c: a multi-row `INSERT ... SELECT generate_series` and a `COPY` into `events` beside
//!   single-row producers: nothing lost or repeated.
//! - 7d: 1,000 events/s in total (`--rate`) from 1, 8, 32, 64 connections. Target: p99 < 10 ms
//!   from the INSERT being sent to the frame being read.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};

use super::live::{self, Outcome, Plan};
use super::{Bench, CpuMeter, names};
use crate::database;
use crate::latency::ms;
use crate::producer::{self, Bulk, Produced, Stamp, Targets};
use crate::progress::Progress;
use crate::report::{Table, count};
use crate::service::Service;

/// The plain table, beside `events` in the same database.
const PLAIN: &str = "plain_events";

/// What an application's table would be without event-piper: the columns and indexes of
/// postgresql/schema.sql's `events`, an ordinary `bigserial` id, no trigger.
const PLAIN_SCHEMA: &str = "
    CREATE TABLE plain_events (
        id         bigserial   PRIMARY KEY,
        type       text        NOT NULL,
        timestamp  timestamptz NOT NULL DEFAULT now(),
        subscriber text,
        payload    jsonb       NOT NULL DEFAULT '{}'
    );
    CREATE INDEX plain_events_subscriber_id_idx ON plain_events (subscriber, id);
    CREATE INDEX plain_events_broadcast_id_idx ON plain_events (id) WHERE subscriber IS NULL;
";

/// Consumers the events are spread over, one stream each: every event is read by one stream.
const CONSUMERS: usize = 8;

/// The multi-row and COPY check: beside this many single-row producers, statements of this many
/// rows, one every pause.
const BULK_BESIDE: usize = 8;
const BULK_CHUNK: u64 = 1000;
const BULK_PAUSE: Duration = Duration::from_millis(100);

/// The paced phase's latency target.
const P99_TARGET: Duration = Duration::from_millis(10);

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let url = bench.db.fresh("bench_producers").await?;
    database::connect(&url)
        .await?
        .batch_execute(PLAIN_SCHEMA)
        .await
        .context("creating the plain table")?;
    let storage = bench.db.storage().await?;
    eprintln!("  {storage}");
    let service = Service::start(&bench.launch, &url, "producers").await?;
    let measured = measure(bench, &service, &url).await;
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

async fn measure(bench: &Bench, service: &Service, url: &str) -> Result<Vec<Table>> {
    let mut tables = Vec::new();
    for (letter, synchronous_commit) in [("a", true), ("b", false)] {
        let setting = on_off(synchronous_commit);
        let mut table = Table::new(format!(
            "7{letter}. producers: single-row autocommit INSERTs as fast as they go, \
             synchronous_commit = {setting}; a plain table vs events with the service streaming \
             every event to {CONSUMERS} consumers"
        ));
        for &producers in &bench.args.producer_connections {
            let before = plain(bench, service, url, producers, synchronous_commit).await?;
            let events = events(bench, service, url, producers, synchronous_commit).await?;
            let after = plain(bench, service, url, producers, synchronous_commit).await?;
            flood_rows(&mut table, producers, [&before, &after], &events);
        }
        table.note(
            "Plain: `plain_events` (bigserial id, the columns and indexes of `events`, no \
             trigger) in the same database, measured just before and just after each events \
             phase; the ratio is against the higher of the two. Each phase is `--duration` long.",
        );
        tables.push(table);
    }
    tables.push(bulk(bench, service, url).await?);
    tables.push(paced(bench, service, url).await?);
    Ok(tables)
}

struct PlainRun {
    produced: Produced,
    cpu: String,
}

/// The same producers against the plain table (nothing streams it; the service idles).
async fn plain(
    bench: &Bench,
    service: &Service,
    url: &str,
    producers: usize,
    synchronous_commit: bool,
) -> Result<PlainRun> {
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let counter = Arc::new(AtomicU64::new(0));
    let label = format!("plain {producers} sync {}", on_off(synchronous_commit));
    let progress = Progress::start(label, Arc::clone(&counter), None, 0);
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
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
                producer::walkthrough_sinks(&url, producers, PLAIN, synchronous_commit).await?;
            producer::flood_with(sinks, duration, targets).await
        })
        .await
        .context("producer task")??;
    let cpu = cpu.describe();
    drop(progress);
    Ok(PlainRun { produced, cpu })
}

/// The same producers against `events`, every event streamed and checked.
async fn events(
    bench: &Bench,
    service: &Service,
    url: &str,
    producers: usize,
    synchronous_commit: bool,
) -> Result<Outcome> {
    let label = format!("events {producers} sync {}", on_off(synchronous_commit));
    let mut plan = Plan::one_connection_each(label, "prod", CONSUMERS, 0.0);
    plan.stamp = Stamp::Sent;
    let (url_owned, duration) = (url.to_owned(), bench.args.duration);
    live::run_with(bench, service, url, plan, move |targets| async move {
        let sinks =
            producer::walkthrough_sinks(&url_owned, producers, "events", synchronous_commit)
                .await?;
        producer::flood_with(sinks, duration, targets).await
    })
    .await
}

fn flood_rows(table: &mut Table, producers: usize, plain: [&PlainRun; 2], events: &Outcome) {
    let label = format!(
        "{producers} producer{}",
        if producers == 1 { "" } else { "s" }
    );
    let higher = if plain[0].produced.rate() >= plain[1].produced.rate() {
        plain[0]
    } else {
        plain[1]
    };
    let ratio = events.produced.rate() / higher.produced.rate().max(1e-9);
    table
        .info(
            format!("{label}: commits/s, plain before · events · plain after"),
            format!(
                "{} · {} · {}",
                count(plain[0].produced.rate()),
                count(events.produced.rate()),
                count(plain[1].produced.rate())
            ),
        )
        .check(
            format!("{label}: events / plain"),
            format!("{ratio:.2}"),
            ">= 0.90",
            ratio >= 0.90,
        )
        .info(
            format!("{label}: commit round trip p50 / p99, plain · events"),
            format!(
                "{} / {} · {} / {}",
                ms(higher.produced.commit.p50),
                ms(higher.produced.commit.p99),
                ms(events.produced.commit.p50),
                ms(events.produced.commit.p99)
            ),
        );
    live::describe_sent(table, &label, events, "INSERT", None);
    table.info(format!("{label}: CPU, plain"), higher.cpu.clone());
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
