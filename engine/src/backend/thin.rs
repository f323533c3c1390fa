//! A thin volume as a backend. Requests run on worker threads against the pool's synchronous
//! API and complete through the reactor's Completer (Submitted::Deferred): the pool's map,
//! allocator and commits are shared by every reactor serving the volume, and a FLUSH (a data
//! sync and a journal commit) must not stall a reactor's other queues.
//!
//! The worker threads belong to the pool ([`ThinWorkers`], shared by every served volume of
//! it): a thousand idle volumes of one pool cost no more threads than one.
//!
//! Fast path: a read or write (not write-through) whose blocks are all mapped, one after
//! another in the data file (for a write: owned by this volume alone), goes straight to the
//! reactor's io_uring on the data file, holding the pool's epoch pin until its CQE (so the
//! blocks cannot be freed and reused under it). Everything else (first writes, copies on
//! write, requests over blocks that lie apart, flush, discard, write-zeroes, provision)
//! takes the worker path: a thread hand-off and a copy through a worker buffer.

use super::{Backend, BackendInfo, Completer, IoOp, Submitted, BACKEND_USER_DATA_MASK};
use crate::thin::{Pool, ThinError, Volume};
use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, squeue, types};
use std::io;
use std::sync::Arc;

/// Worker threads per pool.
const WORKERS_PER_POOL: usize = 4;
/// user_data bits of a fast-path SQE: the pinned epoch slot + 1.
const PIN_SHIFT: u32 = 48;

struct Job {
    volume: Arc<Volume>,
    op: IoOp,
    user_data: u64,
    completer: Completer,
}

// SAFETY: the op's iovecs point into guest memory the reactor keeps mapped and untouched until
// the completion is delivered; only the one worker that takes the job uses them.
unsafe impl Send for Job {}

/// The worker threads of one pool: they run every served volume's slow-path operations and
/// exit once the last holder (the daemon's open pool, each backend) is gone.
pub struct ThinWorkers {
    jobs: Sender<Job>,
}

impl ThinWorkers {
    /// Starts the workers of `pool` (`label` names their threads).
    pub fn start(pool: &Arc<Pool>, label: &str) -> io::Result<Arc<ThinWorkers>> {
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..WORKERS_PER_POOL {
            let (pool, rx) = (pool.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("thin-{label}-{i}"))
                .spawn(move || worker(&pool, &rx))?;
        }
        Ok(Arc::new(ThinWorkers { jobs }))
    }
}

/// A volume of a thin pool.
pub struct ThinBackend {
    pool: Arc<Pool>,
    /// Grows in place (the pool never replaces a volume's map).
    volume: Arc<Volume>,
    workers: Arc<ThinWorkers>,
}

impl ThinBackend {
    /// Serves volume `name` of `pool`, its slow path on the pool's `workers`.
    pub fn open(
        pool: Arc<Pool>,
        workers: Arc<ThinWorkers>,
        name: &str,
    ) -> Result<ThinBackend, ThinError> {
        let volume = pool.volume(name)?;
        Ok(ThinBackend {
            pool,
            volume,
            workers,
        })
    }
}

impl Backend for ThinBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            size_bytes: self.volume.size_bytes(),
            dio_alignment: 1,
            volatile_cache: true,
            discard: true,
        }
    }

    fn submit(
        &self,
        op: &IoOp,
        user_data: u64,
        sq: &mut squeue::SubmissionQueue<'_>,
        completer: &Completer,
    ) -> Submitted {
        if let Some(entry) = self.fast_path(op, user_data) {
            // SAFETY: the caller keeps the iovecs alive until the CQE and reserved an SQ entry.
            unsafe { sq.push(&entry) }.expect("caller reserved an SQ entry");
            return Submitted::Queued;
        }
        let job = Job {
            volume: self.volume.clone(),
            op: *op,
            user_data,
            completer: completer.clone(),
        };
        match self.workers.jobs.send(job) {
            Ok(()) => Submitted::Deferred,
            Err(_) => Submitted::Done(-libc::EIO),
        }
    }

    fn sync_all(&self) -> io::Result<()> {
        self.pool
            .flush()
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn grow(&self, size_bytes: u64) -> io::Result<()> {
        // In place: requests running meanwhile, on the worker or the fast path, map their
        // blocks in the map the pool commits.
        self.pool
            .volume_resize(&self.volume.name, size_bytes)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn allocation(&self, offset: u64, len: u64, max: usize, runs: &mut Vec<(u64, bool)>) -> bool {
        self.pool.allocation(&self.volume, offset, len, max, runs);
        true
    }

    fn completed(&self, user_data: u64) {
        let pin = (user_data & BACKEND_USER_DATA_MASK) >> PIN_SHIFT;
        assert!(pin == 1 || pin == 2, "thin CQE without its epoch pin");
        self.pool.unpin(pin as usize - 1);
    }
}

impl ThinBackend {
    /// An SQE for a read or overwrite of mapped, contiguous blocks, with the epoch pinned.
    fn fast_path(&self, op: &IoOp, user_data: u64) -> Option<squeue::Entry> {
        debug_assert_eq!(user_data & BACKEND_USER_DATA_MASK, 0);
        let fd = types::Fd(self.pool.data_fd());
        let (offset, iov, iov_count, write) = match *op {
            IoOp::Read {
                offset,
                iov,
                iov_count,
            } => (offset, iov, iov_count, false),
            // Write-through needs the map durable too: the worker path flushes.
            IoOp::Write {
                offset,
                iov,
                iov_count,
                fua: false,
            } => (offset, iov, iov_count, true),
            _ => return None,
        };
        let (at, slot) = self
            .pool
            .map_one(&self.volume, offset, iov_len(iov, iov_count), write)?;
        let entry = if write {
            opcode::Writev::new(fd, iov, iov_count).offset(at).build()
        } else {
            opcode::Readv::new(fd, iov, iov_count).offset(at).build()
        };
        Some(entry.user_data(user_data | (slot as u64 + 1) << PIN_SHIFT))
    }
}

fn iov_len(iov: *const libc::iovec, count: u32) -> u64 {
    // SAFETY: the reactor passes `count` valid iovecs.
    unsafe { std::slice::from_raw_parts(iov, count as usize) }
        .iter()
        .map(|v| v.iov_len as u64)
        .sum()
}

/// Runs jobs until the workers' last holder is dropped (the channel closes).
fn worker(pool: &Pool, jobs: &Receiver<Job>) {
    let mut buf = vec![0u8; pool.block_size() as usize];
    while let Ok(job) = jobs.recv() {
        let result = match run(pool, &job.volume, &job.op, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(volume = %job.volume.name, error = %e,
                    "thin volume operation failed");
                -errno(&e)
            }
        };
        job.completer.complete(job.user_data, result);
    }
}

fn errno(e: &ThinError) -> i32 {
    match e {
        ThinError::NoSpace => libc::ENOSPC,
        ThinError::OutOfRange => libc::EINVAL,
        ThinError::ReadOnly(_) => libc::EROFS,
        ThinError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}

/// One operation; Ok(bytes transferred) as a CQE would carry it.
fn run(pool: &Pool, volume: &Volume, op: &IoOp, buf: &mut [u8]) -> Result<i32, ThinError> {
    let bs = buf.len() as u64;
    match *op {
        IoOp::Read {
            offset,
            iov,
            iov_count,
        }
        | IoOp::Write {
            offset,
            iov,
            iov_count,
            ..
        } => {
            // SAFETY: the reactor passes iov_count iovecs that stay valid until completion.
            let iov = unsafe { std::slice::from_raw_parts(iov, iov_count as usize) };
            let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
            let is_write = matches!(op, IoOp::Write { .. });
            let mut cursor = IovCursor::new(iov);
            let mut at = offset;
            let end = offset + total;
            // One block piece at a time, through the worker's buffer.
            while at < end {
                let n = (bs - at % bs).min(end - at) as usize;
                if is_write {
                    cursor.gather(&mut buf[..n]);
                    pool.write(volume, at, &buf[..n])?;
                } else {
                    pool.read(volume, at, &mut buf[..n])?;
                    cursor.scatter(&buf[..n]);
                }
                at += n as u64;
            }
            if let IoOp::Write { fua: true, .. } = op {
                pool.flush()?;
            }
            Ok(total as i32)
        }
        // Synchronous: done before anything submitted after it starts.
        IoOp::Flush { .. } => pool.flush().map(|_| 0),
        IoOp::Discard { offset, len } => pool.discard(volume, offset, len).map(|_| 0),
        IoOp::WriteZeroes { offset, len, unmap } => {
            pool.write_zeroes(volume, offset, len, unmap).map(|_| 0)
        }
        IoOp::Provision { offset, len } => pool.provision(volume, offset, len).map(|_| 0),
    }
}

/// Walks guest buffers in order, copying in or out.
struct IovCursor<'a> {
    iov: &'a [libc::iovec],
    index: usize,
    within: usize,
}

impl<'a> IovCursor<'a> {
    fn new(iov: &'a [libc::iovec]) -> IovCursor<'a> {
        IovCursor {
            iov,
            index: 0,
            within: 0,
        }
    }

    /// Calls `f(guest pointer, length)` for the next `len` bytes of the buffers.
    fn walk(&mut self, mut len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut done = 0;
        while len > 0 {
            let v = &self.iov[self.index];
            let n = (v.iov_len - self.within).min(len);
            // SAFETY: within + n <= iov_len: inside the buffer.
            let p = unsafe { (v.iov_base as *mut u8).add(self.within) };
            f(p, n, done);
            done += n;
            len -= n;
            self.within += n;
            if self.within == v.iov_len {
                self.index += 1;
                self.within = 0;
            }
        }
    }

    /// Copies the next `out.len()` bytes of the buffers into `out`.
    fn gather(&mut self, out: &mut [u8]) {
        self.walk(out.len(), |p, n, at| {
            // SAFETY: p has n readable bytes; out has room at..at+n.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(at), n) }
        });
    }

    /// Copies `data` into the next `data.len()` bytes of the buffers.
    fn scatter(&mut self, data: &[u8]) {
        self.walk(data.len(), |p, n, at| {
            // SAFETY: p has n writable bytes; data has at..at+n.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(at), p, n) }
        });
    }
}
