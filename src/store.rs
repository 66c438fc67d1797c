//! The events table, read and written through a small connection pool (deadpool-postgres).
//!
//! Every query the service runs lives here, as a prepared statement with bound parameters.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::sse::Frame;

/// The schema, applied at start-up unless told otherwise.
pub const SCHEMA: &str = include_str!("../postgresql/schema.sql");

/// The key of the shared advisory lock every transaction holding an uncommitted event id holds
/// (see schema.sql). In pg_locks a bigint key shows as classid (high half) and objid (low half).
const IN_FLIGHT_LOCK_KEY: i64 = 7311142570156910960;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("invalid database URL: {0}")]
    Url(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One row of `events`, as read for delivery.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: i64,
    pub event_type: String,
    pub subscriber: Option<String>,
    /// PostgreSQL's text form of the jsonb payload.
    pub payload: String,
}

impl EventRow {
    pub fn frame(&self) -> Frame {
        Frame::render(self.id, &self.event_type, &self.payload)
    }

    fn from_row(row: &tokio_postgres::Row) -> std::result::Result<Self, tokio_postgres::Error> {
        Ok(EventRow {
            id: row.try_get(0)?,
            event_type: row.try_get(1)?,
            subscriber: row.try_get(2)?,
            payload: row.try_get(3)?,
        })
    }
}

const COLUMNS: &str = "id, type, subscriber, payload::text";

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Builds the pool. Connections are opened lazily, on first use.
    pub fn new(mut pg_config: tokio_postgres::Config, pool_size: usize) -> Result<Store> {
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("event-piper");
        }
        pg_config.keepalives_idle(Duration::from_secs(30));
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                // Fast: a broken connection shows up as a failed query, which every caller
                // already handles; a test query per checkout would double the round trips.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        Ok(Store { pool })
    }

    /// Waits until the database answers, retrying with backoff for at most `timeout`: in a
    /// compose file or a cluster the service may well start before its database does.
    pub async fn wait_until_reachable(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.pool.get().await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => return Ok(()),
                    Err(error) if Instant::now() >= deadline => return Err(error.into()),
                    Err(error) => tracing::warn!(%error, "database not ready, retrying"),
                },
                Err(error) if Instant::now() >= deadline => return Err(error.into()),
                Err(error) => tracing::warn!(%error, "database not reachable, retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    pub async fn apply_schema(&self) -> Result<()> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        transaction.batch_execute(SCHEMA).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// All events after `after`, in id order, at most `limit`.
    pub async fn read_after(&self, after: i64, limit: i64) -> Result<Vec<EventRow>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .await?;
        let rows = client.query(&statement, &[&after, &limit]).await?;
        rows.iter()
            .map(EventRow::from_row)
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }

    /// One page of a consumer's history: its events and the broadcasts (NULL subscriber) in
    /// `(after, upto]`, in id order. Two index scans merged, so a page costs its own size however
    /// long the history is.
    pub async fn read_consumer(
        &self,
        consumer: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT * FROM ( \
                   (SELECT {COLUMNS} FROM events \
                    WHERE subscriber = $1 AND id > $2 AND id <= $3 ORDER BY id LIMIT $4) \
                   UNION ALL \
                   (SELECT {COLUMNS} FROM events \
                    WHERE subscriber IS NULL AND id > $2 AND id <= $3 ORDER BY id LIMIT $4) \
                 ) page ORDER BY id LIMIT $4"
            ))
            .await?;
        let rows = client
            .query(&statement, &[&consumer, &after, &upto, &limit])
            .await?;
        rows.iter()
            .map(EventRow::from_row)
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }

    /// The highest id in the table (0 when empty).
    pub async fn max_id(&self) -> Result<i64> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT coalesce(max(id), 0) FROM events", &[])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The transactions (by virtual transaction id) in this database that hold an event id they
    /// have not committed yet.
    pub async fn in_flight_holders(&self) -> Result<HashSet<String>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT virtualtransaction FROM pg_locks \
                 WHERE locktype = 'advisory' AND objsubid = 1 \
                   AND classid = $1::bigint::oid AND objid = $2::bigint::oid \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .await?;
        let high = IN_FLIGHT_LOCK_KEY >> 32;
        let low = IN_FLIGHT_LOCK_KEY & 0xffff_ffff;
        let rows = client.query(&statement, &[&high, &low]).await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }
}
