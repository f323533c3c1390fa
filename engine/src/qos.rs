//! Per-disk and per-group I/O limits, with QEMU's throttle-group semantics: for each limit a
//! leaky bucket that drains at the rate, holds `rate / 10` (100 ms of it) or, with a burst,
//! `max * max_length`, and while bursting a second bucket that drains at `max` and holds
//! 100 ms of it. A request may start once every bucket it counts in is within its size, and
//! is charged in full (so a large request may overshoot, as in QEMU).
//!
//! Each bucket is a GCRA cell: one atomic "theoretical arrival time" (`tat`, the clock time
//! at which the bucket would be empty). Level = (tat - now) * rate; a request may start at
//! tat - size / rate; its charge of `c` units moves tat on by c / rate. A request reserves
//! its start when it arrives ([`Throttle::reserve`]): it is charged at once and told when to
//! start, so requests from every queue sharing a [`Throttle`] (a disk's queues on several
//! reactors, a group's disks) start in the order they arrived, whichever reactor wakes
//! first. One limit, exact across reactors, no lock (compare-and-swap on the cells), and
//! nothing at all for a disk without limits (one relaxed load). Two reservations racing may
//! both be told the same start: a burst of at most one request per racing queue, with the
//! average rate kept.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The six limits, in the order of [`QosConfig::limits`].
pub const LIMIT_KINDS: [LimitKind; 6] = [
    LimitKind::IopsTotal,
    LimitKind::IopsRead,
    LimitKind::IopsWrite,
    LimitKind::BpsTotal,
    LimitKind::BpsRead,
    LimitKind::BpsWrite,
];

/// Fraction bits of a cell's cost per unit (ns << FRACTION): keeps 0.1 ns per byte exact
/// enough at 10 GB/s.
const FRACTION: u32 = 24;
const NS_PER_SEC: u64 = 1_000_000_000;
/// A bucket without a burst holds 100 ms of its rate (QEMU: avg / 10).
const DEFAULT_WINDOW_NS: u64 = NS_PER_SEC / 10;
/// Longest burst length accepted (seconds).
pub const MAX_BURST_LENGTH: u64 = 3600;
/// Highest rate accepted (per second): well above any device, far from overflow.
pub const MAX_RATE: u64 = 1 << 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    IopsTotal,
    IopsRead,
    IopsWrite,
    BpsTotal,
    BpsRead,
    BpsWrite,
}

impl LimitKind {
    /// The export option naming it (`iops-total`...; `-max`, `-max-length` follow).
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::IopsTotal => "iops-total",
            LimitKind::IopsRead => "iops-read",
            LimitKind::IopsWrite => "iops-write",
            LimitKind::BpsTotal => "bps-total",
            LimitKind::BpsRead => "bps-read",
            LimitKind::BpsWrite => "bps-write",
        }
    }

    /// Counts bytes (else operations).
    pub fn is_bytes(self) -> bool {
        matches!(
            self,
            LimitKind::BpsTotal | LimitKind::BpsRead | LimitKind::BpsWrite
        )
    }

    /// Whether a read (`write` false) or a write counts against it.
    fn applies(self, write: bool) -> bool {
        match self {
            LimitKind::IopsTotal | LimitKind::BpsTotal => true,
            LimitKind::IopsRead | LimitKind::BpsRead => !write,
            LimitKind::IopsWrite | LimitKind::BpsWrite => write,
        }
    }
}

/// One limit: `rate` per second (0: none), bursts at `max` per second (0: none) for about
/// `max_length` seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    pub rate: u64,
    pub max: u64,
    pub max_length: u64,
}

/// A disk's or a group's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QosConfig {
    /// In [`LIMIT_KINDS`] order.
    pub limits: [Limit; 6],
    /// A request of N * iops_size bytes counts as N operations (0: every request is one).
    pub iops_size: u64,
}

impl QosConfig {
    pub fn limit(&self, kind: LimitKind) -> &Limit {
        &self.limits[kind as usize]
    }

    pub fn limit_mut(&mut self, kind: LimitKind) -> &mut Limit {
        &mut self.limits[kind as usize]
    }

    /// No limit set.
    pub fn is_unlimited(&self) -> bool {
        self.limits.iter().all(|l| l.rate == 0)
    }

    /// The rules QEMU's throttle groups keep, with the key at fault named.
    pub fn validate(&self) -> Result<(), String> {
        for kind in LIMIT_KINDS {
            let l = self.limit(kind);
            let key = kind.key();
            if l.rate > MAX_RATE || l.max > MAX_RATE {
                return Err(format!("{key}: at most {MAX_RATE} per second"));
            }
            if l.max > 0 && l.rate == 0 {
                return Err(format!("{key}-max needs {key} (the rate it bursts above)"));
            }
            if l.max > 0 && l.max < l.rate {
                return Err(format!(
                    "{key}-max={} is lower than {key}={}: a burst is a higher rate",
                    l.max, l.rate
                ));
            }
            if l.max_length > 0 && l.max == 0 {
                return Err(format!("{key}-max-length needs {key}-max"));
            }
            if l.max_length > MAX_BURST_LENGTH {
                return Err(format!(
                    "{key}-max-length: at most {MAX_BURST_LENGTH} seconds"
                ));
            }
        }
        for (total, read, write) in [
            (
                LimitKind::IopsTotal,
                LimitKind::IopsRead,
                LimitKind::IopsWrite,
            ),
            (LimitKind::BpsTotal, LimitKind::BpsRead, LimitKind::BpsWrite),
        ] {
            if self.limit(total).rate > 0
                && (self.limit(read).rate > 0 || self.limit(write).rate > 0)
            {
                return Err(format!(
                    "{} and {}/{} cannot be set together (as in QEMU): give a total or \
                     per-direction limits",
                    total.key(),
                    read.key(),
                    write.key()
                ));
            }
        }
        if self.iops_size > 0
            && LIMIT_KINDS
                .iter()
                .all(|k| k.is_bytes() || self.limit(*k).rate == 0)
        {
            return Err("iops-size needs an iops limit".into());
        }
        Ok(())
    }

    /// `key=value` pairs of the limits set, as the export grammar spells them.
    pub fn options(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for kind in LIMIT_KINDS {
            let l = self.limit(kind);
            if l.rate == 0 {
                continue;
            }
            out.push((kind.key().to_string(), l.rate));
            if l.max > 0 {
                out.push((format!("{}-max", kind.key()), l.max));
                out.push((format!("{}-max-length", kind.key()), l.max_length.max(1)));
            }
        }
        if self.iops_size > 0 {
            out.push(("iops-size".into(), self.iops_size));
        }
        out
    }
}

/// One GCRA cell (see the module's comment).
#[derive(Default)]
struct Cell {
    /// Clock time (ns) at which the bucket would be empty.
    tat: AtomicU64,
    /// Cost of one unit in ns << FRACTION; 0: the cell limits nothing.
    cost: AtomicU64,
    /// How far tat may run ahead of now and still admit (ns): the bucket's size / rate.
    tolerance: AtomicU64,
}

impl Cell {
    fn set(&self, rate: u64, window_ns: u64) {
        let cost = if rate == 0 {
            0
        } else {
            ((u128::from(NS_PER_SEC) << FRACTION) / u128::from(rate)).max(1) as u64
        };
        self.tolerance.store(window_ns, Ordering::Relaxed);
        self.cost.store(cost, Ordering::Release);
    }

    /// When a request may go (0: now), by this cell.
    fn ready_at(&self, now: u64) -> u64 {
        if self.cost.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let at = self
            .tat
            .load(Ordering::Acquire)
            .saturating_sub(self.tolerance.load(Ordering::Relaxed));
        if at > now {
            at
        } else {
            0
        }
    }

    /// Charges `units << FRACTION` (fixed point) for a request starting at `now`.
    fn charge(&self, units_fp: u64, now: u64) {
        let cost = self.cost.load(Ordering::Acquire);
        if cost == 0 {
            return;
        }
        let ns = ((u128::from(units_fp) * u128::from(cost)) >> (2 * FRACTION)) as u64;
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now).saturating_add(ns.max(1)))
            });
    }
}

/// The buckets of a disk or of a group of disks, shared by all their queues.
pub struct Throttle {
    /// Per limit (LIMIT_KINDS order): the average bucket and the burst bucket.
    cells: [[Cell; 2]; 6],
    iops_size: AtomicU64,
    /// Any limit set: the one thing an unlimited disk reads per request.
    active: AtomicBool,
    /// Bumped by every `set`: a reservation made before it is made again.
    generation: AtomicU64,
    /// The limits as last set (control plane only).
    config: Mutex<QosConfig>,
}

impl Throttle {
    /// Buckets for `config` (which the caller validated).
    pub fn new(config: &QosConfig) -> Throttle {
        let throttle = Throttle {
            cells: Default::default(),
            iops_size: AtomicU64::new(0),
            active: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            config: Mutex::new(QosConfig::default()),
        };
        throttle.set(config);
        throttle
    }

    /// Changes the limits: the buckets start again empty under them, and requests waiting
    /// on a reservation (see `generation`) reserve again.
    pub fn set(&self, config: &QosConfig) {
        debug_assert!(config.validate().is_ok());
        for (kind, cells) in LIMIT_KINDS.iter().zip(&self.cells) {
            let l = config.limit(*kind);
            let (size_ns, burst) = if l.max > 0 {
                // The average bucket holds max * length units: length * max / rate seconds.
                let length = l.max_length.max(1);
                let ns = u128::from(length) * u128::from(l.max) * u128::from(NS_PER_SEC)
                    / u128::from(l.rate);
                (ns.min(u128::from(u64::MAX / 2)) as u64, l.max)
            } else {
                (DEFAULT_WINDOW_NS, 0)
            };
            cells[0].set(l.rate, size_ns);
            cells[1].set(burst, DEFAULT_WINDOW_NS);
            cells.iter().for_each(|c| c.tat.store(0, Ordering::Release));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.iops_size.store(config.iops_size, Ordering::Relaxed);
        self.active.store(!config.is_unlimited(), Ordering::Release);
        *self.config.lock().unwrap() = config.clone();
    }

    pub fn config(&self) -> QosConfig {
        self.config.lock().unwrap().clone()
    }

    /// Whether any limit is set.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The limits' version: a reservation holds while it is unchanged.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reserves a start for a read or write of `bytes` arriving at clock time `now`: charges
    /// it and returns when it may start (`now` or later).
    pub fn reserve(&self, write: bool, bytes: u64, now: u64) -> u64 {
        let start = LIMIT_KINDS
            .iter()
            .zip(&self.cells)
            .filter(|(kind, _)| kind.applies(write))
            .flat_map(|(_, cells)| cells.iter())
            .map(|cell| cell.ready_at(now))
            .max()
            .unwrap_or(0)
            .max(now);
        let iops_size = self.iops_size.load(Ordering::Relaxed);
        let ops_fp = if iops_size > 0 && bytes > iops_size {
            ((u128::from(bytes) << FRACTION) / u128::from(iops_size)) as u64
        } else {
            1 << FRACTION
        };
        let bytes_fp = bytes.min(u64::MAX >> FRACTION) << FRACTION;
        for (kind, cells) in LIMIT_KINDS.iter().zip(&self.cells) {
            if kind.applies(write) {
                let units = if kind.is_bytes() { bytes_fp } else { ops_fp };
                cells.iter().for_each(|cell| cell.charge(units, start));
            }
        }
        start
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new(&QosConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn iops(rate: u64) -> QosConfig {
        let mut c = QosConfig::default();
        c.limit_mut(LimitKind::IopsTotal).rate = rate;
        c
    }

    /// Requests started by `t` for one queue issuing the next as soon as the last started,
    /// from 1 ns to `until`.
    fn admitted_until(t: &Throttle, write: bool, bytes: u64, until: u64) -> u64 {
        let (mut now, mut n) = (1, 0);
        loop {
            let start = t.reserve(write, bytes, now);
            assert!(start >= now, "told to start in the past");
            if start >= until {
                return n;
            }
            n += 1;
            now = start;
        }
    }

    #[test]
    fn a_rate_of_one_per_second_admits_one_per_second() {
        let t = Throttle::new(&iops(1));
        // At 0, then 100 ms early (the bucket's allowance) each second: 0.9 s, 1.9 s...
        assert_eq!(admitted_until(&t, false, 4096, 10 * NS_PER_SEC), 11);
        let t = Throttle::new(&iops(1));
        assert_eq!(admitted_until(&t, false, 4096, 20 * NS_PER_SEC), 21);
    }

    #[test]
    fn a_rate_holds_over_time_after_its_100_ms_allowance() {
        let t = Throttle::new(&iops(1000));
        let n = admitted_until(&t, false, 4096, 10 * NS_PER_SEC);
        // 10,000 in 10 s, plus the first 100 ms worth (100) the bucket holds.
        assert!((10_000..=10_101).contains(&n), "{n}");
    }

    #[test]
    fn bytes_per_second_counts_bytes_and_per_direction_limits_only_their_direction() {
        let mut c = QosConfig::default();
        c.limit_mut(LimitKind::BpsWrite).rate = 50_000_000;
        let t = Throttle::new(&c);
        let n = admitted_until(&t, true, 65536, NS_PER_SEC);
        let expected = 50_000_000 / 65536; // 762, plus 100 ms worth
        assert!(
            (expected..=expected + expected / 10 + 2).contains(&n),
            "{n}"
        );
        // Reads are not limited.
        assert_eq!(t.reserve(false, 65536, 2), 2, "reads start at once");
    }

    #[test]
    fn a_burst_runs_at_max_for_its_length_then_falls_to_the_rate() {
        let mut c = iops(100);
        *c.limit_mut(LimitKind::IopsTotal) = Limit {
            rate: 100,
            max: 1000,
            max_length: 2,
        };
        let t = Throttle::new(&c);
        // The first second goes at about max (bounded by the burst bucket).
        let first = admitted_until(&t, false, 4096, NS_PER_SEC);
        assert!((900..=1110).contains(&first), "{first}");
        // Long after, the bucket (2,000 ops) is full: only the rate is left.
        let t2 = Throttle::new(&c);
        let ten = admitted_until(&t2, false, 4096, 10 * NS_PER_SEC);
        // 100/s for 10 s plus what the 2,000-op bucket let through early.
        assert!((2900..=3200).contains(&ten), "{ten}");
    }

    #[test]
    fn iops_size_counts_a_large_request_as_several() {
        let mut c = iops(100);
        c.iops_size = 4096;
        let t = Throttle::new(&c);
        let n = admitted_until(&t, false, 16384, 10 * NS_PER_SEC);
        assert!((250..=255).contains(&n), "{n}");
    }

    #[test]
    fn changing_the_limits_takes_effect_for_the_next_request() {
        let t = Throttle::new(&iops(1));
        assert_eq!(t.reserve(false, 512, 1), 1);
        assert_eq!(t.reserve(false, 512, 2), NS_PER_SEC + 1 - NS_PER_SEC / 10);
        let before = t.generation();
        t.set(&QosConfig::default());
        assert!(!t.active());
        t.set(&iops(1_000_000));
        assert!(
            t.generation() > before,
            "waiting reservations are made again"
        );
        assert_eq!(t.reserve(false, 512, 10 * MS), 10 * MS);
    }

    #[test]
    fn queues_sharing_a_throttle_start_in_the_order_they_reserved() {
        let t = Throttle::new(&iops(10));
        // Ten queues arrive at once: each is given its own start, 100 ms apart.
        let starts: Vec<u64> = (0..10).map(|_| t.reserve(false, 512, MS)).collect();
        assert!(starts.windows(2).all(|w| w[1] >= w[0]), "{starts:?}");
        let last = *starts.last().unwrap();
        assert!((800 * MS..=900 * MS).contains(&last), "{starts:?}");
    }

    #[test]
    fn bad_limits_are_named() {
        let mut c = iops(100);
        c.limit_mut(LimitKind::IopsTotal).max = 50;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("iops-total-max=50 is lower"));
        let mut c = iops(100);
        c.limit_mut(LimitKind::IopsTotal).max_length = 5;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("iops-total-max-length needs"));
        let mut c = iops(100);
        c.limit_mut(LimitKind::IopsRead).rate = 5;
        assert!(c.validate().unwrap_err().contains("cannot be set together"));
        let mut c = QosConfig::default();
        c.limit_mut(LimitKind::BpsRead).rate = 5;
        c.iops_size = 4096;
        assert!(c.validate().unwrap_err().contains("iops-size needs"));
    }
}
