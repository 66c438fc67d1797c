//! The ledger: for every event id the bench produced, which consumer it was for, which of the
//! scenario's event types it has, and when the producer's commit returned.
//!
//! Producers write it, consumer connections read it when a frame arrives, and the delivery check
//! reads it at the end. It is indexed by id (ids are dense: one sequence, `CACHE 1`), lock-free,
//! and grows in fixed chunks allocated on first use, so it costs nothing for ids never produced.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

const CHUNK_BITS: u32 = 16;
const CHUNK: usize = 1 << CHUNK_BITS;
/// 4096 chunks of 65,536 ids: 268 million ids, far more than any scenario produces.
const MAX_CHUNKS: usize = 4096;

/// `committed_ns` of an event that is recorded but carries no commit time (history rows).
const UNTIMED: u64 = u64::MAX;

#[derive(Default)]
struct Slot {
    /// Consumer index + 1; 0 = not produced by the bench (yet).
    owner: AtomicU32,
    /// Index of the event's type in the producers' list of types (0 when there is one); it fits
    /// in the padding after `owner`, so a slot stays 16 bytes.
    kind: AtomicU16,
    /// Nanoseconds after the epoch at which the commit returned; 0 = not recorded yet.
    committed_ns: AtomicU64,
}

/// What the ledger knows about an id when a frame arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The commit returned at this many nanoseconds after the epoch.
    At(u64),
    /// Recorded without a time (bulk history): no latency sample.
    Untimed,
    /// Not recorded yet: the frame overtook the producer's bookkeeping; look again later.
    Unknown,
}

pub struct Ledger {
    /// The first id this scenario can produce.
    base: i64,
    epoch: Instant,
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
    highest: AtomicI64,
}

impl Ledger {
    /// A ledger for ids from `base` on; times are measured from `epoch`.
    pub fn new(base: i64, epoch: Instant) -> Ledger {
        Ledger {
            base,
            epoch,
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            highest: AtomicI64::new(base - 1),
        }
    }

    pub fn base(&self) -> i64 {
        self.base
    }

    /// The highest id recorded so far.
    pub fn highest(&self) -> i64 {
        self.highest.load(Ordering::Acquire)
    }

    /// Nanoseconds from the epoch to `at` (never 0, which means "not recorded").
    pub fn nanos(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_nanos() as u64).max(1)
    }

    fn slot(&self, id: i64, allocate: bool) -> Option<&Slot> {
        let offset = usize::try_from(id.checked_sub(self.base)?).ok()?;
        let chunk = self.chunks.get(offset >> CHUNK_BITS)?;
        let slots = if allocate {
            chunk.get_or_init(|| (0..CHUNK).map(|_| Slot::default()).collect())
        } else {
            chunk.get()?
        };
        slots.get(offset & (CHUNK - 1))
    }

    /// Records that `id` is for consumer `owner`, has type `kind`, and committed at `committed`
    /// (`None`: no time). Returns false when the id is outside the ledger's range, which the
    /// caller must report.
    pub fn record(&self, id: i64, owner: u32, kind: u16, committed: Option<Instant>) -> bool {
        let Some(slot) = self.slot(id, true) else {
            return false;
        };
        slot.owner.store(owner + 1, Ordering::Relaxed);
        slot.kind.store(kind, Ordering::Relaxed);
        let at = committed.map_or(UNTIMED, |at| self.nanos(at));
        // Release: a reader that sees the time also sees the owner.
        slot.committed_ns.store(at, Ordering::Release);
        self.highest.fetch_max(id, Ordering::AcqRel);
        true
    }

    pub fn commit(&self, id: i64) -> Commit {
        match self
            .slot(id, false)
            .map_or(0, |slot| slot.committed_ns.load(Ordering::Acquire))
        {
            0 => Commit::Unknown,
            UNTIMED => Commit::Untimed,
            at => Commit::At(at),
        }
    }

    /// The consumer index `id` was produced for, if the bench produced it.
    pub fn owner(&self, id: i64) -> Option<u32> {
        let owner = self.slot(id, false)?.owner.load(Ordering::Acquire);
        owner.checked_sub(1)
    }

    /// The type index `id` was produced with, if the bench produced it.
    pub fn kind(&self, id: i64) -> Option<u16> {
        let slot = self.slot(id, false)?;
        (slot.owner.load(Ordering::Acquire) != 0).then(|| slot.kind.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_reads_back() {
        let epoch = Instant::now();
        let ledger = Ledger::new(100, epoch);
        assert_eq!(ledger.commit(100), Commit::Unknown);
        assert!(ledger.record(100, 3, 7, Some(epoch)));
        assert!(ledger.record(100 + CHUNK as i64 + 5, 0, 0, None));
        assert!(!ledger.record(99, 0, 0, None));
        assert!(matches!(ledger.commit(100), Commit::At(_)));
        assert_eq!(ledger.owner(100), Some(3));
        assert_eq!(ledger.commit(100 + CHUNK as i64 + 5), Commit::Untimed);
        assert_eq!(ledger.owner(101), None);
        assert_eq!(ledger.kind(100), Some(7));
        assert_eq!(ledger.kind(101), None);
        assert_eq!(ledger.highest(), 100 + CHUNK as i64 + 5);
    }
}
