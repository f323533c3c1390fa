//! Descriptor chains and virtio-blk requests from a hostile driver: arbitrary guest memory
//! regions (count, placement, size, contents), ring addresses, queue size, base index and
//! features, through the engine's request ring as the reactor's queues use it
//! (`virtio::VirtioRing` behind the `ring::Ring` trait: avail ring, chain walk with indirect
//! tables, status byte, parse), then its answers on the used ring.
//!
//! Invariants checked, not only the absence of panics:
//! - every buffer handed out lies wholly inside one guest memory region;
//! - every buffer the device may write lies inside a descriptor the driver marked WRITE;
//! - the status byte is inside such a buffer; parse's data range is inside the buffers;
//! - a chain never yields more buffers than its slot holds, nor more bytes than a u32.
//!
//! (The device's own writes may land in the driver's rings when the driver overlaps them
//! with its buffers, moving the avail index: the loop is bounded like a reactor's batch.)
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pollblk_engine::backend::NullBackend;
use pollblk_engine::blk;
use pollblk_engine::device::{BlkDevice, DiskOptions, QueueRole};
use pollblk_engine::mem::{GuestMemory, MmapRegion};
use pollblk_engine::request::Status;
use pollblk_engine::ring::{Popped, Ring};
use pollblk_engine::stats::Stats;
use pollblk_engine::virtio::{QueueSetup, VirtioRing};
use pollblk_engine::virtqueue::{RingAddrs, Segments, SplitQueue};
use vmm_sys_util::eventfd::EventFd;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

const PAGE: u64 = 4096;
const USER_BASE: u64 = 0x7000_0000_0000;

#[derive(Arbitrary, Debug)]
struct Region {
    /// Guest page number of the region's start (kept small so regions meet and overlap).
    first_page: u8,
    /// Pages (1 to 8).
    pages: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    regions: Vec<Region>,
    size_log2: u8,
    /// Ring parts as guest addresses (bytes, anywhere in the first 1 MiB).
    desc: u32,
    avail: u32,
    used: u32,
    base: u16,
    event_idx: bool,
    indirect: bool,
    /// Guest memory contents, repeated over the regions.
    memory: Vec<u8>,
}

/// One mapped region: its guest range and host pointer.
struct Mapped {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

fn memfd(len: u64) -> File {
    // SAFETY: plain syscall; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), 0) };
    assert!(fd >= 0);
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

fuzz_target!(|input: Input| {
    if input.regions.is_empty() || input.regions.len() > 4 || input.memory.is_empty() {
        return;
    }
    let size = 1u16 << (input.size_log2 % 9); // 1 to 256 entries
    let mut regions = Vec::new();
    let mut mapped = Vec::new();
    for (i, r) in input.regions.iter().enumerate() {
        let gpa = u64::from(r.first_page) * PAGE;
        let len = u64::from(r.pages % 8 + 1) * PAGE;
        let file = memfd(len);
        // Regions may overlap in guest-physical space; GuestMemory must refuse or cope.
        let user = USER_BASE + (i as u64) * (1 << 32) + gpa;
        let Ok(region) = MmapRegion::map(&file, gpa, user, len, 0) else {
            return;
        };
        let region = Arc::new(region);
        let host = region.host_base();
        // SAFETY: the region maps len bytes at host.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = input.memory[(j + i * 7) % input.memory.len()];
        }
        mapped.push(Mapped { gpa, len, host });
        regions.push(region);
    }
    let Ok(mem) = GuestMemory::new(regions) else {
        return;
    };
    // Ring addresses are given to the device as the front end's virtual addresses.
    let to_user = |gpa: u32| {
        let gpa = u64::from(gpa) % (1 << 20);
        mapped
            .iter()
            .enumerate()
            .find(|(_, m)| gpa >= m.gpa && gpa < m.gpa + m.len)
            .map(|(i, _)| USER_BASE + (i as u64) * (1 << 32) + gpa)
            .unwrap_or(gpa)
    };
    let addrs = RingAddrs {
        desc: to_user(input.desc),
        avail: to_user(input.avail),
        used: to_user(input.used),
    };
    let mem = Arc::new(mem);
    let Ok(mut ring) = request_ring(&mem, addrs, size, &input) else {
        return;
    };

    let inside_region = |ptr: *const u8, len: usize| {
        mapped.iter().any(|m| {
            let start = m.host as usize;
            let p = ptr as usize;
            p >= start && p + len <= start + m.len as usize
        })
    };
    let mut segs = Segments::with_capacity(ring.max_segments());
    for _ in 0..2 * u32::from(size) {
        let mut request = blk::Request::default();
        let popped = match ring.pop(0, &mut segs, &mut request) {
            Ok(Popped::Nothing) | Err(_) => break,
            Ok(popped) => popped,
        };
        assert!(segs.iovecs().len() <= blk::SLOT_SEGMENTS);
        let total: u64 = segs.iovecs().iter().map(|v| v.iov_len as u64).sum();
        assert!(total <= u64::from(u32::MAX));
        let writable_ranges = write_descriptors(&mem, ring.split_queue(), input.indirect);
        for (i, v) in segs.iovecs().iter().enumerate() {
            assert!(
                inside_region(v.iov_base as *const u8, v.iov_len),
                "buffer outside memory"
            );
            if i >= segs.readable_count() && v.iov_len > 0 {
                assert!(
                    writable_ranges.iter().any(|&(p, l)| {
                        let b = v.iov_base as usize;
                        b >= p && b + v.iov_len <= p + l
                    }),
                    "a device-writable buffer the driver did not mark WRITE"
                );
            }
        }
        let status = ring.status_ptr(0);
        if !status.is_null() {
            assert!(
                writable_ranges
                    .iter()
                    .any(|&(p, l)| (status as usize) >= p && (status as usize) < p + l),
                "status byte outside the writable buffers"
            );
        }
        if popped == Popped::Request {
            let req = &request;
            assert!(!status.is_null(), "a request with nowhere to put its status");
            assert!(req.data.end <= segs.iovecs().len() && req.data.start <= req.data.end);
            let sum: u64 = segs.iovecs()[req.data.clone()]
                .iter()
                .map(|v| v.iov_len as u64)
                .sum();
            assert_eq!(sum, req.data_len);
        }
        ring.complete(0, &segs, Status::IoError, 0);
        let _ = ring.publish();
    }
    let _ = ring.enable_notification();
    ring.disable_notification();
});

/// The engine's request ring over the fuzzer's rings, as a vhost-user queue would get it.
fn request_ring(
    mem: &Arc<GuestMemory>,
    addrs: RingAddrs,
    size: u16,
    input: &Input,
) -> Result<VirtioRing, pollblk_engine::virtqueue::Broken> {
    let options = DiskOptions::named("fuzz", 1);
    let device = Arc::new(BlkDevice::new(
        options,
        Arc::new(NullBackend::new(1 << 20, false)),
    ));
    QueueSetup {
        device,
        mem: mem.clone(),
        addrs,
        size,
        base: input.base,
        event_idx: input.event_idx,
        indirect: input.indirect,
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        call: None,
        err: None,
        enabled: true,
        stats: Stats::private(),
        role: QueueRole::Requests,
        inflight: None,
        dirty_log: None,
    }
    .into_ring()
}

/// Host ranges of every descriptor marked WRITE in the queue's table and in any indirect
/// table it names: where the device may write (a superset of one chain's buffers).
fn write_descriptors(mem: &GuestMemory, queue: &SplitQueue, indirect: bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (table, count) = queue.desc_table();
    let read = |table: *const u8, i: usize| {
        // SAFETY: i < the table's entries; the table lies in guest memory (translated).
        let d = unsafe { std::slice::from_raw_parts(table.add(16 * i), 16) };
        (
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u32::from_le_bytes(d[8..12].try_into().unwrap()),
            u16::from_le_bytes(d[12..14].try_into().unwrap()),
        )
    };
    let mut add = |addr: u64, len: u32, flags: u16| {
        if flags & 2 != 0 {
            if let Some(p) = mem.translate(addr, u64::from(len)) {
                out.push((p as usize, len as usize));
            }
        }
    };
    for i in 0..usize::from(count) {
        let (addr, len, flags) = read(table, i);
        if flags & 4 != 0 && indirect && len % 16 == 0 && len > 0 {
            if let Some(t) = mem.translate(addr, u64::from(len)) {
                for j in 0..(len / 16) as usize {
                    let (a, l, f) = read(t, j);
                    add(a, l, f);
                }
            }
        } else {
            add(addr, len, flags);
        }
    }
    out
}
