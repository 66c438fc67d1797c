//! Delivering one subscription, on the instance that holds its lock: the consumer's events in id
//! order, a batch at a time, each batch retried until the receiver acknowledges it.
//!
//! Events come from a [`Follower`], like a stream's: from the table after downtime or a lag, then
//! from the hub's live feed, so a subscription that is caught up costs no database reads. Every
//! batch is recorded on the lease connection before it is sent (so an instance taking over after
//! a crash sends that same batch, under the same webhook-id), and the position is stored once the
//! receiver answered 2xx. When the next batch is ready by then, one write does both: under load a
//! batch costs one write; a lone event two.
//!
//! A change through the API ends the delivery, and the supervisor starts it again in the new
//! form. The acknowledgement of a batch the receiver already took is still stored, unless the
//! change asked for a new start (a new position or new types, a new epoch): see
//! [`Lease::delivered`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::client::{Client, Outcome};
use super::signing::Secret;
use crate::backoff::Backoff;
use crate::event::{ConsumerId, EventId, EventRow};
use crate::filter::TypeFilter;
use crate::follower::{Follower, Next, Replayed, Sources};
use crate::metrics::WebhookMetrics;
use crate::selection::{Reader, Selection};
use crate::sse::{Frame, put_compact_json};
use crate::store::StoreError;
use crate::store::subscriptions::{Acknowledged, Attempt, Lease, SubscriptionRow, Version};

/// The most events a batch may hold (the schema's limit on `batch_size`).
pub const MAX_BATCH: i32 = 1000;

/// What every delivery of an instance shares.
pub struct Context {
    pub sources: Sources,
    pub client: Client,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub failing_after: Duration,
}

/// Why a delivery ended.
#[derive(Debug)]
pub enum Ended {
    /// The instance is stopping, or the supervisor stopped it.
    Stopped,
    /// The subscription changed or was deleted through the API: the supervisor looks again.
    Changed,
    /// The receiver answered 410 Gone.
    Disabled,
    /// The subscription's stored form cannot be delivered (a corrupt secret or consumer).
    Broken(String),
    /// A write on the lease connection failed: the lock may be gone with it.
    LeaseLost(StoreError),
}

/// Events gathered for one request: their JSON objects, the range they cover, and how many.
struct Batch {
    /// `{"id":..,"type":..,"payload":..},` for each event, the last comma included.
    events: BytesMut,
    count: i64,
    /// The batch covers the consumer's events in `(position, upto]`.
    upto: EventId,
    /// The subscription's epoch when the batch was formed.
    epoch: i32,
}

impl Batch {
    fn new(epoch: i32) -> Batch {
        Batch {
            events: BytesMut::new(),
            count: 0,
            upto: EventId(0),
            epoch,
        }
    }

    /// The batch's webhook-id: the same for every attempt, and for an instance that takes the
    /// batch over; a new one after a new position or new types (a replay is new messages).
    /// Within an epoch a batch's end identifies it: batches only move forward.
    fn message_id(&self, subscription: i64) -> String {
        format!("evp_{subscription}_{}_{}", self.epoch, self.upto)
    }

    fn push(&mut self, id: EventId, event_type: &str, payload: &str) {
        self.events.reserve(40 + event_type.len() + payload.len());
        self.events.put_slice(b"{\"id\":");
        self.events
            .put_slice(itoa::Buffer::new().format(id.0).as_bytes());
        self.events.put_slice(b",\"type\":");
        let quoted = serde_json::Value::from(event_type).to_string();
        self.events.put_slice(quoted.as_bytes());
        self.events.put_slice(b",\"payload\":");
        put_compact_json(&mut self.events, payload);
        self.events.put_slice(b"},");
        self.count += 1;
        self.upto = self.upto.max(id);
    }

    fn push_rows(&mut self, rows: &[EventRow]) {
        for row in rows {
            self.push(row.id, &row.event_type, &row.payload);
        }
    }

    fn push_page(&mut self, page: &Replayed) {
        match page {
            Replayed::Table(rows) => self.push_rows(rows),
            Replayed::Recent(frames) => frames.iter().for_each(|frame| self.push_frame(frame)),
        }
    }

    fn push_frame(&mut self, frame: &Frame) {
        if let Some((id, event_type, payload)) = frame.parts() {
            self.push(id, event_type, payload);
        }
    }

    /// The request body: `{"subscription":..,"consumer":..,"events":[...]}`.
    fn body(&self, subscription: i64, consumer: &ConsumerId) -> Bytes {
        let events = self.events.strip_suffix(b",").unwrap_or(&self.events);
        let mut body = BytesMut::with_capacity(64 + consumer.as_str().len() + events.len());
        body.put_slice(b"{\"subscription\":");
        body.put_slice(itoa::Buffer::new().format(subscription).as_bytes());
        body.put_slice(b",\"consumer\":");
        body.put_slice(
            serde_json::Value::from(consumer.as_str())
                .to_string()
                .as_bytes(),
        );
        body.put_slice(b",\"events\":[");
        body.put_slice(events);
        body.put_slice(b"]}");
        body.freeze()
    }
}

/// One subscription being delivered.
struct Delivery<'a> {
    context: &'a Context,
    lease: &'a Lease,
    stop: &'a CancellationToken,
    id: i64,
    /// The generation and epoch read with the row: once the API changed the subscription, no
    /// write starts or retries anything, and once it asked for a new start, no acknowledgement
    /// is stored.
    version: Version,
    consumer: ConsumerId,
    /// As stored, for the logs.
    url: String,
    /// Where to send, checked once: the reason it cannot be used is each attempt's failure.
    target: Result<reqwest::Url, String>,
    secret: Secret,
    types: Option<TypeFilter>,
    batch_size: i32,
    /// The last event id the receiver acknowledged.
    position: EventId,
    failing_since: Option<SystemTime>,
    /// Whether the "failing" state change was logged.
    marked_failing: bool,
    /// The status of the last 2xx, stored with the position.
    last_status: u16,
    metrics: WebhookMetrics,
}

/// Delivers `subscription` until it is stopped, changed, disabled, or the lease is lost.
pub async fn run(
    context: Arc<Context>,
    lease: Arc<Lease>,
    subscription: SubscriptionRow,
    stop: CancellationToken,
) -> Ended {
    let id = subscription.id;
    let broken = |what: String| {
        tracing::error!(subscription = id, "cannot deliver: {what}");
        Ended::Broken(what)
    };
    let secret = match Secret::parse(&subscription.secret) {
        Ok(secret) => secret,
        Err(error) => return broken(format!("stored secret: {error}")),
    };
    let consumer = match ConsumerId::parse(subscription.consumer.as_bytes()) {
        Ok(consumer) => consumer,
        Err(error) => return broken(format!("stored consumer: {error}")),
    };
    let types = match &subscription.types {
        Some(patterns) => match TypeFilter::from_patterns(patterns.iter().map(String::as_str)) {
            Ok(types) => Some(types),
            Err(error) => return broken(format!("stored types: {error}")),
        },
        None => None,
    };
    let mut delivery = Delivery {
        context: &context,
        lease: &lease,
        stop: &stop,
        id,
        version: Version {
            generation: subscription.generation,
            epoch: subscription.epoch,
        },
        consumer,
        target: context
            .client
            .check_url(&subscription.url)
            .map_err(|error| error.to_string()),
        url: subscription.url,
        secret,
        types,
        batch_size: subscription.batch_size.clamp(1, MAX_BATCH),
        position: subscription.position,
        failing_since: subscription.failing_since,
        marked_failing: false,
        last_status: 200,
        metrics: WebhookMetrics::new(id),
    };
    tracing::info!(
        subscription = id,
        consumer = %delivery.consumer,
        after = %delivery.position,
        "delivering webhook subscription"
    );
    let ended = delivery.follow(subscription.pending).await;
    tracing::info!(
        subscription = id,
        ?ended,
        "stopped delivering webhook subscription"
    );
    ended
}

/// A step that either goes on or ends the delivery.
type Step<T> = Result<T, Ended>;

impl Delivery<'_> {
    async fn follow(&mut self, pending: Option<(EventId, i32)>) -> Ended {
        match self.follow_inner(pending).await {
            Ok(never) => match never {},
            Err(ended) => ended,
        }
    }

    async fn follow_inner(
        &mut self,
        pending: Option<(EventId, i32)>,
    ) -> Step<std::convert::Infallible> {
        // The batch in flight when the last deliverer stopped goes first, exactly as it was and
        // under the same webhook-id. Its events can only be gone if someone deleted them by
        // hand: then there is nothing to send, and the follower reads past them.
        let mut ready = None;
        let mut after = self.position;
        if let Some((upto, epoch)) = pending.filter(|(upto, _)| *upto > self.position) {
            let rows = self.read_pending(upto).await?;
            if !rows.is_empty() {
                // Its own epoch: a batch recorded before epochs were stored carries the
                // generation it was formed in, and keeps its webhook-id.
                let mut batch = Batch::new(epoch);
                batch.push_rows(&rows);
                batch.upto = upto;
                ready = Some(batch);
                after = upto;
            }
        }
        let mut follower = self.start_following(after).await?;
        let mut reads = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut counted_at: Option<tokio::time::Instant> = None;
        loop {
            // With a backlog the next batch is always ready: nothing below waits, so the stop
            // is looked at here.
            if self.stop.is_cancelled() {
                return Err(Ended::Stopped);
            }
            let batch = match ready.take() {
                Some(batch) => batch,
                None => {
                    let next = tokio::select! {
                        next = follower.next() => next,
                        _ = self.stop.cancelled() => return Err(Ended::Stopped),
                    };
                    let mut batch = Batch::new(self.version.epoch);
                    match next {
                        Next::Page(page) => batch.push_page(&page),
                        Next::Live(frame) => {
                            batch.push_frame(&frame);
                            self.drain_live(&mut follower, &mut batch);
                        }
                        Next::Failed(error) => {
                            let delay = reads.next_delay();
                            tracing::warn!(subscription = self.id, %error, ?delay, "reading events failed; retrying");
                            self.pause(delay).await?;
                            continue;
                        }
                        Next::Closed => return Err(Ended::Stopped),
                    }
                    reads.reset();
                    batch.upto = batch.upto.max(follower.position().cursor());
                    // Recorded before it is sent, so that whoever sends it again uses the same
                    // webhook-id.
                    let recorded = self.lease.begin_batch(self.id, self.version, batch.upto);
                    if !self.write(recorded).await? {
                        return Err(Ended::Changed);
                    }
                    batch
                }
            };
            self.send(&batch).await?;
            // The next batch, if it is there already, is recorded by the same write that stores
            // this one's position: under load a batch costs one write, not two.
            ready = self.ready_batch(&mut follower).await;
            self.acknowledged(&batch, ready.as_ref()).await?;
            if ready.is_none() && follower.position().is_live() {
                self.metrics.behind.set(0.0);
            } else if counted_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(5)) {
                counted_at = Some(tokio::time::Instant::now());
                self.count_behind().await;
            }
        }
    }

    async fn start_following(&self, after: EventId) -> Step<Follower> {
        let sources = Sources {
            page_size: i64::from(self.batch_size),
            ..self.context.sources.clone()
        };
        loop {
            let reader = Reader::consumer(self.consumer.clone(), self.types.clone());
            let started =
                Follower::start(&sources, reader, Some(after), Duration::from_secs(30)).await;
            match started {
                Ok(follower) => return Ok(follower),
                Err(error) => {
                    tracing::warn!(subscription = self.id, %error, "cannot follow the consumer yet");
                    self.pause(Duration::from_secs(1)).await?;
                }
            }
        }
    }

    /// Adds the live frames already queued to `batch`, up to the batch size.
    fn drain_live(&self, follower: &mut Follower, batch: &mut Batch) {
        while batch.count < i64::from(self.batch_size) {
            match follower.try_next_live() {
                Some(frame) => batch.push_frame(&frame),
                None => break,
            }
        }
    }

    /// The next batch if it can be had without waiting: the next replay page, or the live
    /// frames already queued. A page that fails to read is left to the next `Follower::next`.
    async fn ready_batch(&self, follower: &mut Follower) -> Option<Batch> {
        let mut batch = Batch::new(self.version.epoch);
        if let Some(Ok(page)) = follower.next_page().await {
            batch.push_page(&page);
        } else {
            self.drain_live(follower, &mut batch);
        }
        batch.upto = batch.upto.max(follower.position().cursor());
        (batch.count > 0).then_some(batch)
    }

    /// The pending batch's events, read again from the table (retried until it works).
    async fn read_pending(&self, upto: EventId) -> Step<Vec<EventRow>> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let read = self
                .context
                .sources
                .store
                .read_selection(
                    &Selection::consumer(self.consumer.clone()),
                    (self.position, upto),
                    i64::from(MAX_BATCH),
                    self.types.as_ref(),
                )
                .await;
            match read {
                Ok(page) => return Ok(page.rows),
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(subscription = self.id, %error, ?delay, "reading the pending batch failed; retrying");
                    self.pause(delay).await?;
                }
            }
        }
    }

    /// Sends `batch` until the receiver acknowledges it (its position is stored by the caller).
    async fn send(&mut self, batch: &Batch) -> Step<()> {
        let body = batch.body(self.id, &self.consumer);
        let message_id = batch.message_id(self.id);
        let mut backoff = Backoff::new(self.context.retry_min, self.context.retry_max);
        loop {
            // A lease found closed may already have let the lock go to another instance: this
            // one sends nothing more (a retry comes after a pause without a write).
            if self.lease.is_closed() {
                return Err(Ended::LeaseLost(StoreError::Unexpected(
                    "the lease connection closed".into(),
                )));
            }
            let outcome = match &self.target {
                Ok(url) => {
                    let timestamp = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs() as i64;
                    let headers = [
                        ("webhook-id", message_id.clone()),
                        ("webhook-timestamp", timestamp.to_string()),
                        (
                            "webhook-signature",
                            self.secret.sign(&message_id, timestamp, &body),
                        ),
                    ];
                    // Not cut short by a stop: a receiver that acknowledges the batch gets its
                    // position stored, so that stopping an instance never sends a batch twice.
                    // A stop waits for at most one `--webhook-timeout`.
                    self.context.client.post(url, &headers, body.clone()).await
                }
                Err(reason) => Outcome::Failed {
                    reason: reason.clone(),
                },
            };
            match outcome {
                Outcome::Delivered { status } => {
                    self.last_status = status;
                    return Ok(());
                }
                Outcome::Gone => {
                    let attempt = Attempt {
                        outcome: "HTTP 410",
                        error: Some("the receiver answered 410 Gone: disabled until resumed"),
                    };
                    self.metrics.failed_attempts.increment(1);
                    if !self
                        .write(
                            self.lease
                                .disable(self.id, self.version.generation, &attempt),
                        )
                        .await?
                    {
                        return Err(Ended::Changed);
                    }
                    tracing::warn!(subscription = self.id, url = %self.url, "webhook receiver answered 410 Gone: subscription disabled");
                    return Err(Ended::Disabled);
                }
                Outcome::Refused {
                    status,
                    retry_after,
                    reason,
                } => {
                    // The receiver's wish, but never sooner than the first retry: a
                    // `Retry-After: 0` on every answer would otherwise spin.
                    let delay = retry_after
                        .map(|delay| delay.max(self.context.retry_min))
                        .unwrap_or_else(|| backoff.next_jittered());
                    self.failed(&format!("HTTP {status}"), &reason, delay)
                        .await?;
                }
                Outcome::Failed { reason } => {
                    let delay = backoff.next_jittered();
                    self.failed("no answer", &reason, delay).await?;
                }
            }
        }
    }

    /// Stores the position past `batch`, which the receiver acknowledged, and records `next`
    /// as the batch in flight if there is one. A change through the API since ends the delivery
    /// here, with the position stored unless the change was a new start.
    async fn acknowledged(&mut self, batch: &Batch, next: Option<&Batch>) -> Step<()> {
        let outcome = format!("HTTP {}", self.last_status);
        let attempt = Attempt {
            outcome: &outcome,
            error: None,
        };
        let stored = self.lease.delivered(
            self.id,
            self.version,
            (self.position, batch.upto),
            batch.count,
            next.map(|next| next.upto),
            &attempt,
        );
        let changed = match self.write(stored).await? {
            Acknowledged::Stored => false,
            Acknowledged::StoredThenChanged => true,
            Acknowledged::Refused => return Err(Ended::Changed),
        };
        self.position = batch.upto;
        self.metrics.delivered.increment(batch.count as u64);
        self.metrics.last_success.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        if self.failing_since.take().is_some() {
            tracing::info!(
                subscription = self.id,
                "webhook receiver recovered: delivering again"
            );
            self.marked_failing = false;
        }
        if changed {
            // `next`, formed before the change, was not recorded and is not sent.
            return Err(Ended::Changed);
        }
        Ok(())
    }

    /// Records a failed attempt, logs a state change, and waits `delay` before the next one.
    async fn failed(&mut self, outcome: &str, reason: &str, delay: Duration) -> Step<()> {
        self.metrics.failed_attempts.increment(1);
        let attempt = Attempt {
            outcome,
            error: Some(reason),
        };
        let retry_at = SystemTime::now() + delay;
        let Some(since) = self
            .write(
                self.lease
                    .failed(self.id, self.version.generation, &attempt, retry_at),
            )
            .await?
        else {
            return Err(Ended::Changed);
        };
        if self.failing_since.replace(since).is_none() {
            tracing::warn!(subscription = self.id, url = %self.url, reason, ?delay, "webhook delivery failed; retrying");
        }
        let failing_for = since.elapsed().unwrap_or_default();
        if !self.marked_failing && failing_for >= self.context.failing_after {
            self.marked_failing = true;
            tracing::error!(
                subscription = self.id,
                url = %self.url,
                reason,
                failing_for = %humantime::format_duration(Duration::from_secs(failing_for.as_secs())),
                "webhook subscription is failing: its events are kept until it recovers"
            );
        }
        self.pause(delay).await
    }

    /// Counts the events still to deliver, for the metric (bounded: a receiver far behind reads
    /// as a million).
    async fn count_behind(&self) {
        let count = self
            .context
            .sources
            .store
            .count_after(
                self.consumer.as_str(),
                self.position,
                self.types.as_ref(),
                1_000_000,
            )
            .await;
        if let Ok(count) = count {
            self.metrics.behind.set(count as f64);
        }
    }

    async fn pause(&self, delay: Duration) -> Step<()> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.stop.cancelled() => Err(Ended::Stopped),
        }
    }

    /// A write on the lease: a failure ends the delivery (the lock may be gone with the
    /// connection), and so does a stop, which the write does not wait for.
    async fn write<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Step<T> {
        write.await.map_err(Ended::LeaseLost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_body_is_json_with_its_events_in_order() {
        let mut batch = Batch::new(3);
        batch.push_rows(&[EventRow::to_consumer(
            EventId(7),
            "odd \"type\"\nwith a break",
            Some("toto"),
            r#"{"a": [1, 2], "s": "x y"}"#,
        )]);
        batch.push_frame(&Frame::render(EventId(9), "ping", "{}"));
        let body = batch.body(12, &ConsumerId::parse(b"toto").unwrap());
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "subscription": 12,
                "consumer": "toto",
                "events": [
                    {"id": 7, "type": "odd \"type\"\nwith a break", "payload": {"a": [1, 2], "s": "x y"}},
                    {"id": 9, "type": "ping", "payload": {}},
                ],
            })
        );
        assert_eq!((batch.count, batch.upto), (2, EventId(9)));
        assert_eq!(batch.message_id(12), "evp_12_3_9");
        // Compact: the payload's whitespace between tokens is gone, inside strings it stays.
        assert!(
            std::str::from_utf8(&body)
                .unwrap()
                .contains(r#"{"a":[1,2],"s":"x y"}"#)
        );
    }

    #[test]
    fn an_empty_batch_body_is_still_json() {
        let body = Batch::new(0).body(1, &ConsumerId::parse(b"toto").unwrap());
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["events"], serde_json::json!([]));
    }
}
