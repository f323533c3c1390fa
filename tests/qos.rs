//! Per-disk limits (QoS), as a tenant's front end meets them: the rate it gets at QD1 and
//! QD128, a burst and its end, a throttle group shared by two disks, limits changed under
//! load, a FLUSH behind throttled writes, and the mistakes an operator makes in the options.

mod common;

use common::{rpc, Daemon, BIN};
use pollblk_driver::blk::{Pending, F_EVENT_IDX, S_OK, T_FLUSH, T_IN, T_OUT};
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use std::collections::VecDeque;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A 1 GiB null disk on `socket` with `options` appended, and a control socket.
fn daemon(dir: &Path, exports: &[&str]) -> Daemon {
    let mut args = vec![
        "--control".to_string(),
        dir.join("ctl.sock").display().to_string(),
    ];
    for options in exports {
        args.push("--export".into());
        args.push(format!(
            "vhost-user-blk,null,size=1G,num-queues=1,{options}"
        ));
    }
    Daemon::start(dir, &args)
}

/// A front end that asks for a call on every completion (without EVENT_IDX this driver
/// would only look at its ring every 5 ms, and count that, not the limit).
fn connect(socket: &Path) -> BlkDriver {
    BlkDriver::connect(
        socket,
        DriverOptions {
            ram_bytes: 256 << 20,
            queue_size: 512,
            accept: !F_EVENT_IDX,
            ..DriverOptions::default()
        },
    )
}

fn read_request(i: u64) -> Request {
    Request {
        kind: T_IN,
        sector: (i * 8) % (1 << 20),
        in_len: 4096,
        ..Default::default()
    }
}

/// Keeps `depth` 4 KiB reads in flight for `warmup + window`; returns the reads completed
/// within the window.
fn reads_in_window(d: &mut BlkDriver, depth: usize, warmup: Duration, window: Duration) -> u64 {
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + window);
    let mut pending: VecDeque<Pending> = (0..depth as u64)
        .map(|i| d.submit(0, &read_request(i)))
        .collect();
    let (mut counted, mut issued) = (0, depth as u64);
    while let Some(p) = pending.pop_front() {
        let done = d.wait(p);
        assert_eq!(done.status, S_OK);
        let now = Instant::now();
        if now >= from && now < until {
            counted += 1;
        }
        if now < until {
            pending.push_back(d.submit(0, &read_request(issued)));
            issued += 1;
        }
    }
    counted
}

fn assert_near(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= want * 0.05,
        "{what}: {got:.0} per second, the limit is {want:.0} (within 5%)"
    );
}

#[test]
fn a_limited_disk_gets_its_iops_at_qd1_and_qd128() {
    let dir = tempdir();
    let d = dir.path();
    let socket = d.join("d.sock");
    let _daemon = daemon(d, &[&format!("socket={},iops-total=500", socket.display())]);
    let mut driver = connect(&socket);
    let window = Duration::from_secs(2);
    for depth in [1, 128] {
        let n = reads_in_window(&mut driver, depth, Duration::from_millis(500), window);
        assert_near(n as f64 / 2.0, 500.0, &format!("QD{depth}"));
    }
}

#[test]
fn a_burst_goes_at_its_max_for_about_its_length_then_at_the_rate() {
    let dir = tempdir();
    let d = dir.path();
    let socket = d.join("d.sock");
    let _daemon = daemon(
        d,
        &[&format!(
            "socket={},iops-read=200,iops-read-max=1000,iops-read-max-length=1",
            socket.display()
        )],
    );
    let mut driver = connect(&socket);
    // The bucket holds 1,000 reads and drains 200 a second: at 1,000 a second it fills in
    // about 1.25 s. The first half second runs at the burst rate...
    let burst = reads_in_window(&mut driver, 16, Duration::ZERO, Duration::from_millis(500));
    assert!(
        (450..=620).contains(&burst),
        "{burst} reads in the first 0.5 s of a 1,000/s burst"
    );
    // ... and once the bucket is full, the rate is what is left.
    let after = reads_in_window(
        &mut driver,
        16,
        Duration::from_secs(2),
        Duration::from_secs(2),
    );
    assert_near(after as f64 / 2.0, 200.0, "after the burst");
}

#[test]
fn two_disks_of_a_group_share_its_limit() {
    let dir = tempdir();
    let d = dir.path();
    let (a, b) = (d.join("a.sock"), d.join("b.sock"));
    let daemon = daemon(
        d,
        &[
            &format!(
                "socket={},name=a,qos-group=tenant,iops-total=600",
                a.display()
            ),
            &format!("socket={},name=b,qos-group=tenant", b.display()),
        ],
    );
    let window = Duration::from_secs(2);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let runs: Vec<_> = [&a, &b]
            .map(|socket| {
                s.spawn(move || {
                    let mut driver = connect(socket);
                    reads_in_window(&mut driver, 8, Duration::from_millis(500), window)
                })
            })
            .into_iter()
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_near((counts[0] + counts[1]) as f64 / 2.0, 600.0, "the group");
    for (name, n) in ["a", "b"].iter().zip(&counts) {
        assert!(
            *n > 400,
            "disk {name} got {n} of the group's 1,200: {counts:?}"
        );
    }
    let group = rpc(d, &d.join("ctl.sock"), "qos_get", &["group=tenant"]).unwrap();
    assert_eq!(group["limits"], "iops-total=600");
    assert_eq!(group["disks"], serde_json::json!(["a", "b"]));
    drop(daemon);
}

#[test]
fn qos_set_under_load_takes_effect_and_is_listed() {
    let dir = tempdir();
    let d = dir.path();
    let socket = d.join("d.sock");
    let ctl = d.join("ctl.sock");
    let _daemon = daemon(
        d,
        &[&format!(
            "socket={},name=vm1,iops-total=100",
            socket.display()
        )],
    );
    let raised = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut driver = connect(&socket);
            // 1 s at 100/s, then the limit goes to 1,000/s: the window after it is measured.
            reads_in_window(
                &mut driver,
                32,
                Duration::from_millis(1300),
                Duration::from_secs(2),
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        let set = rpc(d, &ctl, "qos_set", &["name=vm1", "limits=iops-total=1000"]).unwrap();
        assert_eq!(set["limits"], "iops-total=1000");
        load.join().unwrap()
    });
    assert_near(raised as f64 / 2.0, 1000.0, "after qos_set");
    let list = rpc(d, &ctl, "export_list", &[]).unwrap();
    assert_eq!(list[0]["qos"]["limits"], "iops-total=1000", "{list}");
    // Limits lifted: no longer throttled.
    rpc(d, &ctl, "qos_set", &["name=vm1", "limits="]).unwrap();
    let mut driver = connect(&socket);
    let started = Instant::now();
    for i in 0..3000 {
        assert_eq!(driver.read(0, i * 8, 4096).0, S_OK);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "3,000 reads without limits took {took:?}"
    );
}

#[test]
fn a_flush_behind_throttled_writes_completes_after_them() {
    let dir = tempdir();
    let d = dir.path();
    let socket = d.join("d.sock");
    let _daemon = daemon(d, &[&format!("socket={},iops-write=20", socket.display())]);
    let mut driver = connect(&socket);
    let started = Instant::now();
    // 20 writes a second with 100 ms of allowance: the first three go at once, the other
    // five wait 50 ms each; the flush, not limited itself, must wait for all of them.
    let writes: Vec<Pending> = (0..8)
        .map(|i| {
            driver.submit(
                0,
                &Request {
                    kind: T_OUT,
                    sector: i * 8,
                    out: vec![i as u8; 4096],
                    ..Default::default()
                },
            )
        })
        .collect();
    let flush = driver.submit(
        0,
        &Request {
            kind: T_FLUSH,
            ..Default::default()
        },
    );
    // BlkDriver::wait checks each completes in submission order.
    for w in writes {
        assert_eq!(driver.wait(w).status, S_OK);
    }
    assert_eq!(driver.wait(flush).status, S_OK);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(240),
        "8 writes at 20/s and a flush in {took:?}"
    );
}

/// `pollblk serve` with `export` fails with a message containing `wanted`.
fn refused(exports: &[&str], wanted: &str) {
    let dir = tempdir();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path()).arg("serve");
    for (i, e) in exports.iter().enumerate() {
        cmd.arg("--export").arg(format!(
            "vhost-user-blk,socket={}/d{i}.sock,null,size=1M,{e}",
            dir.path().display()
        ));
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{exports:?} was accepted");
    assert!(err.contains(wanted), "{exports:?}: {err}");
}

#[test]
fn bad_limits_are_refused_with_the_key_named() {
    refused(
        &["iops-total=0"],
        "iops-total=0: expected a whole number above 0",
    );
    refused(
        &["iops-total=-10"],
        "iops-total=-10: expected a whole number above 0",
    );
    refused(&["bps-write=0"], "bps-write=0: expected more than 0 bytes");
    refused(
        &["iops-read=100,iops-read-max=50"],
        "iops-read-max=50 is lower than iops-read=100",
    );
    refused(
        &["iops-total=100,iops-total-max-length=5"],
        "iops-total-max-length needs iops-total-max",
    );
    refused(
        &["iops-totl=100"],
        "unknown export option \"iops-totl=100\"",
    );
    refused(
        &["qos-group=g,iops-total=100", "qos-group=g,iops-total=200"],
        "qos-group=g has the limits \"iops-total=100\" already",
    );
}

#[test]
fn qos_set_is_saved_with_persist_and_comes_back() {
    let dir = tempdir();
    let d = dir.path();
    let ctl = d.join("ctl.sock");
    let config = d.join("pollblk.toml");
    std::fs::write(
        &config,
        format!(
            "control = \"{}\"\n[[export]]\nname = \"vm1\"\nspec = \"vhost-user-blk,socket={},null,size=1M\"\n",
            ctl.display(),
            d.join("d.sock").display()
        ),
    )
    .unwrap();
    let args: Vec<String> = ["--config", config.to_str().unwrap(), "--persist"]
        .map(String::from)
        .to_vec();
    let mut daemon = Daemon::start(d, &args);
    rpc(
        d,
        &ctl,
        "qos_set",
        &["name=vm1", "limits=iops-read=300,bps-read=10MB"],
    )
    .unwrap();
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains("iops-read=300,bps-read=10000000"), "{saved}");
    assert_eq!(daemon.stop(), Some(0));
    // A restart from the file has the limits.
    let _daemon = Daemon::start(d, &args);
    let got = rpc(d, &ctl, "qos_get", &["name=vm1"]).unwrap();
    assert_eq!(got["limits"], "iops-read=300,bps-read=10000000");
    // A group that no disk names, and a disk of a group set by name, are refused.
    let err = rpc(d, &ctl, "qos_get", &["group=nobody"]).unwrap_err();
    assert!(err.contains("no qos-group nobody"), "{err}");
}
