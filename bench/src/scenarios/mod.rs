//! The scenarios of issue 4 (latency ... dbcost), issue 9 (producers, publish: what
//! event-piper costs the application's writers), type filters (filter) and webhook delivery
//! (webhooks), and what they share: the bench context, the live run, CPU accounting.

mod connections;
mod dbcost;
mod fanout;
mod filter;
mod instances;
mod latency;
mod live;
mod producers;
mod publish;
mod replay;
mod storm;
mod throughput;
mod topics;
mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{Args, Scenario};
use crate::database::Database;
use crate::procfs;
use crate::report::Table;
use crate::service::Launch;

/// Everything a scenario needs.
pub struct Bench {
    pub args: Args,
    pub db: Database,
    pub launch: Launch,
    /// The producers' own runtime.
    pub producers: tokio::runtime::Handle,
    /// Time zero of every ledger.
    pub epoch: Instant,
}

pub async fn run(scenario: Scenario, bench: &mut Bench) -> Result<Vec<Table>> {
    match scenario {
        Scenario::Latency => latency::run(bench).await,
        Scenario::Throughput => throughput::run(bench).await,
        Scenario::Fanout => fanout::run(bench).await,
        Scenario::Filter => filter::run(bench).await,
        Scenario::Connections => connections::run(bench).await,
        Scenario::Replay => replay::run(bench).await,
        Scenario::Dbcost => dbcost::run(bench).await,
        Scenario::Producers => producers::run(bench).await,
        Scenario::Publish => publish::run(bench).await,
        Scenario::Webhooks => webhooks::run(bench).await,
        Scenario::Topics => topics::run(bench).await,
        Scenario::Storm => storm::run(bench).await,
        Scenario::Instances => instances::run(bench).await,
        Scenario::All => unreachable!("expanded by the caller"),
    }
}

/// The median of `values` (NaN when there are none): what repeated runs on a shared machine are
/// summed up by.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Consumer names `prefix-0`, `prefix-1`, ...
fn names(prefix: &str, count: usize) -> Arc<[Arc<str>]> {
    (0..count)
        .map(|i| Arc::from(format!("{prefix}-{i}")))
        .collect()
}

/// CPU used by the service, PostgreSQL, the bench and everything else on the machine over a
/// phase, against wall time: on a two-core machine shared by all of them, this is usually what
/// bounds a figure, and "others" shows a run disturbed by unrelated work.
pub struct CpuMeter {
    started: Instant,
    service_pid: Option<u32>,
    postmaster: Option<u32>,
    start: [Duration; 4],
}

impl CpuMeter {
    pub fn start(service_pid: Option<u32>, postmaster: Option<u32>) -> CpuMeter {
        let mut meter = CpuMeter {
            started: Instant::now(),
            service_pid,
            postmaster,
            start: [Duration::ZERO; 4],
        };
        meter.start = meter.read();
        meter
    }

    fn read(&self) -> [Duration; 4] {
        [
            self.service_pid.map_or(Duration::ZERO, procfs::cpu),
            self.postmaster.map_or(Duration::ZERO, procfs::cpu_tree),
            procfs::own_cpu(),
            procfs::machine_busy(),
        ]
    }

    /// The service's cores over the phase so far (`None` without a service), for comparing runs.
    pub fn service_cores(&self) -> Option<f64> {
        let pid = self.service_pid?;
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        Some(procfs::cpu(pid).saturating_sub(self.start[0]).as_secs_f64() / wall)
    }

    /// "service 0.62 · postgres 0.55 · bench 0.40 cores" over the phase so far.
    pub fn describe(&self) -> String {
        let now = self.read();
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let cores = |i: usize| now[i].saturating_sub(self.start[i]).as_secs_f64() / wall;
        let mut parts = Vec::new();
        if self.service_pid.is_some() {
            parts.push(format!("service {:.2}", cores(0)));
        }
        if self.postmaster.is_some() {
            parts.push(format!("postgres {:.2}", cores(1)));
        }
        parts.push(format!("bench {:.2}", cores(2)));
        if self.postmaster.is_some() {
            let ours = cores(0) + cores(1) + cores(2);
            parts.push(format!("others {:.2}", (cores(3) - ours).max(0.0)));
        }
        format!("{} cores (of 2)", parts.join(" · "))
    }
}

/// Waits (at most `timeout`) until the machine is nearly idle, so that a phase does not start
/// while unrelated work (a build, a test suite) holds the cores. Returns whether it was.
pub async fn wait_for_quiet(timeout: Duration) -> bool {
    const WINDOW: Duration = Duration::from_secs(1);
    const QUIET_CORES: f64 = 0.3;
    let deadline = Instant::now() + timeout;
    let mut warned = false;
    loop {
        let before = procfs::machine_busy();
        tokio::time::sleep(WINDOW).await;
        let busy =
            procfs::machine_busy().saturating_sub(before).as_secs_f64() / WINDOW.as_secs_f64();
        if busy < QUIET_CORES {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "  !!! the machine is still busy ({busy:.2} cores) after {timeout:?}: measuring anyway"
            );
            return false;
        }
        if !warned {
            eprintln!("  waiting for the machine to quiet down ({busy:.2} cores busy)...");
            warned = true;
        }
    }
}
