//! The `scale` group of `compare`: one daemon serving many single-queue null disks, pollblk
//! and qemu-storage-daemon alternately on the same core. Per run: the time from start until
//! the last disk's socket accepts; one disk driven at QD1 alone; every other disk attached by
//! an idle front end (its own memory table, its queue started, one read served), the daemon's
//! CPU, RSS and threads while they all sit idle; the same QD1 disk again beside them.

use crate::compare::stop;
use crate::daemons::{
    alternate, spawn_pinned, summary, wait_listening, Comparison, Daemon, Sample,
};
use crate::idle;
use crate::load::{self, DriverKind, LoadSpec, Pattern};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Runs the pairs (pollblk, then qemu-storage-daemon) with `disks` disks each; returns
/// compare's summary rows.
pub fn run(setup: &Comparison, disks: usize) -> Result<Vec<Value>, String> {
    if !(2..=idle::MAX_IDLE).contains(&disks) {
        return Err(format!("--scale-disks must be 2..={}", idle::MAX_IDLE));
    }
    raise_open_files();
    let workload = format!("scale: {disks} null disks, all attached");
    let samples = alternate(setup, &workload, |daemon| run_one(setup, disks, daemon))?;
    Ok(summary(&workload, &samples))
}

/// One daemon's run: start, QD1 alone, all attached and idle, QD1 beside them.
fn run_one(setup: &Comparison, disks: usize, daemon: Daemon) -> Result<Sample, String> {
    let sockets = setup.dir.join(format!("scale-{}", daemon.name()));
    let _ = std::fs::remove_dir_all(&sockets);
    std::fs::create_dir_all(&sockets).map_err(|e| format!("{}: {e}", sockets.display()))?;
    let pattern = format!("{}/d{{}}.sock", sockets.display());
    let last = idle::socket_of(&pattern, disks - 1);
    let mut command = match daemon {
        Daemon::Pollblk => pollblk_command(setup, disks, &sockets, &pattern)?,
        Daemon::Qsd => qsd_command(setup, disks, &pattern),
    };
    let started = Instant::now();
    let mut child = spawn_pinned(&mut command, setup.target_core, &sockets)?;
    let outcome = wait_listening(&mut child, &last).and_then(|()| {
        let startup = started.elapsed();
        measure(setup, disks, &child, &pattern, &last, startup)
    });
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&sockets);
    outcome.map_err(|e| format!("scale on {}: {e}", daemon.name()))
}

fn measure(
    setup: &Comparison,
    disks: usize,
    child: &Child,
    pattern: &str,
    last: &Path,
    startup: Duration,
) -> Result<Sample, String> {
    let pid = child.id();
    let spec = LoadSpec {
        target_pid: Some(pid),
        ..setup.reads(last, 4096, 1)
    };
    let alone = load::run(&spec, DriverKind::Lean)?;
    let attach_started = Instant::now();
    let idle_front_ends = idle::connect(pattern, disks - 1)?;
    let attach = attach_started.elapsed();
    let idle = load::run(
        &LoadSpec {
            pattern: Pattern::Idle,
            ..spec.clone()
        },
        DriverKind::Lean,
    )?;
    let (rss_kib, threads) = rss_and_threads(pid)?;
    let beside = load::run(&spec, DriverKind::Lean)?;
    drop(idle_front_ends);
    if alone.errors + beside.errors > 0 {
        return Err(format!("{} I/O error(s)", alone.errors + beside.errors));
    }
    let p50 = |r: &load::LoadResult| r.latency_ns.value_at_quantile(0.5) as f64 / 1e3;
    let cpu_pct = 100.0 * idle.target_cpu_s.unwrap_or(f64::NAN) / idle.elapsed.as_secs_f64();
    Ok(vec![
        ("startup to all listening, s", startup.as_secs_f64()),
        ("attach all front ends, s", attach.as_secs_f64()),
        ("CPU all idle, %", cpu_pct),
        ("RSS all attached, MiB", rss_kib / 1024.0),
        ("threads", threads),
        ("QD1 kIOPS alone", alone.iops() / 1e3),
        ("QD1 kIOPS beside idle", beside.iops() / 1e3),
        ("QD1 beside/alone", beside.iops() / alone.iops().max(1e-9)),
        ("QD1 p50 us alone", p50(&alone)),
        ("QD1 p50 us beside idle", p50(&beside)),
    ])
}

/// pollblk serving every disk from a config file, as an operator's would.
fn pollblk_command(
    setup: &Comparison,
    disks: usize,
    dir: &Path,
    pattern: &str,
) -> Result<Command, String> {
    let config = dir.join("disks.toml");
    let mut text = format!(
        "stats-dir = \"{}\"\ncontrol = \"{}\"\n",
        dir.join("stats").display(),
        dir.join("control.sock").display()
    );
    for i in 0..disks {
        text += &format!(
            "[[export]]\nspec = \"vhost-user-blk,socket={},null,size=64M,read-zeroes=off,\
             num-queues=1\"\n",
            idle::socket_of(pattern, i).display()
        );
    }
    std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut command = Command::new(setup.pollblk);
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--cores", &setup.target_core.to_string()]);
    Ok(command)
}

/// qemu-storage-daemon with a null-co node and a vhost-user-blk export per disk, one process.
fn qsd_command(setup: &Comparison, disks: usize, pattern: &str) -> Command {
    let mut command = Command::new(setup.qsd);
    for i in 0..disks {
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=null-co,node-name=n{i},size={},read-zeroes=off",
                64 << 20
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={},\
                 writable=on,num-queues=1",
                idle::socket_of(pattern, i).display()
            ));
    }
    command
}

/// VmRSS in KiB and the thread count, from /proc/PID/status.
fn rss_and_threads(pid: u32) -> Result<(f64, f64), String> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let field = |name: &str| -> Result<f64, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{}: no {name}", path.display()))
    };
    Ok((field("VmRSS:")?, field("Threads:")?))
}

/// Raises this process's soft open-files limit to the hard one: a thousand front ends hold
/// four files each here, and the daemons started from here inherit the limit.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
