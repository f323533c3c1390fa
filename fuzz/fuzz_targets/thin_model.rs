//! The thin pool against a model: arbitrary sequences of volume creation, deletion and
//! resizing, snapshots, clones and inflating, writes, discards, write-zeroes (with and
//! without unmap), provisioning, flushes, checkpoints and reopening, on a small pool that runs
//! out of space. After every operation a volume reads exactly as the model says (a snapshot
//! as when it was taken, a clone as its snapshot plus its own writes), a zeroed range reads
//! zeroes, a discarded one zeroes or what it held (never another volume's data), every
//! change to a snapshot is refused, the reference counts agree with the maps
//! (`verify_refs`), and the pool passes `thin::check` whenever it is reopened.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pollblk_engine::thin::{self, Pool, ThinError};
use std::collections::{BTreeMap, BTreeSet};

const BLOCK: u32 = 4096;
const SECTOR: u64 = 512;
const POOL_BLOCKS: u64 = 24;

#[derive(Arbitrary, Debug)]
enum Op {
    Create {
        name: u8,
        blocks: u8,
    },
    Delete {
        name: u8,
    },
    Snapshot {
        name: u8,
        to: u8,
    },
    Clone {
        name: u8,
        to: u8,
    },
    Inflate {
        name: u8,
    },
    Resize {
        name: u8,
        blocks: u8,
    },
    Write {
        name: u8,
        sector: u8,
        sectors: u8,
        byte: u8,
    },
    Discard {
        name: u8,
        sector: u8,
        sectors: u8,
    },
    WriteZeroes {
        name: u8,
        sector: u8,
        sectors: u8,
        unmap: bool,
    },
    Provision {
        name: u8,
        sector: u8,
        sectors: u8,
    },
    Flush,
    Checkpoint,
    Reopen,
}

fuzz_target!(|ops: Vec<Op>| {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool::create(dir.path(), POOL_BLOCKS * u64::from(BLOCK), BLOCK).unwrap();
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut snapshots: BTreeSet<String> = BTreeSet::new();
    for op in ops.iter().take(48) {
        let vol = |name: u8| format!("v{}", name % 4);
        // A change to a snapshot: refused, and the model stays as it is.
        let refused = |r: &Result<(), ThinError>, name: &str| {
            let read_only = matches!(r, Err(ThinError::ReadOnly(_)));
            assert_eq!(read_only, snapshots.contains(name), "{name}: {r:?}");
            read_only
        };
        // A range in whole sectors inside the volume, or None.
        let range = |m: &BTreeMap<String, Vec<u8>>, name: &str, sector: u8, sectors: u8| {
            let len = m.get(name)?.len() as u64;
            let start = u64::from(sector) * SECTOR;
            let n = u64::from(sectors % 16 + 1) * SECTOR;
            (start + n <= len).then_some((start, n))
        };
        match *op {
            Op::Create { name, blocks } => {
                let size = u64::from(blocks % 12 + 1) * u64::from(BLOCK);
                match pool.volume_create(&vol(name), size) {
                    Ok(_) => assert!(model.insert(vol(name), vec![0; size as usize]).is_none()),
                    Err(ThinError::VolumeExists(_)) => assert!(model.contains_key(&vol(name))),
                    Err(e) => panic!("create: {e}"),
                }
            }
            Op::Delete { name } => match pool.volume_delete(&vol(name)) {
                Ok(()) => {
                    assert!(model.remove(&vol(name)).is_some());
                    snapshots.remove(&vol(name));
                }
                Err(ThinError::NoVolume(_)) => assert!(!model.contains_key(&vol(name))),
                Err(e) => panic!("delete: {e}"),
            },
            Op::Snapshot { name, to } | Op::Clone { name, to } => {
                let snapshot = matches!(op, Op::Snapshot { .. });
                let (from, to) = (vol(name), vol(to));
                let made = match snapshot {
                    true => pool.volume_snapshot(&from, &to),
                    false => pool.volume_clone(&from, &to),
                };
                match made {
                    Ok(_) => {
                        let data = model[&from].clone();
                        assert!(model.insert(to.clone(), data).is_none());
                        if snapshot {
                            snapshots.insert(to);
                        }
                    }
                    Err(ThinError::NoVolume(_)) => assert!(!model.contains_key(&from)),
                    Err(ThinError::VolumeExists(_)) => assert!(model.contains_key(&to)),
                    Err(ThinError::Invalid(_)) => assert!(!snapshot && !snapshots.contains(&from)),
                    Err(e) => panic!("copy: {e}"),
                }
            }
            Op::Inflate { name } => match pool.volume_inflate(&vol(name)) {
                Ok(_) | Err(ThinError::NoSpace) => assert!(model.contains_key(&vol(name))),
                Err(ThinError::NoVolume(_)) => assert!(!model.contains_key(&vol(name))),
                Err(ThinError::ReadOnly(_)) => assert!(snapshots.contains(&vol(name))),
                Err(e) => panic!("inflate: {e}"),
            },
            Op::Resize { name, blocks } => {
                let size = u64::from(blocks % 12 + 1) * u64::from(BLOCK);
                match pool.volume_resize(&vol(name), size) {
                    Ok(()) => {
                        let m = model
                            .get_mut(&vol(name))
                            .expect("resized a modelled volume");
                        m.resize(size as usize, 0);
                    }
                    Err(ThinError::NoVolume(_)) => assert!(!model.contains_key(&vol(name))),
                    Err(ThinError::ReadOnly(_)) => assert!(snapshots.contains(&vol(name))),
                    Err(ThinError::Invalid(_)) => {} // shrinking may be refused
                    Err(e) => panic!("resize: {e}"),
                }
            }
            Op::Write {
                name,
                sector,
                sectors,
                byte,
            } => {
                let Some((start, n)) = range(&model, &vol(name), sector, sectors) else {
                    continue;
                };
                let v = pool.volume(&vol(name)).unwrap();
                let data = vec![byte; n as usize];
                let written = pool.write(&v, start, &data);
                if refused(&written, &vol(name)) {
                    continue;
                }
                match written {
                    Ok(()) => model.get_mut(&vol(name)).unwrap()
                        [start as usize..(start + n) as usize]
                        .copy_from_slice(&data),
                    Err(ThinError::NoSpace) => {
                        // A failed write may have landed in part: learn what the pool holds.
                        let mut now = vec![0u8; n as usize];
                        pool.read(&v, start, &mut now).unwrap();
                        for (i, b) in now.iter().enumerate() {
                            let m = &mut model.get_mut(&vol(name)).unwrap()[start as usize + i];
                            assert!(*b == *m || *b == byte, "a failed write left foreign data");
                            *m = *b;
                        }
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
            Op::Discard {
                name,
                sector,
                sectors,
            } => {
                let Some((start, n)) = range(&model, &vol(name), sector, sectors) else {
                    continue;
                };
                let v = pool.volume(&vol(name)).unwrap();
                let discarded = pool.discard(&v, start, n);
                if refused(&discarded, &vol(name)) {
                    continue;
                }
                discarded.unwrap();
                // A discard may deallocate (reads zeroes) or, for part of a block, leave the
                // data: either is fine, anything else (another volume's data) is not.
                let mut now = vec![0u8; n as usize];
                pool.read(&v, start, &mut now).unwrap();
                let m =
                    &mut model.get_mut(&vol(name)).unwrap()[start as usize..(start + n) as usize];
                for (b, old) in now.iter().zip(m.iter_mut()) {
                    assert!(
                        *b == 0 || *b == *old,
                        "a discarded range reads foreign data"
                    );
                    *old = *b;
                }
            }
            Op::WriteZeroes {
                name,
                sector,
                sectors,
                unmap,
            } => {
                let Some((start, n)) = range(&model, &vol(name), sector, sectors) else {
                    continue;
                };
                let v = pool.volume(&vol(name)).unwrap();
                let zeroed = pool.write_zeroes(&v, start, n, unmap);
                if refused(&zeroed, &vol(name)) {
                    continue;
                }
                match zeroed {
                    Ok(()) => model.get_mut(&vol(name)).unwrap()
                        [start as usize..(start + n) as usize]
                        .fill(0),
                    Err(ThinError::NoSpace) => {}
                    Err(e) => panic!("write_zeroes: {e}"),
                }
            }
            Op::Provision {
                name,
                sector,
                sectors,
            } => {
                let Some((start, n)) = range(&model, &vol(name), sector, sectors) else {
                    continue;
                };
                let v = pool.volume(&vol(name)).unwrap();
                let provisioned = pool.provision(&v, start, n);
                if refused(&provisioned, &vol(name)) {
                    continue;
                }
                match provisioned {
                    Ok(()) | Err(ThinError::NoSpace) => {}
                    Err(e) => panic!("provision: {e}"),
                }
            }
            Op::Flush => pool.flush().unwrap(),
            Op::Checkpoint => pool.checkpoint().unwrap(),
            Op::Reopen => {
                pool.flush().unwrap();
                drop(pool);
                thin::check(dir.path()).expect("a flushed pool passes the checker");
                pool = Pool::open(dir.path()).unwrap();
            }
        }
        pool.verify_refs().expect("reference counts agree with the maps");
        // Every volume reads as modelled.
        for (name, data) in &model {
            let v = pool.volume(name).unwrap();
            let mut now = vec![0u8; data.len()];
            pool.read(&v, 0, &mut now).unwrap();
            assert!(
                now == *data,
                "volume {name} differs from the model after {op:?}"
            );
        }
    }
});
