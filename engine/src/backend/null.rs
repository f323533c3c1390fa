//! The null volume: reads return zeroes (or, without read_zeroes, leave the buffer untouched,
//! like QEMU's null-co read-zeroes=off), writes are dropped, nothing is stored.

use super::{Backend, BackendInfo, Completer, IoOp, Submitted};
use io_uring::squeue;
use std::io;

/// A volume of a given size that stores nothing.
pub struct NullBackend {
    size_bytes: u64,
    read_zeroes: bool,
}

impl NullBackend {
    /// A null volume of `size_bytes`; `read_zeroes` off skips zeroing read buffers (they keep
    /// the guest's own bytes, so nothing leaks), leaving only the request path to measure.
    pub fn new(size_bytes: u64, read_zeroes: bool) -> NullBackend {
        NullBackend {
            size_bytes,
            read_zeroes,
        }
    }
}

impl Backend for NullBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            size_bytes: self.size_bytes,
            dio_alignment: 1,
            volatile_cache: false,
            discard: true,
        }
    }

    fn submit(
        &self,
        op: &IoOp,
        _: u64,
        _: &mut squeue::SubmissionQueue<'_>,
        _: &Completer,
    ) -> Submitted {
        match *op {
            IoOp::Read { iov, iov_count, .. } => {
                // SAFETY: the caller passes iov_count valid iovecs into guest memory.
                let iov = unsafe { std::slice::from_raw_parts(iov, iov_count as usize) };
                if self.read_zeroes {
                    crate::blk::zero_iovecs(iov);
                }
                Submitted::Done(iov.iter().map(|v| v.iov_len as i32).sum())
            }
            IoOp::Write { iov, iov_count, .. } => {
                // SAFETY: as above; only the lengths are read.
                let iov = unsafe { std::slice::from_raw_parts(iov, iov_count as usize) };
                Submitted::Done(iov.iter().map(|v| v.iov_len as i32).sum())
            }
            IoOp::Flush
            | IoOp::Discard { .. }
            | IoOp::WriteZeroes { .. }
            | IoOp::Provision { .. } => Submitted::Done(0),
        }
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }
}
