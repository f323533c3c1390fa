//! On-disk encoding of a thin pool's metadata: the superblock and the records that make up
//! checkpoints and journals. Every piece carries a CRC32C; decoding never trusts a length or
//! an index it has not checked.
//!
//! Record frame (little-endian): `len u32 | crc32c u32 | generation u64 | seq u64 | payload`,
//! where `len` is the payload length and the CRC covers generation, seq and payload. A record of
//! another generation (a stale journal left by an interrupted checkpoint) or out of sequence
//! is not part of the current state.

use std::fmt;

/// Superblock magic.
pub const MAGIC: [u8; 8] = *b"PBLKTHIN";
/// Newest metadata format version this build reads and writes. Version 2 added
/// `Record::VolumeCopy` (snapshots and clones); a version 1 pool is read as it is and
/// upgraded (its superblock rewritten as version 2) the first time a volume is copied, so an
/// older pollblk refuses it from then on instead of misreading the new records. A pool of a
/// newer version is refused with a message naming both.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest metadata format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// First format version with `Record::VolumeCopy`.
pub const COPY_FORMAT_VERSION: u32 = 2;
/// Encoded superblock size.
pub const SUPERBLOCK_SIZE: usize = 64;
/// Record frame header size.
pub const FRAME_HEADER: usize = 24;
/// Largest payload a record may carry (a volume name is at most 255 bytes).
pub const MAX_PAYLOAD: usize = 512;
/// Longest volume name.
pub const MAX_NAME: usize = 64;
/// Map entry value meaning "not mapped".
pub const UNMAPPED: u64 = u64::MAX;

/// Why metadata could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    NotAPool,
    UnsupportedVersion(u32),
    Checksum,
    Corrupt(&'static str),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::NotAPool => write!(f, "not a pollblk thin pool (bad magic)"),
            FormatError::UnsupportedVersion(v) => write!(
                f,
                "pool metadata format {v} is not supported by this pollblk (it reads formats \
                 {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
            ),
            FormatError::Checksum => write!(f, "metadata checksum mismatch"),
            FormatError::Corrupt(what) => write!(f, "corrupt metadata: {what}"),
        }
    }
}

impl std::error::Error for FormatError {}

/// What a pool is; rewritten (atomically, by rename) at every checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Metadata format version (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).
    pub version: u32,
    /// Data block size in bytes: a power of two from 4 KiB to 2 MiB.
    pub block_size: u32,
    /// Blocks in the data file.
    pub data_blocks: u64,
    /// Generation of the current checkpoint and journal files.
    pub generation: u64,
}

pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 2 << 20;

impl Superblock {
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        assert!((OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.version));
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SUPERBLOCK_SIZE - 4]);
        b[SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        if b.len() < SUPERBLOCK_SIZE || b[0..8] != MAGIC {
            return Err(FormatError::NotAPool);
        }
        let version = u32_at(b, 8);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if crc32c::crc32c(&b[..SUPERBLOCK_SIZE - 4]) != u32_at(b, SUPERBLOCK_SIZE - 4) {
            return Err(FormatError::Checksum);
        }
        let sb = Superblock {
            version,
            block_size: u32_at(b, 12),
            data_blocks: u64_at(b, 16),
            generation: u64_at(b, 24),
        };
        if !sb.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&sb.block_size)
        {
            return Err(FormatError::Corrupt("block size"));
        }
        Ok(sb)
    }
}

/// One metadata change, or a marker. A journal applies records in order, and only those of
/// commits whose `Commit` marker made it to disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    VolumeCreate {
        id: u32,
        size_bytes: u64,
        name: String,
    },
    VolumeDelete {
        id: u32,
    },
    /// Volume `id` named `name` is created as a copy of volume `from` as the records before
    /// this one left it (its size and every map entry): a snapshot (read-only) or a clone
    /// (writable). The copy shares every mapped data block with `from` until one of them
    /// maps that virtual block elsewhere. `from` 0 copies nothing: an empty volume of size 0
    /// (a checkpoint writes a snapshot of a since-changed volume as that, a resize and its
    /// entries). Format version 2 on.
    VolumeCopy {
        from: u32,
        id: u32,
        snapshot: bool,
        name: String,
    },
    VolumeResize {
        id: u32,
        size_bytes: u64,
    },
    /// Virtual block `vblock` of volume `id` now lives in data block `pblock` (or nowhere:
    /// UNMAPPED). Idempotent: replaying it twice gives the same state.
    Map {
        id: u32,
        vblock: u64,
        pblock: u64,
    },
    /// Ends a commit (journal) or a checkpoint; `records` counts the records before it in
    /// the same commit or checkpoint.
    Commit {
        records: u64,
    },
}

const TAG_VOLUME_CREATE: u8 = 1;
const TAG_VOLUME_DELETE: u8 = 2;
const TAG_VOLUME_RESIZE: u8 = 3;
const TAG_MAP: u8 = 4;
const TAG_COMMIT: u8 = 5;
const TAG_VOLUME_COPY: u8 = 6;

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode_into(&self, generation: u64, seq: u64, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEADER]);
        match self {
            Record::VolumeCreate {
                id,
                size_bytes,
                name,
            } => {
                assert!(name.len() <= MAX_NAME);
                out.push(TAG_VOLUME_CREATE);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size_bytes.to_le_bytes());
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Record::VolumeDelete { id } => {
                out.push(TAG_VOLUME_DELETE);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Record::VolumeCopy {
                from,
                id,
                snapshot,
                name,
            } => {
                assert!(name.len() <= MAX_NAME);
                out.push(TAG_VOLUME_COPY);
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&id.to_le_bytes());
                out.push(u8::from(*snapshot));
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Record::VolumeResize { id, size_bytes } => {
                out.push(TAG_VOLUME_RESIZE);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size_bytes.to_le_bytes());
            }
            Record::Map { id, vblock, pblock } => {
                out.push(TAG_MAP);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&vblock.to_le_bytes());
                out.extend_from_slice(&pblock.to_le_bytes());
            }
            Record::Commit { records } => {
                out.push(TAG_COMMIT);
                out.extend_from_slice(&records.to_le_bytes());
            }
        }
        let payload_len = out.len() - start - FRAME_HEADER;
        debug_assert!(payload_len <= MAX_PAYLOAD);
        let frame = &mut out[start..];
        frame[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        frame[8..16].copy_from_slice(&generation.to_le_bytes());
        frame[16..24].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32c::crc32c(&frame[8..]);
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes the record at the start of `b`: (record, generation, seq, bytes used).
    pub fn decode(b: &[u8]) -> Result<(Record, u64, u64, usize), FormatError> {
        if b.len() < FRAME_HEADER {
            return Err(FormatError::Corrupt("truncated record"));
        }
        let len = u32_at(b, 0) as usize;
        if len == 0 || len > MAX_PAYLOAD || b.len() < FRAME_HEADER + len {
            return Err(FormatError::Corrupt("record length"));
        }
        let frame = &b[..FRAME_HEADER + len];
        if crc32c::crc32c(&frame[8..]) != u32_at(frame, 4) {
            return Err(FormatError::Checksum);
        }
        let generation = u64_at(frame, 8);
        let seq = u64_at(frame, 16);
        let p = &frame[FRAME_HEADER..];
        let need = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(FormatError::Corrupt("record payload size"))
            }
        };
        let record = match p[0] {
            TAG_VOLUME_CREATE => Record::VolumeCreate {
                name: name_at(p, 13)?,
                id: u32_at(p, 1),
                size_bytes: u64_at(p, 5),
            },
            TAG_VOLUME_COPY => {
                let name = name_at(p, 10)?;
                Record::VolumeCopy {
                    from: u32_at(p, 1),
                    id: u32_at(p, 5),
                    snapshot: match p[9] {
                        0 => false,
                        1 => true,
                        _ => return Err(FormatError::Corrupt("volume copy kind")),
                    },
                    name,
                }
            }
            TAG_VOLUME_DELETE => {
                need(5)?;
                Record::VolumeDelete { id: u32_at(p, 1) }
            }
            TAG_VOLUME_RESIZE => {
                need(13)?;
                Record::VolumeResize {
                    id: u32_at(p, 1),
                    size_bytes: u64_at(p, 5),
                }
            }
            TAG_MAP => {
                need(21)?;
                Record::Map {
                    id: u32_at(p, 1),
                    vblock: u64_at(p, 5),
                    pblock: u64_at(p, 13),
                }
            }
            TAG_COMMIT => {
                need(9)?;
                Record::Commit {
                    records: u64_at(p, 1),
                }
            }
            _ => return Err(FormatError::Corrupt("unknown record type")),
        };
        Ok((record, generation, seq, frame.len()))
    }
}

/// Reads the framed records of `generation` from `b` in sequence from `first_seq`, returning
/// the records of every complete commit (those followed by their valid Commit marker) and the
/// byte length they occupy. Decoding stops at the first record that is torn, corrupt, of
/// another generation or out of sequence: nothing after it was ever acknowledged.
pub fn read_commits(b: &[u8], generation: u64, first_seq: u64) -> (Vec<Record>, usize, u64) {
    let mut applied = Vec::new();
    let mut pending = Vec::new();
    let mut at = 0;
    let mut committed_len = 0;
    let mut seq = first_seq;
    while at < b.len() {
        let Ok((record, record_gen, record_seq, used)) = Record::decode(&b[at..]) else {
            break;
        };
        if record_gen != generation || record_seq != seq {
            break;
        }
        at += used;
        seq += 1;
        match record {
            Record::Commit { records } => {
                if records != pending.len() as u64 {
                    break;
                }
                applied.append(&mut pending);
                committed_len = at;
            }
            other => pending.push(other),
        }
    }
    let next_seq = first_seq + count_frames(&b[..committed_len]);
    (applied, committed_len, next_seq)
}

fn count_frames(mut b: &[u8]) -> u64 {
    let mut n = 0;
    while let Ok((_, _, _, used)) = Record::decode(b) {
        b = &b[used..];
        n += 1;
    }
    n
}

/// The name that ends payload `p`: its length byte at `at`, then its bytes.
fn name_at(p: &[u8], at: usize) -> Result<String, FormatError> {
    let Some(&len) = p.get(at) else {
        return Err(FormatError::Corrupt("record payload size"));
    };
    let len = usize::from(len);
    if p.len() != at + 1 + len {
        return Err(FormatError::Corrupt("record payload size"));
    }
    if len > MAX_NAME {
        return Err(FormatError::Corrupt("volume name length"));
    }
    Ok(std::str::from_utf8(&p[at + 1..])
        .map_err(|_| FormatError::Corrupt("volume name is not UTF-8"))?
        .to_string())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::VolumeCreate {
                id: 7,
                size_bytes: 1 << 30,
                name: "disk0".into(),
            },
            Record::Map {
                id: 7,
                vblock: 3,
                pblock: 99,
            },
            Record::VolumeResize {
                id: 7,
                size_bytes: 2 << 30,
            },
            Record::Map {
                id: 7,
                vblock: 3,
                pblock: UNMAPPED,
            },
            Record::VolumeCopy {
                from: 7,
                id: 8,
                snapshot: true,
                name: "disk0-before".into(),
            },
            Record::VolumeCopy {
                from: 8,
                id: 9,
                snapshot: false,
                name: "c".into(),
            },
            Record::VolumeDelete { id: 7 },
        ]
    }

    fn journal(generation: u64, commits: &[&[Record]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seq = 0;
        for commit in commits {
            for r in commit.iter() {
                r.encode_into(generation, seq, &mut out);
                seq += 1;
            }
            Record::Commit {
                records: commit.len() as u64,
            }
            .encode_into(generation, seq, &mut out);
            seq += 1;
        }
        out
    }

    #[test]
    fn superblock_round_trips_and_refuses_other_versions_and_damage() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            block_size: 65536,
            data_blocks: 1234,
            generation: 9,
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b), Ok(sb));
        let mut other = b;
        other[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(
            Superblock::decode(&other),
            Err(FormatError::UnsupportedVersion(FORMAT_VERSION + 1))
        );
        // Version 1 pools (before snapshots) are read as they are.
        let v1 = Superblock { version: 1, ..sb };
        assert_eq!(Superblock::decode(&v1.encode()), Ok(v1));
        let mut flipped = b;
        flipped[20] ^= 1;
        assert_eq!(Superblock::decode(&flipped), Err(FormatError::Checksum));
        assert_eq!(Superblock::decode(&[0u8; 64]), Err(FormatError::NotAPool));
    }

    #[test]
    fn records_round_trip() {
        for (seq, r) in sample().into_iter().enumerate() {
            let mut out = Vec::new();
            r.encode_into(5, seq as u64, &mut out);
            let (back, generation, s, used) = Record::decode(&out).unwrap();
            assert_eq!((back, generation, s, used), (r, 5, seq as u64, out.len()));
        }
    }

    #[test]
    fn only_complete_commits_of_the_generation_are_read() {
        let records = sample();
        let b = journal(3, &[&records[..2], &records[2..]]);
        let (all, len, next) = read_commits(&b, 3, 0);
        assert_eq!(all, records);
        assert_eq!((len, next), (b.len(), 9));
        // Every torn tail keeps exactly the commits that were whole.
        let first_commit_end = journal(3, &[&records[..2]]).len();
        for cut in 0..b.len() {
            let (got, len, _) = read_commits(&b[..cut], 3, 0);
            if cut < first_commit_end {
                assert!(got.is_empty(), "cut {cut}");
                assert_eq!(len, 0);
            } else {
                assert_eq!(got, records[..2].to_vec(), "cut {cut}");
                assert_eq!(len, first_commit_end);
            }
        }
        // A stale journal of an older generation contributes nothing.
        assert!(read_commits(&b, 4, 0).0.is_empty());
        // A flipped bit ends the journal at the damaged commit.
        let mut damaged = b.clone();
        damaged[first_commit_end + 30] ^= 0x40;
        assert_eq!(read_commits(&damaged, 3, 0).0, records[..2].to_vec());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 1;
        for len in 0..600 {
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Record::decode(&b);
            let _ = read_commits(&b, 0, 0);
            let _ = Superblock::decode(&b);
        }
    }
}
