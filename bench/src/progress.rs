//! The progress line: once a second while a phase runs, what was produced and delivered so far.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::consumer::Shared;

/// Prints until dropped.
pub struct Progress {
    task: JoinHandle<()>,
}

impl Progress {
    pub fn start(
        label: String,
        produced: Arc<AtomicU64>,
        fleet: Option<Arc<Shared>>,
        connections: usize,
    ) -> Progress {
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            let (mut last_produced, mut last_frames) = (0, 0);
            // Ends when the phase drops it; the cap is a backstop.
            for _ in 0..3600 {
                ticker.tick().await;
                let produced = produced.load(Ordering::Relaxed);
                let mut line = format!(
                    "  [{label} {:>4.0}s] produced {produced} (+{}/s)",
                    started.elapsed().as_secs_f64(),
                    produced - last_produced
                );
                last_produced = produced;
                if let Some(fleet) = &fleet {
                    let frames = fleet.frames.load(Ordering::Relaxed);
                    line += &format!(
                        " | delivered frames {frames} (+{}/s) | live {}/{connections} | failed {}",
                        frames - last_frames,
                        fleet.live.load(Ordering::Relaxed),
                        fleet.failed.load(Ordering::Relaxed),
                    );
                    last_frames = frames;
                }
                eprintln!("{line}");
            }
        });
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}
