//! Guest RAM: one memfd, mapped here and shared with the back end through SET_MEM_TABLE.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

/// Guest physical address 0 is the memfd's first byte. Ring addresses are "front-end virtual
/// addresses"; we use `USER_BASE + gpa` so the two translations differ, as they do in QEMU.
pub const USER_BASE: u64 = 0x7f00_0000_0000;

/// A memfd-backed guest RAM with a bump allocator.
pub struct GuestRam {
    file: File,
    base: *mut u8,
    size: u64,
    next: u64,
}

impl GuestRam {
    /// `size` bytes of zeroed guest RAM (sparse: untouched pages cost nothing).
    pub fn new(size: u64) -> GuestRam {
        // SAFETY: memfd_create with a static name; checked below.
        let fd = unsafe { libc::memfd_create(c"pollblk-driver".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: fd is fresh and owned from here on.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        // SAFETY: maps the whole memfd shared; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap of guest RAM failed");
        GuestRam {
            file,
            base: base.cast(),
            size,
            next: 4096, // keep gpa 0 unused so a zero address is always a bug
        }
    }

    /// The memfd, for SET_MEM_TABLE / ADD_MEM_REG.
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Allocates `len` bytes aligned to `align`; returns the guest physical address.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let gpa = self.next.next_multiple_of(align);
        assert!(gpa + len <= self.size, "guest RAM exhausted");
        self.next = gpa + len;
        gpa
    }

    /// The allocator position, to `release` back to after a batch of requests.
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Frees everything allocated after `mark`.
    pub fn release(&mut self, mark: u64) {
        assert!(mark <= self.next);
        self.next = mark;
    }

    /// Host pointer of `gpa` (range-checked).
    pub fn ptr(&self, gpa: u64, len: u64) -> *mut u8 {
        assert!(gpa.checked_add(len).is_some_and(|end| end <= self.size));
        // SAFETY: inside the mapping, checked above.
        unsafe { self.base.add(gpa as usize) }
    }

    /// Copies `data` to `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.ptr(gpa, data.len() as u64);
        // SAFETY: ptr checked the range.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// Copies `len` bytes from `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.ptr(gpa, len as u64);
        let mut out = vec![0u8; len];
        // SAFETY: ptr checked the range.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        out
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in new.
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}
