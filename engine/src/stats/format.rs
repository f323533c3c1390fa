//! The KVM binary statistics layout (merged linux/kvm.h, `struct kvm_stats_header` and
//! `struct kvm_stats_desc`), host-endian as KVM writes it:
//!
//! ```text
//! header (24 bytes) | id (name_size bytes, NUL terminated) | descriptors | data (u64 values)
//! ```
//!
//! A descriptor is 16 bytes plus `name_size` bytes of NUL-terminated name; its `offset` is in
//! bytes from the start of the data block, where `size` u64 values follow (histogram buckets).

/// Size of a name (and of the id string) including its NUL, as KVM uses.
pub const NAME_SIZE: u32 = 48;
/// `struct kvm_stats_header`.
pub const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` without its name.
pub const DESC_FIXED_SIZE: usize = 16;

/// Flag fields of a descriptor.
pub mod flags {
    pub const TYPE_SHIFT: u32 = 0;
    pub const TYPE_MASK: u32 = 0xf << TYPE_SHIFT;
    pub const UNIT_SHIFT: u32 = 4;
    pub const UNIT_MASK: u32 = 0xf << UNIT_SHIFT;
    pub const BASE_SHIFT: u32 = 8;
    pub const BASE_MASK: u32 = 0xf << BASE_SHIFT;
}

/// What a statistic's values mean (KVM_STATS_TYPE_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum StatType {
    /// Only goes up; readers show rates.
    Cumulative = 0,
    /// A current value.
    Instant = 1,
    /// The highest value seen.
    Peak = 2,
    /// Buckets of `bucket_size` each.
    LinearHist = 3,
    /// Bucket 0 counts value 0, bucket i > 0 counts [2^(i-1), 2^i); the last takes the rest.
    LogHist = 4,
}

/// Unit of a statistic (KVM_STATS_UNIT_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Unit {
    None = 0,
    Bytes = 1,
    Seconds = 2,
    Cycles = 3,
    Boolean = 4,
}

/// Base of the exponent (KVM_STATS_BASE_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Base {
    Pow10 = 0,
    Pow2 = 1,
}

impl StatType {
    pub const MAX: u32 = StatType::LogHist as u32;

    pub fn from_flags(f: u32) -> Option<StatType> {
        Some(match (f & flags::TYPE_MASK) >> flags::TYPE_SHIFT {
            0 => StatType::Cumulative,
            1 => StatType::Instant,
            2 => StatType::Peak,
            3 => StatType::LinearHist,
            4 => StatType::LogHist,
            _ => return None,
        })
    }

    pub fn is_hist(self) -> bool {
        matches!(self, StatType::LinearHist | StatType::LogHist)
    }
}

impl Unit {
    pub const MAX: u32 = Unit::Boolean as u32;

    pub fn from_flags(f: u32) -> Option<Unit> {
        Some(match (f & flags::UNIT_MASK) >> flags::UNIT_SHIFT {
            0 => Unit::None,
            1 => Unit::Bytes,
            2 => Unit::Seconds,
            3 => Unit::Cycles,
            4 => Unit::Boolean,
            _ => return None,
        })
    }
}

impl Base {
    pub const MAX: u32 = Base::Pow2 as u32;

    pub fn from_flags(f: u32) -> Option<Base> {
        Some(match (f & flags::BASE_MASK) >> flags::BASE_SHIFT {
            0 => Base::Pow10,
            1 => Base::Pow2,
            _ => return None,
        })
    }
}

/// `struct kvm_stats_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub name_size: u32,
    pub num_desc: u32,
    pub id_offset: u32,
    pub desc_offset: u32,
    pub data_offset: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let f = |i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        Header {
            flags: f(0),
            name_size: f(1),
            num_desc: f(2),
            id_offset: f(3),
            desc_offset: f(4),
            data_offset: f(5),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let fields = [
            self.flags,
            self.name_size,
            self.num_desc,
            self.id_offset,
            self.desc_offset,
            self.data_offset,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    /// Bytes of one descriptor, name included.
    pub fn desc_size(&self) -> usize {
        DESC_FIXED_SIZE + self.name_size as usize
    }
}

/// `struct kvm_stats_desc` with its name decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desc {
    pub flags: u32,
    pub exponent: i16,
    /// Number of u64 values.
    pub size: u16,
    /// Byte offset of the first value within the data block.
    pub offset: u32,
    pub bucket_size: u32,
    pub name: String,
}

impl Desc {
    /// Decodes one descriptor of `header.desc_size()` bytes; the name ends at its first NUL
    /// (or at the end of the field, which the validator reports).
    pub fn decode(b: &[u8]) -> Desc {
        assert!(b.len() >= DESC_FIXED_SIZE);
        let name = &b[DESC_FIXED_SIZE..];
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        Desc {
            flags: u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            exponent: i16::from_ne_bytes(b[4..6].try_into().unwrap()),
            size: u16::from_ne_bytes(b[6..8].try_into().unwrap()),
            offset: u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            bucket_size: u32::from_ne_bytes(b[12..16].try_into().unwrap()),
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
        }
    }

    /// Encodes into `out` (`DESC_FIXED_SIZE + name_size` bytes, zeroed by the caller).
    pub fn encode(&self, out: &mut [u8]) {
        assert!(
            self.name.len() < out.len() - DESC_FIXED_SIZE,
            "name too long"
        );
        out[0..4].copy_from_slice(&self.flags.to_ne_bytes());
        out[4..6].copy_from_slice(&self.exponent.to_ne_bytes());
        out[6..8].copy_from_slice(&self.size.to_ne_bytes());
        out[8..12].copy_from_slice(&self.offset.to_ne_bytes());
        out[12..16].copy_from_slice(&self.bucket_size.to_ne_bytes());
        out[DESC_FIXED_SIZE..DESC_FIXED_SIZE + self.name.len()]
            .copy_from_slice(self.name.as_bytes());
    }

    pub fn stat_type(&self) -> Option<StatType> {
        StatType::from_flags(self.flags)
    }

    pub fn unit(&self) -> Option<Unit> {
        Unit::from_flags(self.flags)
    }

    pub fn base(&self) -> Option<Base> {
        Base::from_flags(self.flags)
    }

    /// The factor that turns a raw value into the unit (10^exponent or 2^exponent).
    pub fn scale(&self) -> f64 {
        match self.base() {
            Some(Base::Pow2) => 2f64.powi(i32::from(self.exponent)),
            _ => 10f64.powi(i32::from(self.exponent)),
        }
    }
}

/// Index of the LOG_HIST bucket for `value` in a histogram of `buckets` buckets (KVM's
/// `fls64(value)`, capped at the last bucket).
pub fn log_hist_bucket(value: u64, buckets: usize) -> usize {
    debug_assert!(buckets > 0);
    ((64 - value.leading_zeros()) as usize).min(buckets - 1)
}

/// Upper bound (inclusive) of LOG_HIST bucket `i`: bucket 0 is 0, bucket i is 2^i - 1; the
/// last bucket of a histogram is open-ended (reported as its lower bound's double).
pub fn log_hist_upper(i: usize) -> u64 {
    if i == 0 {
        0
    } else if i >= 64 {
        u64::MAX
    } else {
        (1u64 << i) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_hist_buckets_follow_fls64() {
        assert_eq!(log_hist_bucket(0, 32), 0);
        assert_eq!(log_hist_bucket(1, 32), 1);
        assert_eq!(log_hist_bucket(2, 32), 2);
        assert_eq!(log_hist_bucket(3, 32), 2);
        assert_eq!(log_hist_bucket(4, 32), 3);
        assert_eq!(log_hist_bucket(1 << 40, 32), 31);
        assert_eq!(log_hist_upper(2), 3);
    }

    #[test]
    fn header_and_descriptor_round_trip() {
        let h = Header {
            flags: 0,
            name_size: NAME_SIZE,
            num_desc: 3,
            id_offset: 24,
            desc_offset: 72,
            data_offset: 320,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        let d = Desc {
            flags: StatType::LogHist as u32 | (Unit::Seconds as u32) << 4,
            exponent: -9,
            size: 32,
            offset: 64,
            bucket_size: 0,
            name: "read_latency_hist".into(),
        };
        let mut buf = vec![0u8; h.desc_size()];
        d.encode(&mut buf);
        assert_eq!(Desc::decode(&buf), d);
        assert_eq!(d.stat_type(), Some(StatType::LogHist));
        assert_eq!(d.unit(), Some(Unit::Seconds));
    }
}
