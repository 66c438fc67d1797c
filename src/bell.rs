//! The doorbell's switch: producers ring (`NOTIFY new_events`) only while a hub is asleep.
//!
//! A transaction that notifies takes, at commit, a lock that serializes every notifying commit of
//! the cluster through its WAL flush, so a bell rung by every producer caps them all at about one
//! fsync at a time. Instead the id trigger (schema.sql) reads the sequence `event_piper_bell`, a
//! deadline in milliseconds by the database's clock, and rings only before it. A hub that is awake
//! reads new events by itself (hub.rs); it arms the bell just before it goes to sleep, renews the
//! lease while it sleeps and disarms the bell (0) when it wakes.
//!
//! Several instances may share the database, and the bell must stay armed while any of their hubs
//! sleeps. A sleeping hub therefore holds a shared session-level advisory lock ("asleep") on its
//! notification connection, and a waking hub clears the bell only when no other hub holds it.
//! Arming and disarming take an exclusive transaction lock ("switch") first, so one hub's check
//! and another's arming cannot interleave. Producers never take either lock.
//!
//! The asleep lock lives and dies with the notification connection: a hub whose connection drops
//! (or whose process dies) stops counting as asleep. The bell it left armed makes producers ring
//! needlessly until the lease ends or another hub disarms it; it never costs an event.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::store::lock_key_parts;

/// Exclusive, per transaction: orders arming and disarming across hubs.
const SWITCH_LOCK_KEY: i64 = 7311142570156910961;
/// Shared, per session: held by every hub that sleeps, on its notification connection.
const ASLEEP_LOCK_KEY: i64 = 7311142570156910962;

/// The notification connection while it is up (None while it reconnects).
pub type Line = Option<Arc<Client>>;

#[derive(Debug, thiserror::Error)]
pub enum BellError {
    #[error("the notification connection is down")]
    NoConnection,
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// One hub's switch for the bell.
pub struct Bell {
    line: watch::Receiver<Line>,
    /// The connection that holds this hub's asleep lock, if it holds one.
    armed_on: Option<Arc<Client>>,
}

impl Bell {
    pub fn new(line: watch::Receiver<Line>) -> Bell {
        Bell {
            line,
            armed_on: None,
        }
    }

    /// Whether this hub holds the bell armed.
    pub fn is_armed(&self) -> bool {
        self.armed_on.is_some()
    }

    /// Arms the bell for `lease` from now, or renews it: every producer that reads it before the
    /// lease ends rings. Fails when the notification connection is down, since no ring could be
    /// heard anyway.
    pub async fn arm(&mut self, lease: Duration) -> Result<(), BellError> {
        let client = self.line.borrow().clone().ok_or(BellError::NoConnection)?;
        let held = self
            .armed_on
            .as_ref()
            .is_some_and(|armed| Arc::ptr_eq(armed, &client));
        let take = if held {
            String::new()
        } else {
            format!("SELECT pg_advisory_lock_shared({ASLEEP_LOCK_KEY});")
        };
        let lease_ms = lease.as_millis();
        // One simple query is one transaction: the switch lock is held until all of it is done.
        // Another hub's longer lease is kept.
        client
            .simple_query(&format!(
                "SELECT pg_advisory_xact_lock({SWITCH_LOCK_KEY}); {take} \
                 SELECT setval('event_piper_bell', greatest( \
                   coalesce(pg_sequence_last_value('event_piper_bell'), 0), \
                   (date_part('epoch', clock_timestamp()) * 1000)::bigint + {lease_ms}))"
            ))
            .await?;
        self.armed_on = Some(client);
        Ok(())
    }

    /// Disarms: releases this hub's asleep lock, and clears the bell unless another hub still
    /// sleeps. Also clears a bell left armed by a hub that died.
    pub async fn disarm(&mut self) -> Result<(), BellError> {
        let client = self.line.borrow().clone().ok_or(BellError::NoConnection)?;
        // A lock taken on an earlier connection went with it.
        let release = match self.armed_on.take() {
            Some(armed) if Arc::ptr_eq(&armed, &client) => {
                format!("SELECT pg_advisory_unlock_shared({ASLEEP_LOCK_KEY});")
            }
            _ => String::new(),
        };
        let (high, low) = lock_key_parts(ASLEEP_LOCK_KEY);
        let result = client
            .simple_query(&format!(
                "SELECT pg_advisory_xact_lock({SWITCH_LOCK_KEY}); {release} \
                 SELECT setval('event_piper_bell', 0) WHERE NOT EXISTS ( \
                   SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND classid = {high} AND objid = {low} AND objsubid = 1 \
                     AND database = (SELECT oid FROM pg_database \
                                     WHERE datname = current_database()))"
            ))
            .await;
        if result.is_err() && !release.is_empty() {
            // Unknown whether the unlock happened; if not, the connection still counts as asleep
            // and the bell stays armed, which costs rings but never events.
            self.armed_on = Some(client);
        }
        result?;
        Ok(())
    }
}
