//! A shared mapping of a file (memfd or regular file), unmapped when dropped: the memory
//! pollblk shares with front ends (in-flight records, dirty log) and with readers (statistics).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `len` bytes of a file from `offset`, mapped MAP_SHARED.
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory owned by this value; its users access it with volatile or
// atomic operations (other processes write it too).
unsafe impl Send for SharedMap {}
// SAFETY: as Send: no method hands out a reference to the peer-written bytes.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` (> 0) bytes of `file` at `offset`, writable or read-only.
    pub fn map(file: &File, offset: u64, len: usize, writable: bool) -> io::Result<SharedMap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping; the kernel checks the fd, offset and length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// First byte of the mapping (page-aligned).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: mappings are not empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps what map mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
