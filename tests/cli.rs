//! The command line as users and scripts rely on it.

mod common;

use common::{image, Daemon, BIN};
use std::process::Command;

fn serve(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_say_what_is_wrong_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            vec!["--export", "vfio-user,socket=s,null,size=1M"],
            "unknown export type",
        ),
        (
            vec!["--export", "vhost-user-blk,null,size=1M"],
            "socket=PATH is required",
        ),
        (
            vec!["--export", "vhost-user-blk,socket=s,null,size=1000"],
            "multiple of the block size",
        ),
        (
            vec!["--export", "vhost-user-blk,socket=s,file=missing.img"],
            "missing.img",
        ),
        (
            vec![
                "--export",
                "vhost-user-blk,socket=s,null,size=1M",
                "--cores",
                "9999",
            ],
            "core 9999",
        ),
        (vec!["--bogus"], "--bogus"),
        (vec!["--poll-mode", "spin"], "unknown poll mode \"spin\""),
        (vec!["--poll-idle-us", "2000000"], "--poll-idle-us"),
    ];
    for (args, message) in cases {
        let (code, stderr) = serve(dir.path(), &args);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in {stderr:?}"
        );
        // One error style, whether the argument parser or the daemon found the mistake.
        assert!(
            stderr.lines().any(|l| l.starts_with("pollblk: error: ")),
            "{args:?}: {stderr:?}"
        );
    }
}

#[test]
fn a_file_whose_size_is_not_whole_blocks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = image(dir.path(), "odd.img", 3 * 4096 + 512);
    let spec = format!(
        "vhost-user-blk,socket=s,file={},block-size=4096",
        file.display()
    );
    let (code, stderr) = serve(dir.path(), &["--export", &spec]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("not a non-zero multiple of the block size 4096"),
        "{stderr}"
    );
}

#[test]
fn a_socket_in_use_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "vhost-user-blk,socket=busy.sock,null,size=1M";
    let mut first = Daemon::start(dir.path(), &["--export".into(), spec.into()]);
    // Its own statistics directory: the first daemon holds the default one.
    let (code, stderr) = serve(
        dir.path(),
        &["--export", spec, "--stats-dir", "second-stats"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(
        dir.path().join("busy.sock").exists(),
        "the first daemon's socket survives"
    );
    assert_eq!(first.stop(), Some(0));
}

#[test]
fn no_arguments_serves_the_default_disk_and_prints_the_qemu_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_default(dir.path());
    let pool = dir.path().join("pollblk-data/pool");
    assert!(dir.path().join("pollblk-data/disk0.sock").exists());
    let (code, status, err) = pollblk(&["pool", "status", pool.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["size_bytes"], 4u64 << 30);
    assert_eq!(status["volumes"][0]["name"], "disk0");
    assert_eq!(status["volumes"][0]["size_bytes"], 1u64 << 30);
    let out = daemon.stdout.join("\n");
    assert!(out.contains("vhost-user-blk-pci,chardev=disk0"), "{out}");
    assert!(out.contains("memory-backend-memfd"), "{out}");
    assert_eq!(daemon.stop(), Some(0));
    // A second start reuses the pool; `serve` without options is the same default.
    let mut again = Daemon::start(dir.path(), &[]);
    assert_eq!(again.stop(), Some(0));
}

fn pollblk(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pool_tool_creates_reports_and_checks_a_thin_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    let (code, _, err) = pollblk(&["pool", "create", p, "--size", "64M", "--block-size", "64K"]);
    assert_eq!(code, 0, "{err}");
    for (name, size) in [("disk0", "1G"), ("disk1", "512M")] {
        let (code, _, err) = pollblk(&["pool", "volume", "create", p, name, "--size", size]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, err) = pollblk(&["pool", "status", p, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["block_size"], 65536);
    assert_eq!(v["size_bytes"], 64 << 20);
    assert_eq!(v["used_bytes"], 0);
    assert_eq!(v["free_bytes"], 64 << 20);
    assert_eq!(v["volumes"][0]["name"], "disk0");
    assert_eq!(v["volumes"][0]["size_bytes"], 1u64 << 30);
    assert_eq!(v["volumes"][0]["mapped_bytes"], 0);
    assert_eq!(v["volumes"][1]["name"], "disk1");
    let (code, out, _) = pollblk(&["pool", "check", p]);
    assert_eq!(code, 0);
    assert!(out.contains("consistent"), "{out}");
    let (code, _, err) = pollblk(&["pool", "volume", "resize", p, "disk1", "--size", "2G"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = pollblk(&["pool", "status", p, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["volumes"][1]["size_bytes"], 2u64 << 30);
    let (code, _, _) = pollblk(&["pool", "volume", "delete", p, "disk1"]);
    assert_eq!(code, 0);
    let (_, out, _) = pollblk(&["pool", "status", p, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["volumes"].as_array().unwrap().len(), 1);

    // Errors: each says what is wrong and exits non-zero.
    let cases: [(&[&str], &str); 5] = [
        (
            &["pool", "create", p, "--size", "64M"],
            "holds a pool already",
        ),
        (
            &["pool", "volume", "create", p, "disk0", "--size", "1G"],
            "exists already",
        ),
        (&["pool", "volume", "delete", p, "nope"], "no volume named"),
        (
            &["pool", "create", "x", "--size", "1M", "--block-size", "3K"],
            "power of two",
        ),
        (&["pool", "status", "/nonexistent"], "not a pool"),
    ];
    for (args, message) in cases {
        let (code, _, err) = pollblk(args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(message), "{args:?}: {err}");
    }

    // Damaged metadata fails the check.
    let checkpoint = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("checkpoint.")
        })
        .unwrap();
    let mut raw = std::fs::read(&checkpoint).unwrap();
    raw[30] ^= 0xff;
    std::fs::write(&checkpoint, raw).unwrap();
    let (code, _, err) = pollblk(&["pool", "check", p]);
    assert_ne!(code, 0);
    assert!(
        err.contains("checkpoint") || err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn a_pool_can_keep_its_data_on_a_device() {
    let dir = tempfile::tempdir().unwrap();
    // A preallocated file stands in for the block device (no loop devices here).
    let device = dir.path().join("device");
    std::fs::File::create(&device)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    let d = device.to_str().unwrap();
    let (code, _, err) = pollblk(&["pool", "create", p, "--data-device", d, "--size", "64M"]);
    assert_ne!(code, 0);
    assert!(err.contains("larger than"), "{err}");
    let (code, _, err) = pollblk(&["pool", "create", p, "--data-device", d]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_link(pool.join("data")).unwrap(),
        device.canonicalize().unwrap()
    );
    let (_, out, _) = pollblk(&["pool", "status", p, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["size_bytes"], 32 << 20);
    let (code, _, err) = pollblk(&["pool", "volume", "create", p, "v", "--size", "1G"]);
    assert_eq!(code, 0, "{err}");
}

#[cfg(not(feature = "rbd"))]
#[test]
fn an_rbd_export_without_ceph_support_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = serve(
        dir.path(),
        &["--export", "vhost-user-blk,socket=r.sock,rbd=pool/img"],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("--features rbd"), "{stderr}");
}

#[test]
fn too_few_open_files_for_the_disks_is_said_before_serving() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").current_dir(dir.path());
    for i in 0..10 {
        cmd.args([
            "--export",
            &format!("vhost-user-blk,socket=d{i}.sock,null,size=1M,num-queues=1"),
        ]);
    }
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 60,
                rlim_max: 60,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("serving 10 disk(s) needs about 144 open files")
            && err.contains("raise the limit"),
        "{err}"
    );
    assert!(!dir.path().join("d0.sock").exists(), "nothing was served");
}

#[test]
fn a_disk_named_in_its_export_goes_by_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--export",
        "vhost-user-blk,socket=vm1.sock,null,size=1M,num-queues=1,name=vm1",
    ]
    .map(String::from)
    .to_vec();
    let _daemon = Daemon::start(dir.path(), &args);
    let stats = dir.path().join("pollblk-data/stats");
    assert!(
        stats.join("vm1.stats").exists(),
        "statistics under the disk's name"
    );
    assert!(!stats.join("disk0.stats").exists());
}

#[test]
fn mistakes_a_person_makes_get_messages_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A typo gets the nearest option; a word far from any gets the list.
    let (code, err) = serve(d, &["--export", "vhost-user-blk,sockt=s,null,size=1M"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"sockt=s\": did you mean socket=?"), "{err}");
    let (_, err) = serve(
        d,
        &[
            "--export",
            "vhost-user-blk,socket=s,null,size=1M,colour=red",
        ],
    );
    assert!(err.contains("the options are: socket, dir,"), "{err}");
    // A socket in a directory that does not exist names the directory.
    let (code, err) = serve(
        d,
        &[
            "--export",
            "vhost-user-blk,socket=nodir/s.sock,null,size=1M",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("its directory nodir does not exist"), "{err}");
    // The config file says which [[export]] is wrong.
    std::fs::write(
        d.join("c.toml"),
        "[[export]]\nspec = \"vhost-user-blk,socket=a.sock,null,size=1M\"\n\
         [[export]]\nname = \"vm2\"\nspec = \"vhost-user-blk,socket=b.sock,null,size=1M,readonly=maybe\"\n",
    )
    .unwrap();
    let (code, err) = serve(d, &["--config", "c.toml"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("c.toml: [[export]] number 2 (vm2): readonly=maybe: expected on or off"),
        "{err}"
    );
    // Something that is not a statistics file, or not a pool, says so once.
    std::fs::write(d.join("notes.txt"), "hello, this is text").unwrap();
    let (code, _, err) = pollblk(&["stats", d.join("notes.txt").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("not a statistics file"), "{err}");
    let (code, _, err) = pollblk(&["pool", "check", d.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_eq!(err.matches(d.to_str().unwrap()).count(), 1, "{err}");
    // rpc gives up when told to, and says why.
    let mute = d.join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = pollblk(&[
        "rpc",
        "--socket",
        mute.to_str().unwrap(),
        "--timeout",
        "1",
        "export_list",
    ]);
    assert_ne!(code, 0);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(err.contains("no answer in 1 s (--timeout)"), "{err}");
    // --version says which build it is.
    let (code, out, _) = pollblk(&["--version"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("(commit ") && out.contains("features: "),
        "{out}"
    );
}

#[test]
fn readonly_takes_1_and_0_as_on_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ro.sock");
    let export = format!(
        "vhost-user-blk,socket={},null,size=1M,readonly=1",
        socket.display()
    );
    let mut daemon = Daemon::start(dir.path(), &["--export".into(), export]);
    let mut driver = pollblk_driver::BlkDriver::connect(&socket, Default::default());
    assert_ne!(
        driver.write(0, 0, &[1u8; 512]),
        0,
        "a write to readonly=1 fails"
    );
    drop(driver);
    assert_eq!(daemon.stop(), Some(0));
}

/// A vhost-user front end's first exchange, as user `uid`: GET_FEATURES, and the features
/// the daemon answers; Err(the OS error) when it cannot connect.
fn features_as(uid: u32, socket: &std::path::Path) -> Result<u64, String> {
    use std::os::unix::process::CommandExt;
    let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("error", e.strerror); sys.exit(0)
s.sendall(struct.pack("<III", 1, 1, 0))  # VHOST_USER_GET_FEATURES, version 1, no payload
reply = b""
while len(reply) < 20:
    chunk = s.recv(20 - len(reply))
    if not chunk: break
    reply += chunk
print("features", struct.unpack("<IIIQ", reply)[3])
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.split_once(' ') {
        Some(("features", n)) => Ok(n.parse().unwrap()),
        Some(("error", e)) => Err(e.to_string()),
        _ => panic!("python3: {text} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

#[test]
fn a_front_end_that_is_not_root_reaches_a_socket_it_is_given() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: changing a socket's owner and running as nobody needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (given, kept) = (d.join("vm1.sock"), d.join("root-only.sock"));
    let args: Vec<String> = vec![
        "--socket-mode".into(),
        "0600".into(),
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},null,size=1M,socket-owner=nobody,name=vm1",
            given.display()
        ),
        "--export".into(),
        format!("vhost-user-blk,socket={},null,size=1M", kept.display()),
    ];
    let mut daemon = Daemon::start(d, &args);
    let meta = std::fs::metadata(&given).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600));
    // nobody is served on its socket: VIRTIO_F_VERSION_1 (bit 32) among the features.
    let features = features_as(NOBODY, &given).unwrap();
    assert_ne!(features & 1 << 32, 0, "features {features:#x}");
    // and kept out of the other one, which --socket-mode left to root.
    assert_eq!(features_as(NOBODY, &kept), Err("Permission denied".into()));
    // A bad owner or mode is refused with the option named.
    let (code, err) = serve(d, &["--socket-mode", "999"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"999\" is not a mode"), "{err}");
    let (code, err) = serve(
        d,
        &[
            "--export",
            "vhost-user-blk,socket=x.sock,null,size=1M,socket-owner=no-such-user",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("socket-owner: no user named \"no-such-user\""),
        "{err}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn shrinking_a_volume_needs_shrink_and_says_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    assert_eq!(pollblk(&["pool", "create", p, "--size", "64M"]).0, 0);
    assert_eq!(
        pollblk(&["pool", "volume", "create", p, "vm1", "--size", "8M"]).0,
        0
    );
    {
        // Data in the last 2 MiB of the volume (two 64 KiB blocks), and in its first block.
        let opened = pollblk_engine::thin::Pool::open(&pool).unwrap();
        let volume = opened.volume("vm1").unwrap();
        for offset in [0, 6 << 20, 7 << 20] {
            opened.write(&volume, offset, &[7u8; 4096]).unwrap();
        }
        opened.flush().unwrap();
    }
    let (code, _, err) = pollblk(&["pool", "volume", "resize", p, "vm1", "--size", "4M"]);
    assert_ne!(code, 0);
    assert!(
        err.contains(
            "drops the last 4194304 bytes, 131072 bytes of them holding data; add --shrink"
        ),
        "{err}"
    );
    let (code, out, err) = pollblk(&[
        "pool", "volume", "resize", p, "vm1", "--size", "4M", "--shrink",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(131072 bytes of data dropped)"), "{out}");
    // Growing needs nothing.
    let (code, _, err) = pollblk(&["pool", "volume", "resize", p, "vm1", "--size", "16M"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_qcow2_image_given_as_file_is_refused_unless_format_raw() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut header = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    header.resize(1 << 20, 0);
    std::fs::write(d.join("vm.qcow2"), &header).unwrap();
    let (code, err) = serve(
        d,
        &["--export", "vhost-user-blk,socket=q.sock,file=vm.qcow2"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("file vm.qcow2 is a qcow2 (or qcow) image, not raw")
            && err.contains("qemu-img convert -O raw")
            && err.contains("format=raw"),
        "{err}"
    );
    // Told to, it serves the bytes as they are.
    let export = format!(
        "vhost-user-blk,socket={},file=vm.qcow2,format=raw",
        d.join("q.sock").display()
    );
    let mut daemon = Daemon::start(d, &["--export".into(), export]);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_itself() {
    let (code, out, err) = pollblk(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("_pollblk()") && out.contains("--export"),
        "{out}"
    );
    let (code, out, _) = pollblk(&["completions", "zsh"]);
    assert_eq!(code, 0);
    assert!(out.contains("#compdef pollblk"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = pollblk(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let serve = std::fs::read_to_string(dir.path().join("pollblk-serve.1")).unwrap();
    assert!(
        serve.contains(".TH pollblk-serve 1") && serve.contains("export"),
        "{serve}"
    );
    let (code, _, err) = pollblk(&["completions", "tcsh"]);
    assert_ne!(code, 0);
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn a_raw_image_goes_into_a_volume_and_back_out_sparse() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = d.join("pool");
    let p = pool.to_str().unwrap();
    assert_eq!(pollblk(&["pool", "create", p, "--size", "256M"]).0, 0);
    // 64 MiB, sparse, with data in three places (one of them a block of zeroes written out).
    let image = d.join("golden.raw");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(64 << 20).unwrap();
    file.write_all_at(&[0xab; 100_000], 1 << 20).unwrap();
    file.write_all_at(&[0xcd; 4096], 40 << 20).unwrap();
    file.write_all_at(&vec![0u8; 1 << 20], 50 << 20).unwrap();
    drop(file);
    let (code, _, err) = pollblk(&[
        "pool",
        "volume",
        "import",
        p,
        "vm1",
        "--from",
        image.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("67108864 bytes, 196608 of them data"), "{err}");
    let (_, out, _) = pollblk(&["pool", "status", p, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["volumes"][0]["size_bytes"], 64 << 20);
    // 100,000 bytes from 1 MiB span two 64 KiB blocks, the 4 KiB one more: 3 blocks.
    assert_eq!(status["volumes"][0]["mapped_bytes"], 3 * 65536);
    // Out again: the same bytes, and the holes are holes.
    let back = d.join("back.raw");
    let (code, _, err) = pollblk(&[
        "pool",
        "volume",
        "export",
        p,
        "vm1",
        "--to",
        back.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&image).unwrap()
    );
    assert!(
        std::fs::metadata(&back).unwrap().blocks() * 512 < 1 << 20,
        "not sparse"
    );
    // An existing file is not overwritten; a volume name is not taken twice.
    let (code, _, err) = pollblk(&[
        "pool",
        "volume",
        "export",
        p,
        "vm1",
        "--to",
        back.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("exists"), "{err}");
    let (code, _, err) = pollblk(&[
        "pool",
        "volume",
        "import",
        p,
        "vm1",
        "--from",
        image.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("a volume named vm1 exists already"), "{err}");
    // From a pipe (as from qemu-img convert): the volume ends where the data does.
    let piped = Command::new(BIN)
        .args(["pool", "volume", "import", p, "vm2", "--from", "-"])
        .stdin(std::fs::File::open(&image).unwrap())
        .output()
        .unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    let out = Command::new(BIN)
        .args(["pool", "volume", "export", p, "vm2", "--to", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(&image).unwrap());
    assert_eq!(pollblk(&["pool", "check", p]).0, 0);
}

#[test]
fn an_import_that_fills_the_pool_fails_and_leaves_no_volume() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = d.join("pool");
    let p = pool.to_str().unwrap();
    assert_eq!(pollblk(&["pool", "create", p, "--size", "1M"]).0, 0);
    assert_eq!(
        pollblk(&["pool", "volume", "create", p, "keep", "--size", "1M"]).0,
        0
    );
    let image = d.join("big.raw");
    let file = std::fs::File::create(&image).unwrap();
    file.write_all_at(&vec![7u8; 2 << 20], 0).unwrap();
    drop(file);
    let (code, _, err) = pollblk(&[
        "pool",
        "volume",
        "import",
        p,
        "big",
        "--from",
        image.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("the pool is full"), "{err}");
    assert!(err.contains("volume big removed"), "{err}");
    let (_, out, _) = pollblk(&["pool", "status", p, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["volumes"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["used_bytes"], 0, "every block given back: {status}");
    assert_eq!(pollblk(&["pool", "check", p]).0, 0);
}
