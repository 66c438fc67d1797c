//! Metrics in Prometheus text format, through the `metrics` crate and its Prometheus exporter.
//!
//! Handles are registered once and cloned into the parts that update them, so the per-frame path
//! costs one atomic add, not a registry lookup.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::router::Router;
use crate::store::Store;

#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    pub events_published: Counter,
    pub frames_delivered: Counter,
    pub replay_rows: Counter,
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
    consumers: Gauge,
    pool_size: Gauge,
    pool_available: Gauge,
    pool_waiting: Gauge,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

impl Metrics {
    /// Installs the process-wide recorder on first use (several apps in one process, as in the
    /// tests, share it).
    pub fn new() -> Metrics {
        let handle = HANDLE
            .get_or_init(|| {
                PrometheusBuilder::new()
                    .install_recorder()
                    .expect("no other metrics recorder is installed")
            })
            .clone();
        Metrics {
            handle,
            events_published: counter!("event_piper_events_published_total"),
            frames_delivered: counter!("event_piper_frames_delivered_total"),
            replay_rows: counter!("event_piper_replay_rows_total"),
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
            consumers: gauge!("event_piper_consumers"),
            pool_size: gauge!("event_piper_pool_connections"),
            pool_available: gauge!("event_piper_pool_connections_idle"),
            pool_waiting: gauge!("event_piper_pool_waiting"),
        }
    }

    /// The exposition, with the gauges that are read rather than tracked brought up to date.
    pub fn render(&self, router: &Router, store: &Store) -> String {
        self.consumers.set(router.consumers() as f64);
        let pool = store.pool_status();
        self.pool_size.set(pool.size as f64);
        self.pool_available.set(pool.available as f64);
        self.pool_waiting.set(pool.waiting as f64);
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
