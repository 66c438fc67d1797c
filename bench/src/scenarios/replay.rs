//! Scenario 5, replay: a history of 1,000,000 events for one consumer (bulk `INSERT ... SELECT
//! generate_series`, before the service starts), then one client with `Last-Event-ID: 0` reads
//! it all. Targets: >= 200,000 events/s, peak memory growth < 50 MB.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Bench, CpuMeter, names};
use crate::consumer::{ConnSpec, Shared};
use crate::fleet::Fleet;
use crate::ledger::Ledger;
use crate::procfs::{self, Memory};
use crate::producer;
use crate::progress::Progress;
use crate::report::{Table, count, mb};
use crate::service::Service;

const CHUNK: u64 = 100_000;
const READ_TIMEOUT: Duration = Duration::from_secs(600);
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let history = bench.args.history;
    let url = bench.db.fresh("bench_replay").await?;
    let ledger = Arc::new(Ledger::new(super::live::next_id(&url).await?, bench.epoch));
    let consumers = names("replay", 1);

    let started = Instant::now();
    let (url_owned, consumer, history_ledger) =
        (url.clone(), consumers[0].clone(), Arc::clone(&ledger));
    let recorded = bench
        .producers
        .spawn(async move {
            producer::history(&url_owned, &consumer, history, CHUNK, &history_ledger).await
        })
        .await
        .context("history task")??;
    let insert_time = started.elapsed();

    let service = Service::start(&bench.launch, &url, "replay").await?;
    let result = replay(bench, &service, ledger, consumers, recorded).await;
    service.stop().await?;
    let read = result?;

    let growth_sampled = read.peak_rss_kb.saturating_sub(read.before.rss_kb);
    let growth_hwm = read.after.hwm_kb.saturating_sub(read.before.rss_kb);
    let growth = growth_sampled.max(growth_hwm);
    let mut table = Table::new(format!(
        "5. replay: {} history events, one client with Last-Event-ID: 0",
        count(history as f64)
    ));
    table
        .info(
            "history insert (INSERT ... SELECT generate_series, 100k rows per transaction)",
            format!(
                "{} rows in {:.1} s",
                count(recorded as f64),
                insert_time.as_secs_f64()
            ),
        )
        .check(
            "replay rate (request sent → last frame read)",
            format!(
                "{} events/s ({} in {:.2} s)",
                count(read.rate),
                count(read.received as f64),
                read.window.as_secs_f64()
            ),
            ">= 200,000 events/s",
            read.rate >= 200_000.0,
        )
        .check(
            "service peak memory growth",
            format!(
                "{} (sampled RSS peak {} · VmHWM {} · before {})",
                mb(growth as f64),
                mb(read.peak_rss_kb as f64),
                mb(read.after.hwm_kb as f64),
                mb(read.before.rss_kb as f64)
            ),
            "< 50 MB",
            growth < 50 * 1024,
        )
        .info("service RSS after", mb(read.after.rss_kb as f64))
        .info("CPU during the replay", read.cpu.clone())
        .check(
            "exactly once, in order",
            read.check.clone(),
            "all 0",
            read.errors == 0,
        );
    table.delivery_errors += read.errors;
    Ok(vec![table])
}

struct Read {
    received: u64,
    rate: f64,
    window: Duration,
    before: Memory,
    after: Memory,
    peak_rss_kb: u64,
    cpu: String,
    check: String,
    errors: u64,
}

async fn replay(
    bench: &Bench,
    service: &Service,
    ledger: Arc<Ledger>,
    consumers: Arc<[Arc<str>]>,
    expected: u64,
) -> Result<Read> {
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let before = service.memory()?;
    let (stop, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(before.rss_kb)),
    );
    let sampler = {
        let (stop, peak, pid) = (Arc::clone(&stop), Arc::clone(&peak), service.pid);
        tokio::spawn(async move {
            let deadline = Instant::now() + READ_TIMEOUT + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(memory) = procfs::memory(pid) {
                    peak.fetch_max(memory.rss_kb, Ordering::Relaxed);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };

    let shared = Shared::new(Arc::clone(&ledger), false);
    let spec = ConnSpec {
        consumer: consumers[0].clone(),
        index: 0,
        last_event_id: Some(0),
        only_type: None,
    };
    let progress = Progress::start(
        "replay".into(),
        Arc::new(AtomicU64::new(expected)),
        Some(Arc::clone(&shared)),
        1,
    );
    let cpu = CpuMeter::start(Some(service.pid), bench.db.postmaster_pid());
    let started = ledger.nanos(Instant::now());
    let fleet = Fleet::open(
        service.addr,
        vec![spec],
        Arc::clone(&shared),
        1,
        Instant::now() + READ_TIMEOUT,
    );
    shared.drained(expected, READ_TIMEOUT, Instant::now()).await;
    let cpu = cpu.describe();
    drop(progress);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let after = service.memory()?;
    let window = Duration::from_nanos(
        shared
            .last_frame_ns
            .load(Ordering::Relaxed)
            .saturating_sub(started),
    );
    let settled = fleet.close().await;
    for error in &settled.errors {
        eprintln!("  connection error: {error}");
    }
    let received = settled.delivery.received;
    Ok(Read {
        received,
        rate: received as f64 / window.as_secs_f64().max(1e-9),
        window,
        before,
        after,
        peak_rss_kb: peak.load(Ordering::Relaxed).max(after.rss_kb),
        cpu,
        check: settled.delivery.describe(),
        errors: settled.delivery.errors(),
    })
}
