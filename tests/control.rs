//! The operator's workflow on a running daemon: the control socket (through `pollblk rpc`
//! and as raw JSON-RPC), the config file with --persist, readiness notification and logs.
//! Front ends are the test driver (tests/guest.rs has the same with a real guest).

mod common;

use common::{image, pattern, rpc, Daemon, BIN};
use pollblk_driver::{BlkDriver, DriverOptions, Request};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn control_args(dir: &Path) -> (PathBuf, Vec<String>) {
    let control = dir.join("ctl.sock");
    (
        control.clone(),
        vec!["--control".into(), control.display().to_string()],
    )
}

fn null_spec(socket: &Path, size: &str) -> String {
    format!(
        "spec=vhost-user-blk,socket={},null,size={size},num-queues=1",
        socket.display()
    )
}

fn disk<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|d| d["name"] == name)
}

#[test]
fn disks_are_added_used_and_removed_on_a_running_daemon() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    let first = d.join("a.sock");
    args.extend([
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,num-queues=1",
            first.display()
        ),
    ]);
    let mut daemon = Daemon::start(d, &args);
    assert_eq!(
        std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777,
        0o600,
        "only the daemon's user may use the control socket by default"
    );

    let second = d.join("b.sock");
    let added = rpc(
        d,
        &ctl,
        "export_add",
        &[&null_spec(&second, "32M"), "name=scratch"],
    )
    .unwrap();
    assert_eq!(added["name"], "scratch");
    assert_eq!(added["size_bytes"], 32 * MIB);
    let mut driver = BlkDriver::connect(&second, DriverOptions::default());
    let data = pattern(8192, 3);
    assert_eq!(driver.write(0, 64, &data), 0);
    assert_eq!(driver.read(0, 64, 8192).0, 0);

    let list = rpc(d, &ctl, "export_list", &[]).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let scratch = disk(&list, "scratch").unwrap();
    assert_eq!(scratch["connected"], true);
    assert_eq!(scratch["queues"], json!(["running"]));
    assert_eq!(disk(&list, "disk0").unwrap()["connected"], false);
    assert!(d.join("pollblk-data/stats/scratch.stats").exists());

    // Two disks on one socket: refused, the running ones untouched.
    let twice = rpc(d, &ctl, "export_add", &[&null_spec(&first, "1M")]).unwrap_err();
    assert!(twice.contains("already served by disk0"), "{twice}");

    // A disk in use is not pulled from under its front end unless forced.
    let busy = rpc(d, &ctl, "export_remove", &["name=scratch"]).unwrap_err();
    assert!(busy.contains("in use") && busy.contains("force"), "{busy}");
    assert_eq!(
        driver.read(0, 64, 8192).0,
        0,
        "still served after the refusal"
    );
    rpc(d, &ctl, "export_remove", &["name=scratch", "force=true"]).unwrap();
    assert!(!second.exists(), "the socket is gone");
    assert!(!d.join("pollblk-data/stats/scratch.stats").exists());
    let list = rpc(d, &ctl, "export_list", &[]).unwrap();
    assert!(disk(&list, "scratch").is_none());

    // The other disk kept serving; a removed name can be added again.
    let mut other = BlkDriver::connect(&first, DriverOptions::default());
    assert_eq!(other.read(0, 0, 4096).0, 0);
    drop(other);
    rpc(
        d,
        &ctl,
        "export_add",
        &[&null_spec(&second, "8M"), "name=scratch"],
    )
    .unwrap();
    // Detached: removed without force.
    rpc(d, &ctl, "export_remove", &["name=scratch"]).unwrap();
    assert_eq!(daemon.stop(), Some(0));
    assert!(!ctl.exists(), "the control socket is removed at exit");
}

#[test]
fn a_grown_file_disk_is_announced_to_its_front_end() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    let file = image(d, "disk.img", 64 * MIB);
    let socket = d.join("disk.sock");
    args.extend(common::file_export(&socket, &file, ",num-queues=1"));
    let _daemon = Daemon::start(d, &args);
    let options = DriverOptions {
        backend_channel: true,
        ..DriverOptions::default()
    };
    let mut driver = BlkDriver::connect(&socket, options);
    assert_eq!(driver.capacity(), 64 * MIB / 512);
    let old_end = 64 * MIB / 512;
    assert_ne!(
        driver.write(0, old_end, &pattern(4096, 1)),
        0,
        "past the end before"
    );

    // The call returns once the front end acknowledged the notification.
    let resize = {
        let (d, ctl) = (d.to_owned(), ctl.clone());
        std::thread::spawn(move || rpc(&d, &ctl, "export_resize", &["name=disk0", "size=96M"]))
    };
    assert!(
        driver.wait_config_change(Duration::from_secs(20)),
        "no CONFIG_CHANGE_MSG on the back end's channel"
    );
    let result = resize.join().unwrap().unwrap();
    assert_eq!(result["front_end_notified"], true);
    assert_eq!(
        driver.capacity(),
        96 * MIB / 512,
        "GET_CONFIG shows the new capacity"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 96 * MIB);
    // The queue was paused and resumed: it serves the new range.
    let data = pattern(4096, 2);
    assert_eq!(driver.write(0, old_end, &data), 0);
    assert_eq!(driver.read(0, old_end, 4096), (0, data));

    let shrink = rpc(d, &ctl, "export_resize", &["name=disk0", "size=32M"]).unwrap_err();
    assert!(shrink.contains("only grow"), "{shrink}");
    let odd = rpc(d, &ctl, "export_resize", &["name=disk0", "size=200000001"]).unwrap_err();
    assert!(odd.contains("multiple of the block size"), "{odd}");
    assert_eq!(driver.capacity(), 96 * MIB / 512);
}

#[test]
fn a_thin_volume_grows_under_io_and_keeps_its_data() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, args) = control_args(d);
    let pool = d.join("pool");
    let made = Command::new(BIN)
        .args(["pool", "create"])
        .arg(&pool)
        .args(["--size", "256M"])
        .status()
        .unwrap();
    assert!(made.success());
    let mut daemon = Daemon::start(d, &args);
    let pool_param = format!("pool={}", pool.display());
    rpc(
        d,
        &ctl,
        "volume_create",
        &[&pool_param, "volume=v1", "size=32M"],
    )
    .unwrap();
    let socket = d.join("v1.sock");
    let spec = format!(
        "spec=vhost-user-blk,socket={},pool={},volume=v1,num-queues=1",
        socket.display(),
        pool.display()
    );
    rpc(d, &ctl, "export_add", &[&spec]).unwrap();
    let options = DriverOptions {
        backend_channel: true,
        ..DriverOptions::default()
    };
    let mut driver = BlkDriver::connect(&socket, options);
    let before = pattern(65536, 7);
    assert_eq!(driver.write(0, 2048, &before), 0);

    let resize = {
        let (d, ctl) = (d.to_owned(), ctl.clone());
        std::thread::spawn(move || rpc(&d, &ctl, "export_resize", &["name=disk0", "size=64M"]))
    };
    assert!(driver.wait_config_change(Duration::from_secs(20)));
    resize.join().unwrap().unwrap();
    assert_eq!(driver.capacity(), 64 * MIB / 512);
    let after = pattern(65536, 8);
    let past_old_end = 40 * MIB / 512;
    assert_eq!(driver.write(0, past_old_end, &after), 0);
    assert_eq!(driver.read(0, 2048, 65536), (0, before.clone()));
    assert_eq!(driver.read(0, past_old_end, 65536), (0, after));
    let flush = Request {
        kind: pollblk_driver::blk::T_FLUSH,
        ..Request::default()
    };
    assert_eq!(driver.run(0, &flush).status, 0);

    let status = rpc(d, &ctl, "pool_status", &[&pool_param]).unwrap();
    let v1 = &status["volumes"][0];
    assert_eq!(
        (v1["name"].as_str(), v1["size_bytes"].as_u64()),
        (Some("v1"), Some(64 * MIB))
    );
    // An exported volume is not deleted under its disk.
    let busy = rpc(d, &ctl, "volume_delete", &[&pool_param, "volume=v1"]).unwrap_err();
    assert!(busy.contains("exported as disk0"), "{busy}");
    drop(driver);
    rpc(d, &ctl, "export_remove", &["name=disk0"]).unwrap();
    assert_eq!(daemon.stop(), Some(0));
    // The grown size is in the pool's metadata: the offline tool sees it.
    let out = Command::new(BIN)
        .args(["pool", "status", "--json"])
        .arg(&pool)
        .output()
        .unwrap();
    let offline: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(offline["volumes"][0]["size_bytes"], 64 * MIB);
}

#[test]
fn a_paused_queue_finishes_what_it_took_and_takes_nothing_until_resumed() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    let socket = d.join("slow.sock");
    // Every request takes 300 ms in the backend.
    args.extend([
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,latency-ns=300000000,num-queues=1",
            socket.display()
        ),
    ]);
    let _daemon = Daemon::start(d, &args);
    let mut driver = BlkDriver::connect(&socket, DriverOptions::default());
    let read = Request {
        kind: pollblk_driver::blk::T_IN,
        in_len: 4096,
        ..Request::default()
    };
    let in_flight = driver.submit(0, &read);
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let paused = rpc(d, &ctl, "queue_pause", &["name=disk0"]).unwrap();
    assert_eq!(paused, json!([{ "queue": 0, "avail_idx": 1 }]));
    // The pause answered only after the request in flight completed.
    assert_eq!(driver.queues[0].used_idx(&driver.ram), 1);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(driver.wait(in_flight).status, 0);
    let list = rpc(d, &ctl, "export_list", &[]).unwrap();
    assert_eq!(list[0]["queues"], json!([{ "paused": 1 }]));

    let waiting = driver.submit(0, &read);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        driver.queues[0].used_idx(&driver.ram),
        1,
        "a paused queue takes no request"
    );
    let resumed = rpc(d, &ctl, "queue_resume", &["name=disk0"]).unwrap();
    assert_eq!(resumed, json!({ "resumed": [0] }));
    assert_eq!(driver.wait(waiting).status, 0, "resumed where it paused");
    let again = rpc(d, &ctl, "queue_resume", &["name=disk0", "queue=0"]).unwrap_err();
    assert!(again.contains("not paused"), "{again}");
    let none = rpc(d, &ctl, "queue_pause", &["name=disk0", "queue=3"]).unwrap_err();
    assert!(none.contains("queue 3 does not exist"), "{none}");
}

#[test]
fn persisted_disks_come_back_after_a_restart() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    let config = d.join("pollblk.toml");
    std::fs::write(
        &config,
        "poll-mode = \"interrupt\"\n\n[[export]]\nname = \"boot\"\ntype = \"vhost-user-blk\"\n\
         socket = \"boot.sock\"\nnull = true\nsize = \"16M\"\nnum-queues = 1\n",
    )
    .unwrap();
    args.extend(["--config".into(), "pollblk.toml".into(), "--persist".into()]);
    let mut daemon = Daemon::start(d, &args);
    assert!(
        d.join("boot.sock").exists(),
        "the config file's disk is served"
    );
    rpc(
        d,
        &ctl,
        "export_add",
        &[
            "spec=vhost-user-blk,socket=data.sock,null,size=8M",
            "name=data",
        ],
    )
    .unwrap();
    rpc(d, &ctl, "export_resize", &["name=data", "size=24M"]).unwrap();
    rpc(d, &ctl, "export_remove", &["name=boot"]).unwrap();
    assert_eq!(daemon.stop(), Some(0));

    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(
        saved.contains("poll-mode = \"interrupt\""),
        "other settings kept:\n{saved}"
    );
    let mut daemon = Daemon::start(d, &args);
    let list = rpc(d, &ctl, "export_list", &[]).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data"], "saved file:\n{saved}");
    assert_eq!(list[0]["size_bytes"], 24 * MIB, "the resize was saved too");
    assert!(!d.join("boot.sock").exists());
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn the_statistics_fd_comes_over_the_control_socket() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    let socket = d.join("disk.sock");
    args.extend([
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},null,size=16M,num-queues=2",
            socket.display()
        ),
    ]);
    let _daemon = Daemon::start(d, &args);
    let mut driver = BlkDriver::connect(&socket, DriverOptions::default());
    for _ in 0..3 {
        assert_eq!(driver.read(0, 0, 4096).0, 0);
    }
    // Raw protocol: the descriptor arrives with the reply line (SCM_RIGHTS).
    let stream = UnixStream::connect(&ctl).unwrap();
    writeln!(
        &stream,
        "{}",
        json!({"jsonrpc": "2.0", "id": 7, "method": "stats_fd", "params": {"name": "disk0", "queue": 0}})
    )
    .unwrap();
    let mut first = [0u8; 1];
    let (n, file) =
        vmm_sys_util::sock_ctrl_msg::ScmSocket::recv_with_fd(&stream, &mut first).unwrap();
    assert_eq!(n, 1);
    let file = file.expect("a descriptor with the reply");
    let mut rest = String::new();
    BufReader::new(&stream).read_line(&mut rest).unwrap();
    let reply: Value =
        serde_json::from_str(&(String::from_utf8_lossy(&first).into_owned() + &rest)).unwrap();
    assert_eq!(reply["id"], 7);
    assert!(reply["result"]["file"]
        .as_str()
        .unwrap()
        .ends_with("queue-0.stats"));
    // The descriptor is the queue's statistics file in the KVM binary stats layout.
    let mut header = [0u8; 24];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).unwrap();
    let name_size = u32::from_le_bytes(header[4..8].try_into().unwrap());
    assert_eq!(name_size, 48, "KVM stats header (flags, name_size)");

    // The client reads the descriptor it gets.
    let got = rpc(d, &ctl, "stats_fd", &["name=disk0", "queue=0"]).unwrap();
    let stats = &got["stats"]["sources"][0]["stats"];
    assert_eq!(stats["read_ops"]["value"], 3.0, "{got}");
    let all = rpc(d, &ctl, "stats_get", &["name=disk0"]).unwrap();
    assert_eq!(
        all["sources"].as_array().unwrap().len(),
        3,
        "disk + 2 queues"
    );
}

/// One request line, raw; the reply as JSON.
fn raw_call(ctl: &Path, line: &str) -> Value {
    let stream = UnixStream::connect(ctl).unwrap();
    writeln!(&stream, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn bad_requests_get_json_rpc_errors_a_person_can_act_on() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    args.extend([
        "--export".into(),
        "vhost-user-blk,socket=x.sock,null,size=1M".into(),
    ]);
    let _daemon = Daemon::start(d, &args);
    let code = |v: &Value| v["error"]["code"].as_i64().unwrap();
    assert_eq!(code(&raw_call(&ctl, "this is not json")), -32700);
    assert_eq!(
        code(&raw_call(&ctl, r#"{"id": 1, "method": "export_list"}"#)),
        -32600
    );
    let unknown = raw_call(
        &ctl,
        r#"{"jsonrpc": "2.0", "id": 2, "method": "export_lst"}"#,
    );
    assert_eq!(code(&unknown), -32601);
    assert!(unknown["error"]["message"]
        .as_str()
        .unwrap()
        .contains("export_list"));
    let bad_spec = raw_call(
        &ctl,
        r#"{"jsonrpc": "2.0", "id": 3, "method": "export_add", "params": {"spec": "vhost-user-blk,socket=y.sock,file=/nonexistent"}}"#,
    );
    assert_eq!(code(&bad_spec), -32000);
    assert!(bad_spec["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent"));
    let typo = raw_call(
        &ctl,
        r#"{"jsonrpc": "2.0", "id": 4, "method": "export_remove", "params": {"nmae": "disk0"}}"#,
    );
    assert_eq!(code(&typo), -32602);
    assert!(typo["error"]["message"].as_str().unwrap().contains("nmae"));
    // A notification (no id) is done and not answered; the next request on the same
    // connection is.
    let stream = UnixStream::connect(&ctl).unwrap();
    writeln!(
        &stream,
        r#"{{"jsonrpc": "2.0", "method": "log_level", "params": {{"level": "debug"}}}}"#
    )
    .unwrap();
    writeln!(
        &stream,
        r#"{{"jsonrpc": "2.0", "id": 9, "method": "rpc_get_methods"}}"#
    )
    .unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["id"], 9);
    // The daemon still serves after all that.
    assert_eq!(
        rpc(d, &ctl, "export_list", &[])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let client = rpc(d, &d.join("nobody.sock"), "export_list", &[]).unwrap_err();
    assert!(client.contains("is `pollblk serve` running"), "{client}");
}

#[test]
fn config_mistakes_stop_the_daemon_with_the_reason() {
    let dir = tempdir();
    let d = dir.path();
    let serve = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("serve")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(!out.status.success(), "serve {args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    std::fs::write(d.join("typo.toml"), "pol-mode = \"poll\"\n").unwrap();
    let e = serve(&["--config", "typo.toml"]);
    assert!(e.contains("typo.toml") && e.contains("pol-mode"), "{e}");
    std::fs::write(
        d.join("export.toml"),
        "[[export]]\ntype = \"vhost-user-blk\"\nsocket = \"s.sock\"\nnul = true\n",
    )
    .unwrap();
    let e = serve(&["--config", "export.toml"]);
    assert!(e.contains("nul"), "{e}");
    let e = serve(&["--config", "missing.toml"]);
    assert!(e.contains("missing.toml"), "{e}");
    let e = serve(&["--persist"]);
    assert!(e.contains("--config"), "{e}");
    let e = serve(&["--log-level", "loud"]);
    assert!(e.contains("loud"), "{e}");
    // Saved to the file and given again on the command line, they would be served twice.
    let e = serve(&[
        "--config",
        "new.toml",
        "--persist",
        "--export",
        "vhost-user-blk,socket=p.sock,null,size=1M",
    ]);
    assert!(e.contains("--persist") && e.contains("config file"), "{e}");
}

#[test]
fn readiness_and_stopping_are_told_to_systemd() {
    let dir = tempdir();
    let d = dir.path();
    let (_, mut args) = control_args(d);
    args.extend([
        "--export".into(),
        "vhost-user-blk,socket=n.sock,null,size=1M".into(),
    ]);
    let notify = d.join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut daemon = Daemon::start_env(d, &args, &[("NOTIFY_SOCKET", notify.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        d.join("n.sock").exists(),
        "ready means the disks are served"
    );
    assert_eq!(daemon.stop(), Some(0));
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempdir();
    let d = dir.path();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--control",
            "c.sock",
        ])
        .args(["--export", "vhost-user-blk,socket=j.sock,null,size=1M"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let event: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(event["level"], "INFO", "{first}");
    assert!(event["message"].is_string(), "{first}");
}

#[test]
fn single_queue_disks_spread_over_the_reactors_and_placement_can_be_chosen() {
    let dir = tempdir();
    let d = dir.path();
    let (ctl, mut args) = control_args(d);
    args.extend(["--cores".into(), "0,1".into()]);
    let _daemon = Daemon::start(d, &args);
    for name in ["a", "b", "c"] {
        let spec = null_spec(&d.join(format!("{name}.sock")), "16M");
        rpc(d, &ctl, "export_add", &[&spec, &format!("name={name}")]).unwrap();
    }
    let spec = format!(
        "spec=vhost-user-blk,socket={},null,size=16M,num-queues=2,reactor=1",
        d.join("pinned.sock").display()
    );
    rpc(d, &ctl, "export_add", &[&spec, "name=pinned"]).unwrap();
    let list = rpc(d, &ctl, "export_list", &[]).unwrap();
    let reactors = |name: &str| disk(&list, name).unwrap()["reactors"].clone();
    // Each new single-queue disk goes to the reactor with the fewest queues.
    assert_eq!(reactors("a"), serde_json::json!([0]));
    assert_eq!(reactors("b"), serde_json::json!([1]));
    assert_eq!(reactors("c"), serde_json::json!([0]));
    assert_eq!(reactors("pinned"), serde_json::json!([1, 0]));
    let spec = format!(
        "spec=vhost-user-blk,socket={},null,size=16M,reactor=2",
        d.join("nowhere.sock").display()
    );
    let err = rpc(d, &ctl, "export_add", &[&spec]).unwrap_err();
    assert!(
        err.contains("reactor=2: this daemon runs 2 reactor(s)"),
        "{err}"
    );
}
