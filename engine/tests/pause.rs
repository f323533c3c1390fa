//! Pausing, resuming and parking a queue on a real reactor. A pause (the engine half of
//! device state) waits for requests in flight and reports the index only after they
//! completed, is bounded by a timeout, and resuming at that index neither loses nor repeats a
//! request. An idle queue leaves the reactor's polled list, and its kick brings it back.

use pollblk_driver::memory::USER_BASE;
use pollblk_driver::ring::Buf;
use pollblk_driver::{DriverQueue, GuestRam};
use pollblk_engine::backend::{Backend, BackendInfo, Completer, IoOp, Submitted};
use pollblk_engine::device::QueueRole;
use pollblk_engine::device::{BlkDevice, DiskOptions};
use pollblk_engine::mem::{GuestMemory, MmapRegion};
use pollblk_engine::reactor::{PollConfig, QueueId, Reactors, StopError};
use pollblk_engine::virtio::QueueSetup;
use pollblk_engine::virtqueue::RingAddrs;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 16 << 20;
const QUEUE_SIZE: u16 = 16;

/// A volume that holds every operation until the test releases it (a stalled device).
#[derive(Default)]
struct HoldingBackend {
    held: Mutex<Vec<(u64, i32, Completer)>>,
}

impl HoldingBackend {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    fn release_all(&self) {
        for (user_data, result, completer) in self.held.lock().unwrap().drain(..) {
            completer.complete(user_data, result);
        }
    }
}

impl Backend for HoldingBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            size_bytes: 1 << 20,
            dio_alignment: 1,
            volatile_cache: false,
            discard: false,
        }
    }

    fn submit(
        &self,
        op: &IoOp,
        user_data: u64,
        _sq: &mut io_uring::squeue::SubmissionQueue<'_>,
        completer: &Completer,
    ) -> Submitted {
        let result = match *op {
            // SAFETY: the reactor passes iov_count valid iovecs.
            IoOp::Read { iov, iov_count, .. } => unsafe {
                std::slice::from_raw_parts(iov, iov_count as usize)
                    .iter()
                    .map(|v| v.iov_len as i32)
                    .sum()
            },
            _ => 0,
        };
        self.held
            .lock()
            .unwrap()
            .push((user_data, result, completer.clone()));
        Submitted::Deferred
    }

    fn sync_all(&self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Rig {
    ram: GuestRam,
    queue: DriverQueue,
    mem: Arc<GuestMemory>,
    backend: Arc<HoldingBackend>,
    device: Arc<BlkDevice>,
    kick: EventFd,
}

impl Rig {
    fn new() -> Rig {
        let mut ram = GuestRam::new(RAM);
        let queue = DriverQueue::new(&mut ram, QUEUE_SIZE);
        // SAFETY: the fd stays open while `ram` lives; ManuallyDrop keeps it from being
        // closed twice.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(ram.fd()) });
        let region = MmapRegion::map(&file, 0, USER_BASE, RAM, 0).unwrap();
        let mem = Arc::new(GuestMemory::new(vec![Arc::new(region)]).unwrap());
        let backend = Arc::new(HoldingBackend::default());
        let device = Arc::new(BlkDevice::new(
            DiskOptions::named("held", 1),
            backend.clone(),
        ));
        Rig {
            ram,
            queue,
            mem,
            backend,
            device,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn setup(&self, base: u16) -> QueueSetup {
        QueueSetup {
            device: self.device.clone(),
            mem: self.mem.clone(),
            addrs: RingAddrs {
                desc: USER_BASE + self.queue.desc,
                avail: USER_BASE + self.queue.avail,
                used: USER_BASE + self.queue.used,
            },
            size: QUEUE_SIZE,
            base,
            event_idx: false,
            indirect: false,
            kick: self.kick.try_clone().unwrap(),
            call: None,
            err: None,
            enabled: true,
            stats: self.device.queue_stats(0).clone(),
            role: QueueRole::Requests,
            inflight: None,
            dirty_log: None,
        }
    }

    /// Makes a 512-byte read of `sector` available and kicks; returns its head.
    fn read(&mut self, sector: u64) -> u16 {
        let header = self.ram.alloc(16, 16);
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(header, &h);
        let data = self.ram.alloc(512, 512);
        let status = self.ram.alloc(1, 1);
        self.ram.write(status, &[0xff]);
        let bufs = [
            Buf {
                gpa: header,
                len: 16,
                writable: false,
            },
            Buf {
                gpa: data,
                len: 512,
                writable: true,
            },
            Buf {
                gpa: status,
                len: 1,
                writable: true,
            },
        ];
        let head = self.queue.add(&mut self.ram, &bufs, false);
        self.kick.write(1).unwrap();
        head
    }

    fn wait_held(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.backend.held() < n {
            assert!(
                Instant::now() < deadline,
                "the reactor took {} of {n}",
                self.backend.held()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Every used entry published since the last call, in order.
    fn used(&mut self) -> Vec<u16> {
        let mut heads = Vec::new();
        while let Some((head, _)) = self.queue.pop_used(&self.ram) {
            heads.push(head);
        }
        heads
    }
}

#[test]
fn a_pause_reports_the_index_only_after_requests_in_flight_completed() {
    let reactors = Reactors::start(&[0], PollConfig::default(), None).unwrap();
    let reactor = reactors.for_queue(0).clone();
    let mut rig = Rig::new();
    let id = QueueId::fresh();
    reactor.attach(id, rig.setup(0)).unwrap();
    let first: Vec<u16> = (0..3).map(|i| rig.read(i)).collect();
    rig.wait_held(3);

    // Bounded: the requests are stuck in the backend, and the pause says so.
    assert_eq!(
        reactor.stop_within(id, Duration::from_millis(200)),
        Err(StopError::Timeout)
    );
    assert!(rig.used().is_empty(), "nothing completed while held");

    // Asked again, it answers once the backend lets go, with the index after all three.
    let waiting = {
        let reactor = reactor.clone();
        std::thread::spawn(move || reactor.stop_within(id, Duration::from_secs(10)))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !waiting.is_finished(),
        "the pause waits for requests in flight"
    );
    rig.backend.release_all();
    assert_eq!(waiting.join().unwrap(), Ok(3));
    assert_eq!(
        rig.used(),
        first,
        "every request completed once, before the pause answered"
    );

    // Requests made while paused wait; resuming at the index serves them, and only them.
    let later: Vec<u16> = (3..5).map(|i| rig.read(i)).collect();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.backend.held(), 0, "a paused queue takes nothing");
    let id2 = QueueId::fresh();
    reactor.attach(id2, rig.setup(3)).unwrap();
    rig.wait_held(2);
    rig.backend.release_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut done = Vec::new();
    while done.len() < 2 {
        done.extend(rig.used());
        assert!(
            Instant::now() < deadline,
            "resumed requests did not complete"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(done, later, "resumed at 3: the new requests, none repeated");
    assert_eq!(rig.backend.held(), 0);
    assert_eq!(reactor.stop_within(id2, Duration::from_secs(5)), Ok(5));
    reactors.shutdown();
}

/// A reactor statistic, as its file says now.
fn reactor_stat(dir: &std::path::Path, name: &str) -> u64 {
    let reader = pollblk_engine::stats::StatsReader::open(&dir.join("reactor-0.stats")).unwrap();
    let sample = reader.sample().unwrap();
    let desc = reader.descs().iter().find(|d| d.name == name).unwrap();
    sample.of(desc)[0]
}

#[test]
fn an_idle_queue_is_parked_and_its_kick_brings_it_back() {
    let stats = tempfile::tempdir().unwrap();
    let dir = pollblk_engine::stats::StatsDir::open(stats.path(), None).unwrap();
    let reactors = Reactors::start(&[0], PollConfig::default(), Some(&dir)).unwrap();
    let reactor = reactors.for_queue(0).clone();
    let mut rig = Rig::new();
    let id = QueueId::fresh();
    reactor.attach(id, rig.setup(0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reactor_stat(stats.path(), "queue_parks") == 0 {
        assert!(Instant::now() < deadline, "an idle queue was never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reactor_stat(stats.path(), "queues_polled"), 0);
    assert_eq!(reactor_stat(stats.path(), "queues"), 1);
    // The driver's kick wakes the reactor and the queue is served again.
    let head = rig.read(7);
    rig.wait_held(1);
    rig.backend.release_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut done = Vec::new();
    while done.is_empty() {
        done.extend(rig.used());
        assert!(
            Instant::now() < deadline,
            "the parked queue's request never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(done, [head]);
    assert_eq!(reactor.stop_within(id, Duration::from_secs(5)), Ok(1));
    reactors.shutdown();
}
