//! event-piper-bench: a load generator and benchmark report for event-piper (project issue 4).
//!
//! It starts its own PostgreSQL (unless `--database-url` is given) and runs the release
//! `event-piper` binary as a child process, then drives producers over real PostgreSQL
//! connections and consumers over real HTTP, checks that every event arrives exactly once and in
//! order at every connection, and measures latency (producer's commit returned -> consumer read
//! the frame), throughput and the service's memory. One markdown table per scenario at the end.
//!
//! Scenarios (`--help` for their knobs): `latency`, `throughput`, `fanout`, `connections`,
//! `replay`, `dbcost` (issue 4: what consumers get), `filter` (what type filters cost: streams
//! asking for one of 10 types against the same streams asking for all), and `producers` and
//! `publish` (issue 9: what the application's writers pay). `producers` compares single-row producers on a plain table with
//! the same producers on `events` (service streaming every event), for `synchronous_commit` on
//! and off and 1 to 64 connections, checks multi-row INSERTs and COPY beside them, and runs 1,000
//! events/s from 1 to 64 connections; `publish` does the same over `POST /events`. Their latency
//! is timed from the insert or request being sent, so it includes the producer's own commit.
//! `webhooks` delivers one consumer's events to a receiver inside the bench through a webhook
//! subscription: events/s from a backlog and from live producers at several batch sizes, latency
//! beside an SSE stream of the same events, and the statements per delivered batch. `storm`
//! (issue 18): every stream reconnecting at once with `Last-Event-ID`, against Nchan as the peer.
//! `instances` (issue 20): several service instances on one database, the statements/s and
//! connections each costs PostgreSQL, idle and at a paced rate, for few and for many streams.
//!
//! ```text
//! cargo build --release
//! target/release/event-piper-bench all
//! ```

mod cli;
mod client;
mod consumer;
mod database;
mod delivery;
mod fleet;
mod latency;
mod ledger;
mod nchan;
mod procfs;
mod producer;
mod progress;
mod publisher;
mod receiver;
mod report;
mod resumer;
mod scenarios;
mod service;
mod sse;

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

use cli::Args;
use database::Database;
use report::Table;
use scenarios::Bench;
use service::Launch;

fn main() -> Result<()> {
    let args = Args::parse();
    let pin = args.pin_cores;
    if pin {
        // Before any thread starts: the producers' runtime inherits CPU 0, and PostgreSQL is
        // moved there once started. The consumers run on the other runtime's threads, on CPU 1
        // with the service (service.rs), so that reading the streams takes nothing from
        // PostgreSQL's core.
        pin_to_cpu(0)?;
        eprintln!("pinned: producers and PostgreSQL to CPU 0, the service and consumers to CPU 1");
    }
    // Producers get a runtime thread of their own: see producer.rs.
    let producers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("producers")
        .enable_all()
        .build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            if pin && let Err(error) = pin_to_cpu(1) {
                eprintln!("warning: {error}");
            }
        })
        .build()?;
    let result = runtime.block_on(run(args, producers.handle().clone()));
    producers.shutdown_background();
    runtime.shutdown_background();
    let delivery_errors = result?;
    if delivery_errors > 0 {
        eprintln!(
            "!!! {delivery_errors} DELIVERY ERRORS: events lost, repeated, out of order or misrouted, or connections failed !!!"
        );
        std::process::exit(2);
    }
    Ok(())
}

/// Restricts the calling thread, and the threads and processes it starts, to one CPU.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    pin_pid(0, cpu)
}

/// Restricts a process (0: the calling thread) to one CPU.
fn pin_pid(pid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        anyhow::bail!(
            "cannot pin {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Pins a process and its children (PostgreSQL's postmaster and its auxiliary processes) to one
/// CPU; processes it forks later inherit that.
fn pin_tree(parent: u32, cpu: usize) -> Result<()> {
    pin_pid(parent as libc::pid_t, cpu)?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent pid is the 4th field of /proc/<pid>/stat, after the parenthesized name.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|field| field.parse::<u32>().ok());
        if ppid == Some(parent) {
            pin_pid(pid as libc::pid_t, cpu)?;
        }
    }
    Ok(())
}

/// Runs the scenarios; returns the number of delivery errors seen.
async fn run(args: Args, producers: tokio::runtime::Handle) -> Result<u64> {
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("event-piper-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let launch = Launch {
        binary: Launch::beside_current_exe()?,
        log_level: args.service_log.clone(),
        extra_args: args.service_args.clone(),
        log_dir: work_dir.clone(),
        cpu: args.pin_cores.then_some(1),
    };
    eprintln!(
        "service: {} (logs in {})",
        launch.binary.display(),
        work_dir.display()
    );
    let db = Database::start(args.database_url.as_deref(), &work_dir).await?;
    if args.pin_cores {
        match db.postmaster_pid() {
            // Its backends (the producers' among them) are forked from it and inherit the mask.
            Some(postmaster) => pin_tree(postmaster, 0)?,
            None => eprintln!("warning: an external PostgreSQL is not pinned"),
        }
    }
    let scenarios = args.scenario.expand();
    let mut bench = Bench {
        args,
        db,
        launch,
        producers,
        epoch: Instant::now(),
    };

    let mut tables: Vec<Table> = Vec::new();
    let mut failures = Vec::new();
    for scenario in scenarios {
        eprintln!("== {scenario:?} ==");
        let started = Instant::now();
        match scenarios::run(scenario, &mut bench).await {
            Ok(mut done) => {
                if !bench.args.service_args.is_empty() {
                    let note = format!("service run with: {}", bench.args.service_args.join(" "));
                    done.iter_mut().for_each(|table| {
                        table.note(note.clone());
                    });
                }
                for table in &done {
                    println!("{table}");
                }
                tables.append(&mut done);
            }
            Err(error) => {
                eprintln!("!!! scenario {scenario:?} failed: {error:#}");
                failures.push(format!("{scenario:?}: {error:#}"));
            }
        }
        eprintln!(
            "== {scenario:?} took {:.0} s ==",
            started.elapsed().as_secs_f64()
        );
    }
    bench.db.stop().await;

    let mut out = std::io::stdout().lock();
    if tables.len() > 1 {
        writeln!(out, "\n## All results\n")?;
        for table in &tables {
            writeln!(out, "{table}")?;
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("scenarios failed:\n{}", failures.join("\n"));
    }
    Ok(tables.iter().map(|table| table.delivery_errors).sum())
}
