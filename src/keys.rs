//! The keys the service indexes for producers: topics and Mercure publishers' ids.
//!
//! A replay of a topic finds the events that carry it, and a Mercure resume finds a publisher's
//! id, in two tables of the service's own (`postgresql/schema.sql`). Indexing those keys on
//! `events` would cost every producer's insert more partial indexes, also for the events that
//! have neither, which are nearly all of them (BENCHMARKS.md, "The table's own cost"). So the hub
//! writes them instead, for every batch it reads, before it publishes the batch: every event up
//! to a published id has its keys in, and a lookup bounded by a published id (every replay is)
//! finds all of them.
//!
//! Producers can write while no instance runs. `event_piper_keyed` records how far every event's
//! keys are in; a hub that starts adds the keys of the events after that before it publishes
//! anything ([`catch_up`]), and moves the mark on now and then while it runs.

use crate::event::{EventId, EventRow};
use crate::store::{Result, Store};

/// Ids a scan for missing keys covers per statement, at start: each statement stays short
/// however long no instance ran.
const SCAN_IDS: i64 = 100_000;

/// The keys of some events, as the columns of the two tables they go to.
#[derive(Debug, Default, PartialEq)]
pub struct Keys {
    pub topics: Vec<String>,
    pub topic_events: Vec<i64>,
    pub update_ids: Vec<String>,
    pub update_id_events: Vec<i64>,
}

impl Keys {
    /// The keys of `rows`.
    pub fn of(rows: &[EventRow]) -> Keys {
        let mut keys = Keys::default();
        for row in rows {
            keys.add(row.id, row.topics.as_deref(), row.update_id.as_deref());
        }
        keys
    }

    /// Adds one event's keys: its topics, and its publisher's id.
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

    pub fn is_empty(&self) -> bool {
        self.topic_events.is_empty() && self.update_id_events.is_empty()
    }
}

/// Adds the keys of every event after the mark up to `upto`, which must be final (no lower id
/// still in flight), and moves the mark there. Returns whether it wrote any.
pub async fn catch_up(store: &Store, upto: EventId) -> Result<bool> {
    let mut from = store.keyed_upto().await?;
    let mut wrote = false;
    while from < upto {
        let to = EventId(from.0.saturating_add(SCAN_IDS).min(upto.0));
        let keys = store.read_keys((from, to)).await?;
        if !keys.is_empty() {
            store.write_keys(&keys).await?;
            wrote = true;
        }
        store.mark_keyed(to).await?;
        from = to;
    }
    Ok(wrote)
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
}
