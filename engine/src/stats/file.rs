//! Writing statistics: a file in the KVM layout, mapped shared, whose values the writers
//! update in place. Readers (other processes) pread or mmap the same file.
//!
//! One writer per value: a queue's file is written only by the reactor that owns the queue, a
//! reactor's by that reactor. Single-writer updates are a relaxed load and a relaxed store (no
//! atomic read-modify-write, no fence): readers may see a value one update late, never a torn
//! one (aligned 8-byte stores). Statistics shared by several threads (a thin pool's) use
//! atomic adds instead; see `Stats::shared_add`.

use super::format::{self, Desc, Header, StatType};
use super::schema::{total_values, Def, Schema};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Mode of statistics files: the owner and the chosen group read them.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the statistics directory.
pub const DIR_MODE: u32 = 0o750;
/// Suffix of statistics files.
pub const FILE_SUFFIX: &str = ".stats";

/// The directory a daemon publishes its statistics files in (`--stats-dir`). Locked for the
/// daemon's lifetime: two daemons never write the same files.
pub struct StatsDir {
    path: PathBuf,
    gid: Option<u32>,
    id_prefix: String,
    _lock: File,
}

impl StatsDir {
    /// Creates (if needed) and locks `path`, removes statistics files a previous daemon left,
    /// and hands out files owned by group `gid` (default: the daemon's group).
    pub fn open(path: &Path, gid: Option<u32>) -> io::Result<StatsDir> {
        // A directory pollblk made (or used before: it has our lock file) is pollblk's to
        // tidy; any other existing directory is left as it is (mode, other files).
        let ours = !path.exists() || path.join("lock").exists();
        std::fs::create_dir_all(path)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(path.join("lock"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                io::Error::other(
                    "another pollblk publishes its statistics in this directory: give this \
                     daemon its own --stats-dir (and --control)",
                )
            } else {
                e
            });
        }
        if ours {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))?;
            if let Some(gid) = gid {
                chown_group(path, gid)?;
            }
        }
        if let Some(gid) = gid {
            chown_group(&path.join("lock"), gid)?;
        }
        for entry in std::fs::read_dir(path)?.filter(|_| ours) {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(FILE_SUFFIX) || name.ends_with(".stats.tmp") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(StatsDir {
            path: path.to_owned(),
            gid,
            id_prefix: format!("pollblk-{}", std::process::id()),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Publishes statistics `S` of object `name` (e.g. "disk0/queue-1"): file
    /// `disk0.queue-1.stats`, id `pollblk-PID/disk0/queue-1`. Removed when dropped.
    pub fn create<S: Schema>(&self, name: &str) -> io::Result<Stats<S>> {
        let id = format!("{}/{name}", self.id_prefix);
        let file_name = format!("{}{FILE_SUFFIX}", name.replace('/', "."));
        let path = self.path.join(&file_name);
        let image = image(&id, S::DEFS)?;
        let tmp = self.path.join(format!("{file_name}.tmp"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        file.write_all(&image.bytes)?;
        if let Some(gid) = self.gid {
            chown_group(&tmp, gid)?;
        }
        std::fs::rename(&tmp, &path)?;
        let map = Mapping::shared(&file, image.bytes.len())?;
        Ok(Stats::new(Arc::new(StatsFile {
            map,
            data_offset: image.data_offset,
            path: Some(path),
        })))
    }
}

fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// A file's bytes before any value is written.
struct Image {
    bytes: Vec<u8>,
    data_offset: usize,
}

/// Lays out header, id, descriptors and a zeroed data block (64-byte aligned).
fn image(id: &str, defs: &[Def]) -> io::Result<Image> {
    let name_size = format::NAME_SIZE as usize;
    if id.len() >= name_size {
        return Err(io::Error::other(format!(
            "statistics id {id:?} is longer than {} bytes",
            name_size - 1
        )));
    }
    let desc_size = format::DESC_FIXED_SIZE + name_size;
    let id_offset = format::HEADER_SIZE;
    let desc_offset = id_offset + name_size;
    let data_offset = (desc_offset + desc_size * defs.len()).next_multiple_of(64);
    let len = data_offset + 8 * total_values(defs);
    let mut bytes = vec![0u8; len];
    let header = Header {
        flags: 0,
        name_size: name_size as u32,
        num_desc: defs.len() as u32,
        id_offset: id_offset as u32,
        desc_offset: desc_offset as u32,
        data_offset: data_offset as u32,
    };
    bytes[..format::HEADER_SIZE].copy_from_slice(&header.encode());
    bytes[id_offset..id_offset + id.len()].copy_from_slice(id.as_bytes());
    let mut value = 0usize;
    for (i, def) in defs.iter().enumerate() {
        assert!(
            def.name.len() < name_size,
            "statistic name {} too long",
            def.name
        );
        assert!(def.size > 0);
        let desc = Desc {
            flags: (def.ty as u32) << format::flags::TYPE_SHIFT
                | (def.unit as u32) << format::flags::UNIT_SHIFT,
            exponent: def.exponent,
            size: def.size,
            offset: (value * 8) as u32,
            bucket_size: 0,
            name: def.name.to_owned(),
        };
        assert!(
            def.ty != StatType::LinearHist,
            "pollblk declares no linear histograms"
        );
        let at = desc_offset + i * desc_size;
        desc.encode(&mut bytes[at..at + desc_size]);
        value += usize::from(def.size);
    }
    Ok(Image { bytes, data_offset })
}

/// A shared or anonymous memory mapping.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn shared(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: maps `len` bytes of a file we just wrote that many bytes to.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn anonymous(bytes: &[u8]) -> Mapping {
        // SAFETY: a private anonymous mapping, then filled from `bytes` of the same length.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                bytes.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(
                ptr != libc::MAP_FAILED,
                "anonymous mapping of statistics failed"
            );
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.cast(), bytes.len());
            Mapping {
                ptr: ptr.cast(),
                len: bytes.len(),
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what new mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A published (or private) statistics file.
pub struct StatsFile {
    map: Mapping,
    data_offset: usize,
    /// Removed when the last handle goes.
    path: Option<PathBuf>,
}

impl StatsFile {
    /// Where the file is, if published.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file's bytes as a reader would see them now (each u64 loaded atomically: writers
    /// may be storing).
    pub fn bytes(&self) -> Vec<u8> {
        assert_eq!(
            self.map.len % 8,
            0,
            "header, descriptors and data are whole u64s"
        );
        let mut out = Vec::with_capacity(self.map.len);
        for i in 0..self.map.len / 8 {
            // SAFETY: 8-aligned offsets inside the page-aligned mapping.
            let word = unsafe { &*(self.map.ptr.add(8 * i) as *const AtomicU64) };
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        out
    }
}

impl Drop for StatsFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

// SAFETY: the mapping is only accessed through AtomicU64 values (data) or read-only copies.
unsafe impl Send for StatsFile {}
// SAFETY: as Send.
unsafe impl Sync for StatsFile {}

/// Writes statistics of schema `S`.
pub struct Stats<S: Schema> {
    file: Arc<StatsFile>,
    values: *const AtomicU64,
    _schema: PhantomData<S>,
}

// SAFETY: values point into the mapping `file` keeps alive; every access is atomic.
unsafe impl<S: Schema> Send for Stats<S> {}
// SAFETY: as Send: shared use is atomic.
unsafe impl<S: Schema> Sync for Stats<S> {}

impl<S: Schema> Clone for Stats<S> {
    fn clone(&self) -> Self {
        Stats::new(self.file.clone())
    }
}

impl<S: Schema> Stats<S> {
    fn new(file: Arc<StatsFile>) -> Stats<S> {
        assert_eq!(file.data_offset % 8, 0);
        assert!(file.data_offset + 8 * total_values(S::DEFS) <= file.map.len);
        // SAFETY: data_offset is inside the mapping (asserted), 8-aligned on a page-aligned
        // mapping.
        let values = unsafe { file.map.ptr.add(file.data_offset) }.cast::<AtomicU64>();
        Stats {
            file,
            values,
            _schema: PhantomData,
        }
    }

    /// Statistics nobody else can read (no statistics directory; tests).
    pub fn private() -> Stats<S> {
        let image = image("pollblk-private", S::DEFS).expect("short id");
        Stats::new(Arc::new(StatsFile {
            map: Mapping::anonymous(&image.bytes),
            data_offset: image.data_offset,
            path: None,
        }))
    }

    pub fn file(&self) -> &Arc<StatsFile> {
        &self.file
    }

    #[inline]
    fn value(&self, slot: usize) -> &AtomicU64 {
        debug_assert!(slot < total_values(S::DEFS));
        // SAFETY: slot < the schema's value count, all inside the mapping (checked in new).
        unsafe { &*self.values.add(slot) }
    }

    /// Current value (first bucket of a histogram).
    pub fn get(&self, s: S) -> u64 {
        self.value(s.slot()).load(Ordering::Relaxed)
    }

    /// Bucket `i` of histogram `s`.
    pub fn bucket(&self, s: S, i: usize) -> u64 {
        assert!(i < usize::from(S::DEFS[s.index()].size));
        self.value(s.slot() + i).load(Ordering::Relaxed)
    }

    /// Adds `n` (single writer).
    #[inline]
    pub fn add(&self, s: S, n: u64) {
        let v = self.value(s.slot());
        v.store(v.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Sets a value (single writer).
    #[inline]
    pub fn set(&self, s: S, n: u64) {
        self.value(s.slot()).store(n, Ordering::Relaxed);
    }

    /// Raises a PEAK value to `n` if higher (single writer).
    #[inline]
    pub fn peak(&self, s: S, n: u64) {
        let v = self.value(s.slot());
        if n > v.load(Ordering::Relaxed) {
            v.store(n, Ordering::Relaxed);
        }
    }

    /// Counts `count` samples of `value` in LOG_HIST `s` (single writer).
    #[inline]
    pub fn log_hist(&self, s: S, value: u64, count: u64) {
        let b = format::log_hist_bucket(value, usize::from(S::DEFS[s.index()].size));
        let v = self.value(s.slot() + b);
        v.store(
            v.load(Ordering::Relaxed).wrapping_add(count),
            Ordering::Relaxed,
        );
    }

    /// Adds `n` where several threads write the same value (atomic add).
    pub fn shared_add(&self, s: S, n: u64) {
        self.value(s.slot()).fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` where several threads write the same value (atomic subtract).
    pub fn shared_sub(&self, s: S, n: u64) {
        self.value(s.slot()).fetch_sub(n, Ordering::Relaxed);
    }
}
