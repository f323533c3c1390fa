//! A real Linux guest on pollblk: QEMU (TCG) with a vhost-user-blk-pci disk, the guest's own
//! virtio_blk driver, and fio writing and verifying data on /dev/vda.
//!
//! The guest is built by tests/guest/build-guest.sh (Debian's kernel, busybox, fio) and booted
//! by tests/guest/run-guest.sh; its /init prints `POLLBLK-GUEST: <step> rc=<n>` markers and
//! fio's JSON, which this test judges. It needs qemu-system-x86_64 and the packages the build
//! script installs; without them it is skipped with a message, unless POLLBLK_REQUIRE_GUEST=1
//! (set by .ci/run), where a missing tool is a failure.

mod common;

use common::{file_export, image, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;

fn guest_required() -> bool {
    std::env::var("POLLBLK_REQUIRE_GUEST").is_ok_and(|v| v == "1")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The console's marker lines, without the prefix and without \r.
fn markers(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("POLLBLK-GUEST: "))
        .map(str::to_owned)
        .collect()
}

/// fio's JSON output for `step`, between its begin-json and end-json markers.
fn fio_json(log: &str, step: &str) -> serde_json::Value {
    let text = log.replace('\r', "");
    let begin = format!("POLLBLK-GUEST: begin-json {step}\n");
    let end = format!("POLLBLK-GUEST: end-json {step}");
    let start = text
        .find(&begin)
        .unwrap_or_else(|| panic!("no JSON for {step}"))
        + begin.len();
    let stop = start + text[start..].find(&end).expect("end of JSON");
    serde_json::from_str(&text[start..stop]).unwrap_or_else(|e| panic!("{step} JSON: {e}"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One guest at a time: two TCG guests on two cores would only slow each other, and the
/// guest image is built once.
static GUEST: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// Whether the guest tests run here; false means skipped (said on stderr).
fn guest_available(test: &str) -> bool {
    if !have("qemu-system-x86_64") && !guest_required() {
        eprintln!("SKIPPED {test}: qemu-system-x86_64 not installed (.ci/run installs it)");
        return false;
    }
    true
}

/// Boots the guest on a daemon started with `export` (serving `socket`), checks every step
/// the guest reports, stops the daemon; returns the console log.
fn run_guest(dir: &Path, export: &[String], socket: &Path) -> String {
    run_guest_with(dir, export, socket, None)
}

/// Done to the daemon while the guest runs (it may replace it); gets the console log path.
type Chaos<'a> = &'a dyn Fn(&mut Daemon, &Path);

/// As run_guest; with `chaos`, QEMU reconnects to a back end that goes away, and `chaos`
/// runs while the guest does.
fn run_guest_with(
    dir: &Path,
    export: &[String],
    socket: &Path,
    chaos: Option<Chaos<'_>>,
) -> String {
    let mut built = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let guest_dir = repo().join("target/guest");
    if !*built {
        let build = Command::new(repo().join("tests/guest/build-guest.sh"))
            .arg(&guest_dir)
            .status()
            .expect("run build-guest.sh");
        assert!(build.success(), "building the guest failed");
        *built = true;
    }
    let mut daemon = Daemon::start(dir, export);

    let log_path = dir.join("console.log");
    let started = std::time::Instant::now();
    let mut guest = Command::new(repo().join("tests/guest/run-guest.sh"));
    guest
        .args([
            "--socket",
            path_str(socket),
            "--guest-dir",
            path_str(&guest_dir),
        ])
        .args([
            "--queues",
            "2",
            "--log",
            path_str(&log_path),
            "--timeout",
            "900",
        ]);
    if chaos.is_some() {
        guest.arg("--reconnect");
    }
    let mut guest = guest.spawn().expect("run run-guest.sh");
    if let Some(chaos) = chaos {
        chaos(&mut daemon, &log_path);
    }
    let run = guest.wait().expect("wait for run-guest.sh");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        run.success(),
        "the guest did not finish; console log:\n{log}"
    );
    let seconds = started.elapsed().as_secs();

    let marks = markers(&log);
    for m in &marks {
        if let Some((_, rc)) = m.split_once(" rc=") {
            let rc = rc.split_whitespace().next().unwrap();
            assert_eq!(rc, "0", "guest step failed: {m}");
        }
    }
    let has = |prefix: &str| marks.iter().any(|m| m.starts_with(prefix));
    for step in [
        "vda rc=0",
        "fio-write-verify rc=0 verify_errors=0",
        "fio-read-verify rc=0 verify_errors=0",
        "discard rc=0",
        "write-zeroes-readback rc=0",
        "flush rc=0",
        "flush-readback rc=0",
        "summary failed=0",
    ] {
        assert!(
            has(step),
            "missing guest step {step:?}; markers: {marks:#?}"
        );
    }
    let flushes: u64 = marks
        .iter()
        .find_map(|m| m.strip_prefix("flush rc=0 flush_requests="))
        .and_then(|n| n.trim().parse().ok())
        .expect("flush count");
    assert!(flushes > 0, "the guest sent no FLUSH");
    assert!(
        has("sysfs mq_queues=2"),
        "guest did not use 2 queues: {marks:#?}"
    );
    assert!(has(&format!("sysfs size={}", (1u64 << 30) / 512)));
    let irq_queues = marks
        .iter()
        .filter(|m| m.starts_with("irq req.") && !m.ends_with("=0"))
        .count();
    assert_eq!(irq_queues, 2, "both virtqueues completed I/O: {marks:#?}");

    let write = fio_json(&log, "fio-write-verify");
    let read = fio_json(&log, "fio-read-verify");
    for (name, json) in [("write", &write), ("read", &read)] {
        let job = &json["jobs"][0];
        assert_eq!(job["error"], 0, "fio {name} job error: {job}");
    }
    let write_iops = write["jobs"][0]["write"]["iops"].as_f64().unwrap();
    let verify_iops = write["jobs"][0]["read"]["iops"].as_f64().unwrap();
    let reverify_iops = read["jobs"][0]["read"]["iops"].as_f64().unwrap();
    let written = write["jobs"][0]["write"]["io_bytes"].as_u64().unwrap();
    let verified = read["jobs"][0]["read"]["io_bytes"].as_u64().unwrap();
    assert!(
        written > 0 && verified >= written,
        "re-verify read everything written"
    );
    eprintln!(
        "guest fio (TCG): randwrite {write_iops:.0} IOPS, verify read {verify_iops:.0} IOPS, \
         re-verify {reverify_iops:.0} IOPS, {} MiB written and verified, guest run {seconds} s",
        written >> 20
    );
    assert_eq!(
        daemon.stop(),
        Some(0),
        "pollblk exits cleanly after the guest"
    );
    log
}

#[test]
fn linux_guest_runs_fio_verify_on_pollblk() {
    if !guest_available("linux_guest_runs_fio_verify_on_pollblk") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "guest.img", 1 << 30);
    let socket = dir.path().join("guest.sock");
    run_guest(
        dir.path(),
        &file_export(&socket, &file, ",num-queues=2"),
        &socket,
    );
}

#[test]
fn linux_guest_on_a_thin_volume_gives_discarded_space_back() {
    if !guest_available("linux_guest_on_a_thin_volume_gives_discarded_space_back") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = dir.path().join("pool");
    let p = path_str(&pool);
    for args in [
        &["pool", "create", p, "--size", "2G"][..],
        &["pool", "volume", "create", p, "vm", "--size", "1G"][..],
    ] {
        let out = Command::new(common::BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let socket = dir.path().join("thin.sock");
    let export = format!(
        "vhost-user-blk,socket={},pool={p},volume=vm,num-queues=2",
        socket.display()
    );
    let log = run_guest(dir.path(), &["--export".into(), export], &socket);
    // Discarded whole blocks read as zeroes on a thin volume.
    assert!(
        markers(&log).iter().any(|m| m == "discard-zeroes yes"),
        "a discarded range of a thin volume must read as zeroes"
    );
    // The guest wrote its two 64 MiB fio ranges in full, filled a 16 MiB range and discarded
    // it, filled another and zeroed it (BLKZEROOUT asks the driver not to unmap, so that one
    // stays allocated), and wrote at most 16 MiB into a third. Without the discard given
    // back the pool would hold 176 MiB.
    let out = Command::new(common::BIN)
        .args(["pool", "status", p, "--json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let used = status["used_bytes"].as_u64().unwrap();
    let mib = 1u64 << 20;
    assert!(
        (144 * mib..=160 * mib).contains(&used),
        "pool holds {} MiB after the guest: discarded space not given back? {status}",
        used / mib
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[cfg(feature = "rbd")]
#[test]
fn linux_guest_runs_fio_verify_on_an_rbd_image() {
    if !guest_available("linux_guest_runs_fio_verify_on_an_rbd_image") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = common::ceph::Cluster::start(&dir.path().join("ceph"), 1024);
    let socket = dir.path().join("rbd.sock");
    let export = format!(
        "vhost-user-blk,socket={},{},num-queues=2",
        socket.display(),
        cluster.export("img")
    );
    run_guest(dir.path(), &["--export".into(), export], &socket);
}

/// Waits until the console log shows `marker` (the guest reached that step).
fn wait_for_marker(log: &Path, marker: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never reached {marker:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The sum over both queues of the named statistics of the daemon serving from `dir`.
fn queue_stat(dir: &Path, names: &[&str]) -> u64 {
    let stats = dir.join("pollblk-data/stats");
    let mut total = 0;
    for q in 0..2 {
        let path = stats.join(format!("disk0.queue-{q}.stats"));
        let Ok(reader) = pollblk_engine::stats::StatsReader::open(&path) else {
            continue;
        };
        let sample = reader.sample().unwrap();
        for d in reader.descs() {
            if names.contains(&d.name.as_str()) {
                total += sample.of(d)[0];
            }
        }
    }
    total
}

#[test]
fn linux_guest_keeps_its_data_across_daemon_kills_and_restarts() {
    if !guest_available("linux_guest_keeps_its_data_across_daemon_kills_and_restarts") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "guest.img", 1 << 30);
    let socket = dir.path().join("guest.sock");
    let export = file_export(&socket, &file, ",num-queues=2");
    let chaos = |daemon: &mut Daemon, log: &Path| {
        // Once fio is writing and verifying: two SIGKILLs and a SIGTERM, a few seconds apart.
        wait_for_marker(log, "POLLBLK-GUEST: vda rc=0");
        let mut resubmitted = 0;
        for signal in [libc::SIGKILL, libc::SIGKILL, libc::SIGTERM] {
            std::thread::sleep(std::time::Duration::from_secs(4));
            // Kill while requests are in flight in the daemon when it can be caught (its
            // in_flight gauge), so the new one has something to resubmit.
            let catch = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while queue_stat(dir.path(), &["in_flight"]) == 0 && std::time::Instant::now() < catch {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let mut child = daemon.child.take().unwrap();
            let pid = child.id() as i32;
            let killed = std::time::Instant::now();
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, signal) };
            let status = child.wait().unwrap();
            if signal == libc::SIGTERM {
                assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
            }
            *daemon = Daemon::start(dir.path(), &export);
            // The guest's I/O stalls from the kill until QEMU has reconnected and the new
            // daemon completes its first request.
            let deadline = killed + std::time::Duration::from_secs(60);
            while queue_stat(dir.path(), &["read_ops", "write_ops"]) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no I/O after the restart"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let again = queue_stat(dir.path(), &["resubmitted"]);
            resubmitted += again;
            eprintln!(
                "restart after signal {signal}: guest I/O stalled {:?}, {again} request(s) \
                 resubmitted",
                killed.elapsed()
            );
        }
        assert!(
            resubmitted > 0,
            "no kill caught a request in flight: the in-flight path went untested"
        );
    };
    run_guest_with(dir.path(), &export, &socket, Some(&chaos));
}
