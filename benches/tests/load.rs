//! pollblk-bench against a real pollblk daemon, in each poll mode.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const BENCH: &str = env!("CARGO_BIN_EXE_pollblk-bench");

/// The pollblk binary of the same build (`cargo test --workspace` builds it beside ours).
fn pollblk() -> PathBuf {
    let path = Path::new(BENCH).with_file_name("pollblk");
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

struct Daemon(Child);

impl Daemon {
    /// Starts `pollblk serve ARGS` in `dir` (its statistics go under it).
    fn start(dir: &Path, args: &[&str]) -> Daemon {
        let mut child = Command::new(pollblk())
            .current_dir(dir)
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pollblk");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .expect("pollblk exited before it was ready")
                .unwrap();
            if line.starts_with("pollblk: ready") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BENCH)
        .args(args)
        .output()
        .expect("run pollblk-bench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn both_drivers_drive_every_poll_mode_with_a_mixed_load_and_report_json() {
    for (mode, driver) in [
        ("poll", "blkio"),
        ("adaptive", "blkio"),
        ("interrupt", "blkio"),
        ("poll", "lean"),
        ("adaptive", "lean"),
        ("interrupt", "lean"),
    ] {
        let label = format!("{mode}/{driver}");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let export = format!(
            "vhost-user-blk,socket={},null,size=64M,num-queues=2",
            socket.display()
        );
        let daemon = Daemon::start(dir.path(), &["--poll-mode", mode, "--export", &export]);
        let mode = label.as_str();
        let pid = daemon.0.id().to_string();
        let (ok, stdout, stderr) = bench(&[
            "--socket",
            socket.to_str().unwrap(),
            "--rw",
            "randrw",
            "--iodepth",
            "16",
            "--queues",
            "2",
            "--runtime",
            "0.5",
            "--ramp",
            "0.1",
            "--target-pid",
            &pid,
            "--driver",
            driver,
            "--json",
        ]);
        assert!(ok, "{mode}: pollblk-bench failed: {stderr}");
        let v: Value = serde_json::from_str(&stdout).expect("JSON on stdout");
        let ios = v["ios"].as_u64().unwrap();
        let writes = v["writes"].as_u64().unwrap();
        assert_eq!(v["errors"], 0, "{mode}");
        assert!(ios > 100, "{mode}: only {ios} I/Os in 0.5 s");
        assert!(
            writes > 0 && writes < ios,
            "{mode}: randrw made {writes} writes of {ios}"
        );
        let lat = &v["latency_ns"];
        let (p50, p99, p999) = (
            lat["p50"].as_u64().unwrap(),
            lat["p99"].as_u64().unwrap(),
            lat["p99.9"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99 && p99 <= p999, "{mode}: {lat}");
        assert!(
            v["target"]["cpu_s"].as_f64().is_some(),
            "{mode}: no target CPU"
        );
        assert_eq!(v["queues"], 2);
    }
}

#[test]
fn bad_arguments_and_absent_sockets_are_errors() {
    let (ok, _, stderr) = bench(&["--socket", "/nonexistent/pollblk.sock", "--runtime", "0.1"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot connect to /nonexistent/pollblk.sock"),
        "{stderr}"
    );
    let (ok, _, stderr) = bench(&["--socket", "/x", "--rw", "sideways"]);
    assert!(!ok);
    assert!(stderr.contains("unknown pattern"), "{stderr}");
    let (ok, _, stderr) = bench(&["--socket", "/x", "--bs", "1000"]);
    assert!(!ok);
    assert!(stderr.contains("multiple of 512"), "{stderr}");
    let (ok, _, stderr) = bench(&["--runtime", "1"]);
    assert!(!ok);
    assert!(stderr.contains("--socket PATH is required"), "{stderr}");
}

#[test]
fn asking_for_more_queues_than_offered_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let export = format!(
        "vhost-user-blk,socket={},null,size=1M,num-queues=1",
        socket.display()
    );
    let _daemon = Daemon::start(dir.path(), &["--export", &export]);
    let (ok, _, stderr) = bench(&["--socket", socket.to_str().unwrap(), "--queues", "2"]);
    assert!(!ok);
    assert!(stderr.contains("offers 1 queue(s)"), "{stderr}");
    let (ok, _, stderr) = bench(&["--socket", "/nonexistent.sock", "--driver", "lean"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot connect to /nonexistent.sock"),
        "{stderr}"
    );
}
