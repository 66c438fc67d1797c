//! Configuration: every option is a command-line flag and an environment variable (clap).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Streams PostgreSQL events to HTTP clients over Server-Sent Events.
///
/// With no DATABASE_URL, the service runs a private PostgreSQL of its own from the locally
/// installed server binaries, keeps its data in --data-dir and stops it on exit.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
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
    /// connection comes on top of these.
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

    /// Frames buffered per consumer for live delivery. A stream that falls further behind catches
    /// up from the table instead.
    #[arg(long, env = "EVENT_PIPER_CHANNEL_CAPACITY", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub channel_capacity: u32,

    /// How long a write to a client may make no progress before the connection is dropped (a
    /// client that stopped reading). The client can resume with Last-Event-ID.
    #[arg(long, env = "EVENT_PIPER_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// How often the hub re-checks an id that is still in flight (a gap in the id sequence).
    #[arg(long, env = "EVENT_PIPER_GAP_POLL", default_value = "10ms", value_parser = parse_duration)]
    pub gap_poll: Duration,

    /// How long to keep retrying the first database connection at start-up.
    #[arg(long, env = "EVENT_PIPER_CONNECT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
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
    fn defaults_parse() {
        let config = Config::parse_from(["event-piper"]);
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(config.batch_size, 1000);
    }
}
