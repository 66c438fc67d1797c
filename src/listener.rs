//! The notification listener: the one dedicated connection that runs `LISTEN new_events`.
//!
//! A notification carries no data; it only rings the hub's doorbell. A pooled connection cannot
//! receive notifications (they arrive through `Connection::poll_message`), hence a connection of
//! its own. When it drops (network, `pg_terminate_backend`, server restart) the listener
//! reconnects with backoff and rings the doorbell after every (re)connect, so the hub reads
//! whatever committed while nobody was listening: a lost connection delays events, never loses
//! them.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

pub const CHANNEL: &str = "new_events";
/// The listener's `application_name`, so operators (and tests) can find its backend.
pub const APPLICATION_NAME: &str = "event-piper-listener";

const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// An idle connection is probed this often; one that does not answer in time is replaced. TCP
/// keepalives alone can take a long time to notice a peer that vanished.
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("the server did not answer a ping within {PING_TIMEOUT:?}")]
    Unresponsive,
}

/// What the listener counts.
pub struct Counters {
    pub reconnects: metrics::Counter,
    pub rings: metrics::Counter,
}

/// Runs until `shutdown` is cancelled. `listening` reports whether LISTEN is in effect.
pub async fn run(
    mut pg_config: tokio_postgres::Config,
    doorbell: Arc<Notify>,
    listening: watch::Sender<bool>,
    counters: Counters,
    shutdown: CancellationToken,
) {
    pg_config.application_name(APPLICATION_NAME);
    crate::store::harden(&mut pg_config);
    let mut backoff = BACKOFF;
    loop {
        let result = tokio::select! {
            result = listen(&pg_config, &doorbell, &listening, &counters.rings, &mut backoff) => result,
            _ = shutdown.cancelled() => return,
        };
        listening.send_replace(false);
        counters.reconnects.increment(1);
        match result {
            Ok(()) => tracing::warn!("notification connection closed by the server; reconnecting"),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff.peek(), "notification connection lost")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Connects, listens and forwards notifications until the connection ends.
async fn listen(
    pg_config: &tokio_postgres::Config,
    doorbell: &Notify,
    listening: &watch::Sender<bool>,
    rings: &metrics::Counter,
    backoff: &mut Backoff,
) -> Result<(), ListenError> {
    let (client, mut connection) = pg_config.connect(NoTls).await?;
    // The connection must be polled for LISTEN to complete, and from then on for notifications.
    let drive = async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    rings.increment(1);
                    doorbell.notify_one();
                }
                Some(Ok(_)) => {} // notices
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            }
        }
    };
    tokio::pin!(drive);
    let listen = format!("LISTEN {CHANNEL}");
    tokio::select! {
        result = client.batch_execute(&listen) => result?,
        result = &mut drive => return Ok(result?),
    }
    tracing::info!("listening for new events");
    listening.send_replace(true);
    backoff.reset();
    // Whatever committed while we were not listening is in the table: have the hub read it.
    doorbell.notify_one();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            result = &mut drive => return Ok(result?),
            _ = ping.tick() => {}
        }
        // The connection must keep being driven for the ping's answer to arrive.
        let probe = tokio::time::timeout(PING_TIMEOUT, client.simple_query(""));
        tokio::select! {
            result = &mut drive => return Ok(result?),
            answer = probe => match answer {
                Ok(answer) => { answer?; }
                Err(_) => return Err(ListenError::Unresponsive),
            },
        }
    }
}
