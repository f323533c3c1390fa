//! The driver side of a split virtqueue, in guest RAM (virtio 1.3, 2.7).

use crate::memory::GuestRam;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub gpa: u64,
    pub len: u32,
    pub writable: bool,
}

/// A split virtqueue as the driver sees it.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Descriptors not in any chain.
    free: Vec<u16>,
    /// Descriptors of each outstanding head, to free on completion.
    chains: Vec<Vec<u16>>,
    next_avail: u16,
    last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl DriverQueue {
    /// Lays out a queue of `size` entries in `ram`.
    pub fn new(ram: &mut GuestRam, size: u16) -> DriverQueue {
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 4096);
        let avail = ram.alloc(6 + 2 * n, 4096);
        let used = ram.alloc(6 + 8 * n, 4096);
        DriverQueue {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            next_avail: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// Free descriptors left.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes descriptor `index` of a table at `table` directly (for malformed chains).
    pub fn write_desc(
        ram: &GuestRam,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        ram.write(table + 16 * u64::from(index), &raw);
    }

    /// Builds a chain of `bufs` (in one indirect table if `indirect`) and makes it available.
    /// Returns the head.
    pub fn add(&mut self, ram: &mut GuestRam, bufs: &[Buf], indirect: bool) -> u16 {
        assert!(!bufs.is_empty());
        let head;
        let mut used_descs = Vec::new();
        if indirect {
            let table = ram.alloc(16 * bufs.len() as u64, 16);
            for (i, b) in bufs.iter().enumerate() {
                let more = i + 1 < bufs.len();
                let flags =
                    if b.writable { DESC_F_WRITE } else { 0 } | if more { DESC_F_NEXT } else { 0 };
                Self::write_desc(ram, table, i as u16, b.gpa, b.len, flags, (i + 1) as u16);
            }
            head = self.free.pop().expect("descriptors left");
            Self::write_desc(
                ram,
                self.desc,
                head,
                table,
                16 * bufs.len() as u32,
                DESC_F_INDIRECT,
                0,
            );
            used_descs.push(head);
        } else {
            assert!(bufs.len() <= self.free.len(), "not enough free descriptors");
            let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
            for (i, b) in bufs.iter().enumerate() {
                let next = ids.get(i + 1).copied();
                let flags = if b.writable { DESC_F_WRITE } else { 0 }
                    | if next.is_some() { DESC_F_NEXT } else { 0 };
                Self::write_desc(
                    ram,
                    self.desc,
                    ids[i],
                    b.gpa,
                    b.len,
                    flags,
                    next.unwrap_or(0),
                );
            }
            head = ids[0];
            used_descs = ids;
        }
        self.chains[usize::from(head)] = used_descs;
        self.push_avail(ram, head);
        head
    }

    /// Takes a free descriptor for a hand-built chain; it is returned when its head completes
    /// only if registered with `own_chain`.
    pub fn take_descriptor(&mut self) -> u16 {
        self.free.pop().expect("descriptors left")
    }

    /// Records that `head`'s chain uses `descs`, so they are freed on completion.
    pub fn own_chain(&mut self, head: u16, descs: Vec<u16>) {
        self.chains[usize::from(head)] = descs;
    }

    /// Puts `head` on the avail ring and publishes the new index.
    pub fn push_avail(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        ram.write(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(ram, self.next_avail);
    }

    /// Stores the avail index (release: ring entries first).
    pub fn set_avail_idx(&self, ram: &GuestRam, idx: u16) {
        fence(Ordering::Release);
        self.avail_u16(ram, 2).store(idx.to_le(), Ordering::Release);
    }

    fn avail_u16<'a>(&self, ram: &'a GuestRam, offset: u64) -> &'a AtomicU16 {
        // SAFETY: inside the avail ring, 2-aligned; lives as long as ram.
        unsafe { &*(ram.ptr(self.avail + offset, 2) as *const AtomicU16) }
    }

    fn used_u16<'a>(&self, ram: &'a GuestRam, offset: u64) -> &'a AtomicU16 {
        // SAFETY: inside the used ring, 2-aligned; lives as long as ram.
        unsafe { &*(ram.ptr(self.used + offset, 2) as *const AtomicU16) }
    }

    /// The device's used index.
    pub fn used_idx(&self, ram: &GuestRam) -> u16 {
        u16::from_le(self.used_u16(ram, 2).load(Ordering::Acquire))
    }

    /// The device's avail_event (EVENT_IDX).
    pub fn avail_event(&self, ram: &GuestRam) -> u16 {
        u16::from_le(
            self.used_u16(ram, 4 + 8 * u64::from(self.size))
                .load(Ordering::Acquire),
        )
    }

    /// Sets used_event (EVENT_IDX): the device should notify when it passes this index.
    pub fn set_used_event(&self, ram: &GuestRam, idx: u16) {
        self.avail_u16(ram, 4 + 2 * u64::from(self.size))
            .store(idx.to_le(), Ordering::Release);
    }

    /// Index of the next chain the driver will make available.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Used entries the driver has consumed.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Takes one used entry if the device has published one: (head, len).
    pub fn pop_used(&mut self, ram: &GuestRam) -> Option<(u16, u32)> {
        if self.used_idx(ram) == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = ram.read(self.used + 4 + 8 * slot, 8);
        let id = u32::from_le_bytes(elem[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(elem[4..8].try_into().unwrap());
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id).expect("device returned a head that is not a u16");
        assert!(
            head < self.size,
            "device returned head {head} past the queue"
        );
        for d in std::mem::take(&mut self.chains[usize::from(head)]) {
            self.free.push(d);
        }
        Some((head, len))
    }

    /// Waits for a used entry, up to `timeout`.
    pub fn wait_used(&mut self, ram: &GuestRam, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = self.pop_used(ram) {
                return Some(done);
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut fd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid descriptor.
            unsafe { libc::poll(&mut fd, 1, 5) };
            let _ = self.call.read();
        }
    }
}
