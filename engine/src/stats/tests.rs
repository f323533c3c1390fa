use super::format::{StatType, Unit};
use super::sets::{DiskStat, PoolStat, QueueStat, ReactorStat};
use super::validate::{check_sequential_read, validate};
use super::{Schema, Stats, StatsDir, StatsReader};

fn check_published<S: Schema>(dir: &StatsDir, name: &str) {
    let stats: Stats<S> = dir.create(name).unwrap();
    let path = stats.file().path().unwrap().to_owned();
    let reader = StatsReader::open(&path).unwrap();
    assert!(reader.id().starts_with("pollblk-") && reader.id().ends_with(name));
    assert!(reader.is_mapped());
    assert_eq!(validate(&reader), Vec::<String>::new(), "{name}");
    check_sequential_read(&reader).unwrap();
    assert_eq!(reader.descs().len(), S::DEFS.len());
    drop(stats);
    assert!(!path.exists(), "a dropped file is removed");
}

#[test]
fn every_published_set_passes_the_kvm_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = StatsDir::open(tmp.path(), None).unwrap();
    check_published::<QueueStat>(&dir, "disk0/queue-0");
    check_published::<DiskStat>(&dir, "disk0");
    check_published::<ReactorStat>(&dir, "reactor-0");
    check_published::<PoolStat>(&dir, "pool-pool");
}

#[test]
fn writers_values_reach_the_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = StatsDir::open(tmp.path(), None).unwrap();
    let stats: Stats<QueueStat> = dir.create("disk0/queue-3").unwrap();
    stats.add(QueueStat::ReadOps, 5);
    stats.add(QueueStat::ReadOps, 2);
    stats.set(QueueStat::InFlight, 9);
    stats.peak(QueueStat::InFlightPeak, 4);
    stats.peak(QueueStat::InFlightPeak, 3);
    stats.log_hist(QueueStat::ReadLatency, 1500, 2);
    stats.log_hist(QueueStat::ReadLatency, u64::MAX, 1);
    let reader = StatsReader::open(stats.file().path().unwrap()).unwrap();
    let sample = reader.sample().unwrap();
    let value = |name: &str| {
        let d = reader.descs().iter().find(|d| d.name == name).unwrap();
        sample.of(d).to_vec()
    };
    assert_eq!(value("read_ops"), [7]);
    assert_eq!(value("in_flight"), [9]);
    assert_eq!(value("in_flight_peak"), [4]);
    let hist = value("read_latency_hist");
    assert_eq!(hist.len(), 32);
    assert_eq!(hist[11], 2, "1500 ns is in [1024, 2048)");
    assert_eq!(hist[31], 1, "the last bucket takes the rest");
    let d = reader
        .descs()
        .iter()
        .find(|d| d.name == "read_latency_hist")
        .unwrap();
    assert_eq!(
        (d.stat_type(), d.unit(), d.exponent),
        (Some(StatType::LogHist), Some(Unit::Seconds), -9)
    );
}

#[test]
fn a_second_daemon_cannot_take_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let _first = StatsDir::open(tmp.path(), None).unwrap();
    let err = StatsDir::open(tmp.path(), None).err().unwrap();
    assert!(err.to_string().contains("another pollblk"), "{err}");
}

#[test]
fn the_reader_refuses_what_is_not_a_stats_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("junk");
    std::fs::write(&path, b"short").unwrap();
    assert!(StatsReader::open(&path).is_err());
    // A header promising a huge name.
    let mut bytes = vec![0u8; 64];
    bytes[4..8].copy_from_slice(&1_000_000u32.to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = StatsReader::open(&path).err().unwrap();
    assert!(err.to_string().contains("name_size"), "{err}");
}

#[test]
fn odd_but_readable_files_are_checked_without_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("odd");
    // No descriptors, offsets all zero, the id right after the header.
    let mut bytes = vec![0u8; 72];
    bytes[4..8].copy_from_slice(&48u32.to_ne_bytes());
    bytes[12..16].copy_from_slice(&24u32.to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let reader = StatsReader::open(&path).unwrap();
    assert!(
        !validate(&reader).is_empty(),
        "zero offsets overlap the header"
    );
    check_sequential_read(&reader).unwrap();
    // Descriptors that would need a huge allocation are refused before it.
    bytes[4..8].copy_from_slice(&4096u32.to_ne_bytes());
    bytes[8..12].copy_from_slice(&65536u32.to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = StatsReader::open(&path).err().unwrap();
    assert!(err.to_string().contains("descriptors"), "{err}");
}

#[test]
fn the_validator_finds_broken_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = StatsDir::open(tmp.path(), None).unwrap();
    let stats: Stats<ReactorStat> = dir.create("reactor-0").unwrap();
    let mut bytes = stats.file().bytes();
    let reader = StatsReader::open(stats.file().path().unwrap()).unwrap();
    let h = *reader.header();
    // Second descriptor: point it at the first one's value, give it a negative exponent and
    // a bucket size.
    let at = h.desc_offset as usize + h.desc_size();
    bytes[at + 4..at + 6].copy_from_slice(&(-3i16).to_ne_bytes());
    bytes[at + 8..at + 12].copy_from_slice(&0u32.to_ne_bytes());
    bytes[at + 12..at + 16].copy_from_slice(&8u32.to_ne_bytes());
    let path = tmp.path().join("broken");
    std::fs::write(&path, &bytes).unwrap();
    let problems = validate(&StatsReader::open(&path).unwrap());
    let all = problems.join("\n");
    assert!(all.contains("negative exponent"), "{all}");
    assert!(all.contains("bucket_size"), "{all}");
    assert!(all.contains("overlap"), "{all}");
}
