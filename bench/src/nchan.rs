//! The storm scenario's peer: Nchan (the nginx module), started by the bench as its own nginx on
//! a free loopback port, with its configuration and logs in a directory of the bench's, and
//! killed at the end; and a publisher that POSTs messages to its publisher location over
//! keep-alive connections.
//!
//! Configured as nginx ships but for what the comparison needs: as many worker processes as
//! cores (event-piper's runtime has one thread per core) and a message buffer that keeps every
//! message a storm resumes from. The listen backlog is nginx's own (511) unless
//! `--nchan-backlog` sets it: a storm can overflow an accept queue, and each dropped handshake
//! costs its client a one-second SYN retransmit, so the scenario shows the overflows beside the
//! times (event-piper's listener has a backlog of 128: `ss -ltn` shows it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::client;

/// The Debian package's module path.
const MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// An nginx able to run Nchan.
#[derive(Debug, Clone)]
pub struct Found {
    pub nginx: PathBuf,
    /// `load_module` path; `None` when the module is built into the binary.
    pub module: Option<PathBuf>,
    /// "nginx/1.22.1, Nchan 1:1.3.6+dfsg-2" (as far as it can be told).
    pub version: String,
}

/// Looks for nginx (`explicit`, else /usr/sbin/nginx, else `nginx` on PATH) and the Nchan module.
/// The error says why Nchan cannot run.
pub fn find(explicit: Option<&Path>) -> Result<Found, String> {
    let nginx = match explicit {
        Some(path) => path.to_path_buf(),
        None => ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .unwrap_or_else(|| PathBuf::from("nginx")),
    };
    let output = std::process::Command::new(&nginx)
        .arg("-V")
        .output()
        .map_err(|error| format!("cannot run {}: {error}", nginx.display()))?;
    // nginx -V writes to stderr.
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    let nginx_version = text
        .lines()
        .find_map(|line| line.strip_prefix("nginx version: "))
        .unwrap_or("nginx (unknown version)")
        .to_owned();
    let module = if Path::new(MODULE).is_file() {
        Some(PathBuf::from(MODULE))
    } else if text.contains("nchan") {
        None
    } else {
        return Err(format!(
            "{} has no Nchan module ({MODULE} not found; apt-get install libnginx-mod-nchan)",
            nginx.display()
        ));
    };
    let package = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libnginx-mod-nchan"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned());
    let version = match package {
        Some(package) => format!("{nginx_version}, Nchan {package} (Debian package)"),
        None => format!("{nginx_version}, Nchan (version unknown)"),
    };
    Ok(Found {
        nginx,
        module,
        version,
    })
}

/// A running nginx with Nchan.
pub struct Nginx {
    child: Child,
    /// The master process (its workers are its children).
    pub pid: u32,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Writes the configuration under `dir`, starts nginx in the foreground and waits until it
    /// answers.
    pub async fn start(found: &Found, dir: &Path, backlog: Option<u32>) -> Result<Nginx> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = event_piper::net::free_loopback_port().context("finding a free port")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(found, dir, addr, backlog))?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = Command::new(&found.nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", found.nginx.display()))?;
        let pid = child.id().context("nginx exited at once")?;
        let mut nginx = Nginx {
            child,
            pid,
            addr,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx exited ({status}) before it answered; see {}",
                    nginx.dir.display()
                );
            }
            let probe =
                tokio::time::timeout(Duration::from_secs(2), client::status(addr, "/ready"));
            if let Ok(Ok(status)) = probe.await
                && status.is_success()
            {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not answer within 20 s; see {}",
                    nginx.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (nginx's fast shutdown), SIGKILL after 10 s.
    pub async fn stop(mut self) -> Result<()> {
        eprintln!("  nginx logs: {}", self.dir.display());
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, not yet
        // reaped, so it cannot have been reused.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("nginx did not stop within 10 s of SIGTERM; killed it")
            }
        }
    }
}

fn config(found: &Found, dir: &Path, addr: SocketAddr, backlog: Option<u32>) -> String {
    let backlog = backlog.map(|n| format!(" backlog={n}")).unwrap_or_default();
    let load = found
        .module
        .as_ref()
        .map(|module| format!("load_module {};\n", module.display()))
        .unwrap_or_default();
    let dir = dir.display();
    format!(
        "{load}\
worker_processes auto;
worker_rlimit_nofile 65536;
daemon off;
master_process on;
pid {dir}/nginx.pid;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  # Every message a storm resumes from stays in the channel's buffer.
  nchan_message_buffer_length 1000;
  nchan_message_timeout 1h;
  server {{
    listen {addr}{backlog};
    location = /pub {{ nchan_publisher; nchan_channel_id $arg_id; }}
    location = /sub {{ nchan_subscriber eventsource; nchan_channel_id $arg_id; }}
    location = /ready {{ return 200 \"ready\"; }}
  }}
}}
"
    )
}

/// Publishes `messages` (channel, bodies in order) over `connections` keep-alive connections;
/// each channel's messages go in order over one connection. Returns the messages published.
pub async fn publish(
    addr: SocketAddr,
    messages: Vec<(String, Vec<String>)>,
    connections: usize,
) -> Result<u64> {
    let queue = Arc::new(Mutex::new(messages.into_iter()));
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let queue = Arc::clone(&queue);
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            let mut published = 0u64;
            loop {
                let Some((channel, bodies)) = queue.lock().await.next() else {
                    break;
                };
                for body in bodies {
                    sender.ready().await?;
                    let request = Request::post(format!("/pub?id={channel}"))
                        .header(header::HOST, addr.to_string())
                        .header(header::CONTENT_TYPE, "text/plain")
                        .body(Full::new(Bytes::from(body)))?;
                    let mut response = sender.send_request(request).await?;
                    let status = response.status();
                    while let Some(frame) = response.body_mut().frame().await {
                        frame?;
                    }
                    ensure!(
                        status.is_success(),
                        "POST /pub?id={channel} answered {status}"
                    );
                    published += 1;
                }
            }
            driver.abort();
            anyhow::Ok(published)
        }));
    }
    let mut published = 0;
    for task in tasks {
        published += task.await.context("publisher task")??;
    }
    Ok(published)
}
