//! The thin pool's metadata reader on hostile bytes: a journal of arbitrary records (volumes
//! created, copied (snapshots, clones, copies of nothing or of unknown volumes), deleted,
//! resized, blocks mapped anywhere, commit markers anywhere), framed with
//! valid checksums so they reach the replay, then with arbitrary bytes flipped and the tail
//! cut, opened as a pool.
//!
//! Invariants: opening either fails with an error or gives a pool whose state passes
//! `thin::check` (every mapped block inside the data file, shared only at one virtual block)
//! and whose volumes read without error and whose reference counts agree with the maps; the
//! record decoder never reads past its input.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pollblk_engine::thin::format::{self, Record, UNMAPPED};
use pollblk_engine::thin::{self, Pool};

const BLOCK: u32 = 4096;
const POOL_BYTES: u64 = 64 * BLOCK as u64;

#[derive(Arbitrary, Debug)]
enum Spec {
    Create {
        id: u8,
        blocks: u8,
        name: u8,
    },
    Delete {
        id: u8,
    },
    Copy {
        from: u8,
        id: u8,
        snapshot: bool,
        name: u8,
    },
    Resize {
        id: u8,
        blocks: u16,
    },
    Map {
        id: u8,
        vblock: u16,
        pblock: Option<u8>,
    },
    Commit {
        records: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    specs: Vec<Spec>,
    flips: Vec<(u16, u8)>,
    cut: Option<u16>,
    raw: Vec<u8>,
}

fuzz_target!(|input: Input| {
    // The decoder on raw bytes.
    if let Ok((_, _, _, used)) = Record::decode(&input.raw) {
        assert!(used <= input.raw.len());
    }
    let (_, used, _) = format::read_commits(&input.raw, 0, 0);
    assert!(used <= input.raw.len());

    let dir = tempfile::tempdir().unwrap();
    drop(Pool::create(dir.path(), POOL_BYTES, BLOCK).unwrap());
    let generation = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("journal.")?.parse::<u64>().ok())
        .unwrap();
    let mut journal = Vec::new();
    for (seq, spec) in input.specs.iter().take(64).enumerate() {
        let record = match *spec {
            Spec::Create { id, blocks, name } => Record::VolumeCreate {
                id: u32::from(id % 8),
                size_bytes: u64::from(blocks % 32) * u64::from(BLOCK),
                name: format!("v{}", name % 4),
            },
            Spec::Delete { id } => Record::VolumeDelete {
                id: u32::from(id % 8),
            },
            Spec::Copy {
                from,
                id,
                snapshot,
                name,
            } => Record::VolumeCopy {
                from: u32::from(from % 8),
                id: u32::from(id % 8),
                snapshot,
                name: format!("v{}", name % 4),
            },
            Spec::Resize { id, blocks } => Record::VolumeResize {
                id: u32::from(id % 8),
                size_bytes: u64::from(blocks) * u64::from(BLOCK),
            },
            Spec::Map { id, vblock, pblock } => Record::Map {
                id: u32::from(id % 8),
                vblock: u64::from(vblock % 64),
                pblock: pblock.map_or(UNMAPPED, |p| u64::from(p % 80)),
            },
            Spec::Commit { records } => Record::Commit {
                records: u64::from(records % 8),
            },
        };
        record.encode_into(generation, seq as u64, &mut journal);
    }
    for &(at, xor) in input.flips.iter().take(4) {
        if !journal.is_empty() {
            let at = usize::from(at) % journal.len();
            journal[at] ^= xor;
        }
    }
    if let Some(cut) = input.cut {
        journal.truncate(usize::from(cut));
    }
    std::fs::write(dir.path().join(format!("journal.{generation}")), &journal).unwrap();

    let Ok(pool) = Pool::open(dir.path()) else {
        return;
    };
    pool.verify_refs().expect("reference counts agree with the maps");
    let status = pool.status();
    let mut buf = vec![0u8; BLOCK as usize];
    for v in &status.volumes {
        let volume = pool.volume(&v.name).expect("a listed volume opens");
        let mut offset = 0;
        while offset + u64::from(BLOCK) <= volume.size_bytes() {
            pool.read(&volume, offset, &mut buf)
                .expect("a mapped block reads");
            offset += u64::from(BLOCK);
        }
    }
    drop(pool);
    thin::check(dir.path()).expect("a pool that opened passes the checker");
});
