//! Declaring a set of statistics: a `Def` per statistic, in data-block order.

use super::format::{StatType, Unit};

/// One statistic as its writer declares it.
#[derive(Clone, Copy, Debug)]
pub struct Def {
    pub name: &'static str,
    pub ty: StatType,
    pub unit: Unit,
    /// Power of ten applied to raw values (all pollblk statistics are POW10).
    pub exponent: i16,
    /// Values (1, or the bucket count of a histogram).
    pub size: u16,
}

/// Buckets of a latency histogram: KVM's HALT_POLL_HIST_COUNT; bucket 31 takes 2^30 ns
/// (~1.07 s) and up.
pub const LATENCY_BUCKETS: u16 = 32;

impl Def {
    const fn new(name: &'static str, ty: StatType, unit: Unit, exponent: i16, size: u16) -> Def {
        Def {
            name,
            ty,
            unit,
            exponent,
            size,
        }
    }

    /// A count that only goes up.
    pub const fn counter(name: &'static str) -> Def {
        Def::new(name, StatType::Cumulative, Unit::None, 0, 1)
    }

    /// A total of nanoseconds that only goes up.
    pub const fn nanos(name: &'static str) -> Def {
        Def::new(name, StatType::Cumulative, Unit::Seconds, -9, 1)
    }

    /// A total of milliseconds that only goes up (Linux diskstats "ticks").
    pub const fn millis(name: &'static str) -> Def {
        Def::new(name, StatType::Cumulative, Unit::Seconds, -3, 1)
    }

    /// A current value.
    pub const fn gauge(name: &'static str) -> Def {
        Def::new(name, StatType::Instant, Unit::None, 0, 1)
    }

    /// A current number of nanoseconds.
    pub const fn instant_nanos(name: &'static str) -> Def {
        Def::new(name, StatType::Instant, Unit::Seconds, -9, 1)
    }

    /// A current number of bytes.
    pub const fn gauge_bytes(name: &'static str) -> Def {
        Def::new(name, StatType::Instant, Unit::Bytes, 0, 1)
    }

    /// A current yes/no.
    pub const fn flag(name: &'static str) -> Def {
        Def::new(name, StatType::Instant, Unit::Boolean, 0, 1)
    }

    /// The highest value seen.
    pub const fn peak(name: &'static str) -> Def {
        Def::new(name, StatType::Peak, Unit::None, 0, 1)
    }

    /// A log2 histogram of nanoseconds.
    pub const fn latency_hist(name: &'static str) -> Def {
        Def::new(name, StatType::LogHist, Unit::Seconds, -9, LATENCY_BUCKETS)
    }
}

/// A set of statistics: an enum whose variants index `DEFS`.
pub trait Schema: Copy + 'static {
    const DEFS: &'static [Def];
    /// Position of this statistic in `DEFS`.
    fn index(self) -> usize;
    /// Index of this statistic's first value in the data block.
    fn slot(self) -> usize;
}

/// First value index of each statistic of `defs` (they follow one another).
pub const fn slots<const N: usize>(defs: &[Def]) -> [usize; N] {
    let mut out = [0; N];
    let mut i = 0;
    let mut at = 0;
    while i < N {
        out[i] = at;
        at += defs[i].size as usize;
        i += 1;
    }
    out
}

/// Values in the data block of `defs`.
pub fn total_values(defs: &[Def]) -> usize {
    defs.iter().map(|d| usize::from(d.size)).sum()
}

/// Declares a schema: `stats_schema! { pub enum QueueStat { ReadOps => Def::counter("read_ops"), ... } }`.
#[macro_export]
macro_rules! stats_schema {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $variant:ident => $def:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name { $($(#[$vm])* $variant,)* }

        impl $crate::stats::Schema for $name {
            const DEFS: &'static [$crate::stats::Def] = &[$($def,)*];

            #[inline]
            fn index(self) -> usize {
                self as usize
            }

            #[inline]
            fn slot(self) -> usize {
                const SLOTS: [usize; [$(stringify!($variant)),*].len()] =
                    $crate::stats::slots(<$name as $crate::stats::Schema>::DEFS);
                SLOTS[self as usize]
            }
        }
    };
}
