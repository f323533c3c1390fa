//! NBD exports against clients nobody here wrote (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's
//! nbd engine), and against a hand-rolled client for what those never send (malformed
//! requests). Tools that are missing skip their test with a message unless
//! POLLBLK_REQUIRE_GUEST=1 (set by .ci/run, which installs them).

mod common;

use common::{pattern, Daemon};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("POLLBLK_REQUIRE_GUEST").as_deref() != Ok("1"),
            "{tool} is missing (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {tool} not installed");
    }
    found
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uri(socket: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// `qemu-img compare` of two raw images (paths or NBD URIs): fails the test if they differ.
fn qemu_img_compare(a: &str, b: &str) {
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b]);
}

/// The (start, length) extents `qemu-img map` reports as data for a raw image.
fn data_extents(image: &str) -> Vec<(u64, u64)> {
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", image]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// A 16 MiB raw file of pattern data.
fn image(dir: &Path, name: &str, seed: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pattern(16 << 20, seed)).unwrap();
    path
}

/// One daemon: `vm1` (a file, writable) and `ro` (another file, read-only), both on one
/// NBD socket.
fn serve_two(dir: &Path) -> (Daemon, std::path::PathBuf) {
    let socket = dir.join("nbd.sock");
    let (a, b) = (image(dir, "a.raw", 1), image(dir, "b.raw", 2));
    let args = [
        "--export".to_string(),
        format!(
            "nbd,socket={},file={},name=vm1",
            socket.display(),
            a.display()
        ),
        "--export".to_string(),
        format!(
            "nbd,socket={},file={},name=ro,readonly=on",
            socket.display(),
            b.display()
        ),
    ];
    (Daemon::start(dir, &args), socket)
}

#[test]
fn qemu_img_reads_writes_and_compares_an_export() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (_daemon, socket) = serve_two(d);
    let out = d.join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&socket, "vm1"),
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(d.join("a.raw")).unwrap());
    qemu_img_compare(&uri(&socket, "vm1"), d.join("a.raw").to_str().unwrap());
    // Written through the export, then read back from the file the daemon serves.
    let new = image(d, "new.raw", 9);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            new.to_str().unwrap(),
            &uri(&socket, "vm1"),
        ],
    );
    qemu_img_compare(&uri(&socket, "vm1"), new.to_str().unwrap());
    // The read-only export: qemu sees NBD_FLAG_READ_ONLY and will not open it for writing
    // (the protocol-level EPERM is the hand-rolled client's test below).
    if have("qemu-io") {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k", &uri(&socket, "ro")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && text.contains("Permission denied"),
            "{text}"
        );
    }
}

#[test]
fn nbdinfo_lists_both_exports_and_nbdcopy_copies_one() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (_daemon, socket) = serve_two(d);
    let list = run("nbdinfo", &["--list", &uri(&socket, "")]);
    assert!(
        list.contains("export=\"vm1\"") && list.contains("export=\"ro\""),
        "{list}"
    );
    let info = run("nbdinfo", &["--json", &uri(&socket, "ro")]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16 << 20, "{info}");
    assert_eq!(export["is_read_only"], true, "{info}");
    assert_eq!(export["can_multi_conn"], true, "{info}");
    assert_eq!(export["block_size_minimum"], 512, "{info}");
    let out = d.join("copy.raw");
    run("nbdcopy", &[&uri(&socket, "ro"), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(d.join("b.raw")).unwrap());
}

#[test]
fn fio_nbd_engine_writes_and_verifies() {
    if !have("fio") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (_daemon, socket) = serve_two(d);
    fio_verify(&uri(&socket, "vm1"), "4k/80:64k/20", None);
}

/// fio's nbd engine writes 16 MiB at random (block sizes `bssplit`, 16 in flight) to `uri`
/// and reads every block back to verify it; `home`: its $HOME (where libnbd looks for TLS
/// credentials, in .pki/libnbd: fio's engine refuses tls-certificates= in the URI).
fn fio_verify(uri: &str, bssplit: &str, home: Option<&Path>) {
    let mut fio = Command::new("fio");
    if let Some(home) = home {
        fio.env("HOME", home);
    }
    let out = fio
        .args([
            "--name=nbd",
            "--verify_state_save=0",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bssplit={bssplit}"),
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--output-format=json",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "fio on {uri}: {stdout}{stderr}");
    let out = stdout;
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
        "{job}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
        "verified: {job}"
    );
}

/// A minimal NBD client: fixed newstyle, NBD_OPT_GO on `name`, simple replies.
struct Client {
    s: UnixStream,
}

impl Client {
    fn connect(socket: &Path, name: &str) -> Client {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut option = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        option.extend_from_slice(&7u32.to_be_bytes());
        option.extend_from_slice(&(data.len() as u32).to_be_bytes());
        option.extend_from_slice(&data);
        s.write_all(&option).unwrap();
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head).unwrap();
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            assert!(
                kind < 1 << 31,
                "GO refused: {}",
                String::from_utf8_lossy(&body)
            );
            if kind == 1 {
                return Client { s };
            }
        }
    }

    fn send(&mut self, flags: u16, kind: u16, offset: u64, length: u32, data: &[u8]) {
        let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&77u64.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        h.extend_from_slice(data);
        self.s.write_all(&h).unwrap();
    }

    /// The next simple reply's error, its data (`len` bytes) read when it succeeded.
    fn reply(&mut self, len: usize) -> (u32, Vec<u8>) {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(
            u32::from_be_bytes(head[..4].try_into().unwrap()),
            0x6744_6698
        );
        assert_eq!(u64::from_be_bytes(head[8..].try_into().unwrap()), 77);
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let mut data = vec![0u8; if error == 0 { len } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        (error, data)
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn malformed_requests_get_the_protocols_errors_and_other_exports_keep_serving() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (_daemon, socket) = serve_two(d);
    let mut c = Client::connect(&socket, "vm1");
    let size = 16u64 << 20;
    let rows: &[(&str, u16, u16, u64, u32, u32)] = &[
        ("read past the end", 0, 0, size - 512, 1024, 22),
        (
            "read at an offset that overflows",
            0,
            0,
            u64::MAX - 511,
            512,
            22,
        ),
        ("unaligned read", 0, 0, 100, 512, 22),
        ("empty read", 0, 0, 0, 0, 22),
        ("read larger than the maximum", 0, 0, 0, 4 << 20, 22),
        ("unknown command", 0, 9, 0, 512, 22),
        ("unknown flag", 1 << 9, 0, 0, 512, 22),
        ("DF without structured replies", 1 << 2, 0, 0, 512, 22),
        ("block status without a context", 0, 7, 0, 512, 22),
        ("flush with a range", 0, 3, 0, 512, 22),
        ("write-zeroes past the end", 0, 6, size, 512, 28),
    ];
    for &(what, flags, kind, offset, length, errno) in rows {
        c.send(flags, kind, offset, length, &[]);
        assert_eq!(c.reply(0).0, errno, "{what}");
    }
    // A write past the end: ENOSPC, its data read and dropped, the connection fine after.
    c.send(0, 1, size, 512, &[7u8; 512]);
    assert_eq!(c.reply(0).0, 28, "write past the end");
    c.send(0, 1, 4096, 512, &[7u8; 512]);
    assert_eq!(c.reply(0).0, 0);
    c.send(0, 0, 4096, 512, &[]);
    assert_eq!(c.reply(512), (0, vec![7u8; 512]));
    // The read-only export: EPERM for every change.
    let mut ro = Client::connect(&socket, "ro");
    for (kind, data) in [(1u16, &[1u8; 512][..]), (4, &[][..]), (6, &[][..])] {
        ro.send(0, kind, 0, 512, data);
        assert_eq!(ro.reply(0).0, 1, "command {kind} on a read-only export");
    }
    // A header with bad magic drops that connection only.
    ro.s.write_all(&[0u8; 28]).unwrap();
    assert!(ro.closed(), "bad magic: dropped");
    // A write larger than the maximum is not taken in: dropped too.
    let mut big = Client::connect(&socket, "ro");
    big.send(0, 1, 0, 64 << 20, &[]);
    assert!(big.closed(), "an oversized write: dropped");
    // The first connection still serves; DISC ends it cleanly.
    c.send(0, 0, 0, 4096, &[]);
    assert_eq!(c.reply(4096).1, pattern(16 << 20, 1)[..4096]);
    c.send(0, 2, 0, 0, &[]);
    assert!(c.closed(), "DISC closes");
    // A client that never finishes its handshake does not hold up others.
    let _stalled = UnixStream::connect(&socket).unwrap();
    let mut again = Client::connect(&socket, "vm1");
    again.send(0, 0, 0, 512, &[]);
    assert_eq!(again.reply(512).0, 0);
}

#[test]
fn bad_nbd_exports_are_refused_with_the_reason() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let f = image(d, "f.raw", 3);
    let refused = |spec: String| {
        let out = Command::new(common::BIN)
            .current_dir(d)
            .args(["serve", "--export", &spec])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{spec}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(format!("nbd,addr=0.0.0.0:10809,file={}", f.display()));
    assert!(e.contains("needs TLS: add tls-creds=DIR"), "{e}");
    let e = refused(format!(
        "nbd,socket=s,file={},tls-verify-peer=off",
        f.display()
    ));
    assert!(
        e.contains("tls-verify-peer= goes with tls-creds=DIR"),
        "{e}"
    );
    let e = refused(format!(
        "vhost-user-blk,socket=s,file={},tls-creds=/x",
        f.display()
    ));
    assert!(e.contains("go with nbd exports"), "{e}");
    // Credentials that are not there: the daemon does not start, and names the file.
    let out = Command::new(common::BIN)
        .current_dir(d)
        .args(["serve", "--export"])
        .arg(format!(
            "nbd,addr=127.0.0.1:{},file={},tls-creds={}",
            free_port(),
            f.display(),
            d.join("nothing").display()
        ))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("nothing/ca-cert.pem"), "{e}");
    let e = refused(format!("nbd,file={}", f.display()));
    assert!(
        e.contains("socket=PATH or addr=HOST:PORT is required"),
        "{e}"
    );
    let e = refused(format!(
        "nbd,socket=s,addr=127.0.0.1:1,file={}",
        f.display()
    ));
    assert!(e.contains("not both"), "{e}");
}

/// The backup workflow of the README: a served volume snapshotted, the snapshot exported
/// over NBD read-only, copied to a qcow2 file by qemu-img (its holes skipped: `qemu-img
/// map` sees them through base:allocation), restored into a new volume through another
/// export, and compared.
#[test]
fn a_snapshot_is_backed_up_over_nbd_to_qcow2_and_restored() {
    if !have("qemu-img") {
        return;
    }
    use pollblk_driver::{BlkDriver, DriverOptions};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let pool = d.join("pool");
    let p = pool.to_str().unwrap();
    run(common::BIN, &["pool", "create", p, "--size", "256M"]);
    run(
        common::BIN,
        &["pool", "volume", "create", p, "vm1", "--size", "64M"],
    );
    let control = d.join("control.sock");
    let vm1 = d.join("vm1.sock");
    let args = [
        "--control".to_string(),
        control.display().to_string(),
        "--export".into(),
        format!(
            "vhost-user-blk,socket={},pool={p},volume=vm1,name=vm1",
            vm1.display()
        ),
    ];
    let _daemon = Daemon::start(d, &args);
    // Data in two places; the rest of the 64 MiB never written.
    let mut guest = BlkDriver::connect(&vm1, DriverOptions::default());
    let (a, b) = (pattern(1 << 20, 5), pattern(256 << 10, 6));
    assert_eq!(guest.write(0, 2048, &a), 0);
    assert_eq!(guest.write(0, 40 << 11, &b), 0);
    let rpc = |method: &str, params: &[&str]| common::rpc(d, &control, method, params).unwrap();
    rpc(
        "volume_snapshot",
        &[&format!("pool={p}"), "volume=vm1", "snapshot=vm1-backup"],
    );
    // The guest goes on writing; the snapshot keeps the moment.
    assert_eq!(guest.write(0, 2048, &pattern(4096, 7)), 0);
    let nbd = d.join("nbd.sock");
    let spec = |volume: &str, extra: &str| {
        format!(
            "spec=nbd,socket={},pool={p},volume={volume},name={volume}{extra}",
            nbd.display()
        )
    };
    rpc("export_add", &[&spec("vm1-backup", ",readonly=on")]);
    // export_list shows a client's connection while it holds it, and its slot free after.
    let slots = || {
        let list = rpc("export_list", &[]);
        let backup = list
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "vm1-backup");
        backup.unwrap()["queues"].clone()
    };
    let held = Client::connect(&nbd, "vm1-backup");
    let states = slots();
    assert_eq!(states.as_array().unwrap().len(), 8, "{states}");
    assert_eq!(states[0], "connected", "{states}");
    assert!(
        states.as_array().unwrap()[1..].iter().all(|s| s == "idle"),
        "{states}"
    );
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while slots()[0] != "idle" {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let extents = data_extents(&uri(&nbd, "vm1-backup"));
    let data: u64 = extents.iter().map(|e| e.1).sum();
    // The written 1.25 MiB in whole 64 KiB blocks, nothing more.
    assert!((1280 << 10..=1536 << 10).contains(&data), "{extents:?}");
    let backup = d.join("backup.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &uri(&nbd, "vm1-backup"),
            backup.to_str().unwrap(),
        ],
    );
    let size = std::fs::metadata(&backup).unwrap().len();
    assert!(size < 4 << 20, "the holes were copied: {size} bytes");
    rpc(
        "volume_create",
        &[&format!("pool={p}"), "volume=restored", "size=64M"],
    );
    rpc("export_add", &[&spec("restored", "")]);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            backup.to_str().unwrap(),
            &uri(&nbd, "restored"),
        ],
    );
    qemu_img_compare(&uri(&nbd, "vm1-backup"), &uri(&nbd, "restored"));
    let status = rpc("pool_status", &[&format!("pool={p}")]);
    let restored = status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "restored")
        .unwrap()
        .clone();
    assert!(
        restored["mapped_bytes"].as_u64().unwrap() <= 2 << 20,
        "{restored}"
    );
    // nbdinfo --map agrees where it is installed.
    if have("nbdinfo") {
        let m = run("nbdinfo", &["--map", &uri(&nbd, "vm1-backup")]);
        assert!(m.contains("hole,zero") && m.contains("data"), "{m}");
    }
}

/// A sparse file's holes reach NBD clients too (base:allocation from SEEK_DATA/SEEK_HOLE).
#[test]
fn a_sparse_files_holes_show_in_qemu_img_map() {
    if !have("qemu-img") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let file = d.join("sparse.raw");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&pattern(1 << 20, 4), 8 << 20).unwrap();
    drop(f);
    let socket = d.join("nbd.sock");
    let spec = format!(
        "nbd,socket={},file={},name=sparse",
        socket.display(),
        file.display()
    );
    let _daemon = Daemon::start(d, &["--export".to_string(), spec]);
    let data = data_extents(&uri(&socket, "sparse"));
    // The one MiB written (a file system may round it to its blocks), nothing else.
    assert_eq!(data.len(), 1, "{data:?}");
    let (start, length) = data[0];
    assert!(start <= 8 << 20 && start + length >= 9 << 20, "{data:?}");
    assert!(length <= 2 << 20, "{data:?}");
}

/// X.509 credentials in the layout of QEMU's tls-creds-x509 (and libnbd's
/// tls-certificates): `server/` for pollblk, `client/` signed by the same authority,
/// `anonymous/` with the authority only (no client certificate), and `stranger/`, a client
/// that trusts the server but whose certificate another authority signed.
fn credentials(dir: &Path) -> std::path::PathBuf {
    let creds = dir.join("creds");
    let path = |name: String| creds.join(name).to_str().unwrap().to_string();
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::create_dir_all(&creds).unwrap();
    for ca in ["ca", "other-ca"] {
        let subject = format!("/CN=pollblk test {ca}");
        let (cert, ca_key) = (
            path(format!("{ca}-cert.pem")),
            path(format!("{ca}-key.pem")),
        );
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject];
        args.extend(key);
        args.extend(["-keyout", &ca_key, "-out", &cert]);
        run("openssl", &args);
    }
    // (directory, certificate and key names, authority, extensions)
    let leaves = [
        (
            "server",
            "server",
            "ca",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "client", "ca", "extendedKeyUsage=clientAuth\n"),
        (
            "stranger",
            "client",
            "other-ca",
            "extendedKeyUsage=clientAuth\n",
        ),
    ];
    for (sub, role, ca, extensions) in leaves {
        std::fs::create_dir_all(creds.join(sub)).unwrap();
        let in_sub = |name: &str| path(format!("{sub}/{name}"));
        let (ext, csr) = (in_sub("ext.cnf"), in_sub("req.csr"));
        std::fs::write(&ext, format!("basicConstraints=CA:FALSE\n{extensions}")).unwrap();
        let cert = in_sub(&format!("{role}-cert.pem"));
        let leaf_key = in_sub(&format!("{role}-key.pem"));
        let subject = format!("/CN={}", if role == "server" { "localhost" } else { sub });
        let mut args = vec!["req", "-subj", &subject];
        args.extend(key);
        args.extend(["-keyout", &leaf_key, "-out", &csr]);
        run("openssl", &args);
        let (ca_cert, ca_key) = (
            path(format!("{ca}-cert.pem")),
            path(format!("{ca}-key.pem")),
        );
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        );
        std::fs::copy(
            creds.join("ca-cert.pem"),
            creds.join(sub).join("ca-cert.pem"),
        )
        .unwrap();
    }
    let anonymous = creds.join("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(creds.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    creds
}

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// qemu-img's `--object` and `--image-opts` for export `name` at `port` with the client
/// credentials in `creds`.
fn tls_image(creds: &Path, port: u16, name: &str) -> [String; 4] {
    [
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            creds.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
             export={name},tls-creds=tls0"
        ),
    ]
}

/// TLS on a TCP export: qemu-img with a client certificate reads and writes it; without
/// TLS, without a client certificate, or trusting another authority, it gets nothing; and
/// before STARTTLS the listener names no export.
#[test]
fn tls_export_serves_qemu_img_with_a_client_certificate_and_no_one_else() {
    if !have("qemu-img") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let creds = credentials(d);
    let (a, b) = (image(d, "a.raw", 1), image(d, "b.raw", 2));
    let port = free_port();
    let _daemon = Daemon::start(
        d,
        &[
            "--export".into(),
            format!(
                "nbd,addr=127.0.0.1:{port},file={},name=vm1,tls-creds={}",
                a.display(),
                creds.join("server").display()
            ),
        ],
    );
    let qemu_img = |args: &[&str], creds: &Path, tail: &[&str]| {
        let mut command = Command::new("qemu-img");
        command
            .args(args)
            .args(tls_image(creds, port, "vm1"))
            .args(tail);
        command.output().unwrap()
    };
    // Read through TLS, then write b over it through TLS, then read again.
    let copy = d.join("copy.raw");
    let out = qemu_img(
        &["convert", "-O", "raw"],
        &creds.join("client"),
        &[copy.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&a).unwrap());
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            b.to_str().unwrap(),
        ])
        .args(&tls_image(&creds.join("client"), port, "vm1")[..2])
        .arg(&tls_image(&creds.join("client"), port, "vm1")[3])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // No client certificate: refused. One from another authority: qemu-img will not even
    // try (it checks its own certificate first); libnbd does, does not offer a certificate
    // the server's list of authorities does not name, and is refused for sending none.
    let out = qemu_img(&["info"], &creds.join("anonymous"), &[]);
    assert!(!out.status.success(), "served without a client certificate");
    if have("nbdinfo") {
        let stranger = creds.join("stranger");
        let out = Command::new("nbdinfo")
            .arg(format!(
                "nbds://127.0.0.1:{port}/vm1?tls-certificates={}",
                stranger.display()
            ))
            .output()
            .unwrap();
        assert!(!out.status.success(), "served a stranger");
    }
    // No TLS at all: the export is not even named.
    let out = Command::new("qemu-img")
        .args(["info", &format!("nbd://127.0.0.1:{port}/vm1")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("TLS"), "{e}");
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = [0u8; 18];
    plain.read_exact(&mut greeting).unwrap();
    plain.write_all(&1u32.to_be_bytes()).unwrap();
    // NBD_OPT_LIST: IHAVEOPT, option 3, no data.
    plain
        .write_all(&0x4948_4156_454f_5054u64.to_be_bytes())
        .unwrap();
    plain.write_all(&[0, 0, 0, 3, 0, 0, 0, 0]).unwrap();
    let mut reply = [0u8; 20];
    plain.read_exact(&mut reply).unwrap();
    let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap());
    assert_eq!(kind, (1 << 31) | 5, "NBD_REP_ERR_TLS_REQD");
    let length = u32::from_be_bytes(reply[16..20].try_into().unwrap());
    let mut message = vec![0u8; length as usize];
    plain.read_exact(&mut message).unwrap();
    assert!(!String::from_utf8_lossy(&message).contains("vm1"));
    // NBD_OPT_STARTTLS (5) is agreed; garbage instead of a ClientHello drops the connection.
    plain
        .write_all(&0x4948_4156_454f_5054u64.to_be_bytes())
        .unwrap();
    plain.write_all(&[0, 0, 0, 5, 0, 0, 0, 0]).unwrap();
    plain.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        1,
        "ACK"
    );
    plain.write_all(&[0x42; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(rest.len() < 64, "a TLS alert at most: {rest:?}");
    // And the export still serves a client that does it right.
    let out = qemu_img(&["info"], &creds.join("client"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tls-verify-peer=off`: any client that completes TLS is served, here nbdinfo and fio
/// (libnbd, GnuTLS) with the authority alone; a Unix socket can require TLS too.
#[test]
fn tls_without_client_verification_serves_nbdinfo_and_fio_over_tcp_and_unix() {
    if !have("nbdinfo") || !have("fio") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let creds = credentials(d);
    let (port, socket) = (free_port(), d.join("nbd.sock"));
    let server = creds.join("server");
    let spec = |at: String, file: &str| {
        format!(
            "nbd,{at},file={},tls-creds={},tls-verify-peer=off",
            image(d, file, 1).display(),
            server.display()
        )
    };
    let _daemon = Daemon::start(
        d,
        &[
            "--export".into(),
            spec(format!("addr=127.0.0.1:{port},name=vm1"), "a.raw"),
            "--export".into(),
            spec(format!("socket={},name=vm2", socket.display()), "b.raw"),
        ],
    );
    let anonymous = creds.join("anonymous");
    let certs = format!("tls-certificates={}", anonymous.display());
    for uri in [
        format!("nbds://127.0.0.1:{port}/vm1?{certs}"),
        format!("nbds+unix:///vm2?socket={}&{certs}", socket.display()),
    ] {
        let info = run("nbdinfo", &["--json", &uri]);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["exports"][0]["export-size"], 16 << 20, "{uri}");
        assert_eq!(info["TLS"], true, "{uri}");
    }
    // Requests and replies of up to 1 MiB, 16 at once, through TLS records.
    let home = d.join("home");
    std::fs::create_dir_all(home.join(".pki")).unwrap();
    std::fs::rename(&anonymous, home.join(".pki/libnbd")).unwrap();
    let uri = format!("nbds://127.0.0.1:{port}/vm1");
    fio_verify(&uri, "4k/60:64k/30:1m/10", Some(&home));
}
