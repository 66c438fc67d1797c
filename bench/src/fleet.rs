//! A fleet of consumer connections: opened with bounded concurrency, awaited until all are live,
//! closed and settled against the ledger.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::consumer::{self, ConnReport, ConnSpec, Shared};
use crate::delivery::DeliverySummary;

pub struct Fleet {
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<ConnReport>>,
}

/// The settled outcome of a fleet.
pub struct Settled {
    pub delivery: DeliverySummary,
    /// The first few connection errors, for the log.
    pub errors: Vec<String>,
    /// Latency samples whose commit time never appeared in the ledger.
    pub unmatched: usize,
}

impl Fleet {
    /// Starts one task per connection. Each task ends by itself at `deadline` at the latest.
    pub fn open(
        addr: SocketAddr,
        specs: Vec<ConnSpec>,
        shared: Arc<Shared>,
        concurrency: usize,
        deadline: Instant,
    ) -> Fleet {
        Fleet::open_over(addr, None, specs, shared, concurrency, deadline)
    }

    /// As [`Fleet::open`]; with `h2_streams` set, the streams are multiplexed over h2c
    /// connections of that many streams each instead of one HTTP/1.1 connection apiece.
    pub fn open_over(
        addr: SocketAddr,
        h2_streams: Option<usize>,
        specs: Vec<ConnSpec>,
        shared: Arc<Shared>,
        concurrency: usize,
        deadline: Instant,
    ) -> Fleet {
        let mut connection: Option<crate::client::SharedH2> = None;
        let (stop, stop_rx) = watch::channel(false);
        // Opening thousands at once would overflow the service's accept backlog (SYN drops cost
        // a one-second retransmit each) and measure the kernel rather than the service.
        let connecting = Arc::new(Semaphore::new(concurrency.max(1)));
        let tasks = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let h2 = h2_streams.map(|per| {
                    if i % per.max(1) == 0 || connection.is_none() {
                        connection = Some(Default::default());
                    }
                    Arc::clone(connection.as_ref().unwrap())
                });
                tokio::spawn(consumer::run(
                    addr,
                    h2,
                    spec,
                    Arc::clone(&shared),
                    Arc::clone(&connecting),
                    stop_rx.clone(),
                    deadline,
                ))
            })
            .collect();
        Fleet {
            shared,
            stop,
            tasks,
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Waits until every connection has read its `retry:` frame.
    pub async fn wait_live(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let total = self.len();
        let shared = &self.shared;
        let all_live = consumer::wait_until(timeout, || {
            shared.live.load(Ordering::Relaxed) == total
                || shared.failed.load(Ordering::Relaxed) > 0
        })
        .await;
        let failed = shared.failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!("{failed} of {total} consumer connections failed to open");
        }
        if !all_live {
            bail!(
                "only {} of {total} consumer connections live after {timeout:?}",
                shared.live.load(Ordering::Relaxed)
            );
        }
        Ok(started.elapsed())
    }

    /// Closes every connection and checks what each received against the ledger.
    pub async fn close(self) -> Settled {
        self.stop.send_replace(true);
        let shared = self.shared;
        let mut delivery = DeliverySummary {
            connections: self.tasks.len(),
            ..DeliverySummary::default()
        };
        let mut errors = Vec::new();
        let mut unmatched = 0;
        for task in self.tasks {
            let mut report = match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(report)) => report,
                Ok(Err(error)) => {
                    delivery.failed += 1;
                    errors.push(format!("connection task failed: {error}"));
                    continue;
                }
                Err(_) => {
                    delivery.failed += 1;
                    errors.push("connection task did not stop within 30 s".into());
                    continue;
                }
            };
            unmatched += consumer::resolve(&mut report, &shared);
            let kind = report.spec.only_type.as_ref().map(|only| only.kind);
            let (lost, foreign) = report
                .delivery
                .settle(&shared.ledger, report.spec.index, kind);
            delivery.received += report.delivery.received;
            delivery.lost += lost;
            delivery.duplicates += report.delivery.duplicates;
            delivery.out_of_order += report.delivery.out_of_order;
            delivery.foreign += foreign + report.delivery.malformed;
            if let Some(error) = report.error {
                delivery.failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{}: {error}", report.spec.consumer));
                }
            }
        }
        Settled {
            delivery,
            errors,
            unmatched,
        }
    }
}
