//! The dirty-page log of live migration (vhost-user LOG_SHMFD with VHOST_F_LOG_ALL): while
//! the front end migrates the guest, every guest-memory write the device makes marks its
//! pages in a bitmap shared with the front end, which copies those pages again.
//!
//! Layout (QEMU docs/interop/vhost-user.rst, "Migration"): one bit per 4 KiB page of guest
//! physical address space, page p at byte p / 8, bit p % 8; set with an atomic OR (the front
//! end takes the words with atomic exchanges while the device writes).

use crate::shm::SharedMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

/// Bytes of guest memory per log bit.
pub const LOG_PAGE: u64 = 4096;

/// A mapped log (SET_LOG_BASE).
pub struct DirtyLog {
    map: SharedMap,
}

impl DirtyLog {
    /// Maps `size` bytes of `file` at `offset`.
    pub fn map(file: &File, offset: u64, size: u64) -> io::Result<DirtyLog> {
        if size == 0 || size > 1 << 40 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("dirty log of {size} bytes"),
            ));
        }
        Ok(DirtyLog {
            map: SharedMap::map(file, offset, size as usize, true)?,
        })
    }

    /// Marks the pages of guest physical range `[gpa, gpa + len)` dirty. Pages past the log's
    /// end (memory the front end does not migrate) are skipped.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= self.map.len() {
                return;
            }
            // SAFETY: byte < len: inside the mapping; AtomicU8 has alignment 1; the bitmap
            // is only touched with atomic byte operations.
            let cell = unsafe { &*(self.map.ptr().add(byte) as *const AtomicU8) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn pages_are_bits_in_guest_physical_order() {
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(16).unwrap();
        let log = DirtyLog::map(&file, 0, 16).unwrap();
        log.mark(0, 1); // page 0
        log.mark(9 * 4096 + 100, 4096); // pages 9 and 10
        log.mark(200 * 4096, 1); // past the log: skipped
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes[0], 0b1);
        assert_eq!(bytes[1], 0b110);
        assert!(bytes[2..].iter().all(|&b| b == 0));
    }
}
