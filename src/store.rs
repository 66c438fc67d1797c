//! The events table, read and written through a small connection pool (deadpool-postgres), and
//! through one connection of the hub's own for its reads of the tail.
//!
//! Every query the service runs lives here, as a prepared statement with bound parameters; those
//! on the webhook subscriptions live in [`subscriptions`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deadpool_postgres::{HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::backoff::Backoff;
use crate::event::{ConsumerId, EventId, EventRow, NewEvent};
use crate::filter::TypeFilter;
use crate::keys::Keys;
use crate::selection::Selection;

pub mod subscriptions;

/// The schema, applied at start-up unless told otherwise.
pub const SCHEMA: &str = include_str!("../postgresql/schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("no answer from the database within {0:?}")]
    Timeout(Duration),
    #[error("the database is a standby (in recovery); event-piper needs the primary")]
    Standby,
    #[error("unexpected answer from the database: {0}")]
    Unexpected(String),
    /// One failure of a statement that served several callers ([`crate::replay_reads`]).
    #[error("{0}")]
    Shared(std::sync::Arc<StoreError>),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What a history search asks for (`GET /history`).
pub struct HistorySearch<'a> {
    pub consumer: &'a ConsumerId,
    /// Ids above this one...
    pub after: EventId,
    /// ...and at or below this one.
    pub upto: EventId,
    pub since: Option<std::time::SystemTime>,
    pub until: Option<std::time::SystemTime>,
    /// JSON the payload must contain (`@>`).
    pub payload: Option<&'a str>,
    pub types: Option<&'a TypeFilter>,
    pub limit: i64,
    /// The newest `limit` events instead of the oldest (still returned oldest first).
    pub newest: bool,
}

/// A type filter as query parameters: the exact names (NULL: no filter) and the `LIKE` patterns.
fn sql_types(types: Option<&TypeFilter>) -> (Option<Vec<String>>, Vec<String>) {
    match types {
        Some(types) => {
            let (exact, like) = types.to_sql();
            (Some(exact), like)
        }
        None => (None, Vec::new()),
    }
}

/// Decodes a row read with [`COLUMNS`].
fn event_row(row: &tokio_postgres::Row) -> std::result::Result<EventRow, tokio_postgres::Error> {
    event_row_at(row, 0)
}

/// Decodes [`COLUMNS`] from column `at` on.
fn event_row_at(
    row: &tokio_postgres::Row,
    at: usize,
) -> std::result::Result<EventRow, tokio_postgres::Error> {
    Ok(EventRow {
        id: EventId(row.try_get(at)?),
        event_type: row.try_get(at + 1)?,
        subscriber: row.try_get(at + 2)?,
        payload: row.try_get(at + 3)?,
        topics: row.try_get(at + 4)?,
        private: row.try_get(at + 5)?,
        update_id: row.try_get(at + 6)?,
        retry: row.try_get(at + 7)?,
    })
}

/// Coalesced so that a table from an older setup with NULLs in these columns cannot wedge the hub
/// on a row it cannot decode.
/// Named, so that a query can select them from a subquery of its own.
const COLUMNS: &str = "id, coalesce(type, '') AS type, subscriber, \
    coalesce(payload::text, 'null') AS payload, topics, coalesce(private, false) AS private, \
    update_id, retry";

/// A replay of a selection with patterns reads at most this many ids of the table per page
/// (times the page size): no index serves a pattern, so this bounds what one statement scans.
const SCAN_IDS_PER_ROW: i64 = 8;

/// One page of a replay: the rows, in id order, each once, and how far the page covers the
/// range (every selected event up to it is in `rows` or filtered out).
pub struct Page {
    pub rows: Vec<EventRow>,
    pub covered: EventId,
}

/// One range scan of a merged replay read ([`Store::read_lanes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// The consumer whose events it reads; None: the broadcasts.
    pub subscriber: Option<String>,
    pub after: EventId,
    pub upto: EventId,
    pub limit: i64,
}

/// Makes a dead peer show up as a failed connection within about half a minute, instead of the
/// operating system's default of many minutes: a silently dead notification connection would
/// otherwise stall delivery without anyone noticing.
pub fn harden(pg_config: &mut tokio_postgres::Config) {
    if pg_config.get_connect_timeout().is_none() {
        pg_config.connect_timeout(Duration::from_secs(10));
    }
    pg_config
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// The hub's own connection for its tail read ([`Store::read_tail`]), which keeps one
    /// generic plan.
    tail: Pool,
}

impl Store {
    /// Builds the pools. Connections are opened lazily, on first use.
    pub fn new(mut pg_config: tokio_postgres::Config, pool_size: usize) -> Result<Store> {
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("event-piper");
        }
        harden(&mut pg_config);
        let manager = |pg_config| {
            Manager::from_config(
                pg_config,
                NoTls,
                ManagerConfig {
                    // Fast: a broken connection shows up as a failed query, which every caller
                    // already handles; a test query per checkout would double the round trips.
                    recycling_method: RecyclingMethod::Fast,
                },
            )
        };
        let pool = Pool::builder(manager(pg_config.clone()))
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        // The tail read runs hundreds of times a second under load, always with an id near the
        // end of the table. PostgreSQL plans a prepared statement anew on each run for as long as
        // the plans it made for the values given look cheaper than the generic plan, which for
        // this statement is forever; planning (with a probe of the index's end) then took more of
        // a saturated database core than the read itself (BENCHMARKS.md, "The hub's reads on a
        // saturated primary"). So this connection keeps one generic plan, and forbids the scans
        // that would make that plan anything but the primary key's range scan: on a table
        // vacuumed while empty a sequential scan and a sort look cheaper, and would stay the plan
        // while the table grows. Set by statements: as a startup option (`options=-c ...`),
        // PgBouncer refuses parameters it does not track (pgbouncer/pgbouncer#878).
        let tail = Pool::builder(manager(pg_config))
            .max_size(1)
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(
                            "SET plan_cache_mode = force_generic_plan; \
                             SET enable_seqscan = off; SET enable_bitmapscan = off",
                        )
                        .await
                        .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        Ok(Store { pool, tail })
    }

    /// The pool's size, idle connections and waiting callers, for metrics.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    /// Waits until the database answers, retrying with backoff for at most `timeout`: in a
    /// compose file or a cluster the service may well start before its database does.
    pub async fn wait_until_reachable(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
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
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Refuses a standby: its pg_locks does not show the primary's producers, so gaps would be
    /// skipped while their ids are still in flight, and LISTEN does not work there.
    pub async fn check_primary(&self) -> Result<()> {
        let client = self.pool.get().await?;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .try_get(0)?;
        if in_recovery {
            return Err(StoreError::Standby);
        }
        Ok(())
    }

    /// Applies the schema. A lock timeout keeps a start-up that waits behind a long producer
    /// transaction from making every other producer wait behind it; the caller retries.
    pub async fn apply_schema(&self) -> Result<()> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        transaction
            .batch_execute("SET LOCAL lock_timeout = '2s'")
            .await?;
        transaction.batch_execute(SCHEMA).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The hub's read: all events after `after`, in id order, at most `limit`, and the WAL insert
    /// position after the statement's snapshot was taken, at or past the commit record of every row it sees
    /// ([`crate::replicas`]).
    pub async fn read_tail(&self, after: EventId, limit: i64) -> Result<(Vec<EventRow>, i64)> {
        let client = self.tail.get().await?;
        // An uncorrelated subquery is an InitPlan: PostgreSQL runs it once, when the first row is
        // formed, so after the snapshot was taken. Called per row, the function would take the
        // WAL insert position's spinlock once per row, beside the producers that advance it.
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, (SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8) \
                 FROM events WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .await?;
        let rows = client.query(&statement, &[&after.0, &limit]).await?;
        let lsn = match rows.first() {
            Some(row) => row.try_get(8)?,
            None => 0,
        };
        let events = rows
            .iter()
            .map(event_row)
            .collect::<std::result::Result<_, _>>()?;
        Ok((events, lsn))
    }

    /// The WAL insert position now: at or past the commit record of every transaction that has
    /// ended (visibly) before this statement.
    pub async fn insert_lsn(&self) -> Result<i64> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Writes topics and publishers' ids ([`crate::keys`]) of the events in `(after, upto]`, and
    /// moves the mark to `upto`, in one statement: the topics as one stretch per topic, ending at
    /// `upto`. The mark's row lock makes a write wait for the one before it; the keys of the
    /// events that the mark (as it then is) already covers were written by that one, and are
    /// left out. Writes nothing, and returns false, if the mark is below `after`: `keys` would
    /// leave the events in between without theirs.
    pub async fn write_keys(&self, keys: &Keys, (after, upto): (EventId, EventId)) -> Result<bool> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "WITH mark AS ( \
                   UPDATE event_piper_keyed SET prev = upto, upto = greatest(upto, $5) \
                   WHERE upto >= $6 RETURNING prev), \
                 topics AS ( \
                   INSERT INTO event_piper_topics (topic, upto, ids) \
                   SELECT topic, $5, array_agg(DISTINCT event_id ORDER BY event_id) \
                   FROM unnest($1::text[], $2::int8[]) AS key(topic, event_id) \
                   WHERE event_id > (SELECT prev FROM mark) GROUP BY topic), \
                 update_ids AS ( \
                   INSERT INTO event_piper_update_ids (update_id, event_id) \
                   SELECT * FROM unnest($3::text[], $4::int8[]) AS key(update_id, event_id) \
                   WHERE event_id > (SELECT prev FROM mark)) \
                 SELECT prev FROM mark",
            )
            .await?;
        let mark = client
            .query_opt(
                &statement,
                &[
                    &keys.topics,
                    &keys.topic_events,
                    &keys.update_ids,
                    &keys.update_id_events,
                    &upto.0,
                    &after.0,
                ],
            )
            .await?;
        Ok(mark.is_some())
    }

    /// The keys of the events in `(after, upto]`: a scan of that range of the primary key.
    pub async fn read_keys(&self, (after, upto): (EventId, EventId)) -> Result<Keys> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, topics, update_id FROM events \
                 WHERE id > $1 AND id <= $2 AND (topics IS NOT NULL OR update_id IS NOT NULL) \
                 ORDER BY id",
            )
            .await?;
        let mut keys = Keys::default();
        for row in client.query(&statement, &[&after.0, &upto.0]).await? {
            let topics: Option<Vec<String>> = row.try_get(1)?;
            keys.add(EventId(row.try_get(0)?), topics.as_deref(), row.try_get(2)?);
        }
        Ok(keys)
    }

    /// How far every event's keys are in.
    pub async fn keyed_upto(&self) -> Result<EventId> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT coalesce(max(upto), 0) FROM event_piper_keyed")
            .await?;
        Ok(EventId(
            client.query_one(&statement, &[]).await?.try_get(0)?,
        ))
    }

    /// On a standby, how far it has replayed the primary's WAL. Refuses a server that is not in
    /// recovery: it is not a replica of anything the hub's LSNs mean.
    pub async fn replay_lsn(&self) -> Result<i64> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8")
            .await?;
        let row = client.query_one(&statement, &[]).await?;
        row.try_get::<_, Option<i64>>(0)?.ok_or_else(|| {
            StoreError::Unexpected("the replica is not a standby (not in recovery)".into())
        })
    }

    /// The last `limit` events at or below `upto`, in id order (the recent tail's start).
    pub async fn read_before(&self, upto: EventId, limit: i64) -> Result<Vec<EventRow>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT * FROM (SELECT {COLUMNS} FROM events WHERE id <= $1 \
                 ORDER BY id DESC LIMIT $2) tail ORDER BY id"
            ))
            .await?;
        let rows = client.query(&statement, &[&upto.0, &limit]).await?;
        rows.iter()
            .map(event_row)
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }

    /// One page of a selection's events in `(after, upto]`, in id order, of the given types
    /// only (the types narrow the rows in the database; the follower still decides with the
    /// same filter, as for live frames). Each part of the selection is one keyset read of an
    /// index, and the page merges them, so a page costs its own size however long the history:
    /// - the consumer's events (`subscriber`, id) and the broadcasts (their partial index);
    /// - each exact topic's events from the stretches of keys the hubs wrote ([`crate::keys`]),
    ///   one read per topic of its first `limit + 1` stretches, enough for `limit` events
    ///   whatever the types; the page then stops where the shortest of those reads ends, a mark
    ///   up to which every topic's events are in the stretches read;
    /// - the events past the mark with one of the topics, which have no keys yet: a short scan;
    /// - for `*` and URL patterns, which no index serves, every event with topics in a range of
    ///   at most `limit * SCAN_IDS_PER_ROW` ids, matched here.
    ///
    /// Rows the selection does not select (from the scan) are left for the follower to drop:
    /// they may still move its position.
    pub async fn read_selection(
        &self,
        selection: &Selection,
        (after, upto): (EventId, EventId),
        limit: i64,
        types: Option<&TypeFilter>,
    ) -> Result<Page> {
        let upto = if selection.scans() {
            EventId(upto.0.min(after.0.saturating_add(limit * SCAN_IDS_PER_ROW)))
        } else {
            upto
        };
        let (exact_types, like_types) = sql_types(types);
        let consumer = selection.followed_consumer().map(ConsumerId::as_str);
        let topics: Vec<&str> = selection.exact_topics().collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&after.0, &upto.0, &limit, &exact_types, &like_types];
        // With topics, the page's end is computed in the statement (`bound`), in the snapshot
        // that reads the keys; without, it is `upto`.
        let end = if topics.is_empty() {
            "$2"
        } else {
            "bound.upto"
        };
        let type_filter = "($4::text[] IS NULL OR type = ANY($4) OR type LIKE ANY($5))";
        let filters = format!("id > $1 AND id <= {end} AND {type_filter}");
        let mut parts = Vec::new();
        if let Some(consumer) = &consumer {
            params.push(consumer);
            let at = params.len();
            parts.push(format!(
                "(SELECT {COLUMNS} FROM events WHERE subscriber = ${at} AND {filters} \
                 ORDER BY id LIMIT $3)"
            ));
            parts.push(format!(
                "(SELECT {COLUMNS} FROM events WHERE subscriber IS NULL AND topics IS NULL \
                 AND {filters} ORDER BY id LIMIT $3)"
            ));
        }
        let mut keys = String::new();
        if !topics.is_empty() {
            params.push(&topics);
            let at = params.len();
            keys = format!(
                "WITH keyed AS (SELECT coalesce(max(upto), 0) AS upto FROM event_piper_keyed), \
                 bound AS (SELECT least($2, ( \
                   SELECT min(nth.upto) FROM unnest(${at}::text[]) AS selected(topic) \
                   CROSS JOIN LATERAL (SELECT upto FROM event_piper_topics \
                     WHERE topic = selected.topic AND upto > $1 \
                     ORDER BY upto OFFSET $3 LIMIT 1) nth)) AS upto) "
            );
            // Stretches do not overlap and hold their ids in order: (stretch, position) is id
            // order, which the stretches' index gives without sorting more than one stretch.
            parts.push(format!(
                "(SELECT found.* FROM unnest(${at}::text[]) AS selected(topic) \
                 CROSS JOIN LATERAL (SELECT {COLUMNS} FROM \
                     (SELECT upto, ids FROM event_piper_topics \
                      WHERE topic = selected.topic AND upto > $1 \
                      ORDER BY upto LIMIT $3::int8 + 1) stretch \
                   CROSS JOIN LATERAL unnest(stretch.ids) WITH ORDINALITY AS key(event_id, at) \
                   JOIN events ON events.id = key.event_id \
                   WHERE key.event_id > $1 AND key.event_id <= bound.upto AND {type_filter} \
                   ORDER BY stretch.upto, key.at LIMIT $3) found)"
            ));
            parts.push(format!(
                "(SELECT {COLUMNS} FROM events \
                 WHERE id > greatest($1, (SELECT upto FROM keyed)) AND id <= bound.upto \
                   AND topics && ${at}::text[] AND {type_filter} ORDER BY id LIMIT $3)"
            ));
        }
        if selection.scans() {
            parts.push(format!(
                "(SELECT {COLUMNS} FROM events WHERE topics IS NOT NULL AND {filters} \
                 ORDER BY id LIMIT $3)"
            ));
        }
        let page = format!(
            "SELECT * FROM ({}) page ORDER BY id LIMIT $3",
            parts.join(" UNION ALL ")
        );
        // With topics, every row starts with the page's end, and an empty page is one row of
        // it alone.
        let (sql, at) = if topics.is_empty() {
            (page, 0)
        } else {
            (
                format!(
                    "{keys}SELECT bound.upto, page.* FROM bound \
                     LEFT JOIN LATERAL ({page}) page ON true ORDER BY page.id"
                ),
                1,
            )
        };
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&sql).await?;
        let raw = client.query(&statement, &params).await?;
        let upto = match raw.first() {
            Some(first) if at == 1 => EventId(first.try_get(0)?),
            _ => upto,
        };
        let mut rows: Vec<EventRow> = Vec::with_capacity(raw.len());
        for row in &raw {
            if at == 1 && row.try_get::<_, Option<i64>>(1)?.is_none() {
                continue;
            }
            rows.push(event_row_at(row, at)?);
        }
        // Each part returned its first `limit` rows: every selected row up to the last one
        // merged is in the page, and a short page covers the whole range.
        let covered = match rows.last() {
            Some(last) if rows.len() as i64 == limit => last.id,
            _ => upto,
        };
        // An event found by two parts (its consumer and a topic, two of its topics) once.
        rows.dedup_by_key(|row| row.id);
        Ok(Page { rows, covered })
    }

    /// Reads every lane, in one statement: each lane's first `limit` rows in `(after, upto]`,
    /// in id order, one vector per lane, and how far retention has deleted (the same snapshot).
    pub async fn read_lanes(&self, lanes: &[Lane]) -> Result<(Vec<Vec<EventRow>>, EventId)> {
        let (mut subscribers, mut afters, mut uptos, mut limits) = (vec![], vec![], vec![], vec![]);
        let (mut b_afters, mut b_uptos, mut b_limits) = (vec![], vec![], vec![]);
        // The statement numbers consumer lanes 1, 2, ... and broadcast lanes -1, -2, ...
        let mut numbered = Vec::with_capacity(lanes.len());
        for (at, lane) in lanes.iter().enumerate() {
            match &lane.subscriber {
                Some(subscriber) => {
                    subscribers.push(subscriber.as_str());
                    afters.push(lane.after.0);
                    uptos.push(lane.upto.0);
                    limits.push(lane.limit);
                    numbered.push((subscribers.len() as i64, at));
                }
                None => {
                    b_afters.push(lane.after.0);
                    b_uptos.push(lane.upto.0);
                    b_limits.push(lane.limit);
                    numbered.push((-(b_afters.len() as i64), at));
                }
            }
        }
        let lane_of: HashMap<i64, usize> = numbered.into_iter().collect();
        let client = self.pool.get().await?;
        // LEFT JOIN: every lane yields a row, with NULL columns when it is empty, so that the
        // retention column comes back even when no lane has a row.
        let statement = client
            .prepare_cached(&format!(
                "WITH retention AS (SELECT coalesce(max(deleted_upto), 0) AS deleted_upto \
                   FROM event_piper_retention) \
                 SELECT lane.n, retention.deleted_upto, page.* FROM retention \
                 CROSS JOIN unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
                   WITH ORDINALITY AS lane(subscriber, after, upto, lim, n) \
                 LEFT JOIN LATERAL (SELECT {COLUMNS} FROM events \
                   WHERE subscriber = lane.subscriber AND id > lane.after AND id <= lane.upto \
                   ORDER BY id LIMIT lane.lim) page ON true \
                 UNION ALL \
                 SELECT -lane.n, retention.deleted_upto, page.* FROM retention \
                 CROSS JOIN unnest($5::int8[], $6::int8[], $7::int8[]) \
                   WITH ORDINALITY AS lane(after, upto, lim, n) \
                 LEFT JOIN LATERAL (SELECT {COLUMNS} FROM events \
                   WHERE subscriber IS NULL AND topics IS NULL \
                   AND id > lane.after AND id <= lane.upto ORDER BY id LIMIT lane.lim) page ON true"
            ))
            .await?;
        let raw = client
            .query(
                &statement,
                &[
                    &subscribers,
                    &afters,
                    &uptos,
                    &limits,
                    &b_afters,
                    &b_uptos,
                    &b_limits,
                ],
            )
            .await?;
        let mut rows = vec![Vec::new(); lanes.len()];
        let mut deleted_upto = EventId(0);
        for row in &raw {
            deleted_upto = EventId(row.try_get(1)?);
            if row.try_get::<_, Option<i64>>(2)?.is_none() {
                continue;
            }
            let n: i64 = row.try_get(0)?;
            let lane = *lane_of
                .get(&n)
                .ok_or_else(|| StoreError::Unexpected(format!("a row of no lane ({n})")))?;
            rows[lane].push(event_row_at(row, 2)?);
        }
        // SQL promises no order across the lateral joins' output: put each lane in id order.
        for lane in &mut rows {
            lane.sort_unstable_by_key(|row| row.id);
        }
        Ok((rows, deleted_upto))
    }

    /// One page of a consumer's history (its events and the broadcasts), oldest first, each as a
    /// JSON object (id, type, timestamp, subscriber, payload), with the search's filters applied
    /// in the database. Two index scans merged, as for replay.
    pub async fn history(&self, search: &HistorySearch<'_>) -> Result<Vec<(EventId, String)>> {
        let client = self.pool.get().await?;
        // The newest ones are read newest first, then put back in order.
        let order = if search.newest { "DESC" } else { "ASC" };
        let filters = "id > $2 AND id <= $3 \
             AND ($5::timestamptz IS NULL OR timestamp >= $5) \
             AND ($6::timestamptz IS NULL OR timestamp < $6) \
             AND ($7::text IS NULL OR payload @> $7::jsonb) \
             AND ($8::text[] IS NULL OR type = ANY($8) OR type LIKE ANY($9))";
        let statement = client
            .prepare_cached(&format!(
                "SELECT id, json_build_object('id', id, 'type', type, 'timestamp', timestamp, \
                   'subscriber', subscriber, 'payload', payload)::text FROM ( \
                   (SELECT * FROM events WHERE subscriber = $1 AND {filters} \
                    ORDER BY id {order} LIMIT $4) \
                   UNION ALL \
                   (SELECT * FROM events WHERE subscriber IS NULL AND topics IS NULL \
                    AND {filters} ORDER BY id {order} LIMIT $4) \
                 ) page ORDER BY id {order} LIMIT $4"
            ))
            .await?;
        let (exact, like) = sql_types(search.types);
        let rows = client
            .query(
                &statement,
                &[
                    &search.consumer.as_str(),
                    &search.after.0,
                    &search.upto.0,
                    &search.limit,
                    &search.since,
                    &search.until,
                    &search.payload,
                    &exact,
                    &like,
                ],
            )
            .await?;
        let mut page = rows
            .iter()
            .map(|row| Ok((EventId(row.try_get(0)?), row.try_get(1)?)))
            .collect::<Result<Vec<_>>>()?;
        if search.newest {
            page.reverse();
        }
        Ok(page)
    }

    /// Inserts `events` in one statement (all or nothing) and returns their ids, in order.
    pub async fn publish<'a>(
        &self,
        events: impl IntoIterator<Item = &'a NewEvent>,
    ) -> Result<Vec<EventId>> {
        let mut types: Vec<&str> = Vec::new();
        let mut subscribers: Vec<Option<&str>> = Vec::new();
        let mut payloads: Vec<&str> = Vec::new();
        // Arrays of arrays must be rectangular in PostgreSQL: each event's topics travel as a
        // JSON array.
        let mut topics: Vec<Option<String>> = Vec::new();
        let mut private: Vec<Option<bool>> = Vec::new();
        let mut update_ids: Vec<Option<&str>> = Vec::new();
        let mut retries: Vec<Option<i32>> = Vec::new();
        for event in events {
            types.push(&event.event_type);
            subscribers.push(event.subscriber.as_ref().map(ConsumerId::as_str));
            payloads.push(&event.payload);
            topics.push(
                event
                    .topics
                    .as_ref()
                    .map(|topics| serde_json::Value::from(topics.clone()).to_string()),
            );
            // NULL, not false: an event without a flag is stored as it was before topics.
            private.push(event.private.then_some(true));
            update_ids.push(event.update_id.as_deref());
            retries.push(event.retry);
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO events (type, subscriber, payload, topics, private, update_id, retry) \
                 SELECT t, s, p::jsonb, \
                   CASE WHEN tp IS NOT NULL \
                     THEN ARRAY(SELECT jsonb_array_elements_text(tp::jsonb)) END, \
                   pv, u, r \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], \
                             $6::text[], $7::int4[]) \
                   WITH ORDINALITY AS batch(t, s, p, tp, pv, u, r, n) ORDER BY n \
                 RETURNING id",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &types,
                    &subscribers,
                    &payloads,
                    &topics,
                    &private,
                    &update_ids,
                    &retries,
                ],
            )
            .await?;
        // The identity column assigns ids in insertion order, which is the batch's order.
        let mut ids = rows
            .iter()
            .map(|row| row.try_get(0).map(EventId))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if ids.len() != types.len() {
            return Err(StoreError::Unexpected(format!(
                "{} ids returned for {} events inserted",
                ids.len(),
                types.len()
            )));
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// One event as a JSON object (id, type, timestamp, subscriber, payload), if it exists.
    pub async fn event_json(&self, id: EventId) -> Result<Option<(Option<String>, String)>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT subscriber, json_build_object('id', id, 'type', type, \
                   'timestamp', timestamp, 'subscriber', subscriber, 'payload', payload)::text \
                 FROM events WHERE id = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&id.0]).await?;
        row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .transpose()
    }

    /// The highest id of the events retention may delete now, oldest first, at most `limit` of
    /// them: older than `max_age`, none after `upto` nor after the position of a webhook
    /// subscription that may still deliver (any not disabled by a 410), stopping at the first
    /// event that is not old enough, so that what is deleted is always a prefix of the ids and
    /// "everything up to N is gone" stays true. None when there is nothing to delete.
    pub async fn expiring(
        &self,
        max_age: Duration,
        upto: EventId,
        limit: i64,
    ) -> Result<Option<EventId>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "WITH head AS ( \
                   SELECT id, timestamp < now() - make_interval(secs => $1::float8) AS old \
                   FROM events WHERE id <= $2 AND id <= coalesce( \
                     (SELECT min(position) FROM event_piper_subscriptions \
                      WHERE state <> 'disabled'), $2) \
                   ORDER BY id LIMIT $3) \
                 SELECT max(id) FROM head WHERE old AND id < coalesce( \
                   (SELECT min(id) FROM head WHERE NOT old), 9223372036854775807)",
            )
            .await?;
        let row = client
            .query_one(&statement, &[&max_age.as_secs_f64(), &upto.0, &limit])
            .await?;
        Ok(row.try_get::<_, Option<i64>>(0)?.map(EventId))
    }

    /// Deletes every event up to `upto` (what [`Store::expiring`] found) and records that they
    /// are gone, with their keys ([`crate::keys`]), in one statement: the stretches of topics that
    /// end there or before (one that goes on past it stays until a later run). Returns how many
    /// events were deleted.
    pub async fn expire(&self, upto: EventId) -> Result<i64> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "WITH gone AS (DELETE FROM events WHERE id <= $1 RETURNING id), \
                   topics AS (DELETE FROM event_piper_topics WHERE upto <= $1), \
                   update_ids AS (DELETE FROM event_piper_update_ids WHERE event_id <= $1) \
                 UPDATE event_piper_retention \
                 SET deleted_upto = greatest(deleted_upto, coalesce((SELECT max(id) FROM gone), 0)) \
                 RETURNING (SELECT count(*) FROM gone)",
            )
            .await?;
        Ok(client.query_one(&statement, &[&upto.0]).await?.try_get(0)?)
    }

    /// The first event a Mercure publisher gave this id (the draft resolves a reused id to the
    /// earliest update that carries it). Up to the mark, the hubs have written every event's
    /// publisher's id into their own table ([`crate::keys`]); past it (events published a moment
    /// ago, or committed and not read yet, for a client that resumes with the id its publish just
    /// returned), the table's tail is scanned, in the same snapshot.
    pub async fn find_update_id(&self, update_id: &str) -> Result<Option<EventId>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT least( \
                   (SELECT min(event_id) FROM event_piper_update_ids WHERE update_id = $1), \
                   (SELECT min(id) FROM events WHERE update_id = $1 \
                      AND id > (SELECT coalesce(max(upto), 0) FROM event_piper_keyed)))",
            )
            .await?;
        let row = client.query_one(&statement, &[&update_id]).await?;
        Ok(row.try_get::<_, Option<i64>>(0)?.map(EventId))
    }

    /// The highest id retention has deleted (0 if none).
    pub async fn deleted_upto(&self) -> Result<EventId> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT coalesce(max(deleted_upto), 0) FROM event_piper_retention")
            .await?;
        Ok(EventId(
            client.query_one(&statement, &[]).await?.try_get(0)?,
        ))
    }

    /// The highest id in the table (0 when empty).
    pub async fn max_id(&self) -> Result<EventId> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT coalesce(max(id), 0) FROM events", &[])
            .await?;
        Ok(EventId(row.try_get(0)?))
    }

    /// The transactions (virtual transaction id -> backend pid) that may hold an event id they
    /// have not committed yet: those holding `events` in ROW EXCLUSIVE mode, which PostgreSQL
    /// takes before it runs an insert and keeps until the transaction's end is visible.
    pub async fn in_flight_holders(&self) -> Result<HashMap<String, i32>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT virtualtransaction, coalesce(pid, 0) FROM pg_locks \
                 WHERE locktype = 'relation' AND relation = 'events'::regclass \
                   AND mode = 'RowExclusiveLock' AND granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .await?;
        let rows = client.query(&statement, &[]).await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }
}
