//! A growable array of `AtomicU64` whose entries never move.
//!
//! A thin volume's map and dirty bits live in these, so a volume grows in place: a request
//! that took the volume before a resize and maps a block after it writes the entry the
//! resized volume reads and commits. (A grown copy of the map would miss that entry: the
//! block would be allocated, written and acknowledged, and then neither journaled nor found.)

use std::ops::Deref;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Entries per chunk (128 KiB): a chunk is mapped whole when the array grows into it, and
/// only the pages the array touches take memory.
const CHUNK_SHIFT: u32 = 14;
const CHUNK: usize = 1 << CHUNK_SHIFT;

pub(crate) struct StableArray {
    /// One pointer per chunk of the largest array allowed; a chunk is mapped when the array
    /// first grows into it and kept until the array is dropped.
    chunks: Zeroed<AtomicPtr<AtomicU64>>,
    /// Entries in use; every chunk below it is mapped.
    len: AtomicUsize,
}

/// `len` zeroed `T`s in an anonymous mapping of their own. Pages nobody touches take no
/// memory: a 64 MiB volume uses 8 KiB of its map's first chunk and one page of its chunk
/// table, where zero-filled heap allocations made 500 idle volumes cost 110 MiB.
struct Zeroed<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: Zeroed owns its mapping like a Box<[T]>; it is shared only as &[T].
unsafe impl<T: Send> Send for Zeroed<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Zeroed<T> {}

impl<T> Zeroed<T> {
    /// # Safety
    /// All-zero bytes must be a valid `T` (atomic integers and pointers: 0 and null).
    unsafe fn new(len: usize) -> Zeroed<T> {
        assert!(len > 0 && std::mem::align_of::<T>() <= 4096);
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("array size overflows");
        // SAFETY: a fresh private anonymous mapping; the kernel zero-fills it on first touch.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let layout = std::alloc::Layout::array::<T>(len).expect("array size overflows");
            std::alloc::handle_alloc_error(layout);
        }
        Zeroed {
            ptr: p as *mut T,
            len,
        }
    }

    /// Gives up ownership: the mapping stays until `from_raw` takes it back.
    fn into_raw(self) -> *mut T {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }

    /// # Safety
    /// `ptr` must come from `into_raw` of a Zeroed of `len` entries, taken back once.
    unsafe fn from_raw(ptr: *mut T, len: usize) -> Zeroed<T> {
        Zeroed { ptr, len }
    }
}

impl<T> Deref for Zeroed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: len zero-initialized (valid, by `new`'s contract) entries, mapped until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> Drop for Zeroed<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; T needs no drop (atomics).
        unsafe {
            libc::munmap(
                self.ptr as *mut libc::c_void,
                self.len * std::mem::size_of::<T>(),
            )
        };
    }
}

impl StableArray {
    /// `len` zeroed entries, growable up to `max_len`.
    pub fn new(len: usize, max_len: usize) -> StableArray {
        assert!(len <= max_len && max_len > 0);
        // SAFETY: a zeroed AtomicPtr is null.
        let chunks = unsafe { Zeroed::new(max_len.div_ceil(CHUNK)) };
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
            let chunk = unsafe { Zeroed::<AtomicU64>::new(CHUNK) }.into_raw();
            if slot
                .compare_exchange(ptr::null_mut(), chunk, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Another grower published this chunk first.
                // SAFETY: ours was never published.
                drop(unsafe { Zeroed::from_raw(chunk, CHUNK) });
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
                // SAFETY: mapped in grow as CHUNK entries, and unmapped only here.
                drop(unsafe { Zeroed::from_raw(chunk, CHUNK) });
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
