//! The keys the service indexes for producers: topics and Mercure publishers' ids.
//!
//! A replay of a topic finds the events that carry it, and a Mercure resume finds a publisher's
//! id, in two tables of the service's own (`postgresql/schema.sql`). Indexing those keys on
//! `events` would cost every producer's insert more partial indexes, also for the events that
//! have neither, which are nearly all of them (BENCHMARKS.md, "The topic index leaves
//! `events`"). So the hubs write them instead.
//!
//! `event_piper_keyed.upto` is the mark: every event up to it has its keys in. A hub writes the
//! keys of what it published every 100 ms or so, and moves the mark to its cursor in the same
//! statement; a replay reads the keys up to the mark, and scans the few events past it
//! ([`Store::read_selection`]), both in one snapshot. Publishing never waits for a write of
//! keys, and a write that fails leaves only more to scan. One lost with the mark, in a crash of
//! a database with `synchronous_commit` off, is noticed by the next: a write moves the mark
//! only from where its writer left it, and the writer then writes the keys from the mark on
//! again, from the table.
//!
//! Topics are written as stretches: one row per topic and write, holding the topic's events in
//! (the mark the write found, the write's end]. The mark's row lock makes a write wait for the
//! one before it, whichever instance made it, so stretches never overlap, and a write that finds
//! the mark past its end writes nothing: another instance keyed those events. A hub writing
//! 3,000 events on 8 topics writes 8 rows, where a row per event cost the database more than the
//! producers saved (BENCHMARKS.md). Every stretch ends at a mark, so the events of any topic up
//! to a mark are in its stretches that end at or below that mark, which is how a replay bounds
//! what it reads.
//!
//! Producers can write while no instance runs. A hub that starts adds the keys of the events
//! after the mark before it publishes anything ([`catch_up`]), so that the scan stays short.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::event::{EventId, EventRow};
use crate::store::{Result, Store, StoreError};

/// Ids a scan for missing keys covers per statement, at start: each statement stays short
/// however long no instance ran.
const SCAN_IDS: i64 = 100_000;

/// Ids a stretch written at start covers at most, and keys a hub lets wait before it writes
/// them: a replay never unpacks a long list to read a page of it.
const STRETCH_IDS: i64 = 1_000;

/// How often a hub's writer writes the keys of what it published and moves the mark: a replay
/// scans the events past the mark, about this much of them.
const KEYS_EVERY: Duration = Duration::from_millis(100);

/// The keys of some events, as the columns of the two tables they go to, in event order.
#[derive(Debug, Default, PartialEq)]
pub struct Keys {
    pub topics: Vec<String>,
    pub topic_events: Vec<i64>,
    pub update_ids: Vec<String>,
    pub update_id_events: Vec<i64>,
}

impl Keys {
    /// The keys of `rows`, which are in id order.
    pub fn of(rows: &[EventRow]) -> Keys {
        let mut keys = Keys::default();
        for row in rows {
            keys.add(row.id, row.topics.as_deref(), row.update_id.as_deref());
        }
        keys
    }

    /// Adds one event's keys (after those of lower ids): its topics, and its publisher's id.
    pub fn add(&mut self, id: EventId, topics: Option<&[String]>, update_id: Option<&str>) {
        for topic in topics.unwrap_or_default() {
            self.topics.push(topic.clone());
            self.topic_events.push(id.0);
        }
        if let Some(update_id) = update_id {
            self.update_ids.push(update_id.to_owned());
            self.update_id_events.push(id.0);
        }
    }

    /// Adds `later`, the keys of higher ids.
    fn append(&mut self, mut later: Keys) {
        self.topics.append(&mut later.topics);
        self.topic_events.append(&mut later.topic_events);
        self.update_ids.append(&mut later.update_ids);
        self.update_id_events.append(&mut later.update_id_events);
    }

    pub fn is_empty(&self) -> bool {
        self.topic_events.is_empty() && self.update_id_events.is_empty()
    }

    /// The keys of the events in `(after, upto]`.
    fn within(&self, after: EventId, upto: EventId) -> Keys {
        let range = |events: &[i64]| {
            events.partition_point(|&id| id <= after.0)..events.partition_point(|&id| id <= upto.0)
        };
        let (topics, update_ids) = (range(&self.topic_events), range(&self.update_id_events));
        Keys {
            topics: self.topics[topics.clone()].to_vec(),
            topic_events: self.topic_events[topics].to_vec(),
            update_ids: self.update_ids[update_ids.clone()].to_vec(),
            update_id_events: self.update_id_events[update_ids].to_vec(),
        }
    }
}

/// Writes the keys of what a hub publishes, on a task of its own, so that publishing never waits
/// for a write (a commit, with its WAL flush). Ends when the hub drops it, after a last write.
pub struct Writer {
    published: mpsc::UnboundedSender<(Keys, EventId)>,
}

impl Writer {
    /// Starts the writer of a hub that published up to `start`, whose keys are in.
    pub fn spawn(store: Store, start: EventId) -> Writer {
        let (published, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write(store, receiver, start));
        Writer { published }
    }

    /// `rows` were published, up to `upto`.
    pub fn published(&self, rows: &[EventRow], upto: EventId) {
        // The task ends only when this sender is dropped.
        let _ = self.published.send((Keys::of(rows), upto));
    }
}

/// The writer's task: every [`KEYS_EVERY`], or once [`STRETCH_IDS`] topics wait, writes what
/// was published since the last write and moves the mark there. A failed write is retried with
/// what came since, at the next tick.
async fn write(
    store: Store,
    mut published: mpsc::UnboundedReceiver<(Keys, EventId)>,
    mut keyed: EventId,
) {
    let mut waiting = Keys::default();
    let mut upto = keyed;
    let mut tick = tokio::time::interval(KEYS_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let open = tokio::select! {
            batch = published.recv() => match batch {
                Some((keys, to)) => {
                    waiting.append(keys);
                    upto = to;
                    if waiting.topic_events.len() < STRETCH_IDS as usize {
                        continue;
                    }
                    true
                }
                None => false,
            },
            _ = tick.tick() => true,
        };
        if upto > keyed {
            match written(&store, &waiting, (keyed, upto)).await {
                Ok(()) => {
                    keyed = upto;
                    waiting = Keys::default();
                }
                Err(error) => tracing::warn!(%error, "cannot write the keys of published events"),
            }
        }
        if !open {
            return;
        }
    }
}

/// Writes `keys`, those of the events in `(after, upto]`. Should the mark be below `after` (a
/// write of this instance was lost with the mark, in a crash of the database with
/// `synchronous_commit` off), the keys from the mark on are read from the table and written
/// again instead.
async fn written(store: &Store, keys: &Keys, range: (EventId, EventId)) -> Result<()> {
    if !store.write_keys(keys, range).await? {
        tracing::warn!(
            written_upto = %range.0,
            "the keys this instance wrote are not all there; writing them again from the table"
        );
        catch_up(store, range.1).await?;
    }
    Ok(())
}

/// Adds the keys of every event after the mark up to `upto`, which must be final (no lower id
/// still in flight), and moves the mark there. Returns whether it wrote any.
pub async fn catch_up(store: &Store, upto: EventId) -> Result<bool> {
    // Where the mark is: each write starts there, and moves it.
    let mut mark = store.keyed_upto().await?;
    let mut wrote = false;
    while mark < upto {
        let to = EventId(mark.0.saturating_add(SCAN_IDS).min(upto.0));
        let keys = store.read_keys((mark, to)).await?;
        let mut stretch = mark;
        while stretch < to {
            let end = EventId(stretch.0.saturating_add(STRETCH_IDS).min(to.0));
            let part = keys.within(stretch, end);
            if !part.is_empty() {
                moved(store.write_keys(&part, (mark, end)).await?)?;
                mark = end;
                wrote = true;
            }
            stretch = end;
        }
        // The mark moves over ids without keys too.
        if mark < to {
            moved(store.write_keys(&Keys::default(), (mark, to)).await?)?;
            mark = to;
        }
    }
    Ok(wrote)
}

/// A write of keys at start finds the mark where it read it, or further.
fn moved(written: bool) -> Result<()> {
    if written {
        Ok(())
    } else {
        Err(StoreError::Unexpected(
            "event_piper_keyed lost its row, or moved back, while keys were written".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, topics: Option<&[&str]>, update_id: Option<&str>) -> EventRow {
        let mut row = EventRow::to_consumer(EventId(id), "t", None, "{}");
        row.topics = topics.map(|topics| topics.iter().map(|t| t.to_string()).collect());
        row.update_id = update_id.map(str::to_owned);
        row
    }

    #[test]
    fn every_topic_and_publishers_id_is_a_key() {
        let rows = [
            row(1, None, None),
            row(2, Some(&["/a"]), None),
            row(3, Some(&["/a", "/b", "/c"]), Some("urn:x")),
            row(4, None, Some("urn:y")),
        ];
        let keys = Keys::of(&rows);
        assert_eq!(keys.topics, ["/a", "/a", "/b", "/c"]);
        assert_eq!(keys.topic_events, [2, 3, 3, 3]);
        assert_eq!(keys.update_ids, ["urn:x", "urn:y"]);
        assert_eq!(keys.update_id_events, [3, 4]);
        assert!(Keys::of(&rows[..1]).is_empty());
    }

    #[test]
    fn keys_within_a_range_of_ids() {
        let rows = [
            row(1, Some(&["/a"]), Some("urn:1")),
            row(2, Some(&["/a", "/b"]), None),
            row(3, None, Some("urn:3")),
            row(4, Some(&["/c"]), None),
        ];
        let part = Keys::of(&rows).within(EventId(1), EventId(3));
        assert_eq!(part.topics, ["/a", "/b"]);
        assert_eq!(part.topic_events, [2, 2]);
        assert_eq!(part.update_ids, ["urn:3"]);
        assert_eq!(part.update_id_events, [3]);
        assert!(Keys::of(&rows).within(EventId(4), EventId(9)).is_empty());
    }
}
