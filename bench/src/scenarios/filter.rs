//! Scenario 9, type filters (`GET /events?types=`): what filtering costs. Producers cycle
//! through `--filter-types` (10) event types, `bench.0` to `bench.9`, at the paced `--rate`, and
//! each shape runs twice in one invocation, each time on a fresh database and service: first every
//! stream asks for all types, then stream i asks for type `i % 10` only. The events produced are
//! the same both times; only the streams' filters differ.
//!
//! (a) The case: `--fanout` (1,000) consumers × 1 connection, the events spread over them
//!     round robin; each consumer's own events go through the types in turn, so a filtered stream
//!     receives one in ten of its events and the follower drops the other nine.
//! (b) One consumer × `--fanout` connections, every event to every connection (scenario 3a's
//!     shape): a filtered stream receives one event in ten, so the followers drop nine frames in
//!     ten (900,000 a second at the defaults) instead of writing them. This is where the
//!     per-frame match would show, if anywhere.
//!
//! Every connection is checked against the ledger as in the other scenarios, with its type: it
//! gets exactly its consumer's events of the type it asked for, once, in order, and nothing else.

use std::sync::Arc;

use anyhow::{Result, ensure};

use super::live::{self, Outcome, Plan};
use super::{Bench, names};
use crate::consumer::{ConnSpec, OnlyType};
use crate::latency::ms;
use crate::producer::Stamp;
use crate::report::{Table, count};
use crate::service::Service;

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let (n, rate, types) = (bench.args.fanout, bench.args.rate, bench.args.filter_types);
    ensure!(
        (1..=usize::from(u16::MAX)).contains(&types),
        "--filter-types must be 1 to {}",
        u16::MAX
    );
    let types = type_names(types);

    let consumers = names("filt-a", n);
    let a = compare(bench, "bench_filter_a", &types, |only_type| Plan {
        label: String::new(),
        specs: consumers
            .iter()
            .enumerate()
            .map(|(i, consumer)| ConnSpec {
                consumer: consumer.clone(),
                index: i as u32,
                last_event_id: None,
                only_type: only_type(i),
            })
            .collect(),
        consumers: Arc::clone(&consumers),
        types: Arc::clone(&types),
        rate,
        stamp: Stamp::Committed,
    })
    .await?;
    let a = table(
        format!(
            "9a. type filter: {n} consumers × 1 connection, {rate} events/s in total over {} types (each event to one connection)",
            types.len()
        ),
        &types,
        rate,
        a,
    );

    let one = names("filt-b", 1);
    let b = compare(bench, "bench_filter_b", &types, |only_type| Plan {
        label: String::new(),
        specs: (0..n)
            .map(|i| ConnSpec {
                consumer: one[0].clone(),
                index: 0,
                last_event_id: None,
                only_type: only_type(i),
            })
            .collect(),
        consumers: Arc::clone(&one),
        types: Arc::clone(&types),
        rate,
        stamp: Stamp::Committed,
    })
    .await?;
    let b = table(
        format!(
            "9b. type filter: 1 consumer × {n} connections, {rate} events/s over {} types (each event to every connection)",
            types.len()
        ),
        &types,
        rate,
        b,
    );
    Ok(vec![a, b])
}

/// `bench.0`, `bench.1`, ...: short, like real type names, and distinct only in their last byte,
/// so the match cannot stop early.
fn type_names(count: usize) -> Arc<[Arc<str>]> {
    (0..count)
        .map(|i| Arc::from(format!("bench.{i}")))
        .collect()
}

/// The type stream `i` asks for when the streams filter: `i % types`.
fn one_of(types: &[Arc<str>], i: usize) -> OnlyType {
    let kind = i % types.len();
    OnlyType {
        kind: kind as u16,
        name: Arc::clone(&types[kind]),
    }
}

/// The two runs of one shape, unfiltered first. `plan` builds the shape from the filter of stream
/// i; each run gets its own database and service so that neither inherits the other's state.
async fn compare(
    bench: &Bench,
    database: &str,
    types: &Arc<[Arc<str>]>,
    plan: impl Fn(&dyn Fn(usize) -> Option<OnlyType>) -> Plan,
) -> Result<[Outcome; 2]> {
    let all = plan(&|_| None);
    let one = plan(&|i| Some(one_of(types, i)));
    let all = shape(bench, &format!("{database}_all"), all).await?;
    let one = shape(bench, &format!("{database}_one"), one).await?;
    Ok([all, one])
}

async fn shape(bench: &Bench, database: &str, mut plan: Plan) -> Result<Outcome> {
    plan.label = database.trim_start_matches("bench_").replace('_', " ");
    let url = bench.db.fresh(database).await?;
    let service = Service::start(&bench.launch, &url, database).await?;
    let outcome = live::run(bench, &service, &url, plan).await;
    service.stop().await?;
    outcome
}

fn table(title: String, types: &[Arc<str>], rate: f64, [all, one]: [Outcome; 2]) -> Table {
    let mut table = Table::new(title);
    let one_label = format!("one type of {}", types.len());
    for (label, outcome) in [("all types", &all), (one_label.as_str(), &one)] {
        let produced = &outcome.produced;
        let delivery = &outcome.settled.delivery;
        let elapsed = produced.elapsed.as_secs_f64();
        let errors = delivery.errors() + produced.unrecorded;
        table
            .check(
                format!("{label}: rate sustained"),
                format!(
                    "{} events/s committed, {} frames/s delivered",
                    count(produced.rate()),
                    count(delivery.received as f64 / elapsed)
                ),
                format!(
                    "{} events/s, all delivered within 1 s of the end",
                    count(rate)
                ),
                outcome.sustained(rate),
            )
            .check(
                format!(
                    "{label}: frames delivered / expected, exactly once, in order, only its type"
                ),
                format!(
                    "{} / {} · {}",
                    count(delivery.received as f64),
                    count(outcome.expected_frames as f64),
                    delivery.describe()
                ),
                "all, 0 errors",
                errors == 0 && delivery.received == outcome.expected_frames,
            )
            .info(
                format!("{label}: latency p50 / p99 / max (commit returned → frame read)"),
                format!(
                    "{} / {} / {}",
                    ms(outcome.latency.p50),
                    ms(outcome.latency.p99),
                    ms(outcome.latency.max)
                ),
            )
            .info(
                format!("{label}: producers: insert round trip p99 · schedule lag max"),
                format!("{} · {}", ms(produced.commit.p99), ms(produced.max_behind)),
            )
            .info(format!("{label}: CPU"), outcome.cpu.clone());
        table.delivery_errors += errors;
    }
    if let (Some(all), Some(one)) = (all.service_cores, one.service_cores) {
        table.info(
            "service CPU: one type · all types",
            format!("{one:.2} · {all:.2} cores (× {:.2})", one / all.max(1e-9)),
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_ask_for_the_types_in_turn() {
        let types = type_names(10);
        assert_eq!(&*types[3], "bench.3");
        let picks: Vec<u16> = (0..12).map(|i| one_of(&types, i).kind).collect();
        assert_eq!(picks, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
        assert_eq!(&*one_of(&types, 17).name, "bench.7");
    }
}
