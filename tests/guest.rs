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

/// Builds the guest once; the guard keeps other guest tests waiting while this one runs.
fn built_guest() -> (std::sync::MutexGuard<'static, bool>, PathBuf) {
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
    (built, guest_dir)
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
    let (_one_guest, guest_dir) = built_guest();
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
        // The guest keeps writing and verifying for 40 s after its size-based fio passes, so
        // every step of the chaos (three restarts, each waited on for I/O) lands while it
        // does I/O: a fast guest finished before the third restart and left nothing to serve.
        guest
            .arg("--reconnect")
            .args(["--append", "pollblk.runtime=40"]);
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

    check_guest_log(&log, seconds);
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
        // A request seen in flight may complete before the kill lands: when none of the
        // three caught one, up to four more SIGKILLs (a second apart) try again.
        let extra = [libc::SIGKILL; 4];
        let signals = [libc::SIGKILL, libc::SIGKILL, libc::SIGTERM];
        for (round, signal) in signals.into_iter().chain(extra).enumerate() {
            if round >= 3 && resubmitted > 0 {
                break;
            }
            let pause = if round < 3 { 4 } else { 1 };
            std::thread::sleep(std::time::Duration::from_secs(pause));
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

/// Checks every step the guest reported in its console log; `seconds` is the run time.
fn check_guest_log(log: &str, seconds: u64) {
    let marks = markers(log);
    for m in &marks {
        if let Some((_, rc)) = m.split_once(" rc=") {
            let rc = rc.split_whitespace().next().unwrap();
            if rc != "0" {
                // What the guest printed before the marker (fio's messages, kernel oopses).
                let lines: Vec<&str> = log.lines().collect();
                let at = lines
                    .iter()
                    .position(|l| l.contains(m.as_str()))
                    .unwrap_or(lines.len());
                let context = lines[at.saturating_sub(60)..at].join("\n");
                panic!("guest step failed: {m}; the console before it:\n{context}");
            }
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

    let write = fio_json(log, "fio-write-verify");
    let read = fio_json(log, "fio-read-verify");
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
}

/// A QMP connection (one JSON object per line).
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "QMP {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        };
        let mut qmp = Qmp {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        qmp.read_until(|v| v.get("QMP").is_some());
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    fn read_until(&mut self, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if done(&v) {
                return v;
            }
        }
    }

    /// Runs a command; returns its "return" value (panics on an error reply).
    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        self.try_execute(command, arguments)
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }

    /// Runs a command; its "return" value, or its error reply.
    fn try_execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use std::io::Write;
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap();
        let v = self.read_until(|v| v.get("return").is_some() || v.get("error").is_some());
        match v.get("error") {
            Some(_) => Err(v),
            None => Ok(v["return"].clone()),
        }
    }
}

/// QEMU for a test guest on vhost-user socket `socket`, console to `log`, QMP on `qmp`,
/// `append` added to the kernel command line.
///
/// Single-threaded TCG: with one thread per vCPU (MTTCG), QEMU 7.2 sometimes corrupts the
/// guest's memory across a migration when the host is busy, with QEMU's own virtio-blk and
/// no pollblk at all (tests/guest/migration-control.py: 1 destination kernel crash in 7).
/// Single-threaded it did not in 5, and pollblk's migration test failed 1 in 12 instead of
/// 3 in 6 (same crash: the destination kernel's memory is wrong from its first instruction).
fn guest_qemu(guest_dir: &Path, socket: &Path, log: &Path, qmp: &Path, append: &str) -> Command {
    let mut cmd = guest_machine(guest_dir, log, qmp, append);
    cmd.arg("-chardev")
        .arg(format!("socket,id=vu0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=vu0,num-queues=2"]);
    cmd
}

/// The test guest's machine without a disk: TCG, shared memory (vhost-user needs it), the
/// kernel and initramfs, the console to `log`, QMP on `qmp`.
fn guest_machine(guest_dir: &Path, log: &Path, qmp: &Path, append: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        "tcg,thread=single",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        &format!("{}M", GUEST_RAM >> 20),
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-memfd,id=mem,size={}M,share=on",
        GUEST_RAM >> 20
    ))
    .args(["-numa", "node,memdev=mem"])
    .args(["-nographic", "-no-reboot"])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-kernel")
    .arg(guest_dir.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest_dir.join("initramfs.cpio.gz"))
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 quiet {append}"))
    .stdin(std::process::Stdio::null())
    .stdout(std::fs::File::create(log).unwrap())
    .stderr(std::process::Stdio::inherit());
    cmd
}

/// Kills a QEMU left behind by a failing test.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn linux_guest_migrates_to_another_daemon_during_fio_verify() {
    if !guest_available("linux_guest_migrates_to_another_daemon_during_fio_verify") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = image(dir.path(), "guest.img", 1 << 30);
    // Two daemons on the same image file, as two hosts on shared storage would be.
    migrate_guest(dir.path(), &|socket: &Path| {
        file_export(socket, &file, ",num-queues=2")
    });
}

#[cfg(feature = "rbd")]
#[test]
fn linux_guest_migrates_between_daemons_on_one_rbd_image() {
    if !guest_available("linux_guest_migrates_between_daemons_on_one_rbd_image") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = common::ceph::Cluster::start(&dir.path().join("ceph"), 1024);
    // The image's exclusive lock moves to the destination daemon with its first write.
    migrate_guest(dir.path(), &|socket: &Path| {
        vec![
            "--export".to_string(),
            format!(
                "vhost-user-blk,socket={},{},num-queues=2",
                socket.display(),
                cluster.export("img")
            ),
        ]
    });
}

/// Attempts of a migration test. QEMU 7.2's TCG loses a few guest-CPU writes now and then
/// during a migration (see `migrate_guest_once`), and the guest may then fail on the
/// destination: such an attempt, and only such, is run again.
const MIGRATION_ATTEMPTS: u32 = 3;

/// Console lines of a guest that will not finish: stop waiting for it.
const GUEST_BROKEN: [&str; 5] = [
    "Kernel panic",
    "BUG:",
    "Oops",
    "is not a head",
    "blocked for more than",
];

/// Boots the guest on a daemon serving `export(a.sock)`, migrates it during fio write+verify
/// to a QEMU on a second daemon serving `export(b.sock)`, and checks the guest's run.
fn migrate_guest(d: &Path, export: &dyn Fn(&Path) -> Vec<String>) {
    for attempt in 1..=MIGRATION_ATTEMPTS {
        let dir = d.join(format!("attempt-{attempt}"));
        std::fs::create_dir(&dir).unwrap();
        match migrate_guest_once(&dir, export) {
            Ok(()) => return,
            Err(lost) => {
                eprintln!("migration attempt {attempt} of {MIGRATION_ATTEMPTS}: {lost}");
                assert!(attempt < MIGRATION_ATTEMPTS, "every attempt failed: {lost}");
            }
        }
    }
}

/// One migration. Err: the guest failed on the destination, and its memory there had lost
/// guest-CPU writes, none of them to a vring (what pollblk writes besides read data, and
/// where a pollblk bug would show). Any other failure panics.
fn migrate_guest_once(d: &Path, export: &dyn Fn(&Path) -> Vec<String>) -> Result<(), String> {
    let (sock_a, sock_b) = (d.join("a.sock"), d.join("b.sock"));
    let mut daemon_a = Daemon::start(d, &export(&sock_a));
    let mut args_b = export(&sock_b);
    // A second daemon in the same directory needs its own statistics and control socket.
    args_b.extend(["--stats-dir", "stats-b", "--control", "control-b.sock"].map(String::from));
    let mut daemon_b = Daemon::start(d, &args_b);
    let (_one_guest, guest_dir) = built_guest();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (log_a, log_b) = (d.join("console-a.log"), d.join("console-b.log"));
    let (qmp_a, qmp_b) = (d.join("qmp-a.sock"), d.join("qmp-b.sock"));
    let started = std::time::Instant::now();
    let source = Reap(
        guest_qemu(&guest_dir, &sock_a, &log_a, &qmp_a, "")
            .spawn()
            .unwrap(),
    );
    // -S: the destination stays paused after the migration, so its memory can be compared
    // with the source's before it runs.
    let mut dest = Reap(
        guest_qemu(&guest_dir, &sock_b, &log_b, &qmp_b, "")
            .arg("-S")
            .arg("-incoming")
            .arg(format!("tcp:127.0.0.1:{port}"))
            .spawn()
            .unwrap(),
    );
    let mut qmp_src = Qmp::connect(&qmp_a);
    let mut qmp_dst = Qmp::connect(&qmp_b);

    // Migrate while fio writes and verifies.
    wait_for_marker(&log_a, "POLLBLK-GUEST: vda rc=0");
    std::thread::sleep(std::time::Duration::from_secs(5));
    qmp_src.execute(
        "migrate",
        serde_json::json!({ "uri": format!("tcp:127.0.0.1:{port}") }),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let info = loop {
        let info = qmp_src.execute("query-migrate", serde_json::json!({}));
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => panic!("migration failed: {info}"),
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "migration did not finish: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    eprintln!(
        "migration: downtime {} ms, total {} ms, {} bytes transferred",
        info["downtime"], info["total-time"], info["ram"]["transferred"]
    );
    wait_until_paused(&mut qmp_dst);
    // Reported, not asserted: QEMU 7.2's TCG itself loses a few guest-CPU writes during a
    // migration under load (scattered bytes of kernel memory; tests/guest/migration-control.py
    // shows the same with QEMU's own virtio-blk and no pollblk), and the guest may then
    // crash on the destination. A write pollblk failed to log shows up here too: whole
    // read buffers, status bytes, used-ring elements. The report comes with any failure below.
    let rings = vring_ranges(&mut qmp_src);
    let stale = stale_pages(d, &mut qmp_src, &mut qmp_dst);
    eprintln!(
        "migration: {} stale pages on the destination (guest physical address: bytes that \
         differ, first and last offset): {:x?}",
        stale.len(),
        &stale[..stale.len().min(32)]
    );
    let mut stale_rings = 0;
    for page in &stale {
        for (name, start, len) in &rings {
            if page.gpa < start + len && *start < page.gpa + 4096 {
                eprintln!(
                    "migration: stale page {:#x} holds {name} at {start:#x}",
                    page.gpa
                );
                stale_rings += 1;
            }
        }
    }
    qmp_dst.execute("cont", serde_json::json!({}));
    let _ = std::io::Write::write_all(&mut qmp_src.writer, b"{\"execute\": \"quit\"}\n");
    drop(source);
    // The source daemon's front end is gone; the guest goes on on the destination.
    // The guest needs well under a minute after the migration; a guest that hangs without
    // a word on its console (seen once) fails the attempt, as a crash does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let status = loop {
        if let Some(status) = dest.0.try_wait().unwrap() {
            break status.to_string();
        }
        let console = std::fs::read_to_string(&log_b).unwrap_or_default();
        if let Some(broken) = GUEST_BROKEN.iter().find(|line| console.contains(*line)) {
            break format!("stopped waiting: the console says {broken:?}");
        }
        if std::time::Instant::now() > deadline {
            break "stopped waiting: 300 s after the migration".to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let (a, b) = (
        std::fs::read_to_string(&log_a).unwrap(),
        std::fs::read_to_string(&log_b).unwrap(),
    );
    let log = a.clone() + &b;
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(
            markers(&log).iter().any(|m| m == "done"),
            "the guest did not finish on the destination (QEMU {status}); source console:\n\
             {a}\ndestination console:\n{b}"
        );
        check_guest_log(&log, started.elapsed().as_secs());
    }));
    if let Err(failure) = checked {
        if stale.is_empty() || stale_rings > 0 {
            std::panic::resume_unwind(failure);
        }
        return Err(format!(
            "the guest failed on the destination (above), whose memory had lost guest-CPU \
             writes to {} pages, no vring among them: QEMU's TCG, not pollblk",
            stale.len()
        ));
    }
    assert_eq!(daemon_a.stop(), Some(0));
    assert_eq!(daemon_b.stop(), Some(0));
    Ok(())
}

/// The virtqueues' rings of the guest's vhost-user-blk disk as QEMU knows them: (name, guest
/// physical address, bytes). A stale page holding one is pollblk's to explain (the device
/// writes the used ring); empty if this QEMU cannot say (x- commands are unstable).
fn vring_ranges(qmp: &mut Qmp) -> Vec<(String, u64, u64)> {
    let Ok(devices) = qmp.try_execute("x-query-virtio", serde_json::json!({})) else {
        return Vec::new();
    };
    let mut ranges = Vec::new();
    for device in devices.as_array().into_iter().flatten() {
        let path = device["path"].as_str().unwrap_or_default().to_string();
        for queue in 0u64.. {
            let args = serde_json::json!({ "path": path, "queue": queue });
            let Ok(q) = qmp.try_execute("x-query-virtio-queue-status", args) else {
                break;
            };
            let size = q["vring-num"].as_u64().unwrap_or(0);
            for (ring, key, bytes) in [
                ("descriptor table", "vring-desc", 16 * size),
                ("avail ring", "vring-avail", 6 + 2 * size),
                ("used ring", "vring-used", 6 + 8 * size),
            ] {
                if let Some(gpa) = q[key].as_u64() {
                    ranges.push((format!("queue {queue}'s {ring}"), gpa, bytes));
                }
            }
        }
    }
    if ranges.is_empty() {
        eprintln!("migration: QEMU did not say where the vrings are: {devices}");
    } else {
        eprintln!("migration: vrings (name, guest physical address, bytes): {ranges:x?}");
    }
    ranges
}

/// Waits until an incoming QEMU started with -S has loaded the whole migration.
fn wait_until_paused(qmp: &mut Qmp) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let status = qmp.execute("query-status", serde_json::json!({}));
        if status["status"] == "paused" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the destination never finished loading: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Guest RAM size of `guest_qemu`, in bytes.
const GUEST_RAM: u64 = 1 << 30;

/// A guest page that differs after a migration, and how (a status byte, a used ring
/// element or a whole read buffer look different).
struct StalePage {
    gpa: u64,
    bytes: usize,
    first: usize,
    last: usize,
}

impl std::fmt::Debug for StalePage {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{:#x}: {} [{:#x}..={:#x}]",
            self.gpa, self.bytes, self.first, self.last
        )
    }
}

/// The 4 KiB pages whose contents differ between the stopped
/// source and the paused destination: memory the migration did not carry over. Every write
/// the daemon makes to guest memory while the front end migrates must be in the dirty log,
/// or the destination runs on the page's old contents.
fn stale_pages(d: &Path, src: &mut Qmp, dst: &mut Qmp) -> Vec<StalePage> {
    let (mem_a, mem_b) = (d.join("memory-a"), d.join("memory-b"));
    for (qmp, file) in [(src, &mem_a), (dst, &mem_b)] {
        qmp.execute(
            "pmemsave",
            serde_json::json!({ "val": 0, "size": GUEST_RAM, "filename": path_str(file) }),
        );
    }
    // Compared a MiB at a time: two whole GiB copies in memory are not needed.
    use std::io::Read;
    let (mut a, mut b) = (
        std::fs::File::open(&mem_a).unwrap(),
        std::fs::File::open(&mem_b).unwrap(),
    );
    let (mut chunk_a, mut chunk_b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut stale = Vec::new();
    for offset in (0..GUEST_RAM).step_by(1 << 20) {
        a.read_exact(&mut chunk_a).unwrap();
        b.read_exact(&mut chunk_b).unwrap();
        let pages = chunk_a.chunks(4096).zip(chunk_b.chunks(4096));
        for (page, (pa, pb)) in (0u64..).zip(pages).filter(|(_, (pa, pb))| pa != pb) {
            let differ: Vec<usize> = (0..4096).filter(|&i| pa[i] != pb[i]).collect();
            stale.push(StalePage {
                gpa: offset + page * 4096,
                bytes: differ.len(),
                first: differ[0],
                last: differ[differ.len() - 1],
            });
        }
    }
    let _ = (std::fs::remove_file(&mem_a), std::fs::remove_file(&mem_b));
    stale
}

/// Waits until the console log shows `marker`; fails at once if QEMU exits first.
/// Waits until the guest powers off (QEMU exits) by `deadline`; fails with its console.
fn wait_powered_off(qemu: &mut Reap, console: &Path, deadline: std::time::Instant) {
    while qemu.0.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not power off; its console:\n{}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn wait_for_guest(log: &Path, marker: &str, qemu: &mut Reap) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!("QEMU exited ({status}) before {marker:?}; console:\n{text}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never reached {marker:?}; console:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The operator's workflow on a running guest: a second disk added through the control
/// socket and QEMU's monitor, used (fio verify), grown (the guest sees the new size through
/// the config-change notification), refused removal while attached, detached, removed.
#[test]
fn linux_guest_gets_a_disk_added_grown_and_removed_at_run_time() {
    if !guest_available("linux_guest_gets_a_disk_added_grown_and_removed_at_run_time") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (sock_a, sock_b, ctl) = (d.join("vda.sock"), d.join("vdb.sock"), d.join("ctl.sock"));
    let mut args = file_export(&sock_a, &image(d, "vda.img", 1 << 30), ",num-queues=2");
    args.extend(["--control".to_string(), path_str(&ctl).to_string()]);
    let mut daemon = Daemon::start(d, &args);
    let (_one_guest, guest_dir) = built_guest();

    let (log, qmp_path) = (d.join("console.log"), d.join("qmp.sock"));
    let started = std::time::Instant::now();
    let mut qemu = guest_qemu(&guest_dir, &sock_a, &log, &qmp_path, "pollblk.mode=hotplug");
    // A PCIe slot for the disk to come (q35 has no hot-pluggable slot of its own).
    qemu.args(["-device", "pcie-root-port,id=rp1,chassis=1,slot=1"]);
    let mut qemu = Reap(qemu.spawn().unwrap());
    let mut qmp = Qmp::connect(&qmp_path);

    wait_for_guest(&log, "POLLBLK-GUEST: hotplug-ready", &mut qemu);
    let vdb = image(d, "vdb.img", 64 * MIB);
    let spec = format!(
        "spec=vhost-user-blk,socket={},file={},num-queues=1",
        sock_b.display(),
        vdb.display()
    );
    common::rpc(d, &ctl, "export_add", &[&spec, "name=vdb"]).unwrap();
    qmp.execute(
        "chardev-add",
        serde_json::json!({ "id": "vu1", "backend": { "type": "socket", "data": {
            "addr": { "type": "unix", "data": { "path": path_str(&sock_b) } },
            "server": false } } }),
    );
    qmp.execute(
        "device_add",
        serde_json::json!({ "driver": "vhost-user-blk-pci", "chardev": "vu1", "id": "vdb",
            "num-queues": 1, "bus": "rp1" }),
    );

    wait_for_guest(&log, "POLLBLK-GUEST: hotplug-resize-wait", &mut qemu);
    let resized = common::rpc(d, &ctl, "export_resize", &["name=vdb", "size=128M"]).unwrap();
    assert_eq!(resized["front_end_notified"], true, "{resized}");

    wait_for_guest(&log, "POLLBLK-GUEST: hotplug-remove-wait", &mut qemu);
    let busy = common::rpc(d, &ctl, "export_remove", &["name=vdb"]).unwrap_err();
    assert!(
        busy.contains("-32002") && busy.contains("device_del"),
        "{busy}"
    );
    qmp.execute("device_del", serde_json::json!({ "id": "vdb" }));
    qmp.read_until(|v| v["event"] == "DEVICE_DELETED" && v["data"]["device"] == "vdb");
    qmp.execute("chardev-remove", serde_json::json!({ "id": "vu1" }));
    let removed = common::rpc(d, &ctl, "export_remove", &["name=vdb", "wait=10"]).unwrap();
    assert_eq!(removed["removed"], "vdb");
    assert!(!sock_b.exists(), "the removed disk's socket is gone");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    wait_powered_off(&mut qemu, &log, deadline);
    let text = std::fs::read_to_string(&log).unwrap();
    let marks = markers(&text);
    for m in &marks {
        if let Some((_, rc)) = m.split_once(" rc=") {
            assert!(
                rc.starts_with("0"),
                "guest step failed: {m}\nconsole:\n{text}"
            );
        }
    }
    let has = |m: &str| marks.iter().any(|x| x == m);
    for step in [
        &format!("vdb-added rc=0 size={}", 64 * MIB / 512),
        "fio-vdb rc=0 verify_errors=0",
        &format!("vdb-resized rc=0 size={}", 128 * MIB / 512),
        "vdb-tail rc=0",
        "vdb-removed rc=0",
        "vda-after rc=0",
        "done",
    ] {
        assert!(has(step), "guest never reported {step:?}; console:\n{text}");
    }
    assert_eq!(std::fs::metadata(&vdb).unwrap().len(), 128 * MIB);
    let fio = fio_json(&text, "fio-vdb");
    eprintln!(
        "hot-plugged disk: fio randwrite {:.0} IOPS + verify, grown to 128 MiB and removed; \
         guest run {} s",
        fio["jobs"][0]["write"]["iops"].as_f64().unwrap_or(0.0),
        started.elapsed().as_secs()
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn four_linux_guests_with_two_disks_each_on_one_daemon() {
    if !guest_available("four_linux_guests_with_two_disks_each_on_one_daemon") {
        return;
    }
    const GUESTS: usize = 4;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let disk = |g: usize, letter: &str| format!("g{g}{letter}");
    let mut args = Vec::new();
    for g in 0..GUESTS {
        for letter in ["a", "b"] {
            let name = disk(g, letter);
            let file = image(d, &format!("{name}.img"), 128 << 20);
            let socket = d.join(format!("{name}.sock"));
            // guest_qemu attaches the first disk with two queues, the second here with one.
            let queues = if letter == "a" { 2 } else { 1 };
            args.extend(file_export(
                &socket,
                &file,
                &format!(",num-queues={queues},name={name}"),
            ));
        }
    }
    let mut daemon = Daemon::start(d, &args);
    let (_one_guest, guest_dir) = built_guest();

    let started = std::time::Instant::now();
    let mut guests: Vec<(Reap, PathBuf)> = (0..GUESTS)
        .map(|g| {
            let log = d.join(format!("console-{g}.log"));
            let (a, b) = (
                d.join(disk(g, "a") + ".sock"),
                d.join(disk(g, "b") + ".sock"),
            );
            let qmp = d.join(format!("qmp-{g}.sock"));
            let append = "pollblk.mode=pair pollblk.size=16M pollblk.iodepth=8 pollblk.wait=120";
            let mut qemu = guest_qemu(&guest_dir, &a, &log, &qmp, append);
            qemu.arg("-chardev")
                .arg(format!("socket,id=vu1,path={}", b.display()))
                .args(["-device", "vhost-user-blk-pci,chardev=vu1,num-queues=1"]);
            (Reap(qemu.spawn().unwrap()), log)
        })
        .collect();
    let deadline = started + std::time::Duration::from_secs(1200);
    for (qemu, log) in &mut guests {
        wait_powered_off(qemu, log, deadline);
    }
    for (g, (_, log)) in guests.iter().enumerate() {
        let text = std::fs::read_to_string(log).unwrap();
        let marks = markers(&text);
        for step in [
            "vda rc=0",
            "vdb rc=0",
            "fio-pair rc=0 verify_errors=0",
            "fio-pair-reverify rc=0 verify_errors=0",
            "summary failed=0",
            "done",
        ] {
            assert!(
                marks.iter().any(|m| m == step),
                "guest {g} never reported {step:?}; console:\n{text}"
            );
        }
        let fio = fio_json(&text, "fio-pair");
        for job in fio["jobs"].as_array().unwrap() {
            assert_eq!(job["error"], 0, "guest {g}: {job}");
            assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20);
        }
    }
    // Every disk did its guest's I/O, as the daemon's statistics show it.
    let stats = d.join("pollblk-data/stats");
    for g in 0..GUESTS {
        for letter in ["a", "b"] {
            let name = disk(g, letter);
            let writes: u64 = (0..2)
                .filter_map(|q| {
                    let path = stats.join(format!("{name}.queue-{q}.stats"));
                    let reader = pollblk_engine::stats::StatsReader::open(&path).ok()?;
                    let sample = reader.sample().unwrap();
                    let desc = reader.descs().iter().find(|d| d.name == "write_ops")?;
                    Some(sample.of(desc)[0])
                })
                .sum();
            assert!(writes >= 500, "{name}: {writes} writes");
        }
    }
    let view = Command::new(common::BIN)
        .arg("stats")
        .arg(&stats)
        .output()
        .unwrap();
    let view = String::from_utf8_lossy(&view.stdout);
    for g in 0..GUESTS {
        for letter in ["a", "b"] {
            assert!(view.contains(&format!("/{}\n", disk(g, letter))), "{view}");
        }
    }
    eprintln!(
        "{GUESTS} guests, 2 disks each, fio verify on all 8 at once: {} s",
        started.elapsed().as_secs()
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn linux_guest_gets_the_iops_its_disk_is_limited_to() {
    if !guest_available("linux_guest_gets_the_iops_its_disk_is_limited_to") {
        return;
    }
    const LIMIT: f64 = 200.0;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let socket = d.join("vda.sock");
    let args = file_export(
        &socket,
        &image(d, "vda.img", 1 << 30),
        &format!(",num-queues=2,iops-total={LIMIT}"),
    );
    let mut daemon = Daemon::start(d, &args);
    let (_one_guest, guest_dir) = built_guest();
    let (log, qmp) = (d.join("console.log"), d.join("qmp.sock"));
    let append = "pollblk.mode=rate pollblk.runtime=10 pollblk.iodepth=16 pollblk.size=64M";
    let mut qemu = Reap(
        guest_qemu(&guest_dir, &socket, &log, &qmp, append)
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    wait_powered_off(&mut qemu, &log, deadline);
    let text = std::fs::read_to_string(&log).unwrap();
    let marks = markers(&text);
    assert!(
        marks.iter().any(|m| m == "fio-rate rc=0 verify_errors=0"),
        "fio did not run; console:\n{text}"
    );
    let job = &fio_json(&text, "fio-rate")["jobs"][0];
    let iops = job["read"]["iops"].as_f64().unwrap() + job["write"]["iops"].as_f64().unwrap();
    // fio's own figure over its 10 s, the bucket's first 100 ms included.
    assert!(
        (iops - LIMIT).abs() <= LIMIT * 0.05,
        "the guest got {iops:.0} IOPS of a disk limited to {LIMIT}"
    );
    eprintln!("guest fio on a disk limited to {LIMIT} IOPS: {iops:.1} IOPS");
    assert_eq!(daemon.stop(), Some(0));
}

/// The commands of README's quick-start block, comments left out.
fn readme_quick_start() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let from = readme
        .find("<!-- quick-start")
        .expect("README has a quick-start block");
    let block = &readme[from..];
    let start = block.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = start + block[start..].find("```").expect("the block's end");
    block[start..end]
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn readme_quick_start_boots_a_guest_that_writes_to_the_default_disk() {
    use std::io::Write;
    if !guest_available("readme_quick_start_boots_a_guest_that_writes_to_the_default_disk") {
        return;
    }
    // Run as written: `cargo run --release` is this build's pollblk with no arguments (a
    // cargo inside `cargo test` would wait for the build directory's lock), then try.sh.
    assert_eq!(
        readme_quick_start(),
        ["cargo run --release", "tests/guest/try.sh"]
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let mut daemon = Daemon::start_default(d);
    let (_one_guest, _) = built_guest();
    let console = d.join("console.log");
    let mut guest = Reap(
        Command::new(repo().join("tests/guest/try.sh"))
            .current_dir(d)
            .stdin(std::process::Stdio::piped())
            .stdout(std::fs::File::create(&console).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_guest(&console, "Leave with: poweroff -f", &mut guest);
    // What a new user types: a write to the disk, then leave.
    let typed = "dd if=/dev/urandom of=/dev/vda bs=1M count=16 oflag=direct && \
                 echo QUICK-START-$((6*7))\npoweroff -f\n";
    guest
        .0
        .stdin
        .take()
        .unwrap()
        .write_all(typed.as_bytes())
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    wait_powered_off(&mut guest, &console, deadline);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("QUICK-START-42"),
        "the write did not finish:\n{text}"
    );
    // The daemon saw the 16 MiB.
    let stats = d.join("pollblk-data/stats");
    let written: u64 = (0..16)
        .filter_map(|q| {
            let reader = pollblk_engine::stats::StatsReader::open(
                &stats.join(format!("disk0.queue-{q}.stats")),
            )
            .ok()?;
            let sample = reader.sample().unwrap();
            let desc = reader.descs().iter().find(|d| d.name == "write_sectors")?;
            Some(sample.of(desc)[0])
        })
        .sum();
    assert!(written >= 16 << 11, "{written} sectors written");
    assert_eq!(daemon.stop(), Some(0));
}

/// Runs `program ARGS` and returns its stdout; fails the test if it fails.
fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The golden-image workflow: an ext4 image with files and their checksums, imported into
/// a thin pool, snapshotted and cloned three times; one guest mounts the snapshot (served
/// read-only) and the three clones, checks every file, writes a file of its own to each
/// clone. Afterwards the snapshot is byte for byte the image, each clone holds its own
/// file and no other's, and the pool checks clean.
#[test]
fn linux_guest_mounts_three_clones_of_an_imported_image() {
    if !guest_available("linux_guest_mounts_three_clones_of_an_imported_image") {
        return;
    }
    if !have("mkfs.ext4") || !have("debugfs") {
        assert!(
            !guest_required(),
            "mkfs.ext4 and debugfs (e2fsprogs) are needed"
        );
        eprintln!("SKIPPED linux_guest_mounts_three_clones_of_an_imported_image: no e2fsprogs");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let files = d.join("files");
    std::fs::create_dir(&files).unwrap();
    for i in 0..12u8 {
        let data = common::pattern(4096 * (1 + 37 * i as usize), i);
        std::fs::write(files.join(format!("file{i}")), data).unwrap();
    }
    let sums = run_tool(
        "sh",
        &["-c", &format!("cd {} && sha256sum file*", files.display())],
    );
    std::fs::write(files.join("SHA256SUMS"), sums).unwrap();
    let image = d.join("golden.raw");
    run_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            path_str(&files),
            path_str(&image),
            "64M",
        ],
    );
    let pool = d.join("pool");
    let p = path_str(&pool);
    let bin = common::BIN;
    run_tool(bin, &["pool", "create", p, "--size", "1G"]);
    run_tool(
        bin,
        &[
            "pool",
            "volume",
            "import",
            p,
            "image",
            "--from",
            path_str(&image),
        ],
    );
    run_tool(bin, &["pool", "volume", "snapshot", p, "image", "gold"]);
    run_tool(bin, &["pool", "volume", "delete", p, "image"]);
    let mut args = Vec::new();
    for (name, extra) in [
        ("gold", ",readonly=on,num-queues=2"),
        ("vm0", ""),
        ("vm1", ""),
        ("vm2", ""),
    ] {
        if name != "gold" {
            run_tool(bin, &["pool", "volume", "clone", p, "gold", name]);
        }
        args.push("--export".to_string());
        args.push(format!(
            "vhost-user-blk,socket={},pool={p},volume={name},name={name}{extra}",
            d.join(format!("{name}.sock")).display()
        ));
    }
    let mut daemon = Daemon::start(d, &args);
    let (_one_guest, guest_dir) = built_guest();
    let log = d.join("console.log");
    let append = "pollblk.mode=clones pollblk.clones=3 pollblk.size=1M pollblk.range=1M";
    let mut qemu = guest_qemu(
        &guest_dir,
        &d.join("gold.sock"),
        &log,
        &d.join("qmp.sock"),
        append,
    );
    for (i, name) in ["vm0", "vm1", "vm2"].iter().enumerate() {
        qemu.arg("-chardev")
            .arg(format!(
                "socket,id=c{i},path={}",
                d.join(format!("{name}.sock")).display()
            ))
            .args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=c{i},num-queues=1"),
            ]);
    }
    let mut qemu = Reap(qemu.spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    wait_powered_off(&mut qemu, &log, deadline);
    let text = std::fs::read_to_string(&log).unwrap();
    let marks = markers(&text);
    let mut steps = vec![
        "snapshot-mount rc=0".to_string(),
        "snapshot-files rc=0".into(),
        "snapshot-untouched rc=0".into(),
        "summary failed=0".into(),
        "done".into(),
    ];
    for i in 0..3 {
        for s in ["mount", "files", "fresh", "mine", "umount"] {
            steps.push(format!("clone-{i}-{s} rc=0"));
        }
    }
    for step in &steps {
        assert!(
            marks.iter().any(|m| m == step),
            "the guest never reported {step:?}; console:\n{text}"
        );
    }
    assert_eq!(daemon.stop(), Some(0));

    run_tool(bin, &["pool", "check", p]);
    let export = |name: &str| {
        let to = d.join(format!("{name}.out"));
        run_tool(
            bin,
            &["pool", "volume", "export", p, name, "--to", path_str(&to)],
        );
        to
    };
    let gold = export("gold");
    assert!(
        std::fs::read(&gold).unwrap() == std::fs::read(&image).unwrap(),
        "the snapshot is no longer the image it was taken of"
    );
    for i in 0..3 {
        let clone = export(&format!("vm{i}"));
        run_tool("e2fsck", &["-fn", path_str(&clone)]);
        let mine = run_tool("debugfs", &["-R", "cat /mine", path_str(&clone)]);
        let lines: std::collections::BTreeSet<&str> = mine.lines().collect();
        assert_eq!(
            lines.into_iter().collect::<Vec<_>>(),
            vec![format!("clone {i}").as_str()],
            "vm{i} holds another clone's writes"
        );
    }
    // Each clone owns the few blocks it wrote and shares the rest with the snapshot.
    let status: serde_json::Value =
        serde_json::from_str(&run_tool(bin, &["pool", "status", p, "--json"])).unwrap();
    for v in status["volumes"].as_array().unwrap() {
        if v["name"] != "gold" {
            let (owned, shared) = (
                v["owned_bytes"].as_u64().unwrap(),
                v["shared_bytes"].as_u64().unwrap(),
            );
            assert!(owned > 0 && owned < shared, "{v}");
        }
    }
}

/// QEMU's own NBD client (`-drive driver=nbd`) on a pollblk NBD export, under the guest's
/// virtio_blk driver: fio write and verify, discard, write-zeroes and flush, as on a
/// vhost-user disk.
#[test]
fn linux_guest_runs_fio_verify_on_an_nbd_drive_served_by_pollblk() {
    if !guest_available("linux_guest_runs_fio_verify_on_an_nbd_drive_served_by_pollblk") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let file = image(d, "nbd.img", 1 << 30);
    let socket = d.join("nbd.sock");
    let spec = format!(
        "nbd,socket={},file={},name=vm1",
        socket.display(),
        file.display()
    );
    let mut daemon = Daemon::start(d, &["--export".to_string(), spec]);
    let (_one_guest, guest_dir) = built_guest();
    let log = d.join("console.log");
    let started = std::time::Instant::now();
    let mut qemu = guest_machine(&guest_dir, &log, &d.join("qmp.sock"), "");
    qemu.arg("-drive")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=vm1,if=none,id=d0,discard=unmap,\
             cache.direct=on",
            socket.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,num-queues=2"]);
    let mut qemu = Reap(qemu.spawn().unwrap());
    wait_powered_off(
        &mut qemu,
        &log,
        started + std::time::Duration::from_secs(900),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    check_guest_log(&text, started.elapsed().as_secs());
    assert_eq!(
        daemon.stop(),
        Some(0),
        "pollblk exits cleanly after the guest"
    );
}
