//! Volumes behind virtual disks, shaped like SPDK's bdev function table.
//!
//! A backend turns one block operation into at most one io_uring submission on the calling
//! reactor's ring (so completions come back to the thread that owns the queue), or finishes it
//! on the spot. It never blocks and never allocates per operation.

mod file;
mod null;
#[cfg(feature = "rbd")]
mod rbd;
mod thin;

pub use file::FileBackend;
pub use null::NullBackend;
#[cfg(feature = "rbd")]
pub use rbd::{RbdBackend, RbdOptions};
pub use thin::{ThinBackend, ThinWorkers};

use io_uring::squeue;
use std::io;

/// What a volume is and can do; fixed at open time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Buffer address and length alignment the volume needs (O_DIRECT); 1 when it needs none.
    pub dio_alignment: u32,
    /// Whether data and metadata can be made durable (FLUSH does something).
    pub volatile_cache: bool,
    /// Whether the volume can deallocate ranges (DISCARD, WRITE_ZEROES with unmap).
    pub discard: bool,
}

/// Bits of a TAG_IO user_data a backend may use for itself (`Backend::completed`).
pub const BACKEND_USER_DATA_MASK: u64 = 0xfff << 48;

/// One block operation. Offsets and lengths are in bytes and already range-checked.
#[derive(Clone, Copy, Debug)]
pub enum IoOp {
    /// Read into guest buffers.
    Read {
        offset: u64,
        iov: *const libc::iovec,
        iov_count: u32,
    },
    /// Write from guest buffers; `fua` makes this write durable before it completes.
    Write {
        offset: u64,
        iov: *const libc::iovec,
        iov_count: u32,
        fua: bool,
    },
    /// Make every completed write durable. With `before_next`, the operation the caller
    /// submits next for the same request starts only after the flush finished (a preflush:
    /// blkif's FLUSH_DISKCACHE with data). Backends that complete flushes synchronously
    /// satisfy it trivially; the file backend links the two io_uring operations.
    Flush { before_next: bool },
    /// Deallocate a range; later reads return zeroes.
    Discard { offset: u64, len: u64 },
    /// Zero a range, keeping it allocated unless `unmap`.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// Allocate a range so later writes to it cannot fail for lack of space (contents
    /// unchanged).
    Provision { offset: u64, len: u64 },
}

/// How a backend took an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// An SQE carrying the caller's user_data was pushed; its CQE finishes the operation.
    Queued,
    /// Finished without I/O: the result is what a CQE would carry (0 or bytes, or -errno).
    Done(i32),
    /// Handed to another thread, which calls `Completer::complete(user_data, result)` exactly
    /// once when it is done; the iovecs stay valid until then.
    Deferred,
    /// Not now: the backend is out of resources and took nothing (no SQE pushed, nothing
    /// handed on). The volume layer holds the request and offers the same operation again
    /// later; it is never failed for this. Not allowed for the operation that follows a
    /// `Flush { before_next: true }` the backend queued (the two are linked).
    Busy,
}

/// Hands completions of deferred operations back to the reactor that submitted them, without
/// a lock: a channel the reactor drains, and an eventfd its io_uring watches so a sleeping
/// reactor wakes. The reactor stays the only writer of its used rings.
#[derive(Clone)]
pub struct Completer {
    tx: crossbeam_channel::Sender<(u64, i32)>,
    wake: std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
}

impl Completer {
    /// A completer that sends to `tx` and signals `wake` (the reactor makes its own; tests
    /// and benchmarks make one to call backends outside a reactor).
    pub fn new(
        tx: crossbeam_channel::Sender<(u64, i32)>,
        wake: std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
    ) -> Completer {
        Completer { tx, wake }
    }

    /// Completes the deferred operation `user_data` with `result` (bytes or -errno).
    pub fn complete(&self, user_data: u64, result: i32) {
        // The reactor outlives its queues' requests (a queue stops only when none is in
        // flight), so the receiver is alive while anything is deferred.
        let _ = self.tx.send((user_data, result));
        let _ = self.wake.write(1);
    }
}

/// A volume. Shared by the reactors that serve its queues; `submit` is called from them.
pub trait Backend: Send + Sync {
    /// What the volume is.
    fn info(&self) -> BackendInfo;

    /// Starts `op`. The caller guarantees a free SQ entry and keeps the iovecs (and the
    /// memory they point to) alive until the CQE arrives or `completer` is called.
    fn submit(
        &self,
        op: &IoOp,
        user_data: u64,
        sq: &mut squeue::SubmissionQueue<'_>,
        completer: &Completer,
    ) -> Submitted;

    /// Makes everything written durable (shutdown, detach); may block.
    fn sync_all(&self) -> io::Result<()>;

    /// Grows the volume to `size_bytes` (larger than now). Called from the control plane
    /// while requests run: data already there must stay where they find it, and the new size
    /// must be visible to `info` only once the new range can be served; may block.
    fn grow(&self, _size_bytes: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kind of volume cannot be resized",
        ))
    }

    /// Called by the reactor with the user_data of each CQE of an SQE this backend pushed,
    /// before the request finishes. Bits 48..60 of user_data are the backend's own: it may
    /// set them on its SQEs (the reactor ignores them) to find its state here.
    fn completed(&self, _user_data: u64) {}

    /// Which parts of `len` bytes at `offset` hold data: appends (length, allocated) runs in
    /// order, covering the range (at most `max` of them; the last may end early), and
    /// returns true; false if the volume cannot tell (everything then counts as data). For
    /// NBD's `base:allocation`; called on the reactor, so it must not block for long.
    fn allocation(
        &self,
        _offset: u64,
        _len: u64,
        _max: usize,
        _runs: &mut Vec<(u64, bool)>,
    ) -> bool {
        false
    }
}
