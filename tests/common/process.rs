//! The real `event-piper` binary as a child process, as a user or an orchestrator runs it: its
//! address read from its log, its stdout kept for what it prints, and SIGTERM or SIGKILL to end
//! it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A running `event-piper` process, killed when dropped (a failing test leaves no process
/// behind).
pub struct ServiceProcess {
    child: Child,
    /// `http://host:port` it listens on.
    pub base: String,
    stdout: mpsc::Receiver<String>,
}

impl ServiceProcess {
    /// Starts the binary on a free loopback port with `args`, against `database_url` (None: it
    /// manages its own PostgreSQL), and returns once it has logged the address it listens on.
    /// Blocks while it waits: call it off the runtime's threads where they are needed.
    pub fn start<I, S>(database_url: Option<&str>, args: I) -> ServiceProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(env!("CARGO_BIN_EXE_event-piper"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match database_url {
            Some(url) => command.env("DATABASE_URL", url),
            None => command.env_remove("DATABASE_URL"),
        };
        let mut child = command.spawn().expect("starting event-piper");
        // Both pipes are drained on threads of their own, so that the process never blocks on
        // a full pipe, whatever the test reads of them (a thread goes on reading once nobody
        // listens: the rest of the log is dropped).
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let address = loop {
            let line = stderr
                .recv_timeout(PATIENCE)
                .expect("the service logs its address");
            if let Some(rest) = line.split("address=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        ServiceProcess {
            child,
            base: format!("http://{address}"),
            stdout,
        }
    }

    /// Reads its stdout until `find` returns something for a line.
    pub fn printed<T>(&self, mut find: impl FnMut(&str) -> Option<T>) -> T {
        loop {
            let line = self
                .stdout
                .recv_timeout(PATIENCE)
                .expect("the service prints the line looked for");
            if let Some(found) = find(&line) {
                return found;
            }
        }
    }

    /// Polls `GET /ready` until it answers 200.
    pub async fn wait_until_ready(&self) {
        let ready = async {
            while !reqwest::get(format!("{}/ready", self.base))
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .expect("the service became ready");
    }

    /// SIGTERM: asks for a graceful shutdown; [`Self::wait_for_exit`] tells how it ended.
    pub fn terminate(&self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits until the process has exited; fails the test if that takes longer than
    /// [`PATIENCE`].
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < PATIENCE, "event-piper did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its exit status if it has exited; never waits, never fails the test (for a drop).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no shutdown, no last write; the kernel closes its connections.
    pub fn kill(&mut self) {
        self.child.kill().expect("killing event-piper");
        self.child.wait().expect("reaping event-piper");
    }

    /// The local ports of the process's TCP sockets (its database connections among them, as
    /// `pg_stat_activity.client_port` shows them): its socket inodes looked up in
    /// /proc/net/tcp{,6}.
    pub fn local_ports(&self) -> Vec<i32> {
        let pid = self.child.id();
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .filter_map(|target| {
                        let target = target.to_string_lossy().into_owned();
                        let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
                        Some(inode.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ports = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // sl, local_address, rem_address, st, queues, tr, retrnsmt, uid, timeout, inode
                let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                    continue;
                };
                if inodes.iter().any(|ours| ours == inode)
                    && let Some(port) = local
                        .rsplit(':')
                        .next()
                        .and_then(|hex| i32::from_str_radix(hex, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
        ports
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a pipe, read on a thread of its own until it closes.
fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    lines_rx
}
