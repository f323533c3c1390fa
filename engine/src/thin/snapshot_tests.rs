//! Snapshots, clones, copy on write and shared space: against what each volume must read,
//! across reopens, checkpoints and simulated crashes.

use super::format::{Superblock, FORMAT_VERSION};
use super::tests::{pattern, read_all, Rng, BS};
use super::{check, Pool, ThinError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const B: u64 = BS as u64;

fn pool_with(blocks: u64) -> (tempfile::TempDir, Pool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(&dir.path().join("pool"), blocks * B, BS).unwrap();
    (dir, pool)
}

fn status_of(pool: &Pool, name: &str) -> super::VolumeStatus {
    pool.status()
        .volumes
        .into_iter()
        .find(|v| v.name == name)
        .unwrap()
}

#[test]
fn a_snapshot_keeps_its_moment_and_each_clone_sees_only_its_own_writes() {
    let (dir, pool) = pool_with(64);
    let v = pool.volume_create("base", 8 * B).unwrap();
    for b in 0..6 {
        pool.write(&v, b * B, &pattern(b, B as usize)).unwrap();
    }
    let image = read_all(&pool, "base");
    let taken = pool.volume_snapshot("base", "gold").unwrap();
    assert_eq!(taken.shared_bytes, 6 * B);
    // The volume goes on changing; the snapshot does not.
    pool.write(&v, 512, &[7; 512]).unwrap();
    pool.discard(&v, B, B).unwrap();
    assert_eq!(read_all(&pool, "gold"), image);
    let clones: Vec<_> = (0..3)
        .map(|i| {
            let name = format!("vm{i}");
            pool.volume_clone("gold", &name).unwrap();
            pool.volume(&name).unwrap()
        })
        .collect();
    for (i, c) in clones.iter().enumerate() {
        pool.write(c, 2 * B + 1024, &[i as u8 + 1; 1024]).unwrap();
    }
    for (i, c) in clones.iter().enumerate() {
        let mut want = image.clone();
        want[(2 * B + 1024) as usize..(2 * B + 2048) as usize].fill(i as u8 + 1);
        assert_eq!(read_all(&pool, &c.name), want, "{}", c.name);
    }
    assert_eq!(read_all(&pool, "gold"), image);
    pool.verify_refs().unwrap();
    // Each clone owns the one block it wrote and shares the other five.
    let c = status_of(&pool, "vm0");
    assert_eq!((c.owned_bytes, c.shared_bytes), (B, 5 * B));
    assert_eq!(c.origin.as_deref(), Some("gold"));
    assert!(status_of(&pool, "gold").snapshot);
    // Blocks 0, 1 (the base's copies moved away) and 2 (every clone's copy): gold owns 2.
    let before = read_all(&pool, "vm1");
    pool.flush().unwrap();
    drop(pool);
    check(&dir.path().join("pool")).unwrap();
    let pool = Pool::open(&dir.path().join("pool")).unwrap();
    assert_eq!(read_all(&pool, "gold"), image);
    assert_eq!(read_all(&pool, "vm1"), before);
    pool.verify_refs().unwrap();
    pool.checkpoint().unwrap();
    drop(pool);
    let pool = Pool::open(&dir.path().join("pool")).unwrap();
    assert_eq!(read_all(&pool, "gold"), image);
    assert_eq!(read_all(&pool, "vm1"), before);
    assert!(pool.volume("gold").unwrap().snapshot);
    pool.verify_refs().unwrap();
}

#[test]
fn partial_writes_discards_and_provisioning_of_shared_blocks_touch_one_volume() {
    let (_dir, pool) = pool_with(32);
    let v = pool.volume_create("v", 4 * B).unwrap();
    let data = pattern(3, 4 * B as usize);
    pool.write(&v, 0, &data).unwrap();
    pool.volume_snapshot("v", "s").unwrap();
    let used = pool.status().used_bytes;
    // A partial write copies the rest of the block.
    pool.write(&v, 512, &[9; 512]).unwrap();
    let mut want = data.clone();
    want[512..1024].fill(9);
    assert_eq!(read_all(&pool, "v"), want);
    assert_eq!(read_all(&pool, "s"), data);
    assert_eq!(pool.status().used_bytes, used + B);
    // Discarding a shared block unmaps it in this volume only.
    pool.discard(&v, B, B).unwrap();
    want[B as usize..2 * B as usize].fill(0);
    assert_eq!(read_all(&pool, "v"), want);
    assert_eq!(read_all(&pool, "s"), data);
    // Provisioning a shared block gives this volume a private copy.
    pool.provision(&v, 2 * B, B).unwrap();
    assert_eq!(read_all(&pool, "v"), want);
    let s = status_of(&pool, "v");
    assert_eq!((s.owned_bytes, s.shared_bytes), (2 * B, B));
    // Write-zeroes without unmap on a shared block: a zeroed private copy.
    pool.write_zeroes(&v, 3 * B, 512, false).unwrap();
    want[3 * B as usize..3 * B as usize + 512].fill(0);
    assert_eq!(read_all(&pool, "v"), want);
    assert_eq!(read_all(&pool, "s"), data);
    pool.flush().unwrap();
    pool.verify_refs().unwrap();
}

#[test]
fn deleting_a_snapshot_keeps_what_its_clones_need_and_frees_the_rest() {
    let (dir, pool) = pool_with(32);
    let v = pool.volume_create("v", 4 * B).unwrap();
    pool.write(&v, 0, &pattern(1, 4 * B as usize)).unwrap();
    pool.volume_snapshot("v", "s").unwrap();
    pool.volume_delete("v").unwrap();
    let c = pool.volume_clone("s", "c").unwrap();
    assert_eq!(
        c.paused,
        std::time::Duration::ZERO,
        "a snapshot is not frozen"
    );
    let c = pool.volume("c").unwrap();
    pool.write(&c, 0, &[5; 4096]).unwrap();
    pool.flush().unwrap();
    // s owns block 0 alone now (c copied it); deleting s frees that one.
    assert_eq!(status_of(&pool, "s").owned_bytes, B);
    let used = pool.status().used_bytes;
    let want = read_all(&pool, "c");
    pool.volume_delete("s").unwrap();
    assert_eq!(pool.status().used_bytes, used - B);
    assert_eq!(read_all(&pool, "c"), want);
    let s = status_of(&pool, "c");
    assert_eq!((s.owned_bytes, s.shared_bytes, s.origin), (4 * B, 0, None));
    pool.verify_refs().unwrap();
    drop(pool);
    check(&dir.path().join("pool")).unwrap();
    let pool = Pool::open(&dir.path().join("pool")).unwrap();
    assert_eq!(read_all(&pool, "c"), want);
}

#[test]
fn inflating_a_clone_makes_it_own_every_block() {
    let (_dir, pool) = pool_with(32);
    let v = pool.volume_create("v", 4 * B).unwrap();
    pool.write(&v, 0, &pattern(2, 3 * B as usize)).unwrap();
    pool.volume_snapshot("v", "s").unwrap();
    pool.volume_clone("s", "c").unwrap();
    let want = read_all(&pool, "c");
    assert_eq!(pool.volume_inflate("c").unwrap(), 3 * B);
    assert_eq!(read_all(&pool, "c"), want);
    let c = status_of(&pool, "c");
    assert_eq!((c.owned_bytes, c.shared_bytes), (3 * B, 0));
    // The snapshot still shares with v, not with c.
    assert_eq!(status_of(&pool, "s").shared_bytes, 3 * B);
    assert_eq!(pool.volume_inflate("c").unwrap(), 0);
    pool.verify_refs().unwrap();
}

#[test]
fn snapshots_refuse_writes_and_names_and_sources_are_checked() {
    let (_dir, pool) = pool_with(16);
    let v = pool.volume_create("v", 2 * B).unwrap();
    pool.write(&v, 0, &[1; 4096]).unwrap();
    pool.volume_snapshot("v", "s").unwrap();
    let s = pool.volume("s").unwrap();
    for result in [
        pool.write(&s, 0, &[2; 512]),
        pool.discard(&s, 0, B),
        pool.write_zeroes(&s, 0, B, true),
        pool.provision(&s, B, B),
        pool.volume_resize("s", 4 * B),
    ] {
        assert!(matches!(result, Err(ThinError::ReadOnly(_))), "{result:?}");
    }
    assert!(
        pool.map_one(&s, 0, 512, true).is_none(),
        "no fast path either"
    );
    assert_eq!(read_all(&pool, "s")[..4096], [1; 4096]);
    assert!(matches!(
        pool.volume_snapshot("v", "s"),
        Err(ThinError::VolumeExists(_))
    ));
    assert!(matches!(
        pool.volume_snapshot("missing", "x"),
        Err(ThinError::NoVolume(_))
    ));
    assert!(matches!(
        pool.volume_clone("s", "v"),
        Err(ThinError::VolumeExists(_))
    ));
    let not_a_snapshot = pool.volume_clone("v", "c").unwrap_err().to_string();
    assert!(
        not_a_snapshot.contains("not a snapshot"),
        "{not_a_snapshot}"
    );
    assert!(pool.volume_snapshot("v", "bad/name").is_err());
    assert_eq!(pool.status().volumes.len(), 2, "nothing made by a refusal");
}

#[test]
fn a_full_pool_fails_a_copy_on_write_and_changes_nothing() {
    let (_dir, pool) = pool_with(4);
    let v = pool.volume_create("v", 4 * B).unwrap();
    let data = pattern(4, 2 * B as usize);
    pool.write(&v, 0, &data).unwrap();
    pool.volume_snapshot("v", "s").unwrap();
    pool.volume_clone("s", "c").unwrap();
    let c = pool.volume("c").unwrap();
    pool.write(&c, 0, &[3; 512]).unwrap();
    pool.write(&v, 0, &[4; 512]).unwrap();
    // Four blocks used: the two shared by v/s/c minus ... plus two copies. Now full.
    assert_eq!(pool.status().free_bytes, 0);
    assert!(matches!(
        pool.write(&c, B, &[6; 512]),
        Err(ThinError::NoSpace)
    ));
    assert_eq!(read_all(&pool, "s")[..2 * B as usize], data[..]);
    assert_eq!(
        read_all(&pool, "c")[B as usize..2 * B as usize],
        data[B as usize..]
    );
    pool.verify_refs().unwrap();
}

#[test]
fn a_crash_keeps_the_snapshot_exact_and_the_clone_keeps_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let blocks = 8u64;
    {
        let pool = Pool::create(&path, 64 * B, BS).unwrap();
        let v = pool.volume_create("v", blocks * B).unwrap();
        pool.write(&v, 0, &pattern(9, (blocks * B) as usize))
            .unwrap();
        pool.volume_snapshot("v", "s").unwrap();
        pool.volume_clone("s", "c").unwrap();
    }
    let image = read_all(&Pool::open(&path).unwrap(), "s");
    let mut rng = Rng(7);
    let mut flushed: Vec<Vec<u8>> = image.chunks(B as usize).map(|c| c.to_vec()).collect();
    for crash in 0..60u64 {
        let pool = Pool::open(&path).unwrap();
        let c = pool.volume("c").unwrap();
        let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); blocks as usize];
        for step in 0..rng.below(16) {
            let b = rng.below(blocks);
            let piece = rng.below(8) * 512;
            match rng.below(5) {
                0 | 1 => {
                    let mut now = flushed[b as usize].clone();
                    if let Some(last) = since[b as usize].last() {
                        now = last.clone();
                    }
                    now[piece as usize..piece as usize + 512]
                        .copy_from_slice(&pattern(crash * 100 + step, 512));
                    pool.write(
                        &c,
                        b * B + piece,
                        &now[piece as usize..piece as usize + 512],
                    )
                    .unwrap();
                    since[b as usize].push(now);
                }
                2 => {
                    pool.discard(&c, b * B, B).unwrap();
                    since[b as usize].push(vec![0; B as usize]);
                }
                op => {
                    // A checkpoint flushes first.
                    match op {
                        3 => pool.flush().unwrap(),
                        _ => pool.checkpoint().unwrap(),
                    }
                    for (b, s) in since.iter_mut().enumerate() {
                        if let Some(last) = s.pop() {
                            flushed[b] = last;
                        }
                        s.clear();
                    }
                }
            }
            pool.verify_refs().unwrap();
        }
        drop(pool); // the crash: no flush
        check(&path).unwrap();
        let pool = Pool::open(&path).unwrap();
        assert_eq!(
            read_all(&pool, "s"),
            image,
            "crash {crash}: the snapshot changed"
        );
        pool.verify_refs().unwrap();
        let c = pool.volume("c").unwrap();
        for b in 0..blocks {
            let mut got = vec![0u8; B as usize];
            pool.read(&c, b * B, &mut got).unwrap();
            // The flushed contents, or one written since the flush; nothing else.
            assert!(
                got == flushed[b as usize] || since[b as usize].contains(&got),
                "crash {crash}: clone block {b} holds data never written there"
            );
            flushed[b as usize] = got;
        }
    }
}

#[test]
fn a_snapshot_under_concurrent_writes_holds_every_completed_write_and_none_begun_after() {
    let (_dir, pool) = pool_with(256);
    let pool = Arc::new(pool);
    let v = pool.volume_create("v", 16 * B).unwrap();
    // Write n goes to block n % 16 and fills it with n.
    let (started, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, v, started, done, stop) = (
                pool.clone(),
                v.clone(),
                started.clone(),
                done.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = started.fetch_add(1, Ordering::SeqCst);
                    let block = vec![(n % 251) as u8 + 1; B as usize];
                    pool.write(&v, (n % 16) * B, &block).unwrap();
                    // Completions counted in order: "done" is a floor of what completed.
                    while done
                        .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let completed_before = done.load(Ordering::SeqCst);
    pool.volume_snapshot("v", "s").unwrap();
    let begun_before_return = started.load(Ordering::SeqCst);
    let image = read_all(&pool, "s");
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(
        read_all(&pool, "s"),
        image,
        "the snapshot changed after it was taken"
    );
    for b in 0..16u64 {
        let got = &image[(b * B) as usize..((b + 1) * B) as usize];
        assert!(got.iter().all(|&x| x == got[0]), "block {b} torn");
        // The write it holds: not older than the last one completed before the call, and
        // begun before the call returned.
        let last_completed = (0..completed_before).rev().find(|n| n % 16 == b);
        let fits = |n: u64| (n % 251) as u8 + 1 == got[0] && n % 16 == b;
        let lower = last_completed.unwrap_or(0);
        assert!(
            (lower..begun_before_return).any(fits),
            "block {b} holds {}: no write between #{lower} and #{begun_before_return}",
            got[0]
        );
    }
    pool.verify_refs().unwrap();
}

#[test]
fn a_hundred_clones_checkpoint_as_their_differences() {
    let (dir, pool) = pool_with(512);
    let v = pool.volume_create("image", 256 * B).unwrap();
    pool.write(&v, 0, &pattern(5, (256 * B) as usize)).unwrap();
    pool.volume_snapshot("image", "gold").unwrap();
    pool.volume_delete("image").unwrap();
    for i in 0..100 {
        pool.volume_clone("gold", &format!("vm{i}")).unwrap();
    }
    let c7 = pool.volume("vm7").unwrap();
    pool.write(&c7, 3 * B, &[7; 4096]).unwrap();
    pool.volume_resize("vm7", 300 * B).unwrap();
    pool.checkpoint().unwrap();
    let checkpoint: u64 = std::fs::read_dir(dir.path().join("pool"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint."))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // 256 entries for the snapshot, one per clone and one more for vm7: ~ 20 KiB. Written
    // out in full, 100 clones would take 100 x 256 entries (1.1 MiB).
    assert!(checkpoint < 32 << 10, "checkpoint of {checkpoint} bytes");
    let want = read_all(&pool, "vm7");
    let gold = read_all(&pool, "gold");
    drop(pool);
    let pool = Pool::open(&dir.path().join("pool")).unwrap();
    assert_eq!(read_all(&pool, "vm7"), want);
    assert_eq!(read_all(&pool, "vm50"), gold);
    assert_eq!(pool.status().volumes.len(), 101);
    pool.verify_refs().unwrap();
}

#[test]
fn a_format_1_pool_is_read_and_upgraded_by_its_first_snapshot() {
    let (dir, pool) = pool_with(16);
    let v = pool.volume_create("v", 2 * B).unwrap();
    pool.write(&v, 0, &[3; 4096]).unwrap();
    pool.flush().unwrap();
    drop(pool);
    let path = dir.path().join("pool");
    let sb = |path: &std::path::Path| {
        Superblock::decode(&std::fs::read(path.join("superblock")).unwrap()).unwrap()
    };
    let v1 = Superblock {
        version: 1,
        ..sb(&path)
    };
    std::fs::write(path.join("superblock"), v1.encode()).unwrap();
    let pool = Pool::open(&path).unwrap();
    assert_eq!(read_all(&pool, "v")[..4096], [3; 4096]);
    pool.volume_create("w", B).unwrap();
    assert_eq!(sb(&path).version, 1, "nothing new written: still format 1");
    pool.volume_snapshot("v", "s").unwrap();
    assert_eq!(sb(&path).version, FORMAT_VERSION);
    pool.checkpoint().unwrap();
    assert_eq!(sb(&path).version, FORMAT_VERSION);
    drop(pool);
    let pool = Pool::open(&path).unwrap();
    assert_eq!(read_all(&pool, "s")[..4096], [3; 4096]);
}

#[test]
fn after_a_crash_a_volume_never_holds_what_a_volume_it_shared_with_wrote() {
    // A golden image's volume and a clone of its deleted snapshot share blocks, both
    // writable: the first to copy a block must not let the other write it in place before
    // that copy is durable, or a crash would hand the first one the other's data.
    let (dir, pool) = pool_with(16);
    let path = dir.path().join("pool");
    let v = pool.volume_create("v", 2 * B).unwrap();
    pool.write(&v, 0, &[1; 4096]).unwrap();
    pool.volume_snapshot("v", "s").unwrap();
    pool.volume_clone("s", "c").unwrap();
    pool.volume_delete("s").unwrap();
    let c = pool.volume("c").unwrap();
    pool.write(&v, 0, &[2; 512]).unwrap(); // v copies block 0, not committed
    pool.write(&c, 0, &[3; 4096]).unwrap(); // c must copy it too
    drop(pool); // crash
    let pool = Pool::open(&path).unwrap();
    let got = read_all(&pool, "v");
    assert!(
        got[..4096] == [1; 4096] || got[..512] == [2; 512],
        "v holds {:?}: the clone's write",
        &got[..4]
    );
    pool.verify_refs().unwrap();
}

#[test]
fn a_copy_on_write_keeps_the_holes_of_the_block_it_copies() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let big = 64 << 10;
    let pool = Pool::create(&path, 16 * big, big as u32).unwrap();
    let v = pool.volume_create("v", 4 * big).unwrap();
    let mut want = vec![0u8; big as usize];
    // Data at the start, in the middle and at the end of the block; holes between.
    for (at, byte) in [(0, 1), (20 << 10, 3), (60 << 10, 4)] {
        pool.write(&v, at, &[byte; 4096]).unwrap();
        want[at as usize..at as usize + 4096].fill(byte);
    }
    pool.volume_snapshot("v", "s").unwrap();
    let image = want.clone();
    let allocated = || std::fs::metadata(path.join("data")).unwrap().blocks() * 512;
    let before = allocated();
    pool.write(&v, (32 << 10) + 512, &[2; 1024]).unwrap();
    want[(32 << 10) + 512..(32 << 10) + 1536].fill(2);
    assert_eq!(read_all(&pool, "v")[..big as usize], want[..]);
    assert_eq!(read_all(&pool, "s")[..big as usize], image[..]);
    // Four pages of data, not a whole 64 KiB block (where the file system makes holes).
    let grew = allocated() - before;
    assert!(grew <= 24 << 10, "the copy took {grew} bytes");
}

#[test]
fn the_fast_path_covers_contiguous_mapped_blocks_and_nothing_else() {
    let (_dir, pool) = pool_with(64);
    let v = pool.volume_create("v", 16 * B).unwrap();
    // Blocks 0-3 written in order land on data blocks 0-3; block 5 after a gap elsewhere.
    pool.write(&v, 0, &pattern(1, (4 * B) as usize)).unwrap();
    let w = pool.volume_create("w", 4 * B).unwrap();
    pool.write(&w, 0, &[1; 4096]).unwrap();
    pool.write(&v, 5 * B, &[2; 4096]).unwrap();
    let fast = |offset: u64, len: u64, write: bool| {
        let got = pool.map_one(&v, offset, len, write);
        if let Some((_, slot)) = got {
            pool.unpin(slot);
        }
        got.map(|(at, _)| at)
    };
    assert_eq!(
        fast(512, 4 * B - 512, false),
        Some(512),
        "four contiguous blocks"
    );
    assert_eq!(fast(0, 4 * B, true), Some(0));
    assert_eq!(fast(3 * B, 3 * B, false), None, "block 4 is unmapped");
    assert_eq!(fast(4 * B + 512, 2 * B, false), None);
    assert_eq!(
        fast(5 * B, B, false),
        Some(5 * B),
        "one block, wherever it is"
    );
    // Shared blocks: reads stay fast, writes do not.
    pool.volume_snapshot("v", "s").unwrap();
    assert_eq!(fast(0, 2 * B, false), Some(0));
    assert_eq!(fast(0, 2 * B, true), None);
}
