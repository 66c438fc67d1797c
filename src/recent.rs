//! The most recent events, in memory: the tail of what the hub published, kept so that a client
//! resuming a little behind is served without reading the table.
//!
//! When an instance restarts or a load balancer drops its connections, every client reconnects
//! at once with `Last-Event-ID`, most of them a few events behind. Read from the table, that is
//! one query per client at the moment the database is busiest; read from here it is none.
//!
//! The tail covers a range of ids `(floor, upto]`: every event committed with an id in it is
//! here, in id order. The hub appends each batch before it publishes the new cursor, so a follower
//! that read the published id P finds everything up to P here, or knows to read the table. The
//! oldest events make room for new ones once the tail holds its memory budget; the floor moves
//! up with them.
//!
//! Lookups go through indexes by consumer, by topic (each of an event's topics) and of
//! broadcasts, so that serving a consumer ten events behind costs ten lookups, not a scan of
//! everything since; only selections with URL patterns or `*` scan, in bounded steps.

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;

use crate::event::EventId;
use crate::selection::Selection;
use crate::sse::Frame;

/// At most this many events are looked at per scan (selections with patterns): the lock is held
/// briefly, and the caller comes back for the rest.
const SCAN_STEP: usize = 16 * 1024;
/// What an event costs here besides its text: the frame, its metadata, its index entries.
const OVERHEAD_BYTES: usize = 192;

/// The tail of published events; one per instance, shared by the hub (which appends) and every
/// follower (which reads).
pub struct Recent {
    budget: usize,
    tail: RwLock<Tail>,
}

/// Events served from memory, in id order.
#[derive(Debug)]
pub struct Page {
    /// The selection's events in the range read (not yet checked for types and grants).
    pub frames: Vec<Frame>,
    /// How far the read went: every selected event up to it is in `frames`.
    pub covered: EventId,
}

#[derive(Default)]
struct Tail {
    /// Events in id order; the first has sequence number `head`.
    frames: VecDeque<Frame>,
    head: u64,
    /// Every event with an id in `(floor, upto]` is in `frames`.
    floor: EventId,
    upto: EventId,
    bytes: usize,
    /// Sequence numbers of each consumer's events, of each topic's, and of the broadcasts.
    by_consumer: HashMap<String, VecDeque<u64>>,
    by_topic: HashMap<String, VecDeque<u64>>,
    broadcasts: VecDeque<u64>,
}

impl Recent {
    /// A tail holding about `budget` bytes of events; 0 keeps none.
    pub fn new(budget: usize) -> Recent {
        Recent {
            budget,
            tail: RwLock::new(Tail::default()),
        }
    }

    /// Starts (or starts over) at `published`, with `before`: the events just below it, in id
    /// order, with nothing missing between the first of them and `published`.
    pub fn reset(&self, published: EventId, before: Vec<Frame>) {
        let mut tail = self.write();
        let head = tail.head + tail.frames.len() as u64;
        *tail = Tail {
            head,
            floor: before
                .first()
                .map_or(published, |first| EventId(first.id.0 - 1)),
            upto: published,
            ..Tail::default()
        };
        drop(tail);
        self.append(&before, published);
    }

    /// Appends a batch of published events: every event with an id up to `upto` that is not in
    /// `frames` (or already here) never committed.
    pub fn append(&self, frames: &[Frame], upto: EventId) {
        if self.budget == 0 {
            return;
        }
        let mut tail = self.write();
        for frame in frames {
            tail.push(frame.clone());
        }
        tail.upto = tail.upto.max(upto);
        while tail.bytes > self.budget {
            tail.pop();
        }
    }

    /// Forgets every event up to `upto` (retention is about to delete them): a resume from before
    /// it reads the table.
    pub fn forget_upto(&self, upto: EventId) {
        let mut tail = self.write();
        while tail.frames.front().is_some_and(|f| f.id <= upto) {
            tail.pop();
        }
        tail.floor = tail.floor.max(upto.min(tail.upto));
    }

    /// Whether every event after `after` is here.
    pub fn covers(&self, after: EventId) -> bool {
        self.budget > 0 && self.read_tail().floor <= after
    }

    /// The events `selection` selects in `(after, upto]`, at most `limit` of them; None when the
    /// range is not all here (it goes to the table).
    pub fn read(
        &self,
        selection: &Selection,
        (after, upto): (EventId, EventId),
        limit: usize,
    ) -> Option<Page> {
        if self.budget == 0 {
            return None;
        }
        let tail = self.read_tail();
        if after < tail.floor || upto > tail.upto {
            return None;
        }
        let first = tail.head + tail.frames.partition_point(|f| f.id <= after) as u64;
        let end = tail.head + tail.frames.partition_point(|f| f.id <= upto) as u64;
        Some(if selection.scans() {
            tail.scan(selection, first..end, limit, upto)
        } else {
            tail.lookup(selection, first..end, limit, upto)
        })
    }

    /// The memory it may hold, in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// About what an event takes here.
    pub fn cost(frame: &Frame) -> usize {
        let address = frame.address();
        let topics: usize = address
            .topics
            .unwrap_or_default()
            .iter()
            .map(|t| t.len() + 24)
            .sum();
        OVERHEAD_BYTES + frame.bytes.len() + address.subscriber.map_or(0, str::len) + topics
    }

    /// The tail, for writing. A panic elsewhere while it was held leaves nothing half-done that
    /// matters here (every change is a push or a pop), so a poisoned lock is used as it is.
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tail> {
        self.tail.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_tail(&self) -> std::sync::RwLockReadGuard<'_, Tail> {
        self.tail.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Events held now (for metrics and tests).
    pub fn len(&self) -> usize {
        self.tail
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .frames
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Tail {
    fn frame(&self, seq: u64) -> &Frame {
        &self.frames[(seq - self.head) as usize]
    }

    fn push(&mut self, frame: Frame) {
        // The hub appends in id order; what is here already is not appended twice.
        if frame.id <= self.frames.back().map_or(self.floor, |f| f.id) {
            return;
        }
        let seq = self.head + self.frames.len() as u64;
        let address = frame.address();
        if address.is_broadcast() {
            self.broadcasts.push_back(seq);
        }
        if let Some(consumer) = address.subscriber {
            index(&mut self.by_consumer, consumer, seq);
        }
        for topic in address.topics.unwrap_or_default() {
            // An event listing a topic twice is indexed once.
            if self.by_topic.get(topic.as_str()).and_then(|l| l.back()) != Some(&seq) {
                index(&mut self.by_topic, topic, seq);
            }
        }
        self.bytes += Recent::cost(&frame);
        self.frames.push_back(frame);
    }

    /// Drops the oldest event; the floor moves up to it.
    fn pop(&mut self) {
        let Some(frame) = self.frames.pop_front() else {
            return;
        };
        let seq = self.head;
        self.head += 1;
        self.floor = frame.id;
        self.bytes -= Recent::cost(&frame);
        let address = frame.address();
        if self.broadcasts.front() == Some(&seq) {
            self.broadcasts.pop_front();
        }
        if let Some(consumer) = address.subscriber {
            unindex(&mut self.by_consumer, consumer, seq);
        }
        for topic in address.topics.unwrap_or_default() {
            unindex(&mut self.by_topic, topic, seq);
        }
    }

    /// A selection of a consumer and exact topics: its events through the indexes, merged in id
    /// order without duplicates (an event can be the consumer's and a topic's).
    fn lookup(
        &self,
        selection: &Selection,
        range: std::ops::Range<u64>,
        limit: usize,
        upto: EventId,
    ) -> Page {
        let mut lists: Vec<&VecDeque<u64>> = Vec::new();
        if let Some(consumer) = selection.followed_consumer() {
            lists.push(&self.broadcasts);
            lists.extend(self.by_consumer.get(consumer.as_str()));
        }
        lists.extend(
            selection
                .exact_topics()
                .filter_map(|t| self.by_topic.get(t)),
        );
        let mut seqs: Vec<u64> = Vec::new();
        for list in lists {
            let start = list.partition_point(|&seq| seq < range.start);
            seqs.extend(
                list.range(start..)
                    .take_while(|&&seq| seq < range.end)
                    .take(limit),
            );
        }
        seqs.sort_unstable();
        seqs.dedup();
        let full = seqs.len() >= limit;
        seqs.truncate(limit);
        let frames: Vec<Frame> = seqs.iter().map(|&seq| self.frame(seq).clone()).collect();
        let covered = match frames.last() {
            Some(last) if full => last.id,
            _ => upto,
        };
        Page { frames, covered }
    }

    /// A selection with URL patterns or `*`: every event in the range is looked at, a bounded
    /// step at a time.
    fn scan(
        &self,
        selection: &Selection,
        range: std::ops::Range<u64>,
        limit: usize,
        upto: EventId,
    ) -> Page {
        let mut frames = Vec::new();
        for seq in range.clone() {
            let frame = self.frame(seq);
            if frames.len() >= limit || (seq - range.start) as usize >= SCAN_STEP {
                // Stopped before this one: everything selected below it is in `frames`.
                return Page {
                    frames,
                    covered: EventId(frame.id.0 - 1),
                };
            }
            if selection.selects(&frame.address()) {
                frames.push(frame.clone());
            }
        }
        Page {
            frames,
            covered: upto,
        }
    }
}

fn index(map: &mut HashMap<String, VecDeque<u64>>, key: &str, seq: u64) {
    match map.get_mut(key) {
        Some(list) => list.push_back(seq),
        None => {
            map.insert(key.to_owned(), VecDeque::from([seq]));
        }
    }
}

fn unindex(map: &mut HashMap<String, VecDeque<u64>>, key: &str, seq: u64) {
    if let Some(list) = map.get_mut(key) {
        if list.front() == Some(&seq) {
            list.pop_front();
        }
        if list.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ConsumerId, EventRow};
    use crate::topic::Matcher;

    fn event(id: i64, subscriber: Option<&str>, topics: Option<&[&str]>) -> Frame {
        let mut row = EventRow::to_consumer(EventId(id), "t", subscriber, "{}");
        row.topics = topics.map(|t| t.iter().map(|s| s.to_string()).collect());
        Frame::from_row(row)
    }

    fn consumer(name: &str) -> Selection {
        Selection::consumer(ConsumerId::parse(name.as_bytes()).unwrap())
    }

    fn topics(names: &[&str]) -> Selection {
        let matchers = names
            .iter()
            .map(|name| Matcher::Exact((*name).into()))
            .collect();
        Selection::new(None, matchers).unwrap()
    }

    fn ids(page: &Page) -> Vec<i64> {
        page.frames.iter().map(|f| f.id.0).collect()
    }

    fn id(n: i64) -> EventId {
        EventId(n)
    }

    #[test]
    fn a_consumer_gets_its_events_and_the_broadcasts_in_the_range() {
        let recent = Recent::new(1 << 20);
        recent.reset(
            id(10),
            vec![event(9, Some("a"), None), event(10, Some("b"), None)],
        );
        recent.append(
            &[
                event(11, Some("a"), None),
                event(12, None, None),
                event(14, Some("a"), Some(&["x"])),
                event(15, None, Some(&["x"])),
            ],
            id(15),
        );
        let page = recent.read(&consumer("a"), (id(9), id(15)), 100).unwrap();
        assert_eq!(ids(&page), [11, 12, 14]);
        assert_eq!(page.covered, id(15));
        assert_eq!(
            ids(&recent.read(&consumer("a"), (id(8), id(11)), 100).unwrap()),
            [9, 11]
        );
    }

    #[test]
    fn a_range_not_all_here_is_not_served() {
        let recent = Recent::new(1 << 20);
        recent.reset(
            id(10),
            vec![event(9, Some("a"), None), event(10, Some("a"), None)],
        );
        assert!(recent.covers(id(8)));
        assert!(!recent.covers(id(7)));
        assert!(recent.read(&consumer("a"), (id(7), id(10)), 100).is_none());
        // Beyond what the hub appended (a follower read a newer published id).
        assert!(recent.read(&consumer("a"), (id(9), id(11)), 100).is_none());
        // Nothing loaded: only what comes after the start.
        let empty = Recent::new(1 << 20);
        empty.reset(id(10), Vec::new());
        assert!(empty.read(&consumer("a"), (id(9), id(10)), 100).is_none());
        assert_eq!(
            ids(&empty.read(&consumer("a"), (id(10), id(10)), 100).unwrap()),
            [] as [i64; 0]
        );
    }

    #[test]
    fn the_oldest_make_room_and_the_floor_moves_up() {
        let one = Recent::cost(&event(1, Some("a"), Some(&["x"])));
        let recent = Recent::new(one * 3);
        recent.reset(id(0), Vec::new());
        for n in 1..=5 {
            recent.append(&[event(n, Some("a"), Some(&["x"]))], id(n));
        }
        assert_eq!(recent.len(), 3);
        assert!(!recent.covers(id(1)));
        assert!(recent.covers(id(2)));
        assert_eq!(
            ids(&recent.read(&consumer("a"), (id(2), id(5)), 100).unwrap()),
            [3, 4, 5]
        );
        assert_eq!(
            ids(&recent.read(&topics(&["x"]), (id(2), id(5)), 100).unwrap()),
            [3, 4, 5]
        );
    }

    #[test]
    fn a_page_stops_at_the_limit_and_says_how_far_it_covered() {
        let recent = Recent::new(1 << 20);
        recent.reset(id(0), Vec::new());
        let frames: Vec<Frame> = (1..=10).map(|n| event(n, Some("a"), None)).collect();
        recent.append(&frames, id(10));
        let page = recent.read(&consumer("a"), (id(0), id(10)), 4).unwrap();
        assert_eq!(ids(&page), [1, 2, 3, 4]);
        assert_eq!(page.covered, id(4));
    }

    #[test]
    fn an_event_selected_twice_comes_once() {
        let recent = Recent::new(1 << 20);
        recent.reset(id(0), Vec::new());
        recent.append(
            &[
                event(1, Some("a"), Some(&["x", "y", "x"])),
                event(2, None, Some(&["y"])),
                event(3, None, Some(&["z"])),
            ],
            id(3),
        );
        let both = Selection::new(
            Some(ConsumerId::parse(b"a").unwrap()),
            vec![Matcher::Exact("x".into()), Matcher::Exact("y".into())],
        )
        .unwrap();
        assert_eq!(
            ids(&recent.read(&both, (id(0), id(3)), 100).unwrap()),
            [1, 2]
        );
    }

    #[test]
    fn any_topic_scans_in_steps() {
        let recent = Recent::new(usize::MAX);
        recent.reset(id(0), Vec::new());
        let count = SCAN_STEP as i64 + 10;
        let frames: Vec<Frame> = (1..=count)
            .map(|n| event(n, None, (n == count).then_some(&["x"][..])))
            .collect();
        recent.append(&frames, id(count));
        let any = Selection::new(None, vec![Matcher::Any]).unwrap();
        let first = recent.read(&any, (id(0), id(count)), 100).unwrap();
        assert!(first.frames.is_empty());
        assert_eq!(first.covered, id(SCAN_STEP as i64));
        let rest = recent.read(&any, (first.covered, id(count)), 100).unwrap();
        assert_eq!(ids(&rest), [count]);
        assert_eq!(rest.covered, id(count));
    }

    #[test]
    fn what_retention_deletes_is_forgotten_first() {
        let recent = Recent::new(1 << 20);
        let before = (1..=5).map(|n| event(n, Some("a"), None)).collect();
        recent.reset(id(5), before);
        recent.forget_upto(id(3));
        assert_eq!(recent.len(), 2);
        assert!(!recent.covers(id(2)));
        assert_eq!(
            ids(&recent.read(&consumer("a"), (id(3), id(5)), 10).unwrap()),
            [4, 5]
        );
    }

    #[test]
    fn none_is_kept_without_a_budget() {
        let recent = Recent::new(0);
        recent.reset(id(0), Vec::new());
        recent.append(&[event(1, Some("a"), None)], id(1));
        assert!(recent.is_empty());
        assert!(!recent.covers(id(5)));
        assert!(recent.read(&consumer("a"), (id(0), id(1)), 10).is_none());
    }
}
