//! Ceph RBD images through librbd's asynchronous API (cargo feature `rbd`).
//!
//! One image handle per exported image, shared by the reactors serving its queues (librbd's
//! image handles take concurrent asynchronous calls). Every operation is handed to librbd
//! (`Submitted::Deferred`); librbd completes it on one of its own threads, whose callback
//! passes the result to the submitting reactor's `Completer` (a channel the reactor drains and
//! an eventfd its io_uring watches), so the reactor stays the only writer of its used ring.
//!
//! Settings forced at connect: `rbd_cache = false` (a completed write is on the OSDs, so
//! write-through needs nothing more and FLUSH has nothing volatile to write), and
//! `rados_osd_op_timeout` / `rados_mon_op_timeout` = the export's timeout, without which
//! librbd waits forever on a stalled OSD; a timed-out operation fails with -ETIMEDOUT, which
//! the guest sees as IOERR.
//!
//! Buffer lifetimes: the guest buffers behind an operation's iovecs stay mapped until the
//! request completes (the reactor holds the memory table and the slot), and librbd copies the
//! iovec array itself at submission (and, with its default rbd_disable_zero_copy_writes, the
//! write data too), so nothing of ours is referenced after the callback.

mod ffi;

use super::{Backend, BackendInfo, Completer, IoOp, Submitted};
use io_uring::squeue;
use std::ffi::{CStr, CString};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which image, on which cluster, as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdOptions {
    pub pool: String,
    pub image: String,
    /// ceph.conf; None: librados's default search ($CEPH_CONF, /etc/ceph/ceph.conf, ...).
    pub conf: Option<PathBuf>,
    /// Client id without "client." (default "admin").
    pub client: Option<String>,
    /// Most time an operation may wait on the cluster before it fails.
    pub timeout: Duration,
    pub readonly: bool,
}

impl RbdOptions {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
}

/// An open RBD image.
pub struct RbdBackend {
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
    image: ffi::rbd_image_t,
    /// The image's size: set at open, raised by `grow`.
    size: AtomicU64,
    fsid: String,
}

// SAFETY: librados cluster handles, io contexts and librbd image handles may be used from
// any thread, concurrently for asynchronous I/O (librbd locks internally); pollblk closes
// them only in Drop, when no operation is in flight.
unsafe impl Send for RbdBackend {}
// SAFETY: as Send.
unsafe impl Sync for RbdBackend {}

fn check(what: &str, rc: i32) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::from_raw_os_error(-rc);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::other(format!("{what} {s:?} contains a NUL byte")))
}

impl RbdBackend {
    /// Connects to the cluster and opens the image (taking its exclusive lock on first write).
    pub fn open(options: &RbdOptions) -> io::Result<RbdBackend> {
        let mut backend = RbdBackend {
            cluster: std::ptr::null_mut(),
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
            size: AtomicU64::new(0),
            fsid: String::new(),
        };
        let name = cstring(
            "client",
            &format!("client.{}", options.client.as_deref().unwrap_or("admin")),
        )?;
        // SAFETY: each call gets valid C strings and out-pointers; on failure `backend` is
        // dropped and Drop releases whatever was made (null handles are skipped).
        unsafe {
            check(
                "rados_create2",
                ffi::rados_create2(&mut backend.cluster, c"ceph".as_ptr(), name.as_ptr(), 0),
            )?;
            let conf = match &options.conf {
                Some(path) => Some(cstring("ceph-conf", &path.to_string_lossy())?),
                None => None,
            };
            check(
                "reading the Ceph configuration",
                ffi::rados_conf_read_file(
                    backend.cluster,
                    conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                ),
            )?;
            let secs = options.timeout.as_secs().max(1).to_string();
            for (key, value) in [
                ("rbd_cache", "false"),
                ("rados_osd_op_timeout", secs.as_str()),
                ("rados_mon_op_timeout", secs.as_str()),
                ("client_mount_timeout", secs.as_str()),
            ] {
                let (k, v) = (cstring("option", key)?, cstring("value", value)?);
                check(
                    key,
                    ffi::rados_conf_set(backend.cluster, k.as_ptr(), v.as_ptr()),
                )?;
            }
            check(
                "connecting to the cluster",
                ffi::rados_connect(backend.cluster),
            )?;
            let mut fsid = [0 as libc::c_char; 64];
            check(
                "rados_cluster_fsid",
                ffi::rados_cluster_fsid(backend.cluster, fsid.as_mut_ptr(), fsid.len()),
            )?;
            backend.fsid = CStr::from_ptr(fsid.as_ptr()).to_string_lossy().into_owned();
            let pool = cstring("pool", &options.pool)?;
            check(
                &format!("pool {}", options.pool),
                ffi::rados_ioctx_create(backend.cluster, pool.as_ptr(), &mut backend.ioctx),
            )?;
            let image = cstring("image", &options.image)?;
            let open = if options.readonly {
                ffi::rbd_open_read_only
            } else {
                ffi::rbd_open
            };
            check(
                &format!("image {}/{}", options.pool, options.image),
                open(
                    backend.ioctx,
                    image.as_ptr(),
                    &mut backend.image,
                    std::ptr::null(),
                ),
            )?;
            check(
                "rbd_get_size",
                ffi::rbd_get_size(backend.image, backend.size.get_mut()),
            )?;
        }
        Ok(backend)
    }

    /// The cluster's fsid (to tell clusters apart in logs).
    pub fn fsid(&self) -> &str {
        &self.fsid
    }
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        // SAFETY: handles made by open, released once, in reverse order; no I/O is in flight
        // (queues stop, draining their requests, before their disk goes).
        unsafe {
            if !self.image.is_null() {
                ffi::rbd_close(self.image);
            }
            if !self.ioctx.is_null() {
                ffi::rados_ioctx_destroy(self.ioctx);
            }
            if !self.cluster.is_null() {
                ffi::rados_shutdown(self.cluster);
            }
        }
    }
}

/// What the completion callback needs: whom to tell, and what a successful write reports
/// (librbd completes writes with 0, the reactor expects the byte count).
struct OpContext {
    completer: Completer,
    user_data: u64,
    write_len: Option<i32>,
}

/// Runs on a librbd thread when an operation finishes.
extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut libc::c_void) {
    // SAFETY: `arg` is the Box leaked for this completion in `submit`, taken back once here
    // (librbd calls the callback exactly once); `c` is released after its value is read.
    let ctx = unsafe { Box::from_raw(arg.cast::<OpContext>()) };
    // SAFETY: `c` is this operation's completion, still held.
    let rc = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: released once, after its value was read.
    unsafe { ffi::rbd_aio_release(c) };
    let result = match (rc, ctx.write_len) {
        (rc, _) if rc < 0 => i32::try_from(rc).unwrap_or(-libc::EIO),
        (_, Some(len)) => len,
        (rc, None) => i32::try_from(rc).unwrap_or(-libc::EIO),
    };
    ctx.completer.complete(ctx.user_data, result);
}

fn iov_len(iov: *const libc::iovec, count: u32) -> usize {
    // SAFETY: the caller's iovecs are valid for `count` entries (Backend::submit contract).
    unsafe { std::slice::from_raw_parts(iov, count as usize) }
        .iter()
        .map(|v| v.iov_len)
        .sum()
}

impl Backend for RbdBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            size_bytes: self.size.load(Ordering::Acquire),
            dio_alignment: 1,
            volatile_cache: false,
            discard: true,
        }
    }

    fn grow(&self, size_bytes: u64) -> io::Result<()> {
        // SAFETY: the image handle is open until Drop; rbd_resize is synchronous.
        check("rbd_resize", unsafe {
            ffi::rbd_resize(self.image, size_bytes)
        })?;
        self.size.store(size_bytes, Ordering::Release);
        Ok(())
    }

    fn submit(
        &self,
        op: &IoOp,
        user_data: u64,
        _sq: &mut squeue::SubmissionQueue<'_>,
        completer: &Completer,
    ) -> Submitted {
        let write_len = match *op {
            IoOp::Write { iov, iov_count, .. } => {
                Some(i32::try_from(iov_len(iov, iov_count)).unwrap_or(i32::MAX))
            }
            IoOp::Provision { .. } => return Submitted::Done(-libc::EOPNOTSUPP),
            _ => None,
        };
        // One allocation per operation for the callback's context; librbd itself allocates
        // several per operation (completion, request, bufferlists).
        let ctx = Box::into_raw(Box::new(OpContext {
            completer: completer.clone(),
            user_data,
            write_len,
        }));
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: ctx stays valid until on_complete takes it back (or below, when librbd
        // refused the operation and will not call back); the iovecs and the guest memory they
        // point to stay valid until the completion (Backend::submit contract).
        let rc = unsafe {
            let rc = ffi::rbd_aio_create_completion(ctx.cast(), on_complete, &mut c);
            if rc < 0 {
                drop(Box::from_raw(ctx));
                return Submitted::Done(rc);
            }
            match *op {
                IoOp::Read {
                    offset,
                    iov,
                    iov_count,
                } => ffi::rbd_aio_readv(self.image, iov, iov_count as i32, offset, c),
                IoOp::Write {
                    offset,
                    iov,
                    iov_count,
                    ..
                } => ffi::rbd_aio_writev(self.image, iov, iov_count as i32, offset, c),
                // librbd does not order a later write after this flush (before_next): a
                // preflushed write may become durable before the writes the flush covers.
                IoOp::Flush { .. } => ffi::rbd_aio_flush(self.image, c),
                IoOp::Discard { offset, len } => ffi::rbd_aio_discard(self.image, offset, len, c),
                // A discard below the object's discard granularity is silently dropped by
                // librbd: zeroes must be written with write_zeroes, which may deallocate.
                IoOp::WriteZeroes { offset, len, .. } => {
                    ffi::rbd_aio_write_zeroes(self.image, offset, len as usize, c, 0, 0)
                }
                IoOp::Provision { .. } => unreachable!("refused above"),
            }
        };
        if rc < 0 {
            // SAFETY: librbd refused the operation: no callback will run; release both.
            unsafe {
                ffi::rbd_aio_release(c);
                drop(Box::from_raw(ctx));
            }
            return Submitted::Done(rc);
        }
        Submitted::Deferred
    }

    fn sync_all(&self) -> io::Result<()> {
        // SAFETY: a blocking flush on the open image.
        check("rbd_flush", unsafe { ffi::rbd_flush(self.image) })
    }
}
