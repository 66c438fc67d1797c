//! Scenario 4, connections: 10,000 idle streams held open; the service's resident memory before
//! and after, and per stream. Target: < 150 MB in all (< 15 kB per stream). With
//! `--h2-streams-per-connection N` the streams share h2c connections of N streams each, which
//! measures what a stream costs on an HTTP/2 connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Bench, CpuMeter, names};
use crate::consumer::{ConnSpec, Shared};
use crate::fleet::Fleet;
use crate::ledger::Ledger;
use crate::report::{Table, count, mb};
use crate::service::Service;

/// Let allocations settle (and the open-stream log lines flush) before reading memory.
const SETTLE: Duration = Duration::from_secs(2);

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let streams = bench.args.streams;
    let consumers = bench
        .args
        .stream_consumers
        .unwrap_or(streams)
        .clamp(1, streams.max(1));
    let url = bench.db.fresh("bench_connections").await?;
    let service = Service::start(&bench.launch, &url, "connections").await?;
    let outcome = hold(bench, &service, &url, streams, consumers).await;
    service.stop().await?;
    let held = outcome?;

    let per_stream_kb = (held.after.rss_kb as f64 - held.before.rss_kb as f64) / streams as f64;
    let over = match bench.args.h2_streams_per_connection {
        Some(per) => format!(", over h2c, {per} streams a connection"),
        None => String::new(),
    };
    let mut table = Table::new(format!(
        "4. connections: {} idle streams ({} consumers) held open for {:?}{over}",
        count(streams as f64),
        count(consumers as f64),
        bench.args.hold
    ));
    table
        .info(
            "streams live",
            format!(
                "{} of {} in {:.1} s",
                count(held.live as f64),
                count(streams as f64),
                held.open_time.as_secs_f64()
            ),
        )
        .info("service RSS before", mb(held.before.rss_kb as f64))
        .check(
            "service RSS with all streams open",
            mb(held.after.rss_kb as f64),
            "< 150 MB",
            (held.after.rss_kb as f64) < 150.0 * 1024.0,
        )
        .check(
            "per stream (RSS growth / streams)",
            format!("{per_stream_kb:.1} kB"),
            "< 15 kB",
            per_stream_kb < 15.0,
        )
        .info(
            "service RSS at the end of the hold",
            mb(held.end.rss_kb as f64),
        )
        .info("service peak RSS (VmHWM)", mb(held.end.hwm_kb as f64))
        .info("CPU while holding", held.cpu.clone());
    let delivery = held.delivery;
    table.check(
        "streams still open at the end, nothing unexpected received",
        delivery.describe(),
        "all 0",
        delivery.errors() == 0,
    );
    table.delivery_errors += delivery.errors();
    Ok(vec![table])
}

struct Held {
    live: usize,
    open_time: Duration,
    before: crate::procfs::Memory,
    after: crate::procfs::Memory,
    end: crate::procfs::Memory,
    cpu: String,
    delivery: crate::delivery::DeliverySummary,
}

async fn hold(
    bench: &Bench,
    service: &Service,
    url: &str,
    streams: usize,
    consumers: usize,
) -> Result<Held> {
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let before = service.memory()?;
    let ledger = Arc::new(Ledger::new(super::live::next_id(url).await?, bench.epoch));
    let shared = Shared::new(ledger, false);
    let names = names("idle", consumers);
    let specs = (0..streams)
        .map(|i| ConnSpec {
            consumer: names[i % consumers].clone(),
            index: (i % consumers) as u32,
            last_event_id: None,
            only_type: None,
        })
        .collect();
    let deadline = Instant::now() + bench.args.hold + Duration::from_secs(600);
    let fleet = Fleet::open_over(
        service.addr,
        bench.args.h2_streams_per_connection,
        specs,
        Arc::clone(&shared),
        bench.args.connect_concurrency,
        deadline,
    );
    let progress = crate::progress::Progress::start(
        "connections".into(),
        Arc::new(Default::default()),
        Some(Arc::clone(&shared)),
        streams,
    );
    let open_time = fleet.wait_live(Duration::from_secs(300)).await;
    drop(progress);
    let open_time = match open_time {
        Ok(time) => time,
        Err(error) => {
            let settled = fleet.close().await;
            for error in &settled.errors {
                eprintln!("  connection error: {error}");
            }
            return Err(error);
        }
    };
    tokio::time::sleep(SETTLE).await;
    let after = service.memory()?;
    eprintln!(
        "  {streams} streams live in {:.1} s; service RSS {} kB; holding for {:?}",
        open_time.as_secs_f64(),
        after.rss_kb,
        bench.args.hold
    );
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    tokio::time::sleep(bench.args.hold).await;
    let cpu = cpu.describe();
    let end = service.memory()?;
    let live = shared.live.load(std::sync::atomic::Ordering::Relaxed);
    let settled = fleet.close().await;
    for error in &settled.errors {
        eprintln!("  connection error: {error}");
    }
    Ok(Held {
        live,
        open_time,
        before,
        after,
        end,
        cpu,
        delivery: settled.delivery,
    })
}
