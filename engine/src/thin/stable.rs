//! A growable array of `AtomicU64` whose entries never move.
//!
//! A thin volume's map and dirty bits live in these, so a volume grows in place: a request
//! that took the volume before a resize and maps a block after it writes the entry the
//! resized volume reads and commits. (A grown copy of the map would miss that entry: the
//! block would be allocated, written and acknowledged, and then neither journaled nor found.)

use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Entries per chunk (128 KiB): a chunk is allocated whole when the array grows into it.
const CHUNK_SHIFT: u32 = 14;
const CHUNK: usize = 1 << CHUNK_SHIFT;

pub(crate) struct StableArray {
    /// One pointer per chunk of the largest array allowed; a chunk is allocated when the
    /// array first grows into it and kept until the array is dropped.
    chunks: Box<[AtomicPtr<AtomicU64>]>,
    /// Entries in use; every chunk below it is allocated.
    len: AtomicUsize,
}

/// A zero-filled slice of `n` `T`s.
///
/// # Safety
/// All-zero bytes must be a valid `T` (atomic integers and pointers: 0 and null).
unsafe fn zeroed_slice<T>(n: usize) -> Box<[T]> {
    assert!(n > 0);
    let layout = Layout::array::<T>(n).expect("slice size overflows");
    // SAFETY: the layout is non-zero-sized (n > 0 and T is not a ZST here); zeroed memory is a
    // valid [T; n] by the caller's promise, and Box frees it with the same layout.
    unsafe {
        let p = alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            handle_alloc_error(layout);
        }
        Box::from_raw(ptr::slice_from_raw_parts_mut(p, n))
    }
}

impl StableArray {
    /// `len` zeroed entries, growable up to `max_len`.
    pub fn new(len: usize, max_len: usize) -> StableArray {
        assert!(len <= max_len && max_len > 0);
        // SAFETY: a zeroed AtomicPtr is null.
        let chunks = unsafe { zeroed_slice(max_len.div_ceil(CHUNK)) };
        let array = StableArray {
            chunks,
            len: AtomicUsize::new(0),
        };
        array.grow(len);
        array
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Entry `i`; panics past the length (callers check ranges first).
    pub fn at(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len(), "entry {i} past the array's end");
        let chunk = self.chunks[i >> CHUNK_SHIFT].load(Ordering::Acquire);
        debug_assert!(!chunk.is_null());
        // SAFETY: chunks below `len` are allocated (grow publishes them before the length),
        // hold CHUNK entries and are freed only in drop.
        unsafe { &*chunk.add(i & (CHUNK - 1)) }
    }

    /// Entry `i`, None past the length.
    pub fn get(&self, i: usize) -> Option<&AtomicU64> {
        (i < self.len()).then(|| self.at(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = &AtomicU64> {
        (0..self.len()).map(|i| self.at(i))
    }

    /// Grows to `len` entries; the new ones read 0. Entries already there stay where they are.
    pub fn grow(&self, len: usize) {
        assert!(
            len <= self.chunks.len() * CHUNK,
            "grown past the array's limit"
        );
        for slot in &self.chunks[..len.div_ceil(CHUNK)] {
            if !slot.load(Ordering::Acquire).is_null() {
                continue;
            }
            // SAFETY: a zeroed AtomicU64 is 0.
            let chunk = Box::into_raw(unsafe { zeroed_slice::<AtomicU64>(CHUNK) });
            let chunk = chunk as *mut AtomicU64;
            if slot
                .compare_exchange(ptr::null_mut(), chunk, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Another grower published this chunk first.
                // SAFETY: ours was never published.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(chunk, CHUNK)) });
            }
        }
        self.len.fetch_max(len, Ordering::AcqRel);
    }

    /// Shrinks to `len` entries and returns the non-zero values of the ones cut off, which are
    /// zeroed (they read 0 should the array grow again).
    pub fn truncate(&self, len: usize) -> Vec<u64> {
        let old = self.len();
        assert!(len <= old, "truncate grows");
        let cut: Vec<u64> = (len..old)
            .map(|i| self.at(i).swap(0, Ordering::AcqRel))
            .filter(|&value| value != 0)
            .collect();
        self.len.store(len, Ordering::Release);
        cut
    }
}

impl Drop for StableArray {
    fn drop(&mut self) {
        for slot in self.chunks.iter() {
            let chunk = slot.load(Ordering::Acquire);
            if !chunk.is_null() {
                // SAFETY: allocated in grow as a CHUNK-entry boxed slice, and freed only here.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(chunk, CHUNK)) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_in_place_as_the_array_grows() {
        let a = StableArray::new(3, 4 * CHUNK);
        a.at(2).store(7, Ordering::Relaxed);
        let before = a.at(2) as *const AtomicU64;
        a.grow(3 * CHUNK + 1);
        assert_eq!(a.len(), 3 * CHUNK + 1);
        assert_eq!(a.at(2) as *const AtomicU64, before, "moved");
        assert_eq!(a.at(2).load(Ordering::Relaxed), 7);
        assert_eq!(a.at(3 * CHUNK).load(Ordering::Relaxed), 0);
        assert!(a.get(3 * CHUNK + 1).is_none());
    }

    #[test]
    fn truncating_returns_the_cut_values_and_a_regrown_array_reads_zero_there() {
        let a = StableArray::new(CHUNK + 10, 2 * CHUNK);
        a.at(1).store(5, Ordering::Relaxed);
        a.at(CHUNK + 2).store(9, Ordering::Relaxed);
        assert_eq!(a.truncate(2), vec![9]);
        assert_eq!(a.len(), 2);
        assert!(a.get(CHUNK + 2).is_none());
        a.grow(CHUNK + 10);
        assert_eq!(a.at(CHUNK + 2).load(Ordering::Relaxed), 0);
        assert_eq!(a.at(1).load(Ordering::Relaxed), 5);
        assert_eq!(
            a.iter().filter(|e| e.load(Ordering::Relaxed) != 0).count(),
            1
        );
    }

    #[test]
    #[should_panic(expected = "past the array's limit")]
    fn growing_past_the_limit_panics() {
        StableArray::new(1, CHUNK).grow(CHUNK + 1);
    }

    #[test]
    fn concurrent_growers_publish_each_chunk_once() {
        let a = StableArray::new(0, 64 * CHUNK);
        std::thread::scope(|s| {
            for t in 0..4 {
                let a = &a;
                s.spawn(move || {
                    for n in 1..=64 {
                        a.grow(n * CHUNK - t);
                        a.at(n * CHUNK - t - 1).fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(a.len(), 64 * CHUNK);
        let total: u64 = a.iter().map(|e| e.load(Ordering::Relaxed)).sum();
        assert_eq!(
            total,
            4 * 64,
            "an increment landed in a chunk that was thrown away"
        );
    }
}
