//! The service under test, run as a separate child process: the release `event-piper` binary
//! next to the bench's own executable, on a free loopback port.
//!
//! A separate process so that its memory (/proc/PID/status) and CPU are its own, and so that it
//! runs exactly as it does in production: its own runtime, its own allocator state.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::client;
use crate::procfs::{self, Memory};

pub struct Service {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    log: PathBuf,
}

/// How to run the service.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    /// `RUST_LOG` for the service.
    pub log_level: String,
    /// Extra command-line arguments (`--service-arg`).
    pub extra_args: Vec<String>,
    /// Where service logs go, one file per start.
    pub log_dir: PathBuf,
    /// The one CPU to run the service on (`--pin-cores`), through `taskset`, which execs it in
    /// place (the pid is the service's).
    pub cpu: Option<usize>,
}

impl Launch {
    /// The `event-piper` binary built next to this one (`cargo build --release` builds both).
    pub fn beside_current_exe() -> Result<PathBuf> {
        let exe = std::env::current_exe().context("locating the bench executable")?;
        let binary = exe
            .parent()
            .context("the bench executable has no directory")?
            .join("event-piper");
        if !binary.is_file() {
            bail!(
                "{} not found: build it first with `cargo build --release`",
                binary.display()
            );
        }
        Ok(binary)
    }
}

impl Service {
    /// Starts the service against `database_url` and waits until `GET /ready` answers 200.
    pub async fn start(launch: &Launch, database_url: &str, label: &str) -> Result<Service> {
        let port = event_piper::net::free_loopback_port().context("finding a free port")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = launch.log_dir.join(format!("service-{label}.log"));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = match launch.cpu {
            Some(cpu) => {
                let mut taskset = Command::new("taskset");
                taskset.arg("-c").arg(cpu.to_string()).arg(&launch.binary);
                taskset
            }
            None => Command::new(&launch.binary),
        };
        let child = command
            .arg("--database-url")
            .arg(database_url)
            .arg("--listen")
            .arg(addr.to_string())
            .args(&launch.extra_args)
            .env("RUST_LOG", &launch.log_level)
            // Scenario 3a holds 1,000 streams of one consumer, over the default per-consumer
            // limit. An environment variable, so that --service-arg can still set the flag.
            .env("EVENT_PIPER_MAX_STREAMS_PER_CONSUMER", "1000000")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // A bench that dies must not leave a service behind.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", launch.binary.display()))?;
        let pid = child.id().context("the service exited at once")?;
        let mut service = Service {
            child,
            pid,
            addr,
            log,
        };
        service.wait_ready(Duration::from_secs(60)).await?;
        Ok(service)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the service exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            let probe =
                tokio::time::timeout(Duration::from_secs(2), client::status(self.addr, "/ready"));
            if let Ok(Ok(status)) = probe.await
                && status.is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the service was not ready within {timeout:?}:\n{}",
            self.log_tail()
        )
    }

    pub fn memory(&self) -> Result<Memory> {
        procfs::memory(self.pid)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM (the service ends its streams and exits), SIGKILL if it has not within 15 s.
    pub async fn stop(mut self) -> Result<()> {
        self.terminate().await
    }

    /// Stops the service in place (SIGTERM, then waits for it to exit); [`Service::stop`] for a
    /// caller that starts another one into the same place.
    pub async fn terminate(&mut self) -> Result<()> {
        eprintln!("  service log: {}", self.log.display());
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, not yet
        // reaped, so it cannot have been reused.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("the service did not stop within 15 s of SIGTERM; killed it")
            }
        }
    }
}
