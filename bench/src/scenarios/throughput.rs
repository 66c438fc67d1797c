//! Scenario 2, throughput: producers insert transactions of 100 rows back to back, as fast as
//! PostgreSQL takes them, for one consumer. The ceiling is PostgreSQL's own insert rate, measured
//! in the same run with the same producers and no service running, once before and once after
//! the service's phase (the first phase on a fresh cluster also pays for WAL segment creation and
//! the cache warming up): the higher of the two is the ceiling. Target: delivered >= 90 % of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Bench, CpuMeter, names};
use crate::consumer::{self, ConnSpec, Shared};
use crate::fleet::Fleet;
use crate::latency::ms;
use crate::ledger::Ledger;
use crate::producer::{self, Produced, Stamp, Targets};
use crate::progress::Progress;
use crate::report::{Table, count};
use crate::service::Service;

/// How long the consumer may take to catch up once producers stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let (producers, batch) = (bench.args.producers, bench.args.batch);

    let before = ceiling(bench, "bench_ceiling_before").await?;
    // The service delivering to one consumer.
    let url = bench.db.fresh("bench_throughput").await?;
    let service = Service::start(&bench.launch, &url, "throughput").await?;
    let measured = deliver(bench, &service, &url).await;
    service.stop().await?;
    let measured = measured?;
    let after = ceiling(bench, "bench_ceiling_after").await?;
    let ceilings = [&before, &after];
    let (ceiling, ceiling_cpu) = if before.0.rate() >= after.0.rate() {
        &before
    } else {
        &after
    };

    let mut table = Table::new(format!(
        "2. throughput: {batch}-row transactions as fast as PostgreSQL takes them, {producers} producer connections, 1 consumer"
    ));
    let ratio = measured.delivered_rate / ceiling.rate();
    table
        .info(
            "ceiling: PostgreSQL insert rate, no service (before · after the service's phase)",
            ceilings
                .map(|(c, _)| format!("{} events/s", count(c.rate())))
                .join(" · "),
        )
        .info(
            "ceiling: insert round trip p50 / p99",
            format!("{} / {}", ms(ceiling.commit.p50), ms(ceiling.commit.p99)),
        )
        .info("ceiling: CPU (the higher run)", ceiling_cpu.clone())
        .info(
            "with the service: producers' insert rate",
            format!(
                "{} events/s ({} rows)",
                count(measured.produced.rate()),
                count(measured.produced.rows as f64)
            ),
        )
        .info(
            "with the service: delivered",
            format!(
                "{} events/s ({} frames from first insert to last frame, {:.1} s)",
                count(measured.delivered_rate),
                count(measured.received as f64),
                measured.window.as_secs_f64()
            ),
        )
        .check(
            "delivered / ceiling",
            format!("{:.1} %", ratio * 100.0),
            ">= 90 %",
            ratio >= 0.9,
        )
        .info(
            "latency p50 / p99 / max (commit returned → frame read)",
            format!(
                "{} / {} / {}",
                ms(measured.latency.p50),
                ms(measured.latency.p99),
                ms(measured.latency.max)
            ),
        )
        .info(
            "last frame after producers stopped",
            measured.drain.map_or("never (timed out)".into(), ms),
        )
        .check(
            "exactly once, in order",
            measured.check.clone(),
            "all 0",
            measured.errors == 0,
        )
        .info("with the service: CPU", measured.cpu.clone());
    table.delivery_errors += measured.errors;
    Ok(vec![table])
}

/// PostgreSQL's insert rate with the same producers and no service, into a fresh database.
async fn ceiling(bench: &Bench, database: &str) -> Result<(Produced, String)> {
    let url = bench.db.fresh(database).await?;
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("ceiling".into(), Arc::clone(&counter), None, 0);
    let cpu = CpuMeter::start(None, bench.db.postmaster_pid());
    let targets = Targets {
        consumers: names("ceiling", 1),
        types: crate::producer::one_type(),
        ledger: None,
        counter,
        stamp: Stamp::Committed,
    };
    let produced = flood(bench, &url, targets).await?;
    let cpu = cpu.describe();
    drop(progress);
    Ok((produced, cpu))
}

async fn flood(bench: &Bench, url: &str, targets: Targets) -> Result<Produced> {
    let (producers, batch, duration) =
        (bench.args.producers, bench.args.batch, bench.args.duration);
    let url = url.to_owned();
    bench
        .producers
        .spawn(async move { producer::flood(&url, producers, batch, duration, targets).await })
        .await
        .context("producer task")?
}

struct Measured {
    produced: Produced,
    received: u64,
    delivered_rate: f64,
    window: Duration,
    drain: Option<Duration>,
    latency: crate::latency::Summary,
    check: String,
    errors: u64,
    cpu: String,
}

async fn deliver(bench: &Bench, service: &Service, url: &str) -> Result<Measured> {
    let ledger = Arc::new(Ledger::new(super::live::next_id(url).await?, bench.epoch));
    let shared = Shared::new(Arc::clone(&ledger), true);
    let consumers = names("thr", 1);
    let spec = ConnSpec {
        consumer: consumers[0].clone(),
        index: 0,
        last_event_id: None,
        only_type: None,
    };
    let deadline = Instant::now() + bench.args.duration + Duration::from_secs(600);
    let fleet = Fleet::open(service.addr, vec![spec], Arc::clone(&shared), 1, deadline);
    fleet.wait_live(Duration::from_secs(30)).await?;

    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        "throughput".into(),
        Arc::clone(&counter),
        Some(Arc::clone(&shared)),
        1,
    );
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let started = ledger.nanos(Instant::now());
    let targets = Targets {
        consumers,
        types: crate::producer::one_type(),
        ledger: Some(Arc::clone(&ledger)),
        counter,
        stamp: Stamp::Committed,
    };
    let produced = flood(bench, url, targets).await?;
    let stopped = Instant::now();
    let arrived = consumer::wait_until(DRAIN_TIMEOUT, || {
        shared.frames.load(Ordering::Relaxed) >= produced.rows
            || shared.failed.load(Ordering::Relaxed) > 0
    })
    .await;
    let drain = (arrived && shared.frames.load(Ordering::Relaxed) >= produced.rows)
        .then(|| stopped.elapsed());
    let cpu = cpu.describe();
    drop(progress);
    let last = shared.last_frame_ns.load(Ordering::Relaxed);
    let window = Duration::from_nanos(last.saturating_sub(started));
    let settled = fleet.close().await;
    for error in &settled.errors {
        eprintln!("  connection error: {error}");
    }
    let received = settled.delivery.received;
    let errors = settled.delivery.errors() + produced.unrecorded;
    Ok(Measured {
        received,
        delivered_rate: received as f64 / window.as_secs_f64().max(1e-9),
        window,
        drain,
        latency: shared.latencies.summary(),
        check: settled.delivery.describe(),
        errors,
        produced,
        cpu,
    })
}
