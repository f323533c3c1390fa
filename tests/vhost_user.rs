//! The pollblk binary driven by a vhost-user front end that plays the guest driver.

mod common;

use common::{file_export, image, pattern, Daemon};
use pollblk_driver::blk::*;
use pollblk_driver::ring::{Buf, DriverQueue, DESC_F_NEXT, DESC_F_WRITE};
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    socket: std::path::PathBuf,
    file: std::path::PathBuf,
}

fn serve_file(size: u64, extra: &str) -> Setup {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "disk.img", size);
    let socket = dir.path().join("disk.sock");
    let daemon = Daemon::start(dir.path(), &file_export(&socket, &file, extra));
    Setup {
        _dir: dir,
        daemon,
        socket,
        file,
    }
}

fn read_file(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn features_and_config_space_describe_the_disk() {
    let s = serve_file(64 * MIB, ",num-queues=4,block-size=4096,serial=cfgtest");
    let d = BlkDriver::connect(&s.socket, DriverOptions::default());
    for bit in [
        F_VERSION_1,
        F_EVENT_IDX,
        F_INDIRECT_DESC,
        F_FLUSH,
        F_BLK_SIZE,
        F_MQ,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_CONFIG_WCE,
    ] {
        assert_ne!(d.offered & bit, 0, "feature {bit:#x} offered");
    }
    assert_eq!(d.offered & F_RO, 0);
    assert_eq!(d.capacity(), 64 * MIB / 512);
    assert_eq!(d.config_u32(12), 128, "seg_max");
    assert_eq!(d.config_u32(20), 4096, "blk_size");
    assert_eq!(
        u16::from_le_bytes([d.config[34], d.config[35]]),
        4,
        "num_queues"
    );
    assert!(
        d.config_u32(36) > 0 && d.config_u32(40) > 0,
        "discard limits"
    );
    assert_eq!(d.config_u32(44), 8, "discard alignment in sectors");
    assert!(
        d.config_u32(48) > 0 && d.config_u32(52) > 0,
        "write zeroes limits"
    );
    assert_eq!(d.config[56], 1, "write_zeroes_may_unmap");
}

#[test]
fn every_request_type_reaches_the_file() {
    let mut s = serve_file(64 * MIB, ",serial=pollblk-test-1");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());

    // OUT then IN: the data is in the file and reads back.
    let data = pattern(128 * 1024, 7);
    assert_eq!(d.write(0, 2048, &data), S_OK);
    let (st, back) = d.read(0, 2048, data.len());
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    let done = d.run(
        0,
        &Request {
            kind: T_IN,
            sector: 2048,
            in_len: 4096,
            ..Default::default()
        },
    );
    assert_eq!(done.used_len, 4097, "used len counts data and status");

    // FLUSH, then the bytes are in the file as another process sees it.
    let flush = d.run(
        0,
        &Request {
            kind: T_FLUSH,
            ..Default::default()
        },
    );
    assert_eq!((flush.status, flush.used_len), (S_OK, 1));
    assert_eq!(read_file(&s.file, 2048 * 512, data.len()), data);

    // GET_ID.
    let id = d.run(
        0,
        &Request {
            kind: T_GET_ID,
            in_len: 20,
            ..Default::default()
        },
    );
    assert_eq!(id.status, S_OK);
    assert_eq!(&id.data[..15], b"pollblk-test-1\0");

    // DISCARD: the range reads back as zeroes (holes punched), the rest is intact.
    let seg = dwz_segment(2048 + 64, 64, 0);
    let done = d.run(
        0,
        &Request {
            kind: T_DISCARD,
            out: seg,
            ..Default::default()
        },
    );
    assert_eq!(done.status, S_OK);
    let (_, back) = d.read(0, 2048, data.len());
    assert_eq!(&back[..32 * 1024], &data[..32 * 1024]);
    assert!(back[32 * 1024..64 * 1024].iter().all(|&b| b == 0));
    assert_eq!(&back[64 * 1024..], &data[64 * 1024..]);

    // WRITE_ZEROES with and without unmap, two segments in one request.
    let mut segs = dwz_segment(2048, 8, 0);
    segs.extend(dwz_segment(2048 + 200, 8, 1));
    let done = d.run(
        0,
        &Request {
            kind: T_WRITE_ZEROES,
            out: segs,
            ..Default::default()
        },
    );
    assert_eq!(done.status, S_OK);
    let (_, back) = d.read(0, 2048, data.len());
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..8192], &data[4096..8192]);
    assert!(back[200 * 512..208 * 512].iter().all(|&b| b == 0));

    // The daemon exits cleanly on SIGTERM and the data is in the file.
    assert_eq!(s.daemon.stop(), Some(0));
    assert_eq!(
        read_file(&s.file, (2048 + 8) * 512, 4096),
        data[4096..8192].to_vec()
    );
    assert!(!s.socket.exists(), "socket removed on shutdown");
}

#[test]
fn bad_requests_fail_alone() {
    let s = serve_file(16 * MIB, "");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());
    let last = d.capacity();
    let req = |kind, sector, out: Vec<u8>, in_len| Request {
        kind,
        sector,
        out,
        in_len,
        ..Default::default()
    };
    let too_many: Vec<u8> = (0..33).flat_map(|i| dwz_segment(i * 8, 8, 0)).collect();
    let cases = [
        ("unknown type", req(99, 0, vec![], 512), S_UNSUPP),
        ("read past the end", req(T_IN, last, vec![], 512), S_IOERR),
        (
            "write straddling the end",
            req(T_OUT, last - 1, vec![1; 1024], 0),
            S_IOERR,
        ),
        (
            "length not whole sectors",
            req(T_IN, 0, vec![], 100),
            S_IOERR,
        ),
        (
            "sector overflows",
            req(T_IN, u64::MAX, vec![], 512),
            S_IOERR,
        ),
        // virtio 1.3, 5.2.6.2: unmap on a discard and unknown flags get UNSUPP.
        (
            "discard with unmap",
            req(T_DISCARD, 0, dwz_segment(0, 8, 1), 0),
            S_UNSUPP,
        ),
        (
            "write zeroes, unknown flag",
            req(T_WRITE_ZEROES, 0, dwz_segment(0, 8, 2), 0),
            S_UNSUPP,
        ),
        (
            "discard past the end",
            req(T_DISCARD, 0, dwz_segment(last - 1, 8, 0), 0),
            S_IOERR,
        ),
        (
            "torn discard segment",
            req(T_DISCARD, 0, vec![0; 15], 0),
            S_IOERR,
        ),
        (
            "33 discard segments",
            req(T_DISCARD, 0, too_many, 0),
            S_UNSUPP,
        ),
    ];
    for (what, request, expected) in cases {
        assert_eq!(d.run(0, &request).status, expected, "{what}");
    }

    // A data buffer outside guest memory: IOERR, and the queue goes on.
    let mark = d.ram.mark();
    let header = d.ram.alloc(16, 16);
    d.ram.write(header, &[0u8; 16]); // IN, sector 0
    let status_gpa = d.ram.alloc(1, 1);
    let bufs = [
        Buf {
            gpa: header,
            len: 16,
            writable: false,
        },
        Buf {
            gpa: d.ram.size() - 100,
            len: 4096,
            writable: true,
        },
        Buf {
            gpa: status_gpa,
            len: 1,
            writable: true,
        },
    ];
    d.queues[0].add(&mut d.ram, &bufs, false);
    d.queues[0].kick.write(1).unwrap();
    let (_, len) = d.queues[0]
        .wait_used(&d.ram, Duration::from_secs(10))
        .unwrap();
    assert_eq!(d.ram.read(status_gpa, 1)[0], S_IOERR);
    assert_eq!(len, 1);
    d.ram.release(mark);

    // A chain with no writable byte cannot carry a status: returned with len 0.
    let header = d.ram.alloc(16, 16);
    d.queues[0].add(
        &mut d.ram,
        &[Buf {
            gpa: header,
            len: 16,
            writable: false,
        }],
        false,
    );
    d.queues[0].kick.write(1).unwrap();
    let (_, len) = d.queues[0]
        .wait_used(&d.ram, Duration::from_secs(10))
        .unwrap();
    assert_eq!(len, 0);
    d.ram.release(mark);

    // Still serving.
    assert_eq!(d.write(0, 0, &pattern(4096, 1)), S_OK);
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(4096, 1)));
}

#[test]
fn a_broken_ring_stops_its_queue_only() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "a.img", 16 * MIB);
    let sock_a = dir.path().join("a.sock");
    let sock_b = dir.path().join("b.sock");
    let mut args = file_export(&sock_a, &file, ",num-queues=2");
    args.extend([
        "--export".to_string(),
        format!("vhost-user-blk,socket={},null,size=16M", sock_b.display()),
    ]);
    let _daemon = Daemon::start(dir.path(), &args);

    let mut a = BlkDriver::connect(
        &sock_a,
        DriverOptions {
            queues: 2,
            ..Default::default()
        },
    );
    let mut b = BlkDriver::connect(&sock_b, DriverOptions::default());

    // Queue 0 of disk A: a descriptor whose next points at itself (a loop).
    let q = &mut a.queues[0];
    let head = q.take_descriptor();
    let header = a.ram.alloc(16, 16);
    DriverQueue::write_desc(&a.ram, q.desc, head, header, 16, DESC_F_NEXT, head);
    q.push_avail(&a.ram, head);
    q.kick.write(1).unwrap();
    // Then an avail entry naming a descriptor past the table.
    q.push_avail(&a.ram, q.size + 5);
    q.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        a.queues[0].used_idx(&a.ram),
        0,
        "a broken queue completes nothing"
    );

    // Disk A's other queue and disk B still work.
    assert_eq!(a.write(1, 8, &pattern(8192, 3)), S_OK);
    assert_eq!(a.read(1, 8, 8192), (S_OK, pattern(8192, 3)));
    assert_eq!(b.read(0, 0, 4096), (S_OK, vec![0u8; 4096]));
    assert_eq!(b.write(0, 0, &pattern(4096, 2)), S_OK);
    assert_eq!(
        b.read(0, 0, 4096).1,
        vec![0u8; 4096],
        "null disk stores nothing"
    );

    // A reconnecting front end gets a working disk again.
    drop(a);
    let mut a = BlkDriver::connect(
        &sock_a,
        DriverOptions {
            queues: 2,
            ..Default::default()
        },
    );
    assert_eq!(a.read(0, 8, 8192), (S_OK, pattern(8192, 3)));
}

#[test]
fn indirect_split_and_unaligned_buffers() {
    let s = serve_file(32 * MIB, "");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());
    let data = pattern(64 * 1024, 9);
    for (indirect, split, misalign) in [
        (true, 0, 0),
        (false, 1024, 0),
        (true, 1024, 0),
        (false, 0, 8),
        (true, 1536, 200),
    ] {
        let sector = 100 + split as u64 + misalign;
        let w = d.run(
            0,
            &Request {
                kind: T_OUT,
                sector,
                out: data.clone(),
                indirect,
                split,
                misalign,
                ..Default::default()
            },
        );
        assert_eq!(
            w.status, S_OK,
            "write indirect={indirect} split={split} misalign={misalign}"
        );
        let r = d.run(
            0,
            &Request {
                kind: T_IN,
                sector,
                in_len: data.len(),
                indirect,
                split,
                misalign,
                ..Default::default()
            },
        );
        assert_eq!(r.status, S_OK);
        assert_eq!(
            r.data, data,
            "read indirect={indirect} split={split} misalign={misalign}"
        );
    }
}

#[test]
fn queues_run_in_parallel_with_many_requests_in_flight() {
    let s = serve_file(64 * MIB, ",num-queues=4");
    let mut d = BlkDriver::connect(
        &s.socket,
        DriverOptions {
            queues: 4,
            ..Default::default()
        },
    );
    let mark = d.ram.mark();
    let mut pending = Vec::new();
    for q in 0..4 {
        for i in 0..16u64 {
            let sector = (q as u64 * 16 + i) * 16;
            let out = pattern(8192, (q * 16 + i as usize) as u8);
            pending.push((
                q,
                sector,
                d.submit(
                    q,
                    &Request {
                        kind: T_OUT,
                        sector,
                        out,
                        ..Default::default()
                    },
                ),
            ));
        }
    }
    let mut done = std::collections::HashMap::new();
    for q in 0..4 {
        while done.keys().filter(|(qq, _)| *qq == q).count() < 16 {
            let (head, len) = d.queues[q]
                .wait_used(&d.ram, Duration::from_secs(10))
                .expect("completion");
            done.insert((q, head), len);
        }
    }
    for (q, _, p) in &pending {
        let len = done[&(*q, p.head)];
        assert_eq!(d.collect(p, len).status, S_OK);
    }
    d.ram.release(mark);
    for (q, sector, _) in pending {
        let seed = (sector / 16) as u8;
        assert_eq!(
            d.read((q + 1) % 4, sector, 8192),
            (S_OK, pattern(8192, seed))
        );
    }
}

#[test]
fn event_idx_suppresses_notifications() {
    let s = serve_file(16 * MIB, "");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());
    assert_ne!(d.features & F_EVENT_IDX, 0);
    let req = Request {
        kind: T_IN,
        sector: 0,
        in_len: 512,
        ..Default::default()
    };
    d.run(0, &req);
    std::thread::sleep(Duration::from_millis(50));
    let _ = d.queues[0].call.read();

    // Ask for a notification only once the used entry at index last_used + 2 is written.
    let base = d.queues[0].last_used();
    d.queues[0].set_used_event(&d.ram, base.wrapping_add(2));
    let mark = d.ram.mark();
    for expect_call in [false, false, true] {
        let p = d.submit(0, &req);
        // Poll the used ring, not the eventfd, so the eventfd shows only what was signalled.
        let mut done = None;
        for _ in 0..2000 {
            done = d.queues[0].pop_used(&d.ram);
            if done.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (head, _) = done.expect("completed");
        assert_eq!(head, p.head);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            d.queues[0].call.read().is_ok(),
            expect_call,
            "used idx {}",
            d.queues[0].last_used()
        );
    }
    d.ram.release(mark);

    // An idle device asks to be kicked at the next avail index.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.queues[0].avail_event(&d.ram), d.queues[0].next_avail());
}

#[test]
fn stopping_a_queue_completes_in_flight_requests_first() {
    let s = serve_file(64 * MIB, "");
    let mut d = BlkDriver::connect(
        &s.socket,
        DriverOptions {
            queue_size: 256,
            ..Default::default()
        },
    );
    for round in 0..3u8 {
        let mark = d.ram.mark();
        let mut pending = Vec::new();
        for i in 0..64u64 {
            pending.push(d.submit(
                0,
                &Request {
                    kind: T_OUT,
                    sector: i * 64,
                    out: pattern(32 * 1024, round + i as u8),
                    ..Default::default()
                },
            ));
        }
        let base = d.stop_queue(0) as u16;
        // The answer came after every request the device took had completed.
        assert_eq!(d.queues[0].used_idx(&d.ram), base);
        let mut completed = 0;
        while let Some((head, len)) = d.queues[0].pop_used(&d.ram) {
            let p = pending.iter().find(|p| p.head == head).unwrap();
            assert_eq!(d.collect(p, len).status, S_OK);
            completed += 1;
        }
        // Restart at the reported base: the rest is taken, nothing is repeated or lost.
        d.start_queue(0, base);
        while completed < 64 {
            let (head, len) = d.queues[0]
                .wait_used(&d.ram, Duration::from_secs(10))
                .unwrap();
            let p = pending.iter().find(|p| p.head == head).unwrap();
            assert_eq!(d.collect(p, len).status, S_OK);
            completed += 1;
        }
        assert_eq!(d.queues[0].used_idx(&d.ram), d.queues[0].next_avail());
        d.ram.release(mark);
        for i in 0..64u64 {
            assert_eq!(
                d.read(0, i * 64, 32 * 1024),
                (S_OK, pattern(32 * 1024, round + i as u8))
            );
        }
    }
}

#[test]
fn memory_added_at_run_time_is_usable() {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostUserMemoryRegionInfo;
    let s = serve_file(16 * MIB, "");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());
    let extra = pollblk_driver::GuestRam::new(MIB);
    let extra_gpa = 1 << 40;
    d.frontend
        .add_mem_region(&VhostUserMemoryRegionInfo {
            guest_phys_addr: extra_gpa,
            memory_size: MIB,
            userspace_addr: 0x6000_0000_0000,
            mmap_offset: 0,
            mmap_handle: extra.fd(),
        })
        .unwrap();
    let data = pattern(8192, 77);
    extra.write(4096, &data);
    let mark = d.ram.mark();
    let header = d.ram.alloc(16, 16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&40u64.to_le_bytes());
    d.ram.write(header, &h);
    let status_gpa = d.ram.alloc(1, 1);
    let bufs = [
        Buf {
            gpa: header,
            len: 16,
            writable: false,
        },
        Buf {
            gpa: extra_gpa + 4096,
            len: 8192,
            writable: false,
        },
        Buf {
            gpa: status_gpa,
            len: 1,
            writable: true,
        },
    ];
    d.queues[0].add(&mut d.ram, &bufs, false);
    d.queues[0].kick.write(1).unwrap();
    d.queues[0]
        .wait_used(&d.ram, Duration::from_secs(10))
        .unwrap();
    assert_eq!(d.ram.read(status_gpa, 1)[0], S_OK);
    d.ram.release(mark);
    assert_eq!(d.read(0, 40, 8192), (S_OK, data));
    let _ = DESC_F_WRITE;
}

#[test]
fn readonly_disks_refuse_writes() {
    let s = serve_file(16 * MIB, ",readonly=on");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());
    assert_ne!(d.offered & F_RO, 0);
    assert_eq!(d.offered & F_DISCARD, 0);
    assert_eq!(d.write(0, 0, &pattern(4096, 1)), S_IOERR);
    let r = d.run(
        0,
        &Request {
            kind: T_WRITE_ZEROES,
            out: dwz_segment(0, 8, 0),
            ..Default::default()
        },
    );
    assert_eq!(r.status, S_IOERR);
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![0u8; 4096]));
}

#[test]
fn a_4k_disk_refuses_requests_not_aligned_to_its_blocks() {
    let s = serve_file(16 * MIB, ",block-size=4096");
    let mut d = BlkDriver::connect(&s.socket, DriverOptions::default());
    assert_eq!(d.write(0, 8, &pattern(4096, 1)), S_OK);
    assert_eq!(d.write(0, 9, &pattern(4096, 1)), S_IOERR);
    assert_eq!(d.read(0, 8, 512).0, S_IOERR);
    assert_eq!(d.read(0, 8, 4096), (S_OK, pattern(4096, 1)));
}

#[test]
fn a_new_front_end_sees_what_the_last_one_wrote() {
    let s = serve_file(16 * MIB, ",num-queues=2");
    for round in 0..3u8 {
        let mut d = BlkDriver::connect(
            &s.socket,
            DriverOptions {
                queues: 2,
                ..Default::default()
            },
        );
        if round > 0 {
            assert_eq!(d.read(1, 64, 4096), (S_OK, pattern(4096, round - 1)));
        }
        assert_eq!(d.write(0, 64, &pattern(4096, round)), S_OK);
        // Dropped with no GET_VRING_BASE: an abrupt disconnect, like a killed QEMU.
    }
}

/// Reactor CPU time of the daemon, in clock ticks (utime + stime of its reactor threads).
fn reactor_ticks(pid: u32) -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("reactor-") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the ")" of comm: state is 3rd overall, utime 14th, stime 15th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks
}

#[test]
fn an_idle_daemon_with_a_connected_guest_sleeps() {
    let s = serve_file(16 * MIB, ",num-queues=2");
    let mut d = BlkDriver::connect(
        &s.socket,
        DriverOptions {
            queues: 2,
            ..Default::default()
        },
    );
    assert_eq!(d.write(0, 0, &pattern(4096, 5)), S_OK);
    assert_eq!(d.write(1, 8, &pattern(4096, 6)), S_OK);
    let pid = s.daemon.child.as_ref().unwrap().id();
    std::thread::sleep(Duration::from_millis(200));
    let before = reactor_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = reactor_ticks(pid) - before;
    // Clock ticks are 10 ms: a polling reactor would spend ~200 per core here. Idle means it
    // sleeps in io_uring_enter, woken by nothing; allow a few ticks of noise.
    assert!(spent <= 5, "idle reactors used {spent} ticks in 2 s");
    // And a kick still wakes them.
    assert_eq!(d.read(1, 8, 4096), (S_OK, pattern(4096, 6)));
}
