//! A raw image file or block device, read and written through the reactor's io_uring.
//!
//! Opened with O_DIRECT when the file system allows it, so guest data goes from guest memory
//! to the device with no copy and no page cache; the reactor bounces requests whose buffers are
//! not aligned to [`BackendInfo::dio_alignment`]. FLUSH is fdatasync; DISCARD and WRITE_ZEROES
//! with unmap punch holes; WRITE_ZEROES without unmap is FALLOC_FL_ZERO_RANGE.

use super::{Backend, BackendInfo, Completer, IoOp, Submitted};
use io_uring::{opcode, squeue, types};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A file or block device volume.
pub struct FileBackend {
    file: File,
    /// Fixed at open, except size_bytes, which `size` holds (it grows).
    info: BackendInfo,
    size: AtomicU64,
    is_block: bool,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

impl FileBackend {
    /// Opens `path` (which must exist) for serving; `readonly` opens it read-only. O_DIRECT is
    /// used only where the file's offset alignment divides the guest's `block_size`, so every
    /// guest request is a valid direct I/O.
    pub fn open(path: &Path, readonly: bool, block_size: u32) -> io::Result<FileBackend> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(flags)
                .open(path)
        };
        let (mut file, mut direct) = match open(libc::O_DIRECT) {
            Ok(file) => (file, true),
            // tmpfs and some others refuse O_DIRECT; the page cache path still works.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        let mut dio_alignment = 1;
        if direct {
            let (memory, offset) = dio_alignment_of(&file, is_block);
            if offset > block_size {
                file = open(0)?;
                direct = false;
            } else {
                dio_alignment = memory;
            }
        }
        tracing::debug!(path = %path.display(), direct, dio_alignment, "opened");
        if !is_block && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let size_bytes = if is_block {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer given.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
                return Err(io::Error::last_os_error());
            }
            size
        } else {
            meta.len()
        };
        Ok(FileBackend {
            file,
            size: AtomicU64::new(size_bytes),
            is_block,
            info: BackendInfo {
                size_bytes,
                dio_alignment,
                volatile_cache: true,
                discard: true,
            },
        })
    }
}

/// (memory, offset) alignment O_DIRECT needs on this file: statx's DIO alignment when the
/// kernel reports it, the logical sector size for block devices, else a safe 4096.
fn dio_alignment_of(file: &File, is_block: bool) -> (u32, u32) {
    if is_block {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer given.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut sector) } == 0 && sector > 0 {
            return (sector as u32, sector as u32);
        }
    }
    // SAFETY: statx fills the zeroed struct; the empty path with AT_EMPTY_PATH names the fd.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the struct is ours for the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_mem_align > 0 {
        return (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    }
    (4096, 4096)
}

impl Backend for FileBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            size_bytes: self.size.load(Ordering::Acquire),
            ..self.info
        }
    }

    fn grow(&self, size_bytes: u64) -> io::Result<()> {
        if self.is_block {
            // A block device is grown by whoever owns it (lvextend); the disk can then grow
            // up to the device's new size.
            let mut device: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer given.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut device) } != 0 {
                return Err(io::Error::last_os_error());
            }
            if size_bytes > device {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the block device has {device} bytes: grow it first"),
                ));
            }
        } else {
            self.file.set_len(size_bytes)?;
        }
        self.size.store(size_bytes, Ordering::Release);
        Ok(())
    }

    fn submit(
        &self,
        op: &IoOp,
        user_data: u64,
        sq: &mut squeue::SubmissionQueue<'_>,
        _: &Completer,
    ) -> Submitted {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match *op {
            IoOp::Read {
                offset,
                iov,
                iov_count,
            } => opcode::Readv::new(fd, iov, iov_count)
                .offset(offset)
                .build(),
            IoOp::Write {
                offset,
                iov,
                iov_count,
                fua,
            } => opcode::Writev::new(fd, iov, iov_count)
                .offset(offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoOp::Flush { before_next } => {
                let fsync = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                // IO_LINK: the next SQE (the request's write) waits for this one, and is
                // cancelled if it fails.
                if before_next {
                    fsync.flags(squeue::Flags::IO_LINK)
                } else {
                    fsync
                }
            }
            IoOp::Discard { offset, len }
            | IoOp::WriteZeroes {
                offset,
                len,
                unmap: true,
            } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes {
                offset,
                len,
                unmap: false,
            } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            // Plain allocation: holes get blocks, data stays.
            IoOp::Provision { offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        // SAFETY: the caller keeps the iovecs and buffers alive until the CQE (trait contract)
        // and guarantees a free SQ entry.
        unsafe { sq.push(&entry.user_data(user_data)) }.expect("caller reserved an SQ entry");
        Submitted::Queued
    }

    fn allocation(&self, offset: u64, len: u64, max: usize, runs: &mut Vec<(u64, bool)>) -> bool {
        if self.is_block {
            return false;
        }
        let fd = self.file.as_raw_fd();
        let end = offset
            .saturating_add(len)
            .min(self.size.load(Ordering::Acquire));
        let mut at = offset;
        while at < end && runs.len() < max {
            let seek = |from: u64, whence| {
                // SAFETY: lseek on our descriptor; it moves only the file offset, which no
                // I/O of this backend uses (every read and write gives its own).
                let r = unsafe { libc::lseek(fd, from as libc::off_t, whence) };
                (r >= 0).then_some(r as u64)
            };
            // No data from here on (ENXIO): the rest is a hole.
            let data = seek(at, libc::SEEK_DATA).unwrap_or(end).min(end);
            if data > at {
                runs.push((data - at, false));
                at = data;
                continue;
            }
            let hole = seek(at, libc::SEEK_HOLE).unwrap_or(end).min(end);
            runs.push((hole.max(at + 1) - at, true));
            at = hole.max(at + 1);
        }
        true
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}
