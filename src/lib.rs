//! event-piper: streams PostgreSQL events to HTTP clients over Server-Sent Events.
//!
//! Producers insert rows into `events`; while the [`hub`] sleeps, their id trigger sends
//! `NOTIFY new_events` ([`bell`]) and the [`listener`] (one connection) wakes it; while it is
//! awake it reads by itself. It reads new events in batches, publishes a gap-free prefix in id
//! order and hands rendered frames to the [`router`]; every open [`stream`] of the event's
//! consumer sends them on. `POST /events` goes through the [`publisher`], which commits
//! concurrent requests together. [`serve`] runs all of it on a given listener, which is how the
//! integration tests start the real app on port 0 ([`serve_on`] adds the TLS listener); [`run`]
//! is the whole binary.

pub mod auth;
pub mod backoff;
pub mod bell;
pub mod channel;
pub mod config;
pub mod event;
pub mod filter;
pub mod follower;
pub mod http;
pub mod hub;
pub mod keys;
pub mod listener;
pub mod managed_postgres;
pub mod metrics;
pub mod net;
pub mod publish;
pub mod publisher;
pub mod recent;
pub mod replay_reads;
pub mod replicas;
pub mod retention;
pub mod router;
pub mod selection;
pub mod sse;
pub mod store;
pub mod stream;
pub mod tls;
pub mod topic;
pub mod webhook;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use managed_postgres::{ManagedPostgres, ManagedPostgresError, OnStop};
use store::{Store, StoreError};

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("managed PostgreSQL: {0}")]
    ManagedPostgres(#[from] ManagedPostgresError),
    #[error("authentication: {0}")]
    Auth(#[from] auth::KeyError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("managed PostgreSQL: {0}")]
    CreateDatabase(tokio_postgres::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// The database the managed PostgreSQL serves events from.
const MANAGED_DATABASE: &str = "event_piper";

/// The whole service: a managed PostgreSQL when no database URL is configured, the HTTP server on
/// the configured address, until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), Error> {
    // Fail on a bad key or certificate before starting anything.
    config.auth()?;
    if let Some(files) = config.tls_files()? {
        tls::Resolver::load(files)?;
    }
    raise_open_files_limit();
    let mut managed = None;
    let database_url = match &config.database_url {
        Some(url) => {
            tracing::info!("producers can connect with: psql \"$DATABASE_URL\"");
            url.clone()
        }
        None => {
            let data_dir = config
                .data_dir
                .clone()
                .unwrap_or_else(managed_postgres::default_data_dir);
            let bin_dir = config.pg_bin_dir.clone();
            tracing::info!(data_dir = %data_dir.display(), "starting the managed PostgreSQL");
            let postgres = tokio::task::spawn_blocking(move || {
                ManagedPostgres::start(&data_dir, bin_dir.as_deref(), OnStop::Keep)
            })
            .await
            .map_err(|e| Error::Io {
                context: "starting the managed PostgreSQL".into(),
                source: std::io::Error::other(e),
            })??;
            let managed = managed.insert(postgres);
            managed
                .create_database(MANAGED_DATABASE)
                .await
                .map_err(Error::CreateDatabase)?;
            let url = managed.url(MANAGED_DATABASE);
            tracing::info!(data_dir = %managed.data_dir().display(), "managed PostgreSQL is up");
            println!("Producers can connect with:\n    psql {url}\n");
            url
        }
    };

    let result = async {
        let listener = net::bind(config.listen).map_err(|source| Error::Io {
            context: format!("binding {}", config.listen),
            source,
        })?;
        let address = listener.local_addr().map_err(|source| Error::Io {
            context: "reading the bound address".into(),
            source,
        })?;
        tracing::info!(%address, "listening for HTTP");
        serve(config, database_url, listener, shutdown_signal()).await
    }
    .await;

    if let Some(managed) = managed {
        tracing::info!("stopping the managed PostgreSQL");
        let _ = tokio::task::spawn_blocking(move || managed.stop()).await;
    }
    result
}

/// Runs the service on `listener` against `database_url` until `shutdown` completes, then ends
/// every open stream and waits for the background tasks. With TLS configured, the TLS listener
/// binds `--tls-listen`; [`serve_on`] takes one already bound.
pub async fn serve(
    config: Config,
    database_url: String,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let tls = match config.tls_files()? {
        Some(_) => {
            let tls = net::bind(config.tls_listen).map_err(|source| Error::Io {
                context: format!("binding {} (--tls-listen)", config.tls_listen),
                source,
            })?;
            tracing::info!(address = %config.tls_listen, "listening for HTTPS (HTTP/2 and HTTP/1.1)");
            Some(tls)
        }
        None => None,
    };
    serve_on(config, database_url, listener, tls, shutdown).await
}

/// As [`serve`], with the TLS listener given: `tls_listener` serves TLS with the configured
/// certificate (`--tls-cert`, `--tls-key`), which is reloaded when its files change. A TLS
/// listener without a certificate configured is an error.
pub async fn serve_on(
    config: Config,
    database_url: String,
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    // The certificate first: a wrong file fails at start, before anything connects.
    let tls = match (config.tls_files()?, tls_listener) {
        (Some(files), Some(tls_listener)) => {
            let resolver = Arc::new(tls::Resolver::load(files)?);
            Some((tls_listener, resolver))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(
                tls::TlsError::Config("TLS is configured but has no listener".into()).into(),
            );
        }
        (None, Some(_)) => {
            return Err(tls::TlsError::Config(
                "a TLS listener needs --tls-cert and --tls-key".into(),
            )
            .into());
        }
    };
    let pg_config = tokio_postgres::Config::from_str(&database_url)
        .map_err(|e| StoreError::Url(e.to_string()))?;
    let store = Store::new(pg_config.clone(), config.pool_size)?;
    store.wait_until_reachable(config.connect_timeout).await?;
    store.check_primary().await?;
    if !config.skip_schema {
        apply_schema(&store, config.connect_timeout).await?;
    }

    let auth = config.auth()?;
    if auth.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "authentication is off on a non-loopback address: anyone who can reach it can read \
             any consumer's events and publish; set --jwt-secret or --jwt-public-key"
        );
    }
    let metrics = metrics::Metrics::new();
    let replicas = replicas_of(&config, &metrics)?;
    // Every task ends when `stop` is cancelled; `tasks` is waited for before returning.
    let stop = CancellationToken::new();
    // Cancelled first, on the shutdown signal: streams end and the server stops accepting; the
    // rest keeps running until they have.
    let draining = CancellationToken::new();
    let tasks = TaskTracker::new();
    let doorbell = Arc::new(Notify::new());
    let router = router::Router::new(
        config.channel_capacity as usize,
        router::Limits {
            streams: config.max_streams,
            streams_per_consumer: config.max_streams_per_consumer,
        },
    );
    let (published_tx, published_rx) = watch::channel(None);
    let (listening_tx, listening_rx) = watch::channel(false);

    tasks.spawn(listener::run(
        pg_config.clone(),
        Arc::clone(&doorbell),
        listening_tx,
        listener::Counters {
            reconnects: metrics.listener_reconnects.clone(),
            rings: metrics.bell_rings.clone(),
        },
        stop.clone(),
    ));
    let recent = Arc::new(recent::Recent::new(config.recent_bytes));
    let hub = hub::Hub::new(
        store.clone(),
        hub::Outputs {
            router: Arc::clone(&router),
            recent: Arc::clone(&recent),
            replicas: replicas.clone(),
            published: published_tx,
        },
        config.batch_size,
        config.hub_timing(),
        metrics.clone(),
    );
    let bell = bell::Bell::new(pg_config.clone(), Arc::clone(&doorbell));
    tasks.spawn(hub.run(bell, Arc::clone(&doorbell), stop.clone()));
    if let Some(max_age) = config.retention {
        tasks.spawn(retention::run(
            store.clone(),
            Arc::clone(&recent),
            max_age,
            published_rx.clone(),
            stop.clone(),
        ));
    }

    let sources = follower::Sources {
        router,
        recent,
        published: published_rx,
        store: store.clone(),
        reads: replay_reads::ReplayReads::start(
            store.clone(),
            replicas.clone(),
            // Half the pool: the hub, publishing and webhooks keep the rest.
            config.pool_size / 2,
            metrics.replay_statements.clone(),
        ),
        page_size: i64::from(config.batch_size),
    };
    let webhooks_changed = Arc::new(Notify::new());
    let client = webhook::client::Client::new(webhook::client::ClientSettings {
        timeout: config.webhook_timeout,
        max_response_bytes: webhook::client::MAX_RESPONSE_BYTES,
        allow_private: config.webhook_allow_private,
    })
    .map_err(|error| Error::Io {
        context: "building the webhook client".into(),
        source: std::io::Error::other(error),
    })?;
    tasks.spawn(webhook::supervisor::run(
        pg_config.clone(),
        Arc::new(webhook::delivery::Context {
            sources: sources.clone(),
            client,
            retry_min: config.webhook_retry_min,
            retry_max: config.webhook_retry_max,
            failing_after: config.webhook_failing_after,
        }),
        config.webhook_poll,
        Arc::clone(&webhooks_changed),
        stop.clone(),
    ));
    let streams = Arc::new(stream::Streams {
        sources,
        listening: listening_rx,
        shutdown: draining.clone(),
        drain: config.drain_period,
        heartbeat: config.heartbeat,
        max_lifetime: config.max_stream_lifetime,
        retry: config.retry,
        metrics: metrics.clone(),
    });
    let publisher = publisher::Publisher::start(
        store.clone(),
        Arc::clone(&doorbell),
        metrics.clone(),
        &tasks,
    );
    let app = http::routes(
        http::AppState {
            streams,
            store,
            replicas,
            publisher,
            metrics,
            auth,
            webhooks: http::WebhookSettings {
                allow_private: config.webhook_allow_private,
                failing_after: config.webhook_failing_after,
                changed: webhooks_changed,
            },
            hub: http::HubSettings::new(
                config.hub_url()?,
                config.hub_url.is_some(),
                config.anonymous_subscribers,
            ),
        },
        &http::HttpSettings {
            max_body_bytes: config.max_body,
            cors_origins: config.cors_origins.clone(),
        },
    );
    let settings = net::ServeSettings {
        write_timeout: config.write_timeout,
        header_timeout: config.header_timeout,
        max_header_bytes: config.max_header_bytes,
        http2_max_concurrent_streams: config.http2_max_concurrent_streams,
        http2_idle_timeout: config.http2_idle_timeout,
        // A connection whose streams are all quiet still hears from the service this often.
        http2_keep_alive_interval: config.heartbeat,
        drain: config.drain_period,
    };
    let tls = match tls {
        Some((tls_listener, resolver)) => {
            let acceptor = resolver.acceptor()?;
            tasks.spawn(tls::watch(
                resolver,
                config.tls_reload_interval,
                stop.clone(),
            ));
            Some((tls_listener, acceptor))
        }
        None => None,
    };
    let listeners = net::Listeners {
        plain: listener,
        tls,
    };
    let drain = config.drain_period;
    let served = net::serve_all(listeners, app, settings, async move {
        shutdown.await;
        // Not ready from now on, and the server stops accepting once this returns; open streams
        // watch this and end over the drain period, so the graceful shutdown ends with them.
        tracing::info!(period = ?drain, "shutting down: draining open streams");
        draining.cancel();
    })
    .await;
    stop.cancel();
    // Every handle to the publisher lived in the connections, which have all closed: its queue is
    // drained and it ends.
    tasks.close();
    tasks.wait().await;
    served.map_err(|source| Error::Io {
        context: "serving HTTP".into(),
        source,
    })
}

/// Applies the schema, retrying for at most `patience`: it gives up on locks after a moment (so as
/// not to stall producers behind it) and tries again.
/// The replicas of `--replica-url`, with their URLs checked (a bad one stops the start with the
/// reason). Their pools connect lazily: a replica that is down at start is only skipped.
fn replicas_of(config: &Config, metrics: &metrics::Metrics) -> Result<replicas::Replicas, Error> {
    let mut parsed = Vec::new();
    for url in config.replica_urls.iter().map(|url| url.trim()) {
        if url.is_empty() {
            continue;
        }
        let name = config::mask_password(url);
        let mut pg_config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Url(format!("--replica-url {name}: {e}")))?;
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("event-piper-replica-reads");
        }
        parsed.push((pg_config, name));
    }
    Ok(replicas::Replicas::new(
        parsed,
        config.pool_size,
        config.replica_max_wait,
        metrics.replica_reads.clone(),
    )?)
}

async fn apply_schema(store: &Store, patience: std::time::Duration) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match store.apply_schema().await {
            Ok(()) => return Ok(()),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "applying the schema failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Every open stream is a socket: lift the soft limit on open files to the hard limit (often 1024
/// and 524288 on Linux), or the service would refuse connections long before memory runs out.
/// Returns the limit now in force (None if it cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    if soft < hard && rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).is_ok() {
        tracing::debug!(from = soft, to = hard, "raised the open files limit");
        return Some(hard);
    }
    Some(soft)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
