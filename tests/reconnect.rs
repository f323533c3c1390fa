//! A daemon killed under a running front end and started again: with INFLIGHT_SHMFD, the
//! requests it had taken and not completed are resubmitted by the new daemon and complete
//! exactly once; nothing is lost, nothing repeated.

mod common;

use common::Daemon;
use pollblk_driver::blk::*;
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use std::time::{Duration, Instant};

#[test]
fn requests_in_flight_at_a_kill_complete_once_after_restart() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let socket = dir.path().join("slow.sock");
    // Every operation takes 300 ms: requests are in flight when the daemon dies.
    let args = vec![
        "--export".to_string(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,latency-ns=300000000,num-queues=1",
            socket.display()
        ),
    ];
    let mut first = Daemon::start(dir.path(), &args);
    let mut d = BlkDriver::connect(
        &socket,
        DriverOptions {
            inflight: true,
            ..Default::default()
        },
    );
    let read = |sector| Request {
        kind: T_IN,
        sector,
        in_len: 4096,
        ..Default::default()
    };
    let pending: Vec<_> = (0..4).map(|i| d.submit(0, &read(i * 8))).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut child = first.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        d.queues[0].used_idx(&d.ram),
        0,
        "killed before any completed"
    );

    let _second = Daemon::start(dir.path(), &args);
    d.reconnect(&socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "resubmitted requests did not complete: {done:?}"
        );
        if let Some((head, len)) = d.queues[0].pop_used(&d.ram) {
            done.push((head, len));
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut heads: Vec<u16> = done.iter().map(|&(h, _)| h).collect();
    heads.sort_unstable();
    let mut expected: Vec<u16> = pending.iter().map(|p| p.head).collect();
    expected.sort_unstable();
    assert_eq!(heads, expected, "each request completed once");
    for &(head, len) in &done {
        let p = pending.iter().find(|p| p.head == head).unwrap();
        assert_eq!(d.collect(p, len).status, S_OK);
    }
    // Nothing more comes, and the ring goes on.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        d.queues[0].used_idx(&d.ram),
        4,
        "no request completed twice"
    );
    assert_eq!(d.read(0, 64, 512).0, S_OK);
}

#[test]
fn a_stale_base_after_a_lost_connection_repeats_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let socket = dir.path().join("disk.sock");
    let args = vec![
        "--export".to_string(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,num-queues=1",
            socket.display()
        ),
    ];
    let mut first = Daemon::start(dir.path(), &args);
    let mut d = BlkDriver::connect(
        &socket,
        DriverOptions {
            inflight: true,
            ..Default::default()
        },
    );
    for i in 0..6 {
        assert_eq!(d.read(0, i * 8, 4096).0, S_OK);
    }
    let mut child = first.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // QEMU restores last_avail from its cached used index, which lags the ring: here by
    // all six completions (a CI run saw 15). The back end must resume from the ring.
    let _second = Daemon::start(dir.path(), &args);
    d.reconnect_with(&socket, &|_, used| used.wrapping_sub(6));
    assert_eq!(d.read(0, 64, 4096).0, S_OK);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.queues[0].pop_used(&d.ram), None, "a stray completion");
    assert_eq!(
        d.queues[0].used_idx(&d.ram),
        7,
        "seven requests, seven completions"
    );
    // A back end that resumed at the stale base would have run the six old requests again
    // (writing its used entries over the old ones, so the index alone does not show it).
    let out = std::process::Command::new(common::BIN)
        .args(["stats", "--json"])
        .arg(dir.path().join("pollblk-data/stats/disk0.queue-0.stats"))
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reads = json["sources"][0]["stats"]["read_ops"]["value"].as_f64();
    assert_eq!(
        reads,
        Some(1.0),
        "the restarted daemon ran only the new request"
    );
}

#[test]
fn while_logging_every_guest_memory_write_is_marked_dirty() {
    use std::os::fd::AsRawFd;
    use vhost::{VhostBackend, VhostUserDirtyLogRegion};
    const LOG_ALL: u64 = 1 << 26;

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let socket = dir.path().join("log.sock");
    let args = vec![
        "--export".to_string(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,num-queues=1",
            socket.display()
        ),
    ];
    let _daemon = Daemon::start(dir.path(), &args);
    let mut d = BlkDriver::connect(
        &socket,
        DriverOptions {
            accept: !LOG_ALL,
            ..Default::default()
        },
    );
    assert_ne!(
        d.offered & LOG_ALL,
        0,
        "VHOST_F_LOG_ALL offered (QEMU migrates only then)"
    );
    let pages = d.ram.size() / 4096;
    let log = tempfile::tempfile().unwrap();
    log.set_len(pages.div_ceil(8)).unwrap();
    d.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: pages.div_ceil(8),
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .unwrap();
    let dirty = |gpa: u64| {
        let page = gpa / 4096;
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&log, &mut byte, page / 8).unwrap();
        byte[0] & (1 << (page % 8)) != 0
    };
    let read = Request {
        kind: T_IN,
        in_len: 4096,
        ..Default::default()
    };

    // Not logging yet: nothing marked.
    let before = d.submit(0, &read);
    let before_buf = before.in_buffers()[0].0;
    assert_eq!(d.wait(before).status, S_OK);
    assert!(!dirty(before_buf), "no logging before LOG_ALL");

    // Logging: the read's data page and the used ring are marked.
    assert!(
        !dirty(d.queues[0].used),
        "the used ring is clean before LOG_ALL"
    );
    d.frontend.set_features(d.features | LOG_ALL).unwrap();
    // QEMU copies guest memory as soon as LOG_ALL is acknowledged (it asks for the reply):
    // by then the queue's reactor must log, and has marked the ring it wrote before.
    assert!(
        dirty(d.queues[0].used),
        "the used ring is marked by the time LOG_ALL is acknowledged"
    );
    // The status byte lands on the page after the page-aligned 4 KiB data buffer.
    let during = d.submit(0, &read);
    let during_buf = during.in_buffers()[0].0;
    let status = during.status_gpa();
    assert_eq!(d.wait(during).status, S_OK);
    assert!(dirty(during_buf), "the read's data page is dirty");
    assert_ne!(status / 4096, during_buf / 4096);
    assert!(dirty(status), "the status byte's page is dirty");
    assert!(dirty(d.queues[0].used), "the used ring is dirty");

    // Logging off again: a new read's page stays clean.
    d.frontend.set_features(d.features).unwrap();
    let after = d.submit(0, &read);
    let after_buf = after.in_buffers()[0].0;
    assert_eq!(d.wait(after).status, S_OK);
    assert!(!dirty(after_buf), "no logging after LOG_ALL is cleared");
}
