//! The load generator: drives a vhost-user-blk socket through libblkio's poll queues the way a
//! polling guest driver would (requests kept at a fixed depth, the used ring polled, a kick
//! only when the device asks for one) and measures what comes back.
//!
//! One thread drives every queue round robin, so the generator needs one core however many
//! queues it opens. Per I/O it allocates nothing and makes no system call of its own: buffers,
//! issue timestamps and the completion array are made before the clock starts.

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;
use std::mem::MaybeUninit;
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
    pub writes: u64,
    /// Completions with an error, over the whole run (ramp included).
    pub errors: u64,
    /// Length of the measured time.
    pub elapsed: Duration,
    /// Completion latency in nanoseconds, measured time only.
    pub latency_ns: Histogram<u64>,
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

/// One queue's requests: slot i uses buffer i and user_data i.
struct QueueLoad {
    q: Blkioq,
    bufs: *mut u8,
    issued: Box<[Instant]>,
    is_write: Box<[bool]>,
    completions: Box<[MaybeUninit<Completion>]>,
    in_flight: usize,
}

fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {}", e.message())
}

/// Runs one load against `spec.socket`.
pub fn run(spec: &LoadSpec) -> Result<LoadResult, String> {
    if spec.queues == 0 || spec.queues > MAX_QUEUES {
        return Err(format!("--queues must be 1..={MAX_QUEUES}"));
    }
    if spec.iodepth == 0 || spec.iodepth > MAX_IODEPTH {
        return Err(format!("--iodepth must be 1..={MAX_IODEPTH}"));
    }
    if spec.bs == 0 || spec.bs > MAX_BS || !spec.bs.is_multiple_of(512) {
        return Err(format!(
            "--bs must be a multiple of 512 up to {MAX_BS} bytes"
        ));
    }
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("libblkio"))?;
    blkio
        .set_str("path", &spec.socket.to_string_lossy())
        .map_err(blkio_err("path"))?;
    blkio.connect().map_err(|e| {
        format!(
            "cannot connect to {}: {}",
            spec.socket.display(),
            e.message()
        )
    })?;
    let capacity = blkio.get_u64("capacity").map_err(blkio_err("capacity"))?;
    let max_queues = blkio
        .get_i32("max-queues")
        .map_err(blkio_err("max-queues"))?;
    if spec.queues > max_queues as usize {
        return Err(format!(
            "the device offers {max_queues} queue(s), --queues asks for {}",
            spec.queues
        ));
    }
    let blocks = capacity / spec.bs as u64;
    if blocks == 0 {
        return Err(format!("device of {capacity} bytes is smaller than --bs"));
    }
    let queue_size = spec.iodepth.next_power_of_two().max(256);
    blkio
        .set_i32("num-queues", 0)
        .and_then(|_| blkio.set_i32("num-poll-queues", spec.queues as i32))
        .and_then(|_| blkio.set_i32("queue-size", queue_size as i32))
        .map_err(blkio_err("queue setup"))?;
    let started = blkio.start().map_err(blkio_err("start"))?;

    let align = blkio
        .get_u64("mem-region-alignment")
        .map_err(blkio_err("mem-region-alignment"))? as usize;
    let per_queue = spec.iodepth * spec.bs;
    let len = (per_queue * spec.queues).div_ceil(align) * align;
    let region = blkio
        .alloc_mem_region(len)
        .map_err(blkio_err("alloc_mem_region"))?;
    blkio
        .map_mem_region(&region)
        .map_err(blkio_err("map_mem_region"))?;
    // Writes carry a non-zero pattern, so a target that drops them is not flattered by zeroes.
    // SAFETY: the region is `len` bytes of our own mapping.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xa5, len) };

    let now = Instant::now();
    let mut loads: Vec<QueueLoad> = started
        .poll_queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| QueueLoad {
            q,
            bufs: (region.addr + i * per_queue) as *mut u8,
            issued: vec![now; spec.iodepth].into_boxed_slice(),
            is_write: vec![false; spec.iodepth].into_boxed_slice(),
            completions: (0..spec.iodepth).map(|_| MaybeUninit::uninit()).collect(),
            in_flight: 0,
        })
        .collect();

    let mut result = LoadResult {
        spec: spec.clone(),
        ios: 0,
        writes: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .expect("static histogram bounds"),
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

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let start = Instant::now();
    for load in &mut loads {
        for slot in 0..spec.iodepth {
            submit(load, slot, spec, blocks, &mut rng, start);
        }
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
        for load in &mut loads {
            let n = load
                .q
                .do_io(&mut load.completions, 0, None, None)
                .map_err(blkio_err("do_io"))?;
            if n == 0 {
                continue;
            }
            last_busy = true;
            let done = Instant::now();
            for i in 0..n {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { load.completions[i].assume_init_ref() };
                let slot = c.user_data;
                load.in_flight -= 1;
                if c.ret != 0 {
                    result.errors += 1;
                }
                if measuring {
                    result.ios += 1;
                    result.writes += u64::from(load.is_write[slot]);
                    let ns = (done - load.issued[slot]).as_nanos() as u64;
                    result.latency_ns.saturating_record(ns);
                }
                submit(load, slot, spec, blocks, &mut rng, done);
            }
        }
    }
    drain(&mut loads, &mut result)?;
    Ok(result)
}

fn submit(
    load: &mut QueueLoad,
    slot: usize,
    spec: &LoadSpec,
    blocks: u64,
    rng: &mut Rng,
    now: Instant,
) {
    let offset = rng.below(blocks) * spec.bs as u64;
    let write = match spec.pattern {
        Pattern::RandRead | Pattern::Idle => false,
        Pattern::RandWrite => true,
        Pattern::RandRw => rng.next() & 1 == 1,
    };
    // SAFETY: slot < iodepth, so the buffer lies inside this queue's part of the region.
    let buf = unsafe { load.bufs.add(slot * spec.bs) };
    load.issued[slot] = now;
    load.is_write[slot] = write;
    load.in_flight += 1;
    if write {
        load.q.write(offset, buf, spec.bs, slot, ReqFlags::empty());
    } else {
        load.q.read(offset, buf, spec.bs, slot, ReqFlags::empty());
    }
}

/// Waits for every request still in flight, so the target sees an orderly end.
fn drain(loads: &mut [QueueLoad], result: &mut LoadResult) -> Result<(), String> {
    for load in loads {
        let mut timeout = Duration::from_secs(10);
        while load.in_flight > 0 {
            let n = load
                .q
                .do_io(&mut load.completions, 1, Some(&mut timeout), None)
                .map_err(|e| {
                    format!("target did not complete the last requests: {}", e.message())
                })?;
            for i in 0..n {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { load.completions[i].assume_init_ref() };
                result.errors += u64::from(c.ret != 0);
            }
            load.in_flight -= n;
        }
    }
    Ok(())
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
