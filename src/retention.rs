//! Retention: deletes events older than `--retention`, in small batches, in the background.
//!
//! Small batches keep each transaction short, so producers and replays are never blocked for
//! long. Only published events are deleted: an event is never removed before live streams had it.
//! The recent tail ([`crate::recent`]) forgets them first, so a resume served after the delete
//! reads the table and is told what is gone, as on an instance that never held them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::hub::Published;
use crate::recent::Recent;
use crate::store::{Store, StoreError};

const EVERY: Duration = Duration::from_secs(60);
const BATCH: i64 = 1000;
/// A pause between batches, leaving room for other work on the database.
const BREATHER: Duration = Duration::from_millis(50);

pub async fn run(
    store: Store,
    recent: Arc<Recent>,
    max_age: Duration,
    mut published: watch::Receiver<Published>,
    shutdown: CancellationToken,
) {
    loop {
        // Runs once the hub knows what is published, then every EVERY.
        let upto = tokio::select! {
            ready = published.wait_for(Option::is_some) => ready.ok().and_then(|p| *p),
            _ = shutdown.cancelled() => return,
        };
        let Some(upto) = upto else { return };
        let mut total = 0;
        loop {
            match expire_batch(&store, &recent, max_age, upto).await {
                Ok(deleted) => {
                    total += deleted;
                    if deleted < BATCH || shutdown.is_cancelled() {
                        break;
                    }
                    tokio::time::sleep(BREATHER).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "retention: deleting old events failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, ?max_age, "retention: deleted old events");
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Deletes one batch of old events, after the recent tail has forgotten them. Returns how many.
async fn expire_batch(
    store: &Store,
    recent: &Recent,
    max_age: Duration,
    upto: crate::event::EventId,
) -> Result<i64, StoreError> {
    let Some(last) = store.expiring(max_age, upto, BATCH).await? else {
        return Ok(0);
    };
    recent.forget_upto(last);
    store.expire(last).await
}
