//! A private PostgreSQL cluster run from the locally installed server binaries.
//!
//! Used when the service is started without `DATABASE_URL`, and by the integration tests. The
//! cluster listens on 127.0.0.1 only (trust authentication, no Unix socket) on a free port chosen
//! at each start. PostgreSQL refuses to run as root, so when we are root every server command runs
//! as an unprivileged user (`postgres`, else `nobody`) that owns the data directory.
//!
//! A small watchdog process holds the read end of a pipe whose write end only we hold: when this
//! process exits for any reason (even SIGKILL), the pipe closes and the watchdog stops the server,
//! so a crashed service or test binary never leaves a PostgreSQL behind.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The superuser created by initdb; the service connects as this role.
pub const SUPERUSER: &str = "event_piper";

#[derive(Debug, thiserror::Error)]
pub enum ManagedPostgresError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb on PATH and in /usr/lib/postgresql/*/bin); \
         install the PostgreSQL server, pass --pg-bin-dir, or set DATABASE_URL"
    )]
    NoBinaries,
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
}

type Result<T> = std::result::Result<T, ManagedPostgresError>;

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ManagedPostgresError {
    let context = context.into();
    move |source| ManagedPostgresError::Io { context, source }
}

/// What to do with the data directory when the server stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// Keep the data for the next run (the service).
    Keep,
    /// Remove the directory (throwaway test clusters).
    Remove,
}

/// A running cluster. Stopped by [`ManagedPostgres::stop`], or by the watchdog when this process
/// exits.
#[derive(Debug)]
pub struct ManagedPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    watchdog: Child,
}

/// The user that runs server commands: ourselves, or an unprivileged one when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    fn detect() -> Result<Option<RunAs>> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let passwd = fs::read_to_string("/etc/passwd").map_err(io_error("reading /etc/passwd"))?;
        ["postgres", "nobody"]
            .iter()
            .find_map(|name| lookup_user(&passwd, name))
            .map(Some)
            .ok_or_else(|| ManagedPostgresError::Io {
                context:
                    "running as root and no unprivileged user (postgres, nobody) to run PostgreSQL"
                        .into(),
                source: io::Error::from(io::ErrorKind::NotFound),
            })
    }

    fn apply(run_as: Option<RunAs>, command: &mut Command) -> &mut Command {
        if let Some(RunAs { uid, gid }) = run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn chown(run_as: Option<RunAs>, path: &Path) -> Result<()> {
        if let Some(RunAs { uid, gid }) = run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_error(format!("chown {}", path.display())))?;
        }
        Ok(())
    }
}

fn lookup_user(passwd: &str, name: &str) -> Option<RunAs> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let uid = fields.nth(1)?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(RunAs { uid, gid })
    })
}

/// Finds the directory holding initdb, pg_ctl and postgres.
pub fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(dir) = on_path
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    {
        return Ok(dir);
    }
    // Debian and Ubuntu keep the server binaries off PATH, one directory per major version.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(ManagedPostgresError::NoBinaries)
}

/// Where the service keeps its managed cluster when no --data-dir is given.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/event-piper");
    }
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data_home.join("event-piper")
}

impl ManagedPostgres {
    /// Initialises `data_dir` if it holds no cluster yet, starts the server on a free loopback
    /// port and waits until it accepts connections. Blocking: call it before or outside the
    /// async runtime's hot paths.
    pub fn start(data_dir: &Path, bin_dir: Option<&Path>, on_stop: OnStop) -> Result<Self> {
        let bin_dir = find_bin_dir(bin_dir)?;
        let run_as = RunAs::detect()?;
        fs::create_dir_all(data_dir)
            .map_err(io_error(format!("creating {}", data_dir.display())))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io_error(format!("resolving {}", data_dir.display())))?;
        RunAs::chown(run_as, &data_dir)?;
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error(format!("chmod {}", data_dir.display())))?;

        if !data_dir.join("PG_VERSION").exists() {
            let mut initdb = Command::new(bin_dir.join("initdb"));
            initdb
                .arg("--pgdata")
                .arg(&data_dir)
                .args(["--username", SUPERUSER, "--auth", "trust"])
                .args(["--encoding", "UTF8", "--no-locale", "--no-instructions"]);
            run(RunAs::apply(run_as, &mut initdb), "initdb")?;
        }

        let watchdog = spawn_watchdog(&bin_dir, &data_dir, run_as, on_stop)?;
        let postgres = ManagedPostgres {
            data_dir,
            bin_dir,
            run_as,
            port: crate::net::free_loopback_port().map_err(io_error("finding a free port"))?,
            watchdog,
        };
        postgres.start_server()?;
        Ok(postgres)
    }

    /// Starts the server of an initialised cluster on our port and waits until it accepts
    /// connections.
    pub fn start_server(&self) -> Result<()> {
        let log = self.data_dir.join("server.log");
        let mut pg_ctl = Command::new(self.bin_dir.join("pg_ctl"));
        pg_ctl
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--log")
            .arg(&log)
            .args(["--wait", "--timeout", "60", "--options"])
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
                self.port
            ))
            .arg("start");
        run(RunAs::apply(self.run_as, &mut pg_ctl), "pg_ctl start").map_err(|error| {
            let log = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            ManagedPostgresError::Command {
                command: "pg_ctl start".into(),
                status: error.to_string(),
                output: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            }
        })
    }

    /// Stops the server with a fast shutdown (sessions are ended, transactions in flight roll
    /// back); [`ManagedPostgres::start_server`] brings it back on the same port. For fault tests.
    pub fn stop_server(&self) -> Result<()> {
        let mut pg_ctl = Command::new(self.bin_dir.join("pg_ctl"));
        pg_ctl
            .arg("--pgdata")
            .arg(&self.data_dir)
            .args(["--mode", "fast", "--wait", "stop"]);
        run(RunAs::apply(self.run_as, &mut pg_ctl), "pg_ctl stop")
    }

    /// Stops the server the way a crash would (immediate shutdown: no checkpoint, sessions cut).
    /// For fault tests.
    pub fn kill_server(&self) -> Result<()> {
        let mut pg_ctl = Command::new(self.bin_dir.join("pg_ctl"));
        pg_ctl
            .arg("--pgdata")
            .arg(&self.data_dir)
            .args(["--mode", "immediate", "--wait", "stop"]);
        run(RunAs::apply(self.run_as, &mut pg_ctl), "pg_ctl stop")
    }

    /// A hot standby of this cluster in `data_dir` (which must not exist or be empty): a base
    /// backup with `pg_basebackup -R` (it streams from this server as the superuser, which
    /// initdb's `trust` lines in pg_hba.conf allow for replication too), started on a port of
    /// its own, as the same user. Removed when stopped, like a cluster started with
    /// [`OnStop::Remove`].
    pub fn start_standby(&self, data_dir: &Path) -> Result<ManagedPostgres> {
        fs::create_dir_all(data_dir)
            .map_err(io_error(format!("creating {}", data_dir.display())))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io_error(format!("resolving {}", data_dir.display())))?;
        RunAs::chown(self.run_as, &data_dir)?;
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error(format!("chmod {}", data_dir.display())))?;
        let mut backup = Command::new(self.client_binary("pg_basebackup"));
        backup
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--username", SUPERUSER, "--write-recovery-conf"])
            .args([
                "--wal-method",
                "stream",
                "--checkpoint",
                "fast",
                "--no-sync",
            ]);
        if let Err(error) = run(RunAs::apply(self.run_as, &mut backup), "pg_basebackup") {
            // Nothing watches the directory yet: leave nothing behind.
            let _ = fs::remove_dir_all(&data_dir);
            return Err(error);
        }
        // The primary's log would be copied too; the standby writes its own.
        let _ = fs::remove_file(data_dir.join("server.log"));
        let watchdog = spawn_watchdog(&self.bin_dir, &data_dir, self.run_as, OnStop::Remove)?;
        let standby = ManagedPostgres {
            data_dir,
            bin_dir: self.bin_dir.clone(),
            run_as: self.run_as,
            port: crate::net::free_loopback_port().map_err(io_error("finding a free port"))?,
            watchdog,
        };
        standby.start_server()?;
        Ok(standby)
    }

    /// A binary of the same installation as our `pg_ctl`: beside it, or beside what it links to
    /// (a PATH directory may hold links to only the server's binaries).
    fn client_binary(&self, name: &str) -> PathBuf {
        let beside = self.bin_dir.join(name);
        if beside.is_file() {
            return beside;
        }
        fs::canonicalize(self.bin_dir.join("pg_ctl"))
            .ok()
            .and_then(|pg_ctl| Some(pg_ctl.parent()?.join(name)))
            .filter(|path| path.is_file())
            .unwrap_or(beside)
    }

    /// A database restart: fast shutdown, then start on the same port.
    pub fn restart(&self) -> Result<()> {
        self.stop_server()?;
        self.start_server()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The connection URL of `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database` unless it exists.
    pub async fn create_database(
        &self,
        database: &str,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await?
            .is_some();
        if !exists {
            // Identifiers cannot be bound parameters; quote it.
            let quoted = format!("\"{}\"", database.replace('"', "\"\""));
            client
                .batch_execute(&format!("CREATE DATABASE {quoted}"))
                .await?;
        }
        drop(client);
        let _ = driver.await;
        Ok(())
    }

    /// Stops the server (fast shutdown: open sessions are ended) and waits for it.
    pub fn stop(mut self) {
        // Closing our end of the pipe is the watchdog's signal.
        drop(self.watchdog.stdin.take());
        if let Err(error) = self.watchdog.wait() {
            tracing::warn!(%error, "waiting for the PostgreSQL watchdog");
        }
    }
}

fn spawn_watchdog(
    bin_dir: &Path,
    data_dir: &Path,
    run_as: Option<RunAs>,
    on_stop: OnStop,
) -> Result<Child> {
    let script = r#"cat >/dev/null
"$1/pg_ctl" --pgdata "$2" --mode fast --wait stop >/dev/null 2>&1
[ "$3" = remove ] && rm -rf "$2"
exit 0"#;
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", script, "event-piper-watchdog"])
        .arg(bin_dir)
        .arg(data_dir)
        .arg(match on_stop {
            OnStop::Keep => "keep",
            OnStop::Remove => "remove",
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        // Its own process group: a Ctrl-C in the terminal must not kill it before it did its job.
        .process_group(0);
    RunAs::apply(run_as, &mut command)
        .spawn()
        .map_err(io_error("starting the PostgreSQL watchdog"))
}

fn run(command: &mut Command, name: &str) -> Result<()> {
    let output = command
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(io_error(format!("running {name}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    Err(ManagedPostgresError::Command {
        command: name.into(),
        status: output.status.to_string(),
        output: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_in_passwd() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104::/var/lib/postgresql:/bin/sh\n";
        let user = lookup_user(passwd, "postgres").expect("postgres is listed");
        assert_eq!((user.uid, user.gid), (101, 104));
        assert!(lookup_user(passwd, "nobody").is_none());
    }
}
