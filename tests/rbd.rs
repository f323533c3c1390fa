//! RBD images served by pollblk, against a real one-node Ceph cluster (tests/ceph/cluster.sh;
//! monitor and memstore OSD started per test). Built only with `--features rbd`.
#![cfg(feature = "rbd")]

mod common;

use common::ceph::Cluster;
use common::{pattern, Daemon, BIN};
use pollblk_driver::blk::*;
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use std::process::Command;
use std::time::{Duration, Instant};

/// One cluster at a time: each test makes its own (one stops its OSD), and two clusters on
/// two cores would only slow each other.
static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn export(socket: &std::path::Path, cluster: &Cluster, image: &str, extra: &str) -> Vec<String> {
    vec![
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},{}{extra}",
            socket.display(),
            cluster.export(image)
        ),
    ]
}

#[test]
fn every_request_type_reaches_the_image() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = Cluster::start(&dir.path().join("ceph"), 64);
    cluster.create_image("t1", 64);
    let socket = dir.path().join("rbd.sock");
    let mut daemon = Daemon::start(
        dir.path(),
        &export(&socket, &cluster, "t1", ",num-queues=2"),
    );
    let mut d = BlkDriver::connect(
        &socket,
        DriverOptions {
            queues: 2,
            ..Default::default()
        },
    );
    assert_eq!(d.capacity(), 64 << 11);
    assert_ne!(d.offered & F_DISCARD, 0);
    assert_ne!(d.offered & F_WRITE_ZEROES, 0);
    let big = pattern(64 << 10, 3);
    let small = pattern(4096, 9);
    assert_eq!(d.write(0, 0, &big), S_OK);
    assert_eq!(d.write(1, 2048, &small), S_OK);
    assert_eq!(d.read(1, 0, big.len()), (S_OK, big.clone()));
    assert_eq!(d.read(0, 2048, 4096), (S_OK, small.clone()));
    let flush = Request {
        kind: T_FLUSH,
        ..Default::default()
    };
    assert_eq!(d.run(0, &flush).status, S_OK);
    // Zero the first 4 KiB (write-zeroes, not discard: librbd drops small discards).
    let zero = Request {
        kind: T_WRITE_ZEROES,
        out: dwz_segment(0, 8, 0),
        ..Default::default()
    };
    assert_eq!(d.run(0, &zero).status, S_OK);
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![0u8; 4096]));
    let discard = Request {
        kind: T_DISCARD,
        out: dwz_segment(8192, 8192, 0),
        ..Default::default()
    };
    assert_eq!(d.run(1, &discard).status, S_OK);
    assert_eq!(d.read(0, 64 << 11, 512).0, S_IOERR, "past the end");
    let id = Request {
        kind: T_GET_ID,
        in_len: 20,
        ..Default::default()
    };
    assert_eq!(d.run(0, &id).status, S_OK);
    drop(d);
    assert_eq!(daemon.stop(), Some(0));

    // What the cluster holds, read by Ceph's own tool.
    let copy = dir.path().join("t1.raw");
    cluster.rbd(&["export", "rbd/t1", copy.to_str().unwrap()]);
    let data = std::fs::read(&copy).unwrap();
    assert_eq!(&data[..4096], &[0u8; 4096][..]);
    assert_eq!(&data[4096..big.len()], &big[4096..]);
    assert_eq!(&data[2048 * 512..2048 * 512 + 4096], &small[..]);

    // Clear errors for images that cannot be served.
    let run = |args: &[String]| {
        let out = Command::new(BIN)
            .arg("serve")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&export(&dir.path().join("x.sock"), &cluster, "missing", ""));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("rbd/missing") && stderr.contains("No such file"),
        "{stderr}"
    );
    let mut twice = export(&dir.path().join("a.sock"), &cluster, "t1", "");
    twice.extend(export(&dir.path().join("b.sock"), &cluster, "t1", ""));
    let (code, stderr) = run(&twice);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("already exported by disk0"), "{stderr}");
}

/// SIGSTOPs a process now and SIGCONTs it when dropped.
struct Stopped(i32);

impl Stopped {
    /// Stops `pid` and returns once every one of its threads is stopped (SIGSTOP takes each
    /// thread at its next return to user space).
    fn new(pid: i32) -> Stopped {
        // SAFETY: signals a process of the test's cluster.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "no process {pid}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let running = running_threads(pid);
            if running.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} did not stop: threads in states {running:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Stopped(pid)
    }
}

/// The states of `pid`'s threads that are neither stopped nor gone, per /proc.
fn running_threads(pid: i32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // The state follows the command name in parentheses.
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            (!matches!(state, 'T' | 't' | 'Z' | 'X')).then_some(state)
        })
        .collect()
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn a_stalled_osd_fails_requests_within_the_timeout_and_other_disks_go_on() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = Cluster::start(&dir.path().join("ceph"), 64);
    let rbd_socket = dir.path().join("rbd.sock");
    let null_socket = dir.path().join("null.sock");
    let mut args = export(&rbd_socket, &cluster, "img", ",rbd-timeout=3");
    args.extend([
        "--export".to_string(),
        format!(
            "vhost-user-blk,socket={},null,size=16M",
            null_socket.display()
        ),
    ]);
    let mut daemon = Daemon::start(dir.path(), &args);
    let mut rbd = BlkDriver::connect(&rbd_socket, DriverOptions::default());
    let mut null = BlkDriver::connect(&null_socket, DriverOptions::default());
    let data = pattern(4096, 1);
    assert_eq!(rbd.write(0, 0, &data), S_OK);

    let stalled = Stopped::new(cluster.osd_pid());
    let started = Instant::now();
    let pending = rbd.submit(
        0,
        &Request {
            kind: T_OUT,
            sector: 8,
            out: data.clone(),
            ..Default::default()
        },
    );
    // While the RBD request waits on the stalled OSD, the other disk serves.
    for i in 0..20 {
        assert_eq!(null.write(0, i * 8, &data), S_OK);
        assert_eq!(null.read(0, i * 8, 4096).0, S_OK);
    }
    let done = rbd.wait(pending);
    let waited = started.elapsed();
    assert_eq!(done.status, S_IOERR, "a request on a stalled OSD fails");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "failed after {waited:?} with rbd-timeout=3"
    );
    drop(stalled);

    // The OSD is back: the disk serves again (after the cluster notices).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if rbd.write(0, 16, &data) == S_OK {
            break;
        }
        assert!(Instant::now() < deadline, "the image never recovered");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(rbd.read(0, 0, 4096), (S_OK, data.clone()));
    drop((rbd, null));
    assert_eq!(daemon.stop(), Some(0));
}
