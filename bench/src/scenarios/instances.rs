//! Issue 20, many instances on one database: what each service instance costs PostgreSQL, at
//! idle and at a paced event rate, and whether that cost follows the number of instances or the
//! number of streams.
//!
//! `--instances` services run against one database, each as its own PostgreSQL role
//! (`bench_instance_<i>`, created here; superusers, the cluster trusts loopback). The role is what
//! lets PostgreSQL itself attribute the cost: pg_stat_statements keeps calls per (role, query),
//! and pg_stat_activity names each backend's role, so statements/s and connections per instance
//! come from the server's side with no change to the service. Streams (one consumer each) are
//! spread round-robin over the instances, the same number on each; producers connect as the
//! superuser, so their inserts never count as an instance's.
//!
//! Each count in `--instance-streams` is one run: streams open and live, an idle phase of
//! `--duration`, then producers at `--rate` for `--duration`; then every stream is settled against
//! the ledger, so the figures are those of a system that delivered every event exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use super::Bench;
use super::live::{self, Plan};
use crate::consumer::{self, Shared};
use crate::database;
use crate::delivery::DeliverySummary;
use crate::fleet::Fleet;
use crate::latency::ms;
use crate::ledger::Ledger;
use crate::producer::{self, Targets};
use crate::report::{Table, count};
use crate::service::Service;

/// Let the start-up statements (schema, pool warm-up) and the streams' opening replays finish
/// before the idle phase's first reading.
const SETTLE: Duration = Duration::from_secs(5);

/// How long the last frames may take to arrive after the producers stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The role instance `i` connects as.
fn role(i: usize) -> String {
    format!("bench_instance_{i}")
}

/// What one phase cost, per instance.
struct Phase {
    seconds: f64,
    /// Statements per instance over the phase.
    statements: Vec<u64>,
    /// Backends per instance at the phase's end.
    connections: Vec<i64>,
    /// Those backends by application name, summed over instances: which of them is which.
    kinds: String,
}

impl Phase {
    fn per_second(&self) -> Vec<f64> {
        self.statements
            .iter()
            .map(|&calls| calls as f64 / self.seconds.max(1e-9))
            .collect()
    }
}

struct Measured {
    streams_per_instance: usize,
    idle: Phase,
    busy: Phase,
    events: u64,
    produced_rate: f64,
    delivery: DeliverySummary,
    expected: u64,
    drain: Option<Duration>,
    p99: Duration,
    /// The busiest statements of the busy phase, summed over instances: (calls/s, text).
    top: Vec<(f64, String)>,
    /// WAL written over the busy phase (all of the server's, the producers' inserts above all).
    wal_bytes: i64,
}

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    if !bench.db.enable_statement_stats().await? {
        bail!("the instances scenario needs pg_stat_statements: run it on the bench's own cluster");
    }
    let instances = bench.args.instances.max(1);
    create_roles(bench, instances).await?;
    let mut runs = Vec::new();
    for per in bench.args.instance_streams.clone() {
        runs.push(measure(bench, instances, per).await?);
    }

    let rate = bench.args.rate;
    let mut tables = Vec::new();
    for m in &runs {
        let streams = m.streams_per_instance * instances;
        let mut table = Table::new(format!(
            "20. {instances} instances on one database, {} streams each ({} in all): statements and connections per instance",
            count(m.streams_per_instance as f64),
            count(streams as f64)
        ));
        for (label, phase) in [("idle", &m.idle), (&*format!("{rate} events/s"), &m.busy)] {
            let per = phase.per_second();
            let total: f64 = per.iter().sum();
            table.info(
                format!("{label}: statements/s per instance (pg_stat_statements, by role)"),
                format!(
                    "{} · total {:.1}/s over {:.1} s",
                    per.iter()
                        .map(|s| format!("{s:.1}"))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    total,
                    phase.seconds
                ),
            );
            table.info(
                format!("{label}: connections held per instance (pg_stat_activity, by role)"),
                phase
                    .connections
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(" / "),
            );
            table.info(
                format!("{label}: those connections by application_name, all instances"),
                phase.kinds.clone(),
            );
        }
        table.info(
            "producers: events committed",
            format!(
                "{} = {} events/s (target {})",
                count(m.events as f64),
                count(m.produced_rate),
                count(rate)
            ),
        );
        table.info(
            "WAL written during the busy phase (whole server)",
            format!(
                "{} bytes = {:.0} bytes per event",
                count(m.wal_bytes as f64),
                m.wal_bytes as f64 / m.events.max(1) as f64
            ),
        );
        for (calls, text) in &m.top {
            table.info(
                "busiest statement, calls/s (all instances)",
                format!("{calls:.1}: {text}"),
            );
        }
        table.info(
            "frames delivered / expected · last frame after producers stopped · latency p99",
            format!(
                "{} / {} · {} · {}",
                count(m.delivery.received as f64),
                count(m.expected as f64),
                m.drain.map_or("never (timed out)".into(), ms),
                ms(m.p99)
            ),
        );
        let errors = m.delivery.errors();
        table.check(
            "exactly once, in order, on every stream",
            m.delivery.describe(),
            "all 0",
            errors == 0 && m.delivery.received == m.expected,
        );
        table.delivery_errors += errors + m.expected.saturating_sub(m.delivery.received);
        tables.push(table);
    }
    if let (Some(first), Some(last)) = (runs.first(), runs.last())
        && runs.len() > 1
    {
        let total = |p: &Phase| p.per_second().iter().sum::<f64>();
        let mut table = Table::new(format!(
            "20. {instances} instances: {} against {} streams per instance",
            count(last.streams_per_instance as f64),
            count(first.streams_per_instance as f64)
        ));
        for (label, a, b) in [
            ("idle", &first.idle, &last.idle),
            ("busy", &first.busy, &last.busy),
        ] {
            table.info(
                format!("{label}: total statements/s, ratio"),
                format!(
                    "{:.1} → {:.1} (× {:.2})",
                    total(a),
                    total(b),
                    total(b) / total(a).max(1e-9)
                ),
            );
        }
        tables.push(table);
    }
    Ok(tables)
}

/// One login role per instance (roles are the cluster's, so once for every run).
async fn create_roles(bench: &Bench, instances: usize) -> Result<()> {
    let admin = database::connect(&bench.db.url("postgres")).await?;
    for i in 0..instances {
        let name = role(i);
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
            .await?
            .is_some();
        if !exists {
            // Superuser: the service applies its schema and takes advisory locks as the owner
            // would; the bench cluster trusts loopback, so no password.
            admin
                .batch_execute(&format!("CREATE ROLE {name} LOGIN SUPERUSER"))
                .await
                .with_context(|| format!("creating role {name}"))?;
        }
    }
    Ok(())
}

/// `url` with its user replaced by `user` (the bench's URLs are `postgres://user@host:port/db`).
fn as_user(url: &str, user: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority..];
    let host = rest.find('@').map_or(rest, |at| &rest[at + 1..]);
    format!("{}{user}@{host}", &url[..authority])
}

async fn measure(bench: &Bench, instances: usize, per: usize) -> Result<Measured> {
    let name = format!("bench_instances_{instances}_{per}");
    let url = bench.db.fresh(&name).await?;
    let mut services = Vec::with_capacity(instances);
    for i in 0..instances {
        let started = Service::start(
            &bench.launch,
            &as_user(&url, &role(i)),
            &format!("{name}_{i}"),
        )
        .await;
        match started {
            Ok(service) => services.push(service),
            Err(error) => {
                for service in services {
                    let _ = service.stop().await;
                }
                return Err(error);
            }
        }
    }
    let result = measure_with(bench, &services, &url, per).await;
    for service in services {
        service.stop().await?;
    }
    result
}

async fn measure_with(
    bench: &Bench,
    services: &[Service],
    url: &str,
    per: usize,
) -> Result<Measured> {
    let instances = services.len();
    let monitor = database::connect(url).await?;
    let plan = Plan::one_connection_each(
        format!("instances {instances}×{per}"),
        "inst",
        instances * per,
        bench.args.rate,
    );
    let ledger = Arc::new(Ledger::new(live::next_id(url).await?, bench.epoch));
    let shared = Shared::new(Arc::clone(&ledger), true);
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let deadline = Instant::now() + 2 * bench.args.duration + Duration::from_secs(600);
    // Stream k goes to instance k % n: the same count on each.
    let fleets: Vec<Fleet> = services
        .iter()
        .enumerate()
        .map(|(i, service)| {
            let specs = plan
                .specs
                .iter()
                .filter(|spec| spec.index as usize % instances == i)
                .cloned()
                .collect();
            Fleet::open(
                service.addr,
                specs,
                Arc::clone(&shared),
                bench.args.connect_concurrency,
                deadline,
            )
        })
        .collect();
    // Fleet::wait_live counts one fleet against the shared counter; here all share it.
    let total = plan.specs.len();
    let live = consumer::wait_until(Duration::from_secs(180), || {
        shared.live.load(Ordering::Relaxed) == total || shared.failed.load(Ordering::Relaxed) > 0
    })
    .await;
    if !live || shared.failed.load(Ordering::Relaxed) > 0 {
        bail!(
            "{} of {total} streams live, {} failed",
            shared.live.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed)
        );
    }
    eprintln!(
        "  {total} streams live over {instances} instances; idle for {:?}",
        bench.args.duration
    );
    tokio::time::sleep(SETTLE).await;

    // Idle: streams open, nothing produced.
    let before = calls(&monitor, instances).await?;
    let started = Instant::now();
    tokio::time::sleep(bench.args.duration).await;
    let after = calls(&monitor, instances).await?;
    let idle = Phase {
        seconds: started.elapsed().as_secs_f64(),
        statements: delta(&before, &after),
        connections: connections(&monitor, instances).await?,
        kinds: kinds(&monitor).await?,
    };

    // Busy: paced producers.
    eprintln!(
        "  producing {} events/s for {:?}",
        bench.args.rate, bench.args.duration
    );
    monitor
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await?;
    let before = calls(&monitor, instances).await?;
    let wal_before = wal_lsn(&monitor).await?;
    let started = Instant::now();
    let targets = Targets {
        consumers: Arc::clone(&plan.consumers),
        types: Arc::clone(&plan.types),
        ledger: Some(Arc::clone(&ledger)),
        counter: Arc::new(AtomicU64::new(0)),
        stamp: plan.stamp,
    };
    let (producer_url, producers, rate, duration) = (
        url.to_owned(),
        bench.args.producers,
        bench.args.rate,
        bench.args.duration,
    );
    let produced = bench
        .producers
        .spawn(
            async move { producer::paced(&producer_url, producers, rate, duration, targets).await },
        )
        .await
        .context("producer task")??;
    let stopped = Instant::now();
    let expected: u64 = plan
        .specs
        .iter()
        .map(|spec| produced.rows_for(spec.index, None))
        .sum();
    let drain = shared.drained(expected, DRAIN_TIMEOUT, stopped).await;
    // The phase ends when delivery does: the statements that delivered the last events count.
    let after = calls(&monitor, instances).await?;
    let busy = Phase {
        seconds: started.elapsed().as_secs_f64(),
        statements: delta(&before, &after),
        connections: connections(&monitor, instances).await?,
        kinds: kinds(&monitor).await?,
    };
    let top = busiest(&monitor, busy.seconds).await?;
    // Everything written to WAL over the phase, the producers' inserts above all: what a
    // primary ships to every replica per event.
    let wal_bytes = wal_lsn(&monitor).await? - wal_before;

    let mut delivery = DeliverySummary::default();
    for fleet in fleets {
        let settled = fleet.close().await;
        for error in &settled.errors {
            eprintln!("  connection error: {error}");
        }
        let d = settled.delivery;
        delivery.connections += d.connections;
        delivery.received += d.received;
        delivery.lost += d.lost;
        delivery.duplicates += d.duplicates;
        delivery.out_of_order += d.out_of_order;
        delivery.foreign += d.foreign;
        delivery.failed += d.failed;
    }
    Ok(Measured {
        streams_per_instance: per,
        idle,
        busy,
        events: produced.rows,
        produced_rate: produced.rate(),
        delivery,
        expected,
        drain,
        p99: shared.latencies.summary().p99,
        top,
        wal_bytes,
    })
}

/// The server's current WAL insert position, in bytes.
async fn wal_lsn(monitor: &Client) -> Result<i64> {
    let row = monitor
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect()
}

/// Statements each instance's role has run in this database so far (pg_stat_statements counts a
/// statement when it ends, so the reading is current).
async fn calls(monitor: &Client, instances: usize) -> Result<Vec<u64>> {
    let rows = monitor
        .query(
            "SELECT r.rolname, sum(s.calls)::bigint FROM pg_stat_statements s \
             JOIN pg_roles r ON r.oid = s.userid \
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             GROUP BY r.rolname",
            &[],
        )
        .await?;
    by_instance(rows, instances, |calls: i64| calls as u64)
}

/// Backends each instance's role holds on this server now (the pool, the listener, the bell).
async fn connections(monitor: &Client, instances: usize) -> Result<Vec<i64>> {
    let rows = monitor
        .query(
            "SELECT usename::text, count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' GROUP BY usename",
            &[],
        )
        .await?;
    by_instance(rows, instances, |n: i64| n)
}

/// The instances' backends by `application_name` ("event-piper 4 · ..."), all instances together.
async fn kinds(monitor: &Client) -> Result<String> {
    let rows = monitor
        .query(
            "SELECT application_name, count(*) FROM pg_stat_activity \
             WHERE usename LIKE 'bench\\_instance\\_%' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    let mut parts = Vec::with_capacity(rows.len());
    for row in rows {
        let (name, n): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        parts.push(format!("{name} {n}"));
    }
    Ok(parts.join(" · "))
}

fn by_instance<T: Default + Clone>(
    rows: Vec<tokio_postgres::Row>,
    instances: usize,
    value: impl Fn(i64) -> T,
) -> Result<Vec<T>> {
    let mut out = vec![T::default(); instances];
    for row in rows {
        let (name, n): (Option<String>, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
        let instance = name
            .as_deref()
            .and_then(|name| name.strip_prefix("bench_instance_"))
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(i) = instance
            && i < instances
        {
            out[i] = value(n.unwrap_or(0));
        }
    }
    Ok(out)
}

/// The instances' five most-called statements since the reset, as calls/s.
async fn busiest(monitor: &Client, seconds: f64) -> Result<Vec<(f64, String)>> {
    let rows = monitor
        .query(
            "SELECT s.query, sum(s.calls)::bigint AS calls FROM pg_stat_statements s \
             JOIN pg_roles r ON r.oid = s.userid \
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND r.rolname LIKE 'bench\\_instance\\_%' \
             GROUP BY s.query ORDER BY calls DESC LIMIT 5",
            &[],
        )
        .await?;
    let mut top = Vec::with_capacity(rows.len());
    for row in rows {
        let (text, calls): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        // One line, short: the table is for reading.
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let text: String = text.chars().take(90).collect();
        top.push((calls as f64 / seconds.max(1e-9), text));
    }
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_user() {
        assert_eq!(
            as_user(
                "postgres://event_piper@127.0.0.1:5432/b",
                "bench_instance_1"
            ),
            "postgres://bench_instance_1@127.0.0.1:5432/b"
        );
        assert_eq!(
            as_user("postgres://127.0.0.1:5432/b", "x"),
            "postgres://x@127.0.0.1:5432/b"
        );
    }
}
