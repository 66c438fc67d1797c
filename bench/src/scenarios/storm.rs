//! Scenario `storm` (issue 18, reconnect storms): every client of an instance reconnects at once
//! with `Last-Event-ID`, as after a restart or a load balancer dropping its connections. Measured
//! for event-piper and, as the peer doing the same work in the same run, for Nchan.
//!
//! Two storms: (a) `--storm-streams` (5,000) streams of as many consumers, one each; (b)
//! `--storm-shared-streams` (2,000) streams of one consumer, all resuming from the same point.
//! Per system and storm: every stream is opened and goes live, one seed event per consumer (or
//! channel) is published and read by each of its streams (its id is what the stream resumes
//! from), every stream is closed, `--storm-behind` (10) events per consumer are published while
//! they are closed (event-piper: one multi-row INSERT, then VACUUM ANALYZE so that autovacuum
//! does not land in the storm; Nchan: POST to its publisher location), the machine is let quiet
//! down, and then the clock starts and every stream reconnects at once with its
//! `Last-Event-ID`. It stops when every stream has had every event it missed.
//!
//! Measured: the time until the last stream caught up, from the moment the first reconnect
//! started being sent (that is what the slowest client waits); the p50 and p99 of the streams'
//! catch-up times, from the same moment; the CPU seconds used meanwhile by the service
//! (event-piper plus its PostgreSQL cluster, all processes; nginx master and workers for Nchan)
//! and by the bench itself; for event-piper the statements PostgreSQL ran meanwhile
//! (pg_stat_statements, reset just before) and per 100 resumes. Checked: each stream got exactly
//! its missed events, once, in order, and nothing else. Also shown, to tell a slow server from a
//! slow client or a full accept queue: when the last request was sent and the last response head
//! arrived, and the machine's TCP listen overflows and SYN retransmits during the storm.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::{Bench, median, names};
use crate::consumer;
use crate::database;
use crate::nchan::{self, Found, Nginx};
use crate::procfs;
use crate::report::{Table, count};
use crate::resumer::{self, Gate, KeyFrom, Resumed, Target};
use crate::service::Service;

/// How long every stream has to catch up before the run counts the rest as lost.
const STORM_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for the server to notice the closed streams before the missed events are published.
const CLOSED: Duration = Duration::from_secs(1);
/// After the last stream caught up, how long the streams keep reading, to catch repeats.
const SETTLE: Duration = Duration::from_millis(500);
/// Publishing connections to Nchan (setup, not measured).
const PUBLISHERS: usize = 32;

#[derive(Debug, Clone, Copy)]
struct Shape {
    label: &'static str,
    streams: usize,
    consumers: usize,
    behind: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum System {
    EventPiper,
    Nchan,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::EventPiper => "event-piper",
            System::Nchan => "Nchan",
        }
    }
}

pub async fn run(bench: &mut Bench) -> Result<Vec<Table>> {
    let args = &bench.args;
    let behind = args.storm_behind.max(1);
    let shapes = [
        Shape {
            label: "a",
            streams: args.storm_streams,
            consumers: args.storm_streams,
            behind,
        },
        Shape {
            label: "b",
            streams: args.storm_shared_streams,
            consumers: 1,
            behind,
        },
    ];
    let runs = args.storm_runs.max(1);
    let peer = nchan::find(args.nginx.as_deref());
    if let Err(why) = &peer {
        eprintln!("  !!! Nchan cannot run ({why}): measuring event-piper alone");
    }
    let statements = bench.db.enable_statement_stats().await?;
    if !statements {
        eprintln!("  pg_stat_statements unavailable (external database): no statement counts");
    }

    let mut results: Vec<(usize, System, Storm)> = Vec::new();
    for run in 1..=runs {
        for (index, shape) in shapes.iter().enumerate() {
            eprintln!(
                "  run {run}/{runs}, storm ({}): {} streams, {} consumers, {} behind: event-piper",
                shape.label, shape.streams, shape.consumers, shape.behind
            );
            let storm = event_piper(bench, *shape, run, statements).await?;
            storm.log(System::EventPiper);
            results.push((index, System::EventPiper, storm));
            if let Ok(found) = &peer {
                eprintln!("  run {run}/{runs}, storm ({}): Nchan", shape.label);
                let storm = nchan_storm(bench, found, *shape, run).await?;
                storm.log(System::Nchan);
                results.push((index, System::Nchan, storm));
            }
        }
    }

    let mut tables = Vec::new();
    for (index, shape) in shapes.iter().enumerate() {
        let title = match shape.label {
            "a" => format!(
                "storm (a): {} streams of {} consumers (one each), {} events behind, reconnecting at once",
                count(shape.streams as f64),
                count(shape.consumers as f64),
                shape.behind
            ),
            _ => format!(
                "storm (b): {} streams of one consumer resuming from the same point, {} events behind",
                count(shape.streams as f64),
                shape.behind
            ),
        };
        let mut table = Table::new(title);
        let mut last = HashMap::new();
        for system in [System::EventPiper, System::Nchan] {
            let storms: Vec<&Storm> = results
                .iter()
                .filter(|(i, s, _)| *i == index && *s == system)
                .map(|(_, _, storm)| storm)
                .collect();
            if storms.is_empty() {
                continue;
            }
            if let Some(ms) = describe(&mut table, system, &storms) {
                last.insert(system, ms);
            }
        }
        if let (Some(ours), Some(theirs)) =
            (last.get(&System::EventPiper), last.get(&System::Nchan))
        {
            table.info(
                "event-piper / Nchan, last stream caught up",
                format!("{:.2}×", ours / theirs),
            );
        }
        let in_flight = match bench.args.storm_in_flight {
            0 => "every stream reconnecting at once".to_owned(),
            n => format!(
                "at most {n} reconnects in flight (--storm-in-flight; a permit held until the response head)"
            ),
        };
        table.note(format!(
            "Load client: one tokio runtime, one HTTP/1.1 connection per stream, {in_flight}. \
             Times from the moment the first reconnect started being sent. {runs} run(s); a \
             figure is the median of the runs, the runs follow in brackets. CPU: event-piper \
             process and every process of its PostgreSQL cluster; nginx master and workers for \
             Nchan. TCP counters are the machine's."
        ));
        match &peer {
            Ok(found) => table.note(format!(
                "Peer: {} (worker_processes auto, listen backlog {}, \
                 nchan_message_buffer_length 1000, nchan_message_timeout 1h), EventSource \
                 subscriber, channel from ?id=, resumed by Nchan's own message id in \
                 Last-Event-ID. event-piper's listen backlog: {}.",
                found.version,
                bench
                    .args
                    .nchan_backlog
                    .map_or("511 (nginx's default)".to_owned(), |n| n.to_string()),
                event_piper::net::ACCEPT_BACKLOG,
            )),
            Err(why) => table.note(format!("Nchan not measured: {why}.")),
        };
        tables.push(table);
    }
    Ok(tables)
}

/// Adds one system's rows; returns its median time until the last stream caught up (ms).
fn describe(table: &mut Table, system: System, storms: &[&Storm]) -> Option<f64> {
    let name = system.name();
    let figure = |values: Vec<f64>, unit: &str, decimals: usize| {
        let median = median(&values);
        let each: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        if values.len() > 1 {
            format!("{median:.decimals$}{unit} ({})", each.join(" · "))
        } else {
            format!("{median:.decimals$}{unit}")
        }
    };
    let all_caught = storms.iter().all(|storm| storm.all_caught);
    let last: Vec<f64> = storms.iter().map(|storm| ms(storm.last())).collect();
    let last_median = median(&last);
    table.info(
        format!("{name}: last stream caught up"),
        if all_caught {
            figure(last.clone(), "ms", 0)
        } else {
            format!("not all within {STORM_TIMEOUT:?}")
        },
    );
    table.info(
        format!("{name}: per-stream catch-up p50 · p99"),
        format!(
            "{} · {}",
            figure(
                storms.iter().map(|s| ms(s.quantile(0.50))).collect(),
                "ms",
                0
            ),
            figure(
                storms.iter().map(|s| ms(s.quantile(0.99))).collect(),
                "ms",
                0
            )
        ),
    );
    let service = if system == System::EventPiper {
        "service + PostgreSQL"
    } else {
        "nginx"
    };
    let mut cpu = format!(
        "{service} {}",
        figure(
            storms
                .iter()
                .map(|s| s.server_cpu().as_secs_f64())
                .collect(),
            "s",
            2
        )
    );
    if system == System::EventPiper {
        cpu.push_str(&format!(
            " = service {} + PostgreSQL {}",
            figure(
                storms.iter().map(|s| s.cpu[0].as_secs_f64()).collect(),
                "s",
                2
            ),
            figure(
                storms.iter().map(|s| s.cpu[1].as_secs_f64()).collect(),
                "s",
                2
            )
        ));
    }
    cpu.push_str(&format!(
        "; bench {}",
        figure(
            storms.iter().map(|s| s.cpu[2].as_secs_f64()).collect(),
            "s",
            2
        )
    ));
    table.info(format!("{name}: CPU during the storm"), cpu);
    if let Some(first) = storms.first()
        && first.statements.is_some()
    {
        let calls: Vec<f64> = storms.iter().map(|s| s.calls() as f64).collect();
        let per: Vec<f64> = storms
            .iter()
            .map(|s| s.calls() as f64 * 100.0 / s.resumes.max(1) as f64)
            .collect();
        table.info(
            format!("{name}: statements during the storm (pg_stat_statements) · per 100 resumes"),
            format!("{} · {}", figure(calls, "", 0), figure(per, "", 1)),
        );
    }
    table.info(
        format!("{name}: last request sent · last response head in"),
        format!(
            "{} · {}",
            figure(storms.iter().map(|s| ms(s.last_sent)).collect(), "ms", 0),
            figure(storms.iter().map(|s| ms(s.last_head)).collect(), "ms", 0)
        ),
    );
    table.info(
        format!("{name}: TCP listen overflows · SYN retransmits"),
        format!(
            "{} · {}",
            figure(storms.iter().map(|s| s.tcp[0] as f64).collect(), "", 0),
            figure(storms.iter().map(|s| s.tcp[1] as f64).collect(), "", 0)
        ),
    );
    let mut totals = Totals::default();
    for storm in storms {
        totals.add(&storm.totals);
    }
    let errors = totals.errors();
    table.check(
        format!("{name}: missed events, exactly once, in order (all runs)"),
        totals.describe(),
        "all 0",
        errors == 0,
    );
    table.delivery_errors += errors;
    all_caught.then_some(last_median)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The check summed over streams.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    unexpected: u64,
    failed: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.expected += other.expected;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.unexpected += other.unexpected;
        self.failed += other.failed;
    }

    fn errors(&self) -> u64 {
        self.lost + self.duplicates + self.out_of_order + self.unexpected + self.failed
    }

    fn describe(&self) -> String {
        format!(
            "{} frames for {} expected: lost {} · dup {} · out-of-order {} · unexpected {} · failed streams {}",
            count(self.received as f64),
            count(self.expected as f64),
            self.lost,
            self.duplicates,
            self.out_of_order,
            self.unexpected,
            self.failed
        )
    }
}

/// One storm on one system.
struct Storm {
    resumes: usize,
    /// Catch-up times of the streams that caught up, ascending.
    caught: Vec<Duration>,
    all_caught: bool,
    last_sent: Duration,
    last_head: Duration,
    /// CPU over the storm: the service (event-piper, or nginx's tree), PostgreSQL's cluster, the
    /// bench.
    cpu: [Duration; 3],
    statements: Option<Vec<(String, u64)>>,
    totals: Totals,
    /// Listen overflows, SYN retransmits.
    tcp: [u64; 2],
}

impl Storm {
    fn last(&self) -> Duration {
        self.caught.last().copied().unwrap_or_default()
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.caught.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank over all resumes: a stream that never caught up ranks last.
        let rank = ((q * self.resumes as f64).ceil() as usize).clamp(1, self.resumes);
        self.caught
            .get(rank - 1)
            .copied()
            .unwrap_or(Duration::from_secs(u64::MAX / 4))
    }

    fn server_cpu(&self) -> Duration {
        self.cpu[0] + self.cpu[1]
    }

    fn calls(&self) -> u64 {
        self.statements
            .as_ref()
            .map_or(0, |list| list.iter().map(|(_, calls)| calls).sum())
    }

    fn log(&self, system: System) {
        eprintln!(
            "  {}: last caught up {:.0} ms, p50 {:.0} ms, CPU server {:.2} s (bench {:.2} s), \
             last request sent {:.0} ms, last head {:.0} ms, listen overflows {}, SYN retransmits {}; {}",
            system.name(),
            ms(self.last()),
            ms(self.quantile(0.5)),
            self.server_cpu().as_secs_f64(),
            self.cpu[2].as_secs_f64(),
            ms(self.last_sent),
            ms(self.last_head),
            self.tcp[0],
            self.tcp[1],
            self.totals.describe()
        );
        if let Some(list) = &self.statements {
            eprintln!(
                "  statements during the storm: {} ({:.1} per 100 resumes); top by calls:",
                self.calls(),
                self.calls() as f64 * 100.0 / self.resumes.max(1) as f64
            );
            let mut top = list.clone();
            top.sort_by_key(|entry| std::cmp::Reverse(entry.1));
            for (text, calls) in top.iter().take(8) {
                let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
                let text: String = text.chars().take(160).collect();
                eprintln!("    {calls:>7}  {text}");
            }
        }
    }
}

/// Whose CPU a storm is charged.
struct Meter {
    /// The service's pid, and whether to count its process tree (nginx's workers).
    service: (u32, bool),
    postmaster: Option<u32>,
}

impl Meter {
    fn read(&self) -> [Duration; 3] {
        let (pid, tree) = self.service;
        [
            if tree {
                procfs::cpu_tree(pid)
            } else {
                procfs::cpu(pid)
            },
            self.postmaster.map_or(Duration::ZERO, procfs::cpu_tree),
            procfs::own_cpu(),
        ]
    }
}

/// Opens every stream, waits until all are live, runs `seed` (publishing one event per consumer
/// or channel), waits until every stream has read it, and closes them all. Returns each stream's
/// seed id, in `targets` order.
async fn live_phase(
    targets: &[Target],
    concurrency: usize,
    seed: impl Future<Output = Result<()>>,
) -> Result<Vec<String>> {
    let total = targets.len();
    let (live, seeded) = (Gate::new(total), Gate::new(total));
    let failed = Arc::new(AtomicUsize::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let connecting = Arc::new(Semaphore::new(concurrency.max(1)));
    let deadline = Instant::now() + Duration::from_secs(900);
    let tasks: Vec<JoinHandle<Result<String>>> = targets
        .iter()
        .map(|target| {
            let (live, seeded, failed) = (live.clone(), seeded.clone(), failed.clone());
            let stream = resumer::go_live(
                target.clone(),
                Arc::clone(&connecting),
                live,
                seeded,
                stop_rx.clone(),
                deadline,
            );
            tokio::spawn(async move {
                let result = stream.await;
                if result.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    let started = Instant::now();
    let failures = || failed.load(Ordering::Relaxed) > 0;
    let outcome = async {
        consumer::wait_until(Duration::from_secs(300), || {
            live.count() == total || failures()
        })
        .await;
        if live.count() < total {
            bail!("only {} of {total} streams went live", live.count());
        }
        eprintln!(
            "    {total} streams live in {:.1} s; seeding",
            started.elapsed().as_secs_f64()
        );
        seed.await.context("publishing the seed events")?;
        consumer::wait_until(Duration::from_secs(120), || {
            seeded.count() == total || failures()
        })
        .await;
        if seeded.count() < total {
            bail!(
                "only {} of {total} streams read their seed event",
                seeded.count()
            );
        }
        anyhow::Ok(())
    }
    .await;
    stop.send_replace(true);
    let mut seeds = Vec::with_capacity(total);
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(seed)) => seeds.push(seed),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(error.into());
            }
        }
    }
    outcome?;
    if let Some(error) = first_error {
        return Err(error.context("a stream failed in the live phase"));
    }
    Ok(seeds)
}

/// A storm in progress: every stream reconnecting.
struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Resumed>>,
    all_caught: bool,
    cpu: [Duration; 3],
    tcp: [u64; 2],
}

/// Starts the clock, reconnects every stream at once with its seed id as `Last-Event-ID`, and
/// returns once every stream has caught up (or the timeout passed), with the CPU and TCP figures
/// taken at that moment.
async fn storm_phase(
    targets: Vec<Target>,
    seeds: Vec<String>,
    key: KeyFrom,
    expected: Vec<Arc<[i64]>>,
    meter: &Meter,
    in_flight: usize,
) -> Running {
    let total = targets.len();
    let connecting = (in_flight > 0).then(|| Arc::new(Semaphore::new(in_flight)));
    let gate = Gate::new(total);
    let (stop, stop_rx) = watch::channel(false);
    let deadline = Instant::now() + STORM_TIMEOUT + Duration::from_secs(30);
    let streams: Vec<_> = targets.into_iter().zip(seeds).zip(expected).collect();
    let tcp_before = tcp_counters();
    let cpu_before = meter.read();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for ((target, seed), expected) in streams {
        tasks.push(tokio::spawn(resumer::resume(
            target,
            seed,
            key,
            expected,
            start,
            Arc::clone(&gate),
            connecting.clone(),
            stop_rx.clone(),
            deadline,
        )));
    }
    let all_caught = gate.wait(STORM_TIMEOUT).await;
    let cpu_after = meter.read();
    let tcp_after = tcp_counters();
    Running {
        stop,
        tasks,
        all_caught,
        cpu: std::array::from_fn(|i| cpu_after[i].saturating_sub(cpu_before[i])),
        tcp: std::array::from_fn(|i| tcp_after[i].saturating_sub(tcp_before[i])),
    }
}

impl Running {
    /// Lets the streams read on for a moment (a repeat would show), closes them and sums up.
    async fn finish(self, statements: Option<Vec<(String, u64)>>) -> Storm {
        tokio::time::sleep(SETTLE).await;
        self.stop.send_replace(true);
        let resumes = self.tasks.len();
        let mut totals = Totals::default();
        let (mut caught, mut last_sent, mut last_head) =
            (Vec::new(), Duration::ZERO, Duration::ZERO);
        let mut errors = 0;
        for task in self.tasks {
            let resumed = match task.await {
                Ok(resumed) => resumed,
                Err(error) => {
                    eprintln!("    stream task failed: {error}");
                    totals.failed += 1;
                    continue;
                }
            };
            totals.expected +=
                resumed.received + resumed.lost - resumed.duplicates - resumed.unexpected;
            totals.received += resumed.received;
            totals.lost += resumed.lost;
            totals.duplicates += resumed.duplicates;
            totals.out_of_order += resumed.out_of_order;
            totals.unexpected += resumed.unexpected;
            if let Some(error) = &resumed.error {
                totals.failed += 1;
                if errors < 5 {
                    eprintln!("    stream error: {error}");
                }
                errors += 1;
            }
            caught.extend(resumed.caught_up);
            last_sent = last_sent.max(resumed.sent);
            last_head = last_head.max(resumed.head.unwrap_or_default());
        }
        caught.sort();
        Storm {
            resumes,
            caught,
            all_caught: self.all_caught,
            last_sent,
            last_head,
            cpu: self.cpu,
            statements,
            totals,
            tcp: self.tcp,
        }
    }
}

/// The machine's TCP listen overflows and SYN retransmits so far (/proc/net/netstat, TcpExt).
fn tcp_counters() -> [u64; 2] {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return [0; 2];
    };
    let pairs: HashMap<&str, u64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(name, value)| Some((name, value.parse().ok()?)))
        .collect();
    [
        pairs.get("ListenOverflows").copied().unwrap_or(0),
        pairs.get("TCPSynRetrans").copied().unwrap_or(0),
    ]
}

/// One storm against event-piper on a fresh database and a freshly started service.
async fn event_piper(bench: &Bench, shape: Shape, run: usize, statements: bool) -> Result<Storm> {
    let url = bench.db.fresh("bench_storm").await?;
    let label = format!("storm-{}-{run}", shape.label);
    let service = Service::start(&bench.launch, &url, &label).await?;
    let result = event_piper_with(bench, &service, &url, shape, run, statements).await;
    service.stop().await?;
    result
}

async fn event_piper_with(
    bench: &Bench,
    service: &Service,
    url: &str,
    shape: Shape,
    run: usize,
    statements: bool,
) -> Result<Storm> {
    let consumers = names(&format!("storm{}{run}", shape.label), shape.consumers);
    let targets: Vec<Target> = (0..shape.streams)
        .map(|i| Target {
            addr: service.addr,
            path: "/events".into(),
            headers: vec![
                ("x-consumer-id", consumers[i % shape.consumers].to_string()),
                ("accept", "text/event-stream".into()),
            ],
        })
        .collect();
    let db = database::connect(url).await?;
    let list: Vec<String> = consumers.iter().map(|c| c.to_string()).collect();
    let seed = async {
        db.execute(
            "INSERT INTO events (type, subscriber, payload) \
             SELECT 'storm', c, jsonb_build_object('seq', 0) FROM unnest($1::text[]) AS c",
            &[&list],
        )
        .await?;
        Ok(())
    };
    let seeds = live_phase(&targets, bench.args.connect_concurrency, seed).await?;
    tokio::time::sleep(CLOSED).await;
    let rows = db
        .query(
            "INSERT INTO events (type, subscriber, payload) \
             SELECT 'storm', c, jsonb_build_object('seq', s) \
             FROM generate_series(1, $2::int) AS s, unnest($1::text[]) AS c ORDER BY s \
             RETURNING id, subscriber",
            &[&list, &(shape.behind as i32)],
        )
        .await
        .context("publishing the missed events")?;
    let mut missed: HashMap<String, Vec<i64>> = HashMap::new();
    for row in rows {
        missed
            .entry(row.try_get(1)?)
            .or_default()
            .push(row.try_get(0)?);
    }
    let per_consumer: Vec<Arc<[i64]>> = list
        .iter()
        .map(|consumer| {
            let mut ids = missed.remove(consumer).unwrap_or_default();
            ids.sort_unstable();
            Arc::from(ids)
        })
        .collect();
    if per_consumer.iter().any(|ids| ids.len() != shape.behind) {
        bail!("the missed events were not {} per consumer", shape.behind);
    }
    db.batch_execute("VACUUM ANALYZE events").await?;
    let expected = (0..shape.streams)
        .map(|i| Arc::clone(&per_consumer[i % shape.consumers]))
        .collect();
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    if statements {
        db.batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
    }
    let meter = Meter {
        service: (service.pid, false),
        postmaster: bench.db.postmaster_pid(),
    };
    let running = storm_phase(
        targets,
        seeds,
        KeyFrom::Id,
        expected,
        &meter,
        bench.args.storm_in_flight,
    )
    .await;
    let counted = if statements {
        Some(super::dbcost::service_statements(&db).await?)
    } else {
        None
    };
    Ok(running.finish(counted).await)
}

/// One storm against Nchan in a freshly started nginx.
async fn nchan_storm(bench: &Bench, found: &Found, shape: Shape, run: usize) -> Result<Storm> {
    let dir = bench
        .launch
        .log_dir
        .join(format!("nchan-{}-{run}", shape.label));
    let nginx = Nginx::start(found, &dir, bench.args.nchan_backlog).await?;
    let result = nchan_with(bench, &nginx, shape, run).await;
    nginx.stop().await?;
    result
}

async fn nchan_with(bench: &Bench, nginx: &Nginx, shape: Shape, run: usize) -> Result<Storm> {
    let channels: Vec<String> = (0..shape.consumers)
        .map(|i| format!("storm{}{run}-{i}", shape.label))
        .collect();
    let targets: Vec<Target> = (0..shape.streams)
        .map(|i| Target {
            addr: nginx.addr,
            path: format!("/sub?id={}", channels[i % shape.consumers]),
            headers: vec![("accept", "text/event-stream".into())],
        })
        .collect();
    let seed_messages = channels
        .iter()
        .map(|channel| (channel.clone(), vec!["s=0".to_owned()]))
        .collect();
    let addr = nginx.addr;
    let seed = async move {
        nchan::publish(addr, seed_messages, PUBLISHERS).await?;
        Ok(())
    };
    let seeds = live_phase(&targets, bench.args.connect_concurrency, seed).await?;
    tokio::time::sleep(CLOSED).await;
    let missed = channels
        .iter()
        .map(|channel| {
            let bodies = (1..=shape.behind).map(|s| format!("s={s}")).collect();
            (channel.clone(), bodies)
        })
        .collect();
    let published = nchan::publish(addr, missed, PUBLISHERS)
        .await
        .context("publishing the missed events")?;
    if published != (shape.consumers * shape.behind) as u64 {
        bail!("published {published} missed messages");
    }
    let sequence: Arc<[i64]> = (1..=shape.behind as i64).collect();
    let expected = vec![sequence; shape.streams];
    super::wait_for_quiet(bench.args.quiet_timeout).await;
    let meter = Meter {
        service: (nginx.pid, true),
        postmaster: None,
    };
    let running = storm_phase(
        targets,
        seeds,
        KeyFrom::DataSeq,
        expected,
        &meter,
        bench.args.storm_in_flight,
    )
    .await;
    Ok(running.finish(None).await)
}
