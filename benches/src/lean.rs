//! pollblk's own minimal split-ring driver for the generator, for when libblkio is the
//! bottleneck (see BENCHMARKS.md): slot `s` owns descriptors 3s..3s+2 (header, data, status)
//! laid out once, so a request costs a 16-byte header write, one flags store and one avail
//! entry; the avail index is published once per batch, a kick is sent only when the device
//! asks for one (EVENT_IDX avail_event or the NO_NOTIFY flag), and the device is asked never
//! to signal, since the used ring is polled.
//!
//! The vhost-user setup (features, memory table, vring messages) is pollblk-driver's.

use crate::load::{LoadSpec, Queues};
use pollblk_driver::blk::{
    BlkDriver, DriverOptions, F_BLK_SIZE, F_EVENT_IDX, F_FLUSH, F_MQ, F_PROTOCOL_FEATURES,
    F_VERSION_1, T_IN, T_OUT,
};
use std::sync::atomic::{fence, AtomicU16, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// Descriptors per request: header, data, status.
const PER_SLOT: usize = 3;

/// One queue's rings and buffers, as raw pointers into the shared guest RAM.
struct Ring {
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *const u8,
    headers: *mut u8,
    status: *mut u8,
    next_avail: u16,
    published_avail: u16,
    last_used: u16,
}

impl Ring {
    fn u16_at(p: *const u8) -> &'static AtomicU16 {
        // SAFETY: callers pass 2-aligned addresses inside the guest RAM mapping, which lives
        // as long as the LeanQueues that owns the BlkDriver.
        unsafe { &*(p as *const AtomicU16) }
    }
}

pub struct LeanQueues {
    rings: Vec<Ring>,
    /// Requests per queue: slots 0..depth.
    depth: usize,
    event_idx: bool,
    // Owns the connection, the guest RAM and the kick eventfds; dropped last.
    driver: BlkDriver,
}

impl LeanQueues {
    pub fn open(spec: &LoadSpec) -> Result<(LeanQueues, u64), String> {
        let per_queue_descs = spec.iodepth * PER_SLOT;
        if per_queue_descs > 32768 {
            return Err(format!(
                "--driver lean needs 3 descriptors per request: --iodepth at most {}",
                32768 / PER_SLOT
            ));
        }
        // pollblk-driver panics on protocol errors; check the socket first so the common
        // mistake gets a plain message.
        std::os::unix::net::UnixStream::connect(&spec.socket)
            .map_err(|e| format!("cannot connect to {}: {e}", spec.socket.display()))?;
        let size = per_queue_descs.next_power_of_two().max(64) as u16;
        let ram_bytes = (spec.queues
            * (spec.iodepth * (spec.bs + 32) + 64 * 1024 + 40 * usize::from(size))
            + (1 << 20)) as u64;
        let mut driver = BlkDriver::connect(
            &spec.socket,
            DriverOptions {
                queues: spec.queues,
                queue_size: size,
                accept: F_VERSION_1
                    | F_EVENT_IDX
                    | F_PROTOCOL_FEATURES
                    | F_MQ
                    | F_FLUSH
                    | F_BLK_SIZE,
                ram_bytes: ram_bytes.next_multiple_of(4096),
                ..Default::default()
            },
        );
        let event_idx = driver.features & F_EVENT_IDX != 0;
        let capacity = driver.capacity() * 512;
        let mut rings = Vec::with_capacity(spec.queues);
        for q in 0..spec.queues {
            let (desc_gpa, avail_gpa, used_gpa) = {
                let dq = &driver.queues[q];
                (dq.desc, dq.avail, dq.used)
            };
            let ram = &mut driver.ram;
            let headers = ram.alloc(16 * spec.iodepth as u64, 64);
            let status = ram.alloc(spec.iodepth as u64, 64);
            let data = ram.alloc((spec.iodepth * spec.bs) as u64, 4096);
            // SAFETY: data..data+iodepth*bs was just allocated inside the RAM.
            unsafe {
                std::ptr::write_bytes(
                    ram.ptr(data, (spec.iodepth * spec.bs) as u64),
                    0xa5,
                    spec.iodepth * spec.bs,
                )
            };
            for s in 0..spec.iodepth {
                let d = (s * PER_SLOT) as u16;
                let write_desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
                    pollblk_driver::DriverQueue::write_desc(
                        ram, desc_gpa, i, addr, len, flags, next,
                    )
                };
                write_desc(d, headers + 16 * s as u64, 16, DESC_F_NEXT, d + 1);
                let buf = data + (s * spec.bs) as u64;
                write_desc(
                    d + 1,
                    buf,
                    spec.bs as u32,
                    DESC_F_NEXT | DESC_F_WRITE,
                    d + 2,
                );
                write_desc(d + 2, status + s as u64, 1, DESC_F_WRITE, 0);
            }
            let ring = Ring {
                size,
                desc: ram.ptr(desc_gpa, 16 * u64::from(size)),
                avail: ram.ptr(avail_gpa, 6 + 2 * u64::from(size)),
                used: ram.ptr(used_gpa, 6 + 8 * u64::from(size)),
                headers: ram.ptr(headers, 16 * spec.iodepth as u64),
                status: ram.ptr(status, spec.iodepth as u64),
                next_avail: 0,
                published_avail: 0,
                last_used: 0,
            };
            // The used ring is polled: ask the device not to signal (for EVENT_IDX, reap keeps
            // used_event just behind what was consumed).
            if !event_idx {
                Ring::u16_at(ring.avail).store(AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
            }
            rings.push(ring);
        }
        Ok((
            LeanQueues {
                rings,
                depth: spec.iodepth,
                event_idx,
                driver,
            },
            capacity,
        ))
    }
}

impl Queues for LeanQueues {
    fn submit(&mut self, queue: usize, slot: usize, write: bool, offset: u64) {
        let r = &mut self.rings[queue];
        let d = slot * PER_SLOT;
        // SAFETY: slot < iodepth: its header, data descriptor and avail entry are inside the
        // rings and buffers laid out in open().
        unsafe {
            let h = r.headers.add(16 * slot);
            let kind = if write { T_OUT } else { T_IN };
            std::ptr::write_unaligned(h as *mut u32, kind.to_le());
            std::ptr::write_unaligned(h.add(8) as *mut u64, (offset / 512).to_le());
            let flags = if write {
                DESC_F_NEXT
            } else {
                DESC_F_NEXT | DESC_F_WRITE
            };
            let flags_ptr = r.desc.add(16 * (d + 1) + 12) as *mut u16;
            std::ptr::write_unaligned(flags_ptr, flags.to_le());
            // A status the device must overwrite: a request it never finished cannot pass.
            std::ptr::write_volatile(r.status.add(slot), 0xff);
            let entry = r.avail.add(4 + 2 * usize::from(r.next_avail % r.size)) as *mut u16;
            std::ptr::write_unaligned(entry, (d as u16).to_le());
        }
        r.next_avail = r.next_avail.wrapping_add(1);
    }

    fn commit(&mut self, queue: usize) -> Result<(), String> {
        let r = &mut self.rings[queue];
        if r.next_avail == r.published_avail {
            return Ok(());
        }
        let old = r.published_avail;
        let new = r.next_avail;
        // Ring entries and headers before the index (release), and the index before reading
        // the device's suppression fields (full fence; virtio 1.3, 2.7.13.3.1).
        Ring::u16_at(r.avail.wrapping_add(2)).store(new.to_le(), Ordering::Release);
        r.published_avail = new;
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            // SAFETY: avail_event follows the used ring's entries.
            let event = u16::from_le(
                Ring::u16_at(unsafe { r.used.add(4 + 8 * usize::from(r.size)) })
                    .load(Ordering::Relaxed),
            );
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            u16::from_le(Ring::u16_at(r.used).load(Ordering::Relaxed)) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.driver.queues[queue]
                .kick
                .write(1)
                .map_err(|e| format!("kick: {e}"))?;
        }
        Ok(())
    }

    fn reap(&mut self, queue: usize, done: &mut [(usize, bool)]) -> Result<usize, String> {
        let r = &mut self.rings[queue];
        // SAFETY: offsets inside the used ring.
        let used_idx = u16::from_le(Ring::u16_at(unsafe { r.used.add(2) }).load(Ordering::Acquire));
        let mut n = 0;
        while r.last_used != used_idx && n < done.len() {
            let at = 4 + 8 * usize::from(r.last_used % r.size);
            // SAFETY: entry `at` is inside the used ring; the status byte of a returned slot
            // is inside the status array.
            let (id, ok) = unsafe {
                let id = u32::from_le(std::ptr::read_unaligned(r.used.add(at) as *const u32));
                let slot = id as usize / PER_SLOT;
                if !(id as usize).is_multiple_of(PER_SLOT) || slot >= self.depth {
                    return Err(format!(
                        "device returned descriptor {id}, not a request head"
                    ));
                }
                (slot, std::ptr::read_volatile(r.status.add(slot)) == 0)
            };
            done[n] = (id, ok);
            n += 1;
            r.last_used = r.last_used.wrapping_add(1);
        }
        if n > 0 && self.event_idx {
            // used_event just behind the consumed index: the device never finds a reason to
            // signal (vring_need_event is false for every publish after it).
            // SAFETY: used_event follows the avail ring's entries.
            let used_event = unsafe { r.avail.add(4 + 2 * usize::from(r.size)) };
            Ring::u16_at(used_event).store(r.last_used.wrapping_sub(1).to_le(), Ordering::Relaxed);
        }
        Ok(n)
    }
}
