//! Command-line options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use event_piper::config::parse_duration;

/// Load generator and benchmark report for event-piper.
///
/// Starts a private PostgreSQL (unless --database-url) and the release `event-piper` binary found
/// next to this executable (`cargo build --release` first), then runs the scenario.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    pub scenario: Scenario,

    /// Use this PostgreSQL server instead of a private one. The role must be allowed to create
    /// databases: every scenario creates its own (bench_*) next to the one in the URL.
    #[arg(long)]
    pub database_url: Option<String>,

    /// How long each measured phase produces events.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Events per second for the paced scenarios (latency, fanout, filter, dbcost, and the paced
    /// phases of producers and publish).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Producer connections (default: 4).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,

    /// Consumers for the latency scenario (one connection each).
    #[arg(long, default_value_t = 100)]
    pub latency_consumers: usize,

    /// Connections of the one consumer in fanout shape (a), and consumers of shape (b); the
    /// same for the filter scenario's shapes (b) and (a).
    #[arg(long, default_value_t = 1000)]
    pub fanout: usize,

    /// Event types the filter scenario cycles through; a filtered stream asks for one of them.
    #[arg(long, default_value_t = 10)]
    pub filter_types: usize,

    /// Topics of the topics scenario's shape (a) (and consumers of its peer shape), and streams
    /// of its shape (b).
    #[arg(long, default_value_t = 1000)]
    pub topics: usize,

    /// Streams per topic (and per consumer) in the topics scenario's shape (a), and streams on
    /// the events' topic (or asking for their type) in its shape (b).
    #[arg(long, default_value_t = 10)]
    pub topic_streams: usize,

    /// How many times the topics scenario runs each of its four shapes (alternating).
    #[arg(long, default_value_t = 1)]
    pub topic_runs: usize,

    /// Rows per transaction in the throughput scenario.
    #[arg(long, default_value_t = 100)]
    pub batch: u64,

    /// Idle streams held open in the connections scenario.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,

    /// Distinct consumers those streams belong to (default: one per stream).
    #[arg(long)]
    pub stream_consumers: Option<usize>,

    /// Connections scenario: multiplex the streams over h2c connections (HTTP/2 with prior
    /// knowledge) of this many streams each, instead of one HTTP/1.1 connection per stream. At
    /// most the service's --http2-max-concurrent-streams (100 by default).
    #[arg(long)]
    pub h2_streams_per_connection: Option<usize>,

    /// How long the connections scenario holds its streams open once all are live.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,

    /// History rows replayed in the replay scenario.
    #[arg(long, default_value_t = 1_000_000)]
    pub history: u64,

    /// Connection counts compared by the dbcost scenario.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    pub dbcost_connections: Vec<usize>,

    /// Producer connections compared by the producers scenario (single-row producers as fast as
    /// they go, and paced), and publishing connections of the publish scenario's paced phase.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub producer_connections: Vec<usize>,

    /// Shapes of the producers scenario to run, e.g. a,e for the SSE and webhook comparisons
    /// with synchronous_commit on alone.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e")]
    pub producer_shapes: Vec<ProducerShape>,

    /// Rounds of the producers scenario's four phases (plain, stopped, streamed, plain) for each
    /// producer count of shapes a and b. With more than one, each round is shown and the target
    /// is checked on the medians: on a shared machine one round's phases can differ by more
    /// than the cost measured.
    #[arg(long, default_value_t = 1)]
    pub producer_rounds: usize,

    /// Publishing connections of the publish scenario's as-fast-as-they-go phase.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub publish_connections: Vec<usize>,

    /// Events already in the table when the webhooks scenario's backlog shape subscribes (a
    /// twentieth of it for batch_size 1).
    #[arg(long, default_value_t = 200_000)]
    pub webhook_backlog: u64,

    /// Single-row producer connections of the webhooks scenario's live shape.
    #[arg(long, default_value_t = 32)]
    pub webhook_producers: usize,

    /// Subscription batch sizes compared by the webhooks scenario's backlog and live shapes.
    #[arg(long, value_delimiter = ',', default_value = "1000,100,1")]
    pub webhook_batch_sizes: Vec<i32>,

    /// Storm scenario (a): streams, one consumer each, all reconnecting at once.
    #[arg(long, default_value_t = 5000)]
    pub storm_streams: usize,

    /// Storm scenario (b): streams of one consumer, all resuming from the same point.
    #[arg(long, default_value_t = 2000)]
    pub storm_shared_streams: usize,

    /// Events each storm stream missed while it was closed.
    #[arg(long, default_value_t = 10)]
    pub storm_behind: usize,

    /// How many times the storm scenario runs each storm on each system.
    #[arg(long, default_value_t = 1)]
    pub storm_runs: usize,

    /// Instances scenario: service instances started on one database.
    #[arg(long, default_value_t = 4)]
    pub instances: usize,

    /// Instances scenario: streams per instance, one run for each count.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    pub instance_streams: Vec<usize>,

    /// Pin the producers and the PostgreSQL the bench starts to CPU 0, and the service and the
    /// consumers to CPU 1 (`taskset` for the service): a saturated primary whose core the
    /// service does not share, so that what the service's reads cost producers shows up as lost
    /// commits.
    #[arg(long)]
    pub pin_cores: bool,

    /// Storm scenario: at most this many reconnects in flight (waiting for their response head);
    /// 0, the default: every stream reconnects at once.
    #[arg(long, default_value_t = 0)]
    pub storm_in_flight: usize,

    /// nginx for the storm scenario's peer, Nchan (default: /usr/sbin/nginx; the module from
    /// /usr/lib/nginx/modules, Debian's libnginx-mod-nchan).
    #[arg(long)]
    pub nginx: Option<PathBuf>,

    /// Listen backlog of the storm scenario's Nchan (default: nginx's own, 511).
    #[arg(long)]
    pub nchan_backlog: Option<u32>,

    /// Consumer connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// How long to wait, before each measured phase, for the machine to be nearly idle (other
    /// work on the two cores would distort every figure).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub quiet_timeout: Duration,

    /// RUST_LOG for the service.
    #[arg(long, default_value = "info")]
    pub service_log: String,

    /// An extra argument for the service, e.g. --service-arg=--channel-capacity=64 (repeatable).
    #[arg(long = "service-arg", allow_hyphen_values = true)]
    pub service_args: Vec<String>,

    /// Where service logs and the private PostgreSQL go (default: a new directory under /tmp).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The producers scenario's shapes (see scenarios/producers.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProducerShape {
    /// Single-row producers, synchronous_commit on, plain vs events streamed over SSE.
    A,
    /// The same with synchronous_commit off.
    B,
    /// Multi-row INSERT ... SELECT and COPY beside single-row producers.
    C,
    /// Paced producers, latency.
    D,
    /// As (a), but events delivered to webhook subscriptions instead of SSE streams.
    E,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Latency,
    Throughput,
    Fanout,
    Filter,
    Connections,
    Replay,
    Dbcost,
    Producers,
    Publish,
    Webhooks,
    Topics,
    /// Issue 18: reconnect storms, against Nchan.
    Storm,
    /// Issue 20: several service instances on one database, cost per instance.
    Instances,
    All,
}

impl Scenario {
    pub fn expand(self) -> Vec<Scenario> {
        use Scenario::*;
        match self {
            // dbcost last: it restarts the managed PostgreSQL with pg_stat_statements loaded, which
            // would add its own cost to every producer's statement. Webhooks loads it too, for
            // its last shape only, and storm for its statement counts: they come just before.
            All => vec![
                Latency,
                Throughput,
                Fanout,
                Filter,
                Topics,
                Connections,
                Replay,
                Producers,
                Publish,
                Webhooks,
                Storm,
                Instances,
                Dbcost,
            ],
            one => vec![one],
        }
    }
}
