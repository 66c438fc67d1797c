//! Which subscriptions this instance delivers: it claims active subscriptions nobody else holds,
//! up to its fair share (the active subscriptions divided by the instances looking, rounded up),
//! and runs one [`delivery`] per claimed subscription.
//!
//! A subscription belongs to the instance whose lease connection holds its advisory lock, so
//! exactly one instance delivers it at a time, whatever their number. An instance that dies (or
//! loses the connection) loses its locks with it; the others find the subscription free at their
//! next look, every `--webhook-poll`, and go on from its stored position. A change through the API
//! bumps the subscription's generation: the delivery stops at its next write, or at this
//! instance's next look, and the subscription is claimed afresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::delivery::{self, Context, Ended};
use crate::backoff::Backoff;
use crate::store::StoreError;
use crate::store::subscriptions::Lease;

/// A delivery this instance runs.
struct Running {
    generation: i32,
    stop: CancellationToken,
}

/// Runs until `shutdown`. `changed` is notified by this instance's API after a change, so that
/// it looks at once instead of at its next poll.
pub async fn run(
    pg_config: tokio_postgres::Config,
    context: Arc<Context>,
    poll: Duration,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let lease = tokio::select! {
            lease = Lease::connect(pg_config.clone()) => lease,
            _ = shutdown.cancelled() => return,
        };
        let error = match lease {
            Ok(lease) => {
                backoff.reset();
                supervise(Arc::new(lease), &context, poll, &changed, &shutdown).await
            }
            Err(error) => error,
        };
        if shutdown.is_cancelled() {
            return;
        }
        let delay = backoff.next_delay();
        tracing::warn!(%error, ?delay, "webhook lease connection failed; its subscriptions are released, reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Claims and delivers on one lease connection until it fails (returned) or `shutdown`. Every
/// delivery has ended when it returns, so none writes through a lease that is gone.
async fn supervise(
    lease: Arc<Lease>,
    context: &Arc<Context>,
    poll: Duration,
    changed: &Notify,
    shutdown: &CancellationToken,
) -> StoreError {
    let mut running: HashMap<i64, Running> = HashMap::new();
    let mut deliveries: JoinSet<(i64, Ended)> = JoinSet::new();
    let error = loop {
        if let Err(error) = look(&lease, context, &mut running, &mut deliveries).await {
            break error;
        }
        // Until the next look: deliveries that end are released at once.
        let deadline = tokio::time::sleep(poll);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = changed.notified() => break,
                Some(joined) = deliveries.join_next() => {
                    let Ok((id, ended)) = joined else {
                        stop_all(&mut running, &mut deliveries).await;
                        return panicked();
                    };
                    let again = matches!(ended, Ended::Changed);
                    if let Err(error) = ended_delivery(&lease, &mut running, id, ended).await {
                        stop_all(&mut running, &mut deliveries).await;
                        return error;
                    }
                    // A changed subscription is claimed again (in its new form) at once.
                    if again {
                        break;
                    }
                }
                _ = shutdown.cancelled() => {
                    stop_all(&mut running, &mut deliveries).await;
                    return StoreError::Unexpected("stopping".into());
                }
            }
        }
    };
    stop_all(&mut running, &mut deliveries).await;
    error
}

/// One look: stops the deliveries whose subscription changed, was paused, disabled or deleted,
/// then claims the active subscriptions nobody holds.
async fn look(
    lease: &Arc<Lease>,
    context: &Arc<Context>,
    running: &mut HashMap<i64, Running>,
    deliveries: &mut JoinSet<(i64, Ended)>,
) -> Result<(), StoreError> {
    let (states, instances) = lease.states().await?;
    let states: HashMap<i64, (String, i32)> = states
        .into_iter()
        .map(|(id, state, generation)| (id, (state, generation)))
        .collect();
    let mut stale: Vec<i64> = running
        .iter()
        .filter(|(id, delivery)| {
            states.get(id).is_none_or(|(state, generation)| {
                state != "active" || *generation != delivery.generation
            })
        })
        .map(|(id, _)| *id)
        .collect();
    // Each instance delivers its fair share of the active subscriptions: an instance that
    // holds more (another one joined) hands its highest ones over, to be claimed by the others
    // at their next look.
    let active = states
        .values()
        .filter(|(state, _)| state == "active")
        .count();
    let share = active.div_ceil(instances);
    let mut kept: Vec<i64> = running
        .keys()
        .filter(|id| !stale.contains(id))
        .copied()
        .collect();
    kept.sort_unstable();
    if kept.len() > share {
        let handed = &kept[share..];
        tracing::info!(
            subscriptions = ?handed,
            instances,
            "handing webhook subscriptions over to share them between instances"
        );
        stale.extend_from_slice(handed);
    }
    for id in &stale {
        if let Some(delivery) = running.get(id) {
            delivery.stop.cancel();
        }
    }
    // The stopped deliveries end (and are released) before their subscriptions are claimed
    // again, so that two deliveries of one subscription never overlap here either.
    let mut stopping = stale.len();
    while stopping > 0 {
        let Some(joined) = deliveries.join_next().await else {
            break;
        };
        let Ok((id, ended)) = joined else {
            return Err(panicked());
        };
        if stale.contains(&id) {
            stopping -= 1;
        }
        ended_delivery(lease, running, id, ended).await?;
    }
    let held: Vec<i64> = running.keys().copied().collect();
    let room = share.saturating_sub(held.len());
    if room == 0 {
        return Ok(());
    }
    for subscription in lease.claim(&held, room).await? {
        let id = subscription.id;
        let stop = CancellationToken::new();
        running.insert(
            id,
            Running {
                generation: subscription.generation,
                stop: stop.clone(),
            },
        );
        let context = Arc::clone(context);
        let lease = Arc::clone(lease);
        deliveries
            .spawn(async move { (id, delivery::run(context, lease, subscription, stop).await) });
    }
    Ok(())
}

/// A delivery ended: its subscription is released for the next claim. A lost lease is returned:
/// every other delivery must stop too.
async fn ended_delivery(
    lease: &Lease,
    running: &mut HashMap<i64, Running>,
    id: i64,
    ended: Ended,
) -> Result<(), StoreError> {
    running.remove(&id);
    match ended {
        Ended::LeaseLost(error) => Err(error),
        _ => lease.release(id).await,
    }
}

/// A delivery that panicked cannot say which subscription it held: every lock is let go, with
/// the lease, and claimed afresh.
fn panicked() -> StoreError {
    StoreError::Unexpected("a webhook delivery panicked".into())
}

/// Stops every delivery and waits for them: the lease they write through is about to go.
async fn stop_all(running: &mut HashMap<i64, Running>, deliveries: &mut JoinSet<(i64, Ended)>) {
    for (_, delivery) in running.drain() {
        delivery.stop.cancel();
    }
    while deliveries.join_next().await.is_some() {}
}
