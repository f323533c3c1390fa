//! Running the pollblk binary from tests.
#![allow(dead_code)]

pub mod ceph;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pollblk");

/// A running `pollblk serve`; stopped with SIGTERM when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub stdout: Vec<String>,
}

impl Daemon {
    /// Starts `pollblk serve ARGS` in `dir` and waits for its ready line.
    pub fn start(dir: &Path, args: &[String]) -> Daemon {
        Daemon::start_env(dir, args, &[])
    }

    /// As `start`, with extra environment variables.
    pub fn start_env(dir: &Path, args: &[String], env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(BIN);
        command.arg("serve").args(args).envs(env.iter().copied());
        Daemon::spawn(command, dir)
    }

    /// Starts `pollblk` with no arguments at all (the README's first command) in `dir`.
    pub fn start_default(dir: &Path) -> Daemon {
        Daemon::spawn(Command::new(BIN), dir)
    }

    fn spawn(mut command: Command, dir: &Path) -> Daemon {
        let mut child = command
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pollblk");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        loop {
            let line = lines
                .next()
                .expect("pollblk exited before it was ready")
                .unwrap();
            let ready = line.starts_with("pollblk: ready");
            stdout.push(line);
            if ready {
                break;
            }
        }
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Daemon {
            child: Some(child),
            stdout,
        }
    }

    /// Sends SIGTERM and waits; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signals our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("pollblk did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sparse file of `size` bytes in `dir`.
pub fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// `--export vhost-user-blk,socket=...,file=...` plus extra options.
pub fn file_export(socket: &Path, file: &Path, extra: &str) -> Vec<String> {
    vec![
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},file={}{extra}",
            socket.display(),
            file.display()
        ),
    ]
}

/// `pollblk rpc --socket CONTROL METHOD --param P...` run in `dir`: the printed result, or
/// the error message.
pub fn rpc(
    dir: &Path,
    control: &Path,
    method: &str,
    params: &[&str],
) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .args(["rpc", "--socket"])
        .arg(control)
        .arg(method);
    for p in params {
        cmd.args(["--param", p]);
    }
    let out = cmd.output().expect("run pollblk rpc");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("pollblk rpc prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}
