//! In-flight request tracking shared with the front end (vhost-user INFLIGHT_SHMFD, split
//! rings), so that a daemon restarted under a running guest resubmits exactly the requests the
//! old one had taken and not completed.
//!
//! Layout (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking"; host-endian), one region
//! per queue, back to back, each `ALIGN_UP(16 + 16 * queue_size, 64)` bytes:
//!
//! ```text
//! u64 features @0 (0) | u16 version @8 | u16 desc_num @10 | u16 last_batch_head @12 |
//! u16 used_idx @14 | desc[queue_size] @16, each 16 bytes:
//!     u8 inflight @0 | u8 padding[5] | u16 next @6 | u64 counter @8
//! ```
//!
//! The device marks a head in flight (counter first, then the flag) when it takes it; when it
//! completes a batch it links the heads through `next` from `last_batch_head`, publishes the
//! used index, then clears their flags and records `used_idx`. A restarted device that finds
//! `used_idx` behind the ring's used index knows the last batch was published and clears it;
//! every head still flagged is resubmitted, oldest counter first, and the ring resumes at
//! used index + that count.

use crate::shm::SharedMap;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

const HEADER_SIZE: usize = 16;
const DESC_SIZE: usize = 16;
const ALIGNMENT: usize = 64;
/// `version` of a region in use (0: fresh, nothing to recover).
const VERSION: u16 = 1;

/// Bytes of one queue's region.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_SIZE + DESC_SIZE * usize::from(queue_size)).next_multiple_of(ALIGNMENT)
}

/// The shared region of every queue of one device.
pub struct InflightRegion {
    map: SharedMap,
    queue_size: u16,
    num_queues: u16,
}

impl InflightRegion {
    /// A zeroed region for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD) and the memfd
    /// to hand the front end.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(InflightRegion, File)> {
        if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight region: bad queue count or size",
            ));
        }
        let len = queue_region_size(queue_size) * usize::from(num_queues);
        // SAFETY: memfd_create with a static name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"pollblk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours and open.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let region = InflightRegion::map(&file, 0, len as u64, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps a region the front end handed over (SET_INFLIGHT_FD).
    pub fn map(
        file: &File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightRegion> {
        let need = queue_region_size(queue_size) as u64 * u64::from(num_queues);
        if num_queues == 0 || !queue_size.is_power_of_two() || len < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region of {len} bytes for {num_queues} queues of {queue_size}"),
            ));
        }
        Ok(InflightRegion {
            map: SharedMap::map(file, offset, len as usize, true)?,
            queue_size,
            num_queues,
        })
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The part of queue `index`, if the region has one of `size` entries for it.
    pub fn queue(self: &Arc<Self>, index: usize, size: u16) -> Option<InflightQueue> {
        if index >= usize::from(self.num_queues) || size != self.queue_size {
            return None;
        }
        // SAFETY: index < num_queues, so the queue's region lies inside the mapping.
        let base = unsafe {
            self.map
                .ptr()
                .add(index * queue_region_size(self.queue_size))
        };
        Some(InflightQueue {
            _region: self.clone(),
            base,
            size,
        })
    }
}

/// One queue's in-flight records; used only by the reactor that owns the queue.
pub struct InflightQueue {
    _region: Arc<InflightRegion>,
    base: *mut u8,
    size: u16,
}

// SAFETY: see InflightRegion; moved to the owning reactor with its queue.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn field<T: Copy>(&self, offset: usize) -> *mut T {
        debug_assert!(offset + std::mem::size_of::<T>() <= queue_region_size(self.size));
        // SAFETY: offsets used are inside this queue's region (header or desc[head] with
        // head < size) and naturally aligned (the region is 64-aligned, fields are at their
        // natural alignment).
        unsafe { self.base.add(offset).cast() }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: see field.
        unsafe { std::ptr::read_volatile(self.field(offset)) }
    }

    fn write<T: Copy>(&self, offset: usize, value: T) {
        // SAFETY: see field.
        unsafe { std::ptr::write_volatile(self.field(offset), value) }
    }

    fn desc(head: u16) -> usize {
        HEADER_SIZE + DESC_SIZE * usize::from(head)
    }

    /// Records that the device took `head` (before it starts the request).
    pub fn mark_taken(&self, head: u16, counter: u64) {
        assert!(head < self.size);
        self.write(Self::desc(head) + 8, counter);
        fence(Ordering::Release);
        self.write(Self::desc(head), 1u8);
    }

    /// Links a completed `head` into the batch about to be published.
    pub fn add_to_batch(&self, head: u16) {
        assert!(head < self.size);
        let last: u16 = self.read(12);
        self.write(Self::desc(head) + 6, last);
        self.write(12, head);
    }

    /// After the used index `used_idx` is published: the batch's heads are no longer in flight.
    pub fn batch_published(&self, heads: &[u16], used_idx: u16) {
        fence(Ordering::SeqCst);
        for &head in heads {
            self.write(Self::desc(head), 0u8);
        }
        fence(Ordering::Release);
        self.write(14, used_idx);
    }

    /// At queue start: makes the region consistent with the ring's used index `ring_used` and
    /// returns the heads to resubmit, oldest first, and the next counter to use; None for a
    /// fresh region (nothing was in flight, the front end's base stands).
    pub fn recover(&self, ring_used: u16) -> Option<(Vec<u16>, u64)> {
        let version: u16 = self.read(8);
        if version != VERSION {
            // A fresh region (or a reset guest): nothing was in flight.
            for head in 0..self.size {
                self.write(Self::desc(head), 0u8);
            }
            self.write(8, VERSION);
            self.write(10, self.size);
            self.write(14, ring_used);
            return None;
        }
        let recorded: u16 = self.read(14);
        // The last batch was published but not cleared: its heads are done.
        let mut stale = ring_used.wrapping_sub(recorded);
        let mut head: u16 = self.read(12);
        while stale > 0 && head < self.size {
            self.write(Self::desc(head), 0u8);
            head = self.read(Self::desc(head) + 6);
            stale -= 1;
        }
        self.write(14, ring_used);
        let mut taken: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.read::<u8>(Self::desc(h)) == 1)
            .map(|h| (self.read::<u64>(Self::desc(h) + 8), h))
            .collect();
        taken.sort_unstable();
        let next = taken.last().map_or(1, |&(c, _)| c + 1);
        Some((taken.into_iter().map(|(_, h)| h).collect(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_sized_as_libvhost_user_sizes_them() {
        assert_eq!(queue_region_size(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_size(256) % 64, 0);
    }

    #[test]
    fn a_restart_finds_what_was_taken_and_not_published() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let region = Arc::new(region);
        let q = region.queue(1, 8).unwrap();
        assert_eq!(q.recover(0), None, "fresh");
        for (counter, head) in [(1, 5), (2, 2), (3, 7)] {
            q.mark_taken(head, counter);
        }
        // Head 2 completed and published (used index 1).
        q.add_to_batch(2);
        q.batch_published(&[2], 1);
        // Head 5 completed, its used entry published (ring used 2), the flags not cleared.
        q.add_to_batch(5);
        drop(q);
        // A new daemon maps the same memfd.
        let again =
            Arc::new(InflightRegion::map(&file, 0, file.metadata().unwrap().len(), 2, 8).unwrap());
        let q = again.queue(1, 8).unwrap();
        assert_eq!(
            q.recover(2),
            Some((vec![7], 4)),
            "only head 7 is still to do"
        );
        // Queue 0 never started: its region is fresh, the front end's base stands.
        assert_eq!(again.queue(0, 8).unwrap().recover(0), None);
    }
}
