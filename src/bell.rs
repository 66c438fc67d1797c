//! The doorbell's switch: producers ring (`NOTIFY new_events`) only while a hub sleeps.
//!
//! A transaction that notifies takes, at commit, a lock that serializes every notifying commit of
//! the cluster through its WAL flush, so a bell rung by every producer caps them all at about one
//! fsync at a time. A hub that is awake reads new events by itself (hub.rs) and nobody rings.
//!
//! Every inserted row tries to take a shared advisory lock, from the default of the column
//! `event_piper_bell` (schema.sql); a hub that goes to sleep asks for that lock exclusively, on a
//! connection of its own. From the moment its request is queued, producers' shared requests fail,
//! so they ring. The request is granted once every producer that did take the shared lock has
//! ended, and their commits are visible by then: the hub reads once more after the grant, and
//! sleeps until a ring. So no producer is missed, and the lock itself is the whole state: it is
//! held (or waited for) exactly as long as the hub sleeps and its connection lives.
//!
//! Several hubs: a second one's request waits behind the first one's, which keeps producers
//! ringing; when the first wakes, the second's is granted at once. A hub whose connection drops
//! (or whose process dies) loses the lock with it; the connection's end rings the hub's own
//! doorbell, so that it wakes and reads.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// The key of the advisory lock producers try in shared mode (the default of
/// `events.event_piper_bell`, schema.sql), and a sleeping hub holds or waits for exclusively.
const BELL_LOCK_KEY: i64 = 7311142570156910960;

/// The bell connection's `application_name`, so operators (and tests) can find its backend.
pub const APPLICATION_NAME: &str = "event-piper-bell";

#[derive(Debug, thiserror::Error)]
#[error("doorbell connection: {0}")]
pub struct BellError(#[from] tokio_postgres::Error);

/// Where the hub stands with the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Disarmed,
    /// A request was sent and not seen through: it may be waiting, granted, or done with.
    Pending,
    Armed,
}

/// One hub's switch for the bell, with its own connection (opened on first use).
pub struct Bell {
    pg_config: tokio_postgres::Config,
    doorbell: Arc<Notify>,
    client: Option<Client>,
    state: State,
}

impl Bell {
    /// `doorbell` is rung when the bell's connection ends.
    pub fn new(mut pg_config: tokio_postgres::Config, doorbell: Arc<Notify>) -> Bell {
        pg_config.application_name(APPLICATION_NAME);
        crate::store::harden(&mut pg_config);
        Bell {
            pg_config,
            doorbell,
            client: None,
            state: State::Disarmed,
        }
    }

    /// Whether the lock may be held or requested: the hub must [`Bell::disarm`] when it wakes.
    pub fn is_armed(&self) -> bool {
        self.state != State::Disarmed
    }

    /// Asks for the lock and returns once it is granted: producers ring from the moment it is
    /// asked for, and the ones that did not ring have all ended when it returns. Dropping the
    /// future leaves the request standing; [`Bell::disarm`] withdraws it.
    pub async fn arm(&mut self) -> Result<(), BellError> {
        self.connect().await?;
        let Some(client) = &self.client else {
            unreachable!("connected above");
        };
        self.state = State::Pending;
        client
            .simple_query(&format!("SELECT pg_advisory_lock({BELL_LOCK_KEY})"))
            .await?;
        self.state = State::Armed;
        Ok(())
    }

    /// Withdraws the request or releases the lock, so producers stop ringing.
    pub async fn disarm(&mut self) -> Result<(), BellError> {
        let Some(client) = self.client.as_ref().filter(|c| !c.is_closed()) else {
            // The lock went with the connection.
            self.state = State::Disarmed;
            return Ok(());
        };
        if self.state == State::Pending {
            // The request may still be waiting: cancel it. A cancel that arrives after the grant
            // finds the connection idle and is ignored, or cancels the release below once.
            client.cancel_token().cancel_query(NoTls).await?;
        }
        let release = "SELECT pg_advisory_unlock_all()";
        let result = match client.simple_query(release).await {
            Err(error) if error.code() == Some(&SqlState::QUERY_CANCELED) => {
                client.simple_query(release).await
            }
            result => result,
        };
        result?;
        self.state = State::Disarmed;
        Ok(())
    }

    /// Opens the connection unless it is open.
    async fn connect(&mut self) -> Result<(), BellError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self.pg_config.connect(NoTls).await?;
            let doorbell = Arc::clone(&self.doorbell);
            tokio::spawn(async move {
                // A hub asleep on this connection is no longer: have it wake and read.
                let _ = connection.await;
                doorbell.notify_one();
            });
            // A lock wait may last as long as the hub sleeps.
            client
                .batch_execute("SET lock_timeout = 0; SET statement_timeout = 0")
                .await?;
            self.client = Some(client);
            self.state = State::Disarmed;
        }
        Ok(())
    }
}
