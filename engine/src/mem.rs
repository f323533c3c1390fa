//! Guest memory as the front end shares it: file-backed regions mapped into this process.
//!
//! A [`GuestMemory`] is an immutable snapshot of the front end's memory table. A new table
//! (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) builds a new snapshot; regions are shared between
//! snapshots through `Arc`, so a region stays mapped while any snapshot (and so any reactor or
//! in-flight request) still refers to it.
//!
//! Every translation is bounds-checked: an address range is accepted only when it lies wholly
//! inside one region. Guest addresses come from the guest and are never trusted.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Most regions one memory table may hold (VHOST_USER_GET_MAX_MEM_SLOTS answers this).
pub const MAX_REGIONS: usize = 256;

/// One front-end memory region, mapped shared into this process.
pub struct MmapRegion {
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Front-end virtual address of the region's first byte (ring addresses use these).
    pub user_addr: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Offset into the file where the region starts (kept to match REM_MEM_REG requests).
    pub mmap_offset: u64,
    /// Start of the whole mapping (file offset 0) and its length, for munmap.
    map_base: *mut u8,
    map_len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct; it is only unmapped in Drop,
// when no other reference exists. Concurrent access to guest memory is the ring protocol's job.
unsafe impl Send for MmapRegion {}
// SAFETY: as above; the struct itself is immutable after construction.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Maps `size` bytes of `file` starting at `mmap_offset`.
    ///
    /// Like libvhost-user, the mapping starts at file offset 0 and is `mmap_offset + size`
    /// long, so hugetlbfs-backed memory (whose offsets need huge-page alignment) works too.
    pub fn map(
        file: &File,
        guest_phys_addr: u64,
        user_addr: u64,
        size: u64,
        mmap_offset: u64,
    ) -> io::Result<MmapRegion> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        if size == 0 {
            return Err(invalid("memory region of size 0"));
        }
        guest_phys_addr
            .checked_add(size)
            .ok_or_else(|| invalid("guest address range overflows"))?;
        user_addr
            .checked_add(size)
            .ok_or_else(|| invalid("user address range overflows"))?;
        let map_len = mmap_offset
            .checked_add(size)
            .and_then(|len| usize::try_from(len).ok())
            .ok_or_else(|| invalid("mapping length overflows"))?;
        // A mapping past the end of a file faults (SIGBUS) when touched: a front end that
        // says its memory is larger than the file it sent must not crash the daemon. (A file
        // shrunk later is kept out by the front end's seals: QEMU seals its memfds.)
        let meta = file.metadata()?;
        if meta.file_type().is_file() && meta.len() < map_len as u64 {
            return Err(invalid("memory region past the end of its file"));
        }
        // SAFETY: a fresh shared mapping of a file we were handed; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmapRegion {
            guest_phys_addr,
            user_addr,
            size,
            mmap_offset,
            map_base: ptr.cast(),
            map_len,
        })
    }

    /// Host address of the region's first byte.
    pub fn host_base(&self) -> *mut u8 {
        // SAFETY: mmap_offset + size == map_len was checked at map time, so this stays inside.
        unsafe { self.map_base.add(self.mmap_offset as usize) }
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference outlives self.
        unsafe { libc::munmap(self.map_base.cast(), self.map_len) };
    }
}

/// An immutable snapshot of the front end's memory table.
#[derive(Clone, Default)]
pub struct GuestMemory {
    regions: Vec<Arc<MmapRegion>>,
}

impl GuestMemory {
    /// Builds a snapshot; refuses overlapping guest ranges and more than [`MAX_REGIONS`].
    pub fn new(mut regions: Vec<Arc<MmapRegion>>) -> io::Result<GuestMemory> {
        if regions.len() > MAX_REGIONS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} memory regions, at most {MAX_REGIONS}", regions.len()),
            ));
        }
        regions.sort_by_key(|r| r.guest_phys_addr);
        for pair in regions.windows(2) {
            // No overflow: checked in MmapRegion::map.
            if pair[0].guest_phys_addr + pair[0].size > pair[1].guest_phys_addr {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "memory regions overlap",
                ));
            }
        }
        Ok(GuestMemory { regions })
    }

    /// The regions of this snapshot, sorted by guest physical address.
    pub fn regions(&self) -> &[Arc<MmapRegion>] {
        &self.regions
    }

    /// Host pointer for guest physical range `[gpa, gpa + len)`, if it lies in one region.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        // Few regions (typically 1-3): a linear scan beats a binary search here.
        for region in &self.regions {
            let offset = gpa.wrapping_sub(region.guest_phys_addr);
            if gpa >= region.guest_phys_addr && offset < region.size {
                if len > region.size - offset {
                    return None;
                }
                // SAFETY: offset + len <= size: the result stays inside the mapping.
                return Some(unsafe { region.host_base().add(offset as usize) });
            }
        }
        None
    }

    /// Guest physical address of host pointer `ptr` (a translated address), for dirty
    /// logging.
    pub fn gpa_of(&self, ptr: *const u8) -> Option<u64> {
        let addr = ptr as usize;
        self.regions.iter().find_map(|region| {
            let base = region.host_base() as usize;
            let offset = addr.wrapping_sub(base);
            (addr >= base && (offset as u64) < region.size)
                .then(|| region.guest_phys_addr + offset as u64)
        })
    }

    /// Host pointer for front-end virtual range `[uva, uva + len)` (vring addresses).
    pub fn translate_user(&self, uva: u64, len: u64) -> Option<*mut u8> {
        for region in &self.regions {
            let offset = uva.wrapping_sub(region.user_addr);
            if uva >= region.user_addr && offset < region.size {
                if len > region.size - offset {
                    return None;
                }
                // SAFETY: offset + len <= size: the result stays inside the mapping.
                return Some(unsafe { region.host_base().add(offset as usize) });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a static name; the fd is checked and owned by File.
        let fd = unsafe { libc::memfd_create(c"pollblk-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned descriptor.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn translate_refuses_ranges_outside_or_across_regions() {
        let file = memfd(2 * 4096);
        let low = Arc::new(MmapRegion::map(&file, 0, 0x7000_0000, 4096, 0).unwrap());
        let high = Arc::new(MmapRegion::map(&file, 0x10000, 0x7100_0000, 4096, 4096).unwrap());
        let mem = GuestMemory::new(vec![high, low]).unwrap();
        assert!(mem.translate(0, 4096).is_some());
        assert!(mem.translate(4095, 1).is_some());
        assert!(mem.translate(4095, 2).is_none(), "crosses the region end");
        assert!(mem.translate(4096, 1).is_none(), "hole between regions");
        assert!(mem.translate(0x10000 + 4000, 96).is_some());
        assert!(mem.translate(u64::MAX, 2).is_none());
        assert!(mem.translate_user(0x7100_0000, 4096).is_some());
        assert!(mem.translate_user(0x7100_0001, 4096).is_none());

        // Both translations reach the same bytes: region 2 starts at file offset 4096.
        let via_gpa = mem.translate(0x10000, 1).unwrap();
        let via_uva = mem.translate_user(0x7100_0000, 1).unwrap();
        assert_eq!(via_gpa, via_uva);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let file = memfd(8192);
        let a = Arc::new(MmapRegion::map(&file, 0, 0, 8192, 0).unwrap());
        let b = Arc::new(MmapRegion::map(&file, 4096, 0x10000, 4096, 0).unwrap());
        assert!(GuestMemory::new(vec![a, b]).is_err());
    }
}
