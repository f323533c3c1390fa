//! The statistics reader on arbitrary files: `pollblk stats` reads files and KVM fds it did
//! not write (another user's daemon, a truncated file, a foreign fd), so any bytes must give
//! a clean error or a reader whose every view stays in bounds.
//!
//! Invariants: the reader accepts only what it can bound (descriptors, names, data); a
//! sample has exactly the data block's values; every descriptor's values are inside the
//! sample or empty; the validator and the sequential-read check run without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollblk_engine::stats::validate::{check_sequential_read, validate};
use pollblk_engine::stats::StatsReader;
use std::io::Write;

fuzz_target!(|bytes: &[u8]| {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    let Ok(reader) = StatsReader::from_file(file) else {
        return;
    };
    // sample() allocates the data block: the reader must have bounded it (libFuzzer's
    // -rss_limit_mb catches a reader that does not).
    if let Ok(sample) = reader.sample() {
        assert_eq!(sample.values.len() as u64, reader.data_bytes() / 8);
        for desc in reader.descs() {
            let values = sample.of(desc);
            assert!(values.is_empty() || values.len() == usize::from(desc.size));
        }
    }
    let _ = validate(&reader);
    let _ = check_sequential_read(&reader);
    let _ = reader.id();
});
