//! Copy on write: a write to a data block other mappings share goes to a new block that
//! first gets the shared block's contents. Only the shared block's data is copied: its holes
//! (a golden image's free space, what a first write left unwritten) stay holes, and the copy
//! runs in the kernel (copy_file_range) where the file system can, so no block passes
//! through a buffer of ours.

use super::pool::Pool;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

impl Pool {
    /// New data block `p` gets shared block `from`'s contents with `data` (or nothing: a
    /// provisioned copy) at `within`.
    pub(super) fn copy_block(
        &self,
        from: u64,
        p: u64,
        within: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        if let Some(data) = data.filter(|d| d.len() as u64 == bs) {
            return self.data.write_all_at(data, p * bs);
        }
        if self.clear_block(p, data.is_none()) {
            self.copy_data(from * bs, p * bs, bs)?;
        } else {
            // No holes here: the block whole.
            let mut block = vec![0u8; bs as usize];
            self.data.read_exact_at(&mut block, from * bs)?;
            self.data.write_all_at(&block, p * bs)?;
        }
        match data {
            Some(data) => self.data.write_all_at(data, p * bs + within),
            None => Ok(()),
        }
    }

    /// Copies the data of `len` bytes at `from` to `to` in the data file, skipping holes
    /// (SEEK_DATA / SEEK_HOLE; where the file system has none, all of it is data).
    fn copy_data(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        let fd = self.data.as_raw_fd();
        let end = from + len;
        let mut at = from;
        while at < end {
            let data = match seek(fd, at, libc::SEEK_DATA) {
                Ok(d) => d,
                // No data from here to the end of the file.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
                Err(_) => at,
            };
            if data >= end {
                return Ok(());
            }
            let hole = seek(fd, data, libc::SEEK_HOLE).map_or(end, |h| h.min(end));
            self.copy_range(data, to + (data - from), hole - data)?;
            at = hole;
        }
        Ok(())
    }

    /// Copies `len` bytes at `from` to `to` in the data file: in the kernel, or through a
    /// buffer where copy_file_range does not work (a block device).
    fn copy_range(&self, mut from: u64, mut to: u64, mut len: u64) -> io::Result<()> {
        let fd = self.data.as_raw_fd();
        while len > 0 {
            let (mut src, mut dst) = (from as libc::loff_t, to as libc::loff_t);
            // SAFETY: copy_file_range between two ranges of a file we own, which do not
            // overlap (two different blocks); the offsets are ours.
            let n = unsafe { libc::copy_file_range(fd, &mut src, fd, &mut dst, len as usize, 0) };
            if n <= 0 {
                let mut buf = vec![0u8; len as usize];
                self.data.read_exact_at(&mut buf, from)?;
                return self.data.write_all_at(&buf, to);
            }
            let n = n as u64;
            (from, to, len) = (from + n, to + n, len - n);
        }
        Ok(())
    }
}

fn seek(fd: std::os::fd::RawFd, at: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own; it changes only the file offset, which nothing
    // else of the pool uses (every read and write gives its offset).
    let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}
