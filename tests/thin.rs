//! Thin volumes served by the daemon: data, discard, space accounting, restart, and crashes
//! (SIGKILL) at many points while a front end writes and flushes.

mod common;

use common::{pattern, Daemon, BIN};
use pollblk_driver::blk::*;
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use std::path::Path;
use std::process::Command;

const BLOCK: u64 = 64 << 10;

fn pool_cmd(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("pool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "pollblk pool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_pool(dir: &Path, size: &str) -> String {
    let pool = dir.join("pool");
    let p = pool.to_str().unwrap().to_string();
    pool_cmd(&["create", &p, "--size", size, "--block-size", "64K"]);
    pool_cmd(&["volume", "create", &p, "v0", "--size", "256M"]);
    p
}

fn serve(dir: &Path, pool: &str) -> (Daemon, std::path::PathBuf) {
    let socket = dir.join("v0.sock");
    let export = format!(
        "vhost-user-blk,socket={},pool={pool},volume=v0,num-queues=2",
        socket.display()
    );
    (Daemon::start(dir, &["--export".into(), export]), socket)
}

fn status(pool: &str) -> serde_json::Value {
    serde_json::from_str(&pool_cmd(&["status", pool, "--json"])).unwrap()
}

fn flush(d: &mut BlkDriver) -> u8 {
    d.run(
        0,
        &Request {
            kind: T_FLUSH,
            ..Default::default()
        },
    )
    .status
}

#[test]
fn a_thin_volume_stores_reads_zeroes_discards_and_survives_a_restart() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "32M");
    let (mut daemon, socket) = serve(dir.path(), &pool);
    let mut d = BlkDriver::connect(
        &socket,
        DriverOptions {
            queues: 2,
            ..Default::default()
        },
    );
    assert_eq!(d.capacity(), (256 << 20) / 512);
    // Unwritten space reads as zeroes.
    let (st, data) = d.read(0, 0, 8192);
    assert_eq!((st, data), (S_OK, vec![0; 8192]));
    // A partial write to a new block: the rest of the block reads as zeroes.
    let a = pattern(4096, 1);
    assert_eq!(d.write(1, 8, &a), S_OK);
    let (_, block) = d.read(0, 0, BLOCK as usize);
    assert!(block[..4096].iter().all(|&b| b == 0));
    assert_eq!(&block[4096..8192], &a[..]);
    assert!(block[8192..].iter().all(|&b| b == 0));
    // Two whole blocks far away, across queues.
    let b = pattern(2 * BLOCK as usize, 2);
    assert_eq!(d.write(0, (100 << 20) / 512, &b), S_OK);
    assert_eq!(d.read(1, (100 << 20) / 512, b.len()).1, b);
    assert_eq!(flush(&mut d), S_OK);
    drop(d);
    let s = status(&pool);
    assert_eq!(s["used_bytes"], 3 * BLOCK, "{s}");
    assert_eq!(s["volumes"][0]["mapped_bytes"], 3 * BLOCK);

    // Discard the two whole blocks: after a flush the space is back in the pool.
    let mut d = BlkDriver::connect(&socket, DriverOptions::default());
    let discard = Request {
        kind: T_DISCARD,
        out: dwz_segment((100 << 20) / 512, (2 * BLOCK / 512) as u32, 0),
        ..Default::default()
    };
    assert_eq!(d.run(0, &discard).status, S_OK);
    assert_eq!(d.read(0, (100 << 20) / 512, 4096).1, vec![0; 4096]);
    assert_eq!(flush(&mut d), S_OK);
    drop(d);
    assert_eq!(status(&pool)["used_bytes"], BLOCK);

    // A restart keeps what was written.
    assert_eq!(daemon.stop(), Some(0));
    let (_daemon, socket) = serve(dir.path(), &pool);
    let mut d = BlkDriver::connect(&socket, DriverOptions::default());
    assert_eq!(d.read(0, 8, 4096).1, a);
    assert_eq!(d.read(0, (100 << 20) / 512, 4096).1, vec![0; 4096]);
}

#[test]
fn a_full_pool_fails_the_write_with_ioerr_and_keeps_serving() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "256K"); // 4 blocks for a 256 MiB volume
    let (_daemon, socket) = serve(dir.path(), &pool);
    let mut d = BlkDriver::connect(&socket, DriverOptions::default());
    for i in 0..4u64 {
        assert_eq!(d.write(0, i * BLOCK / 512, &pattern(4096, i as u8)), S_OK);
    }
    assert_eq!(d.write(0, 10 * BLOCK / 512, &pattern(4096, 9)), S_IOERR);
    // Mapped blocks still take writes and reads.
    assert_eq!(d.write(0, 0, &pattern(4096, 7)), S_OK);
    assert_eq!(d.read(0, 0, 4096).1, pattern(4096, 7));
    assert_eq!(d.read(0, 10 * BLOCK / 512, 4096).1, vec![0; 4096]);
}

#[test]
fn sigkill_at_fifty_points_loses_no_flushed_write_and_leaves_a_consistent_pool() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "16M");
    let flushed = vec![vec![0; 4096]; 16];
    kill_while_writing(&pool, 50, flushed, || serve(dir.path(), &pool), |_, _| {});
}

/// SIGKILLs the daemon `crashes` times while a front end writes 4 KiB at the start of each of
/// the first blocks of the disk `serve` starts (and flushes now and then), `flushed` holding
/// what each block holds at first. After each kill the pool passes `pool check`, every
/// flushed write reads back, and each block holds its flushed contents or a write made since.
/// `after` runs after each restart (crash number, the restarted daemon).
fn kill_while_writing(
    pool: &str,
    crashes: u64,
    mut flushed: Vec<Vec<u8>>,
    mut serve: impl FnMut() -> (Daemon, std::path::PathBuf),
    mut after: impl FnMut(u64, &Daemon),
) {
    let blocks = flushed.len() as u64;
    let mut seed = 0x9e37_79b9u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for crash in 0..crashes {
        let (mut daemon, socket) = serve();
        let mut d = BlkDriver::connect(&socket, DriverOptions::default());
        // Everything flushed before reads back intact.
        for b in 0..blocks {
            assert_eq!(
                d.read(0, b * BLOCK / 512, 4096).1,
                flushed[b as usize],
                "crash {crash}: block {b} lost a flushed write"
            );
        }
        // Per block, what it may hold after the crash besides its flushed contents.
        let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); blocks as usize];
        for step in 0..(next() % 12) {
            let b = next() % blocks;
            let data = pattern(4096, (crash * 13 + step) as u8);
            assert_eq!(d.write(0, b * BLOCK / 512, &data), S_OK);
            since[b as usize] = vec![data];
            if next() % 3 == 0 {
                assert_eq!(flush(&mut d), S_OK);
                for (b, s) in since.iter_mut().enumerate() {
                    if let Some(data) = s.pop() {
                        flushed[b] = data;
                    }
                    s.clear();
                }
            }
        }
        // Requests still in flight when the kill comes: writes and a flush, not waited for.
        for i in 0..(next() % 4) {
            let b = next() % blocks;
            let data = pattern(4096, (crash * 7 + i + 100) as u8);
            let _ = d.submit(
                0,
                &Request {
                    kind: T_OUT,
                    sector: b * BLOCK / 512,
                    out: data.clone(),
                    ..Default::default()
                },
            );
            since[b as usize].push(data);
        }
        let _ = d.submit(
            0,
            &Request {
                kind: T_FLUSH,
                ..Default::default()
            },
        );
        // Kill without warning.
        let child = daemon.child.take().unwrap();
        // SAFETY: signals our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let mut child = child;
        child.wait().unwrap();
        drop(d);
        // Unflushed writes may or may not have survived; whatever a block holds now must be
        // its flushed contents or the unflushed write, and it becomes the new baseline.
        let out = Command::new(BIN)
            .args(["pool", "check", pool])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "crash {crash}: pool check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (daemon, socket) = serve();
        let mut d = BlkDriver::connect(&socket, DriverOptions::default());
        for b in 0..blocks as usize {
            let got = d.read(0, b as u64 * BLOCK / 512, 4096).1;
            let ok = got == flushed[b] || since[b].contains(&got);
            assert!(
                ok,
                "crash {crash}: block {b} holds data never written there"
            );
            flushed[b] = got;
        }
        after(crash, &daemon);
    }
}

fn provision(sector: u64, sectors: u32, flags: u32) -> Request {
    Request {
        kind: 15, // VIRTIO_BLK_T_PROVISION (seed 004)
        out: dwz_segment(sector, sectors, flags),
        ..Default::default()
    }
}

const F_PROVISION: u64 = 1 << 18;

#[test]
fn provision_allocates_ahead_of_writes_and_is_offered_only_when_enabled() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "256K"); // 4 blocks
    let socket = dir.path().join("p.sock");
    let export = format!(
        "vhost-user-blk,socket={},pool={pool},volume=v0,provision=on",
        socket.display()
    );
    let daemon = Daemon::start(dir.path(), &["--export".into(), export]);
    let full_config = DriverOptions {
        config_len: 104,
        ..Default::default()
    };
    let mut d = BlkDriver::connect(&socket, full_config.clone());
    assert_ne!(d.offered & F_PROVISION, 0);
    assert_eq!(d.config_u32(100), 32, "max_provision_seg");
    assert_eq!(d.config_u32(96), 1 << 22, "max_provision_sectors");
    // Provision two blocks: they read as zeroes and hold space.
    let two = (2 * BLOCK / 512) as u32;
    assert_eq!(d.run(0, &provision(0, two, 0)).status, S_OK);
    assert_eq!(d.read(0, 0, 4096).1, vec![0; 4096]);
    assert_eq!(flush(&mut d), S_OK);
    assert_eq!(status(&pool)["used_bytes"], 2 * BLOCK);
    // Fill the rest of the pool elsewhere; writes into the provisioned range still succeed.
    assert_eq!(d.write(0, 10 * BLOCK / 512, &pattern(4096, 1)), S_OK);
    assert_eq!(d.write(0, 11 * BLOCK / 512, &pattern(4096, 2)), S_OK);
    assert_eq!(d.write(0, 12 * BLOCK / 512, &pattern(4096, 3)), S_IOERR);
    assert_eq!(d.write(0, BLOCK / 512, &pattern(4096, 4)), S_OK);
    // Unknown flags (the unmap bit included) get UNSUPP; a full pool IOERR.
    assert_eq!(d.run(0, &provision(0, 8, 1)).status, S_UNSUPP);
    assert_eq!(d.run(0, &provision(0, 8, 0x80)).status, S_UNSUPP);
    assert_eq!(d.run(0, &provision(20 * BLOCK / 512, 8, 0)).status, S_IOERR);
    drop(d);
    drop(daemon);

    // Without provision=on the feature is not offered and the request is UNSUPP.
    let (_daemon, socket) = serve(dir.path(), &pool);
    let mut d = BlkDriver::connect(&socket, full_config);
    assert_eq!(d.offered & F_PROVISION, 0);
    assert_eq!(d.config_u32(100), 0);
    assert_eq!(d.run(0, &provision(0, 8, 0)).status, S_UNSUPP);
}

#[test]
fn provision_on_a_file_allocates_its_holes() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = common::image(dir.path(), "sparse.img", 64 << 20);
    let socket = dir.path().join("f.sock");
    let _daemon = Daemon::start(
        dir.path(),
        &common::file_export(&socket, &file, ",provision=on"),
    );
    let mut d = BlkDriver::connect(&socket, DriverOptions::default());
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&file).unwrap().blocks();
    assert_eq!(d.run(0, &provision(0, (8 << 20) / 512, 0)).status, S_OK);
    let after = std::fs::metadata(&file).unwrap().blocks();
    assert!(
        after >= before + (8 << 20) / 512,
        "{before} -> {after} blocks"
    );
    assert_eq!(d.read(0, 0, 4096).1, vec![0; 4096]);
}

#[test]
fn space_written_or_discarded_without_a_flush_shows_within_the_commit_period() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "32M");
    let (_daemon, socket) = serve(dir.path(), &pool);
    let mut d = BlkDriver::connect(&socket, DriverOptions::default());
    let wait_for = |what: &str, want: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let used = status(&pool)["used_bytes"].as_u64().unwrap();
            if used == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: pool status says {used} bytes used, not {want}, 5 s on"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    // Four new blocks, no FLUSH: the daemon has them at once (live, through its control
    // socket), and its 1 s commit makes them show in the pool's metadata.
    assert_eq!(d.write(0, 0, &pattern(4 * BLOCK as usize, 3)), S_OK);
    let control = dir.path().join("pollblk-data/control.sock");
    let live: serde_json::Value = serde_json::from_str(&pool_cmd(&[
        "status",
        &pool,
        "--json",
        "--control",
        control.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(live["used_bytes"], 4 * BLOCK, "{live}");
    wait_for("after writing 4 blocks", 4 * BLOCK);
    // Discarded, still no FLUSH (fio rw=trim does not flush): the space comes back.
    let discard = Request {
        kind: T_DISCARD,
        out: dwz_segment(0, (4 * BLOCK / 512) as u32, 0),
        ..Default::default()
    };
    assert_eq!(d.run(0, &discard).status, S_OK);
    wait_for("after discarding them", 0);
}

/// `--export` for volume `volume` of `pool` on DIR/VOLUME.sock, plus `extra`.
fn volume_export(dir: &Path, pool: &str, volume: &str, extra: &str) -> [String; 2] {
    [
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},pool={pool},volume={volume}{extra}",
            dir.join(format!("{volume}.sock")).display()
        ),
    ]
}

#[test]
fn a_served_volume_is_snapshotted_live_and_its_snapshot_and_clone_are_served_beside_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "64M");
    let control = dir.path().join("control.sock");
    let mut args = volume_export(dir.path(), &pool, "v0", "").to_vec();
    args.extend(["--control".into(), control.display().to_string()]);
    let _daemon = Daemon::start(dir.path(), &args);
    let mut v0 = BlkDriver::connect(&dir.path().join("v0.sock"), DriverOptions::default());
    let before = pattern(2 * BLOCK as usize, 1);
    assert_eq!(v0.write(0, 0, &before), S_OK);
    // No flush: a completed write is in the snapshot all the same.
    let rpc = |method: &str, params: &[&str]| common::rpc(dir.path(), &control, method, params);
    let snap = rpc(
        "volume_snapshot",
        &[&format!("pool={pool}"), "volume=v0", "snapshot=s"],
    )
    .unwrap();
    assert_eq!(snap["shared_bytes"], 2 * BLOCK, "{snap}");
    assert!(snap["paused_us"].as_u64().unwrap() < 1_000_000, "{snap}");
    assert_eq!(v0.write(0, 8, &pattern(4096, 2)), S_OK);

    // The snapshot is served read-only only, and reads as it was taken.
    let s_export = |extra: &str| {
        format!(
            "vhost-user-blk,socket={},pool={pool},volume=s{extra}",
            dir.path().join("s.sock").display()
        )
    };
    let refused = rpc("export_add", &[&format!("spec={}", s_export(""))]).unwrap_err();
    assert!(
        refused.contains("is a snapshot") && refused.contains("readonly=on"),
        "{refused}"
    );
    rpc(
        "export_add",
        &[&format!("spec={}", s_export(",readonly=on"))],
    )
    .unwrap();
    let mut s = BlkDriver::connect(&dir.path().join("s.sock"), DriverOptions::default());
    assert_ne!(s.offered & F_RO, 0, "the snapshot is offered read-only");
    assert_eq!(s.read(0, 0, before.len()).1, before);
    assert_eq!(s.write(0, 0, &pattern(4096, 3)), S_IOERR);

    // A clone of it, served writable beside both.
    rpc(
        "volume_clone",
        &[&format!("pool={pool}"), "snapshot=s", "volume=c"],
    )
    .unwrap();
    let c_spec = format!(
        "vhost-user-blk,socket={},pool={pool},volume=c",
        dir.path().join("c.sock").display()
    );
    rpc("export_add", &[&format!("spec={c_spec}")]).unwrap();
    let mut c = BlkDriver::connect(&dir.path().join("c.sock"), DriverOptions::default());
    assert_eq!(c.read(0, 0, before.len()).1, before);
    let mine = pattern(4096, 4);
    assert_eq!(c.write(0, 16, &mine), S_OK);
    let mut want = before.clone();
    want[16 * 512..16 * 512 + 4096].copy_from_slice(&mine);
    assert_eq!(c.read(0, 0, want.len()).1, want);
    assert_eq!(
        s.read(0, 0, before.len()).1,
        before,
        "the snapshot unchanged"
    );
    assert_eq!(v0.read(0, 16, 4096).1, before[16 * 512..16 * 512 + 4096]);

    // A served snapshot cannot be deleted; the status shows what each owns and shares.
    let busy = rpc("volume_delete", &[&format!("pool={pool}"), "volume=s"]).unwrap_err();
    assert!(busy.contains("export_remove it first"), "{busy}");
    // A copy's old block counts as shared until the copy is committed.
    assert_eq!(flush(&mut c), S_OK);
    let status = rpc("pool_status", &[&format!("pool={pool}")]).unwrap();
    let of = |name: &str| {
        status["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(of("s")["snapshot"], true);
    assert_eq!(of("c")["origin"], "s");
    // v0 copied block 0 on its write, c copied block 0 too: s owns its block 0 alone.
    assert_eq!(
        (
            of("c")["owned_bytes"].as_u64(),
            of("c")["shared_bytes"].as_u64()
        ),
        (Some(BLOCK), Some(BLOCK)),
        "{status}"
    );
    assert_eq!(of("s")["owned_bytes"], BLOCK, "{status}");
}

#[test]
fn sigkill_while_a_clone_is_written_keeps_its_served_snapshot_exact() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "16M");
    let image: Vec<Vec<u8>> = (0..16).map(|b| pattern(4096, 50 + b)).collect();
    {
        let (_daemon, socket) = serve(dir.path(), &pool);
        let mut d = BlkDriver::connect(&socket, DriverOptions::default());
        for (b, data) in image.iter().enumerate() {
            assert_eq!(d.write(0, b as u64 * BLOCK / 512, data), S_OK);
        }
        assert_eq!(flush(&mut d), S_OK);
    }
    pool_cmd(&["volume", "snapshot", &pool, "v0", "s"]);
    pool_cmd(&["volume", "clone", &pool, "s", "c"]);
    let serve_both = || {
        let mut args = volume_export(dir.path(), &pool, "c", "").to_vec();
        args.extend(volume_export(dir.path(), &pool, "s", ",readonly=on"));
        (Daemon::start(dir.path(), &args), dir.path().join("c.sock"))
    };
    kill_while_writing(&pool, 25, image.clone(), serve_both, |crash, _| {
        let mut s = BlkDriver::connect(&dir.path().join("s.sock"), DriverOptions::default());
        for (b, want) in image.iter().enumerate() {
            assert_eq!(
                &s.read(0, b as u64 * BLOCK / 512, 4096).1,
                want,
                "crash {crash}: snapshot block {b} changed"
            );
        }
    });
}

#[test]
fn pool_volume_snapshot_clone_inflate_and_status_from_the_command_line() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pool = make_pool(dir.path(), "16M");
    {
        let (_daemon, socket) = serve(dir.path(), &pool);
        let mut d = BlkDriver::connect(&socket, DriverOptions::default());
        assert_eq!(d.write(0, 0, &pattern(3 * BLOCK as usize, 9)), S_OK);
        assert_eq!(flush(&mut d), S_OK);
    }
    let out = pool_cmd(&["volume", "snapshot", &pool, "v0", "gold"]);
    assert!(out.contains("snapshot gold of volume v0"), "{out}");
    pool_cmd(&["volume", "clone", &pool, "gold", "vm1"]);
    let s = status(&pool);
    assert_eq!(
        s["used_bytes"],
        3 * BLOCK,
        "a clone takes no data blocks: {s}"
    );
    assert_eq!(s["volumes"][2]["shared_bytes"], 3 * BLOCK);
    let text = pool_cmd(&["status", &pool]);
    assert!(text.contains("snapshot gold (of v0)"), "{text}");
    assert!(text.contains("volume vm1 (of gold)"), "{text}");
    let out = pool_cmd(&["volume", "inflate", &pool, "vm1"]);
    assert!(
        out.contains(&format!("{} bytes copied", 3 * BLOCK)),
        "{out}"
    );
    assert_eq!(status(&pool)["used_bytes"], 6 * BLOCK);
    // Mistakes are named.
    let fails = |args: &[&str]| {
        let out = Command::new(BIN).arg("pool").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = fails(&["volume", "clone", &pool, "v0", "x"]);
    assert!(e.contains("not a snapshot"), "{e}");
    let e = fails(&["volume", "snapshot", &pool, "nope", "x"]);
    assert!(e.contains("no volume named \"nope\""), "{e}");
    let e = fails(&["volume", "snapshot", &pool, "v0", "vm1"]);
    assert!(e.contains("exists already"), "{e}");
    let e = fails(&["volume", "resize", &pool, "gold", "--size", "1G"]);
    assert!(e.contains("is a snapshot: read-only"), "{e}");
    pool_cmd(&["volume", "delete", &pool, "gold"]);
    pool_cmd(&["volume", "delete", &pool, "v0"]);
    assert_eq!(
        status(&pool)["used_bytes"],
        3 * BLOCK,
        "vm1 keeps its own copy"
    );
    pool_cmd(&["check", &pool]);
}
