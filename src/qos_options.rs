//! The QoS options of an export, and of `qos_set` (the same grammar): QEMU's throttle names.
//!
//! `iops-total=N`, `iops-read=N`, `iops-write=N` (operations per second), `bps-total=`,
//! `bps-read=`, `bps-write=` (bytes per second; K/M/G suffixes, KB/MB/GB decimal), each with
//! `-max=` (burst rate) and `-max-length=` (seconds the burst may last, default 1);
//! `iops-size=BYTES` (a request of N * iops-size bytes counts as N operations), and
//! `qos-group=NAME` (every disk of the group shares one set of limits).

use crate::export::parse_size;
use pollblk_engine::qos::{LimitKind, QosConfig, LIMIT_KINDS};

/// Every QoS key but qos-group.
pub fn is_limit_key(key: &str) -> bool {
    key == "iops-size" || limit_of(key).is_some()
}

/// The limit a key sets and which part of it (0 rate, 1 max, 2 max-length).
fn limit_of(key: &str) -> Option<(LimitKind, usize)> {
    LIMIT_KINDS.iter().find_map(|&kind| {
        let rest = key.strip_prefix(kind.key())?;
        match rest {
            "" => Some((kind, 0)),
            "-max" => Some((kind, 1)),
            "-max-length" => Some((kind, 2)),
            _ => None,
        }
    })
}

/// The limits among `pairs` (other keys are skipped), checked as a whole.
pub fn parse<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<QosConfig, String> {
    let mut config = QosConfig::default();
    for (key, value) in pairs {
        if key == "iops-size" {
            config.iops_size = positive_size(key, value)?;
            continue;
        }
        let Some((kind, part)) = limit_of(key) else {
            continue;
        };
        let limit = config.limit_mut(kind);
        match part {
            0 | 1 => {
                let n = match kind.is_bytes() {
                    true => positive_size(key, value)?,
                    false => positive(key, value)?,
                };
                if part == 0 {
                    limit.rate = n;
                } else {
                    limit.max = n;
                }
            }
            _ => limit.max_length = positive(key, value)?,
        }
    }
    config.validate()?;
    Ok(config)
}

fn positive(key: &str, value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{key}={value}: expected a whole number above 0"))
}

fn positive_size(key: &str, value: &str) -> Result<u64, String> {
    match parse_size(value) {
        Ok(0) => Err(format!("{key}={value}: expected more than 0 bytes")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{key}: {e}")),
    }
}

/// `limits` as export options (`iops-total=1000,iops-total-max=2000,...`); "" for none.
pub fn to_options(limits: &QosConfig) -> String {
    limits
        .options()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `spec` with its limits replaced by `limits` (qos-group and the rest kept).
pub fn with_limits(spec: &str, limits: &QosConfig) -> String {
    let mut parts: Vec<&str> = spec
        .split(',')
        .filter(|part| !is_limit_key(part.split_once('=').map_or(*part, |(k, _)| k)))
        .collect();
    let options = to_options(limits);
    if !options.is_empty() {
        parts.push(&options);
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<QosConfig, String> {
        parse(s.split(',').map(|p| p.split_once('=').unwrap()))
    }

    #[test]
    fn limits_with_bursts_and_sizes() {
        let c =
            parse_str("iops-total=1000,iops-total-max=2000,iops-total-max-length=3,bps-write=50M")
                .unwrap();
        let iops = c.limit(LimitKind::IopsTotal);
        assert_eq!((iops.rate, iops.max, iops.max_length), (1000, 2000, 3));
        assert_eq!(c.limit(LimitKind::BpsWrite).rate, 50 << 20);
        assert_eq!(
            to_options(&c),
            "iops-total=1000,iops-total-max=2000,iops-total-max-length=3,bps-write=52428800"
        );
    }

    #[test]
    fn every_mistake_names_its_key() {
        for (spec, wanted) in [
            (
                "iops-total=0",
                "iops-total=0: expected a whole number above 0",
            ),
            (
                "iops-total=-5",
                "iops-total=-5: expected a whole number above 0",
            ),
            ("bps-read=0", "bps-read=0: expected more than 0 bytes"),
            (
                "iops-read=100,iops-read-max=50",
                "iops-read-max=50 is lower than iops-read=100",
            ),
            (
                "iops-write=10,iops-write-max-length=2",
                "iops-write-max-length needs iops-write-max",
            ),
            (
                "bps-total=1M,bps-read=1M",
                "bps-total and bps-read/bps-write cannot be set",
            ),
        ] {
            let e = parse_str(spec).unwrap_err();
            assert!(e.contains(wanted), "{spec}: {e}");
        }
    }

    #[test]
    fn a_spec_gets_new_limits_and_keeps_the_rest() {
        let c = parse_str("iops-read=5").unwrap();
        assert_eq!(
            with_limits(
                "vhost-user-blk,socket=/s,null,size=1M,iops-total=9,qos-group=g",
                &c
            ),
            "vhost-user-blk,socket=/s,null,size=1M,qos-group=g,iops-read=5"
        );
        assert_eq!(
            with_limits(
                "vhost-user-blk,socket=/s,iops-total=9",
                &QosConfig::default()
            ),
            "vhost-user-blk,socket=/s"
        );
    }
}
