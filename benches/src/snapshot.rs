//! The `snapshot` group of `compare`: the thin pool's snapshots, clones and images, on
//! tmpfs (/dev/shm) so that no device bounds the figures. Each row sets pollblk against a
//! reference measured alternately in the same run (the `reference` column):
//!
//! - Snapshot of a served volume mapped in full (`--snapshot-size`, 64 GiB by default: every
//!   64 KiB block mapped, 4 KiB of data in each) while a 4k random-write QD1 load runs: the
//!   control call's time, how long the volume's changes were held, and the load's slowest
//!   write, against the same load without a snapshot.
//! - Reads of a clone of that volume against reads of the volume (4k randread QD32).
//! - First writes to a fresh clone (every block shared: each first write copies its block)
//!   against first writes to a fresh empty volume of the same size (4k randwrite QD32).
//! - 100 clones of an image mapped in full (`--image-size`, 10 GiB by default) through the
//!   control socket, against 100 `qemu-img create -f qcow2 -b IMAGE` overlays; the pool's
//!   growth (metadata files, data blocks used).
//! - Import of a half-sparse raw image (`--import-size`, 4 GiB by default; 1 MiB of random
//!   data, then a 1 MiB hole, repeated) with `pollblk pool volume import`, against
//!   `cp --sparse=always` of the same file followed by a `sync` of the copy (import ends with
//!   its data durable).

use crate::compare::{median, stop};
use crate::daemons::{spawn_pinned, wait_listening, Comparison};
use crate::load::{self, DriverKind, LoadResult, LoadSpec, Pattern};
use pollblk_engine::thin::{Pool, DEFAULT_BLOCK_SIZE};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

/// Sizes of the group's volumes and images.
pub struct Sizes {
    pub snapshot: u64,
    pub image: u64,
    pub import: u64,
}

/// Clones made per run of the clone row.
const CLONES: usize = 100;

/// One run's figures: (metric, pollblk's value, the reference's value).
type Sample = Vec<(&'static str, f64, f64)>;

/// Runs the group; returns compare's summary rows.
pub fn run(setup: &Comparison, sizes: &Sizes) -> Result<Vec<Value>, String> {
    let dir = PathBuf::from(format!(
        "/dev/shm/pollblk-compare-{}-snapshot",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let outcome = run_in(setup, sizes, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn run_in(setup: &Comparison, sizes: &Sizes, dir: &Path) -> Result<Vec<Value>, String> {
    let pool = dir.join("pool");
    let err = |e: &dyn std::fmt::Display| format!("snapshot group: {e}");
    {
        let p = Pool::create(
            &pool,
            3 * sizes.snapshot + 2 * sizes.image,
            DEFAULT_BLOCK_SIZE,
        )
        .map_err(|e| err(&e))?;
        eprintln!(
            "compare: snapshot group: mapping {} GiB in full",
            sizes.snapshot >> 30
        );
        fill(&p, "origin", sizes.snapshot).map_err(|e| err(&e))?;
    }
    let mut rows = Vec::new();
    let w = "snapshot: served volume mapped in full, 4k randwrite QD1 (reference: no snapshot)";
    rows.extend(summary(
        w,
        &repeat(setup, w, || snapshot_run(setup, &pool))?,
    ));
    {
        let p = Pool::open(&pool).map_err(|e| err(&e))?;
        p.volume_snapshot("origin", "gold").map_err(|e| err(&e))?;
        p.volume_clone("gold", "clone").map_err(|e| err(&e))?;
    }
    let w = "snapshot: clone 4k randread QD32 (reference: its origin)";
    rows.extend(summary(w, &repeat(setup, w, || clone_reads(setup, &pool))?));
    let w = "snapshot: first writes to a clone, 4k randwrite QD32 (reference: a new volume)";
    rows.extend(summary(
        w,
        &repeat(setup, w, || first_writes(setup, &pool, sizes.snapshot))?,
    ));
    let w = "snapshot: 100 clones of an image (reference: qemu-img create -b)";
    rows.extend(summary(
        w,
        &clones(setup, &pool, dir, sizes.image, w).map_err(|e| err(&e))?,
    ));
    let w = "snapshot: import of a half-sparse raw image (reference: cp --sparse=always)";
    rows.extend(summary(w, &imports(setup, dir, sizes.import, w)?));
    Ok(rows)
}

/// Maps every block of a new volume `name` of `size` bytes, with 4 KiB of data in each.
fn fill(pool: &Pool, name: &str, size: u64) -> Result<(), pollblk_engine::thin::ThinError> {
    let v = pool.volume_create(name, size)?;
    let bs = u64::from(pool.block_size());
    let mut page = [0u8; 4096];
    for b in 0..size / bs {
        page[..8].copy_from_slice(&(b + 1).to_le_bytes());
        pool.write(&v, b * bs, &page)?;
    }
    pool.flush()
}

/// `setup.pairs` runs of `one`.
fn repeat(
    setup: &Comparison,
    workload: &str,
    mut one: impl FnMut() -> Result<Sample, String>,
) -> Result<Vec<Sample>, String> {
    (0..setup.pairs)
        .map(|pair| {
            eprintln!("compare: {workload} (pair {}/{})", pair + 1, setup.pairs);
            one().map_err(|e| format!("{workload}: {e}"))
        })
        .collect()
}

/// Per metric: medians of pollblk and the reference, and their ratio.
fn summary(workload: &str, samples: &[Sample]) -> Vec<Value> {
    let Some(first) = samples.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|m| {
            let metric = first[m].0;
            let mut ours: Vec<f64> = samples.iter().map(|s| s[m].1).collect();
            let mut theirs: Vec<f64> = samples.iter().map(|s| s[m].2).collect();
            let (ours, theirs) = (median(&mut ours), median(&mut theirs));
            let mut ratios = serde_json::Map::new();
            if let (Some(a), Some(b)) = (ours, theirs) {
                if b > 0.0 {
                    ratios.insert("pollblk/reference".into(), json!(a / b));
                }
            }
            json!({
                "workload": workload,
                "metric": metric,
                "medians": { "pollblk": ours, "reference": theirs },
                "ratios": ratios,
            })
        })
        .collect()
}

/// A pollblk serving `volumes` of `pool` (socket DIR/VOLUME.sock each) with a control
/// socket, on the target core; stopped when dropped.
struct Served {
    child: Child,
    control: PathBuf,
    dir: PathBuf,
}

impl Served {
    fn start(setup: &Comparison, pool: &Path, volumes: &[&str]) -> Result<Served, String> {
        let dir = setup.dir.to_path_buf();
        let control = dir.join("snapshot-control.sock");
        let _ = std::fs::remove_file(&control);
        let mut command = Command::new(setup.pollblk);
        command
            .arg("serve")
            .args(["--cores", &setup.target_core.to_string()])
            .arg("--stats-dir")
            .arg(dir.join("snapshot-stats"))
            .arg("--control")
            .arg(&control);
        for v in volumes {
            let socket = dir.join(format!("{v}.sock"));
            let _ = std::fs::remove_file(&socket);
            command.arg("--export").arg(format!(
                "vhost-user-blk,socket={},pool={},volume={v},num-queues=1",
                socket.display(),
                pool.display()
            ));
        }
        let mut child = spawn_pinned(&mut command, setup.target_core, &dir)?;
        if let Err(e) = wait_listening(&mut child, &control) {
            stop(&mut child);
            return Err(e);
        }
        Ok(Served {
            child,
            control,
            dir,
        })
    }

    fn socket(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.sock"))
    }

    /// One JSON-RPC call on the control socket.
    fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        rpc(&self.control, method, params)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn rpc(control: &Path, method: &str, params: Value) -> Result<Value, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(control)
        .map_err(|e| format!("{}: {e}", control.display()))?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(stream, "{request}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let reply: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
    match reply.get("error") {
        Some(e) => Err(format!("{method}: {e}")),
        None => Ok(reply["result"].clone()),
    }
}

fn spec(setup: &Comparison, socket: PathBuf, pattern: Pattern, depth: usize) -> LoadSpec {
    LoadSpec {
        socket,
        pattern,
        bs: 4096,
        iodepth: depth,
        queues: 1,
        runtime: setup.runtime,
        ramp: setup.ramp,
        target_pid: None,
        depths: Vec::new(),
    }
}

fn slowest_ms(r: &LoadResult) -> f64 {
    r.latency_ns.max() as f64 / 1e6
}

/// The QD1 write load on the origin without a snapshot, then with one taken halfway.
fn snapshot_run(setup: &Comparison, pool: &Path) -> Result<Sample, String> {
    let served = Served::start(setup, pool, &["origin"])?;
    let load = spec(setup, served.socket("origin"), Pattern::RandWrite, 1);
    let without = load::run(&load, DriverKind::Lean)?;
    let halfway = setup.ramp + setup.runtime / 2;
    let control = served.control.clone();
    let pool_name = pool.display().to_string();
    let taker = std::thread::spawn(move || {
        std::thread::sleep(halfway);
        let started = Instant::now();
        let params = json!({"pool": pool_name, "volume": "origin", "snapshot": "s"});
        let reply = rpc(&control, "volume_snapshot", params);
        reply.map(|r| (started.elapsed(), r["paused_us"].as_f64().unwrap_or(0.0)))
    });
    let with = load::run(&load, DriverKind::Lean);
    let (call, paused_us) = taker.join().expect("snapshot thread")?;
    let with = with?;
    served.call(
        "volume_delete",
        json!({"pool": pool.display().to_string(), "volume": "s"}),
    )?;
    Ok(vec![
        ("slowest write ms", slowest_ms(&with), slowest_ms(&without)),
        ("write kIOPS", with.iops() / 1e3, without.iops() / 1e3),
        ("snapshot call ms", call.as_secs_f64() * 1e3, 0.0),
        ("writes held ms", paused_us / 1e3, 0.0),
    ])
}

/// Random reads of the clone and of its origin, in turn.
fn clone_reads(setup: &Comparison, pool: &Path) -> Result<Sample, String> {
    let served = Served::start(setup, pool, &["origin", "clone"])?;
    let run = |v: &str| {
        load::run(
            &spec(setup, served.socket(v), Pattern::RandRead, 32),
            DriverKind::Lean,
        )
    };
    let (clone, origin) = (run("clone")?, run("origin")?);
    Ok(vec![
        ("kIOPS", clone.iops() / 1e3, origin.iops() / 1e3),
        (
            "p99 latency us",
            clone.latency_ns.value_at_quantile(0.99) as f64 / 1e3,
            origin.latency_ns.value_at_quantile(0.99) as f64 / 1e3,
        ),
    ])
}

/// Random first writes to a fresh clone of `gold` and to a fresh volume, in turn.
fn first_writes(setup: &Comparison, pool: &Path, size: u64) -> Result<Sample, String> {
    {
        let p = Pool::open(pool).map_err(|e| e.to_string())?;
        p.volume_clone("gold", "fresh-clone")
            .map_err(|e| e.to_string())?;
        p.volume_create("fresh", size).map_err(|e| e.to_string())?;
    }
    let served = Served::start(setup, pool, &["fresh-clone", "fresh"])?;
    let run = |v: &str| {
        load::run(
            &spec(setup, served.socket(v), Pattern::RandWrite, 32),
            DriverKind::Lean,
        )
    };
    let (clone, fresh) = (run("fresh-clone"), run("fresh"));
    drop(served);
    let p = Pool::open(pool).map_err(|e| e.to_string())?;
    for v in ["fresh-clone", "fresh"] {
        p.volume_delete(v).map_err(|e| e.to_string())?;
    }
    let (clone, fresh) = (clone?, fresh?);
    Ok(vec![
        ("kIOPS", clone.iops() / 1e3, fresh.iops() / 1e3),
        (
            "p99 latency us",
            clone.latency_ns.value_at_quantile(0.99) as f64 / 1e3,
            fresh.latency_ns.value_at_quantile(0.99) as f64 / 1e3,
        ),
    ])
}

/// Bytes of the pool's metadata files (all but the data file and the lock).
fn metadata_bytes(pool: &Path) -> u64 {
    std::fs::read_dir(pool)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !matches!(e.file_name().to_str(), Some("data" | "lock")))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// 100 clones of a snapshot of an image mapped in full, made through a serving daemon's
/// control socket, against 100 qcow2 overlays of a raw file of the same size.
fn clones(
    setup: &Comparison,
    pool: &Path,
    dir: &Path,
    size: u64,
    workload: &str,
) -> Result<Vec<Sample>, String> {
    {
        let p = Pool::open(pool).map_err(|e| e.to_string())?;
        fill(&p, "image", size).map_err(|e| e.to_string())?;
        p.volume_snapshot("image", "image-gold")
            .map_err(|e| e.to_string())?;
    }
    let raw = dir.join("image.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("{}: {e}", raw.display()))?;
    let pool_name = pool.display().to_string();
    let served = Served::start(setup, pool, &["origin"])?;
    repeat(setup, workload, || {
        let used = |s: &Served| -> Result<u64, String> {
            let status = s.call("pool_status", json!({"pool": pool_name}))?;
            Ok(status["used_bytes"].as_u64().unwrap_or(0))
        };
        let (used_before, meta_before) = (used(&served)?, metadata_bytes(pool));
        let started = Instant::now();
        for i in 0..CLONES {
            served.call(
                "volume_clone",
                json!({"pool": pool_name, "snapshot": "image-gold", "volume": format!("vm{i}")}),
            )?;
        }
        let ours = started.elapsed();
        let grown = metadata_bytes(pool) - meta_before;
        let data_grown = used(&served)? - used_before;
        for i in 0..CLONES {
            served.call(
                "volume_delete",
                json!({"pool": pool_name, "volume": format!("vm{i}")}),
            )?;
        }
        let started = Instant::now();
        for i in 0..CLONES {
            let overlay = dir.join(format!("vm{i}.qcow2"));
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&raw)
                .arg(&overlay)
                .output()
                .map_err(|e| format!("qemu-img: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
        }
        let theirs = started.elapsed();
        let overlay_bytes: u64 = (0..CLONES)
            .filter_map(|i| std::fs::metadata(dir.join(format!("vm{i}.qcow2"))).ok())
            .map(|m| m.len())
            .sum();
        for i in 0..CLONES {
            let _ = std::fs::remove_file(dir.join(format!("vm{i}.qcow2")));
        }
        Ok(vec![
            (
                "total ms",
                ours.as_secs_f64() * 1e3,
                theirs.as_secs_f64() * 1e3,
            ),
            (
                "metadata KiB",
                grown as f64 / 1024.0,
                overlay_bytes as f64 / 1024.0,
            ),
            ("data blocks KiB", data_grown as f64 / 1024.0, 0.0),
        ])
    })
}

/// Import against cp --sparse=always, alternated, of one half-sparse image.
fn imports(
    setup: &Comparison,
    dir: &Path,
    size: u64,
    workload: &str,
) -> Result<Vec<Sample>, String> {
    let image = dir.join("half-sparse.raw");
    write_half_sparse(&image, size)?;
    let pool = dir.join("import-pool");
    let pool_s = pool.display().to_string();
    run_ok(Command::new(setup.pollblk).args([
        "pool",
        "create",
        &pool_s,
        "--size",
        &(2 * size).to_string(),
    ]))?;
    let copy = dir.join("copy.raw");
    let mb = size as f64 / 1e6;
    repeat(setup, workload, || {
        let started = Instant::now();
        run_ok(
            Command::new(setup.pollblk)
                .args(["pool", "volume", "import", &pool_s, "imported", "--from"])
                .arg(&image),
        )?;
        let ours = started.elapsed();
        run_ok(
            Command::new(setup.pollblk).args(["pool", "volume", "delete", &pool_s, "imported"]),
        )?;
        let _ = std::fs::remove_file(&copy);
        let started = Instant::now();
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&image)
                .arg(&copy),
        )?;
        run_ok(Command::new("sync").arg(&copy))?;
        let theirs = started.elapsed();
        let _ = std::fs::remove_file(&copy);
        Ok(vec![(
            "MB/s",
            mb / ours.as_secs_f64(),
            mb / theirs.as_secs_f64(),
        )])
    })
}

/// `size` bytes: 1 MiB of random data, then a 1 MiB hole, repeated.
fn write_half_sparse(path: &Path, size: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let f = std::fs::File::create(path).map_err(err)?;
    f.set_len(size).map_err(err)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for at in (0..size).step_by(2 << 20) {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = (size - at).min(1 << 20) as usize;
        f.write_all_at(&chunk[..n], at).map_err(err)?;
    }
    Ok(())
}

fn run_ok(command: &mut Command) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|e| format!("{:?}: {e}", command.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?}: {}",
            command.get_program(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
