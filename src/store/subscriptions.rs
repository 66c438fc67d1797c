//! The webhook subscriptions table: what the API reads and changes through the pool, and what
//! the instance delivering a subscription writes through its [`Lease`], the one connection whose
//! session holds the advisory lock that makes it the subscription's only deliverer.

use std::time::SystemTime;

use tokio_postgres::{NoTls, Statement};

use super::{Result, Store, StoreError, harden, sql_types};
use crate::event::{ConsumerId, EventId};
use crate::filter::TypeFilter;

/// The first key of every subscription's advisory lock ("evpw" read as a big-endian integer); the
/// second is the subscription's id. Two-key advisory locks never collide with the one-key locks of
/// the schema and the doorbell.
pub const LOCK_CLASS: i32 = 1_702_260_855;

/// The lease connections' application name: how instances count each other.
pub const LEASE_APPLICATION: &str = "event-piper webhooks";

/// A subscription as stored.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub id: i64,
    pub consumer: String,
    pub url: String,
    /// The signing secret (`whsec_...`), never shown after creation.
    pub secret: String,
    pub types: Option<Vec<String>>,
    pub batch_size: i32,
    /// The last event id the receiver acknowledged.
    pub position: EventId,
    /// The batch being delivered, if one is: where it ends and the epoch it was formed in.
    pub pending: Option<(EventId, i32)>,
    /// `active`, `paused` or `disabled` (the receiver answered 410 Gone).
    pub state: String,
    /// Grows with every change through the API: the deliverer stops at the next one.
    pub generation: i32,
    /// The generation of the last change that restarted delivery (a new position or new types):
    /// an acknowledgement counts only within the epoch its batch was sent in.
    pub epoch: i32,
    pub created_at: SystemTime,
    pub delivered: i64,
    pub failed_attempts: i64,
    pub last_attempt_at: Option<SystemTime>,
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    pub last_success_at: Option<SystemTime>,
    pub failing_since: Option<SystemTime>,
    pub next_retry_at: Option<SystemTime>,
}

const SUBSCRIPTION_COLUMNS: &str = "id, consumer, url, secret, types, batch_size, position, \
     pending_upto, pending_generation, state, generation, created_at, delivered, failed_attempts, last_attempt_at, \
     last_outcome, last_error, last_success_at, failing_since, next_retry_at, epoch";

fn subscription_row(row: &tokio_postgres::Row) -> Result<SubscriptionRow> {
    Ok(SubscriptionRow {
        id: row.try_get(0)?,
        consumer: row.try_get(1)?,
        url: row.try_get(2)?,
        secret: row.try_get(3)?,
        types: row.try_get(4)?,
        batch_size: row.try_get(5)?,
        position: EventId(row.try_get(6)?),
        pending: match (row.try_get::<_, Option<i64>>(7)?, row.try_get(8)?) {
            (Some(upto), Some(generation)) => Some((EventId(upto), generation)),
            _ => None,
        },
        state: row.try_get(9)?,
        generation: row.try_get(10)?,
        created_at: row.try_get(11)?,
        delivered: row.try_get(12)?,
        failed_attempts: row.try_get(13)?,
        last_attempt_at: row.try_get(14)?,
        last_outcome: row.try_get(15)?,
        last_error: row.try_get(16)?,
        last_success_at: row.try_get(17)?,
        failing_since: row.try_get(18)?,
        next_retry_at: row.try_get(19)?,
        epoch: row.try_get(20)?,
    })
}

/// A subscription to create.
pub struct NewSubscription<'a> {
    pub consumer: &'a ConsumerId,
    pub url: &'a str,
    pub secret: &'a str,
    pub types: Option<&'a [String]>,
    pub batch_size: i32,
    pub position: EventId,
}

/// What a `PATCH` changes; None leaves a field as it is.
#[derive(Debug, Default)]
pub struct SubscriptionChange {
    pub url: Option<String>,
    /// Some(None) removes the type filter.
    pub types: Option<Option<Vec<String>>>,
    pub batch_size: Option<i32>,
    /// true pauses, false resumes (also a subscription disabled by a 410).
    pub paused: Option<bool>,
    /// Replays from here: the receiver gets every event after it again.
    pub position: Option<EventId>,
}

impl Store {
    pub async fn create_subscription(&self, new: &NewSubscription<'_>) -> Result<SubscriptionRow> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "INSERT INTO event_piper_subscriptions \
                   (consumer, url, secret, types, batch_size, position) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING {SUBSCRIPTION_COLUMNS}"
            ))
            .await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &new.consumer.as_str(),
                    &new.url,
                    &new.secret,
                    &new.types,
                    &new.batch_size,
                    &new.position.0,
                ],
            )
            .await?;
        subscription_row(&row)
    }

    /// Every subscription, or those of one consumer, oldest first.
    pub async fn subscriptions(
        &self,
        consumer: Option<&ConsumerId>,
    ) -> Result<Vec<SubscriptionRow>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM event_piper_subscriptions \
                 WHERE $1::text IS NULL OR consumer = $1 ORDER BY id"
            ))
            .await?;
        let rows = client
            .query(&statement, &[&consumer.map(ConsumerId::as_str)])
            .await?;
        rows.iter().map(subscription_row).collect()
    }

    pub async fn subscription(&self, id: i64) -> Result<Option<SubscriptionRow>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM event_piper_subscriptions WHERE id = $1"
            ))
            .await?;
        let row = client.query_opt(&statement, &[&id]).await?;
        row.as_ref().map(subscription_row).transpose()
    }

    /// Applies a change and moves the generation on, so that the instance delivering the
    /// subscription stops and starts again in the new form. A position (even the same one) or
    /// types that differ also start a new epoch: the batch in flight is forgotten (its events
    /// would differ) and its acknowledgement refused. Any other change keeps both: the batch in
    /// flight is acknowledged if the receiver accepts it, and sent again under the same
    /// webhook-id if not. Resuming clears the failure state. None: no such subscription.
    pub async fn change_subscription(
        &self,
        id: i64,
        change: &SubscriptionChange,
    ) -> Result<Option<SubscriptionRow>> {
        let client = self.pool.get().await?;
        // In SET, `types` is the value before the change.
        let restarts = "$7 IS NOT NULL OR ($3 AND types IS DISTINCT FROM $4)";
        let statement = client
            .prepare_cached(&format!(
                "UPDATE event_piper_subscriptions SET \
                   url = coalesce($2, url), \
                   types = CASE WHEN $3 THEN $4 ELSE types END, \
                   batch_size = coalesce($5, batch_size), \
                   state = CASE $6::boolean WHEN true THEN 'paused' WHEN false THEN 'active' \
                           ELSE state END, \
                   position = coalesce($7, position), \
                   pending_upto = CASE WHEN {restarts} THEN NULL ELSE pending_upto END, \
                   pending_generation = CASE WHEN {restarts} THEN NULL \
                                        ELSE pending_generation END, \
                   failing_since = CASE WHEN $6 = false THEN NULL ELSE failing_since END, \
                   next_retry_at = CASE WHEN $6 = false THEN NULL ELSE next_retry_at END, \
                   epoch = CASE WHEN {restarts} THEN generation + 1 ELSE epoch END, \
                   generation = generation + 1 \
                 WHERE id = $1 RETURNING {SUBSCRIPTION_COLUMNS}"
            ))
            .await?;
        let types = change.types.clone().flatten();
        let row = client
            .query_opt(
                &statement,
                &[
                    &id,
                    &change.url,
                    &change.types.is_some(),
                    &types,
                    &change.batch_size,
                    &change.paused,
                    &change.position.map(|position| position.0),
                ],
            )
            .await?;
        row.as_ref().map(subscription_row).transpose()
    }

    /// Deletes a subscription; false if there was none. The instance delivering it stops at its
    /// next write (it finds no row to write).
    pub async fn delete_subscription(&self, id: i64) -> Result<bool> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached("DELETE FROM event_piper_subscriptions WHERE id = $1")
            .await?;
        Ok(client.execute(&statement, &[&id]).await? == 1)
    }

    /// How many of the consumer's events of the given types (and broadcasts) lie after `after`,
    /// counted up to `cap` (a receiver far behind reads as "at least `cap`").
    pub async fn count_after(
        &self,
        consumer: &str,
        after: EventId,
        types: Option<&TypeFilter>,
        cap: i64,
    ) -> Result<i64> {
        let client = self.pool.get().await?;
        let filters = "id > $2 AND ($4::text[] IS NULL OR type = ANY($4) OR type LIKE ANY($5))";
        let statement = client
            .prepare_cached(&format!(
                "SELECT count(*) FROM ( \
                   (SELECT 1 FROM events WHERE subscriber = $1 AND {filters} LIMIT $3) \
                   UNION ALL \
                   (SELECT 1 FROM events WHERE subscriber IS NULL AND {filters} LIMIT $3) \
                   LIMIT $3) behind"
            ))
            .await?;
        let (exact, like) = sql_types(types);
        let row = client
            .query_one(&statement, &[&consumer, &after.0, &cap, &exact, &like])
            .await?;
        Ok(row.try_get(0)?)
    }
}

/// One attempt's outcome, as stored for `GET /subscriptions`.
pub struct Attempt<'a> {
    /// Short: "HTTP 200", "HTTP 503", "timed out".
    pub outcome: &'a str,
    /// Why it failed, when it did.
    pub error: Option<&'a str>,
}

/// What became of an acknowledgement ([`Lease::delivered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acknowledged {
    /// The position moved, and the next batch, if given, is recorded: delivery goes on.
    Stored,
    /// The position moved, but the subscription was changed otherwise (paused, a new URL or
    /// batch size...): the next batch is not recorded, and the delivery stops, to start again in
    /// the new form.
    StoredThenChanged,
    /// The position did not move: a new position or new types were asked for since the batch
    /// was sent (or the subscription was deleted).
    Refused,
}

/// The connection that holds this instance's subscription locks, and the writes of the
/// subscriptions it delivers. A write that starts or retries something (a batch, a failure, a
/// 410) is accepted only while the subscription still has the generation the deliverer read: any
/// change through the API, or a delete, refuses it. An acknowledgement, which reports what the
/// receiver already has, is stored while the epoch is unchanged: see [`Lease::delivered`].
///
/// Session advisory locks end with the session, so an instance that dies, or loses this
/// connection, lets go of its subscriptions at once, and another instance claims them at its next
/// look. Writes go through the same connection: once it is lost, the instance cannot acknowledge
/// anything on a subscription it may no longer own.
pub struct Lease {
    client: tokio_postgres::Client,
    statements: Statements,
}

/// The lease's statements, prepared once when it connects: each write is then one round trip.
struct Statements {
    states: Statement,
    claim: Statement,
    rows: Statement,
    release: Statement,
    begin_batch: Statement,
    delivered: Statement,
    failed: Statement,
    disable: Statement,
}

/// The generation and epoch a deliverer read with the subscription: what its writes are checked
/// against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub generation: i32,
    pub epoch: i32,
}

impl Lease {
    pub async fn connect(mut pg_config: tokio_postgres::Config) -> Result<Lease> {
        pg_config.application_name(LEASE_APPLICATION);
        harden(&mut pg_config);
        let (client, connection) = pg_config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "webhook lease connection lost");
            }
        });
        let prepare = |sql: String| {
            let client = &client;
            async move { client.prepare(&sql).await }
        };
        let statements = Statements {
            // With the number of instances looking (their lease connections), for a fair share.
            states: prepare(format!(
                "SELECT id, state, generation, \
                   (SELECT count(*) FROM pg_stat_activity \
                    WHERE application_name = '{LEASE_APPLICATION}' \
                      AND datname = current_database()) \
                 FROM event_piper_subscriptions"
            ))
            .await?,
            // Materialized: the lock function must only see the candidates, never a row another
            // condition would have ruled out.
            claim: prepare(format!(
                "WITH candidates AS MATERIALIZED ( \
                   SELECT id FROM event_piper_subscriptions \
                   WHERE state = 'active' AND NOT (id = ANY($1)) ORDER BY id) \
                 SELECT id FROM candidates \
                 WHERE pg_try_advisory_lock({LOCK_CLASS}, id::integer) LIMIT $2"
            ))
            .await?,
            rows: prepare(format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM event_piper_subscriptions \
                 WHERE id = ANY($1) ORDER BY id"
            ))
            .await?,
            release: prepare(format!(
                "SELECT pg_advisory_unlock({LOCK_CLASS}, $1::bigint::integer)"
            ))
            .await?,
            begin_batch: prepare(
                "UPDATE event_piper_subscriptions SET pending_upto = $4, pending_generation = $3 \
                 WHERE id = $1 AND generation = $2 AND epoch = $3 AND state = 'active'"
                    .into(),
            )
            .await?,
            // Whatever else changed, the position moves when the epoch is the batch's and the
            // position its start; the next batch is recorded only in an unchanged generation.
            // The position's own check is for an instance of an earlier version, which moves
            // positions without starting an epoch (it did not know of them): its move is not
            // overwritten either.
            delivered: prepare(
                "UPDATE event_piper_subscriptions SET position = $5, \
                   pending_upto = CASE WHEN generation = $2 AND state = 'active' THEN $8::bigint END, \
                   pending_generation = CASE WHEN generation = $2 AND state = 'active' \
                                          AND $8::bigint IS NOT NULL THEN $3 END, \
                   delivered = delivered + $6, last_attempt_at = now(), last_outcome = $7, \
                   last_error = NULL, last_success_at = now(), failing_since = NULL, \
                   next_retry_at = NULL \
                 WHERE id = $1 AND epoch = $3 AND position = $4 \
                 RETURNING generation = $2 AND state = 'active'"
                    .into(),
            )
            .await?,
            failed: prepare(
                "UPDATE event_piper_subscriptions SET failed_attempts = failed_attempts + 1, \
                   last_attempt_at = now(), last_outcome = $3, last_error = $4, \
                   failing_since = coalesce(failing_since, now()), next_retry_at = $5 \
                 WHERE id = $1 AND generation = $2 AND state = 'active' \
                 RETURNING failing_since"
                    .into(),
            )
            .await?,
            disable: prepare(
                "UPDATE event_piper_subscriptions SET state = 'disabled', \
                   failed_attempts = failed_attempts + 1, last_attempt_at = now(), \
                   last_outcome = $3, last_error = $4, next_retry_at = NULL \
                 WHERE id = $1 AND generation = $2 AND state = 'active'"
                    .into(),
            )
            .await?,
        };
        Ok(Lease { client, statements })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Every subscription's id, state and generation, and how many instances are looking for
    /// subscriptions to deliver (this one included).
    pub async fn states(&self) -> Result<(Vec<(i64, String, i32)>, usize)> {
        let rows = self.client.query(&self.statements.states, &[]).await?;
        let mut instances = 1;
        let mut states = Vec::with_capacity(rows.len());
        for row in &rows {
            states.push((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
            instances = usize::try_from(row.try_get::<_, i64>(3)?)
                .unwrap_or(1)
                .max(1);
        }
        Ok((states, instances))
    }

    /// Takes the locks of up to `limit` active subscriptions not in `held` that no other
    /// instance holds; returns their rows.
    pub async fn claim(&self, held: &[i64], limit: usize) -> Result<Vec<SubscriptionRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let locked: Vec<i64> = self
            .client
            .query(&self.statements.claim, &[&held, &limit])
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        if locked.is_empty() {
            return Ok(Vec::new());
        }
        // Read by a statement of its own, begun once the locks are held. The claim's snapshot
        // is older than its locks: read there, a row could miss the positions the last
        // deliverer stored before it died and let go, and they would be sent again.
        let rows = self
            .client
            .query(&self.statements.rows, &[&locked])
            .await?
            .iter()
            .map(subscription_row)
            .collect::<Result<Vec<_>>>()?;
        // Paused or deleted between the two statements: let go at once.
        for id in &locked {
            if !rows
                .iter()
                .any(|row| row.id == *id && row.state == "active")
            {
                self.release(*id).await?;
            }
        }
        Ok(rows
            .into_iter()
            .filter(|row| row.state == "active")
            .collect())
    }

    /// Lets go of a subscription (it was paused, disabled, deleted or changed).
    pub async fn release(&self, id: i64) -> Result<()> {
        let statement = &self.statements.release;
        self.client.execute(statement, &[&id]).await?;
        Ok(())
    }

    /// Records the batch about to be sent, `(position, upto]`, formed in the current generation
    /// and epoch. False: the subscription changed.
    pub async fn begin_batch(&self, id: i64, version: Version, upto: EventId) -> Result<bool> {
        let statement = &self.statements.begin_batch;
        Ok(self
            .client
            .execute(
                statement,
                &[&id, &version.generation, &version.epoch, &upto.0],
            )
            .await?
            == 1)
    }

    /// The receiver acknowledged the batch `(from, upto]`, of `count` events, sent in
    /// `version.epoch`; `next` is the end of the batch to be sent next, when it is known already.
    ///
    /// The receiver has the batch whatever was changed since, so the position moves unless the
    /// change asked for a new start (a new position or new types: a new epoch). One statement
    /// checks and writes, so an acknowledgement and a change through the API are ordered by
    /// PostgreSQL: an acknowledgement that comes after a new start is refused, one that comes
    /// after any other change is stored.
    pub async fn delivered(
        &self,
        id: i64,
        version: Version,
        (from, upto): (EventId, EventId),
        count: i64,
        next: Option<EventId>,
        attempt: &Attempt<'_>,
    ) -> Result<Acknowledged> {
        let statement = &self.statements.delivered;
        let row = self
            .client
            .query_opt(
                statement,
                &[
                    &id,
                    &version.generation,
                    &version.epoch,
                    &from.0,
                    &upto.0,
                    &count,
                    &attempt.outcome,
                    &next.map(|next| next.0),
                ],
            )
            .await?;
        Ok(match row {
            None => Acknowledged::Refused,
            Some(row) if row.try_get(0)? => Acknowledged::Stored,
            Some(_) => Acknowledged::StoredThenChanged,
        })
    }

    /// An attempt failed; the next is at `retry_at`. Returns since when the subscription has
    /// been failing, or None if it changed in the meantime.
    pub async fn failed(
        &self,
        id: i64,
        generation: i32,
        attempt: &Attempt<'_>,
        retry_at: SystemTime,
    ) -> Result<Option<SystemTime>> {
        let statement = &self.statements.failed;
        let row = self
            .client
            .query_opt(
                statement,
                &[
                    &id,
                    &generation,
                    &attempt.outcome,
                    &attempt.error,
                    &retry_at,
                ],
            )
            .await?;
        row.map(|row| row.try_get(0).map_err(StoreError::from))
            .transpose()
    }

    /// The receiver answered 410 Gone: the subscription is disabled until resumed.
    pub async fn disable(&self, id: i64, generation: i32, attempt: &Attempt<'_>) -> Result<bool> {
        let statement = &self.statements.disable;
        Ok(self
            .client
            .execute(
                statement,
                &[&id, &generation, &attempt.outcome, &attempt.error],
            )
            .await?
            == 1)
    }
}
