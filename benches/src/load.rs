//! The load generator: drives a vhost-user-blk socket through libblkio's poll queues the way a
//! polling guest driver would (requests kept at a fixed depth, the used ring polled, a kick
//! only when the device asks for one) and measures what comes back.
//!
//! One thread drives every queue round robin, so the generator needs one core however many
//! queues it opens. Per I/O it allocates nothing and makes no system call of its own: buffers,
//! issue timestamps and the completion array are made before the clock starts.

use hdrhistogram::Histogram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The I/O pattern (`--rw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    /// Half reads, half writes, chosen at random per I/O (fio's randrw default mix).
    RandRw,
    /// Connect and start the queues, then issue nothing: the target's idle cost.
    Idle,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandRw => "randrw",
            Pattern::Idle => "idle",
        }
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Pattern, String> {
        match s {
            "randread" => Ok(Pattern::RandRead),
            "randwrite" => Ok(Pattern::RandWrite),
            "randrw" => Ok(Pattern::RandRw),
            "idle" => Ok(Pattern::Idle),
            _ => Err(format!(
                "unknown pattern {s:?} (expected randread, randwrite, randrw or idle)"
            )),
        }
    }
}

/// One load run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub socket: PathBuf,
    pub pattern: Pattern,
    /// Bytes per I/O.
    pub bs: usize,
    /// Requests kept in flight per queue.
    pub iodepth: usize,
    pub queues: usize,
    /// Measured time, after the ramp.
    pub runtime: Duration,
    /// Time run before measuring starts (caches, first kicks, thread wake-ups).
    pub ramp: Duration,
    /// Process whose CPU time is read from /proc at the start and end of the measured time.
    pub target_pid: Option<u32>,
    /// Requests in flight per queue where they differ (`--iodepths`); empty: `iodepth` each.
    pub depths: Vec<usize>,
}

impl LoadSpec {
    /// Requests kept in flight on queue `q`.
    pub fn depth_of(&self, q: usize) -> usize {
        self.depths.get(q).copied().unwrap_or(self.iodepth)
    }

    /// The deepest queue's depth: the stride of the per-slot arrays.
    fn max_depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(self.iodepth)
    }
}

/// Most queues the generator opens (each is polled by its one thread).
pub const MAX_QUEUES: usize = 64;
/// Most requests in flight per queue.
pub const MAX_IODEPTH: usize = 4096;
/// Largest I/O size.
pub const MAX_BS: usize = 1 << 20;

/// What a run measured.
pub struct LoadResult {
    pub spec: LoadSpec,
    /// Completed I/Os in the measured time.
    pub ios: u64,
    /// The same, per queue (with --disks, per disk).
    pub ios_per_queue: Vec<u64>,
    pub writes: u64,
    /// Completions with an error, over the whole run (ramp included).
    pub errors: u64,
    /// Length of the measured time.
    pub elapsed: Duration,
    /// Completion latency in nanoseconds, measured time only.
    pub latency_ns: Histogram<u64>,
    /// The same, per queue (with --disks, per disk).
    pub latency_per_queue_ns: Vec<Histogram<u64>>,
    /// Time the generator spent in loop iterations that found completions; the rest it spent
    /// waiting on the target. ios / busy is the generator's own ceiling.
    pub busy: Duration,
    /// Target CPU seconds (user + system) in the measured time.
    pub target_cpu_s: Option<f64>,
}

impl LoadResult {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mb_per_s(&self) -> f64 {
        self.iops() * self.spec.bs as f64 / 1e6
    }

    /// I/Os per second the generator could drive if the target answered instantly.
    pub fn generator_ceiling_iops(&self) -> Option<f64> {
        (self.busy > Duration::ZERO).then(|| self.ios as f64 / self.busy.as_secs_f64())
    }

    pub fn iops_per_target_cpu_s(&self) -> Option<f64> {
        let cpu = self.target_cpu_s?;
        (cpu > 0.0).then(|| self.ios as f64 / cpu)
    }
}

/// xorshift64*: a fast, allocation-free generator for offsets and the read/write mix.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: uniform enough for offsets, no division.
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// The front end under the generator: a set of virtio-blk queues whose slot `i` owns one
/// buffer of `bs` bytes. `submit` queues a request, `commit` makes a queue's submissions
/// visible (and kicks if the device asks), `reap` returns finished slots without blocking.
pub trait Queues {
    fn submit(&mut self, queue: usize, slot: usize, write: bool, offset: u64);
    fn commit(&mut self, queue: usize) -> Result<(), String>;
    /// Fills `done` with (slot, succeeded) of finished requests; returns how many.
    fn reap(&mut self, queue: usize, done: &mut [(usize, bool)]) -> Result<usize, String>;
}

/// Which front end drives the socket (`--driver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    /// libblkio's virtio-blk-vhost-user driver with poll queues.
    Blkio,
    /// pollblk's own minimal split-ring driver (crate::lean).
    Lean,
}

impl std::str::FromStr for DriverKind {
    type Err = String;

    fn from_str(s: &str) -> Result<DriverKind, String> {
        match s {
            "blkio" => Ok(DriverKind::Blkio),
            "lean" => Ok(DriverKind::Lean),
            _ => Err(format!("unknown driver {s:?} (expected blkio or lean)")),
        }
    }
}

/// Runs one load over `count` disks (lean driver, one queue each), queue `i` on the socket
/// `pattern` names for `i`.
pub fn run_many(spec: &LoadSpec, pattern: &str, count: usize) -> Result<LoadResult, String> {
    let spec = LoadSpec {
        queues: count,
        ..spec.clone()
    };
    check(&spec)?;
    let (mut disks, capacity) = crate::many::ManyDisks::open(&spec, pattern, count)?;
    drive(&spec, &mut disks, capacity)
}

/// Refuses loads the generator was not made for.
fn check(spec: &LoadSpec) -> Result<(), String> {
    if spec.queues == 0 || spec.queues > MAX_QUEUES {
        return Err(format!("--queues must be 1..={MAX_QUEUES}"));
    }
    if spec.iodepth == 0 || spec.iodepth > MAX_IODEPTH {
        return Err(format!("--iodepth must be 1..={MAX_IODEPTH}"));
    }
    if !spec.depths.is_empty() && spec.depths.len() != spec.queues {
        return Err(format!(
            "--iodepths gives {} depth(s) for {} disk(s)",
            spec.depths.len(),
            spec.queues
        ));
    }
    if spec.depths.iter().any(|&d| d == 0 || d > MAX_IODEPTH) {
        return Err(format!("--iodepths: each must be 1..={MAX_IODEPTH}"));
    }
    if spec.bs == 0 || spec.bs > MAX_BS || !spec.bs.is_multiple_of(512) {
        return Err(format!(
            "--bs must be a multiple of 512 up to {MAX_BS} bytes"
        ));
    }
    Ok(())
}

/// Runs one load against `spec.socket`.
pub fn run(spec: &LoadSpec, driver: DriverKind) -> Result<LoadResult, String> {
    check(spec)?;
    match driver {
        DriverKind::Blkio => {
            let (mut queues, capacity) = crate::blkio_queues::BlkioQueues::open(spec)?;
            drive(spec, &mut queues, capacity)
        }
        DriverKind::Lean => {
            let (mut queues, capacity) = crate::lean::LeanQueues::open(spec)?;
            drive(spec, &mut queues, capacity)
        }
    }
}

/// Submits the next request of `slot`; returns its issue time and whether it is a write.
fn issue<Q: Queues>(
    spec: &LoadSpec,
    queues: &mut Q,
    q: usize,
    slot: usize,
    blocks: u64,
    rng: &mut Rng,
    now: Instant,
) -> (Instant, bool) {
    let write = match spec.pattern {
        Pattern::RandRead | Pattern::Idle => false,
        Pattern::RandWrite => true,
        Pattern::RandRw => rng.next() & 1 == 1,
    };
    let offset = rng.below(blocks) * spec.bs as u64;
    queues.submit(q, slot, write, offset);
    (now, write)
}

/// Keeps `iodepth` requests in flight on every queue until the time is up, measuring.
fn drive<Q: Queues>(spec: &LoadSpec, queues: &mut Q, capacity: u64) -> Result<LoadResult, String> {
    let blocks = capacity / spec.bs as u64;
    if blocks == 0 {
        return Err(format!("device of {capacity} bytes is smaller than --bs"));
    }
    let mut result = LoadResult {
        spec: spec.clone(),
        ios: 0,
        ios_per_queue: vec![0; spec.queues],
        writes: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_ns: latency_histogram(),
        latency_per_queue_ns: (0..spec.queues).map(|_| latency_histogram()).collect(),
        busy: Duration::ZERO,
        target_cpu_s: None,
    };
    if spec.pattern == Pattern::Idle {
        std::thread::sleep(spec.ramp);
        let cpu0 = target_cpu(spec.target_pid)?;
        let t0 = Instant::now();
        std::thread::sleep(spec.runtime);
        result.elapsed = t0.elapsed();
        result.target_cpu_s = cpu_delta(cpu0, target_cpu(spec.target_pid)?);
        return Ok(result);
    }

    // Slot `slot` of queue `q` is entry q * depth + slot of the per-slot arrays.
    let depth = spec.max_depth();
    let start = Instant::now();
    // Per queue and slot: when the request was issued and whether it is a write.
    let mut issued = vec![start; spec.queues * depth];
    let mut is_write = vec![false; spec.queues * depth];
    // With per-disk depths, a deep disk's completions are handled a few at a time, so the
    // generator's own loop does not stand between a shallow disk and its completions.
    let reap_limit = if spec.depths.is_empty() {
        depth
    } else {
        depth.min(8)
    };
    let mut done = vec![(0usize, false); reap_limit];
    let mut in_flight: Vec<usize> = (0..spec.queues).map(|q| spec.depth_of(q)).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    for q in 0..spec.queues {
        for slot in 0..spec.depth_of(q) {
            let at = q * depth + slot;
            (issued[at], is_write[at]) = issue(spec, queues, q, slot, blocks, &mut rng, start);
        }
        queues.commit(q)?;
    }
    let measure_from = start + spec.ramp;
    let end = measure_from + spec.runtime;
    let mut measuring = false;
    let mut cpu0 = None;
    let mut t0 = start;
    let mut iteration_start = start;
    let mut last_busy = false;
    loop {
        let now = Instant::now();
        if last_busy && measuring {
            result.busy += now - iteration_start;
        }
        iteration_start = now;
        if !measuring && now >= measure_from {
            measuring = true;
            cpu0 = target_cpu(spec.target_pid)?;
            t0 = now;
        }
        if now >= end {
            result.elapsed = now - t0;
            result.target_cpu_s = cpu_delta(cpu0, target_cpu(spec.target_pid)?);
            break;
        }
        last_busy = false;
        for q in 0..spec.queues {
            let n = queues.reap(q, &mut done)?;
            if n == 0 {
                continue;
            }
            last_busy = true;
            let finished = Instant::now();
            for &(slot, ok) in &done[..n] {
                result.errors += u64::from(!ok);
                if measuring {
                    result.ios += 1;
                    result.ios_per_queue[q] += 1;
                    result.writes += u64::from(is_write[q * depth + slot]);
                    let ns = (finished - issued[q * depth + slot]).as_nanos() as u64;
                    result.latency_ns.saturating_record(ns);
                    result.latency_per_queue_ns[q].saturating_record(ns);
                }
                let at = q * depth + slot;
                (issued[at], is_write[at]) =
                    issue(spec, queues, q, slot, blocks, &mut rng, finished);
            }
            queues.commit(q)?;
        }
    }
    // Let every request still in flight finish, so the target sees an orderly end.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (q, left) in in_flight.iter_mut().enumerate() {
        while *left > 0 {
            let n = queues.reap(q, &mut done)?;
            result.errors += done[..n].iter().filter(|(_, ok)| !ok).count() as u64;
            *left -= n;
            if Instant::now() > deadline {
                return Err("the target did not complete the last requests in 10 s".into());
            }
        }
    }
    Ok(result)
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds")
}

/// User + system CPU seconds of `pid` so far, from /proc/PID/stat.
pub fn target_cpu(pid: Option<u32>) -> Result<Option<f64>, String> {
    let Some(pid) = pid else { return Ok(None) };
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name (which may hold spaces) start at field 3, state;
    // utime and stime are fields 14 and 15 (proc(5)).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: unexpected format"))
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Some((ticks(11)? + ticks(12)?) as f64 / hz))
}

fn cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}
