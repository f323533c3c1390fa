//! Device side of a virtio split virtqueue (virtio 1.3, section 2.7).
//!
//! [`SplitQueue`] reads the driver's avail ring, walks descriptor chains (direct and
//! indirect) into host iovecs, writes the used ring and decides, per VIRTIO_F_EVENT_IDX, whether
//! the driver needs a notification. It is owned by exactly one reactor thread: nothing here
//! locks, and the only atomics are the loads and stores the ring protocol itself requires.
//!
//! Everything read from guest memory is untrusted. Chain walking is bounded (a chain visits at
//! most the queue size of descriptors, an indirect table at most its own length), all addresses
//! are translated with bounds checks, and faults are sorted in two kinds:
//! - [`Fault`]: the chain is well formed but a buffer is unusable; the request fails with
//!   IOERR and the queue goes on.
//! - [`Broken`]: the ring itself cannot be trusted (bad head, loop, bad next index); the queue
//!   stops, as virtio's "device needs reset".

use crate::mem::GuestMemory;
use std::sync::atomic::{fence, AtomicU16, Ordering};

/// Largest split queue size (virtio 1.3, 2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESC_SIZE: u64 = 16;
/// A chain's buffers may total at most 4 GiB (the used ring's len is a u32).
const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// Front-end virtual addresses of the three ring parts (VHOST_USER_SET_VRING_ADDR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Driver (avail) ring.
    pub avail: u64,
    /// Device (used) ring.
    pub used: u64,
}

/// Why a ring cannot be trusted any more; the queue stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// A ring address does not lie in guest memory.
    RingUnmapped,
    /// The in-flight records (INFLIGHT_SHMFD) name more requests than the queue holds.
    InflightOverflow,
    /// The avail index ran more than a queue size ahead of the device.
    AvailIdxJump { avail_idx: u16, last_avail_idx: u16 },
    /// An avail ring entry names a descriptor past the table.
    HeadOutOfRange(u16),
    /// A request ring's producer index ran more than the ring's size ahead of the responses
    /// (Xen's RING_REQUEST_PROD_OVERFLOW).
    ProducerOverrun { produced: u32, answered: u32 },
    /// A descriptor's next field points past its table.
    NextOutOfRange(u16),
    /// The chain is longer than its table: a loop.
    ChainLoop,
    /// An indirect descriptor inside an indirect table (virtio 1.3, 2.7.5.3.1).
    NestedIndirect,
    /// INDIRECT and NEXT together, or INDIRECT without the feature.
    BadIndirect,
    /// An indirect table whose length is 0, not a multiple of 16, or not in guest memory.
    BadIndirectTable,
    /// A connection-based ring's peer went away or sent what cannot be answered (an NBD
    /// client: bad magic, a write larger than the maximum, NBD_CMD_DISC).
    Disconnected,
}

/// Why one request's buffers are unusable; the request fails with IOERR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A buffer does not lie wholly in one guest memory region.
    BufferUnmapped,
    /// A device-readable descriptor follows a device-writable one (virtio 1.3, 2.7.4.2).
    ReadableAfterWritable,
    /// More buffers than the request slot holds.
    TooManySegments,
    /// The buffers add up to more than 4 GiB.
    TooLarge,
}

/// The buffers of one chain, readable ones first: `iov[..readable]`, `iov[readable..len]`.
pub struct Segments {
    iov: Box<[libc::iovec]>,
    len: usize,
    readable: usize,
    fault: Option<Fault>,
    total_bytes: u64,
}

// SAFETY: the iovecs point into guest memory owned by a GuestMemory snapshot; a Segments is
// moved between threads only together with the queue that owns it.
unsafe impl Send for Segments {}

impl Segments {
    /// Room for `capacity` buffers; allocated once per request slot, never per request.
    pub fn with_capacity(capacity: usize) -> Segments {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Segments {
            iov: vec![empty; capacity].into_boxed_slice(),
            len: 0,
            readable: 0,
            fault: None,
            total_bytes: 0,
        }
    }

    /// Empties the list for the next request.
    pub fn clear(&mut self) {
        self.len = 0;
        self.readable = 0;
        self.fault = None;
        self.total_bytes = 0;
    }

    /// Appends a buffer (readable ones must come first); a problem is kept as the fault.
    pub fn push(&mut self, ptr: *mut u8, len: u32, writable: bool) {
        if !writable && self.len > self.readable {
            self.fault.get_or_insert(Fault::ReadableAfterWritable);
            return;
        }
        self.total_bytes += u64::from(len);
        if self.total_bytes > MAX_CHAIN_BYTES {
            self.fault.get_or_insert(Fault::TooLarge);
        }
        if self.len == self.iov.len() {
            self.fault.get_or_insert(Fault::TooManySegments);
            return;
        }
        self.iov[self.len] = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len as usize,
        };
        self.len += 1;
        if !writable {
            self.readable = self.len;
        }
    }

    /// The first request-level fault met while walking, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }

    /// All buffers, readable first.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov[..self.len]
    }

    /// Mutable access for trimming (header and status are cut off the ends in place).
    pub fn iovecs_mut(&mut self) -> &mut [libc::iovec] {
        &mut self.iov[..self.len]
    }

    /// Number of device-readable buffers at the front.
    pub fn readable_count(&self) -> usize {
        self.readable
    }
}

/// Device-side state of one split virtqueue.
pub struct SplitQueue {
    size: u16,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    event_idx: bool,
    indirect: bool,
    last_avail_idx: u16,
    cached_avail_idx: u16,
    next_used_idx: u16,
    signalled_used: u16,
    signalled_used_valid: bool,
}

// SAFETY: the ring pointers are into guest memory kept mapped by the owner's GuestMemory; the
// queue is used by one thread at a time (moved to its reactor, never shared).
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Sets up a queue of `size` entries at `addrs`, resuming at `base` (SET_VRING_BASE).
    pub fn new(
        mem: &GuestMemory,
        addrs: RingAddrs,
        size: u16,
        base: u16,
        event_idx: bool,
        indirect: bool,
    ) -> Result<SplitQueue, Broken> {
        assert!(size.is_power_of_two() && size <= MAX_QUEUE_SIZE);
        let mut queue = SplitQueue {
            size,
            desc: std::ptr::null(),
            avail: std::ptr::null(),
            used: std::ptr::null_mut(),
            event_idx,
            indirect,
            last_avail_idx: base,
            cached_avail_idx: base,
            next_used_idx: base,
            signalled_used: base,
            signalled_used_valid: false,
        };
        queue.remap(mem, addrs)?;
        Ok(queue)
    }

    /// Re-resolves the ring addresses in a new memory snapshot.
    pub fn remap(&mut self, mem: &GuestMemory, addrs: RingAddrs) -> Result<(), Broken> {
        let size = u64::from(self.size);
        // Sizes from virtio 1.3, 2.7: desc 16*n, avail 6+2n, used 6+8n (with the event fields).
        let desc = mem.translate_user(addrs.desc, DESC_SIZE * size);
        let avail = mem.translate_user(addrs.avail, 6 + 2 * size);
        let used = mem.translate_user(addrs.used, 6 + 8 * size);
        match (desc, avail, used) {
            (Some(desc), Some(avail), Some(used))
                if (desc as usize).is_multiple_of(16)
                    && (avail as usize).is_multiple_of(2)
                    && (used as usize).is_multiple_of(4) =>
            {
                self.desc = desc;
                self.avail = avail;
                self.used = used;
                Ok(())
            }
            _ => Err(Broken::RingUnmapped),
        }
    }

    /// The descriptor table (host pointer, entries), for checks outside the ring (fuzzing).
    pub fn desc_table(&self) -> (*const u8, u16) {
        (self.desc, self.size)
    }

    /// Queue size in entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Index of the next avail entry the device will take (what GET_VRING_BASE reports).
    pub fn last_avail_idx(&self) -> u16 {
        self.last_avail_idx
    }

    /// Index the next used entry will get.
    pub fn next_used_idx(&self) -> u16 {
        self.next_used_idx
    }

    /// The used ring's memory (flags, idx, elements, avail_event), for dirty logging.
    pub fn used_ring(&self) -> (*const u8, u64) {
        (self.used.cast_const(), 6 + 8 * u64::from(self.size))
    }

    /// The used index as the ring holds it (what the driver has seen published).
    pub fn used_idx_in_ring(&self) -> u16 {
        u16::from_le(self.used_u16(2).load(Ordering::Acquire))
    }

    /// Resumes after a restart with `in_flight` requests taken but not completed: the next
    /// used entry is `used`, the next avail entry to take is `used + in_flight`.
    pub fn resume_after_restart(&mut self, used: u16, in_flight: u16) {
        self.next_used_idx = used;
        self.signalled_used = used;
        self.signalled_used_valid = false;
        self.last_avail_idx = used.wrapping_add(in_flight);
        self.cached_avail_idx = self.last_avail_idx;
    }

    fn avail_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: offsets used are < 6 + 2*size, inside the range translated in remap, and
        // 2-aligned (checked there).
        unsafe { &*(self.avail.add(offset) as *const AtomicU16) }
    }

    fn used_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: as avail_u16, for the used ring (6 + 8*size bytes, 4-aligned).
        unsafe { &*(self.used.add(offset) as *const AtomicU16) }
    }

    fn avail_idx(&self) -> u16 {
        u16::from_le(self.avail_u16(2).load(Ordering::Acquire))
    }

    /// Takes the next available chain head, if the driver has made one available.
    pub fn pop_avail(&mut self) -> Result<Option<u16>, Broken> {
        if self.last_avail_idx == self.cached_avail_idx {
            let avail_idx = self.avail_idx();
            let pending = avail_idx.wrapping_sub(self.last_avail_idx);
            if pending > self.size {
                return Err(Broken::AvailIdxJump {
                    avail_idx,
                    last_avail_idx: self.last_avail_idx,
                });
            }
            self.cached_avail_idx = avail_idx;
            if pending == 0 {
                return Ok(None);
            }
        }
        let slot = usize::from(self.last_avail_idx % self.size);
        let head = u16::from_le(self.avail_u16(4 + 2 * slot).load(Ordering::Relaxed));
        if head >= self.size {
            return Err(Broken::HeadOutOfRange(head));
        }
        self.last_avail_idx = self.last_avail_idx.wrapping_add(1);
        Ok(Some(head))
    }

    /// Whether the driver has made chains available that are not taken yet.
    pub fn has_avail(&mut self) -> bool {
        self.last_avail_idx != self.cached_avail_idx || self.avail_idx() != self.last_avail_idx
    }

    /// Reads descriptor `index` of a table at `table` (a table of `count` entries).
    fn read_desc(table: *const u8, count: u16, index: u16) -> (u64, u32, u16, u16) {
        debug_assert!(index < count);
        // SAFETY: index < count and the table of count*16 bytes was translated by the caller;
        // read_volatile because the guest may write the table concurrently. An indirect
        // table may sit at any address the driver chose (the fuzzer found one at an odd
        // address, where u64 loads are undefined behaviour): those are read as bytes, the
        // usual aligned ones with four loads (bytes cost half again per chain).
        unsafe {
            let p = table.add(usize::from(index) * DESC_SIZE as usize);
            if (p as usize).is_multiple_of(8) {
                let addr = u64::from_le(std::ptr::read_volatile(p as *const u64));
                let len = u32::from_le(std::ptr::read_volatile(p.add(8) as *const u32));
                let flags = u16::from_le(std::ptr::read_volatile(p.add(12) as *const u16));
                let next = u16::from_le(std::ptr::read_volatile(p.add(14) as *const u16));
                return (addr, len, flags, next);
            }
            let raw: [u8; 16] = std::ptr::read_volatile(p as *const [u8; 16]);
            (
                u64::from_le_bytes(raw[0..8].try_into().unwrap()),
                u32::from_le_bytes(raw[8..12].try_into().unwrap()),
                u16::from_le_bytes(raw[12..14].try_into().unwrap()),
                u16::from_le_bytes(raw[14..16].try_into().unwrap()),
            )
        }
    }

    /// Walks the chain starting at `head` into `out`.
    pub fn walk_chain(
        &self,
        mem: &GuestMemory,
        head: u16,
        out: &mut Segments,
    ) -> Result<(), Broken> {
        out.clear();
        let mut table = self.desc;
        let mut count = self.size;
        let mut index = head;
        let mut in_indirect = false;
        // A chain visits each descriptor of its table at most once; more is a loop.
        let mut ttl = u32::from(count);
        loop {
            if ttl == 0 {
                return Err(Broken::ChainLoop);
            }
            ttl -= 1;
            let (addr, len, flags, next) = Self::read_desc(table, count, index);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if in_indirect {
                    return Err(Broken::NestedIndirect);
                }
                if !self.indirect || flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(Broken::BadIndirect);
                }
                let entries = u64::from(len) / DESC_SIZE;
                if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
                    return Err(Broken::BadIndirectTable);
                }
                table = mem
                    .translate(addr, u64::from(len))
                    .ok_or(Broken::BadIndirectTable)?;
                count = entries as u16;
                index = 0;
                ttl = u32::from(count);
                in_indirect = true;
                continue;
            }
            let writable = flags & VIRTQ_DESC_F_WRITE != 0;
            match mem.translate(addr, u64::from(len)) {
                Some(ptr) => out.push(ptr, len, writable),
                None => {
                    out.fault.get_or_insert(Fault::BufferUnmapped);
                }
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if next >= count {
                return Err(Broken::NextOutOfRange(next));
            }
            index = next;
        }
    }

    /// Puts `head` on the used ring with `len` bytes written; not visible until `publish_used`.
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used_idx % self.size);
        // SAFETY: 4 + 8*slot + 8 <= 6 + 8*size: inside the translated used ring, 4-aligned.
        unsafe {
            let elem = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(elem as *mut u32, u32::from(head).to_le());
            std::ptr::write_volatile(elem.add(4) as *mut u32, len.to_le());
        }
        self.next_used_idx = self.next_used_idx.wrapping_add(1);
    }

    /// Makes every pushed used entry visible to the driver (release: entries before index).
    pub fn publish_used(&mut self) {
        self.used_u16(2)
            .store(self.next_used_idx.to_le(), Ordering::Release);
    }

    /// Whether the driver wants a notification for what was published since the last one.
    /// Call after `publish_used`; it records the index it decided on.
    pub fn needs_notification(&mut self) -> bool {
        // The used idx store must be visible before we read the driver's suppression fields,
        // or both sides can decide not to act (virtio 1.3, 2.7.10).
        fence(Ordering::SeqCst);
        let new = self.next_used_idx;
        if !self.event_idx {
            let flags = u16::from_le(self.avail_u16(0).load(Ordering::Relaxed));
            return flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0;
        }
        let old = self.signalled_used;
        let valid = self.signalled_used_valid;
        self.signalled_used = new;
        self.signalled_used_valid = true;
        if !valid {
            return true;
        }
        let offset = 4 + 2 * usize::from(self.size);
        let used_event = u16::from_le(self.avail_u16(offset).load(Ordering::Relaxed));
        // vring_need_event: notify if used_event lies in (old, new].
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Asks the driver to kick for new buffers; returns true if buffers arrived meanwhile,
    /// so a caller about to sleep must poll again instead (no lost wakeup).
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            let offset = 4 + 8 * usize::from(self.size);
            self.used_u16(offset)
                .store(self.last_avail_idx.to_le(), Ordering::Relaxed);
        } else {
            self.used_u16(0).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.avail_idx() != self.last_avail_idx
    }

    /// Tells the driver not to kick while the device polls. With EVENT_IDX the avail_event
    /// is simply left behind: the driver kicks at most once more when it passes it.
    pub fn disable_notification(&mut self) {
        if !self.event_idx {
            self.used_u16(0)
                .store(VIRTQ_USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
    }
}
