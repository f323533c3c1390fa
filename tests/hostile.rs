//! The hostile-input table (docs/security.md): for each malformed input a guest driver or a
//! front end can send, the outcome pollblk gives it, and after each one a check that another
//! disk served by the same reactor kept serving and that the attacked disk serves the next
//! connection. One daemon, one reactor (`--cores 0`) for both disks: the attacked disk and
//! the bystander share everything a bug could take down.

mod common;

use common::{image, pattern, Daemon};
use pollblk_driver::blk::*;
use pollblk_driver::memory::USER_BASE;
use pollblk_driver::ring::{Buf, DriverQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use std::os::fd::AsRawFd;
use std::time::Duration;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

/// What a malformed input gets.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The request completes with this virtio-blk status; the queue goes on.
    Status(u8),
    /// The chain has no writable byte: returned with nothing written (used len 0).
    NoStatus,
    /// The ring cannot be trusted: the queue stops (NEEDS_RESET), nothing completes.
    QueueStopped,
    /// The vhost-user message is refused; the daemon goes on.
    Rejected,
}

type Attack = fn(&mut BlkDriver) -> Outcome;

/// Runs one chain of `bufs` and reads the status byte at `status_gpa` (if any).
fn chain(d: &mut BlkDriver, bufs: &[Buf], status_gpa: Option<u64>, indirect: bool) -> Outcome {
    d.queues[0].add(&mut d.ram, bufs, indirect);
    d.queues[0].kick.write(1).unwrap();
    match d.queues[0].wait_used(&d.ram, Duration::from_millis(500)) {
        None => Outcome::QueueStopped,
        Some((_, 0)) => Outcome::NoStatus,
        Some(_) => Outcome::Status(d.ram.read(status_gpa.expect("a status byte"), 1)[0]),
    }
}

fn header(d: &mut BlkDriver, kind: u32, sector: u64) -> u64 {
    let gpa = d.ram.alloc(16, 16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.ram.write(gpa, &h);
    gpa
}

fn buf(gpa: u64, len: u32, writable: bool) -> Buf {
    Buf { gpa, len, writable }
}

fn request(d: &mut BlkDriver, kind: u32, sector: u64, in_len: u32) -> Outcome {
    let req = Request {
        kind,
        sector,
        in_len: in_len as usize,
        ..Default::default()
    };
    Outcome::Status(d.run(0, &req).status)
}

/// A descriptor chain written by hand at the queue's next free descriptors, then made
/// available: `descs` are (addr, len, flags, next) with next as an offset from the head.
fn raw_ring(d: &mut BlkDriver, descs: &[(u64, u32, u16, u16)]) -> Outcome {
    let q = &mut d.queues[0];
    let head = q.take_descriptor();
    for _ in 1..descs.len() {
        q.take_descriptor();
    }
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        DriverQueue::write_desc(
            &d.ram,
            q.desc,
            head + i as u16,
            addr,
            len,
            flags,
            head + next,
        );
    }
    q.push_avail(&d.ram, head);
    q.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    match d.queues[0].pop_used(&d.ram) {
        None => Outcome::QueueStopped,
        Some(_) => Outcome::Status(255),
    }
}

fn rejected<T, E>(r: Result<T, E>) -> Outcome {
    match r {
        Ok(_) => Outcome::Status(0),
        Err(_) => Outcome::Rejected,
    }
}

const TABLE: &[(&str, Outcome, Attack)] = &[
    ("unknown request type", Outcome::Status(S_UNSUPP), |d| {
        request(d, 99, 0, 512)
    }),
    ("read past the end", Outcome::Status(S_IOERR), |d| {
        let last = d.capacity();
        request(d, T_IN, last, 512)
    }),
    ("sector that overflows", Outcome::Status(S_IOERR), |d| {
        request(d, T_IN, u64::MAX, 512)
    }),
    ("length not whole sectors", Outcome::Status(S_IOERR), |d| {
        request(d, T_IN, 0, 100)
    }),
    (
        "header shorter than 16 bytes",
        Outcome::Status(S_IOERR),
        |d| {
            let h = header(d, T_IN, 0);
            let s = d.ram.alloc(1, 1);
            chain(d, &[buf(h, 8, false), buf(s, 1, true)], Some(s), false)
        },
    ),
    (
        "data buffer outside guest memory",
        Outcome::Status(S_IOERR),
        |d| {
            let h = header(d, T_IN, 0);
            let s = d.ram.alloc(1, 1);
            let outside = d.ram.size() - 100;
            chain(
                d,
                &[buf(h, 16, false), buf(outside, 4096, true), buf(s, 1, true)],
                Some(s),
                false,
            )
        },
    ),
    (
        "readable buffer after a writable one",
        Outcome::Status(S_IOERR),
        |d| {
            let h = header(d, T_OUT, 0);
            let data = d.ram.alloc(512, 512);
            let s = d.ram.alloc(1, 1);
            // The device must not write a buffer the driver gave it to read.
            let bufs = [buf(h, 16, false), buf(s, 1, true), buf(data, 512, false)];
            let before = d.ram.read(data, 512);
            let outcome = chain(d, &bufs, Some(s), false);
            assert_eq!(
                d.ram.read(data, 512),
                before,
                "a readable buffer was written"
            );
            outcome
        },
    ),
    ("chain with no writable byte", Outcome::NoStatus, |d| {
        let h = header(d, T_IN, 0);
        chain(d, &[buf(h, 16, false)], None, false)
    }),
    ("descriptor loop", Outcome::QueueStopped, |d| {
        let h = header(d, T_IN, 0);
        raw_ring(d, &[(h, 16, DESC_F_NEXT, 0)])
    }),
    ("next past the table", Outcome::QueueStopped, |d| {
        let h = header(d, T_IN, 0);
        raw_ring(d, &[(h, 16, DESC_F_NEXT, 1000)])
    }),
    ("avail entry past the table", Outcome::QueueStopped, |d| {
        let q = &mut d.queues[0];
        q.push_avail(&d.ram, q.size + 3);
        q.kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if d.queues[0].pop_used(&d.ram).is_some() {
            Outcome::Status(255)
        } else {
            Outcome::QueueStopped
        }
    }),
    (
        "avail index a whole queue ahead",
        Outcome::QueueStopped,
        |d| {
            let q = &mut d.queues[0];
            q.set_avail_idx(&d.ram, q.next_avail().wrapping_add(q.size + 1));
            q.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            if d.queues[0].pop_used(&d.ram).is_some() {
                Outcome::Status(255)
            } else {
                Outcome::QueueStopped
            }
        },
    ),
    // Found by the chain fuzzer: reading a misaligned table was undefined behaviour.
    (
        "indirect table at an odd address (served)",
        Outcome::Status(S_OK),
        |d| {
            let h = header(d, T_IN, 8);
            let data = d.ram.alloc(4096, 4096);
            let s = d.ram.alloc(1, 1);
            let table = d.ram.alloc(64, 16) + 1;
            DriverQueue::write_desc(&d.ram, table, 0, h, 16, DESC_F_NEXT, 1);
            DriverQueue::write_desc(&d.ram, table, 1, data, 4096, DESC_F_WRITE | DESC_F_NEXT, 2);
            DriverQueue::write_desc(&d.ram, table, 2, s, 1, DESC_F_WRITE, 0);
            let q = &mut d.queues[0];
            let head = q.take_descriptor();
            DriverQueue::write_desc(&d.ram, q.desc, head, table, 48, DESC_F_INDIRECT, 0);
            q.push_avail(&d.ram, head);
            q.kick.write(1).unwrap();
            match d.queues[0].wait_used(&d.ram, Duration::from_secs(5)) {
                None => Outcome::QueueStopped,
                Some(_) => Outcome::Status(d.ram.read(s, 1)[0]),
            }
        },
    ),
    ("indirect table of 17 bytes", Outcome::QueueStopped, |d| {
        let t = d.ram.alloc(32, 16);
        raw_ring(d, &[(t, 17, DESC_F_INDIRECT, 0)])
    }),
    ("indirect inside indirect", Outcome::QueueStopped, |d| {
        let inner = d.ram.alloc(16, 16);
        let outer = d.ram.alloc(16, 16);
        DriverQueue::write_desc(&d.ram, outer, 0, inner, 16, DESC_F_INDIRECT, 0);
        raw_ring(d, &[(outer, 16, DESC_F_INDIRECT, 0)])
    }),
    ("indirect and next together", Outcome::QueueStopped, |d| {
        let t = d.ram.alloc(16, 16);
        let s = d.ram.alloc(1, 1);
        raw_ring(
            d,
            &[
                (t, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1),
                (s, 1, DESC_F_WRITE, 0),
            ],
        )
    }),
    ("vring size not a power of two", Outcome::Rejected, |d| {
        rejected(d.frontend.set_vring_num(0, 100))
    }),
    ("vring index past the queues", Outcome::Rejected, |d| {
        rejected(d.frontend.set_vring_base(200, 0))
    }),
    ("vring outside guest memory", Outcome::Rejected, |d| {
        let q = &d.queues[0];
        let config = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: USER_BASE + d.ram.size() + 4096,
            used_ring_addr: USER_BASE + q.used,
            avail_ring_addr: USER_BASE + q.avail,
            log_addr: None,
        };
        let f = &d.frontend;
        let _ = f.set_vring_addr(0, &config);
        rejected(f.set_vring_kick(0, &d.queues[0].kick))
    }),
    (
        "memory region larger than its file",
        Outcome::Rejected,
        |d| {
            let small = tempfile::tempfile().unwrap();
            small.set_len(4096).unwrap();
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: 1 << 30,
                userspace_addr: USER_BASE,
                mmap_offset: 0,
                mmap_handle: small.as_raw_fd(),
            };
            rejected(d.frontend.set_mem_table(&[region]))
        },
    ),
    (
        "config read past the config space",
        Outcome::Rejected,
        |d| {
            rejected(
                d.frontend
                    .get_config(0, 8192, VhostUserConfigFlags::WRITABLE, &[0u8; 8192]),
            )
        },
    ),
];

#[test]
fn every_hostile_input_fails_alone() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "a.img", 16 << 20);
    let (sock_a, sock_b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let args = [
        "--cores".to_string(),
        "0".into(),
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},file={},num-queues=1",
            sock_a.display(),
            file.display()
        ),
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,num-queues=1",
            sock_b.display()
        ),
    ];
    let _daemon = Daemon::start(dir.path(), &args);
    let mut bystander = BlkDriver::connect(&sock_b, DriverOptions::default());
    for (i, (what, expected, attack)) in TABLE.iter().enumerate() {
        let mut d = BlkDriver::connect(&sock_a, DriverOptions::default());
        assert_eq!(
            d.write(0, 8, &pattern(4096, i as u8)),
            S_OK,
            "{what}: setup"
        );
        let outcome = attack(&mut d);
        assert_eq!(&outcome, expected, "{what}");
        if *expected != Outcome::QueueStopped && *expected != Outcome::Rejected {
            // The request failed alone: the same queue serves the next one.
            assert_eq!(
                d.read(0, 8, 4096),
                (S_OK, pattern(4096, i as u8)),
                "{what}: after"
            );
        }
        drop(d);
        // The other disk on the same reactor never noticed.
        assert_eq!(
            bystander.read(0, 0, 4096),
            (S_OK, vec![0u8; 4096]),
            "{what}: bystander"
        );
    }
    // The attacked disk serves a new connection with its data intact.
    let mut d = BlkDriver::connect(&sock_a, DriverOptions::default());
    let last = TABLE.len() as u8 - 1;
    assert_eq!(d.read(0, 8, 4096), (S_OK, pattern(4096, last)));
}
