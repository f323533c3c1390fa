//! The checks of the kernel's kvm_binary_stats_test (tools/testing/selftests/kvm), applied to
//! any statistics file, plus a check that descriptors' values do not overlap.

use super::format::{Base, StatType, Unit, DESC_FIXED_SIZE, HEADER_SIZE};
use super::reader::StatsReader;
use std::io::{Read, Seek, SeekFrom};

/// Problems with the layout of `r`'s file; empty when it passes.
pub fn validate(r: &StatsReader) -> Vec<String> {
    let mut problems = Vec::new();
    let h = r.header();
    if !r.id_terminated() {
        problems.push(format!("id {:?} fills name_size without a NUL", r.id()));
    }
    let size_desc = (DESC_FIXED_SIZE + h.name_size as usize) as u64;
    let (desc_offset, data_offset) = (u64::from(h.desc_offset), u64::from(h.data_offset));
    if desc_offset < HEADER_SIZE as u64 || data_offset < HEADER_SIZE as u64 {
        problems.push("desc_offset or data_offset overlaps the header".into());
    }
    if !(desc_offset > data_offset
        || desc_offset + size_desc * u64::from(h.num_desc) <= data_offset)
    {
        problems.push("descriptor block overlaps the data block".into());
    }
    let mut ranges = Vec::new();
    for (i, d) in r.descs().iter().enumerate() {
        check_descriptor(r, i, &mut problems);
        ranges.push((
            u64::from(d.offset),
            u64::from(d.offset) + 8 * u64::from(d.size),
            i,
        ));
    }
    // The data block ends where its last value does (the ABI allows holes), as the kernel's
    // test computes it since 2023.
    let size_data = r.data_bytes();
    if !(data_offset >= desc_offset || data_offset + size_data <= desc_offset) {
        problems.push("data block overlaps the descriptor block".into());
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            let (a, b) = (&r.descs()[pair[0].2].name, &r.descs()[pair[1].2].name);
            problems.push(format!("values of {a} and {b} overlap"));
        }
    }
    let mut names: Vec<&str> = r.descs().iter().map(|d| d.name.as_str()).collect();
    names.sort_unstable();
    for pair in names.windows(2) {
        if pair[0] == pair[1] {
            problems.push(format!("name {} appears twice", pair[0]));
        }
    }
    problems
}

/// The per-descriptor checks of kvm_binary_stats_test on descriptor `i`.
fn check_descriptor(r: &StatsReader, i: usize, problems: &mut Vec<String>) {
    let d = &r.descs()[i];
    let name = &d.name;
    match d.stat_type() {
        None => problems.push(format!("{name}: unknown type in flags {:#x}", d.flags)),
        Some(StatType::LinearHist) if d.bucket_size == 0 => {
            problems.push(format!("{name}: linear histogram with bucket_size 0"))
        }
        Some(t) if t != StatType::LinearHist && d.bucket_size != 0 => problems.push(format!(
            "{name}: bucket_size {} on a non-linear-histogram",
            d.bucket_size
        )),
        Some(_) => {}
    }
    match d.unit() {
        None => problems.push(format!("{name}: unknown unit in flags {:#x}", d.flags)),
        Some(Unit::None | Unit::Bytes | Unit::Cycles) if d.exponent < 0 => problems.push(format!(
            "{name}: negative exponent {} for its unit",
            d.exponent
        )),
        Some(Unit::Seconds) if d.exponent > 0 => problems.push(format!(
            "{name}: positive exponent {} for seconds",
            d.exponent
        )),
        Some(Unit::Boolean) if d.exponent != 0 => {
            problems.push(format!("{name}: exponent {} for a boolean", d.exponent))
        }
        Some(_) => {}
    }
    if Base::from_flags(d.flags).is_none() {
        problems.push(format!("{name}: unknown base in flags {:#x}", d.flags));
    }
    if d.flags >> 12 != 0 {
        problems.push(format!("{name}: reserved flag bits set ({:#x})", d.flags));
    }
    if !r.name_terminated(i) {
        problems.push(format!("{name}: name fills name_size without a NUL"));
    }
    if name.is_empty() {
        problems.push(format!("descriptor {i} has no name"));
    }
    if d.size == 0 {
        problems.push(format!("{name}: size 0"));
    }
    if !d.offset.is_multiple_of(8) {
        problems.push(format!("{name}: offset {} is not 8-aligned", d.offset));
    }
}

/// Reads the whole file with sequential read() calls from offset 0 and compares header, id
/// and descriptors with what pread gave the reader, and the data block with a sample taken
/// right after (retried a few times: live values move).
pub fn check_sequential_read(r: &StatsReader) -> Result<(), String> {
    let h = *r.header();
    let end = u64::from(h.data_offset) + r.data_bytes();
    let meta_end = u64::from(h.desc_offset)
        + (DESC_FIXED_SIZE + h.name_size as usize) as u64 * u64::from(h.num_desc);
    let id_end = u64::from(h.id_offset) + u64::from(h.name_size);
    let total = end.max(meta_end).max(id_end).max(HEADER_SIZE as u64);
    if total > 64 << 20 {
        return Err(format!(
            "the file's blocks end at {total} bytes: too large to compare"
        ));
    }
    let mut last = String::new();
    for _ in 0..5 {
        let mut file = r.file().try_clone().map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| format!("lseek: {e}"))?;
        let mut bytes = vec![0u8; total as usize];
        let mut got = 0;
        while got < bytes.len() {
            // Small reads: a sequential reader crosses block boundaries mid-read.
            let want = (bytes.len() - got).min(40);
            match file.read(&mut bytes[got..got + want]) {
                Ok(0) => return Err(format!("read() ended at {got} of {} bytes", bytes.len())),
                Ok(n) => got += n,
                Err(e) => return Err(format!("read(): {e}")),
            }
        }
        let mut header = [0u8; HEADER_SIZE];
        header.copy_from_slice(&bytes[..HEADER_SIZE]);
        if super::format::Header::decode(&header) != h {
            return Err("read() and pread() disagree on the header".into());
        }
        let id_at = h.id_offset as usize;
        let id_raw = &bytes[id_at..id_at + h.name_size as usize];
        let id_len = id_raw.iter().position(|&c| c == 0).unwrap_or(id_raw.len());
        if String::from_utf8_lossy(&id_raw[..id_len]) != r.id() {
            return Err("read() and pread() disagree on the id".into());
        }
        let size_desc = DESC_FIXED_SIZE + h.name_size as usize;
        for (i, d) in r.descs().iter().enumerate() {
            let at = h.desc_offset as usize + i * size_desc;
            if super::format::Desc::decode(&bytes[at..at + size_desc]) != *d {
                return Err(format!(
                    "read() and pread() disagree on descriptor {}",
                    d.name
                ));
            }
        }
        let sample = r.sample().map_err(|e| e.to_string())?;
        let data = &bytes[h.data_offset as usize..end as usize];
        let seq: Vec<u64> = data
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        if seq == sample.values {
            return Ok(());
        }
        last = "read() and pread() disagree on the data block (values kept changing)".into();
    }
    Err(last)
}
