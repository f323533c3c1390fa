//! The pool against a model: random operations on several volumes, reopened after flushes and
//! after simulated crashes (the pool dropped without a flush, as a killed process leaves it).

use super::format::{Superblock, FORMAT_VERSION};
use super::{Pool, ThinError};
use std::collections::HashMap;

pub(super) const BS: u32 = 4096;
const SECTOR: u64 = 512;

/// xorshift, seeded per test for reproducible sequences.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Byte-exact model of each volume: what reads must return.
struct Model {
    volumes: HashMap<String, Vec<u8>>,
}

pub(super) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8).wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect()
}

pub(super) fn read_all(pool: &Pool, name: &str) -> Vec<u8> {
    let v = pool.volume(name).unwrap();
    let mut buf = vec![0u8; v.size_bytes() as usize];
    pool.read(&v, 0, &mut buf).unwrap();
    buf
}

#[test]
fn random_operations_match_the_model_across_flushes_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let mut pool = Pool::create(&path, 64 * u64::from(BS), BS).unwrap();
    let mut model = Model {
        volumes: HashMap::new(),
    };
    for (name, blocks) in [("a", 20u64), ("b", 30), ("c", 40)] {
        pool.volume_create(name, blocks * u64::from(BS)).unwrap();
        model
            .volumes
            .insert(name.into(), vec![0; (blocks * u64::from(BS)) as usize]);
    }
    let mut rng = Rng(0x1234_5678);
    for step in 0..3000u64 {
        let name = ["a", "b", "c"][rng.below(3) as usize];
        let v = pool.volume(name).unwrap();
        let size = v.size_bytes() / SECTOR;
        let start = rng.below(size);
        let len = 1 + rng.below((size - start).min(3 * u64::from(BS) / SECTOR));
        let (offset, bytes) = (start * SECTOR, len * SECTOR);
        let m = model.volumes.get_mut(name).unwrap();
        let range = offset as usize..(offset + bytes) as usize;
        match rng.below(8) {
            0..=2 => {
                let data = pattern(step, bytes as usize);
                match pool.write(&v, offset, &data) {
                    Ok(()) => m[range].copy_from_slice(&data),
                    Err(ThinError::NoSpace) => {
                        // The blocks mapped before the pool ran out hold the data; the model
                        // cannot tell which, so re-read them as the new truth.
                        pool.read(&v, offset, &mut m[range]).unwrap();
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
            3 => {
                pool.discard(&v, offset, bytes).unwrap();
                // Whole blocks read as zeroes now; partial ends keep their data.
                let bs = u64::from(BS);
                let first = offset.div_ceil(bs) * bs;
                let last = (offset + bytes) / bs * bs;
                if first < last {
                    m[first as usize..last as usize].fill(0);
                }
            }
            4 => {
                let unmap = rng.below(2) == 0;
                match pool.write_zeroes(&v, offset, bytes, unmap) {
                    Ok(()) | Err(ThinError::NoSpace) if unmap => m[range].fill(0),
                    Ok(()) => m[range].fill(0),
                    Err(ThinError::NoSpace) => pool.read(&v, offset, &mut m[range]).unwrap(),
                    Err(e) => panic!("write_zeroes: {e}"),
                }
            }
            5 => match pool.provision(&v, offset, bytes) {
                Ok(()) | Err(ThinError::NoSpace) => {}
                Err(e) => panic!("provision: {e}"),
            },
            6 => pool.flush().unwrap(),
            _ => {
                let mut buf = vec![0u8; bytes as usize];
                pool.read(&v, offset, &mut buf).unwrap();
                assert_eq!(
                    buf, m[range],
                    "step {step}: read of {name} at {offset}+{bytes}"
                );
            }
        }
        if step % 500 == 499 {
            pool.flush().unwrap();
            if step % 1000 == 999 {
                pool.checkpoint().unwrap();
            }
            drop(pool);
            pool = Pool::open(&path).unwrap();
            for (name, bytes) in &model.volumes {
                assert_eq!(&read_all(&pool, name), bytes, "after reopen at step {step}");
            }
            let status = pool.status();
            let mapped: u64 = status.volumes.iter().map(|v| v.mapped_bytes).sum();
            assert_eq!(
                mapped, status.used_bytes,
                "every used block belongs to a volume"
            );
        }
    }
}

#[test]
fn a_crash_keeps_every_flushed_write_and_invents_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let bs = u64::from(BS);
    Pool::create(&path, 32 * bs, BS).unwrap();
    {
        let pool = Pool::open(&path).unwrap();
        pool.volume_create("v", 16 * bs).unwrap();
    }
    let mut rng = Rng(99);
    // Per block: the contents at the last flush, and every contents written since.
    let mut flushed: Vec<Vec<u8>> = vec![vec![0; bs as usize]; 16];
    for crash in 0..60u64 {
        let pool = Pool::open(&path).unwrap();
        let v = pool.volume("v").unwrap();
        let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 16];
        for step in 0..rng.below(20) {
            let b = rng.below(16);
            match rng.below(4) {
                0 | 1 => {
                    let data = pattern(crash * 100 + step, bs as usize);
                    pool.write(&v, b * bs, &data).unwrap();
                    since[b as usize].push(data);
                }
                2 => {
                    pool.discard(&v, b * bs, bs).unwrap();
                    since[b as usize].push(vec![0; bs as usize]);
                }
                _ => {
                    pool.flush().unwrap();
                    for (b, s) in since.iter_mut().enumerate() {
                        if let Some(last) = s.pop() {
                            flushed[b] = last;
                        }
                        s.clear();
                    }
                }
            }
        }
        drop(pool); // the crash: no flush
        let pool = Pool::open(&path).unwrap();
        let v = pool.volume("v").unwrap();
        for b in 0..16u64 {
            let mut got = vec![0u8; bs as usize];
            pool.read(&v, b * bs, &mut got).unwrap();
            // A discard that was not flushed may come back; the block then holds what it held
            // at the last flush. Nothing else may appear.
            let ok = got == flushed[b as usize] || since[b as usize].contains(&got);
            assert!(
                ok,
                "crash {crash}: block {b} holds data never written there"
            );
            flushed[b as usize] = got;
        }
        drop(pool);
        let status = super::check(&path).unwrap();
        assert_eq!(status.volumes[0].mapped_bytes, status.used_bytes);
    }
}

#[test]
fn a_freed_block_never_shows_another_volumes_data() {
    let dir = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    let pool = Pool::create(&dir.path().join("pool"), 2 * bs, BS).unwrap();
    let a = pool.volume_create("a", 2 * bs).unwrap();
    let b = pool.volume_create("b", 2 * bs).unwrap();
    pool.write(&a, 0, &vec![0xaa; 2 * bs as usize]).unwrap();
    pool.discard(&a, 0, 2 * bs).unwrap();
    // Not reusable before the unmapping is durable: the pool is full until a flush.
    assert!(matches!(
        pool.write(&b, 0, &[1; 512]),
        Err(ThinError::NoSpace)
    ));
    pool.flush().unwrap();
    pool.write(&b, 512, &[0xbb; 512]).unwrap();
    let mut got = vec![0u8; bs as usize];
    pool.read(&b, 0, &mut got).unwrap();
    assert!(
        got[..512].iter().all(|&x| x == 0),
        "old data before the write"
    );
    assert!(got[512..1024].iter().all(|&x| x == 0xbb));
    assert!(
        got[1024..].iter().all(|&x| x == 0),
        "old data after the write"
    );
}

#[test]
fn a_full_pool_fails_writes_that_need_space_and_recovers_after_discard() {
    let dir = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    let pool = Pool::create(&dir.path().join("pool"), 4 * bs, BS).unwrap();
    let v = pool.volume_create("big", 100 * bs).unwrap();
    for b in 0..4 {
        pool.write(&v, b * bs, &[7; 512]).unwrap();
    }
    assert!(matches!(
        pool.write(&v, 10 * bs, &[7; 512]),
        Err(ThinError::NoSpace)
    ));
    // Overwrites of mapped blocks need no space.
    pool.write(&v, 0, &[8; 512]).unwrap();
    let status = pool.status();
    assert_eq!((status.used_bytes, status.free_bytes), (4 * bs, 0));
    pool.discard(&v, 3 * bs, bs).unwrap();
    pool.flush().unwrap();
    assert_eq!(pool.status().free_bytes, bs);
    pool.write(&v, 10 * bs, &[9; 512]).unwrap();
}

#[test]
fn pools_of_another_format_version_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    drop(Pool::create(&path, 16 * u64::from(BS), BS).unwrap());
    let mut raw = std::fs::read(path.join("superblock")).unwrap();
    raw[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(path.join("superblock"), &raw).unwrap();
    let err = Pool::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains(&format!("format {}", FORMAT_VERSION + 1)),
        "{err}"
    );
    assert!(Superblock::decode(&raw).is_err());
}

#[test]
fn volume_names_sizes_and_duplicates_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(&dir.path().join("pool"), 16 * u64::from(BS), BS).unwrap();
    pool.volume_create("disk0", 1 << 30).unwrap();
    assert!(matches!(
        pool.volume_create("disk0", 4096),
        Err(ThinError::VolumeExists(_))
    ));
    assert!(pool.volume_create("bad/name", 4096).is_err());
    assert!(pool.volume_create("odd", 1000).is_err());
    let again = Pool::open(&dir.path().join("pool"))
        .err()
        .expect("locked")
        .to_string();
    assert!(again.contains("in use by another process"), "{again}");
    pool.volume_delete("disk0").unwrap();
    assert!(matches!(pool.volume("disk0"), Err(ThinError::NoVolume(_))));
    assert!(Pool::create(&dir.path().join("pool"), 16 * 4096, BS).is_err());
    assert!(Pool::create(&dir.path().join("p2"), 1 << 20, 3000).is_err());
}

#[test]
fn a_discarded_block_is_not_freed_while_an_io_that_looked_it_up_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    let pool = std::sync::Arc::new(Pool::create(&dir.path().join("pool"), 2 * bs, BS).unwrap());
    let v = pool.volume_create("v", 2 * bs).unwrap();
    pool.write(&v, 0, &[5; 512]).unwrap();
    let pin = pool.pin(); // an I/O in progress that looked the block up
    pool.discard(&v, 0, bs).unwrap();
    let flusher = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.flush().unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !flusher.is_finished(),
        "flush freed a block an I/O may still use"
    );
    assert_eq!(pool.status().used_bytes, bs);
    drop(pin);
    flusher.join().unwrap();
    assert_eq!(pool.status().used_bytes, 0);
}

#[test]
fn volumes_grow_and_shrink_and_shrinking_frees_the_cut_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let bs = u64::from(BS);
    let pool = Pool::create(&path, 16 * bs, BS).unwrap();
    let v = pool.volume_create("v", 4 * bs).unwrap();
    pool.write(&v, 0, &pattern(1, 512)).unwrap();
    pool.write(&v, 3 * bs, &pattern(2, 512)).unwrap();
    pool.volume_resize("v", 8 * bs).unwrap();
    let v = pool.volume("v").unwrap();
    assert_eq!(v.size_bytes(), 8 * bs);
    pool.write(&v, 7 * bs, &pattern(3, 512)).unwrap();
    pool.volume_resize("v", 2 * bs).unwrap();
    assert_eq!(
        pool.status().used_bytes,
        bs,
        "blocks past the new end are freed"
    );
    pool.flush().unwrap();
    drop(pool);
    let pool = Pool::open(&path).unwrap();
    let v = pool.volume("v").unwrap();
    assert_eq!(v.size_bytes(), 2 * bs);
    let mut got = vec![0u8; 512];
    pool.read(&v, 0, &mut got).unwrap();
    assert_eq!(got, pattern(1, 512));
    assert!(
        pool.write(&v, 2 * bs, &[1; 512]).is_err(),
        "past the new end"
    );
    assert_eq!(pool.status().used_bytes, bs);
}

#[test]
fn a_write_through_a_volume_taken_before_it_grew_is_committed() {
    // A request in flight holds the volume it looked up; the daemon grows a volume while it
    // is served. That request's first write must land in the map the pool commits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let bs = u64::from(BS);
    let pool = Pool::create(&path, 16 * bs, BS).unwrap();
    let held = pool.volume_create("v", 2 * bs).unwrap();
    pool.volume_resize("v", 4 * bs).unwrap();
    assert_eq!(held.size_bytes(), 4 * bs, "the held volume grew too");
    pool.write(&held, 0, &pattern(1, 512)).unwrap();
    pool.write(&held, 3 * bs, &pattern(2, 512)).unwrap();
    pool.flush().unwrap();
    drop((held, pool));
    let pool = Pool::open(&path).unwrap();
    let v = pool.volume("v").unwrap();
    let mut got = vec![0u8; 512];
    pool.read(&v, 0, &mut got).unwrap();
    assert_eq!(got, pattern(1, 512), "write before the grown part");
    pool.read(&v, 3 * bs, &mut got).unwrap();
    assert_eq!(got, pattern(2, 512), "write into the grown part");
    assert_eq!(super::check(&path).unwrap().used_bytes, 2 * bs);
}

#[test]
fn first_writes_racing_a_growing_volume_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let bs = u64::from(BS);
    const STEPS: u64 = 64;
    let pool = Pool::create(&path, 4 * STEPS * bs, BS).unwrap();
    let v = pool.volume_create("v", bs).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for step in 2..=STEPS {
                pool.volume_resize("v", step * bs).unwrap();
            }
        });
        // Every block of the volume, written as soon as the volume reaches it.
        let mut next = 0;
        while next < STEPS {
            if (next + 1) * bs <= v.size_bytes() {
                pool.write(&v, next * bs, &pattern(next, 512)).unwrap();
                next += 1;
            } else {
                std::thread::yield_now();
            }
        }
    });
    pool.flush().unwrap();
    drop((v, pool));
    let pool = Pool::open(&path).unwrap();
    let v = pool.volume("v").unwrap();
    let mut got = vec![0u8; 512];
    for block in 0..STEPS {
        pool.read(&v, block * bs, &mut got).unwrap();
        assert_eq!(got, pattern(block, 512), "block {block}");
    }
    let status = super::check(&path).unwrap();
    assert_eq!(status.used_bytes, STEPS * bs, "a block leaked or was lost");
}

#[test]
fn concurrent_writers_and_flushes_lose_nothing_with_at_most_one_commit_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let bs = u64::from(BS);
    let pool = std::sync::Arc::new(Pool::create(&path, 256 * bs, BS).unwrap());
    let v = pool.volume_create("v", 256 * bs).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (pool, v) = (pool.clone(), v.clone());
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let block = t * 64 + i;
                    pool.write(&v, block * bs, &pattern(block, 512)).unwrap();
                    pool.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let commits = pool.commits();
    assert!(commits <= 160, "{commits} commits for 160 flushes");
    drop(v);
    drop(pool);
    let pool = Pool::open(&path).unwrap();
    let v = pool.volume("v").unwrap();
    for t in 0..4u64 {
        for i in 0..40u64 {
            let block = t * 64 + i;
            let mut got = vec![0u8; 512];
            pool.read(&v, block * bs, &mut got).unwrap();
            assert_eq!(got, pattern(block, 512), "block {block} after reopen");
        }
    }
}

#[test]
fn shrinking_into_a_block_then_growing_reads_zeroes_past_the_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    let pool = Pool::create(&dir.path().join("pool"), 16 * bs, BS).unwrap();
    let v = pool.volume_create("v", 4 * bs).unwrap();
    pool.write(&v, 0, &pattern(9, 2 * bs as usize)).unwrap();
    pool.volume_resize("v", bs + bs / 2).unwrap();
    pool.volume_resize("v", 4 * bs).unwrap();
    let v = pool.volume("v").unwrap();
    let mut got = vec![0u8; 2 * bs as usize];
    pool.read(&v, 0, &mut got).unwrap();
    let cut = (bs + bs / 2) as usize;
    assert_eq!(
        &got[..cut],
        &pattern(9, 2 * bs as usize)[..cut],
        "kept part"
    );
    assert!(got[cut..].iter().all(|&b| b == 0), "the cut part came back");
}

#[test]
fn a_volume_too_large_to_map_is_refused_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    let pool = Pool::create(&dir.path().join("pool"), 2 * bs, BS).unwrap();
    // 8 EiB would need 2^63 / BS map entries: refused with a message, not an abort.
    let huge = 8u64 << 60;
    let e = pool.volume_create("huge", huge).err().expect("refused");
    assert!(matches!(e, ThinError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("at most"), "{e}");
    // A thin volume larger than the pool is still fine, and so is growing within the limit.
    let v = pool.volume_create("big", 1024 * bs).unwrap();
    assert!(pool.volume_resize("big", huge).is_err());
    pool.volume_resize("big", 2048 * bs).unwrap();
    assert_eq!(pool.volume("big").unwrap().size_bytes(), 2048 * bs);
    drop(v);
}
