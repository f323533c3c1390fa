//! A thin pool: volumes whose blocks are mapped, on first write, onto data blocks of one
//! shared data file; metadata in a checkpoint plus a journal (see the module docs of
//! `thin` for the crash-consistency argument).
//!
//! Map lookups take no lock: each volume's map is an array of atomics (0 = unmapped, else the
//! data block + 1), and a new mapping is installed with compare-and-swap. Allocation, commits
//! and volume management take locks; they are not per-request work for an overwrite or a read.

use super::format::{self, FormatError, Record, Superblock, UNMAPPED};
use super::stable::StableArray;
use crate::stats::sets::PoolStat;
use crate::stats::Stats;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Journal size past which a flush also writes a checkpoint.
const CHECKPOINT_AFTER_BYTES: u64 = 8 << 20;
/// Default data block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;

/// What went wrong, in words an operator can act on.
#[derive(Debug)]
pub enum ThinError {
    /// The pool has no free block for a write that needs one.
    NoSpace,
    NoVolume(String),
    VolumeExists(String),
    /// An offset or length outside the volume, or not in whole sectors.
    OutOfRange,
    Invalid(String),
    Format(FormatError),
    Io(io::Error),
}

impl std::fmt::Display for ThinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThinError::NoSpace => write!(f, "the pool is full"),
            ThinError::NoVolume(n) => write!(f, "no volume named {n:?}"),
            ThinError::VolumeExists(n) => write!(f, "a volume named {n:?} exists already"),
            ThinError::OutOfRange => write!(f, "range outside the volume"),
            ThinError::Invalid(why) => write!(f, "{why}"),
            ThinError::Format(e) => write!(f, "{e}"),
            ThinError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ThinError {}

impl From<io::Error> for ThinError {
    fn from(e: io::Error) -> ThinError {
        ThinError::Io(e)
    }
}

impl From<FormatError> for ThinError {
    fn from(e: FormatError) -> ThinError {
        ThinError::Format(e)
    }
}

/// One thin volume.
pub struct Volume {
    pub id: u32,
    pub name: String,
    size_bytes: AtomicU64,
    /// Per virtual block: 0 = unmapped, else data block + 1. Grows in place (see stable.rs).
    map: StableArray,
    /// One bit per virtual block changed since the last commit.
    dirty: StableArray,
}

impl Volume {
    fn new(id: u32, name: String, size_bytes: u64, block_size: u32) -> Volume {
        let blocks = size_bytes.div_ceil(u64::from(block_size)) as usize;
        let max = MAX_VOLUME_BLOCKS as usize;
        Volume {
            id,
            name,
            size_bytes: AtomicU64::new(size_bytes),
            map: StableArray::new(blocks, max),
            dirty: StableArray::new(blocks.div_ceil(64), max.div_ceil(64)),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Data block of virtual block `v`, if mapped.
    pub fn lookup(&self, v: u64) -> Option<u64> {
        match self.map.at(v as usize).load(Ordering::Acquire) {
            0 => None,
            p => Some(p - 1),
        }
    }

    fn mark_dirty(&self, v: u64) {
        self.dirty
            .at((v / 64) as usize)
            .fetch_or(1 << (v % 64), Ordering::AcqRel);
    }

    /// Resizes in place; returns the data blocks of the part cut off. Growing publishes the
    /// new entries before the size, so a request that passes the range check finds them.
    fn resize(&self, size_bytes: u64, block_size: u32) -> Vec<u64> {
        let blocks = size_bytes.div_ceil(u64::from(block_size)) as usize;
        if blocks >= self.map.len() {
            self.map.grow(blocks);
            self.dirty.grow(blocks.div_ceil(64));
            self.size_bytes.store(size_bytes, Ordering::Release);
            return Vec::new();
        }
        self.size_bytes.store(size_bytes, Ordering::Release);
        let cut = self.map.truncate(blocks).iter().map(|p| p - 1).collect();
        // The resize record covers the cut blocks: their dirty bits have nothing to commit.
        self.dirty.truncate(blocks.div_ceil(64));
        if let Some(last) = self.dirty.get(blocks / 64) {
            last.fetch_and((1 << (blocks % 64)) - 1, Ordering::AcqRel);
        }
        cut
    }

    /// Blocks of this volume backed by data blocks.
    pub fn mapped_blocks(&self) -> u64 {
        self.mapped_blocks_from(0)
    }

    /// Blocks from virtual block `first` on backed by data blocks (what shrinking the volume
    /// to `first` blocks would drop).
    pub fn mapped_blocks_from(&self, first: u64) -> u64 {
        (first as usize..self.map.len())
            .filter(|&i| self.map.at(i).load(Ordering::Relaxed) != 0)
            .count() as u64
    }
}

/// Free-space accounting for the data blocks of a pool.
///
/// The blocks are split into shards, each a bitmap behind its own lock, and a thread
/// allocates from the shard its hint names, moving on only when that one is full: concurrent
/// first writes on different threads take different locks. Counts are exact at all times (no
/// block sits reserved in a cache that `status` would have to explain). Blocks unmapped in
/// memory wait in `pending_free` until their unmapping is durable (see `Pool::flush`).
struct Allocator {
    shards: Box<[Mutex<Shard>]>,
    shard_blocks: u64,
    data_blocks: u64,
    used: AtomicU64,
    pending_free: Mutex<Vec<u64>>,
    /// Fullness level last warned about (0: below 90%, 1: 90% or more, 2: full); a warning
    /// is logged once per crossing upwards and re-armed when space comes back.
    warned: std::sync::atomic::AtomicU8,
    /// Published statistics (`Pool::publish_stats`); blocks_used follows `used`.
    stats: std::sync::OnceLock<Stats<PoolStat>>,
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
    fn is_used(&self, i: u64) -> bool {
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
    fn new(data_blocks: u64) -> Allocator {
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
            pending_free: Mutex::new(Vec::new()),
            warned: std::sync::atomic::AtomicU8::new(0),
            stats: std::sync::OnceLock::new(),
        }
    }

    fn shard_of(&self, p: u64) -> (&Mutex<Shard>, u64) {
        let shard = &self.shards[(p / self.shard_blocks) as usize];
        (shard, p % self.shard_blocks)
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    fn is_used(&self, p: u64) -> bool {
        let (shard, i) = self.shard_of(p);
        shard.lock().unwrap().is_used(i)
    }

    fn mark_used(&self, p: u64) {
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

    fn release(&self, p: u64) {
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

    fn allocate(&self) -> Option<u64> {
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

    /// Holds an unmapped block until its unmapping is durable.
    fn defer_free(&self, p: u64) {
        self.pending_free.lock().unwrap().push(p);
    }

    fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut self.pending_free.lock().unwrap())
    }

    /// Puts back blocks taken for freeing when the commit that would free them failed.
    fn restore_pending(&self, blocks: Vec<u64>) {
        self.pending_free.lock().unwrap().extend(blocks);
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

/// The journal being appended to.
struct Journal {
    /// Number of the last flush commit that completed (commits are numbered from 1).
    last_done: u64,
    file: File,
    generation: u64,
    next_seq: u64,
    len: u64,
    buf: Vec<u8>,
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    pub block_size: u32,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub volumes: Vec<VolumeStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeStatus {
    pub name: String,
    pub size_bytes: u64,
    pub mapped_bytes: u64,
}

/// Keeps data blocks looked up by I/O in progress from being handed out again (an SRCU-like
/// grace period). Every read or write pins the current epoch for as long as it uses a mapping
/// it looked up; a flush, before it frees the blocks it unmapped, moves to the next epoch and
/// waits until every I/O pinned to the previous one has finished. I/O that starts after the
/// move looks up after the unmapping and cannot reach the freed blocks.
struct Epochs {
    current: AtomicU64,
    pinned: [AtomicU64; 2],
}

/// One I/O's pin on an epoch; unpinned on drop.
pub(crate) struct Pin<'a> {
    epochs: &'a Epochs,
    slot: usize,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.epochs.pinned[self.slot].fetch_sub(1, Ordering::Release);
    }
}

impl Epochs {
    fn pin(&self) -> Pin<'_> {
        Pin {
            epochs: self,
            slot: self.pin_raw(),
        }
    }

    /// Pins the current epoch; returns the slot to unpin.
    fn pin_raw(&self) -> usize {
        loop {
            let e = self.current.load(Ordering::Acquire);
            let slot = (e & 1) as usize;
            self.pinned[slot].fetch_add(1, Ordering::SeqCst);
            // SeqCst pairs with the flusher's move: either it sees this pin, or this I/O sees
            // the new epoch and retries there.
            if self.current.load(Ordering::SeqCst) == e {
                return slot;
            }
            self.pinned[slot].fetch_sub(1, Ordering::Release);
        }
    }

    /// Moves to the next epoch and waits until no I/O is pinned to the previous one.
    fn wait_for_readers(&self) {
        let old = self.current.fetch_add(1, Ordering::SeqCst);
        let slot = (old & 1) as usize;
        while self.pinned[slot].load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

/// An open thin pool.
pub struct Pool {
    epochs: Epochs,
    /// A commit failed after its sync: nothing can be promised any more (see `poison`).
    poisoned: std::sync::atomic::AtomicBool,
    /// One grace period at a time: two overlapping ones would each wait on one slot only.
    grace: Mutex<()>,
    /// Flush commits started (group commit: see `flush`).
    commits_started: AtomicU64,
    /// Holds an exclusive flock on DIR/lock while the pool is open: two processes (a daemon
    /// and the pool tool) must never change one pool at once.
    _lock: Option<File>,
    dir: PathBuf,
    block_size: u32,
    data_blocks: u64,
    data: File,
    volumes: RwLock<Vec<Arc<Volume>>>,
    alloc: Allocator,
    journal: Mutex<Journal>,
}

fn checkpoint_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("checkpoint.{generation}"))
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal.{generation}"))
}

/// Bytes of a block device or regular file.
fn device_size(path: &Path) -> Result<u64, ThinError> {
    use std::os::unix::fs::FileTypeExt;
    let f = File::open(path)
        .map_err(|e| ThinError::Invalid(format!("data device {}: {e}", path.display())))?;
    let meta = f.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64.
        if unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0x8008_1272, // BLKGETSIZE64
                &mut size,
            )
        } != 0
        {
            return Err(io::Error::last_os_error().into());
        }
        Ok(size)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        Err(ThinError::Invalid(format!(
            "data device {}: not a block device or file",
            path.display()
        )))
    }
}

/// Most blocks one volume may map: its map is one u64 per block, held in memory (2 GiB at
/// this limit; 16 TiB volumes at the default 64 KiB blocks). Thin volumes may be larger than
/// the pool, but not unboundedly: a size like 8E would otherwise abort on allocation.
const MAX_VOLUME_BLOCKS: u64 = 1 << 28;

fn check_volume_size(size_bytes: u64, block_size: u32) -> Result<(), ThinError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
        return Err(ThinError::Invalid(format!(
            "volume size {size_bytes}: a non-zero multiple of 512 bytes"
        )));
    }
    let block = u64::from(block_size);
    if size_bytes.div_ceil(block) > MAX_VOLUME_BLOCKS {
        return Err(ThinError::Invalid(format!(
            "volume size {size_bytes}: at most {} bytes with this pool's {block}-byte blocks",
            MAX_VOLUME_BLOCKS * block
        )));
    }
    Ok(())
}

fn index_of(volumes: &[Arc<Volume>], name: &str) -> Result<usize, ThinError> {
    volumes
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| ThinError::NoVolume(name.into()))
}

/// Takes every volume's dirty bits: (volume index, word, bits) for each non-empty word.
fn take_dirty(volumes: &[Arc<Volume>]) -> Vec<(usize, usize, u64)> {
    let mut taken = Vec::new();
    for (vi, v) in volumes.iter().enumerate() {
        for (w, word) in v.dirty.iter().enumerate() {
            let bits = word.swap(0, Ordering::AcqRel);
            if bits != 0 {
                taken.push((vi, w, bits));
            }
        }
    }
    taken
}

/// Puts back dirty bits a failed commit took, so the next commit carries them.
fn put_back_dirty(volumes: &[Arc<Volume>], taken: &[(usize, usize, u64)]) {
    for &(vi, w, bits) in taken {
        volumes[vi].dirty.at(w).fetch_or(bits, Ordering::AcqRel);
    }
}

fn lock_pool(dir: &Path) -> Result<File, ThinError> {
    if !dir.join("superblock").is_file() {
        return Err(ThinError::Invalid(format!(
            "{}: not a pool (no superblock)",
            dir.display()
        )));
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(|e| ThinError::Invalid(format!("{}: not a pool: {e}", dir.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(ThinError::Invalid(format!(
            "{} is in use by another process (a running pollblk serving it?)",
            dir.display()
        )));
    }
    Ok(lock)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` durably, replacing it atomically (write, fsync, rename, fsync dir).
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

impl Pool {
    /// Creates a pool in `dir` (which must not hold one) with a sparse data file of
    /// `size_bytes` rounded down to whole blocks.
    pub fn create(dir: &Path, size_bytes: u64, block_size: u32) -> Result<Pool, ThinError> {
        Pool::create_on(dir, None, Some(size_bytes), block_size)
    }

    /// Creates a pool in `dir` whose data lives on `data_device` (a block device or an
    /// existing file; DIR/data links to it), or in a new sparse DIR/data when None. The size
    /// is the device's unless `size_bytes` asks for less; without a device it is required.
    pub fn create_on(
        dir: &Path,
        data_device: Option<&Path>,
        size_bytes: Option<u64>,
        block_size: u32,
    ) -> Result<Pool, ThinError> {
        if !block_size.is_power_of_two()
            || !(format::MIN_BLOCK_SIZE..=format::MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(ThinError::Invalid(format!(
                "block size {block_size}: expected a power of two from 4 KiB to 2 MiB"
            )));
        }
        std::fs::create_dir_all(dir)?;
        if dir.join("superblock").exists() {
            return Err(ThinError::Invalid(format!(
                "{} holds a pool already",
                dir.display()
            )));
        }
        let size_bytes = match data_device {
            Some(dev) => {
                let available = device_size(dev)?;
                match size_bytes {
                    Some(s) if s > available => {
                        return Err(ThinError::Invalid(format!(
                            "--size {s} is larger than {} ({available} bytes)",
                            dev.display()
                        )))
                    }
                    Some(s) => s,
                    None => available,
                }
            }
            None => size_bytes.ok_or_else(|| ThinError::Invalid("a pool size is needed".into()))?,
        };
        let data_blocks = size_bytes / u64::from(block_size);
        if data_blocks == 0 {
            return Err(ThinError::Invalid(format!(
                "pool size {size_bytes} holds no whole block of {block_size} bytes"
            )));
        }
        match data_device {
            Some(dev) => {
                let target = dev.canonicalize()?;
                std::os::unix::fs::symlink(&target, dir.join("data"))?;
            }
            None => {
                let data = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(dir.join("data"))?;
                data.set_len(data_blocks * u64::from(block_size))?;
                data.sync_all()?;
            }
        }
        let generation = 1;
        let mut checkpoint = Vec::new();
        Record::Commit { records: 0 }.encode_into(generation, 0, &mut checkpoint);
        replace_file(dir, &format!("checkpoint.{generation}"), &checkpoint)?;
        replace_file(dir, &format!("journal.{generation}"), &[])?;
        let sb = Superblock {
            block_size,
            data_blocks,
            generation,
        };
        replace_file(dir, "superblock", &sb.encode())?;
        Pool::open(dir)
    }

    /// Opens the pool in `dir`: the checkpoint of the superblock's generation, then every
    /// complete commit of its journal. A torn last commit is cut off.
    pub fn open(dir: &Path) -> Result<Pool, ThinError> {
        Pool::load(dir, true)
    }

    /// Reads the durable state of a pool without locking or writing anything, so it works
    /// while a daemon serves the pool: what the last completed commit left on disk.
    pub fn inspect(dir: &Path) -> Result<PoolStatus, ThinError> {
        Ok(Pool::load(dir, false)?.status())
    }

    fn load(dir: &Path, writable: bool) -> Result<Pool, ThinError> {
        let lock = if writable {
            Some(lock_pool(dir)?)
        } else {
            None
        };
        let mut raw = Vec::new();
        File::open(dir.join("superblock"))
            .map_err(|e| ThinError::Invalid(format!("{}: not a pool: {e}", dir.display())))?
            .read_to_end(&mut raw)?;
        let sb = Superblock::decode(&raw)?;
        let checkpoint = std::fs::read(checkpoint_path(dir, sb.generation))?;
        let (records, used, next) = format::read_commits(&checkpoint, sb.generation, 0);
        if used != checkpoint.len() {
            return Err(FormatError::Corrupt("checkpoint is incomplete").into());
        }
        let _ = next;
        let journal_bytes = std::fs::read(journal_path(dir, sb.generation))?;
        let (journaled, journal_len, next_seq) =
            format::read_commits(&journal_bytes, sb.generation, 0);
        let data = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(dir.join("data"))?;
        let pool = Pool {
            poisoned: std::sync::atomic::AtomicBool::new(false),
            grace: Mutex::new(()),
            commits_started: AtomicU64::new(0),
            epochs: Epochs {
                current: AtomicU64::new(0),
                pinned: [AtomicU64::new(0), AtomicU64::new(0)],
            },
            _lock: lock,
            dir: dir.to_path_buf(),
            block_size: sb.block_size,
            data_blocks: sb.data_blocks,
            data,
            volumes: RwLock::new(Vec::new()),
            alloc: Allocator::new(sb.data_blocks),
            journal: Mutex::new(Journal {
                last_done: 0,
                file: OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(journal_path(dir, sb.generation))?,
                generation: sb.generation,
                next_seq,
                len: journal_len as u64,
                buf: Vec::new(),
            }),
        };
        pool.apply(records.iter().chain(journaled.iter()))?;
        if writable {
            // A torn tail is cut so the next commit follows the last complete one.
            pool.journal
                .lock()
                .unwrap()
                .file
                .set_len(journal_len as u64)?;
        }
        Ok(pool)
    }

    /// Rebuilds the in-memory state from records, checking every block is owned once.
    fn apply<'a>(&self, records: impl Iterator<Item = &'a Record>) -> Result<(), ThinError> {
        let corrupt = |what: &'static str| ThinError::Format(FormatError::Corrupt(what));
        let mut volumes: Vec<Volume> = Vec::new();
        for r in records {
            match r {
                Record::VolumeCreate {
                    id,
                    size_bytes,
                    name,
                } => {
                    if volumes.iter().any(|v| v.id == *id || v.name == *name) {
                        return Err(corrupt("volume created twice"));
                    }
                    volumes.push(Volume::new(*id, name.clone(), *size_bytes, self.block_size));
                }
                Record::VolumeDelete { id } => volumes.retain(|v| v.id != *id),
                Record::VolumeResize { id, size_bytes } => {
                    let at = volumes
                        .iter()
                        .position(|v| v.id == *id)
                        .ok_or(corrupt("resize of an unknown volume"))?;
                    volumes[at].resize(*size_bytes, self.block_size);
                }
                Record::Map { id, vblock, pblock } => {
                    let v = volumes
                        .iter()
                        .find(|v| v.id == *id)
                        .ok_or(corrupt("map entry of an unknown volume"))?;
                    let entry = v
                        .map
                        .get(*vblock as usize)
                        .ok_or(corrupt("map entry past the volume"))?;
                    let value = if *pblock == UNMAPPED {
                        0
                    } else if *pblock < self.data_blocks {
                        pblock + 1
                    } else {
                        return Err(corrupt("map entry past the data file"));
                    };
                    entry.store(value, Ordering::Relaxed);
                }
                Record::Commit { .. } => {}
            }
        }
        for v in &volumes {
            for e in v.map.iter() {
                let value = e.load(Ordering::Relaxed);
                if value != 0 {
                    if self.alloc.is_used(value - 1) {
                        return Err(corrupt("a data block is mapped twice"));
                    }
                    self.alloc.mark_used(value - 1);
                }
            }
        }
        *self.volumes.write().unwrap() = volumes.into_iter().map(Arc::new).collect();
        Ok(())
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, ThinError> {
        self.volumes
            .read()
            .unwrap()
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| ThinError::NoVolume(name.into()))
    }

    /// Creates a volume and commits it.
    pub fn volume_create(&self, name: &str, size_bytes: u64) -> Result<Arc<Volume>, ThinError> {
        if name.is_empty()
            || name.len() > format::MAX_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ThinError::Invalid(format!(
                "volume name {name:?}: 1-{} characters of A-Z a-z 0-9 - _ .",
                format::MAX_NAME
            )));
        }
        check_volume_size(size_bytes, self.block_size)?;
        // Lock order everywhere: journal, then volumes.
        let mut journal = self.journal.lock().unwrap();
        let mut volumes = self.volumes.write().unwrap();
        if volumes.iter().any(|v| v.name == name) {
            return Err(ThinError::VolumeExists(name.into()));
        }
        let id = volumes.iter().map(|v| v.id + 1).max().unwrap_or(1);
        let volume = Arc::new(Volume::new(id, name.into(), size_bytes, self.block_size));
        self.append_commit_locked(
            &mut journal,
            &[Record::VolumeCreate {
                id,
                size_bytes,
                name: name.into(),
            }],
        )?;
        volumes.push(volume.clone());
        self.count_volumes(&volumes);
        Ok(volume)
    }

    /// Deletes a volume; its blocks become free once the deletion is durable (right away).
    pub fn volume_delete(&self, name: &str) -> Result<(), ThinError> {
        let mut journal = self.journal.lock().unwrap();
        let mut volumes = self.volumes.write().unwrap();
        let at = index_of(&volumes, name)?;
        let id = volumes[at].id;
        self.append_commit_locked(&mut journal, &[Record::VolumeDelete { id }])?;
        let volume = volumes.remove(at);
        self.count_volumes(&volumes);
        drop(volumes);
        drop(journal);
        let freeing = volume
            .map
            .iter()
            .filter_map(|e| e.swap(0, Ordering::AcqRel).checked_sub(1))
            .collect();
        self.release_after_grace(freeing);
        Ok(())
    }

    /// Grows or shrinks a volume (shrinking frees the blocks past the new end). Growing may
    /// run while the volume is served: its map grows in place, and requests see the new size
    /// once the resize is journaled. Shrinking is offline: no request may run past the new end
    /// (the pool tool holds the pool's lock; the daemon only grows).
    pub fn volume_resize(&self, name: &str, size_bytes: u64) -> Result<(), ThinError> {
        check_volume_size(size_bytes, self.block_size)?;
        let old = self.volume(name)?;
        let bs = u64::from(self.block_size);
        if size_bytes < old.size_bytes() {
            if !size_bytes.is_multiple_of(bs) {
                // The block that now ends the volume keeps its first part; the rest must read
                // as zeroes should the volume grow again.
                let tail = size_bytes.next_multiple_of(bs).min(old.size_bytes()) - size_bytes;
                self.write_zeroes(&old, size_bytes, tail, true)?;
            }
            // Those zeroes durable before the resize is.
            self.flush()?;
        }
        // Under the journal lock no commit runs between the resize record and the resize in
        // memory: map records of a grown part follow the record that grows it.
        let mut journal = self.journal.lock().unwrap();
        let volume = self.volume(name)?;
        self.append_commit_locked(
            &mut journal,
            &[Record::VolumeResize {
                id: volume.id,
                size_bytes,
            }],
        )?;
        let cut = volume.resize(size_bytes, self.block_size);
        drop(journal);
        self.release_after_grace(cut);
        Ok(())
    }

    /// Publishes the pool's statistics into `stats` from now on. Call before I/O starts: an
    /// allocation racing with this call may be missed by blocks_used.
    pub fn publish_stats(&self, stats: Stats<PoolStat>) {
        stats.set(PoolStat::BlockSize, u64::from(self.block_size));
        stats.set(PoolStat::BlocksTotal, self.data_blocks);
        stats.set(PoolStat::MetadataCommits, self.commits());
        stats.set(PoolStat::Volumes, self.volumes.read().unwrap().len() as u64);
        if self.alloc.stats.set(stats).is_ok() {
            let stats = self.alloc.stats.get().unwrap();
            stats.set(PoolStat::BlocksUsed, self.alloc.used());
        }
    }

    fn count_volumes(&self, volumes: &[Arc<Volume>]) {
        if let Some(stats) = self.alloc.stats.get() {
            stats.set(PoolStat::Volumes, volumes.len() as u64);
        }
    }

    pub fn status(&self) -> PoolStatus {
        let bs = u64::from(self.block_size);
        let used = self.alloc.used();
        PoolStatus {
            block_size: self.block_size,
            size_bytes: self.data_blocks * bs,
            used_bytes: used * bs,
            free_bytes: (self.data_blocks - used) * bs,
            volumes: self
                .volumes
                .read()
                .unwrap()
                .iter()
                .map(|v| VolumeStatus {
                    name: v.name.clone(),
                    size_bytes: v.size_bytes(),
                    mapped_bytes: v.mapped_blocks() * bs,
                })
                .collect(),
        }
    }

    fn check_range(&self, v: &Volume, offset: u64, len: u64) -> Result<(), ThinError> {
        let end = offset.checked_add(len).ok_or(ThinError::OutOfRange)?;
        if end > v.size_bytes() || !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return Err(ThinError::OutOfRange);
        }
        Ok(())
    }

    /// Splits [offset, offset+len) into (virtual block, offset in block, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let (v, within) = (at / bs, at % bs);
            let n = (bs - within).min(end - at);
            at += n;
            Some((v, within, n))
        })
    }

    /// Reads; unmapped blocks read as zeroes.
    pub fn read(&self, v: &Volume, offset: u64, buf: &mut [u8]) -> Result<(), ThinError> {
        self.check_range(v, offset, buf.len() as u64)?;
        let _pin = self.epochs.pin();
        let mut done = 0;
        for (vb, within, n) in self.pieces(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n as usize];
            match v.lookup(vb) {
                Some(p) => self
                    .data
                    .read_exact_at(out, p * u64::from(self.block_size) + within)?,
                None => out.fill(0),
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Writes; a write to an unmapped block allocates it and fills the rest with zeroes.
    pub fn write(&self, v: &Volume, offset: u64, data: &[u8]) -> Result<(), ThinError> {
        self.check_range(v, offset, data.len() as u64)?;
        self.check_poisoned()?;
        let _pin = self.epochs.pin();
        let mut done = 0;
        for (vb, within, n) in self.pieces(offset, data.len() as u64) {
            self.write_block(v, vb, within, Some(&data[done..done + n as usize]))?;
            done += n as usize;
        }
        Ok(())
    }

    /// Writes `data` at `within` of virtual block `vb`, allocating the block if unmapped;
    /// with `data` None it only makes sure the block is allocated (zero-filled if new).
    fn write_block(
        &self,
        v: &Volume,
        vb: u64,
        within: u64,
        data: Option<&[u8]>,
    ) -> Result<(), ThinError> {
        let bs = u64::from(self.block_size);
        loop {
            if let Some(p) = v.lookup(vb) {
                if let Some(data) = data {
                    self.data.write_all_at(data, p * bs + within)?;
                }
                return Ok(());
            }
            // A new block is made whole before it is mapped: its previous contents (another
            // volume's freed data) are never visible, and a commit never journals a mapping
            // whose data is not written yet (the data sync before the commit covers it).
            let p = self.alloc.allocate().ok_or(ThinError::NoSpace)?;
            if let Err(e) = self.fill_new_block(p, within, data) {
                self.alloc.release(p);
                return Err(e.into());
            }
            match v.map.at(vb as usize).compare_exchange(
                0,
                p + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    v.mark_dirty(vb);
                    return Ok(());
                }
                Err(_) => {
                    // Another writer mapped it first; ours was never visible, give it back and
                    // write into theirs.
                    self.alloc.release(p);
                }
            }
        }
    }

    /// Gives new data block `p` its contents: `data` at `within` and zeroes elsewhere. The
    /// zeroes come from punching the block out of the data file (a hole reads as zeroes, and
    /// costs no data write) or, for a provisioned block, from an allocating ZERO_RANGE, where
    /// the file system can; otherwise the block is written whole.
    fn fill_new_block(&self, p: u64, within: u64, data: Option<&[u8]>) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        let start = p * bs;
        if data.is_some_and(|d| d.len() as u64 == bs) {
            return self.data.write_all_at(data.unwrap(), start);
        }
        // A provisioned block (no data) must really hold space: ZERO_RANGE allocates zeroed
        // space; a block being written can be a hole around its data.
        let mode = if data.is_some() {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own.
        let punched = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.data),
                mode,
                start as libc::off_t,
                bs as libc::off_t,
            )
        } == 0;
        if punched {
            if let Some(data) = data {
                self.data.write_all_at(data, start + within)?;
            }
            return Ok(());
        }
        let mut block = vec![0u8; bs as usize];
        if let Some(data) = data {
            block[within as usize..within as usize + data.len()].copy_from_slice(data);
        }
        self.data.write_all_at(&block, start)
    }

    /// Unmaps the whole blocks of a range (they read as zeroes from now on); partial blocks at
    /// the ends are left as they are, which DISCARD allows.
    pub fn discard(&self, v: &Volume, offset: u64, len: u64) -> Result<(), ThinError> {
        self.check_range(v, offset, len)?;
        let bs = u64::from(self.block_size);
        for (vb, _, n) in self.pieces(offset, len) {
            if n == bs {
                self.unmap(v, vb);
            }
        }
        Ok(())
    }

    fn unmap(&self, v: &Volume, vb: u64) {
        let old = v.map.at(vb as usize).swap(0, Ordering::AcqRel);
        if old != 0 {
            v.mark_dirty(vb);
            // Free for reuse only once the unmapping is durable (see Allocator).
            self.alloc.defer_free(old - 1);
        }
    }

    /// Zeroes a range. With `unmap`, whole blocks are unmapped; without, every block of the
    /// range ends up allocated and zeroed. Partial blocks are zeroed in place when mapped
    /// (unmapped ones read as zeroes already, and are allocated without `unmap`).
    pub fn write_zeroes(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), ThinError> {
        self.check_range(v, offset, len)?;
        let _pin = self.epochs.pin();
        let bs = u64::from(self.block_size);
        let zeroes = vec![0u8; bs as usize];
        for (vb, within, n) in self.pieces(offset, len) {
            if unmap && n == bs {
                self.unmap(v, vb);
            } else if v.lookup(vb).is_some() || !unmap {
                self.write_block(v, vb, within, Some(&zeroes[..n as usize]))?;
            }
        }
        Ok(())
    }

    /// Allocates every block of a range (zero-filled if new), so later writes to it cannot
    /// fail for lack of space.
    pub fn provision(&self, v: &Volume, offset: u64, len: u64) -> Result<(), ThinError> {
        self.check_range(v, offset, len)?;
        let _pin = self.epochs.pin();
        for (vb, within, _) in self.pieces(offset, len) {
            self.write_block(v, vb, within, None)?;
        }
        Ok(())
    }

    /// Makes every completed write and map change durable: the map changes are collected,
    /// the data file is synced, then the changes are journaled and the journal synced; blocks
    /// whose unmapping was journaled become free.
    pub fn flush(&self) -> Result<(), ThinError> {
        // Group commit: a commit that starts after this flush arrived covers everything that
        // completed before it, so a flush that waited for the lock while one ran may be done.
        let arrived_after = self.commits_started.load(Ordering::SeqCst);
        let mut journal = self.journal.lock().unwrap();
        if journal.last_done > arrived_after {
            return Ok(());
        }
        self.check_poisoned()?;
        let this_commit = self.commits_started.fetch_add(1, Ordering::SeqCst) + 1;
        // Taken before the map is read: every block in it was unmapped (and marked dirty)
        // before this point, so its unmapping is in this commit or an earlier one.
        let freeing = self.alloc.take_pending();
        let volumes = self.volumes.read().unwrap();
        // Put back if the commit fails, so the changes go into the next one.
        let taken = take_dirty(&volumes);
        let mut records = Vec::new();
        for &(vi, w, bits) in &taken {
            let v = &volumes[vi];
            let mut rest = bits;
            while rest != 0 {
                let vb = w as u64 * 64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let pblock = v.lookup(vb).unwrap_or(UNMAPPED);
                records.push(Record::Map {
                    id: v.id,
                    vblock: vb,
                    pblock,
                });
            }
        }
        // Data first: a mapping must never be durable before the data it points to.
        let committed = self
            .data
            .sync_data()
            .map_err(ThinError::from)
            .and_then(|_| {
                if records.is_empty() {
                    Ok(())
                } else {
                    self.append_commit_locked(&mut journal, &records)
                }
            });
        if let Err(e) = committed {
            put_back_dirty(&volumes, &taken);
            self.alloc.restore_pending(freeing);
            // After a failed sync the kernel may have dropped the dirty pages it could not
            // write: a later sync that "succeeds" proves nothing. Refuse from here on.
            self.poison(&e);
            return Err(e);
        }
        drop(volumes);
        self.release_after_grace(freeing);
        journal.last_done = this_commit;
        if let Some(stats) = self.alloc.stats.get() {
            stats.shared_add(PoolStat::MetadataCommits, 1);
        }
        if journal.len > CHECKPOINT_AFTER_BYTES {
            self.checkpoint_locked(&mut journal)?;
        }
        Ok(())
    }

    /// Marks the pool failed: every later write and flush returns EIO. Reopening the pool
    /// (restarting the daemon) recovers what the last successful commit made durable.
    fn poison(&self, why: &ThinError) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(pool = %self.dir.display(), error = %why,
                "thin pool metadata commit failed: the pool refuses writes until it is reopened");
        }
    }

    fn check_poisoned(&self) -> Result<(), ThinError> {
        if self.poisoned.load(Ordering::Acquire) {
            Err(ThinError::Io(io::Error::from_raw_os_error(libc::EIO)))
        } else {
            Ok(())
        }
    }

    /// Whether a mapping changed since the last commit (a first write, a discard): what a
    /// periodic commit looks at before syncing anything.
    pub fn has_uncommitted(&self) -> bool {
        self.volumes
            .read()
            .unwrap()
            .iter()
            .any(|v| v.dirty.iter().any(|w| w.load(Ordering::Acquire) != 0))
    }

    /// Commits made by flushes so far (each one a data sync and a journal sync).
    pub fn commits(&self) -> u64 {
        self.journal.lock().unwrap().last_done
    }

    /// Appends records and their Commit marker, then syncs the journal.
    fn append_commit_locked(
        &self,
        journal: &mut Journal,
        records: &[Record],
    ) -> Result<(), ThinError> {
        let generation = journal.generation;
        let mut seq = journal.next_seq;
        let mut buf = std::mem::take(&mut journal.buf);
        buf.clear();
        for r in records {
            r.encode_into(generation, seq, &mut buf);
            seq += 1;
        }
        Record::Commit {
            records: records.len() as u64,
        }
        .encode_into(generation, seq, &mut buf);
        seq += 1;
        journal.file.write_all_at(&buf, journal.len)?;
        journal.file.sync_data()?;
        journal.len += buf.len() as u64;
        journal.next_seq = seq;
        journal.buf = buf;
        Ok(())
    }

    /// Writes the whole state as a new checkpoint with an empty journal, then switches the
    /// superblock to it; the old files stay valid until the rename.
    pub fn checkpoint(&self) -> Result<(), ThinError> {
        self.flush()?;
        let mut journal = self.journal.lock().unwrap();
        self.checkpoint_locked(&mut journal)
    }

    fn checkpoint_locked(&self, journal: &mut Journal) -> Result<(), ThinError> {
        self.check_poisoned()?;
        let old = journal.generation;
        let generation = old + 1;
        let freeing = self.alloc.take_pending();
        let volumes = self.volumes.read().unwrap();
        // The checkpoint holds every entry: the dirty bits are covered (put back on failure).
        let taken = take_dirty(&volumes);
        let mut records = Vec::new();
        for v in volumes.iter() {
            records.push(Record::VolumeCreate {
                id: v.id,
                size_bytes: v.size_bytes(),
                name: v.name.clone(),
            });
            for (vb, e) in v.map.iter().enumerate() {
                let value = e.load(Ordering::Acquire);
                if value != 0 {
                    records.push(Record::Map {
                        id: v.id,
                        vblock: vb as u64,
                        pblock: value - 1,
                    });
                }
            }
        }
        let restore = |e: ThinError| {
            put_back_dirty(&volumes, &taken);
            self.alloc.restore_pending(freeing.clone());
            e
        };
        self.data.sync_data().map_err(|e| restore(e.into()))?;
        let mut bytes = Vec::new();
        for (seq, r) in records.iter().enumerate() {
            r.encode_into(generation, seq as u64, &mut bytes);
        }
        Record::Commit {
            records: records.len() as u64,
        }
        .encode_into(generation, records.len() as u64, &mut bytes);
        // Until the superblock is renamed, generation `old` stays current and whole: a failure
        // here leaves everything as it was (the changes go into the next commit).
        replace_file(&self.dir, &format!("checkpoint.{generation}"), &bytes)
            .and_then(|_| replace_file(&self.dir, &format!("journal.{generation}"), &[]))
            .map_err(|e| restore(e.into()))?;
        let next_journal = OpenOptions::new()
            .write(true)
            .open(journal_path(&self.dir, generation))
            .map_err(|e| restore(e.into()))?;
        let sb = Superblock {
            block_size: self.block_size,
            data_blocks: self.data_blocks,
            generation,
        };
        let renamed = replace_file(&self.dir, "superblock", &sb.encode());
        if let Err(e) = renamed {
            // The rename may or may not have happened: which generation a reopen will read
            // is unknown, so nothing more may be committed in this process.
            let e = restore(e.into());
            self.poison(&e);
            return Err(e);
        }
        *journal = Journal {
            last_done: journal.last_done,
            file: next_journal,
            generation,
            next_seq: 0,
            len: 0,
            buf: std::mem::take(&mut journal.buf),
        };
        drop(volumes);
        let _ = std::fs::remove_file(checkpoint_path(&self.dir, old));
        let _ = std::fs::remove_file(journal_path(&self.dir, old));
        self.release_after_grace(freeing);
        Ok(())
    }

    /// Frees blocks whose unmapping is durable, once no I/O that may have looked them up
    /// before the unmapping is still using them.
    fn release_after_grace(&self, freeing: Vec<u64>) {
        if freeing.is_empty() {
            return;
        }
        let _one_at_a_time = self.grace.lock().unwrap();
        self.epochs.wait_for_readers();
        for p in freeing {
            self.alloc.release(p);
        }
    }

    #[cfg(test)]
    pub(crate) fn pin(&self) -> Pin<'_> {
        self.epochs.pin()
    }

    /// The data file, for I/O submitted elsewhere (io_uring) to blocks `map_one` resolved.
    pub fn data_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.data)
    }

    /// For an I/O that lies within one mapped block: its offset in the data file and a pinned
    /// epoch slot, which the caller must pass to `unpin` once the I/O is done (the block stays
    /// allocated to this volume until then). None when the range is unmapped, spans blocks or
    /// is out of range: take the general path.
    pub fn map_one(&self, v: &Volume, offset: u64, len: u64) -> Option<(u64, usize)> {
        let bs = u64::from(self.block_size);
        if len == 0
            || self.check_range(v, offset, len).is_err()
            || offset / bs != (offset + len - 1) / bs
        {
            return None;
        }
        let slot = self.epochs.pin_raw();
        match v.lookup(offset / bs) {
            Some(p) => Some((p * bs + offset % bs, slot)),
            None => {
                self.unpin(slot);
                None
            }
        }
    }

    /// Ends an I/O begun with `map_one`.
    pub fn unpin(&self, slot: usize) {
        self.epochs.pinned[slot].fetch_sub(1, Ordering::Release);
    }
}

/// Verifies the durable state of a pool (superblock, checkpoint and journal checksums, every
/// mapped block inside the data file and owned once) and reports what it holds; writes
/// nothing, takes no lock, so it works on a pool a daemon serves. Inconsistency is an error.
pub fn check(dir: &Path) -> Result<PoolStatus, ThinError> {
    Pool::inspect(dir)
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
