//! Configuration: every option is a command-line flag and an environment variable (clap).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::auth::{Auth, KeyError};

/// Streams PostgreSQL events to HTTP clients over Server-Sent Events.
///
/// With no DATABASE_URL, the service runs a private PostgreSQL of its own from the locally
/// installed server binaries, keeps its data in --data-dir and stops it on exit.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// PostgreSQL connection URL (postgres://user:pass@host:port/db). When unset, a private
    /// PostgreSQL is started and managed by the service.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Address the HTTP server listens on.
    #[arg(long, env = "EVENT_PIPER_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    /// Data directory of the managed PostgreSQL (only without DATABASE_URL). Default:
    /// /var/lib/event-piper when run as root, else $XDG_DATA_HOME/event-piper
    /// (~/.local/share/event-piper).
    #[arg(long, env = "EVENT_PIPER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Directory holding initdb, pg_ctl and postgres for the managed PostgreSQL. Default: found on
    /// PATH, else the newest /usr/lib/postgresql/*/bin.
    #[arg(long, env = "EVENT_PIPER_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// Do not apply postgresql/schema.sql at start-up (for databases whose schema is managed
    /// elsewhere).
    #[arg(long, env = "EVENT_PIPER_SKIP_SCHEMA")]
    pub skip_schema: bool,

    /// Maximum number of pooled query connections (replays, batch reads). The notification
    /// connection and the doorbell's come on top of these.
    #[arg(long, env = "EVENT_PIPER_POOL_SIZE", default_value_t = 8)]
    pub pool_size: usize,

    /// Maximum rows read per query, for new events and for each page of a replay.
    #[arg(long, env = "EVENT_PIPER_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Interval between heartbeats (SSE comments) on an open stream.
    #[arg(long, env = "EVENT_PIPER_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Reconnection delay sent to clients in the SSE `retry:` field.
    #[arg(long, env = "EVENT_PIPER_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub retry: Duration,

    /// At most this many frames are held per consumer for live delivery (memory is taken only
    /// for frames actually waiting). A stream that falls further behind catches up from the table.
    #[arg(long, env = "EVENT_PIPER_CHANNEL_CAPACITY", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub channel_capacity: u32,

    /// How long a write to a client may make no progress before the connection is dropped (a
    /// client that stopped reading). The client can resume with Last-Event-ID.
    #[arg(long, env = "EVENT_PIPER_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Most streams open at once on this instance (503 beyond).
    #[arg(long, env = "EVENT_PIPER_MAX_STREAMS", default_value_t = 50_000)]
    pub max_streams: usize,

    /// Most streams open at once for one consumer (429 beyond).
    #[arg(
        long,
        env = "EVENT_PIPER_MAX_STREAMS_PER_CONSUMER",
        default_value_t = 100
    )]
    pub max_streams_per_consumer: usize,

    /// How long a client may take to send its request headers.
    #[arg(long, env = "EVENT_PIPER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Largest accepted request head (request line and headers), in bytes; at least 8192.
    #[arg(long, env = "EVENT_PIPER_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Largest accepted body of POST /events, in bytes (413 beyond it).
    #[arg(long, env = "EVENT_PIPER_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body: usize,

    /// Origins allowed to call the API from a browser (CORS), comma-separated; `*` allows any
    /// origin but without credentials. None by default.
    #[arg(
        long = "cors-origin",
        env = "EVENT_PIPER_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// Log format: human-readable text, or JSON lines for log collectors.
    #[arg(long, env = "EVENT_PIPER_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Delete events older than this (by their timestamp), in small batches in the background.
    /// Unset: keep everything.
    #[arg(long, env = "EVENT_PIPER_RETENTION", value_parser = parse_duration)]
    pub retention: Option<Duration>,

    /// Turns authentication on: the HS256 secret (32 bytes or more) that signs tokens.
    #[arg(
        long,
        env = "EVENT_PIPER_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key"
    )]
    pub jwt_secret: Option<String>,

    /// Turns authentication on: a PEM public key (RSA for RS256, EC P-256 for ES256) that
    /// verifies tokens minted elsewhere.
    #[arg(long, env = "EVENT_PIPER_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Print the effective configuration (secrets masked) as JSON and exit.
    #[arg(long)]
    pub dump_config: bool,

    /// How soon the hub re-checks an id that is still in flight (a gap in the id sequence) when
    /// its reads stop moving past it; it backs off to 100ms.
    #[arg(long, env = "EVENT_PIPER_GAP_POLL", default_value = "2ms", value_parser = parse_duration)]
    pub gap_poll: Duration,

    /// While events keep coming, the hub reads new events this often by itself, and producers
    /// do not ring the doorbell (NOTIFY), which would serialize their commits.
    #[arg(long, env = "EVENT_PIPER_POLL_INTERVAL", default_value = "1ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// After this long without a new event the hub arms the doorbell and sleeps until a producer
    /// rings it.
    #[arg(long, env = "EVENT_PIPER_IDLE_AFTER", default_value = "20ms", value_parser = parse_duration)]
    pub idle_after: Duration,

    /// A sleeping hub reads anyway this often, in case a ring was lost.
    #[arg(long, env = "EVENT_PIPER_IDLE_POLL", default_value = "5s", value_parser = parse_duration)]
    pub idle_poll: Duration,

    /// How long to keep retrying the first database connection at start-up.
    #[arg(long, env = "EVENT_PIPER_CONNECT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Mint a token (HS256, with --jwt-secret) and print it: how a backend hands one to a client.
    Token {
        /// The consumer the bearer may read.
        #[arg(long)]
        sub: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Allow the bearer to publish events.
        #[arg(long)]
        publish: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// When the hub reads.
    pub fn hub_timing(&self) -> crate::hub::Timing {
        crate::hub::Timing {
            gap_poll: self.gap_poll,
            poll_interval: self.poll_interval,
            idle_after: self.idle_after,
            idle_poll: self.idle_poll,
        }
    }

    /// The token verifier, if authentication is configured.
    pub fn auth(&self) -> Result<Option<Auth>, KeyError> {
        match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(secret), _) => Auth::from_secret(secret).map(Some),
            (None, Some(path)) => Auth::from_public_key(path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The effective configuration as JSON, with the database password masked.
    pub fn to_json(&self) -> serde_json::Value {
        let database_url = self.database_url.as_deref().map(mask_password);
        let text = |d: Duration| format!("{}ms", d.as_millis());
        serde_json::json!({
            "database_url": database_url,
            "listen": self.listen.to_string(),
            "data_dir": self.data_dir,
            "pg_bin_dir": self.pg_bin_dir,
            "skip_schema": self.skip_schema,
            "pool_size": self.pool_size,
            "batch_size": self.batch_size,
            "heartbeat": text(self.heartbeat),
            "retry": text(self.retry),
            "channel_capacity": self.channel_capacity,
            "write_timeout": text(self.write_timeout),
            "max_streams": self.max_streams,
            "max_streams_per_consumer": self.max_streams_per_consumer,
            "header_timeout": text(self.header_timeout),
            "max_header_bytes": self.max_header_bytes,
            "max_body": self.max_body,
            "cors_origins": self.cors_origins,
            "log_format": format!("{:?}", self.log_format).to_lowercase(),
            "retention": self.retention.map(text),
            "jwt_secret": self.jwt_secret.as_ref().map(|_| "***"),
            "jwt_public_key": self.jwt_public_key,
            "gap_poll": text(self.gap_poll),
            "poll_interval": text(self.poll_interval),
            "idle_after": text(self.idle_after),
            "idle_poll": text(self.idle_poll),
            "connect_timeout": text(self.connect_timeout),
        })
    }
}

/// Replaces the password of a `postgres://user:password@host/db` URL (or a `password=` setting)
/// with `***`.
fn mask_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((credentials, host)) = rest.rsplit_once('@')
            && let Some((user, _)) = credentials.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => "password=***".to_owned(),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses durations such as `250ms`, `15s`, `2m`, `1h`; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 250ms, 15s, 2m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?}: use ms, s, m, h or d"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(mask_password("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(
            mask_password("host=db password=secret user=u"),
            "host=db password=*** user=u"
        );
    }

    #[test]
    fn defaults_parse() {
        let config = Config::parse_from(["event-piper"]);
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(config.batch_size, 1000);
    }
}
