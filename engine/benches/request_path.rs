//! Micro-benchmarks of the per-request work a reactor does, without io_uring: taking a head off
//! the avail ring, walking its descriptor chain, decoding the virtio-blk request, finishing it
//! (status byte, used entry, publish, notification check).
//!
//! The driver side is pollblk-driver's split ring in a memfd, mapped a second time through the
//! engine's GuestMemory exactly as a front end's memory table is. Both sides run on one thread,
//! so these figures leave out the cross-core cache misses of a real guest (see BENCHMARKS.md).
//!
//! `cargo bench -p pollblk-engine --bench request_path`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use io_uring::IoUring;
use pollblk_driver::memory::USER_BASE;
use pollblk_driver::ring::Buf;
use pollblk_driver::{DriverQueue, GuestRam};
use pollblk_engine::backend::{Backend, Completer, IoOp, NullBackend, Submitted};
use pollblk_engine::blk::{self, RequestKind};
use pollblk_engine::clock::Clock;
use pollblk_engine::device::{BlkDevice, DiskOptions, QueueRole};
use pollblk_engine::mem::{GuestMemory, MmapRegion};
use pollblk_engine::queue::{IoCtx, PolledQueue};
use pollblk_engine::stats::Stats;
use pollblk_engine::virtio::QueueSetup;
use pollblk_engine::virtqueue::{RingAddrs, Segments, SplitQueue};
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::Arc;

const QUEUE_SIZE: u16 = 256;
const RAM: u64 = 64 << 20;

/// A driver queue full of ready-made 4 KiB read chains, and the device's view of it.
struct Rig {
    ram: GuestRam,
    driver: DriverQueue,
    device: SplitQueue,
    mem: GuestMemory,
    addrs: RingAddrs,
    heads: Vec<u16>,
    next: usize,
    segs: Segments,
}

impl Rig {
    fn new(indirect: bool, segments: usize) -> Rig {
        let mut ram = GuestRam::new(RAM);
        let mut driver = DriverQueue::new(&mut ram, QUEUE_SIZE);
        let per_chain = if indirect { 1 } else { segments + 2 };
        let chains = usize::from(QUEUE_SIZE) / per_chain;
        let mut heads = Vec::with_capacity(chains);
        for _ in 0..chains {
            let header = ram.alloc(16, 16);
            ram.write(header, &[0u8; 16]); // VIRTIO_BLK_T_IN, sector 0
            let mut bufs = vec![Buf {
                gpa: header,
                len: 16,
                writable: false,
            }];
            for _ in 0..segments {
                let len = 4096 / segments as u32;
                bufs.push(Buf {
                    gpa: ram.alloc(u64::from(len), 512),
                    len,
                    writable: true,
                });
            }
            bufs.push(Buf {
                gpa: ram.alloc(1, 1),
                len: 1,
                writable: true,
            });
            heads.push(driver.add(&mut ram, &bufs, indirect));
        }
        // SAFETY: the fd stays open while `ram` lives; ManuallyDrop keeps it from being closed
        // twice.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(ram.fd()) });
        let region = MmapRegion::map(&file, 0, USER_BASE, RAM, 0).unwrap();
        let mem = GuestMemory::new(vec![Arc::new(region)]).unwrap();
        let addrs = RingAddrs {
            desc: USER_BASE + driver.desc,
            avail: USER_BASE + driver.avail,
            used: USER_BASE + driver.used,
        };
        let device = SplitQueue::new(&mem, addrs, QUEUE_SIZE, 0, true, true).unwrap();
        Rig {
            ram,
            driver,
            device,
            mem,
            addrs,
            heads,
            next: 0,
            segs: Segments::with_capacity(blk::SLOT_SEGMENTS),
        }
    }

    /// Makes the next prepared chain available again (the driver's side of one request).
    fn offer(&mut self) {
        let head = self.heads[self.next];
        self.next = (self.next + 1) % self.heads.len();
        // The chains were made available once by `add`; re-offering is just the avail write.
        self.driver.push_avail(&self.ram, head);
    }

    /// The device's decode of one request: pop, walk, status, parse.
    fn decode(&mut self) -> (u16, *mut u8, blk::Request) {
        let head = self.device.pop_avail().unwrap().expect("offered");
        self.device
            .walk_chain(&self.mem, head, &mut self.segs)
            .unwrap();
        let status = blk::locate_status(&mut self.segs).expect("status byte");
        let req = blk::parse(&mut self.segs).unwrap();
        assert_eq!(req.kind, RequestKind::In);
        (head, status, req)
    }
}

fn chain_decoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("chain_decode");
    for (name, indirect, segments) in [
        ("direct_3desc", false, 1),
        ("indirect_3desc", true, 1),
        ("direct_10desc", false, 8),
        ("indirect_10desc", true, 8),
    ] {
        let mut rig = Rig::new(indirect, segments);
        // Start the device behind the prepared chains: `add` already offered them once.
        for _ in 0..rig.heads.len() {
            rig.decode();
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                rig.offer();
                let (head, status, req) = rig.decode();
                rig.device.push_used(head, 1);
                black_box((status, req.data_len))
            })
        });
    }
    group.finish();
}

fn request_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_path");
    // Backends take an SQ and a completer even when they finish on the spot.
    let mut uring = IoUring::new(8).unwrap();
    let (tx, _rx) = crossbeam_channel::unbounded();
    let completer = Completer::new(
        tx,
        std::sync::Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap()),
    );
    for (name, read_zeroes) in [("null_read_4k", false), ("null_read_4k_zeroed", true)] {
        let backend = NullBackend::new(1 << 30, read_zeroes);
        let mut rig = Rig::new(false, 1);
        for _ in 0..rig.heads.len() {
            rig.decode();
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                rig.offer();
                let (head, status, req) = rig.decode();
                let data = &rig.segs.iovecs()[req.data.clone()];
                let op = IoOp::Read {
                    offset: 0,
                    iov: data.as_ptr(),
                    iov_count: data.len() as u32,
                };
                let done = backend.submit(&op, 0, &mut uring.submission(), &completer);
                assert_eq!(done, Submitted::Done(4096));
                // SAFETY: the status byte is inside the mapped guest RAM.
                unsafe { std::ptr::write_volatile(status, blk::status::OK) };
                rig.device.push_used(head, 4097);
                rig.device.publish_used();
                black_box(rig.device.needs_notification())
            })
        });
    }
    group.finish();
}

/// The reactor's per-request work as it runs it: a `RequestQueue` over the engine's
/// `VirtioRing` polled through `PolledQueue` (pop, walk, parse, checks and plan, volume
/// start, null backend, finish with status byte and used entry), then published.
fn queue_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_path");
    let mut uring = IoUring::new(256).unwrap();
    let (tx, _rx) = crossbeam_channel::unbounded();
    let completer = Completer::new(
        tx,
        std::sync::Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap()),
    );
    let clock = Clock::get();
    let mut rig = Rig::new(false, 1);
    let options = DiskOptions::named("bench", 1);
    let device = Arc::new(BlkDevice::new(
        options,
        Arc::new(NullBackend::new(1 << 30, false)),
    ));
    let mut queue = QueueSetup {
        device,
        mem: Arc::new(rig.mem.clone()),
        addrs: rig.addrs,
        size: QUEUE_SIZE,
        base: 0,
        event_idx: true,
        indirect: true,
        kick: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        call: None,
        err: None,
        enabled: true,
        stats: Stats::private(),
        role: QueueRole::Requests,
        inflight: None,
        dirty_log: None,
    }
    .into_queue()
    .unwrap();
    let mut ops_in_flight = 0;
    let mut poll_one = |queue: &mut Box<dyn PolledQueue>| {
        let mut io = IoCtx::new(
            uring.submission(),
            &completer,
            &mut ops_in_flight,
            1024,
            1 << 60,
            &clock,
        );
        let took = queue.poll(&mut io);
        queue.publish();
        took
    };
    // The chains `add` offered once: the queue takes them, and the device is where the
    // driver is.
    while poll_one(&mut queue) {}
    group.bench_function("queue_null_read_4k", |b| {
        b.iter(|| {
            rig.offer();
            assert!(poll_one(&mut queue));
        })
    });
    group.finish();
}

criterion_group!(benches, chain_decoding, request_path, queue_path);
criterion_main!(benches);
