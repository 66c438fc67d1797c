//! The binary's global allocator: the system allocator (glibc's malloc) for every block but those
//! of [`MAPPED`] sizes, which get a private anonymous mapping of their own, with nothing else on
//! its pages.
//!
//! Why: an idle stream's memory was dominated by two 8 kB buffers hyper allocates for every
//! connection and hardly uses. The response head is written at the start of one; the other
//! (the read buffer re-armed to notice the client leaving while the response streams) is not
//! written at all while the stream is idle. A page nobody writes costs no resident memory, but
//! glibc keeps a chunk header at the start of every block, even one it maps on its own (which
//! `M_MMAP_THRESHOLD` at 8 kB used to arrange), so both buffers cost a resident page each. Mapped
//! here, a buffer never written costs nothing: an idle stream went from 14.0 to 9.7 kB
//! (BENCHMARKS.md, scenario 4).
//!
//! The cost: a mapping is a system call to make and one to free, and its pages fault in afresh,
//! where glibc reuses freed memory. Hence only sizes from 8 to 16 kB; bigger blocks (replay
//! pages, growing vectors) stay with glibc. The database connections' read buffers are 8 kB
//! too, and a replay of 1,000,000 events allocates and frees about 20,000 of them: so the last
//! [`CACHED`] two-page mappings freed are kept for reuse instead of unmapped (without the cache
//! the service spent about 1.0 s of CPU on that replay instead of 0.6; BENCHMARKS.md, "Idle
//! streams"). A mapping gives its pages back before it is cached, so that a reused buffer costs
//! no more than a fresh one until it is written.
//!
//! Should `mmap` fail (the kernel's limit on mappings, say), the block comes from the system
//! allocator after all, with its original address stored just before it; such a block is never
//! page-aligned, which is how [`MapLarge::dealloc`] tells it apart.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// Blocks of these sizes (hyper's 8 kB buffers) are mapped on their own.
pub const MAPPED: std::ops::Range<usize> = 8 * 1024..16 * 1024;

const PAGE: usize = 4096;
/// Room before a fallback block for the address the system allocator returned.
const HEADER: usize = 16;

/// How many freed two-page mappings are kept for reuse.
pub const CACHED: usize = 64;
/// The length of the mappings the cache keeps: hyper's and the database connections' 8 kB
/// buffers.
const CACHED_LEN: usize = 2 * PAGE;

/// Freed mappings of [`CACHED_LEN`] bytes, their pages given back, as addresses. A plain mutex: it never allocates
/// (a futex on Linux), and it is held for a push or a pop.
static CACHE: Mutex<Cache> = Mutex::new(Cache {
    blocks: [0; CACHED],
    len: 0,
});

struct Cache {
    blocks: [usize; CACHED],
    len: usize,
}

/// A cached mapping of `len` bytes, if there is one (its bytes are whatever they were).
fn take_cached(len: usize) -> Option<*mut u8> {
    if len != CACHED_LEN {
        return None;
    }
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    cache.len = cache.len.checked_sub(1)?;
    Some(cache.blocks[cache.len] as *mut u8)
}

/// Keeps a freed mapping of `len` bytes for reuse; false if it is not kept (to be unmapped).
fn put_cached(block: *mut u8, len: usize) -> bool {
    if len != CACHED_LEN {
        return false;
    }
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if cache.len == CACHED {
        return false;
    }
    let at = cache.len;
    cache.blocks[at] = block as usize;
    cache.len += 1;
    true
}

/// See the module documentation.
pub struct MapLarge;

fn mapped(layout: &Layout) -> bool {
    MAPPED.contains(&layout.size()) && layout.align() <= HEADER
}

fn mapping_len(size: usize) -> usize {
    size.next_multiple_of(PAGE)
}

/// Whether a block of a `mapped` layout is a mapping (else a fallback, never page-aligned).
fn is_mapping(block: *mut u8) -> bool {
    (block as usize).is_multiple_of(PAGE)
}

impl MapLarge {
    /// A block from the system allocator that is never page-aligned, for when `mmap` failed.
    unsafe fn fallback_alloc(size: usize) -> *mut u8 {
        let Ok(layout) = Layout::from_size_align(size + 2 * HEADER, HEADER) else {
            return ptr::null_mut();
        };
        // SAFETY: the layout has a non-zero size.
        let start = unsafe { System.alloc(layout) };
        if start.is_null() {
            return start;
        }
        // `start` is 16-aligned: if start + 16 falls on a page boundary, start + 32 does not.
        let mut block = start.wrapping_add(HEADER);
        if is_mapping(block) {
            block = start.wrapping_add(2 * HEADER);
        }
        // SAFETY: `block - 8` lies within the allocation, after `start`, and is 8-aligned.
        unsafe { block.sub(8).cast::<*mut u8>().write(start) };
        block
    }

    unsafe fn fallback_dealloc(block: *mut u8, size: usize) {
        // SAFETY: written by `fallback_alloc` for this block.
        let start = unsafe { block.sub(8).cast::<*mut u8>().read() };
        // SAFETY: allocated by `fallback_alloc` with this layout.
        unsafe {
            System.dealloc(
                start,
                Layout::from_size_align_unchecked(size + 2 * HEADER, HEADER),
            )
        };
    }
}

// SAFETY: every block is either the system allocator's (small blocks, fallbacks) or a mapping of
// at least its size, page-aligned (hence aligned for any layout that `mapped` accepts), and each
// is freed the way it was made.
unsafe impl GlobalAlloc for MapLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !mapped(&layout) {
            // SAFETY: forwarded as is.
            return unsafe { System.alloc(layout) };
        }
        if let Some(block) = take_cached(mapping_len(layout.size())) {
            return block;
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let block = unsafe {
            libc::mmap(
                ptr::null_mut(),
                mapping_len(layout.size()),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if block == libc::MAP_FAILED {
            // SAFETY: the size is non-zero.
            return unsafe { Self::fallback_alloc(layout.size()) };
        }
        block.cast()
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !mapped(&layout) {
            // SAFETY: forwarded as is.
            return unsafe { System.alloc_zeroed(layout) };
        }
        if let Some(block) = take_cached(mapping_len(layout.size())) {
            // SAFETY: a cached mapping has `mapping_len(size)` writable bytes.
            unsafe { block.write_bytes(0, layout.size()) };
            return block;
        }
        // SAFETY: as for `alloc`.
        let block = unsafe { self.alloc(layout) };
        if !block.is_null() && !is_mapping(block) {
            // A fallback block is not zeroed; a fresh mapping is.
            // SAFETY: the block has `layout.size()` writable bytes.
            unsafe { block.write_bytes(0, layout.size()) };
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if !mapped(&layout) {
            // SAFETY: allocated by `System` with this layout.
            unsafe { System.dealloc(block, layout) };
        } else if is_mapping(block) {
            let len = mapping_len(layout.size());
            // A cached mapping gives its pages back first: handed to a new connection, a dirty
            // one would cost the resident pages the mapping is there to save.
            // SAFETY: a mapping of this length made by `alloc` or `realloc`, no longer used.
            let emptied = unsafe { libc::madvise(block.cast(), len, libc::MADV_DONTNEED) } == 0;
            if !(emptied && put_cached(block, len)) {
                // SAFETY: a mapping of this length made by `alloc` or `realloc`.
                unsafe { libc::munmap(block.cast(), len) };
            }
        } else {
            // SAFETY: a fallback block of this size.
            unsafe { Self::fallback_dealloc(block, layout.size()) };
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees that the new size, rounded to the alignment, fits.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(&layout), mapped(&new_layout)) {
            // SAFETY: forwarded as is.
            (false, false) => return unsafe { System.realloc(block, layout, new_size) },
            (true, true) if is_mapping(block) => {
                let (old_len, new_len) = (mapping_len(layout.size()), mapping_len(new_size));
                if old_len == new_len {
                    return block;
                }
                // SAFETY: resizes (and maybe moves) a mapping of `old_len` made here.
                let moved =
                    unsafe { libc::mremap(block.cast(), old_len, new_len, libc::MREMAP_MAYMOVE) };
                if moved != libc::MAP_FAILED {
                    return moved.cast();
                }
            }
            _ => {}
        }
        // Between the two kinds of block, or a fallback: a new block, a copy, and a free.
        // SAFETY: `new_layout` has a non-zero size.
        let new_block = unsafe { self.alloc(new_layout) };
        if !new_block.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap.
            unsafe {
                ptr::copy_nonoverlapping(block, new_block, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
        }
        new_block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 1).unwrap()
    }

    /// Fills `len` bytes with a pattern, or checks that they still hold it.
    unsafe fn pattern(block: *mut u8, len: usize, check: bool) {
        for i in 0..len {
            let byte = (i % 251) as u8;
            // SAFETY: the caller passes a block of at least `len` bytes.
            unsafe {
                if check {
                    assert_eq!(*block.add(i), byte, "byte {i}");
                } else {
                    *block.add(i) = byte;
                }
            }
        }
    }

    #[test]
    fn blocks_keep_their_bytes_across_every_kind_of_realloc() {
        let from = MAPPED.start;
        // small -> small -> mapped -> same pages -> more pages -> system (beyond the range)
        // -> mapped -> small.
        let sizes = [
            100,
            4000,
            from,
            from + 100,
            from + 5000,
            3 * from,
            from + 1,
            50,
        ];
        unsafe {
            let mut size = 10;
            let mut block = MapLarge.alloc(layout(size));
            pattern(block, size, false);
            for new_size in sizes {
                block = MapLarge.realloc(block, layout(size), new_size);
                assert!(!block.is_null());
                pattern(block, size.min(new_size), true);
                pattern(block, new_size, false);
                assert_eq!(is_mapping(block), MAPPED.contains(&new_size), "{new_size}");
                size = new_size;
            }
            MapLarge.dealloc(block, layout(size));
        }
    }

    #[test]
    fn freed_mappings_are_reused_and_come_zeroed_when_asked() {
        unsafe {
            let block = MapLarge.alloc(layout(CACHED_LEN));
            pattern(block, CACHED_LEN, false);
            MapLarge.dealloc(block, layout(CACHED_LEN));
            // Other tests allocate at the same time: the block may come back to any of them,
            // so this only checks what any reused block must be.
            let again = MapLarge.alloc_zeroed(layout(CACHED_LEN));
            assert!(is_mapping(again));
            assert!((0..CACHED_LEN).all(|i| *again.add(i) == 0));
            let blocks: Vec<_> = (0..2 * CACHED)
                .map(|_| MapLarge.alloc(layout(CACHED_LEN)))
                .collect();
            for &block in &blocks {
                pattern(block, CACHED_LEN, false);
            }
            for &block in &blocks {
                pattern(block, CACHED_LEN, true);
                MapLarge.dealloc(block, layout(CACHED_LEN));
            }
            MapLarge.dealloc(again, layout(CACHED_LEN));
        }
    }

    #[test]
    fn big_blocks_come_zeroed_when_asked() {
        unsafe {
            let block = MapLarge.alloc_zeroed(layout(MAPPED.start));
            assert!(is_mapping(block));
            assert!((0..MAPPED.start).all(|i| *block.add(i) == 0));
            MapLarge.dealloc(block, layout(MAPPED.start));
        }
    }

    #[test]
    fn fallback_blocks_are_never_page_aligned_and_are_freed_by_dealloc() {
        unsafe {
            // Enough of them that some system addresses fall just before a page boundary.
            let blocks: Vec<_> = (0..2000)
                .map(|_| MapLarge::fallback_alloc(MAPPED.start))
                .collect();
            for &block in &blocks {
                assert!(!block.is_null() && !is_mapping(block));
                assert!((block as usize).is_multiple_of(HEADER));
                pattern(block, MAPPED.start, false);
            }
            let grown = MapLarge.realloc(blocks[0], layout(MAPPED.start), 2 * MAPPED.start);
            pattern(grown, MAPPED.start, true);
            MapLarge.dealloc(grown, layout(2 * MAPPED.start));
            for &block in &blocks[1..] {
                pattern(block, MAPPED.start, true);
                MapLarge.dealloc(block, layout(MAPPED.start));
            }
        }
    }
}
