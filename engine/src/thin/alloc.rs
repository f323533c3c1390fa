//! Which data blocks of a pool are in use, and by how many mappings: the allocator's
//! sharded bitmap says whether a block is used, and a second array counts the extra
//! references of a block that snapshots and clones share (0 for a block mapped once, which
//! is every block of a pool without snapshots: the array's pages are then never touched).

use super::stable::StableArray;
use crate::stats::sets::PoolStat;
use crate::stats::Stats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Free-space accounting for the data blocks of a pool.
///
/// The blocks are split into shards, each a bitmap behind its own lock, and a thread
/// allocates from the shard its hint names, moving on only when that one is full: concurrent
/// first writes on different threads take different locks. Counts are exact at all times (no
/// block sits reserved in a cache that `status` would have to explain).
///
/// A used block is referenced by one mapping plus `extra[block]` more (a snapshot and its
/// volume, clones of one snapshot). A mapping that goes away (DISCARD, a copy on write, a
/// deleted volume) drops its reference only once its removal is durable: until then it waits
/// in `pending_unref` (see `Pool::flush`), because before that a crash would bring it back.
/// So a block another volume still maps stays shared, and copied on write, until no durable
/// mapping but one is left; and a block is free only when no durable mapping points at it.
pub(super) struct Allocator {
    shards: Box<[Mutex<Shard>]>,
    shard_blocks: u64,
    data_blocks: u64,
    used: AtomicU64,
    /// References beyond the first, per data block.
    extra: StableArray,
    pending_unref: Mutex<Vec<u64>>,
    /// Fullness level last warned about (0: below 90%, 1: 90% or more, 2: full); a warning
    /// is logged once per crossing upwards and re-armed when space comes back.
    warned: std::sync::atomic::AtomicU8,
    /// Published statistics (`Pool::publish_stats`); blocks_used follows `used`.
    pub(super) stats: std::sync::OnceLock<Stats<PoolStat>>,
}

/// Blocks [base, base + blocks) of the pool.
struct Shard {
    base: u64,
    blocks: u64,
    bits: Vec<u64>,
    used: u64,
    cursor: u64,
}

/// Most shards a pool's allocator has.
const MAX_SHARDS: u64 = 8;
/// Fewest blocks per shard (smaller pools have fewer shards).
const MIN_SHARD_BLOCKS: u64 = 1024;

impl Shard {
    pub(super) fn is_used(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64, used: bool) {
        let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        if used {
            debug_assert!(self.bits[w] & bit == 0);
            self.bits[w] |= bit;
            self.used += 1;
        } else {
            debug_assert!(self.bits[w] & bit != 0);
            self.bits[w] &= !bit;
            self.used -= 1;
        }
    }

    fn allocate(&mut self) -> Option<u64> {
        if self.used == self.blocks {
            return None;
        }
        let words = self.bits.len() as u64;
        for k in 0..=words {
            let w = (self.cursor / 64 + k) % words;
            let word = self.bits[w as usize];
            if word != u64::MAX {
                let i = w * 64 + u64::from(word.trailing_ones());
                if i < self.blocks {
                    self.set(i, true);
                    self.cursor = i + 1;
                    return Some(self.base + i);
                }
            }
        }
        None
    }
}

thread_local! {
    /// Which shard this thread tries first.
    static SHARD_HINT: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

impl Allocator {
    pub(super) fn new(data_blocks: u64) -> Allocator {
        let count = (data_blocks / MIN_SHARD_BLOCKS).clamp(1, MAX_SHARDS);
        let shard_blocks = data_blocks.div_ceil(count);
        let shards = (0..count)
            .map(|i| {
                let base = i * shard_blocks;
                let blocks = shard_blocks.min(data_blocks - base);
                Mutex::new(Shard {
                    base,
                    blocks,
                    bits: vec![0; blocks.div_ceil(64) as usize],
                    used: 0,
                    cursor: 0,
                })
            })
            .collect();
        Allocator {
            shards,
            shard_blocks,
            data_blocks,
            used: AtomicU64::new(0),
            extra: StableArray::new(data_blocks as usize, data_blocks as usize),
            pending_unref: Mutex::new(Vec::new()),
            warned: std::sync::atomic::AtomicU8::new(0),
            stats: std::sync::OnceLock::new(),
        }
    }

    fn shard_of(&self, p: u64) -> (&Mutex<Shard>, u64) {
        let shard = &self.shards[(p / self.shard_blocks) as usize];
        (shard, p % self.shard_blocks)
    }

    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub(super) fn is_used(&self, p: u64) -> bool {
        let (shard, i) = self.shard_of(p);
        shard.lock().unwrap().is_used(i)
    }

    pub(super) fn mark_used(&self, p: u64) {
        let (shard, i) = self.shard_of(p);
        shard.lock().unwrap().set(i, true);
        self.used.fetch_add(1, Ordering::AcqRel);
        self.count_used(1);
    }

    /// Keeps the published blocks_used equal to `used` (atomic adds: many threads allocate).
    fn count_used(&self, delta: i64) {
        if let Some(stats) = self.stats.get() {
            if delta > 0 {
                stats.shared_add(PoolStat::BlocksUsed, delta as u64);
            } else {
                stats.shared_sub(PoolStat::BlocksUsed, delta.unsigned_abs());
            }
        }
    }

    pub(super) fn release(&self, p: u64) {
        let (shard, i) = self.shard_of(p);
        let mut shard = shard.lock().unwrap();
        assert!(
            shard.is_used(i),
            "freeing data block {p} that is not in use"
        );
        shard.set(i, false);
        drop(shard);
        self.used.fetch_sub(1, Ordering::AcqRel);
        self.count_used(-1);
        self.warned.fetch_min(self.level(), Ordering::AcqRel);
    }

    pub(super) fn allocate(&self) -> Option<u64> {
        let first = SHARD_HINT.with(|h| *h) as usize;
        let n = self.shards.len();
        for k in 0..n {
            if let Some(p) = self.shards[(first + k) % n].lock().unwrap().allocate() {
                self.used.fetch_add(1, Ordering::AcqRel);
                self.count_used(1);
                self.note_level();
                return Some(p);
            }
        }
        None
    }

    /// Holds the reference of a mapping that went away until its removal is durable.
    pub(super) fn defer_unref(&self, p: u64) {
        self.pending_unref.lock().unwrap().push(p);
    }

    pub(super) fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut self.pending_unref.lock().unwrap())
    }

    /// The references waiting for their removal to be durable.
    pub(super) fn pending(&self) -> Vec<u64> {
        self.pending_unref.lock().unwrap().clone()
    }

    /// Puts back references taken for dropping when the commit that would drop them failed.
    pub(super) fn restore_pending(&self, blocks: Vec<u64>) {
        self.pending_unref.lock().unwrap().extend(blocks);
    }

    /// Adds a reference to used block `p` (a copied mapping).
    pub(super) fn share(&self, p: u64) {
        self.extra.at(p as usize).fetch_add(1, Ordering::AcqRel);
    }

    /// Whether more than one mapping (durable or not yet durably removed) refers to `p`:
    /// then it must not be written in place.
    pub(super) fn is_shared(&self, p: u64) -> bool {
        self.extra.at(p as usize).load(Ordering::Acquire) != 0
    }

    /// References to used block `p` beyond the first.
    pub(super) fn extra_refs(&self, p: u64) -> u64 {
        self.extra.at(p as usize).load(Ordering::Acquire)
    }

    /// Drops one reference to `p`, whose mapping's removal is durable; frees the block when
    /// it was the last.
    pub(super) fn unref(&self, p: u64) {
        let extra = self.extra.at(p as usize);
        let mut now = extra.load(Ordering::Acquire);
        while now != 0 {
            match extra.compare_exchange(now, now - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => now = seen,
            }
        }
        self.release(p);
    }

    fn level(&self) -> u8 {
        let used = self.used();
        if used == self.data_blocks {
            2
        } else if used * 10 >= self.data_blocks * 9 {
            1
        } else {
            0
        }
    }

    fn note_level(&self) {
        let level = self.level();
        if self.warned.fetch_max(level, Ordering::AcqRel) < level {
            tracing::warn!(
                used_blocks = self.used(),
                data_blocks = self.data_blocks,
                "thin pool {}",
                if level == 2 {
                    "is full: writes that need a new block fail"
                } else {
                    "is 90% full"
                }
            );
        }
    }
}

#[cfg(test)]
mod allocator_tests {
    use super::{Allocator, MIN_SHARD_BLOCKS};

    #[test]
    fn fullness_is_reported_once_per_crossing_and_rearmed_when_space_returns() {
        let a = Allocator::new(10);
        let got: Vec<u64> = (0..8).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        assert_eq!(a.warned.load(std::sync::atomic::Ordering::Relaxed), 0);
        a.allocate().unwrap();
        assert_eq!(
            a.warned.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "90% crossed"
        );
        a.allocate().unwrap();
        assert_eq!(
            a.warned.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "full"
        );
        assert_eq!(a.allocate(), None);
        a.release(3);
        assert_eq!(
            a.warned.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "re-armed"
        );
        a.release(4);
        a.release(5);
        assert_eq!(
            a.warned.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "re-armed"
        );
        assert_eq!(a.allocate(), Some(3), "freed blocks are found again");
    }

    #[test]
    fn threads_allocate_from_their_shards_and_every_block_is_handed_out_once() {
        let blocks = 5 * MIN_SHARD_BLOCKS + 17;
        let a = std::sync::Arc::new(Allocator::new(blocks));
        assert_eq!(a.shards.len(), 5);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(p) = a.allocate() {
                        mine.push(p);
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..blocks).collect::<Vec<_>>(),
            "each block once, none lost"
        );
        assert_eq!(a.used(), blocks);
    }
}
