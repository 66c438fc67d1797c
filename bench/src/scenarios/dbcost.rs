//! Scenario 6, database cost: the queries per second the service issues at 1,000 events/s with
//! 1,000 connections versus 10 (one consumer per connection). Target: the query rate does not
//! grow with connections.
//!
//! Counted two ways. Exactly, with pg_stat_statements (loaded by restarting the managed cluster):
//! every statement the service ran in the scenario's database, by kind. And as a cross-check, the
//! database's `xact_commit` delta minus the producers' own transactions (every service query is
//! an autocommit transaction).

use std::time::Duration;

use anyhow::Result;

use super::Bench;
use super::live::{self, Plan};
use crate::database;
use crate::latency::ms;
use crate::report::{Table, count};
use crate::service::Service;

/// An idle backend flushes its pending statistics (xact_commit) after at most 10 s
/// (PGSTAT_IDLE_INTERVAL); waiting longer makes the xact_commit reading complete.
const STATS_FLUSH: Duration = Duration::from_secs(11);

/// What the service ran during one run, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Queries {
    new_events: u64,
    gap_checks: u64,
    replay: u64,
    other: u64,
}

impl Queries {
    fn total(&self) -> u64 {
        self.new_events + self.gap_checks + self.replay + self.other
    }
}

struct Measured {
    connections: usize,
    seconds: f64,
    events: u64,
    statements: Option<Queries>,
    xacts: i64,
    p99: Duration,
    check: String,
    errors: u64,
}

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let exact = bench.db.enable_statement_stats().await?;
    if !exact {
        eprintln!("  pg_stat_statements unavailable (external database): xact_commit only");
    }
    let mut runs = Vec::new();
    for connections in bench.args.dbcost_connections.clone() {
        runs.push(measure(bench, connections, exact).await?);
    }

    let rate = bench.args.rate;
    let mut table = Table::new(format!(
        "6. database cost: service queries at {rate} events/s, one consumer per connection"
    ));
    let per_second = |m: &Measured| match m.statements {
        Some(q) => q.total() as f64 / m.seconds,
        None => m.xacts as f64 / m.seconds,
    };
    for m in &runs {
        let label = format!("{} connections", count(m.connections as f64));
        if let Some(q) = m.statements {
            table.info(
                format!("{label}: service queries/s (pg_stat_statements)"),
                format!(
                    "{:.0}/s = new-event reads {:.0} + gap checks {:.0} + replay pages {:.0} + other {:.0}; {:.2} per event",
                    q.total() as f64 / m.seconds,
                    q.new_events as f64 / m.seconds,
                    q.gap_checks as f64 / m.seconds,
                    q.replay as f64 / m.seconds,
                    q.other as f64 / m.seconds,
                    q.total() as f64 / m.events.max(1) as f64
                ),
            );
        }
        table.info(
            format!("{label}: service transactions/s (xact_commit − producers)"),
            format!(
                "{:.0}/s ({} events in {:.1} s)",
                m.xacts as f64 / m.seconds,
                count(m.events as f64),
                m.seconds
            ),
        );
        table.info(format!("{label}: latency p99"), ms(m.p99));
        table.check(
            format!("{label}: exactly once, in order"),
            m.check.clone(),
            "all 0",
            m.errors == 0,
        );
        table.delivery_errors += m.errors;
    }
    if let (Some(first), Some(last)) = (runs.first(), runs.last())
        && runs.len() > 1
    {
        let growth = per_second(last) / per_second(first).max(1e-9);
        table.check(
            format!(
                "query rate at {} vs {} connections",
                count(last.connections as f64),
                count(first.connections as f64)
            ),
            format!("× {growth:.2}"),
            "does not grow (≤ × 1.10)",
            growth <= 1.10,
        );
    }
    Ok(vec![table])
}

async fn measure(bench: &mut Bench, connections: usize, exact: bool) -> Result<Measured> {
    let name = format!("bench_dbcost_{connections}");
    let url = bench.db.fresh(&name).await?;
    let service = Service::start(&bench.launch, &url, &name).await?;
    let result = measure_with(bench, &service, &url, connections, exact).await;
    service.stop().await?;
    result
}

async fn measure_with(
    bench: &Bench,
    service: &Service,
    url: &str,
    connections: usize,
    exact: bool,
) -> Result<Measured> {
    let monitor = database::connect(url).await?;
    // Let the start-up queries' statistics land before the first reading.
    tokio::time::sleep(STATS_FLUSH).await;
    if exact {
        monitor
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
    }
    let xact_before = xact_commit(&monitor).await?;

    let plan = Plan::one_connection_each(
        format!("dbcost {connections}"),
        "cost",
        connections,
        bench.args.rate,
    );
    let outcome = live::run(bench, service, url, plan).await?;

    tokio::time::sleep(STATS_FLUSH).await;
    let xact_after = xact_commit(&monitor).await?;
    let statements = if exact {
        Some(statements(&monitor).await?)
    } else {
        None
    };
    // The producers' single-row inserts are one transaction each; the monitor's own readings
    // (reset, two xact_commit reads) are three more.
    let xacts = xact_after - xact_before - outcome.produced.transactions as i64 - 3;
    let delivery = &outcome.settled.delivery;
    Ok(Measured {
        connections,
        seconds: outcome.produced.elapsed.as_secs_f64(),
        events: outcome.produced.rows,
        statements,
        xacts,
        p99: outcome.latency.p99,
        check: delivery.describe(),
        errors: delivery.errors() + outcome.produced.unrecorded,
    })
}

async fn xact_commit(client: &tokio_postgres::Client) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// The service's statements in this database since the reset, as (text, calls): the producers'
/// inserts and the bench's own statistics queries left out. Shared with the webhooks scenario.
pub(super) async fn service_statements(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, u64)>> {
    let rows = client
        .query(
            "SELECT query, calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await?;
    let mut statements = Vec::with_capacity(rows.len());
    for row in rows {
        let (text, calls): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        if !(text.contains("INSERT INTO events") || text.contains("pg_stat")) {
            statements.push((text, calls as u64));
        }
    }
    Ok(statements)
}

/// Statements run in this database since the reset, classified by their text.
async fn statements(client: &tokio_postgres::Client) -> Result<Queries> {
    let mut queries = Queries::default();
    for (text, calls) in service_statements(client).await? {
        if text.contains("pg_locks") {
            queries.gap_checks += calls;
        } else if text.contains("subscriber =") {
            queries.replay += calls;
        } else if text.contains("FROM events") && text.contains("id >") {
            queries.new_events += calls;
        } else {
            queries.other += calls;
        }
    }
    Ok(queries)
}
