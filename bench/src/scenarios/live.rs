//! The live run shared by the latency, fanout, filter, dbcost, producers and publish scenarios:
//! connections open and live first, then producers run (single-row transactions at a steady rate
//! by default, or whatever producing future the scenario passes to [`run_with`]), then the bench
//! waits for the last frame and settles every connection against the ledger.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Bench, CpuMeter};
use crate::consumer::{ConnSpec, Shared};
use crate::database;
use crate::fleet::{Fleet, Settled};
use crate::latency::{Summary, ms};
use crate::ledger::Ledger;
use crate::producer::{self, Produced, Stamp, Targets};
use crate::progress::Progress;
use crate::report::{Table, count};
use crate::service::Service;

/// How long the last frames may take to arrive after the producers stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the backlog (committed but not yet delivered) is sampled.
const BACKLOG_EVERY: Duration = Duration::from_millis(5);

pub struct Plan {
    pub label: String,
    pub consumers: Arc<[Arc<str>]>,
    /// Event types the producers cycle through (see [`Targets::types`]).
    pub types: Arc<[Arc<str>]>,
    pub specs: Vec<ConnSpec>,
    pub rate: f64,
    /// What latency is measured from.
    pub stamp: Stamp,
}

impl Plan {
    /// `n` consumers named `prefix-i`, one connection each, none resuming.
    pub fn one_connection_each(label: String, prefix: &str, n: usize, rate: f64) -> Plan {
        let consumers = super::names(prefix, n);
        let specs = consumers
            .iter()
            .enumerate()
            .map(|(index, consumer)| ConnSpec {
                consumer: consumer.clone(),
                index: index as u32,
                last_event_id: None,
                only_type: None,
            })
            .collect();
        Plan {
            label,
            consumers,
            types: producer::one_type(),
            specs,
            rate,
            stamp: Stamp::Committed,
        }
    }
}

pub struct Outcome {
    pub produced: Produced,
    pub settled: Settled,
    pub latency: Summary,
    /// Frames the connections should have received in all.
    pub expected_frames: u64,
    /// From the producers' end to the last expected frame; `None` if it never came.
    pub drain: Option<Duration>,
    pub connect_time: Duration,
    pub cpu: String,
    /// The service's share of `cpu`, in cores.
    pub service_cores: Option<f64>,
    /// The most events committed (returned to their producer) but not yet read by a consumer,
    /// sampled every few milliseconds while producers ran. Meaningful when each event goes to
    /// exactly one connection.
    pub behind_max: u64,
}

impl Outcome {
    /// The rate was sustained: producers kept to the schedule (>= 95 %) and delivery kept up
    /// with them (everything in within a second of the end).
    pub fn sustained(&self, rate: f64) -> bool {
        self.produced.rate() >= 0.95 * rate
            && self.drain.is_some_and(|d| d <= Duration::from_secs(1))
    }
}

/// The first id this run's producers can get: everything at or below the current maximum exists.
pub async fn next_id(url: &str) -> Result<i64> {
    let client = database::connect(url).await?;
    let row = client
        .query_one("SELECT coalesce(max(id), 0) + 1 FROM events", &[])
        .await?;
    Ok(row.try_get(0)?)
}

/// The paced run: `--producers` connections inserting single-row transactions at the plan's rate.
pub async fn run(bench: &Bench, service: &Service, url: &str, plan: Plan) -> Result<Outcome> {
    let (producers, rate, duration) = (bench.args.producers, plan.rate, bench.args.duration);
    let url_owned = url.to_owned();
    run_with(bench, service, url, plan, move |targets| async move {
        producer::paced(&url_owned, producers, rate, duration, targets).await
    })
    .await
}

/// The live run with any producers: `produce` gets the targets (consumers, ledger, counter) and
/// returns the future that produces, which runs on the producers' runtime.
pub async fn run_with<F, Fut>(
    bench: &Bench,
    service: &Service,
    url: &str,
    plan: Plan,
    produce: F,
) -> Result<Outcome>
where
    F: FnOnce(Targets) -> Fut,
    Fut: Future<Output = Result<Produced>> + Send + 'static,
{
    let duration = bench.args.duration;
    let ledger = Arc::new(Ledger::new(next_id(url).await?, bench.epoch));
    let shared = Shared::new(Arc::clone(&ledger), true);
    let connections = plan.specs.len();
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    // A backstop: every connection task ends by itself at the latest here.
    let deadline = Instant::now() + duration + Duration::from_secs(600);
    let fleet = Fleet::open(
        service.addr,
        plan.specs.clone(),
        Arc::clone(&shared),
        bench.args.connect_concurrency,
        deadline,
    );
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        plan.label.clone(),
        Arc::clone(&counter),
        Some(Arc::clone(&shared)),
        connections,
    );
    let connect_time = fleet.wait_live(Duration::from_secs(180)).await?;
    let pace = if plan.rate > 0.0 {
        format!("{} events/s", plan.rate)
    } else {
        "as fast as they go".into()
    };
    eprintln!(
        "  {connections} connections live in {:.1} s; producing {pace} for {duration:?}",
        connect_time.as_secs_f64(),
    );

    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let backlog = Backlog::start(Arc::clone(&counter), Arc::clone(&shared), deadline);
    let targets = Targets {
        consumers: Arc::clone(&plan.consumers),
        types: Arc::clone(&plan.types),
        ledger: Some(Arc::clone(&ledger)),
        counter,
        stamp: plan.stamp,
    };
    let produced = bench
        .producers
        .spawn(produce(targets))
        .await
        .context("producer task")??;
    let stopped = Instant::now();
    let behind_max = backlog.stop();
    let expected_frames: u64 = plan
        .specs
        .iter()
        .map(|spec| {
            let kind = spec.only_type.as_ref().map(|only| only.kind);
            produced.rows_for(spec.index, kind)
        })
        .sum();
    let drain = shared
        .drained(expected_frames, DRAIN_TIMEOUT, stopped)
        .await;
    let (service_cores, cpu) = (cpu.service_cores(), cpu.describe());
    drop(progress);
    let settled = fleet.close().await;
    for error in &settled.errors {
        eprintln!("  connection error: {error}");
    }
    Ok(Outcome {
        latency: shared.latencies.summary(),
        produced,
        settled,
        expected_frames,
        drain,
        connect_time,
        cpu,
        service_cores,
        behind_max,
    })
}

/// Samples committed-minus-delivered until stopped (or the deadline).
struct Backlog {
    max: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backlog {
    fn start(committed: Arc<AtomicU64>, shared: Arc<Shared>, deadline: Instant) -> Backlog {
        let max = Arc::new(AtomicU64::new(0));
        let sampled = Arc::clone(&max);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(BACKLOG_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < deadline {
                ticker.tick().await;
                // Delivered first, then committed: a sample can only overstate the backlog by what
                // committed in between, never hide it.
                let delivered = shared.frames.load(Ordering::Relaxed);
                let behind = committed.load(Ordering::Relaxed).saturating_sub(delivered);
                sampled.fetch_max(behind, Ordering::Relaxed);
            }
        });
        Backlog { max, task }
    }

    fn stop(self) -> u64 {
        self.task.abort();
        self.max.load(Ordering::Relaxed)
    }
}

/// The rows every paced scenario reports; latency targets are the caller's.
pub fn describe(table: &mut Table, outcome: &Outcome, rate: f64, producers: usize) {
    let produced = &outcome.produced;
    table
        .info(
            "producers: events committed",
            format!(
                "{} in {:.1} s = {} events/s (target rate {}; {producers} connections; schedule lag max {})",
                count(produced.rows as f64),
                produced.elapsed.as_secs_f64(),
                count(produced.rate()),
                count(rate),
                ms(produced.max_behind)
            ),
        )
        .info(
            "producers: insert round trip p50 / p99 / max",
            format!(
                "{} / {} / {}",
                ms(produced.commit.p50),
                ms(produced.commit.p99),
                ms(produced.commit.max)
            ),
        )
        .info(
            "frames delivered / expected",
            format!(
                "{} / {} ({} connections)",
                count(outcome.settled.delivery.received as f64),
                count(outcome.expected_frames as f64),
                outcome.settled.delivery.connections
            ),
        )
        .info(
            "last frame after producers stopped",
            outcome
                .drain
                .map_or("never (timed out)".into(), ms),
        );
    let delivery = &outcome.settled.delivery;
    table.check(
        "exactly once, in order",
        delivery.describe(),
        "all 0",
        delivery.errors() == 0 && produced.unrecorded == 0,
    );
    table.delivery_errors += delivery.errors() + produced.unrecorded;
    let latency = &outcome.latency;
    table.info(
        "latency samples",
        format!(
            "{} ({} unmatched)",
            count(latency.samples as f64),
            outcome.settled.unmatched
        ),
    );
    table.info("CPU during the run", outcome.cpu.clone());
}

/// The rows of a run timed from the send (the write-path scenarios), under `label`: delivery,
/// latency (a check when `p99_target` is given), how far behind delivery got, CPU.
pub fn describe_sent(
    table: &mut Table,
    label: &str,
    outcome: &Outcome,
    sent: &str,
    p99_target: Option<Duration>,
) {
    let produced = &outcome.produced;
    let delivery = &outcome.settled.delivery;
    let errors = delivery.errors() + produced.unrecorded;
    table.check(
        format!("{label}: delivered / committed, exactly once in order"),
        format!(
            "{} / {} · {}",
            count(delivery.received as f64),
            count(produced.rows as f64),
            delivery.describe()
        ),
        "all, 0 errors",
        errors == 0 && delivery.received == produced.rows && outcome.drain.is_some(),
    );
    table.delivery_errors += errors;
    let latency = &outcome.latency;
    let metric = format!("{label}: latency p50 / p99 / max ({sent} sent → frame read)");
    let value = latency.p50_p99_max();
    match p99_target {
        Some(target) => table.check(
            metric,
            value,
            format!("p99 < {}", ms(target)),
            latency.p99 < target,
        ),
        None => table.info(metric, value),
    };
    table
        .info(
            format!(
                "{label}: behind: max committed − delivered · last frame after producers stopped"
            ),
            format!(
                "{} events · {}",
                count(outcome.behind_max as f64),
                outcome.drain.map_or("never (timed out)".into(), ms)
            ),
        )
        .info(format!("{label}: CPU"), outcome.cpu.clone());
}
