//! Configuration: every option is a command-line flag and an environment variable (clap).
//!
//! `--dump-config` serializes [`Config`] itself (serde), so a new flag shows up in the dump
//! without anyone listing it; secrets are masked field by field with `serialize_with`, and a unit
//! test compares the dump's keys with clap's arguments.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Serialize, Serializer};

use crate::auth::{Auth, Expect, KeyError};

/// The hub's URL when `--hub-url` is not set (Mercure's default).
pub const DEFAULT_HUB_URL: &str = "https://localhost/.well-known/mercure";

/// Streams PostgreSQL events to HTTP clients over Server-Sent Events.
///
/// With no DATABASE_URL, the service runs a private PostgreSQL of its own from the locally
/// installed server binaries, keeps its data in --data-dir and stops it on exit.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// Not configuration: what to do instead of serving.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,

    /// PostgreSQL connection URL (postgres://user:pass@host:port/db). When unset, a private
    /// PostgreSQL is started and managed by the service.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    #[serde(serialize_with = "masked_url")]
    pub database_url: Option<String>,

    /// Hot standbys of the database (postgres:// URLs, repeatable or comma-separated) that
    /// serve replay pages, history searches and webhook catch-ups. A read waits for a replica
    /// to replay what it must see (at most --replica-max-wait), else reads on the primary; so
    /// does a read that fails there. The hub, the doorbell, LISTEN and writes stay on the
    /// primary.
    #[arg(
        long = "replica-url",
        env = "EVENT_PIPER_REPLICA_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(serialize_with = "masked_urls")]
    pub replica_urls: Vec<String>,

    /// How long a read waits for a lagging replica before it reads on the primary.
    #[arg(long, env = "EVENT_PIPER_REPLICA_MAX_WAIT", default_value = "200ms", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub replica_max_wait: Duration,

    /// Address the HTTP server listens on.
    #[arg(long, env = "EVENT_PIPER_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    /// TLS certificate chain (PEM) for the TLS listener (--tls-listen): HTTP/2 for browsers,
    /// whose six HTTP/1.1 connections per origin cap a page at six streams. Needs --tls-key.
    /// Re-read every --tls-reload-interval: new connections get a rotated certificate.
    #[arg(long, env = "EVENT_PIPER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, RSA or EC) of --tls-cert.
    #[arg(long, env = "EVENT_PIPER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Address the TLS listener binds when --tls-cert and --tls-key are given (HTTP/2 and
    /// HTTP/1.1, chosen by ALPN). The plain --listen port keeps serving beside it.
    #[arg(long, env = "EVENT_PIPER_TLS_LISTEN", default_value = "127.0.0.1:8443")]
    pub tls_listen: SocketAddr,

    /// How often the TLS certificate and key files are checked for a new pair.
    #[arg(long, env = "EVENT_PIPER_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub tls_reload_interval: Duration,

    /// Most streams a client may open at once on one HTTP/2 connection (announced in its
    /// SETTINGS; a client opens more connections beyond it).
    #[arg(long, env = "EVENT_PIPER_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub http2_max_concurrent_streams: u32,

    /// How long an HTTP/2 connection may stay open with no stream on it before the server closes
    /// it (GOAWAY). An open event stream keeps its connection; an HTTP/1.1 connection between
    /// requests is bounded by --header-timeout instead.
    #[arg(long, env = "EVENT_PIPER_HTTP2_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub http2_idle_timeout: Duration,

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

    /// Maximum number of pooled query connections (replays, history, publishing). The hub's
    /// reads, the notification connection and the doorbell's come on top of these.
    #[arg(long, env = "EVENT_PIPER_POOL_SIZE", default_value_t = 8)]
    pub pool_size: usize,

    /// Maximum rows read per query, for new events and for each page of a replay.
    #[arg(long, env = "EVENT_PIPER_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Interval between heartbeats (SSE comments) on an open stream.
    #[arg(long, env = "EVENT_PIPER_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub heartbeat: Duration,

    /// Reconnection delay sent to clients in the SSE `retry:` field.
    #[arg(long, env = "EVENT_PIPER_RETRY", default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub retry: Duration,

    /// At most this many frames are held per consumer for live delivery (memory is taken only
    /// for frames actually waiting). A stream that falls further behind catches up from the table.
    #[arg(long, env = "EVENT_PIPER_CHANNEL_CAPACITY", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub channel_capacity: u32,

    /// Memory, in bytes, for the most recent events: a client resuming within them is served
    /// from memory instead of a read, so a reconnect storm costs the database almost nothing.
    /// Loaded at start (a read per 10,000 events). 0 keeps none.
    #[arg(long, env = "EVENT_PIPER_RECENT_BYTES", default_value_t = 32 << 20)]
    pub recent_bytes: usize,

    /// How long a write to a client may make no progress before the connection is dropped (a
    /// client that stopped reading). The client can resume with Last-Event-ID.
    #[arg(long, env = "EVENT_PIPER_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
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
    #[serde(serialize_with = "millis")]
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

    /// End every stream after this long (its client resumes with Last-Event-ID), so that a
    /// rotated key or a revoked token takes effect everywhere within it. Unset: streams last
    /// until their token expires, or forever without authentication.
    #[arg(long, env = "EVENT_PIPER_MAX_STREAM_LIFETIME", value_parser = parse_duration)]
    #[serde(serialize_with = "optional_millis")]
    pub max_stream_lifetime: Option<Duration>,

    /// On SIGTERM, end the open streams spread over this long (each with a jittered `retry:`),
    /// so that their clients come back to the other instances over seconds rather than in one
    /// burst. `/ready` answers 503 and new connections are refused from the start of it. 0 ends
    /// them all at once.
    #[arg(long, env = "EVENT_PIPER_DRAIN_PERIOD", default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub drain_period: Duration,

    /// Delete events older than this (by their timestamp), in small batches in the background.
    /// Unset: keep everything.
    #[arg(long, env = "EVENT_PIPER_RETENTION", value_parser = parse_duration)]
    #[serde(serialize_with = "optional_millis")]
    pub retention: Option<Duration>,

    /// Turns authentication on: the HS256 secret (32 bytes or more) that signs tokens.
    #[arg(
        long,
        env = "EVENT_PIPER_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key"
    )]
    #[serde(serialize_with = "masked_secret")]
    pub jwt_secret: Option<String>,

    /// Turns authentication on: a PEM public key (RSA for RS256, EC P-256 for ES256) that
    /// verifies tokens minted elsewhere.
    #[arg(long, env = "EVENT_PIPER_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// The audience a token must name in `aud` (Mercure: the hub's resource identifier, such as
    /// `https://example.com/.well-known/mercure`). Unset: `aud` is not checked.
    #[arg(long, env = "EVENT_PIPER_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The issuer a token's `iss` must be. Unset: `iss` is not checked.
    #[arg(long, env = "EVENT_PIPER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// With authentication on: streams without a token may follow topics (and receive their
    /// public events only), as Mercure's anonymous subscribers do.
    #[arg(long, env = "EVENT_PIPER_ANONYMOUS_SUBSCRIBERS")]
    pub anonymous_subscribers: bool,

    /// The Mercure hub's public URL: relative topics and URL patterns resolve against it, its
    /// path is the namespace publishers may not use, and discovery links point to it. Unset:
    /// https://localhost/.well-known/mercure, and links use the path alone.
    #[arg(long, env = "EVENT_PIPER_HUB_URL")]
    pub hub_url: Option<String>,

    /// Print the effective configuration (secrets masked) as JSON and exit.
    #[arg(long)]
    #[serde(skip)]
    pub dump_config: bool,

    /// How soon the hub re-checks an id that is still in flight (a gap in the id sequence) when
    /// its reads stop moving past it; it backs off to 100ms.
    #[arg(long, env = "EVENT_PIPER_GAP_POLL", default_value = "2ms", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub gap_poll: Duration,

    /// While events keep coming, the hub reads new events this often by itself, and producers
    /// do not ring the doorbell (NOTIFY), which would serialize their commits.
    #[arg(long, env = "EVENT_PIPER_POLL_INTERVAL", default_value = "1ms", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub poll_interval: Duration,

    /// After this long without a new event the hub arms the doorbell and sleeps until a producer
    /// rings it.
    #[arg(long, env = "EVENT_PIPER_IDLE_AFTER", default_value = "20ms", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub idle_after: Duration,

    /// A sleeping hub reads anyway this often, in case a ring was lost.
    #[arg(long, env = "EVENT_PIPER_IDLE_POLL", default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub idle_poll: Duration,

    /// Let webhook subscriptions deliver to loopback, private and link-local addresses. Off by
    /// default, so that a subscription cannot be used to reach inside the network.
    #[arg(long, env = "EVENT_PIPER_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,

    /// How long a webhook receiver has to answer a delivery before it counts as failed.
    #[arg(long, env = "EVENT_PIPER_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub webhook_timeout: Duration,

    /// The first retry delay of a failed webhook delivery; each further one doubles, with jitter.
    #[arg(long, env = "EVENT_PIPER_WEBHOOK_RETRY_MIN", default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub webhook_retry_min: Duration,

    /// The longest retry delay of a failed webhook delivery (a receiver's Retry-After may ask
    /// for longer, up to an hour).
    #[arg(long, env = "EVENT_PIPER_WEBHOOK_RETRY_MAX", default_value = "10m", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub webhook_retry_max: Duration,

    /// A webhook subscription failing for longer than this is marked failing (its events stay
    /// in the table, retention included, until it recovers, is moved or deleted).
    #[arg(long, env = "EVENT_PIPER_WEBHOOK_FAILING_AFTER", default_value = "15m", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub webhook_failing_after: Duration,

    /// How often an instance looks for webhook subscriptions nobody delivers (new, resumed, or
    /// left by an instance that died) and for changes made on other instances.
    #[arg(long, env = "EVENT_PIPER_WEBHOOK_POLL", default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
    pub webhook_poll: Duration,

    /// How long to keep retrying the first database connection at start-up.
    #[arg(long, env = "EVENT_PIPER_CONNECT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "millis")]
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
        /// Limit the bearer to events of these types (comma-separated: `order.*,ping`).
        #[arg(long)]
        types: Option<String>,
        /// Allow the bearer to manage its consumer's webhook subscriptions.
        #[arg(long)]
        subscriptions: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
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
        let auth = match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(secret), _) => Auth::from_secret(secret)?,
            (None, Some(path)) => Auth::from_public_key(path)?,
            (None, None) => return Ok(None),
        };
        let expect = Expect {
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        };
        Ok(Some(auth.expecting(&expect, self.hub_url()?)))
    }

    /// The TLS files, if TLS is configured; both or neither (the flags require each other,
    /// and a configuration built in code gets the same check).
    pub fn tls_files(&self) -> Result<Option<crate::tls::TlsFiles>, crate::tls::TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(crate::tls::TlsError::Config(
                "--tls-cert needs --tls-key (the certificate's private key)".into(),
            )),
            (None, Some(_)) => Err(crate::tls::TlsError::Config(
                "--tls-key needs --tls-cert (the certificate chain)".into(),
            )),
        }
    }

    /// The hub's URL (`--hub-url`, else [`DEFAULT_HUB_URL`]).
    pub fn hub_url(&self) -> Result<url::Url, KeyError> {
        let text = self.hub_url.as_deref().unwrap_or(DEFAULT_HUB_URL);
        url::Url::parse(text).map_err(|error| KeyError::BadHubUrl(format!("{text:?}: {error}")))
    }

    /// The effective configuration as JSON, secrets masked: what `--dump-config` prints. Going
    /// through a `Value` sorts the keys, so the dump reads alphabetically.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the configuration serializes to JSON")
    }
}

/// Durations are dumped in milliseconds (`"15000ms"`), which any unit converts to exactly.
fn millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{}ms", duration.as_millis()))
}

fn optional_millis<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => millis(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// The database URL with its password (if any) replaced by `***`.
fn masked_url<S: Serializer>(url: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    url.as_deref().map(mask_password).serialize(serializer)
}

/// Every replica URL with its password masked.
fn masked_urls<S: Serializer>(urls: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|url| mask_password(url)))
}

/// A secret is dumped as `***` when set, so the dump still tells whether it is.
fn masked_secret<S: Serializer>(secret: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    secret.as_ref().map(|_| "***").serialize(serializer)
}

/// Replaces the password of a `postgres://user:password@host/db` URL (or a `password=` setting)
/// with `***`.
pub fn mask_password(url: &str) -> String {
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

/// Parses durations with humantime (`250ms`, `15s`, `2m`, `1h`, `7d`, `1.5s`, `1h 30m`); a bare
/// number means seconds, as it always has here (humantime itself wants a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bare_number = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let parsed = if bare_number {
        humantime::parse_duration(&format!("{text}s"))
    } else {
        humantime::parse_duration(text)
    };
    // clap already names the flag and the value; humantime says what is wrong with it.
    parsed.map_err(|e| format!("{e} (e.g. 250ms, 15s, 2m, 1h, 7d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration(" 15s "), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.2.3").is_err());
        let error = parse_duration("15x").unwrap_err();
        assert!(error.contains("\"x\"") && error.contains("15s"), "{error}");
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
    fn tls_files_come_in_pairs() {
        let error = Config::try_parse_from(["event-piper", "--tls-cert", "c.pem"]).unwrap_err();
        assert!(error.to_string().contains("--tls-key"), "{error}");
        let error = Config::try_parse_from(["event-piper", "--tls-key", "k.pem"]).unwrap_err();
        assert!(error.to_string().contains("--tls-cert"), "{error}");
        let both =
            Config::try_parse_from(["event-piper", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
                .unwrap();
        assert!(both.tls_files().unwrap().is_some());
        assert!(
            Config::parse_from(["event-piper"])
                .tls_files()
                .unwrap()
                .is_none()
        );
        let mut half = Config::parse_from(["event-piper"]);
        half.tls_cert = Some("c.pem".into());
        let error = half.tls_files().unwrap_err().to_string();
        assert!(error.contains("--tls-key"), "{error}");
    }

    #[test]
    fn defaults_parse() {
        let config = Config::parse_from(["event-piper"]);
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(config.batch_size, 1000);
    }

    /// Every argument of the command line is in the dump and nothing else is, so a new flag
    /// cannot be left out of `--dump-config` (nor a dump key outlive its flag).
    #[test]
    fn replica_urls_repeat_or_split_on_commas_and_are_masked_in_the_dump() {
        let config = Config::parse_from([
            "event-piper",
            "--replica-url",
            "postgres://u:secret@r1/x,postgres://u@r2/x",
            "--replica-url",
            "postgres://r3/x",
            "--replica-max-wait",
            "50ms",
        ]);
        assert_eq!(config.replica_urls.len(), 3);
        assert_eq!(config.replica_max_wait, Duration::from_millis(50));
        let dump = config.to_json();
        assert_eq!(dump["replica_urls"][0], "postgres://u:***@r1/x");
        assert_eq!(dump["replica_urls"][2], "postgres://r3/x");
        assert_eq!(dump["replica_max_wait"], "50ms");
        assert!(Config::try_parse_from(["event-piper", "--replica-max-wait", "soon"]).is_err());
    }

    #[test]
    fn dump_has_every_flag() {
        use clap::CommandFactory;
        use std::collections::BTreeSet;

        // Not configuration: the dump flag itself, and clap's own.
        let not_configuration = ["dump_config", "help", "version"];
        let mut command = Config::command();
        command.build();
        let flags: BTreeSet<String> = command
            .get_arguments()
            .map(|arg| arg.get_id().to_string())
            .filter(|id| !not_configuration.contains(&id.as_str()))
            .collect();
        let dump = Config::parse_from(["event-piper"]).to_json();
        let keys: BTreeSet<String> = dump.as_object().unwrap().keys().cloned().collect();
        let missing: Vec<_> = flags.difference(&keys).collect();
        let extra: Vec<_> = keys.difference(&flags).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "flags missing from the dump: {missing:?}; dump keys without a flag: {extra:?}"
        );
        // A field dumped with serde's defaults, such as a Duration without `serialize_with`,
        // would show up as an object ({"secs", "nanos"}) instead of a readable value.
        for (key, value) in dump.as_object().unwrap() {
            assert!(!value.is_object(), "{key} is dumped as {value}");
        }
    }

    #[test]
    fn dump_masks_secrets_and_writes_durations_in_milliseconds() {
        let config = Config::parse_from([
            "event-piper",
            "--database-url",
            "postgres://u:hunter2@db:5432/x",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--retention",
            "7d",
            "--log-format",
            "json",
            "--cors-origin",
            "https://a.example,https://b.example",
        ]);
        let dump = config.to_json();
        assert_eq!(dump["database_url"], "postgres://u:***@db:5432/x");
        assert_eq!(dump["jwt_secret"], "***");
        assert_eq!(dump["heartbeat"], "15000ms");
        assert_eq!(dump["gap_poll"], "2ms");
        assert_eq!(dump["retention"], "604800000ms");
        assert_eq!(dump["listen"], "127.0.0.1:4000");
        assert_eq!(dump["log_format"], "json");
        assert_eq!(
            dump["cors_origins"],
            serde_json::json!(["https://a.example", "https://b.example"])
        );
        let text = dump.to_string();
        assert!(!text.contains("hunter2") && !text.contains("0123456789abcdef"));

        let unset = Config::parse_from(["event-piper"]).to_json();
        assert!(unset["database_url"].is_null());
        assert!(unset["jwt_secret"].is_null());
        assert!(unset["retention"].is_null());
    }
}
