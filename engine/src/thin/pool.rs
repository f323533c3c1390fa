//! A thin pool: volumes whose blocks are mapped, on first write, onto data blocks of one
//! shared data file; metadata in a checkpoint plus a journal (see the module docs of
//! `thin` for the crash-consistency argument).
//!
//! Map lookups take no lock: each volume's map is an array of atomics (0 = unmapped, else the
//! data block + 1), and a new mapping is installed with compare-and-swap. Allocation, commits
//! and volume management take locks; they are not per-request work for an overwrite or a read.

use super::alloc::Allocator;
use super::format::{self, FormatError, Record, Superblock, UNMAPPED};
use super::stable::StableArray;
use crate::stats::sets::PoolStat;
use crate::stats::Stats;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

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
    /// A write to a snapshot.
    ReadOnly(String),
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
            ThinError::ReadOnly(n) => write!(f, "volume {n:?} is a snapshot: read-only"),
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

/// One thin volume, snapshot or clone.
pub struct Volume {
    pub id: u32,
    pub name: String,
    /// A snapshot: read-only, its map never changes.
    pub snapshot: bool,
    /// The volume this one was copied from while that one lives (0: none). A checkpoint
    /// writes a clone of a snapshot as its differences from the snapshot.
    pub(super) origin: AtomicU32,
    /// Changes wait while a snapshot of this volume is taken (see snapshot.rs).
    pub(super) frozen: AtomicBool,
    size_bytes: AtomicU64,
    /// Per virtual block: 0 = unmapped, else data block + 1. Grows in place (see stable.rs).
    pub(super) map: StableArray,
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
            snapshot: false,
            origin: AtomicU32::new(0),
            frozen: AtomicBool::new(false),
            size_bytes: AtomicU64::new(size_bytes),
            map: StableArray::new(blocks, max),
            dirty: StableArray::new(blocks.div_ceil(64), max.div_ceil(64)),
        }
    }

    /// A volume holding `from`'s size and map (the caller counts the shared references).
    pub(super) fn copy_of(
        from: &Volume,
        id: u32,
        name: String,
        snapshot: bool,
        block_size: u32,
    ) -> Volume {
        let mut copy = Volume::new(id, name, from.size_bytes(), block_size);
        copy.snapshot = snapshot;
        copy.origin = AtomicU32::new(from.id);
        for (to, e) in copy.map.iter().zip(from.map.iter()) {
            to.store(e.load(Ordering::Acquire), Ordering::Relaxed);
        }
        copy
    }

    /// The data blocks this volume maps.
    pub(super) fn mapped(&self) -> impl Iterator<Item = u64> + '_ {
        self.map
            .iter()
            .filter_map(|e| e.load(Ordering::Acquire).checked_sub(1))
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

    pub(super) fn mark_dirty(&self, v: u64) {
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

/// The journal being appended to.
pub(super) struct Journal {
    /// Number of the last flush commit that completed (commits are numbered from 1).
    last_done: u64,
    /// The pool's metadata format version (the superblock's).
    pub(super) version: u32,
    file: File,
    pub(super) generation: u64,
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
    /// Mapped bytes no other volume shares: what deleting this one frees.
    pub owned_bytes: u64,
    /// Mapped bytes shared with a snapshot, its volume or other clones.
    pub shared_bytes: u64,
    pub snapshot: bool,
    /// The volume this one was copied from, while it exists.
    pub origin: Option<String>,
}

/// Keeps data blocks looked up by I/O in progress from being handed out again (an SRCU-like
/// grace period). Every read or write pins the current epoch for as long as it uses a mapping
/// it looked up; a flush, before it frees the blocks it unmapped, moves to the next epoch and
/// waits until every I/O pinned to the previous one has finished. I/O that starts after the
/// move looks up after the unmapping and cannot reach the freed blocks.
pub(super) struct Epochs {
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
    pub(super) fn pin(&self) -> Pin<'_> {
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
    pub(super) fn wait_for_readers(&self) {
        let old = self.current.fetch_add(1, Ordering::SeqCst);
        let slot = (old & 1) as usize;
        while self.pinned[slot].load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

/// An open thin pool.
pub struct Pool {
    pub(super) epochs: Epochs,
    /// A commit failed after its sync: nothing can be promised any more (see `poison`).
    poisoned: std::sync::atomic::AtomicBool,
    /// One grace period at a time: two overlapping ones would each wait on one slot only.
    pub(super) grace: Mutex<()>,
    /// Changes to a frozen volume wait here for its thaw (snapshot.rs).
    pub(super) thaw: (Mutex<()>, Condvar),
    /// Held by one snapshot or clone at a time.
    pub(super) copies: Mutex<()>,
    /// Flush commits started (group commit: see `flush`).
    commits_started: AtomicU64,
    /// Holds an exclusive flock on DIR/lock while the pool is open: two processes (a daemon
    /// and the pool tool) must never change one pool at once.
    _lock: Option<File>,
    pub(super) dir: PathBuf,
    pub(super) block_size: u32,
    pub(super) data_blocks: u64,
    pub(super) data: File,
    pub(super) volumes: RwLock<Vec<Arc<Volume>>>,
    pub(super) alloc: Allocator,
    pub(super) journal: Mutex<Journal>,
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

/// A volume record's id and name are new among `volumes`.
fn check_new(volumes: &[Volume], id: u32, name: &str) -> Result<(), ThinError> {
    match volumes.iter().any(|v| v.id == id || v.name == name) {
        true => Err(ThinError::Format(FormatError::Corrupt(
            "volume created twice",
        ))),
        false => Ok(()),
    }
}

pub(super) fn check_volume_name(name: &str) -> Result<(), ThinError> {
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
    Ok(())
}

pub(super) fn index_of(volumes: &[Arc<Volume>], name: &str) -> Result<usize, ThinError> {
    volumes
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| ThinError::NoVolume(name.into()))
}

/// The records of a checkpoint: every volume and its map entries, in creation order. A
/// clone of a snapshot is written as a copy of the snapshot plus the entries where it
/// differs (a snapshot's map never changes), so a hundred clones of one image take little
/// more than the image.
fn checkpoint_records(volumes: &[Arc<Volume>]) -> Vec<Record> {
    let mut records = Vec::new();
    for (at, v) in volumes.iter().enumerate() {
        let origin = v.origin.load(Ordering::Acquire);
        let base = volumes[..at].iter().find(|o| o.id == origin && o.snapshot);
        let size_bytes = v.size_bytes();
        match base {
            Some(o) => {
                records.push(Record::VolumeCopy {
                    from: o.id,
                    id: v.id,
                    snapshot: v.snapshot,
                    name: v.name.clone(),
                });
                if size_bytes != o.size_bytes() {
                    records.push(Record::VolumeResize {
                        id: v.id,
                        size_bytes,
                    });
                }
            }
            // A snapshot of a volume: a copy of nothing, sized, then its entries.
            None if v.snapshot => {
                records.push(Record::VolumeCopy {
                    from: 0,
                    id: v.id,
                    snapshot: true,
                    name: v.name.clone(),
                });
                records.push(Record::VolumeResize {
                    id: v.id,
                    size_bytes,
                });
            }
            None => records.push(Record::VolumeCreate {
                id: v.id,
                size_bytes,
                name: v.name.clone(),
            }),
        }
        for (vb, e) in v.map.iter().enumerate() {
            let value = e.load(Ordering::Acquire);
            let inherited = base
                .and_then(|o| o.map.get(vb))
                .map_or(0, |e| e.load(Ordering::Acquire));
            if value != inherited {
                records.push(Record::Map {
                    id: v.id,
                    vblock: vb as u64,
                    pblock: value.checked_sub(1).unwrap_or(UNMAPPED),
                });
            }
        }
    }
    records
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
pub(super) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
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
            version: format::FORMAT_VERSION,
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

    /// Checks what sharing may look like: a data block mapped by several volumes (a snapshot
    /// and its volume, clones) is mapped at the same virtual block in each, and never twice
    /// in one volume. Anything else is damage a copy could not have made: opening refuses it
    /// (a sort of every mapping: about 0.1 s per million).
    fn check_sharing(&self) -> Result<(), ThinError> {
        let volumes = self.volumes.read().unwrap();
        let mut mappings: Vec<(u64, u64, u32)> = Vec::new();
        for v in volumes.iter() {
            for (vb, e) in v.map.iter().enumerate() {
                if let Some(p) = e.load(Ordering::Relaxed).checked_sub(1) {
                    mappings.push((p, vb as u64, v.id));
                }
            }
        }
        mappings.sort_unstable();
        for pair in mappings.windows(2) {
            let ((p, vb, id), (q, wb, jd)) = (pair[0], pair[1]);
            if p == q && (vb != wb || id == jd) {
                return Err(ThinError::Format(FormatError::Corrupt(
                    "a data block is mapped twice other than by a snapshot or clone",
                )));
            }
        }
        Ok(())
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
            thaw: (Mutex::new(()), Condvar::new()),
            copies: Mutex::new(()),
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
                version: sb.version,
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
        pool.apply(records.iter().chain(journaled.iter()), sb.version)?;
        pool.check_sharing()?;
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
    fn apply<'a>(
        &self,
        records: impl Iterator<Item = &'a Record>,
        version: u32,
    ) -> Result<(), ThinError> {
        let corrupt = |what: &'static str| ThinError::Format(FormatError::Corrupt(what));
        let mut volumes: Vec<Volume> = Vec::new();
        for r in records {
            match r {
                Record::VolumeCopy { .. } if version < format::COPY_FORMAT_VERSION => {
                    return Err(corrupt("a volume copy in a format 1 pool"));
                }
                Record::VolumeCreate {
                    id,
                    size_bytes,
                    name,
                } => {
                    check_new(&volumes, *id, name)?;
                    volumes.push(Volume::new(*id, name.clone(), *size_bytes, self.block_size));
                }
                Record::VolumeCopy {
                    from,
                    id,
                    snapshot,
                    name,
                } => {
                    check_new(&volumes, *id, name)?;
                    let copy = self.replay_copy(&volumes, *from, *id, *snapshot, name)?;
                    volumes.push(copy);
                }
                Record::VolumeDelete { id } => {
                    volumes.retain(|v| v.id != *id);
                    // As `volume_delete` does: an id may be given out again.
                    for v in &volumes {
                        let _ =
                            v.origin
                                .compare_exchange(*id, 0, Ordering::Relaxed, Ordering::Relaxed);
                    }
                }
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
        // Reference counts follow from the maps: they are never stored, so they cannot
        // disagree with them.
        for v in &volumes {
            for p in v.mapped() {
                if self.alloc.is_used(p) {
                    self.alloc.share(p);
                } else {
                    self.alloc.mark_used(p);
                }
            }
        }
        *self.volumes.write().unwrap() = volumes.into_iter().map(Arc::new).collect();
        Ok(())
    }

    /// The volume a `VolumeCopy` record makes: a copy of `from`, or (`from` 0) an empty
    /// one a resize and map records fill in.
    fn replay_copy(
        &self,
        volumes: &[Volume],
        from: u32,
        id: u32,
        snapshot: bool,
        name: &str,
    ) -> Result<Volume, ThinError> {
        if from == 0 {
            let mut empty = Volume::new(id, name.into(), 0, self.block_size);
            empty.snapshot = snapshot;
            return Ok(empty);
        }
        let from = volumes
            .iter()
            .find(|v| v.id == from)
            .ok_or(ThinError::Format(FormatError::Corrupt(
                "copy of an unknown volume",
            )))?;
        Ok(Volume::copy_of(
            from,
            id,
            name.into(),
            snapshot,
            self.block_size,
        ))
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
        check_volume_name(name)?;
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
        for v in volumes.iter() {
            // Its clones live on as volumes of their own.
            let _ = v
                .origin
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        self.count_volumes(&volumes);
        drop(volumes);
        drop(journal);
        // Blocks a snapshot's clones still map lose one reference and stay.
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
        if old.snapshot {
            return Err(ThinError::ReadOnly(name.into()));
        }
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

    pub(super) fn count_volumes(&self, volumes: &[Arc<Volume>]) {
        if let Some(stats) = self.alloc.stats.get() {
            stats.set(PoolStat::Volumes, volumes.len() as u64);
        }
    }

    pub fn status(&self) -> PoolStatus {
        let bs = u64::from(self.block_size);
        let used = self.alloc.used();
        let volumes = self.volumes.read().unwrap();
        PoolStatus {
            block_size: self.block_size,
            size_bytes: self.data_blocks * bs,
            used_bytes: used * bs,
            free_bytes: (self.data_blocks - used) * bs,
            volumes: volumes
                .iter()
                .map(|v| self.volume_status(v, &volumes))
                .collect(),
        }
    }

    fn volume_status(&self, v: &Volume, volumes: &[Arc<Volume>]) -> VolumeStatus {
        let bs = u64::from(self.block_size);
        let (mut owned, mut shared) = (0, 0);
        for p in v.mapped() {
            match self.alloc.is_shared(p) {
                true => shared += bs,
                false => owned += bs,
            }
        }
        let origin = v.origin.load(Ordering::Acquire);
        VolumeStatus {
            name: v.name.clone(),
            size_bytes: v.size_bytes(),
            mapped_bytes: owned + shared,
            owned_bytes: owned,
            shared_bytes: shared,
            snapshot: v.snapshot,
            origin: volumes
                .iter()
                .find(|o| o.id == origin)
                .map(|o| o.name.clone()),
        }
    }

    pub(super) fn check_range(&self, v: &Volume, offset: u64, len: u64) -> Result<(), ThinError> {
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

    /// Appends the (length, mapped) runs of `len` bytes at `offset` of `v` to `runs`, at
    /// most `max` of them (the last may end before the range does). Lock-free map reads.
    pub fn allocation(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        max: usize,
        runs: &mut Vec<(u64, bool)>,
    ) {
        let end = offset.saturating_add(len).min(v.size_bytes());
        for (vb, _, n) in self.pieces(offset, end.saturating_sub(offset)) {
            let mapped = v.lookup(vb).is_some();
            if let Some((run, _)) = runs.last_mut().filter(|(_, m)| *m == mapped) {
                *run += n;
            } else if runs.len() < max {
                runs.push((n, mapped));
            } else {
                return;
            }
        }
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
        let _pin = self.pin_to_change(v)?;
        let mut done = 0;
        for (vb, within, n) in self.pieces(offset, data.len() as u64) {
            self.write_block(v, vb, within, Some(&data[done..done + n as usize]))?;
            done += n as usize;
        }
        Ok(())
    }

    /// Writes `data` at `within` of virtual block `vb`, allocating the block if unmapped;
    /// with `data` None it only makes sure the block is allocated (zero-filled if new).
    pub(super) fn write_block(
        &self,
        v: &Volume,
        vb: u64,
        within: u64,
        data: Option<&[u8]>,
    ) -> Result<(), ThinError> {
        let bs = u64::from(self.block_size);
        loop {
            let old = v.lookup(vb);
            let shared = old.filter(|&p| self.alloc.is_shared(p));
            if let (Some(p), None) = (old, shared) {
                // Ours alone: in place. (Only a snapshot of this volume could share it
                // meanwhile, and that waits for this change: see snapshot.rs.)
                if let Some(data) = data {
                    self.data.write_all_at(data, p * bs + within)?;
                }
                return Ok(());
            }
            // A new block is made whole before it is mapped: its previous contents (another
            // volume's freed data) are never visible, and a commit never journals a mapping
            // whose data is not written yet (the data sync before the commit covers it). A
            // shared block is copied into it first (copy on write).
            let p = self.alloc.allocate().ok_or(ThinError::NoSpace)?;
            let filled = match shared {
                Some(from) => self.copy_block(from, p, within, data),
                None => self.fill_new_block(p, within, data),
            };
            if let Err(e) = filled {
                self.alloc.release(p);
                return Err(e.into());
            }
            let expected = old.map_or(0, |o| o + 1);
            match v.map.at(vb as usize).compare_exchange(
                expected,
                p + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    v.mark_dirty(vb);
                    if let Some(from) = shared {
                        // The other mappings keep it; ours goes once this is durable.
                        self.alloc.defer_unref(from);
                    }
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

    /// Makes data block `p` read as zeroes without writing them: a hole, or with `allocate`
    /// zeroed space the file system has set aside (a provisioned block must not run out of
    /// room later). False where the file system cannot.
    pub(super) fn clear_block(&self, p: u64, allocate: bool) -> bool {
        let bs = u64::from(self.block_size);
        let mode = match allocate {
            true => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            false => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        };
        // SAFETY: fallocate on a descriptor we own.
        let done = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.data),
                mode,
                (p * bs) as libc::off_t,
                bs as libc::off_t,
            )
        };
        done == 0
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
        if self.clear_block(p, data.is_none()) {
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
        let _pin = self.pin_to_change(v)?;
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
            // Unreferenced only once the unmapping is durable (see Allocator).
            self.alloc.defer_unref(old - 1);
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
        let _pin = self.pin_to_change(v)?;
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
        let _pin = self.pin_to_change(v)?;
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
        let volumes = self.volumes.read().unwrap();
        let freeing = self.commit_locked(&mut journal, &volumes, &[])?;
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

    /// Commits every map change made so far, then `then` (in the same commit): syncs the
    /// data file, then journals the changed map entries and syncs the journal. Returns the
    /// references whose removal this made durable, for `release_after_grace`. On failure
    /// the changes stay pending for the next commit and the pool is poisoned.
    pub(super) fn commit_locked(
        &self,
        journal: &mut Journal,
        volumes: &[Arc<Volume>],
        then: &[Record],
    ) -> Result<Vec<u64>, ThinError> {
        // Taken before the map is read: every block in it was unmapped (and marked dirty)
        // before this point, so its unmapping is in this commit or an earlier one.
        let freeing = self.alloc.take_pending();
        // Put back if the commit fails, so the changes go into the next one.
        let taken = take_dirty(volumes);
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
        records.extend_from_slice(then);
        // Data first: a mapping must never be durable before the data it points to.
        let committed = self
            .data
            .sync_data()
            .map_err(ThinError::from)
            .and_then(|_| {
                if records.is_empty() {
                    Ok(())
                } else {
                    self.append_commit_locked(journal, &records)
                }
            });
        if let Err(e) = committed {
            put_back_dirty(volumes, &taken);
            self.alloc.restore_pending(freeing);
            // After a failed sync the kernel may have dropped the dirty pages it could not
            // write: a later sync that "succeeds" proves nothing. Refuse from here on.
            self.poison(&e);
            return Err(e);
        }
        Ok(freeing)
    }

    /// Marks the pool failed: every later write and flush returns EIO. Reopening the pool
    /// (restarting the daemon) recovers what the last successful commit made durable.
    fn poison(&self, why: &ThinError) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(pool = %self.dir.display(), error = %why,
                "thin pool metadata commit failed: the pool refuses writes until it is reopened");
        }
    }

    pub(super) fn check_poisoned(&self) -> Result<(), ThinError> {
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
    pub(super) fn append_commit_locked(
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
        let records = checkpoint_records(&volumes);
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
            version: journal.version,
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
            version: journal.version,
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

    /// Drops the references of mappings whose removal is durable (freeing each block whose
    /// last one it was), once no I/O that may have looked them up before is still using them.
    pub(super) fn release_after_grace(&self, freeing: Vec<u64>) {
        if freeing.is_empty() {
            return;
        }
        let _one_at_a_time = self.grace.lock().unwrap();
        self.epochs.wait_for_readers();
        for p in freeing {
            self.alloc.unref(p);
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

    /// Most blocks one fast-path I/O may span.
    const MAX_FAST_BLOCKS: u64 = 64;

    /// For an I/O whose blocks are all mapped, one after another in the data file (for a
    /// write: blocks this volume owns alone and may change now): its offset in the data file
    /// and a pinned epoch slot, which the caller must pass to `unpin` once the I/O is done
    /// (the blocks stay allocated to this volume until then). An imported image's blocks
    /// usually are contiguous, so a large read of it is one I/O. None when a block is
    /// unmapped, shared or elsewhere, the range is out of bounds or spans more than
    /// MAX_FAST_BLOCKS blocks, or the volume may not be written now: take the general path.
    pub fn map_one(&self, v: &Volume, offset: u64, len: u64, write: bool) -> Option<(u64, usize)> {
        let bs = u64::from(self.block_size);
        if len == 0
            || self.check_range(v, offset, len).is_err()
            || (offset + len - 1) / bs - offset / bs >= Self::MAX_FAST_BLOCKS
            || (write && v.snapshot)
        {
            return None;
        }
        let slot = self.epochs.pin_raw();
        // After the pin (see `pin_to_change`): a snapshot either waits for this write or
        // this write sees the volume frozen, and then the blocks shared.
        let first = offset / bs;
        let usable = |vb: u64| match v.lookup(vb) {
            Some(_) if write && v.frozen.load(Ordering::SeqCst) => None,
            Some(p) if write && self.alloc.is_shared(p) => None,
            found => found,
        };
        let start = usable(first);
        let contiguous = start.is_some_and(|p| {
            (first + 1..=(offset + len - 1) / bs).all(|vb| usable(vb) == Some(p + (vb - first)))
        });
        match start.filter(|_| contiguous) {
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
/// mapped block inside the data file, shared only as snapshots and clones share; reference
/// counts are derived from the maps, so they agree by construction) and reports what it
/// holds, shared and owned bytes per volume included; writes
/// nothing, takes no lock, so it works on a pool a daemon serves. Inconsistency is an error.
pub fn check(dir: &Path) -> Result<PoolStatus, ThinError> {
    Pool::inspect(dir)
}
