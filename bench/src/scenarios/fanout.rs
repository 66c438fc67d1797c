//! Scenario 3, fan-out at 1,000 events/s: (a) one consumer with 1,000 open connections (every
//! event goes to all of them); (b) 1,000 consumers with one connection each (each event to one).
//! Target: both sustain the rate with p99 < 50 ms.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::live::{self, Plan};
use super::{Bench, names};
use crate::consumer::ConnSpec;
use crate::latency::ms;
use crate::report::{Table, count};
use crate::service::Service;

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let n = bench.args.fanout;
    let rate = bench.args.rate;

    let one: Arc<[Arc<str>]> = names("fan-a", 1);
    let shape_a = Plan {
        label: "fanout a".into(),
        specs: (0..n)
            .map(|_| ConnSpec {
                consumer: one[0].clone(),
                index: 0,
                last_event_id: None,
                only_type: None,
            })
            .collect(),
        consumers: one,
        types: crate::producer::one_type(),
        rate,
        stamp: crate::producer::Stamp::Committed,
    };
    let a = shape(bench, "bench_fanout_a", shape_a, format!(
        "3a. fan-out: 1 consumer × {n} connections, {rate} events/s (each event to every connection)"
    ))
    .await?;

    let shape_b = Plan::one_connection_each("fanout b".into(), "fan-b", n, rate);
    let b = shape(bench, "bench_fanout_b", shape_b, format!(
        "3b. fan-out: {n} consumers × 1 connection, {rate} events/s in total (each event to one)"
    ))
    .await?;
    Ok(vec![a, b])
}

async fn shape(bench: &mut Bench, database: &str, plan: Plan, title: String) -> Result<Table> {
    let rate = plan.rate;
    let url = bench.db.fresh(database).await?;
    let service = Service::start(&bench.launch, &url, database).await?;
    let outcome = live::run(bench, &service, &url, plan).await;
    service.stop().await?;
    let outcome = outcome?;

    let mut table = Table::new(title);
    let delivered =
        outcome.settled.delivery.received as f64 / outcome.produced.elapsed.as_secs_f64();
    table
        .check(
            "rate sustained",
            format!(
                "{} events/s committed, {} frames/s delivered",
                count(outcome.produced.rate()),
                count(delivered)
            ),
            format!(
                "{} events/s, all delivered within 1 s of the end",
                count(rate)
            ),
            outcome.sustained(rate),
        )
        .check(
            "latency p99 (commit returned → frame read)",
            ms(outcome.latency.p99),
            "< 50 ms",
            outcome.latency.p99 < Duration::from_millis(50),
        )
        .info("latency p50", ms(outcome.latency.p50))
        .info("latency p99.9", ms(outcome.latency.p999))
        .info("latency max", ms(outcome.latency.max))
        .info("connections opened and live in", ms(outcome.connect_time));
    live::describe(&mut table, &outcome, rate, bench.args.producers);
    Ok(table)
}
