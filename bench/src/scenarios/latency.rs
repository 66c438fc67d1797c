//! Scenario 1, latency: 1,000 events/s spread over 100 consumers with one connection each,
//! single-row transactions at a steady rate. Target: p50 < 3 ms, p99 < 10 ms.

use std::time::Duration;

use anyhow::Result;

use super::Bench;
use super::live::{self, Plan};
use crate::latency::ms;
use crate::report::Table;
use crate::service::Service;

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let consumers = bench.args.latency_consumers;
    let rate = bench.args.rate;
    let url = bench.db.fresh("bench_latency").await?;
    let service = Service::start(&bench.launch, &url, "latency").await?;
    let plan = Plan::one_connection_each("latency".into(), "lat", consumers, rate);
    let outcome = live::run(bench, &service, &url, plan).await;
    service.stop().await?;
    let outcome = outcome?;

    let mut table = Table::new(format!(
        "1. latency: {rate} events/s over {consumers} consumers × 1 connection, single-row transactions"
    ));
    let latency = outcome.latency;
    table
        .check(
            "latency p50 (commit returned → frame read)",
            ms(latency.p50),
            "< 3 ms",
            latency.p50 < Duration::from_millis(3),
        )
        .check(
            "latency p99",
            ms(latency.p99),
            "< 10 ms",
            latency.p99 < Duration::from_millis(10),
        )
        .info("latency p99.9", ms(latency.p999))
        .info("latency max", ms(latency.max));
    live::describe(&mut table, &outcome, rate, bench.args.producers);
    Ok(vec![table])
}
