//! The Xen blkif back end against a front end written in C on Xen's own ring.h and blkif.h
//! (tests/xen/blkfront.c), run as its own process over the loopback platform: every queue
//! count and ring order offered, both protocol ABIs (the front end built for x86_64 and with
//! -m32), refused requests, a broken ring, and closing and reconnecting between runs.
//!
//! Needs Xen's public headers (libxen-dev) and a C compiler with 32-bit support
//! (gcc-multilib); without them the tests say so and pass, unless POLLBLK_REQUIRE_XEN=1 (CI).

mod common;

use common::{image, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the C front end for `abi` ("64" or "32") into `dir`; None if this machine cannot.
fn build_blkfront(dir: &Path, abi: &str) -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xen/blkfront.c");
    let out = dir.join(format!("blkfront{abi}"));
    let result = Command::new("cc")
        .args(["-O2", "-fno-strict-aliasing", "-Wall", "-Werror"])
        .args([&format!("-m{abi}"), "-o"])
        .arg(&out)
        .arg(&source)
        .output();
    match result {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).into_owned();
            skip_or_fail(&format!(
                "cannot build the {abi}-bit blkif front end: {why}"
            ))
        }
        Err(e) => skip_or_fail(&format!("no C compiler: {e}")),
    }
}

fn skip_or_fail(why: &str) -> Option<PathBuf> {
    assert!(
        std::env::var_os("POLLBLK_REQUIRE_XEN").is_none(),
        "{why} (apt-get install libxen-dev gcc-multilib)"
    );
    eprintln!("SKIPPED: {why} (apt-get install libxen-dev gcc-multilib)");
    None
}

/// Both front ends, or None (skipped).
fn front_ends(dir: &Path) -> Option<[PathBuf; 2]> {
    Some([build_blkfront(dir, "64")?, build_blkfront(dir, "32")?])
}

fn export(store: &Path, domid: u32, devid: u32, file: &Path) -> Vec<String> {
    export_with(store, domid, devid, file, "")
}

/// An export with more options (`,readonly=on`...).
fn export_with(store: &Path, domid: u32, devid: u32, file: &Path, extra: &str) -> Vec<String> {
    vec![
        "--export".into(),
        format!(
            "xen-blkif-loopback,dir={},domid={domid},devid={devid},file={},num-queues=4{extra}",
            store.display(),
            file.display()
        ),
    ]
}

/// Runs a front end as domain `domid` on its device `devid`; returns (exit code, stdout +
/// stderr).
fn run(
    front: &Path,
    store: &Path,
    domid: u32,
    devid: u32,
    queues: u32,
    order: u32,
    mode: &str,
) -> (i32, String) {
    let out = Command::new(front)
        .arg(store.join("xenstore.sock"))
        .args([
            &domid.to_string(),
            &devid.to_string(),
            &queues.to_string(),
            &order.to_string(),
        ])
        .args((!mode.is_empty()).then_some(mode))
        .output()
        .expect("run blkfront");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn c_front_ends_pass_on_every_queue_count_ring_order_and_abi() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fronts) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let file = image(dir.path(), "disk.img", 64 << 20);
    let _daemon = Daemon::start(dir.path(), &export(&store, 1, 51712, &file));
    // One daemon for every run: each front end closes the device and the next reconnects.
    for queues in [1, 2, 4] {
        for order in 0..=3 {
            for front in &fronts {
                let (code, out) = run(front, &store, 1, 51712, queues, order, "");
                assert_eq!(
                    code,
                    0,
                    "{} {queues} queue(s), order {order}:\n{out}",
                    front.display()
                );
                assert!(out.contains(": ok"), "{out}");
            }
        }
    }
    // The engine counts the rings like virtqueues: every queue served requests and errors.
    let stats = Command::new(common::BIN)
        .args(["stats", "--json"])
        .arg(dir.path().join("pollblk-data/stats"))
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let text = json.to_string();
    for queue in 0..4 {
        assert!(
            text.contains(&format!("disk0/queue-{queue}\"")),
            "no queue {queue}"
        );
    }
    let counters = |name: &str| -> u64 {
        let mut sum = 0;
        collect(&json, name, &mut sum);
        sum
    };
    // 24 runs over 7 queues in all (1 + 2 + 4 per ABI and order): 7 errors and 2 refused
    // operations each, per queue exercised, and two discards (one of no sectors).
    let exercised = (1 + 2 + 4) * 4 * 2;
    assert_eq!(counters("errors_ioerr"), 7 * exercised);
    assert_eq!(counters("errors_unsupp"), 2 * exercised);
    assert!(counters("read_ops") > 0 && counters("discard_ops") == 2 * exercised);
}

/// Sums every value named `name` anywhere in `v`.
fn collect(v: &serde_json::Value, name: &str, sum: &mut u64) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if key == name {
                    *sum += value["value"].as_f64().expect("a counter") as u64;
                } else {
                    collect(value, name, sum);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect(i, name, sum)),
        _ => {}
    }
}

#[test]
fn a_front_end_asking_too_much_is_refused_in_xenstore_and_can_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some([front, _]) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let file = image(dir.path(), "disk.img", 64 << 20);
    let _daemon = Daemon::start(dir.path(), &export(&store, 1, 51712, &file));
    // The front end checks xenbus_dev_fatal's error/<backend path>/error key too.
    let (code, out) = run(&front, &store, 1, 51712, 5, 0, "refuse");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("multi-queue-num-queues=5: this back end offers 1 to 4"),
        "{out}"
    );
    let (code, out) = run(&front, &store, 1, 51712, 1, 4, "refuse");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ring-page-order=4: this back end offers at most 3"),
        "{out}"
    );
    let (code, out) = run(&front, &store, 1, 51712, 2, 1, "");
    assert_eq!(code, 0, "after the refusals: {out}");
}

#[test]
fn a_front_end_that_vanishes_is_torn_down_and_the_next_one_served() {
    let dir = tempfile::tempdir().unwrap();
    let Some([front, _]) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let file = image(dir.path(), "disk.img", 64 << 20);
    let _daemon = Daemon::start(dir.path(), &export(&store, 1, 51712, &file));
    for _ in 0..3 {
        // Requests in the ring, then gone without closing (a crashed guest).
        let (code, out) = run(&front, &store, 1, 51712, 4, 1, "vanish");
        assert_eq!(code, 0, "{out}");
        let (code, out) = run(&front, &store, 1, 51712, 2, 0, "");
        assert_eq!(code, 0, "after a front end vanished: {out}");
    }
}

#[test]
fn an_overrun_ring_stops_alone_and_other_disks_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let Some([front, _]) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let (a, b) = (
        image(dir.path(), "a.img", 64 << 20),
        image(dir.path(), "b.img", 64 << 20),
    );
    // Two guests: domain 1's disk breaks, domain 2's must not notice.
    let mut args = export(&store, 1, 51712, &a);
    args.extend(export(&store, 2, 51712, &b));
    let _daemon = Daemon::start(dir.path(), &args);
    std::thread::scope(|s| {
        // The second disk runs its whole exercise while the first one's ring breaks.
        let other = s.spawn(|| run(&front, &store, 2, 51712, 4, 2, ""));
        let (code, out) = run(&front, &store, 1, 51712, 2, 0, "overrun");
        assert_eq!(code, 0, "{out}");
        let (code, out) = other.join().unwrap();
        assert_eq!(code, 0, "the other disk: {out}");
    });
    // The broken ring was torn down at close: the device serves a new connection.
    let (code, out) = run(&front, &store, 1, 51712, 2, 0, "");
    assert_eq!(code, 0, "after the overrun: {out}");
}

#[test]
fn a_linux_like_front_end_after_one_with_more_queues_is_served() {
    // Linux's talk_to_blkback never removes multi-queue-num-queues or ring-page-order: it
    // relies on the toolstack having removed a departed domain's keys.
    let dir = tempfile::tempdir().unwrap();
    let Some([front, _]) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let file = image(dir.path(), "disk.img", 64 << 20);
    let _daemon = Daemon::start(dir.path(), &export(&store, 1, 51712, &file));
    let (code, out) = run(&front, &store, 1, 51712, 2, 1, "vanish");
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&front, &store, 1, 51712, 1, 0, "nocleanup");
    assert_eq!(
        code, 0,
        "a one-queue front end after a two-queue one: {out}"
    );
}

/// Both front ends in `mode`, one after the other, on a disk exported with `extra`.
fn both_abis_pass(extra: &str, mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let Some(fronts) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let file = image(dir.path(), "disk.img", 64 << 20);
    let args = export_with(&store, 1, 51712, &file, extra);
    let _daemon = Daemon::start(dir.path(), &args);
    for front in &fronts {
        let (code, out) = run(front, &store, 1, 51712, 2, 1, mode);
        assert_eq!(code, 0, "{}: {out}", front.display());
        assert!(out.contains(": ok"), "{out}");
    }
}

#[test]
fn a_readonly_disk_serves_reads_and_refuses_every_write_on_both_abis() {
    both_abis_pass(",readonly=on", "readonly");
}

#[test]
fn a_4k_disk_serves_aligned_requests_and_refuses_others_on_both_abis() {
    both_abis_pass(",block-size=4096", "4k");
}

#[test]
fn a_front_end_without_persistent_grants_is_refused_and_can_come_back() {
    // Loopback grants stay mapped for the front end's lifetime, as on real Xen: a front end
    // must promise feature-persistent (Linux blkfront does by default).
    let dir = tempfile::tempdir().unwrap();
    let Some([front, _]) = front_ends(dir.path()) else {
        return;
    };
    let store = dir.path().join("xs");
    let file = image(dir.path(), "disk.img", 64 << 20);
    let _daemon = Daemon::start(dir.path(), &export(&store, 1, 51712, &file));
    let (code, out) = run(&front, &store, 1, 51712, 1, 0, "nopersist");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("needs feature-persistent=1"), "{out}");
    let (code, out) = run(&front, &store, 1, 51712, 1, 0, "");
    assert_eq!(code, 0, "after the refusal: {out}");
}
