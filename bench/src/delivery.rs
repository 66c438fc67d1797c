//! The exactly-once, in-order check, per consumer connection.
//!
//! A connection must receive every event produced for its consumer after it went live (of its
//! one type, when the stream asks for one), once, in id order, and nothing else. Each connection keeps a bitmap of the ids it received (relative to
//! the ledger's base) so that a repeat is told apart from a late arrival; what it never received
//! is counted at the end against the ledger.

use crate::ledger::Ledger;

/// What one connection received.
#[derive(Debug, Default)]
pub struct Delivery {
    base: i64,
    seen: Vec<u64>,
    last: i64,
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Frames whose id could not be read, or lies below the ledger's base.
    pub malformed: u64,
}

/// How a frame fits the sequence so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    InOrder,
    Duplicate,
    OutOfOrder,
    Malformed,
}

impl Delivery {
    pub fn new(base: i64) -> Delivery {
        Delivery {
            base,
            last: base - 1,
            ..Delivery::default()
        }
    }

    pub fn observe(&mut self, id: Option<i64>) -> Arrival {
        let Some(offset) = id.and_then(|id| usize::try_from(id - self.base).ok()) else {
            self.malformed += 1;
            return Arrival::Malformed;
        };
        let (word, bit) = (offset / 64, 1u64 << (offset % 64));
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        self.received += 1;
        let id = self.base + offset as i64;
        if id < self.last {
            self.out_of_order += 1;
            return Arrival::OutOfOrder;
        }
        self.last = id;
        Arrival::InOrder
    }

    /// The highest id received in order so far.
    pub fn last(&self) -> i64 {
        self.last
    }

    fn has(&self, id: i64) -> bool {
        usize::try_from(id - self.base).is_ok_and(|offset| {
            self.seen
                .get(offset / 64)
                .is_some_and(|word| word & (1 << (offset % 64)) != 0)
        })
    }

    /// Compares with the ledger: (ids produced for `consumer` never received, ids received that
    /// were produced for someone else or not by the bench). With `kind`, the connection asked for
    /// that type only: the consumer's events of other types count as foreign if they arrive.
    pub fn settle(&self, ledger: &Ledger, consumer: u32, kind: Option<u16>) -> (u64, u64) {
        self.settle_upto(ledger, consumer, kind, ledger.highest())
    }

    /// [`Delivery::settle`] for the ids up to `upto` only (and any received above it): for a
    /// run cut off while events were still on their way.
    pub fn settle_upto(
        &self,
        ledger: &Ledger,
        consumer: u32,
        kind: Option<u16>,
        upto: i64,
    ) -> (u64, u64) {
        let mut lost = 0;
        let mut foreign = 0;
        let end = upto.max(self.base + self.seen.len() as i64 * 64 - 1);
        for id in ledger.base()..=end {
            let wanted = ledger.owner(id) == Some(consumer)
                && kind.is_none_or(|kind| ledger.kind(id) == Some(kind));
            match (wanted, self.has(id)) {
                (true, false) if id <= upto => lost += 1,
                (false, true) => foreign += 1,
                _ => {}
            }
        }
        (lost, foreign)
    }
}

/// The delivery check summed over connections.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeliverySummary {
    pub connections: usize,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Events of another consumer, ids the bench never produced, or unreadable ids.
    pub foreign: u64,
    /// Connections that failed to open or ended before the bench closed them.
    pub failed: usize,
}

impl DeliverySummary {
    pub fn errors(&self) -> u64 {
        self.lost + self.duplicates + self.out_of_order + self.foreign + self.failed as u64
    }

    pub fn describe(&self) -> String {
        format!(
            "lost {} · dup {} · out-of-order {} · foreign {} · failed conns {}",
            self.lost, self.duplicates, self.out_of_order, self.foreign, self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn tells_duplicates_from_late_arrivals_and_counts_losses() {
        let ledger = Ledger::new(10, Instant::now());
        for id in 10..20 {
            ledger.record(id, (id % 2) as u32, 0, None);
        }
        let mut delivery = Delivery::new(10);
        assert_eq!(delivery.observe(Some(10)), Arrival::InOrder);
        assert_eq!(delivery.observe(Some(14)), Arrival::InOrder);
        assert_eq!(delivery.observe(Some(12)), Arrival::OutOfOrder);
        assert_eq!(delivery.observe(Some(14)), Arrival::Duplicate);
        assert_eq!(delivery.observe(Some(15)), Arrival::InOrder);
        assert_eq!(delivery.observe(None), Arrival::Malformed);
        assert_eq!(delivery.observe(Some(3)), Arrival::Malformed);
        // Consumer 0 owns the even ids 10..=18: 16 and 18 never came; 15 is consumer 1's.
        assert_eq!(delivery.settle(&ledger, 0, None), (2, 1));
        assert_eq!(delivery.received, 4);
    }

    #[test]
    fn a_cut_run_counts_losses_up_to_the_cut_only() {
        let ledger = Ledger::new(10, Instant::now());
        for id in 10..20 {
            ledger.record(id, 0, 0, None);
        }
        let mut delivery = Delivery::new(10);
        for id in [10, 11, 13] {
            delivery.observe(Some(id));
        }
        // 12 is missing before the cut at 13; 14..20 were still on their way.
        assert_eq!(delivery.settle_upto(&ledger, 0, None, 13), (1, 0));
        assert_eq!(delivery.settle(&ledger, 0, None), (7, 0));
    }

    #[test]
    fn a_stream_of_one_type_expects_only_that_type() {
        let ledger = Ledger::new(10, Instant::now());
        // Consumer 0's events 10..20, types 0, 1, 2, 0, 1, 2, ...
        for id in 10..20 {
            ledger.record(id, 0, (id % 3) as u16, None);
        }
        let mut delivery = Delivery::new(10);
        // Type 1 is 10, 13, 16, 19: 19 never came, 11 is type 2.
        for id in [10, 11, 13, 16] {
            delivery.observe(Some(id));
        }
        assert_eq!(delivery.settle(&ledger, 0, Some(1)), (1, 1));
        // Without a filter the stream should have had all ten.
        assert_eq!(delivery.settle(&ledger, 0, None), (6, 0));
    }
}
