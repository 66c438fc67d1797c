//! Scenario 8, publish (issue 9): producers that publish over HTTP, single events with
//! `POST /events` (`201` means durable) on keep-alive connections, every event streamed to one of
//! the consumers and checked exactly once, in order.
//!
//! - 8a: 16 and 64 connections (`--publish-connections`) publishing back to back for
//!   `--duration`: events/s, request latency, and latency from the request being sent to the
//!   frame being read.
//! - 8b: 1,000 events/s in total (`--rate`) from 1, 8, 32, 64 connections
//!   (`--producer-connections`). Target: p99 < 10 ms from the request sent to the frame read.

use anyhow::Result;

use super::Bench;
use super::live::{self, Plan};
use super::producers::paced_rows;
use crate::latency::ms;
use crate::producer::{self, Stamp};
use crate::publisher::HttpSink;
use crate::report::{Table, count};
use crate::service::Service;

/// Consumers the events are spread over, one stream each.
const CONSUMERS: usize = 8;

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let url = bench.db.fresh("bench_publish").await?;
    let service = Service::start(&bench.launch, &url, "publish").await?;
    let measured = measure(bench, &service, &url).await;
    service.stop().await?;
    measured
}

async fn measure(bench: &Bench, service: &Service, url: &str) -> Result<Vec<Table>> {
    let duration = bench.args.duration;
    let mut flood = Table::new(format!(
        "8a. publish: single-event POST /events as fast as they go on keep-alive connections, \
         to {CONSUMERS} consumers"
    ));
    for &connections in &bench.args.publish_connections {
        let mut plan =
            Plan::one_connection_each(format!("publish {connections}"), "pub", CONSUMERS, 0.0);
        plan.stamp = Stamp::Sent;
        let addr = service.addr;
        let outcome = live::run_with(bench, service, url, plan, move |targets| async move {
            let sinks = HttpSink::connect_all(addr, connections).await?;
            producer::flood_with(sinks, duration, targets).await
        })
        .await?;
        let label = format!("{connections} connections");
        let produced = &outcome.produced;
        flood
            .info(
                format!("{label}: events published (201)"),
                format!(
                    "{} in {:.1} s = {} events/s",
                    count(produced.rows as f64),
                    produced.elapsed.as_secs_f64(),
                    count(produced.rate())
                ),
            )
            .info(
                format!("{label}: request latency p50 / p99 / max (sent → 201 read)"),
                format!(
                    "{} / {} / {}",
                    ms(produced.commit.p50),
                    ms(produced.commit.p99),
                    ms(produced.commit.max)
                ),
            );
        live::describe_sent(&mut flood, &label, &outcome, "request", None);
    }

    let rate = bench.args.rate;
    let mut paced = Table::new(format!(
        "8b. publish: {} events/s in total, single-event POST /events on keep-alive \
         connections, to {CONSUMERS} consumers",
        count(rate)
    ));
    for &connections in &bench.args.producer_connections {
        let mut plan = Plan::one_connection_each(
            format!("publish paced {connections}"),
            "pub-paced",
            CONSUMERS,
            rate,
        );
        plan.stamp = Stamp::Sent;
        let addr = service.addr;
        let outcome = live::run_with(bench, service, url, plan, move |targets| async move {
            let sinks = HttpSink::connect_all(addr, connections).await?;
            producer::paced_with(sinks, rate, duration, targets).await
        })
        .await?;
        let label = format!(
            "{connections} connection{}",
            if connections == 1 { "" } else { "s" }
        );
        paced_rows(&mut paced, &label, &outcome, rate, "request");
    }
    let note = "The service runs with its defaults (--pool-size 8: at most 8 inserts in flight).";
    flood.note(note);
    paced.note(note);
    Ok(vec![flood, paced])
}
