//! What the `qos` and `scale` groups of `compare` share: the setup, the two daemons run
//! alternately (started pinned to a core, logging to a file, ready once their last socket
//! accepts), and the summary rows of their samples.

use crate::compare::{median, pin_self};
use crate::load::{LoadSpec, Pattern};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a comparison of pollblk and qemu-storage-daemon runs with.
pub struct Comparison<'a> {
    pub pollblk: &'a Path,
    pub qsd: &'a Path,
    pub dir: &'a Path,
    pub pairs: usize,
    pub runtime: Duration,
    pub ramp: Duration,
    pub target_core: usize,
}

impl Comparison<'_> {
    /// Random reads of `bs` bytes at `depth` on one queue of `socket`, for the runtime.
    pub fn reads(&self, socket: &Path, bs: usize, depth: usize) -> LoadSpec {
        LoadSpec {
            socket: socket.to_path_buf(),
            pattern: Pattern::RandRead,
            bs,
            iodepth: depth,
            queues: 1,
            runtime: self.runtime,
            ramp: self.ramp,
            target_pid: None,
            depths: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Daemon {
    Pollblk,
    Qsd,
}

impl Daemon {
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Pollblk => "pollblk",
            Daemon::Qsd => "qsd",
        }
    }
}

/// What one run of one daemon measured, as (metric label, value).
pub type Sample = Vec<(&'static str, f64)>;

/// `pairs` runs of `one` for each daemon, pollblk then qsd, alternated.
pub fn alternate(
    c: &Comparison,
    workload: &str,
    one: impl Fn(Daemon) -> Result<Sample, String>,
) -> Result<[Vec<Sample>; 2], String> {
    let mut samples = [Vec::new(), Vec::new()];
    for pair in 0..c.pairs {
        for (i, daemon) in [Daemon::Pollblk, Daemon::Qsd].into_iter().enumerate() {
            eprintln!(
                "compare: {workload} on {} (pair {}/{})",
                daemon.name(),
                pair + 1,
                c.pairs
            );
            samples[i]
                .push(one(daemon).map_err(|e| format!("{workload} on {}: {e}", daemon.name()))?);
        }
    }
    Ok(samples)
}

/// compare's summary rows: per metric, each daemon's median and pollblk's ratio to qsd.
pub fn summary(workload: &str, samples: &[Vec<Sample>; 2]) -> Vec<Value> {
    let metrics: Vec<&str> = samples[0][0].iter().map(|(m, _)| *m).collect();
    metrics
        .iter()
        .enumerate()
        .map(|(m, metric)| {
            let mut medians = serde_json::Map::new();
            for (daemon, runs) in [Daemon::Pollblk, Daemon::Qsd].iter().zip(samples) {
                let mut values: Vec<f64> = runs.iter().map(|s| s[m].1).collect();
                if let Some(v) = median(&mut values) {
                    medians.insert(daemon.name().into(), json!(v));
                }
            }
            let mut ratios = serde_json::Map::new();
            // Rows in percent (errors off a limit, CPU near 0) compare as they are: a ratio
            // of two of them says nothing.
            if let (false, Some(ours), Some(theirs)) = (
                metric.ends_with('%'),
                medians.get("pollblk").and_then(Value::as_f64),
                medians.get("qsd").and_then(Value::as_f64),
            ) {
                if theirs > 0.0 {
                    ratios.insert("pollblk/qsd".into(), json!(ours / theirs));
                }
            }
            json!({ "workload": workload, "metric": metric, "medians": medians, "ratios": ratios })
        })
        .collect()
}

/// How long a daemon may take to listen on every disk's socket.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

pub fn spawn_pinned(command: &mut Command, core: usize, dir: &Path) -> Result<Child, String> {
    let log = dir.join("daemon.log");
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    // SAFETY: sched_setaffinity is async-signal-safe; the closure touches no shared state.
    unsafe {
        command.pre_exec(move || pin_self(core));
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))
}

/// Waits until `last` accepts (the daemons create their sockets in order: the last one
/// made means all are).
pub fn wait_listening(child: &mut Child, last: &Path) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    while std::os::unix::net::UnixStream::connect(last).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited at start ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not accept in {STARTUP_LIMIT:?}",
                last.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The probe connection was closed at once; let the daemon notice before the real one.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}
