//! Many disks on one daemon: 1,000 single-queue disks (900 null, 100 thin volumes of one
//! pool) spread over two reactors, every one attached with its own memory table and used
//! once, then idle. The idle queues are parked
//! (a reactor visits none of them until its guest posts a request), and any one of them is
//! served at once when it does; a handful of threads serves all their sockets. Speed is
//! benches/scale.sh's business; this keeps the shape.

mod common;

use common::Daemon;
use pollblk_driver::{BlkDriver, DriverOptions};
use pollblk_engine::stats::StatsReader;
use std::path::Path;
use std::time::{Duration, Instant};

const DISKS: usize = 1000;
/// The first THIN disks are volumes of one thin pool (their slow path on the pool's workers).
const THIN: usize = 100;

/// A pool in `dir` holding volumes t0 to t{THIN - 1}, made with the CLI.
fn thin_pool(dir: &Path) -> std::path::PathBuf {
    let pool = dir.join("pool");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(&["pool", "create", pool.to_str().unwrap(), "--size", "1G"]);
    for i in 0..THIN {
        let name = format!("t{i}");
        run(&[
            "pool",
            "volume",
            "create",
            pool.to_str().unwrap(),
            &name,
            "--size",
            "16M",
        ]);
    }
    pool
}

/// This test holds about five descriptors per disk (a connection, its memory file and its
/// eventfds): the soft limit goes up to the hard one, as the daemon does for itself.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let wanted = 8 * DISKS as u64 + 256;
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        // Root (CI) may raise the hard limit too; anyone may raise the soft one to it.
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max.max(wanted),
            rlim_max: limit.rlim_max.max(wanted),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            limit = raised;
        } else {
            limit.rlim_cur = limit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= wanted,
        "the hard open-files limit {} is too low for {DISKS} disks",
        limit.rlim_cur
    );
}

/// A reactor statistic, as its file says now.
fn reactor_stat(stats: &Path, reactor: usize, name: &str) -> u64 {
    let reader = StatsReader::open(&stats.join(format!("reactor-{reactor}.stats"))).unwrap();
    let sample = reader.sample().unwrap();
    let desc = reader.descs().iter().find(|d| d.name == name).unwrap();
    sample.of(desc)[0]
}

#[test]
fn a_thousand_attached_disks_spread_over_reactors_and_park_when_idle() {
    raise_fd_limit();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let stats = d.join("stats");
    let mut config = format!(
        "stats-dir = \"{}\"\ncontrol = \"{}\"\n",
        stats.display(),
        d.join("control.sock").display()
    );
    let pool = thin_pool(d);
    for i in 0..DISKS {
        let volume = match i < THIN {
            true => format!("pool={},volume=t{i}", pool.display()),
            false => "null,size=16M".to_string(),
        };
        config += &format!(
            "[[export]]\nspec = \"vhost-user-blk,socket={},{volume},num-queues=1\"\n",
            d.join(format!("d{i}.sock")).display()
        );
    }
    let config_path = d.join("disks.toml");
    std::fs::write(&config_path, config).unwrap();
    let args: Vec<String> = ["--config", config_path.to_str().unwrap(), "--cores", "0,1"]
        .map(String::from)
        .to_vec();
    let daemon = Daemon::start(d, &args);
    let pid = daemon.child.as_ref().unwrap().id();

    let mut drivers: Vec<BlkDriver> = (0..DISKS)
        .map(|i| {
            let options = DriverOptions {
                queue_size: 16,
                ram_bytes: 4 << 20,
                ..DriverOptions::default()
            };
            BlkDriver::connect(&d.join(format!("d{i}.sock")), options)
        })
        .collect();
    for (i, driver) in drivers.iter_mut().enumerate() {
        assert_eq!(driver.read(0, 8 * i as u64, 4096).0, 0, "disk {i}");
    }
    // A fixed number of threads serves every socket and every thin volume: not one per disk.
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(threads < 32, "{threads} threads for {DISKS} disks");
    // Single-queue disks alternate between the two reactors.
    assert_eq!(reactor_stat(&stats, 0, "queues"), DISKS as u64 / 2);
    assert_eq!(reactor_stat(&stats, 1, "queues"), DISKS as u64 / 2);
    // Idle: every queue leaves the polled lists.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reactor_stat(&stats, 0, "queues_polled") + reactor_stat(&stats, 1, "queues_polled") > 0 {
        assert!(Instant::now() < deadline, "idle queues stayed polled");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        reactor_stat(&stats, 0, "queue_parks") + reactor_stat(&stats, 1, "queue_parks")
            >= DISKS as u64
    );
    // A parked disk's guest posts a request: served.
    for i in [0, THIN - 1, 137, DISKS - 1] {
        let (status, data) = drivers[i].read(0, 64, 4096);
        assert_eq!(status, 0, "disk {i} after parking");
        assert_eq!(data, vec![0u8; 4096]);
    }
}
