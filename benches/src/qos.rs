//! The `qos` group of `compare`: pollblk's limits against qemu-storage-daemon's throttle
//! groups (`--object throttle-group` and a `throttle` filter node over the same null node),
//! the same limits, the same cores, runs alternated.
//!
//! - Accuracy: one limited disk driven at QD1 and QD128 past its limit; achieved / limit at
//!   1k, 10k and 100k IOPS, and at 50 MB/s (64 KiB reads).
//! - The victim: two disks on one daemon (one core), a noisy one limited to 100k IOPS and
//!   driven at QD128, an unlimited victim at QD1; the victim's p99 beside the noisy one,
//!   and alone.

use crate::compare::stop;
use crate::daemons::{
    alternate, spawn_pinned, summary, wait_listening, Comparison, Daemon, Sample,
};
use crate::load::{self, DriverKind, LoadResult, LoadSpec};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// A limit as both daemons spell it.
#[derive(Clone, Copy)]
struct Limit {
    /// pollblk's export option and QEMU's throttle-group property (without `x-`).
    key: &'static str,
    value: u64,
    /// Bytes per request of the load.
    bs: usize,
}

impl Limit {
    fn label(&self) -> String {
        match self.key {
            "bps-total" => format!("{} MB/s", self.value / 1_000_000),
            _ => format!("{}k IOPS", self.value / 1000),
        }
    }

    /// What the load achieved, in the limit's unit.
    fn achieved(&self, r: &LoadResult) -> f64 {
        match self.key {
            "bps-total" => r.iops() * self.bs as f64,
            _ => r.iops(),
        }
    }
}

const LIMITS: [Limit; 4] = [
    Limit {
        key: "iops-total",
        value: 1_000,
        bs: 4096,
    },
    Limit {
        key: "iops-total",
        value: 10_000,
        bs: 4096,
    },
    Limit {
        key: "iops-total",
        value: 100_000,
        bs: 4096,
    },
    Limit {
        key: "bps-total",
        value: 50_000_000,
        bs: 65536,
    },
];

/// The noisy neighbour's limit in the victim runs.
const NOISY: Limit = LIMITS[2];

/// One disk of a run: its socket and its limit, if any.
struct Disk<'a> {
    socket: &'a Path,
    limit: Option<Limit>,
}

/// Runs the group; returns compare's summary rows.
pub fn run(setup: &Comparison) -> Result<Vec<Value>, String> {
    let mut rows = Vec::new();
    for limit in LIMITS {
        for depth in [1, 128] {
            let workload = format!("qos: {} {}, QD{depth}", limit.label(), limit.key);
            let samples = alternate(setup, &workload, |daemon| {
                let socket = setup.dir.join("qos-0.sock");
                let disks = [Disk {
                    socket: &socket,
                    limit: Some(limit),
                }];
                let r = with_daemon(setup, daemon, &disks, |_| {
                    load::run(&setup.reads(&socket, limit.bs, depth), DriverKind::Lean)
                })?;
                let off = limit.achieved(&r) / limit.value as f64 - 1.0;
                Ok(vec![("off the limit, %", 100.0 * off)])
            })?;
            rows.extend(summary(&workload, &samples));
        }
    }
    let workload = format!("qos: victim QD1 beside noisy QD128 at {}", NOISY.label());
    let samples = alternate(setup, &workload, |daemon| victim(setup, daemon))?;
    rows.extend(summary(&workload, &samples));
    Ok(rows)
}

/// The victim alone, then beside the noisy disk at its limit: its p99s and their ratio.
fn victim(setup: &Comparison, daemon: Daemon) -> Result<Sample, String> {
    let (victim, noisy) = (setup.dir.join("qos-0.sock"), setup.dir.join("qos-1.sock"));
    let disks = [
        Disk {
            socket: &victim,
            limit: None,
        },
        Disk {
            socket: &noisy,
            limit: Some(NOISY),
        },
    ];
    let pattern = format!("{}/qos-{{}}.sock", setup.dir.display());
    with_daemon(setup, daemon, &disks, |_| {
        let alone = LoadSpec {
            depths: vec![1],
            ..setup.reads(&victim, 4096, 1)
        };
        let alone = load::run_many(&alone, &pattern, 1)?;
        let both = LoadSpec {
            depths: vec![1, 128],
            ..setup.reads(&victim, 4096, 1)
        };
        let both = load::run_many(&both, &pattern, 2)?;
        let p99 = |r: &LoadResult| r.latency_per_queue_ns[0].value_at_quantile(0.99) as f64 / 1e3;
        let noisy_rate = both.ios_per_queue[1] as f64 / both.elapsed.as_secs_f64();
        Ok(vec![
            ("victim p99 us alone", p99(&alone)),
            ("victim p99 us beside", p99(&both)),
            ("victim p99 beside / alone", p99(&both) / p99(&alone)),
            (
                "noisy off its limit, %",
                100.0 * (noisy_rate / NOISY.value as f64 - 1.0),
            ),
        ])
    })
}

/// Starts `daemon` serving `disks` (1 GiB null volumes, read-zeroes off) on the target
/// core, runs `f`, stops it.
fn with_daemon<T>(
    setup: &Comparison,
    daemon: Daemon,
    disks: &[Disk],
    f: impl FnOnce(&[Disk]) -> Result<T, String>,
) -> Result<T, String> {
    for d in disks {
        let _ = std::fs::remove_file(d.socket);
    }
    let mut command = match daemon {
        Daemon::Pollblk => pollblk_command(setup, disks),
        Daemon::Qsd => qsd_command(setup, disks),
    };
    let mut child = spawn_pinned(&mut command, setup.target_core, setup.dir)?;
    let last = disks.last().expect("a disk").socket;
    let outcome = wait_listening(&mut child, last).and_then(|()| f(disks));
    stop(&mut child);
    outcome
}

fn pollblk_command(setup: &Comparison, disks: &[Disk]) -> Command {
    let mut command = Command::new(setup.pollblk);
    command
        .arg("serve")
        .args(["--cores", &setup.target_core.to_string()])
        .arg("--stats-dir")
        .arg(setup.dir.join("qos-stats"));
    for d in disks {
        let limit = d
            .limit
            .map(|l| format!(",{}={}", l.key, l.value))
            .unwrap_or_default();
        command.arg("--export").arg(format!(
            "vhost-user-blk,socket={},null,size=1G,read-zeroes=off,num-queues=1{limit}",
            d.socket.display()
        ));
    }
    command
}

/// A null node per disk; a limited one goes through a throttle node of its own group.
fn qsd_command(setup: &Comparison, disks: &[Disk]) -> Command {
    let mut command = Command::new(setup.qsd);
    for (i, d) in disks.iter().enumerate() {
        command.arg("--blockdev").arg(format!(
            "driver=null-co,node-name=n{i},size=1073741824,read-zeroes=off"
        ));
        let node = match d.limit {
            Some(l) => {
                command
                    .arg("--object")
                    .arg(format!("throttle-group,id=tg{i},x-{}={}", l.key, l.value));
                command.arg("--blockdev").arg(format!(
                    "driver=throttle,node-name=t{i},file=n{i},throttle-group=tg{i}"
                ));
                format!("t{i}")
            }
            None => format!("n{i}"),
        };
        command.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e{i},node-name={node},addr.type=unix,addr.path={},\
             writable=on,num-queues=1",
            d.socket.display()
        ));
    }
    command
}
