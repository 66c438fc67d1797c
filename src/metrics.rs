//! Metrics in Prometheus text format, through the `metrics` crate and its Prometheus exporter.
//!
//! Handles are registered once and cloned into the parts that update them, so the per-frame path
//! costs one atomic add, not a registry lookup. Every metric is described once, which gives the
//! exposition its `# HELP` lines.
//!
//! This module imports nothing from the crate: the few gauges that are read rather than tracked
//! (consumers, pool usage) are handed to [`Metrics::render`] by its caller, so the parts that
//! update metrics can depend on this module without a cycle.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    pub events_published: Counter,
    pub frames_delivered: Counter,
    pub replay_rows: Counter,
    pub replay_recent: Counter,
    pub replay_statements: Counter,
    pub lag_recoveries: Counter,
    pub listener_reconnects: Counter,
    pub bell_rings: Counter,
    pub hub_sleeps: Counter,
    pub hub_batch_size: Histogram,
    pub publish_statements: Counter,
    pub publish_retries: Counter,
    pub publish_group_requests: Histogram,
    pub oldest_unresolved_age: Gauge,
    pub streams_replaying: Gauge,
    pub streams_live: Gauge,
    pub replica_reads: ReplicaCounters,
    consumers: Gauge,
    pool_size: Gauge,
    pool_available: Gauge,
    pool_waiting: Gauge,
}

/// Where the reads that may go to a replica went ([`crate::replicas`]).
#[derive(Clone)]
pub struct ReplicaCounters {
    /// Served by a replica.
    pub by_replica: Counter,
    /// Served by the primary: no replica configured, or one could not serve it.
    pub by_primary: Counter,
    /// A replica had not replayed far enough within `--replica-max-wait`.
    pub lag: Counter,
    /// A replica failed.
    pub error: Counter,
}

impl ReplicaCounters {
    /// Counters that count nowhere, for code that runs without an exporter.
    pub fn noop() -> ReplicaCounters {
        ReplicaCounters {
            by_replica: Counter::noop(),
            by_primary: Counter::noop(),
            lag: Counter::noop(),
            error: Counter::noop(),
        }
    }
}

/// The gauges that are read at scrape time from the router and the query pool rather than
/// tracked as they move: the caller of [`Metrics::render`] gathers them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadGauges {
    /// Consumers with at least one open stream.
    pub consumers: usize,
    /// Connections in the query pool, busy or idle.
    pub pool_size: usize,
    /// Idle connections in the query pool.
    pub pool_available: usize,
    /// Tasks waiting for a connection of the query pool.
    pub pool_waiting: usize,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

impl Metrics {
    /// Installs the process-wide recorder on first use (several apps in one process, as in the
    /// tests, share it).
    pub fn new() -> Metrics {
        let handle = HANDLE
            .get_or_init(|| {
                let handle = PrometheusBuilder::new()
                    .install_recorder()
                    .expect("no other metrics recorder is installed");
                // Descriptions go to the installed recorder, so once it is in place.
                describe();
                handle
            })
            .clone();
        Metrics {
            handle,
            events_published: counter!("event_piper_events_published_total"),
            frames_delivered: counter!("event_piper_frames_delivered_total"),
            replay_rows: counter!("event_piper_replay_rows_total"),
            replay_recent: counter!("event_piper_replay_recent_total"),
            replay_statements: counter!("event_piper_replay_statements_total"),
            lag_recoveries: counter!("event_piper_lag_recoveries_total"),
            listener_reconnects: counter!("event_piper_listener_reconnects_total"),
            bell_rings: counter!("event_piper_doorbell_rings_total"),
            hub_sleeps: counter!("event_piper_hub_sleeps_total"),
            hub_batch_size: histogram!("event_piper_hub_batch_size"),
            publish_statements: counter!("event_piper_publish_statements_total"),
            publish_retries: counter!("event_piper_publish_retries_total"),
            publish_group_requests: histogram!("event_piper_publish_group_requests"),
            oldest_unresolved_age: gauge!("event_piper_oldest_unresolved_id_age_seconds"),
            streams_replaying: gauge!("event_piper_streams", "state" => "replaying"),
            streams_live: gauge!("event_piper_streams", "state" => "live"),
            replica_reads: ReplicaCounters {
                by_replica: counter!("event_piper_replica_reads_total", "served_by" => "replica"),
                by_primary: counter!("event_piper_replica_reads_total", "served_by" => "primary"),
                lag: counter!("event_piper_replica_fallbacks_total", "reason" => "lag"),
                error: counter!("event_piper_replica_fallbacks_total", "reason" => "error"),
            },
            consumers: gauge!("event_piper_consumers"),
            pool_size: gauge!("event_piper_pool_connections"),
            pool_available: gauge!("event_piper_pool_connections_idle"),
            pool_waiting: gauge!("event_piper_pool_waiting"),
        }
    }

    /// The exposition, with the gauges that are read rather than tracked set from `read`.
    pub fn render(&self, read: ReadGauges) -> String {
        self.consumers.set(read.consumers as f64);
        self.pool_size.set(read.pool_size as f64);
        self.pool_available.set(read.pool_available as f64);
        self.pool_waiting.set(read.pool_waiting as f64);
        self.handle.render()
    }
}

/// The metrics of one webhook subscription, labelled with its id, on the instance delivering it.
#[derive(Clone)]
pub struct WebhookMetrics {
    pub delivered: Counter,
    pub failed_attempts: Counter,
    pub behind: Gauge,
    pub last_success: Gauge,
}

impl WebhookMetrics {
    pub fn new(subscription: i64) -> WebhookMetrics {
        let label = subscription.to_string();
        WebhookMetrics {
            delivered: counter!("event_piper_webhook_delivered_events_total", "subscription" => label.clone()),
            failed_attempts: counter!("event_piper_webhook_failed_attempts_total", "subscription" => label.clone()),
            behind: gauge!("event_piper_webhook_behind_events", "subscription" => label.clone()),
            last_success: gauge!("event_piper_webhook_last_success_timestamp_seconds", "subscription" => label),
        }
    }
}

/// The `# HELP` text of every metric: what it counts and when it moves. A metric registered in
/// [`Metrics::new`] without a line here has no `# HELP` (tests/http_api.rs checks the scrape).
fn describe() {
    describe_gauge!(
        "event_piper_streams",
        Unit::Count,
        "Open streams, by state: replaying from the table, or live; moves as streams open, \
         catch up, fall behind and close."
    );
    describe_gauge!(
        "event_piper_consumers",
        Unit::Count,
        "Consumers with at least one open stream, read at each scrape."
    );
    describe_counter!(
        "event_piper_events_published_total",
        Unit::Count,
        "Events the hub read from the table and routed to their consumers' channels."
    );
    describe_counter!(
        "event_piper_frames_delivered_total",
        Unit::Count,
        "Event frames handed to streams, live or replayed; grows once per event per stream."
    );
    describe_counter!(
        "event_piper_replay_rows_total",
        Unit::Count,
        "Rows read from the table for replays (Last-Event-ID) and lag recoveries."
    );
    describe_counter!(
        "event_piper_replay_recent_total",
        Unit::Count,
        "Events of replays and lag recoveries served from the recent tail in memory, without a read."
    );
    describe_counter!(
        "event_piper_replay_statements_total",
        Unit::Count,
        "Statements that read replay pages from the table; one serves every plain consumer's page asked for meanwhile."
    );
    describe_counter!(
        "event_piper_lag_recoveries_total",
        Unit::Count,
        "Times a stream fell behind its live channel and caught up from the table."
    );
    describe_counter!(
        "event_piper_listener_reconnects_total",
        Unit::Count,
        "Times the notification connection was lost and reconnected."
    );
    describe_counter!(
        "event_piper_doorbell_rings_total",
        Unit::Count,
        "Notifications received (doorbell rings); producers ring only while the hub sleeps."
    );
    describe_counter!(
        "event_piper_hub_sleeps_total",
        Unit::Count,
        "Times the hub found no new event for a while, armed the doorbell and went to sleep."
    );
    describe_histogram!(
        "event_piper_hub_batch_size",
        Unit::Count,
        "Events per batch the hub read and published, recorded for each non-empty batch."
    );
    describe_counter!(
        "event_piper_publish_statements_total",
        Unit::Count,
        "Inserts run for POST /events: one per combined group, plus one per request retried alone."
    );
    describe_counter!(
        "event_piper_publish_retries_total",
        Unit::Count,
        "POST /events requests retried alone after the database refused their combined insert."
    );
    describe_histogram!(
        "event_piper_publish_group_requests",
        Unit::Count,
        "POST /events requests combined into one insert, recorded for each insert group."
    );
    describe_gauge!(
        "event_piper_oldest_unresolved_id_age_seconds",
        Unit::Seconds,
        "How long the hub has been waiting on an id still in flight (an open producer \
         transaction); 0 when none."
    );
    describe_gauge!(
        "event_piper_pool_connections",
        Unit::Count,
        "Connections in the query pool, busy or idle, read at each scrape."
    );
    describe_gauge!(
        "event_piper_pool_connections_idle",
        Unit::Count,
        "Idle connections in the query pool, read at each scrape."
    );
    describe_counter!(
        "event_piper_webhook_delivered_events_total",
        Unit::Count,
        "Events a webhook receiver acknowledged with a 2xx, by subscription, on the instance \
         delivering it."
    );
    describe_counter!(
        "event_piper_webhook_failed_attempts_total",
        Unit::Count,
        "Webhook deliveries that failed (error status, timeout, refused connection), by \
         subscription; each is retried."
    );
    describe_gauge!(
        "event_piper_webhook_behind_events",
        Unit::Count,
        "Events a webhook subscription has yet to deliver (counted up to 1,000,000), by \
         subscription; 0 once it follows the live feed with nothing queued."
    );
    describe_gauge!(
        "event_piper_webhook_last_success_timestamp_seconds",
        Unit::Seconds,
        "When the receiver last acknowledged a batch, in seconds since the Unix epoch, by \
         subscription (its age: time() minus this)."
    );
    describe_counter!(
        "event_piper_replica_reads_total",
        Unit::Count,
        "Replay pages, history searches and webhook catch-up reads, by the server that served \
         them: a replica, or the primary (none configured, or the replica lagged or failed)."
    );
    describe_counter!(
        "event_piper_replica_fallbacks_total",
        Unit::Count,
        "Reads a replica could not serve and the primary did, by reason: it had not replayed \
         far enough within --replica-max-wait (lag), or it failed (error)."
    );
    describe_gauge!(
        "event_piper_pool_waiting",
        Unit::Count,
        "Tasks waiting for a query pool connection, read at each scrape."
    );
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
