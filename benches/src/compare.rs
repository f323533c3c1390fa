//! `pollblk-bench compare`: pollblk and qemu-storage-daemon on the same loads, the same
//! backends and the same cores, run alternately (A B A B ...) so drift on a noisy machine hits
//! both alike; medians and ratios in one table. A host fio run on the same file gives the
//! ceiling of the file backend.
//!
//! Each run starts its target fresh, pinned to the target core, while the generator runs
//! pinned to the other core; the target is stopped before the next run starts.

use crate::load::{self, DriverKind, LoadResult, LoadSpec, Pattern};
use crate::{parse_size, report, seconds};
use clap::Args;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct CompareArgs {
    /// pollblk binary (default: the one next to this program).
    #[arg(long, value_name = "PATH")]
    pollblk: Option<PathBuf>,
    /// Another pollblk build (e.g. the previous commit's) for the `baseline` group, which
    /// runs it against this one (it gets no --stats-dir, so builds before it work).
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// ceph.conf of a cluster for the `rbd` group (e.g. from tests/ceph/cluster.sh start);
    /// pollblk must be built with --features rbd, qemu-storage-daemon needs qemu-block-extra.
    #[arg(long, value_name = "PATH")]
    ceph_conf: Option<PathBuf>,
    /// The RBD image the `rbd` group serves (written in full once before the runs).
    #[arg(long, value_name = "POOL/IMAGE", default_value = "rbd/img")]
    rbd_image: String,
    /// qemu-storage-daemon binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// fio binary, for the host ceiling of the file backend.
    #[arg(long, value_name = "PATH", default_value = "fio")]
    fio: PathBuf,
    /// Directory for sockets and the test file (default: a new one under the temp dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// A-B pairs per workload; medians are taken over them.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Size of the null volume and of the test file (written in full before the runs).
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    size: u64,
    /// Core the target daemon (or host fio) runs on.
    #[arg(long, default_value_t = 0)]
    target_core: usize,
    /// Core the generator runs on.
    #[arg(long, default_value_t = 1)]
    bench_core: usize,
    /// Workload groups to run: null, file, file-shm, thin, stats, idle, scale, qos, snapshot,
    /// baseline, rbd
    /// (default: all but baseline and rbd, which need --baseline and --ceph-conf).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    only: Vec<String>,
    /// Disks the `scale` group serves from one daemon (all but one attached idle).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    scale_disks: usize,
    /// The `snapshot` group's served volume, mapped in full (on /dev/shm: 4 KiB per block).
    #[arg(long, default_value = "64g", value_parser = parse_size)]
    snapshot_size: u64,
    /// The `snapshot` group's image that 100 clones are made of.
    #[arg(long, default_value = "10g", value_parser = parse_size)]
    image_size: u64,
    /// The `snapshot` group's half-sparse raw image to import.
    #[arg(long, default_value = "4g", value_parser = parse_size)]
    import_size: u64,
    /// Generator front end: lean (pollblk-bench's own minimal driver) or blkio (libblkio).
    #[arg(long, default_value = "lean")]
    driver: DriverKind,
    /// Print JSON instead of the table.
    #[arg(long, conflicts_with = "markdown")]
    json: bool,
    /// Print the table as Markdown (as BENCHMARKS.md quotes it).
    #[arg(long)]
    markdown: bool,
}

/// What serves the load in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Pollblk,
    /// pollblk with `--poll-mode poll`: what adaptive mode is measured against.
    PollblkPoll,
    /// pollblk serving a thin volume (Backend::Thin), against pollblk on the raw file.
    PollblkThin,
    /// pollblk while `pollblk stats --watch 0.1` reads every statistics file at 10 Hz.
    PollblkStatsReader,
    /// The `--baseline` pollblk build.
    Baseline,
    /// The `--baseline` pollblk build serving the thin volume.
    BaselineThin,
    /// `rbd bench` on the same image: the cluster's own ceiling, no virtualization layer.
    RbdBench,
    Qsd,
    /// fio with io_uring on the host file: the ceiling of the file backend.
    HostFio,
}

impl Target {
    /// Whether it serves the thin volume of a Backend::Thin row (else the raw file).
    fn is_thin(self) -> bool {
        matches!(self, Target::PollblkThin | Target::BaselineThin)
    }

    fn name(self) -> &'static str {
        match self {
            Target::Pollblk => "pollblk",
            Target::PollblkPoll => "pollblk-poll",
            Target::PollblkThin => "pollblk-thin",
            Target::PollblkStatsReader => "pollblk+reader",
            Target::Baseline => "baseline",
            Target::BaselineThin => "baseline-thin",
            Target::RbdBench => "rbd-bench",
            Target::Qsd => "qsd",
            Target::HostFio => "host-fio",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// A null volume on both sides; `read_zeroes` as QEMU's null-co option of that name
    /// (pollblk's null takes the same option): on, every read zeroes the guest buffer.
    Null { read_zeroes: bool },
    /// The same raw file for all targets; `shm` puts it on tmpfs (/dev/shm), where no device
    /// bounds the figures and the software path of each target shows.
    File { shm: bool },
    /// On tmpfs: a thin volume (pollblk-thin) against a raw file of its size (pollblk). With
    /// `first_write` both start empty every run (a fresh pool, a sparse file); without, the
    /// volume is mapped in full and the file written in full once.
    Thin { first_write: bool },
    /// The `--rbd-image` of the `--ceph-conf` cluster, for every target.
    Rbd,
}

#[derive(Clone, Copy, Debug)]
enum Metric {
    IopsK,
    LatP50Us,
    LatP99Us,
    IopsPerCpuSK,
    /// Target CPU time per second of wall time, in percent of one core.
    CpuPct,
    GeneratorCeilingK,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::IopsK => "kIOPS",
            Metric::LatP50Us => "p50 latency us",
            Metric::LatP99Us => "p99 latency us",
            Metric::IopsPerCpuSK => "kIOPS per target CPU-s",
            Metric::CpuPct => "target CPU % of a core",
            Metric::GeneratorCeilingK => "generator ceiling kIOPS",
        }
    }
}

struct Workload {
    group: &'static str,
    backend: Backend,
    pattern: Pattern,
    iodepth: usize,
    targets: &'static [Target],
    metrics: &'static [Metric],
}

impl Workload {
    fn name(&self) -> String {
        let backend = match self.backend {
            Backend::Null { read_zeroes: false } => "null",
            Backend::Null { read_zeroes: true } => "null read-zeroes",
            Backend::File { shm: false } => "file",
            Backend::File { shm: true } => "file on tmpfs",
            Backend::Thin { first_write: false } => "thin vs raw, mapped,",
            Backend::Thin { first_write: true } => "thin vs raw, first writes,",
            Backend::Rbd => "rbd",
        };
        if self.pattern == Pattern::Idle {
            format!("{backend} idle, front end connected")
        } else {
            format!("{backend} 4k {} QD{}", self.pattern.name(), self.iodepth)
        }
    }
}

const NULL: Backend = Backend::Null { read_zeroes: false };

const WORKLOADS: &[Workload] = &[
    Workload {
        group: "null",
        backend: NULL,
        pattern: Pattern::RandRead,
        iodepth: 1,
        targets: &[Target::Pollblk, Target::Qsd],
        metrics: &[Metric::LatP50Us, Metric::LatP99Us, Metric::IopsK],
    },
    Workload {
        group: "null",
        backend: NULL,
        pattern: Pattern::RandRead,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::Qsd, Target::PollblkPoll],
        metrics: &[
            Metric::IopsK,
            Metric::IopsPerCpuSK,
            Metric::CpuPct,
            Metric::GeneratorCeilingK,
        ],
    },
    Workload {
        group: "null",
        backend: NULL,
        pattern: Pattern::RandWrite,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::Qsd],
        metrics: &[Metric::IopsK, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "null",
        backend: Backend::Null { read_zeroes: true },
        pattern: Pattern::RandRead,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::Qsd],
        metrics: &[Metric::IopsK, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "file",
        backend: Backend::File { shm: false },
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::Qsd, Target::HostFio],
        metrics: &[Metric::IopsK, Metric::LatP99Us, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "file",
        backend: Backend::File { shm: false },
        pattern: Pattern::RandRead,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::Qsd, Target::HostFio],
        metrics: &[Metric::IopsK, Metric::LatP99Us, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "file-shm",
        backend: Backend::File { shm: true },
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::Qsd, Target::HostFio],
        metrics: &[Metric::IopsK, Metric::LatP99Us, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "file-shm",
        backend: Backend::File { shm: true },
        pattern: Pattern::RandRead,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::Qsd, Target::HostFio],
        metrics: &[Metric::IopsK, Metric::LatP99Us, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "thin",
        backend: Backend::Thin { first_write: false },
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::PollblkThin],
        metrics: &[Metric::IopsK, Metric::LatP99Us],
    },
    Workload {
        group: "thin",
        backend: Backend::Thin { first_write: false },
        pattern: Pattern::RandWrite,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::PollblkThin],
        metrics: &[Metric::IopsK, Metric::LatP99Us],
    },
    Workload {
        group: "thin",
        backend: Backend::Thin { first_write: true },
        pattern: Pattern::RandWrite,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::PollblkThin],
        metrics: &[Metric::IopsK, Metric::LatP99Us],
    },
    Workload {
        group: "stats",
        backend: NULL,
        pattern: Pattern::RandRead,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::PollblkStatsReader],
        metrics: &[Metric::IopsK, Metric::IopsPerCpuSK, Metric::LatP99Us],
    },
    Workload {
        group: "stats",
        backend: Backend::File { shm: true },
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::PollblkStatsReader],
        metrics: &[Metric::IopsK, Metric::LatP99Us],
    },
    Workload {
        group: "baseline",
        backend: NULL,
        pattern: Pattern::RandRead,
        iodepth: 1,
        targets: &[Target::Pollblk, Target::Baseline],
        metrics: &[Metric::LatP50Us, Metric::LatP99Us],
    },
    Workload {
        group: "baseline",
        backend: NULL,
        pattern: Pattern::RandRead,
        iodepth: 128,
        targets: &[Target::Pollblk, Target::Baseline],
        metrics: &[Metric::IopsK, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "baseline",
        backend: Backend::File { shm: true },
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::Baseline],
        metrics: &[Metric::IopsK, Metric::LatP99Us],
    },
    Workload {
        group: "baseline",
        backend: Backend::Thin { first_write: false },
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::PollblkThin, Target::BaselineThin],
        metrics: &[Metric::IopsK, Metric::LatP99Us],
    },
    Workload {
        group: "rbd",
        backend: Backend::Rbd,
        pattern: Pattern::RandRead,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::Qsd, Target::RbdBench],
        metrics: &[Metric::IopsK, Metric::LatP99Us, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "rbd",
        backend: Backend::Rbd,
        pattern: Pattern::RandWrite,
        iodepth: 32,
        targets: &[Target::Pollblk, Target::Qsd, Target::RbdBench],
        metrics: &[Metric::IopsK, Metric::LatP99Us, Metric::IopsPerCpuSK],
    },
    Workload {
        group: "idle",
        backend: NULL,
        pattern: Pattern::Idle,
        iodepth: 1,
        targets: &[Target::Pollblk, Target::Qsd],
        metrics: &[Metric::CpuPct],
    },
];

/// What one run measured, whatever the target.
struct Sample {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_s: Option<f64>,
    elapsed_s: f64,
    generator_ceiling: Option<f64>,
    raw: Value,
}

impl Sample {
    fn from_load(r: &LoadResult) -> Sample {
        Sample {
            iops: r.iops(),
            p50_us: r.latency_ns.value_at_quantile(0.5) as f64 / 1e3,
            p99_us: r.latency_ns.value_at_quantile(0.99) as f64 / 1e3,
            cpu_s: r.target_cpu_s,
            elapsed_s: r.elapsed.as_secs_f64(),
            generator_ceiling: r.generator_ceiling_iops(),
            raw: report::to_json(r),
        }
    }

    fn metric(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::IopsK => Some(self.iops / 1e3),
            Metric::LatP50Us => Some(self.p50_us).filter(|v| !v.is_nan()),
            Metric::LatP99Us => Some(self.p99_us).filter(|v| !v.is_nan()),
            Metric::IopsPerCpuSK => {
                let cpu = self.cpu_s?;
                (cpu > 0.0).then(|| self.iops * self.elapsed_s / cpu / 1e3)
            }
            Metric::CpuPct => Some(100.0 * self.cpu_s? / self.elapsed_s),
            Metric::GeneratorCeilingK => Some(self.generator_ceiling? / 1e3),
        }
    }
}

/// Everything a run needs besides the workload.
struct Setup {
    args: CompareArgs,
    pollblk: PathBuf,
    dir: PathBuf,
    file: PathBuf,
    shm_file: PathBuf,
    /// tmpfs directory of the thin rows' pools and raw files.
    thin_dir: PathBuf,
    /// Whether the mapped thin volume and its raw file are made (once per compare).
    thin_ready: std::cell::Cell<bool>,
    runtime: Duration,
    ramp: Duration,
}

/// Size of the first-write rows' volume and raw file (sparse; 1 M blocks of 64 KiB).
const FIRST_WRITE_VOLUME: u64 = 64 << 30;

/// Makes the thin rows' volumes: for first writes, an empty pool or sparse file before every
/// run; otherwise, once, a volume mapped in full and a raw file written in full.
fn prepare_thin(setup: &Setup, first_write: bool, target: Target) -> Result<(), String> {
    use pollblk_engine::thin::{Pool, DEFAULT_BLOCK_SIZE};
    let (raw, pool_dir) = setup.thin_paths(first_write);
    // First writes need room to stay first writes for the whole run: a volume (and a sparse
    // file) so large that random 4 KiB writes rarely land in a block already taken.
    let size = if first_write {
        FIRST_WRITE_VOLUME
    } else {
        setup.args.size
    };
    let err = |e: &dyn std::fmt::Display| format!("preparing the thin rows: {e}");
    std::fs::create_dir_all(&setup.thin_dir).map_err(|e| err(&e))?;
    let make_pool = || -> Result<Pool, String> {
        let _ = std::fs::remove_dir_all(&pool_dir);
        let pool = Pool::create(&pool_dir, 2 * size, DEFAULT_BLOCK_SIZE).map_err(|e| err(&e))?;
        pool.volume_create("v", size).map_err(|e| err(&e))?;
        Ok(pool)
    };
    if first_write {
        if target.is_thin() {
            make_pool()?;
        } else {
            let f = std::fs::File::create(&raw).map_err(|e| err(&e))?;
            f.set_len(size).map_err(|e| err(&e))?;
        }
        return Ok(());
    }
    if setup.thin_ready.get() {
        return Ok(());
    }
    write_test_file(&raw, size)?;
    let pool = make_pool()?;
    let v = pool.volume("v").map_err(|e| err(&e))?;
    let data = std::fs::read(&raw).map_err(|e| err(&e))?;
    for (i, chunk) in data.chunks(DEFAULT_BLOCK_SIZE as usize).enumerate() {
        pool.write(&v, (i * DEFAULT_BLOCK_SIZE as usize) as u64, chunk)
            .map_err(|e| err(&e))?;
    }
    pool.flush().map_err(|e| err(&e))?;
    setup.thin_ready.set(true);
    Ok(())
}

impl Setup {
    /// (raw file, pool directory) of the thin rows.
    fn thin_paths(&self, first_write: bool) -> (PathBuf, PathBuf) {
        let tag = if first_write { "empty" } else { "full" };
        (
            self.thin_dir.join(format!("raw-{tag}.img")),
            self.thin_dir.join(format!("pool-{tag}")),
        )
    }

    fn ceph_conf(&self) -> &Path {
        self.args
            .ceph_conf
            .as_deref()
            .expect("rbd workloads run only with --ceph-conf")
    }

    fn rbd_pool_image(&self) -> (&str, &str) {
        self.args
            .rbd_image
            .split_once('/')
            .unwrap_or(("rbd", &self.args.rbd_image))
    }

    /// `rbd -c CONF ARGS`, its stdout.
    fn rbd(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(self.ceph_conf())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run rbd: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rbd {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn file_for(&self, backend: Backend) -> &Path {
        match backend {
            Backend::File { shm: true } => &self.shm_file,
            _ => &self.file,
        }
    }
}

pub fn run(args: CompareArgs) -> Result<bool, String> {
    if args.pairs == 0 {
        return Err("--pairs must be at least 1".into());
    }
    if args.size < 1 << 20 || !args.size.is_multiple_of(4096) {
        return Err("--size must be at least 1m and a multiple of 4k".into());
    }
    let known = [
        "null", "file", "file-shm", "thin", "stats", "idle", "scale", "qos", "snapshot",
        "baseline", "rbd",
    ];
    if let Some(bad) = args.only.iter().find(|g| !known.contains(&g.as_str())) {
        return Err(format!(
            "--only: unknown group {bad:?} (expected {known:?})"
        ));
    }
    if args.only.iter().any(|g| g == "baseline") && args.baseline.is_none() {
        return Err("--only baseline needs --baseline PATH".into());
    }
    if args.only.iter().any(|g| g == "rbd") && args.ceph_conf.is_none() {
        return Err("--only rbd needs --ceph-conf PATH".into());
    }
    let pollblk = match &args.pollblk {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program: {e}"))?
            .with_file_name("pollblk"),
    };
    for (what, path) in [("pollblk", &pollblk), ("qemu-storage-daemon", &args.qsd)] {
        which(path).ok_or_else(|| format!("{what} not found at {}", path.display()))?;
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("pollblk-compare-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !core_affinity::set_for_current(core_affinity::CoreId {
        id: args.bench_core,
    }) {
        return Err(format!(
            "cannot pin the generator to core {}",
            args.bench_core
        ));
    }
    let setup = Setup {
        file: dir.join("compare.img"),
        shm_file: PathBuf::from(format!(
            "/dev/shm/pollblk-compare-{}.img",
            std::process::id()
        )),
        thin_dir: PathBuf::from(format!(
            "/dev/shm/pollblk-compare-{}-thin",
            std::process::id()
        )),
        thin_ready: std::cell::Cell::new(false),
        runtime: seconds(args.runtime, "--runtime")?,
        ramp: seconds(args.ramp, "--ramp")?,
        pollblk,
        dir,
        args,
    };
    let selected: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| {
            if setup.args.only.is_empty() {
                match w.group {
                    "baseline" => setup.args.baseline.is_some(),
                    "rbd" => setup.args.ceph_conf.is_some(),
                    _ => true,
                }
            } else {
                setup.args.only.iter().any(|g| g == w.group)
            }
        })
        .collect();
    if selected
        .iter()
        .any(|w| w.backend == Backend::File { shm: false })
    {
        write_test_file(&setup.file, setup.args.size)?;
    }
    if selected
        .iter()
        .any(|w| w.backend == Backend::File { shm: true })
    {
        write_test_file(&setup.shm_file, setup.args.size)?;
    }
    if selected.iter().any(|w| w.backend == Backend::Rbd) {
        fill_rbd_image(&setup)?;
    }
    let outcome = run_all(&setup, &selected);
    let _ = std::fs::remove_file(&setup.shm_file);
    let _ = std::fs::remove_dir_all(&setup.thin_dir);
    if setup.args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&setup.dir);
    }
    outcome
}

fn run_all(setup: &Setup, selected: &[&Workload]) -> Result<bool, String> {
    let mut runs = Vec::new();
    let mut errors = 0;
    // samples[w][t] = one sample per pair.
    let mut samples: Vec<Vec<Vec<Sample>>> = selected
        .iter()
        .map(|w| w.targets.iter().map(|_| Vec::new()).collect())
        .collect();
    for (wi, workload) in selected.iter().enumerate() {
        for pair in 0..setup.args.pairs {
            for (ti, &target) in workload.targets.iter().enumerate() {
                if target == Target::HostFio && which(&setup.args.fio).is_none() {
                    continue;
                }
                eprintln!(
                    "compare: {} on {} (pair {}/{})",
                    workload.name(),
                    target.name(),
                    pair + 1,
                    setup.args.pairs
                );
                let (sample, run_errors) = run_one(setup, workload, target)?;
                errors += run_errors;
                runs.push(json!({
                    "workload": workload.name(),
                    "target": target.name(),
                    "pair": pair,
                    "result": sample.raw,
                }));
                samples[wi][ti].push(sample);
            }
        }
    }
    let mut summary = summarize(selected, &samples);
    let wants =
        |group: &str| setup.args.only.is_empty() || setup.args.only.iter().any(|g| g == group);
    let comparison = crate::daemons::Comparison {
        pollblk: &setup.pollblk,
        qsd: &setup.args.qsd,
        dir: &setup.dir,
        pairs: setup.args.pairs,
        runtime: setup.runtime,
        ramp: setup.ramp,
        target_core: setup.args.target_core,
    };
    if wants("qos") {
        summary.extend(crate::qos::run(&comparison)?);
    }
    if wants("scale") {
        summary.extend(crate::scale::run(&comparison, setup.args.scale_disks)?);
    }
    if wants("snapshot") {
        let sizes = crate::snapshot::Sizes {
            snapshot: setup.args.snapshot_size,
            image: setup.args.image_size,
            import: setup.args.import_size,
        };
        summary.extend(crate::snapshot::run(&comparison, &sizes)?);
    }
    if setup.args.json {
        let out = json!({
            "machine": machine(),
            "runtime_s": setup.args.runtime,
            "pairs": setup.args.pairs,
            "target_core": setup.args.target_core,
            "bench_core": setup.args.bench_core,
            "driver": format!("{:?}", setup.args.driver).to_lowercase(),
            "summary": summary,
            "runs": runs,
        });
        println!("{out:#}");
    }
    if setup.args.markdown {
        print!("{}", markdown_table(&summary));
    }
    // With --json or --markdown the plain table still reaches the person watching, on stderr.
    print_table(&summary, setup.args.json || setup.args.markdown);
    if errors > 0 {
        eprintln!("compare: {errors} I/O error(s) across the runs");
    }
    Ok(errors == 0)
}

/// Runs one workload on one target; returns the sample and its I/O error count.
fn run_one(setup: &Setup, w: &Workload, target: Target) -> Result<(Sample, u64), String> {
    if target == Target::HostFio {
        return Ok((host_fio(setup, w)?, 0));
    }
    if target == Target::RbdBench {
        return Ok((rbd_bench(setup, w)?, 0));
    }
    if let Backend::Thin { first_write } = w.backend {
        prepare_thin(setup, first_write, target)?;
    }
    let socket = setup.dir.join(format!("{}.sock", target.name()));
    let mut daemon = start_target(setup, w, target, &socket)?;
    let mut reader = if target == Target::PollblkStatsReader {
        match start_stats_reader(setup) {
            Ok(reader) => Some(reader),
            Err(e) => {
                stop(&mut daemon);
                return Err(e);
            }
        }
    } else {
        None
    };
    let spec = LoadSpec {
        socket,
        pattern: w.pattern,
        bs: 4096,
        iodepth: w.iodepth,
        queues: 1,
        runtime: setup.runtime,
        ramp: setup.ramp,
        target_pid: Some(daemon.id()),
        depths: Vec::new(),
    };
    let result = load::run(&spec, setup.args.driver);
    if let Some(reader) = &mut reader {
        let exited = reader.try_wait().ok().flatten();
        stop(reader);
        if let Some(status) = exited {
            stop(&mut daemon);
            return Err(format!(
                "the statistics reader exited during the run ({status})"
            ));
        }
    }
    stop(&mut daemon);
    let result = result.map_err(|e| format!("{} on {}: {e}", w.name(), target.name()))?;
    Ok((Sample::from_load(&result), result.errors))
}

/// Starts a target daemon pinned to the target core and waits until its socket accepts.
fn start_target(
    setup: &Setup,
    w: &Workload,
    target: Target,
    socket: &Path,
) -> Result<Child, String> {
    let _ = std::fs::remove_file(socket);
    let mut cmd = match target {
        Target::Pollblk
        | Target::PollblkPoll
        | Target::PollblkThin
        | Target::PollblkStatsReader
        | Target::Baseline
        | Target::BaselineThin => pollblk_command(setup, w, target, socket),
        Target::Qsd => qsd_command(setup, w, socket),
        Target::HostFio | Target::RbdBench => unreachable!("not a daemon"),
    };
    let core = setup.args.target_core;
    // SAFETY: sched_setaffinity is async-signal-safe; the closure touches no shared state.
    unsafe {
        cmd.pre_exec(move || pin_self(core));
    }
    let log_path = setup.dir.join(format!("{}.log", target.name()));
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", target.name()))?;
    let stdout = child.stdout.take().expect("piped");
    // Drain stdout on a thread so a chatty daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
    wait_for_socket(&mut child, target, socket, &log_path)?;
    Ok(child)
}

/// The command line of a pollblk target (this build or the baseline).
fn pollblk_command(setup: &Setup, w: &Workload, target: Target, socket: &Path) -> Command {
    let size = setup.args.size;
    let backend = match w.backend {
        Backend::Null { read_zeroes } => {
            format!("null,size={size},read-zeroes={}", on_off(read_zeroes))
        }
        Backend::File { .. } => format!("file={}", setup.file_for(w.backend).display()),
        Backend::Rbd => format!(
            "rbd={},ceph-conf={}",
            setup.args.rbd_image,
            setup.ceph_conf().display()
        ),
        Backend::Thin { first_write } => {
            let (raw, pool) = setup.thin_paths(first_write);
            if target.is_thin() {
                format!("pool={},volume=v", pool.display())
            } else {
                format!("file={}", raw.display())
            }
        }
    };
    let mode = if target == Target::PollblkPoll {
        "poll"
    } else {
        "adaptive"
    };
    let mut cmd = match (target, &setup.args.baseline) {
        (Target::Baseline | Target::BaselineThin, Some(baseline)) => {
            let mut cmd = Command::new(baseline);
            cmd.arg("serve");
            cmd
        }
        _ => {
            let mut cmd = Command::new(&setup.pollblk);
            cmd.arg("serve")
                .arg("--stats-dir")
                .arg(setup.dir.join("stats"));
            cmd
        }
    };
    cmd.current_dir(&setup.dir)
        .args(["--cores", &setup.args.target_core.to_string()])
        .args(["--poll-mode", mode, "--export"])
        .arg(format!(
            "vhost-user-blk,socket={},{backend},num-queues=1",
            socket.display()
        ));
    cmd
}

/// The command line of qemu-storage-daemon.
fn qsd_command(setup: &Setup, w: &Workload, socket: &Path) -> Command {
    let blockdev = match w.backend {
        Backend::Null { read_zeroes } => format!(
            "driver=null-co,node-name=disk,size={},read-zeroes={}",
            setup.args.size,
            on_off(read_zeroes)
        ),
        Backend::Thin { .. } => unreachable!("thin rows compare pollblk with itself"),
        Backend::Rbd => {
            let (pool, image) = setup.rbd_pool_image();
            // cache.direct=on turns librbd's cache off, as pollblk does.
            format!(
                "driver=rbd,node-name=disk,pool={pool},image={image},conf={},\
                 cache.direct=on",
                setup.ceph_conf().display()
            )
        }
        Backend::File { .. } => format!(
            "driver=file,node-name=disk,filename={},cache.direct=on,aio=io_uring",
            setup.file_for(w.backend).display()
        ),
    };
    let mut cmd = Command::new(&setup.args.qsd);
    cmd.args(["--blockdev", &blockdev, "--export"]).arg(format!(
        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},\
         writable=on,num-queues=1",
        socket.display()
    ));
    cmd
}

/// Waits up to 10 s until a started daemon's socket accepts.
fn wait_for_socket(
    child: &mut Child,
    target: Target,
    socket: &Path,
    log_path: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{} exited at start ({status}); its log: {}",
                target.name(),
                log_path.display()
            ));
        }
        if Instant::now() > deadline {
            stop(child);
            return Err(format!(
                "{} did not listen on {} in 10 s",
                target.name(),
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The probe connection above was closed at once; give the daemon a moment to notice it
    // before the real front end connects.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// `pollblk stats DIR --watch 0.1` (a telemetry agent polling at 10 Hz) on the generator's
/// core, its output discarded.
fn start_stats_reader(setup: &Setup) -> Result<Child, String> {
    let mut cmd = Command::new(&setup.pollblk);
    cmd.arg("stats")
        .arg(setup.dir.join("stats"))
        .args(["--watch", "0.1"]);
    let core = setup.args.bench_core;
    // SAFETY: sched_setaffinity is async-signal-safe; the closure touches no shared state.
    unsafe {
        cmd.pre_exec(move || pin_self(core));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the statistics reader: {e}"))
}

/// Writes the RBD image in full once: reads of objects never written are answered without
/// touching an OSD and would measure nothing.
fn fill_rbd_image(setup: &Setup) -> Result<(), String> {
    let info: Value =
        serde_json::from_str(&setup.rbd(&["info", "--format", "json", &setup.args.rbd_image])?)
            .map_err(|e| format!("rbd info: {e}"))?;
    let size = info["size"].as_u64().ok_or("rbd info: no size")?;
    eprintln!(
        "compare: writing {} in full ({} MiB)",
        setup.args.rbd_image,
        size >> 20
    );
    setup.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-threads",
        "4",
        "--io-pattern",
        "seq",
        "--io-total",
        &size.to_string(),
        &setup.args.rbd_image,
    ])?;
    Ok(())
}

/// `rbd bench` with the workload's pattern, size and depth, pinned to the generator's core.
fn rbd_bench(setup: &Setup, w: &Workload) -> Result<Sample, String> {
    let io_type = if w.pattern == Pattern::RandWrite {
        "write"
    } else {
        "read"
    };
    // rbd bench stops after a byte count: aim at the runtime at ~15k IOPS.
    let ops = (setup.args.runtime * 15_000.0).max(1000.0) as u64;
    let started = Instant::now();
    let core = setup.args.bench_core.to_string();
    let out = Command::new("taskset")
        .args(["-c", &core, "rbd", "-c"])
        .arg(setup.ceph_conf())
        .args(["bench", "--io-type", io_type, "--io-size", "4096"])
        .args(["--io-pattern", "rand", "--io-threads"])
        .arg(w.iodepth.to_string())
        .arg("--io-total")
        .arg((ops * 4096).to_string())
        .arg(&setup.args.rbd_image)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run rbd bench: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rbd bench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // The summary line: "elapsed: 6   ops: 90000   ops/sec: 14961.2   bytes/sec: ...".
    let iops = text
        .lines()
        .find(|l| l.starts_with("elapsed:"))
        .and_then(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "ops/sec:")?;
            words.next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| format!("rbd bench printed no summary: {text}"))?;
    Ok(Sample {
        iops,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        cpu_s: None,
        elapsed_s: started.elapsed().as_secs_f64(),
        generator_ceiling: None,
        raw: json!({ "rbd_bench": text }),
    })
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

pub(crate) fn pin_self(core: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for core < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// SIGTERM, then SIGKILL if the target has not exited within 10 s.
pub(crate) fn stop(child: &mut Child) {
    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes the test file in full (holes would read as zeroes without touching the disk).
fn write_test_file(path: &Path, size: u64) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size && m.blocks() * 512 >= size) {
        return Ok(());
    }
    eprintln!("compare: writing {} ({} MiB)", path.display(), size >> 20);
    let mut f = std::fs::File::create(path).map_err(err)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    for b in chunk.chunks_mut(8) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).map_err(err)?;
        left -= n as u64;
    }
    f.sync_all().map_err(err)
}

use std::os::unix::fs::MetadataExt;

/// fio with io_uring and O_DIRECT on the test file, pinned to the generator's core.
fn host_fio(setup: &Setup, w: &Workload) -> Result<Sample, String> {
    let out = Command::new(&setup.args.fio)
        .arg("--name=ceiling")
        .arg(format!(
            "--filename={}",
            setup.file_for(w.backend).display()
        ))
        .args([
            "--ioengine=io_uring",
            "--direct=1",
            "--bs=4k",
            "--time_based",
        ])
        .arg(format!("--rw={}", w.pattern.name()))
        .arg(format!("--iodepth={}", w.iodepth))
        .arg(format!("--runtime={}s", setup.args.runtime))
        .arg(format!("--ramp_time={}s", setup.args.ramp))
        .arg(format!("--cpus_allowed={}", setup.args.bench_core))
        .arg("--output-format=json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", out.status));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio printed no JSON: {e}"))?;
    let job = &v["jobs"][0];
    let dir = if w.pattern == Pattern::RandWrite {
        &job["write"]
    } else {
        &job["read"]
    };
    let pct = |p: &str| dir["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e3;
    Ok(Sample {
        iops: dir["iops"].as_f64().ok_or("fio JSON has no iops")?,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        cpu_s: None,
        elapsed_s: setup.args.runtime,
        generator_ceiling: None,
        raw: job.clone(),
    })
}

fn which(path: &Path) -> Option<PathBuf> {
    if path.components().count() > 1 {
        return path.is_file().then(|| path.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(path))
            .find(|p| p.is_file())
    })
}

pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// One table row per workload and metric: medians per target, and pollblk's ratio to each.
fn summarize(workloads: &[&Workload], samples: &[Vec<Vec<Sample>>]) -> Vec<Value> {
    let mut rows = Vec::new();
    for (w, per_target) in workloads.iter().zip(samples) {
        for &metric in w.metrics {
            let mut medians = serde_json::Map::new();
            for (&target, s) in w.targets.iter().zip(per_target) {
                let mut values: Vec<f64> = s.iter().filter_map(|s| s.metric(metric)).collect();
                if let Some(m) = median(&mut values) {
                    medians.insert(target.name().into(), json!(m));
                }
            }
            let mut ratios = serde_json::Map::new();
            // Thin rows ask how close the thin volume comes to the raw file, stats rows how
            // close pollblk read at 10 Hz comes to pollblk unread: variant over pollblk.
            let variant = ["pollblk-thin", "pollblk+reader"]
                .into_iter()
                .find_map(|name| Some((name, medians.get(name)?.as_f64()?)));
            let raw = medians.get("pollblk").and_then(Value::as_f64);
            let baseline_thin = medians.get("baseline-thin").and_then(Value::as_f64);
            if let (Some((name, variant)), Some(before)) = (variant, baseline_thin) {
                // The baseline's thin row: this build's thin volume over the baseline's.
                if before > 0.0 {
                    ratios.insert(format!("{name}/baseline-thin"), json!(variant / before));
                }
            } else if let (Some((name, variant)), Some(raw)) = (variant, raw) {
                if raw > 0.0 {
                    ratios.insert(format!("{name}/pollblk"), json!(variant / raw));
                }
            } else if let Some(ours) = medians.get("pollblk").and_then(Value::as_f64) {
                for (name, v) in &medians {
                    match v.as_f64() {
                        Some(theirs) if name != "pollblk" && theirs > 0.0 => {
                            ratios.insert(format!("pollblk/{name}"), json!(ours / theirs));
                        }
                        _ => {}
                    }
                }
            }
            rows.push(json!({
                "workload": w.name(),
                "metric": metric.label(),
                "medians": medians,
                "ratios": ratios,
            }));
        }
    }
    rows
}

fn print_table(rows: &[Value], to_stderr: bool) {
    let mut out = String::new();
    let _ = write!(out, "{:<36} {:<24}", "workload", "metric");
    for c in COLUMNS {
        let _ = write!(out, " {c:>14}");
    }
    let _ = writeln!(out, "  ratios");
    for row in rows {
        let cell = |name: &str| format_value(row["medians"][name].as_f64());
        let ratios: Vec<String> = row["ratios"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k} {}", format_ratio(v.as_f64().unwrap_or(0.0))))
                    .collect()
            })
            .unwrap_or_default();
        let _ = write!(
            out,
            "{:<36} {:<24}",
            row["workload"].as_str().unwrap_or(""),
            row["metric"].as_str().unwrap_or("")
        );
        for c in COLUMNS {
            let _ = write!(out, " {:>14}", cell(c));
        }
        let _ = writeln!(out, "  {}", ratios.join(", "));
    }
    if to_stderr {
        eprint!("{out}");
    } else {
        print!("{out}");
    }
}

/// Column order of the tables.
const COLUMNS: [&str; 10] = [
    "pollblk",
    "qsd",
    "pollblk-poll",
    "host-fio",
    "pollblk-thin",
    "pollblk+reader",
    "baseline",
    "baseline-thin",
    "rbd-bench",
    "reference",
];

fn format_value(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() < 1.0 && v != 0.0 => format!("{v:.3}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

/// Two decimals, or three significant digits for ratios far below 1 (0.0021, not 0.00).
fn format_ratio(v: f64) -> String {
    if v >= 0.1 || v == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.2e}")
    }
}

fn markdown_table(rows: &[Value]) -> String {
    let mut out = String::from("| workload | metric |");
    for c in COLUMNS {
        let _ = write!(out, " {c} |");
    }
    out += " ratios |\n|---|---|";
    out += &"---:|".repeat(COLUMNS.len());
    out += "---|\n";
    for row in rows {
        let _ = write!(
            out,
            "| {} | {} |",
            row["workload"].as_str().unwrap_or(""),
            row["metric"].as_str().unwrap_or("")
        );
        for c in COLUMNS {
            let _ = write!(out, " {} |", format_value(row["medians"][c].as_f64()));
        }
        let ratios: Vec<String> = row["ratios"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k} {}", format_ratio(v.as_f64().unwrap_or(0.0))))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(out, " {} |", ratios.join(", "));
    }
    out
}

/// What the numbers were measured on.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // Not available_parallelism: the generator has pinned itself to one core by now.
    // SAFETY: sysconf has no memory effects.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    json!({ "cpu": cpu, "kernel": kernel, "cores": cores })
}
