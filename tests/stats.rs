//! Statistics of a serving daemon: what the counters say after known requests, the files'
//! layout against the kernel's own checks, the reader on a real KVM stats fd, and the stats
//! virtqueue with the test driver as the guest.

mod common;

use common::{file_export, image, BIN};
use pollblk_driver::blk::*;
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use pollblk_engine::stats::validate::{check_sequential_read, validate};
use pollblk_engine::stats::StatsReader;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    daemon: common::Daemon,
    socket: PathBuf,
}

impl Setup {
    fn stats_dir(&self) -> PathBuf {
        self.dir.path().join("pollblk-data/stats")
    }
}

fn serve(extra: &str, args: &[&str]) -> Setup {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "disk.img", 64 * MIB);
    let socket = dir.path().join("disk.sock");
    let mut all = file_export(&socket, &file, extra);
    all.extend(args.iter().map(|a| a.to_string()));
    let daemon = common::Daemon::start(dir.path(), &all);
    Setup {
        dir,
        daemon,
        socket,
    }
}

/// `pollblk stats ARGS --json` parsed; panics with stderr if it fails.
fn stats_json(args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("stats")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Value of statistic `name` of source `id_suffix` in a `stats --json` report.
fn value(report: &Value, id_suffix: &str, name: &str) -> f64 {
    let source = report["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_str().unwrap().ends_with(id_suffix))
        .unwrap_or_else(|| panic!("no source {id_suffix} in {report}"));
    let stat = &source["stats"][name];
    stat["value"]
        .as_f64()
        .or_else(|| stat["count"].as_f64())
        .unwrap_or_else(|| panic!("no {name} in {id_suffix}"))
}

#[test]
fn counters_follow_the_requests_a_driver_sends() {
    let s = serve(",num-queues=2", &["--cores", "0"]);
    let mut d = BlkDriver::connect(
        &s.socket,
        DriverOptions {
            queues: 2,
            ..Default::default()
        },
    );
    for i in 0..3 {
        assert_eq!(d.write(0, i * 8, &[7u8; 4096]), S_OK);
    }
    for i in 0..2 {
        assert_eq!(d.read(0, i * 8, 4096).0, S_OK);
    }
    // Past the end: IOERR; an unknown type: UNSUPP.
    assert_eq!(d.read(0, 64 * MIB / 512, 512).0, S_IOERR);
    let unknown = Request {
        kind: 99,
        ..Default::default()
    };
    assert_eq!(d.run(0, &unknown).status, S_UNSUPP);
    let flush = Request {
        kind: T_FLUSH,
        ..Default::default()
    };
    assert_eq!(d.run(0, &flush).status, S_OK);
    let discard = Request {
        kind: T_DISCARD,
        out: dwz_segment(0, 16, 0),
        ..Default::default()
    };
    assert_eq!(d.run(0, &discard).status, S_OK);
    assert_eq!(d.read(1, 0, 8192).0, S_OK);

    let r = stats_json(&[s.stats_dir().to_str().unwrap()]);
    let q0 = "disk0/queue-0";
    assert_eq!(value(&r, q0, "write_ops"), 3.0);
    assert_eq!(value(&r, q0, "write_sectors"), 24.0);
    assert_eq!(
        value(&r, q0, "read_ops"),
        3.0,
        "the failed read counts as an op"
    );
    assert_eq!(value(&r, q0, "read_sectors"), 16.0, "but not its sectors");
    assert_eq!(value(&r, q0, "errors_ioerr"), 1.0);
    assert_eq!(value(&r, q0, "errors_unsupp"), 1.0);
    assert_eq!(value(&r, q0, "other_ops"), 1.0);
    assert_eq!(value(&r, q0, "flush_ops"), 1.0);
    assert_eq!(value(&r, q0, "discard_ops"), 1.0);
    assert_eq!(value(&r, q0, "discard_sectors"), 16.0);
    assert_eq!(value(&r, q0, "in_flight"), 0.0);
    assert!(value(&r, q0, "in_flight_peak") >= 1.0);
    assert_eq!(
        value(&r, q0, "read_latency_hist"),
        3.0,
        "one sample per read"
    );
    assert_eq!(value(&r, q0, "write_latency_hist"), 3.0);
    assert!(
        value(&r, q0, "write_time") > 0.0,
        "writes to a file take time"
    );
    assert!(value(&r, q0, "polls_busy") >= 1.0);
    assert!(value(&r, q0, "notifications_sent") >= 1.0);
    assert_eq!(value(&r, "disk0/queue-1", "read_ops"), 1.0);
    assert_eq!(value(&r, "disk0/queue-1", "read_sectors"), 16.0);
    assert_eq!(value(&r, "disk0", "capacity_bytes"), (64 * MIB) as f64);
    assert_eq!(value(&r, "reactor-0", "queues"), 2.0);
    assert!(value(&r, "reactor-0", "iterations_busy") >= 1.0);
    assert!(value(&r, "reactor-0", "uring_enters") >= 1.0);
    drop(d);
    // A stopped queue shows nothing in flight; the daemon's files go when it stops.
    let dir = s.stats_dir();
    drop(s.daemon);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".stats"))
        .collect();
    assert!(left.is_empty(), "files left after exit: {left:?}");
}

fn stats_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "stats"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_statistics_file_passes_the_kernels_checks() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = Command::new(BIN)
        .args(["pool", "create", "pool", "--size", "64M"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["pool", "volume", "create", "pool", "v", "--size", "16M"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = image(dir.path(), "disk.img", 16 * MIB);
    let stats_dir = dir.path().join("run-stats");
    let args: Vec<String> = [
        "--export",
        &format!(
            "vhost-user-blk,socket=a.sock,file={},num-queues=3,guest-stats=on",
            file.display()
        ),
        "--export",
        "vhost-user-blk,socket=b.sock,pool=pool,volume=v",
        "--stats-dir",
        stats_dir.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _daemon = common::Daemon::start(dir.path(), &args);
    let files = stats_files(&stats_dir);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "disk0.stats",
        "disk0.queue-0.stats",
        "disk0.queue-2.stats",
        "disk1.stats",
        "reactor-0.stats",
        "pool-pool-0.stats",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    for path in &files {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}", path.display());
        let reader = StatsReader::open(path).unwrap();
        assert!(reader.id().starts_with(&format!(
            "pollblk-{}/",
            _daemon.child.as_ref().unwrap().id()
        )));
        assert_eq!(reader.header().name_size, 48);
        assert_eq!(
            validate(&reader),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
        check_sequential_read(&reader).unwrap();
    }
    let r = stats_json(&[stats_dir.to_str().unwrap()]);
    assert_eq!(
        value(&r, "pool-pool-0", "blocks_total") * value(&r, "pool-pool-0", "block_size"),
        (64 * MIB) as f64
    );
    assert_eq!(value(&r, "pool-pool-0", "volumes"), 1.0);
}

#[test]
fn a_second_daemon_on_the_same_stats_dir_is_refused() {
    let s = serve("", &[]);
    let file = image(s.dir.path(), "other.img", MIB);
    let out = Command::new(BIN)
        .arg("serve")
        .args(file_export(&s.dir.path().join("other.sock"), &file, ""))
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--stats-dir") && stderr.contains("another pollblk"),
        "{stderr}"
    );
}

#[test]
fn watch_shows_live_rates() {
    let s = serve("", &["--cores", "0"]);
    let socket = s.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = std::thread::spawn(move || {
        let mut d = BlkDriver::connect(&socket, DriverOptions::default());
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            assert_eq!(d.read(0, 0, 4096).0, S_OK);
        }
    });
    let out = Command::new(BIN)
        .args(["stats", "--watch", "0.3", "--count", "2"])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("--- ").count(), 2, "{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("read_ops"))
        .unwrap_or_else(|| panic!("no read_ops rate in {text}"));
    let rate: f64 = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches("/s")
        .parse()
        .unwrap();
    assert!(rate > 10.0, "{line}");
    assert!(
        text.contains("read_latency_hist") && text.contains("p99<"),
        "{text}"
    );
    // The per-disk summary on top: disk0's reads per second.
    let summary = text
        .lines()
        .find(|l| l.starts_with("disk0 "))
        .unwrap_or_else(|| panic!("no disk0 summary in {text}"));
    let reads: f64 = summary.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(reads > 10.0, "{summary}");
}

#[test]
fn the_reader_refuses_bad_arguments() {
    let out = Command::new(BIN)
        .args(["stats", "/nonexistent/stats"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/stats"));
    let out = Command::new(BIN)
        .args(["stats", "--fd", "999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an open file descriptor"));
    let out = Command::new(BIN)
        .args(["serve", "--stats-group", "no-such-group-here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no group named"));
}

const KVM_CREATE_VM: libc::c_ulong = 0xae01;
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;

/// A VM and a vCPU stats fd from /dev/kvm, or None where KVM cannot make them.
fn kvm_stats_fds() -> Option<(i32, i32, i32)> {
    // SAFETY: plain open and ioctls on descriptors this function owns.
    unsafe {
        let kvm = libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if kvm < 0 {
            return None;
        }
        let vm = libc::ioctl(kvm, KVM_CREATE_VM, 0);
        if vm < 0 {
            return None;
        }
        let vm_stats = libc::ioctl(vm, KVM_GET_STATS_FD, 0);
        let vcpu = libc::ioctl(vm, KVM_CREATE_VCPU, 0);
        let vcpu_stats = if vcpu >= 0 {
            libc::ioctl(vcpu, KVM_GET_STATS_FD, 0)
        } else {
            -1
        };
        if vm_stats < 0 || vcpu_stats < 0 {
            return None;
        }
        Some((vm, vm_stats, vcpu_stats))
    }
}

#[test]
fn the_reader_reads_a_real_kvm_stats_fd() {
    let Some((_vm, vm_stats, vcpu_stats)) = kvm_stats_fds() else {
        if std::env::var_os("POLLBLK_REQUIRE_KVM").is_some() {
            panic!("/dev/kvm cannot make stats fds here");
        }
        eprintln!("skipped: /dev/kvm cannot make stats fds here");
        return;
    };
    // KVM names a VM after the thread that made it.
    // SAFETY: gettid has no preconditions.
    let pid = unsafe { libc::gettid() };
    // The validator agrees with the kernel about the kernel's own files.
    for (fd, id) in [
        (vm_stats, format!("kvm-{pid}")),
        (vcpu_stats, format!("kvm-{pid}/vcpu-0")),
    ] {
        // SAFETY: dup of an open descriptor; the reader owns the copy.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(fd)) };
        let reader = StatsReader::from_file(file).unwrap();
        assert_eq!(reader.id(), id);
        assert!(!reader.is_mapped(), "KVM stats fds are read with pread");
        assert_eq!(validate(&reader), Vec::<String>::new());
        check_sequential_read(&reader).unwrap();
    }
    // The command line reads them as inherited descriptors.
    let run = |args: &[String]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("stats").args(args);
        let fds = [vm_stats, vcpu_stats];
        // SAFETY: between fork and exec only fcntl, async-signal-safe, on descriptors the
        // child inherited.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for fd in fds {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fd_args = vec![
        "--fd".to_string(),
        vm_stats.to_string(),
        "--fd".into(),
        vcpu_stats.to_string(),
    ];
    let mut json_args = fd_args.clone();
    json_args.push("--json".into());
    let report: Value = serde_json::from_str(&run(&json_args)).unwrap();
    let sources = report["sources"].as_array().unwrap();
    assert_eq!(sources[0]["id"], format!("kvm-{pid}"));
    assert_eq!(sources[1]["id"], format!("kvm-{pid}/vcpu-0"));
    assert!(
        sources[0]["stats"]["remote_tlb_flush"]["value"].is_number(),
        "{}",
        sources[0]
    );
    let hists: Vec<&String> = sources[1]["stats"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["type"] == "log_hist")
        .map(|(k, _)| k)
        .collect();
    assert!(
        !hists.is_empty(),
        "a vCPU has log histograms (halt_poll_*_hist)"
    );
    let mut prom_args = fd_args.clone();
    prom_args.push("--prometheus".into());
    let prom = run(&prom_args);
    assert!(
        prom.contains("# TYPE kvm_remote_tlb_flush_total counter"),
        "{prom}"
    );
    assert!(
        prom.contains("histogram") && prom.contains("vcpu=\"0\""),
        "{prom}"
    );
    let mut watch_args = fd_args;
    watch_args.extend(["--watch", "0.1", "--count", "1"].map(String::from));
    assert!(run(&watch_args).contains(&format!("kvm-{pid}/vcpu-0")));
}

#[test]
fn the_stats_virtqueue_brings_the_guests_view() {
    let s = serve(",guest-stats=on", &["--guest-stats-interval", "0.2"]);
    let mut d = BlkDriver::connect(
        &s.socket,
        DriverOptions {
            stats_vq: true,
            ..Default::default()
        },
    );
    assert_ne!(d.offered & 1 << 19, 0, "STATS_VQ offered on bit 19");
    // The driver's first, empty buffer: the device holds it and asks within the interval.
    let first = d.post_stats(&[0u8; 110]);
    let started = Instant::now();
    let (head, len) = d
        .wait_stats_request(Duration::from_secs(5))
        .expect("a stats request");
    assert_eq!((head, len), (first, 0));
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "not before the interval: {:?}",
        started.elapsed()
    );
    let reply = stats_entries(&[
        (0, 11),
        (2, 88),
        (4, 22),
        (6, 176),
        (8, 3),
        (10, 40),
        (99, 5),
    ]);
    d.post_stats(&reply);
    d.wait_stats_request(Duration::from_secs(5))
        .expect("the next request");
    let dir = s.stats_dir();
    let disk = dir.join("disk0.stats");
    let r = stats_json(&[disk.to_str().unwrap()]);
    assert_eq!(value(&r, "disk0", "guest_read_io"), 11.0);
    assert_eq!(value(&r, "disk0", "guest_read_sectors"), 88.0);
    assert_eq!(value(&r, "disk0", "guest_write_io"), 22.0);
    assert_eq!(value(&r, "disk0", "guest_write_sectors"), 176.0);
    assert_eq!(value(&r, "disk0", "guest_in_flight"), 3.0);
    assert_eq!(
        value(&r, "disk0", "guest_time_in_queue"),
        0.04,
        "milliseconds, shown in seconds"
    );
    assert_eq!(value(&r, "disk0", "guest_stats_unknown_tags"), 1.0);
    assert_eq!(value(&r, "disk0", "guest_stats_replies"), 1.0);
    assert!(value(&r, "disk0", "guest_stats_requests") >= 2.0);
    // Not whole entries: counted, dropped; the values stay.
    d.post_stats(&[1u8; 15]);
    d.wait_stats_request(Duration::from_secs(5))
        .expect("a request after a bad reply");
    let r = stats_json(&[disk.to_str().unwrap()]);
    assert_eq!(value(&r, "disk0", "guest_stats_malformed"), 1.0);
    assert_eq!(value(&r, "disk0", "guest_read_io"), 11.0);
    // The request queue is unaffected.
    assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
}

#[test]
fn the_stats_virtqueue_bit_is_configurable_and_off_by_default() {
    let s = serve(",guest-stats=on,guest-stats-bit=21", &[]);
    let d = BlkDriver::connect(&s.socket, DriverOptions::default());
    assert_ne!(d.offered & 1 << 21, 0);
    assert_eq!(d.offered & 1 << 19, 0);
    let s = serve("", &[]);
    let d = BlkDriver::connect(&s.socket, DriverOptions::default());
    assert_eq!(
        d.offered & (0x1f << 19),
        0,
        "no experimental bits unless asked"
    );
}

#[test]
fn watch_of_a_16_queue_disk_with_2_in_use_fits_one_screen() {
    let s = serve(",num-queues=16", &["--cores", "0"]);
    let socket = s.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = std::thread::spawn(move || {
        let options = DriverOptions {
            queues: 2,
            ..DriverOptions::default()
        };
        let mut d = BlkDriver::connect(&socket, options);
        let mut i = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            assert_eq!(d.read(i % 2, 0, 4096).0, S_OK);
            assert_eq!(d.write(i % 2, 8, &[1u8; 4096]), S_OK);
            i += 1;
        }
    });
    let out = Command::new(BIN)
        .args(["stats", "--watch", "0.5", "--count", "1"])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = text.lines().count();
    assert!(lines <= 40, "{lines} lines:\n{text}");
    assert!(
        text.contains("14 quiet object(s) not shown: pollblk-")
            && text.contains("/disk0/queue-2..15)"),
        "{text}"
    );
    // Latencies to the digits a log2 bucket means, and discards in the disk line.
    assert!(!text.contains("<="), "{text}");
    assert!(text.lines().any(|l| l.contains("discard/s")), "{text}");
}
