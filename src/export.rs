//! The `--export` option: one virtual disk, its transport and its volume.
//!
//! `vhost-user-blk,socket=PATH,file=PATH[,num-queues=N][,readonly=on][,block-size=512|4096][,serial=ID]`
//! `vhost-user-blk,socket=PATH,null,size=BYTES[,read-zeroes=on|off][,latency-ns=N][,...same options]`
//! `vhost-user-blk,socket=PATH,pool=DIR,volume=NAME[,...same options]`
//! `vhost-user-blk,socket=PATH,rbd=POOL/IMAGE[,ceph-conf=PATH][,client=NAME][,rbd-timeout=SECS][,...]`
//! `xen-blkif-loopback,dir=PATH,domid=N,devid=N,<a volume as above>[,num-queues=N][,...]`
//! `xen-blkif,domid=N,devid=N,<a volume>[,...]` (real Xen: a build with the `xen` feature)
//!
//! A vhost-user export takes `socket-owner=USER`, `socket-group=GROUP` and `socket-mode=0660`
//! for its socket (default: the daemon's `--socket-owner`... or, unset, the daemon's user and
//! the umask).
//!
//! Every export also takes `name=NAME` (the disk's name in statistics, logs and the control
//! socket; default: the first free diskN), `reactor=N`: the reactor of its queue 0 (queue
//! i goes to reactor N + i, wrapping; without it the daemon picks the reactor with the
//! fewest queues), and limits (`iops-total=N`, `bps-write=50M`, `qos-group=NAME`...: see
//! qos_options.rs).

use std::path::PathBuf;

/// Queues a disk offers unless told otherwise: QEMU asks for one per vCPU and refuses a back
/// end that offers fewer, and an unused queue costs nothing until a front end starts it.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
/// Most queues one disk may offer.
pub const MAX_NUM_QUEUES: u16 = 256;

/// Where a disk's data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Volume {
    /// A raw image file or block device that must exist.
    File(PathBuf),
    /// Stores nothing: reads return zeroes, or with `read_zeroes` off leave the guest's
    /// buffer as it was (QEMU null-co's read-zeroes=off: for benchmarks of the request path).
    /// With `latency_ns` (QEMU null-co's latency-ns) every operation completes that long
    /// after it was submitted: a slow device for tests.
    Null {
        size_bytes: u64,
        read_zeroes: bool,
        latency_ns: u64,
    },
    /// A volume of the thin pool in a directory (`pollblk pool create`).
    Thin { pool: PathBuf, volume: String },
    /// An image of a Ceph cluster (needs a build with `--features rbd`).
    Rbd(RbdVolume),
}

/// `rbd=POOL/IMAGE[,ceph-conf=PATH][,client=NAME][,rbd-timeout=SECS]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdVolume {
    pub pool: String,
    pub image: String,
    pub conf: Option<PathBuf>,
    pub client: Option<String>,
    /// Seconds an operation may wait on the cluster before it fails with IOERR.
    pub timeout_secs: u64,
}

/// Default of `rbd-timeout=`.
pub const DEFAULT_RBD_TIMEOUT_SECS: u64 = 30;

/// Queues a Xen disk offers unless told otherwise (multi-queue-max-queues).
pub const DEFAULT_XEN_QUEUES: u16 = 4;

/// Connections an NBD export takes at once unless told otherwise (`num-queues=`: each
/// connection is one queue, with its own statistics).
pub const DEFAULT_NBD_CONNECTIONS: u16 = 8;

/// How guests reach a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// vhost-user-blk on a Unix socket.
    VhostUser { socket: PathBuf },
    /// Xen blkif through the loopback platform (a store socket in `dir`; no hypervisor).
    XenLoopback {
        dir: PathBuf,
        domid: u32,
        devid: u32,
    },
    /// Xen blkif on a real Xen host (a build with the `xen` feature).
    Xen { domid: u32, devid: u32 },
    /// NBD on a Unix socket or a TCP address, under the disk's name (`name=`; the default
    /// export "" without it), with TLS required when `tls` names credentials.
    Nbd {
        address: pollblk_nbd::server::Address,
        tls: Option<pollblk_nbd::tls::TlsOptions>,
    },
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::VhostUser { socket } => write!(f, "socket {}", socket.display()),
            Transport::XenLoopback { dir, domid, devid } => write!(
                f,
                "xen-blkif-loopback {} domain {domid} device {devid}",
                dir.display()
            ),
            Transport::Xen { domid, devid } => {
                write!(f, "xen-blkif domain {domid} device {devid}")
            }
            Transport::Nbd { address, .. } => {
                write!(f, "{}", pollblk_nbd::server::describe(address))
            }
        }
    }
}

/// One parsed `--export`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub transport: Transport,
    pub volume: Volume,
    pub num_queues: u16,
    pub readonly: bool,
    pub block_size: u32,
    pub serial: Option<String>,
    /// Offer PROVISION (experimental virtio-blk feature, seed 004).
    pub provision: bool,
    /// Offer the stats virtqueue (experimental, seed 000) on this feature bit.
    pub guest_stats_bit: Option<u32>,
    /// The reactor of the disk's queue 0 (queue i goes to the next reactors in turn); None:
    /// the least loaded one.
    pub reactor: Option<usize>,
    /// The disk's name (statistics, logs, the control socket); None: the first free diskN.
    pub name: Option<String>,
    /// Its limits (all 0: none).
    pub qos: pollblk_engine::qos::QosConfig,
    /// The throttle group whose limits it shares.
    pub qos_group: Option<String>,
    /// Owner, group and mode of its vhost-user socket (unset: the daemon's defaults).
    pub socket_access: pollblk_engine::unix_socket::Access,
    /// `format=raw`: serve a file that looks like another image format as its bytes.
    pub force_raw: bool,
}

/// Feature bits the stats virtqueue may use: device-specific (below 24), unassigned in virtio
/// 1.3 (0 to 17 are) and not PROVISION's 18.
pub const GUEST_STATS_BITS: std::ops::RangeInclusive<u32> = 19..=23;

/// Parses a size: plain bytes, or with a unit as qemu-img and LVM read them: K, M, G, T
/// and KiB, MiB, GiB, TiB are powers of 1024; KB, MB, GB, TB are powers of 1000.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} is not a number of bytes (e.g. 1073741824 or 1G)"))?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "size {text:?}: unknown unit {unit:?} (bytes, or K/M/G/T and KiB/MiB/GiB/TiB \
                 for powers of 1024, KB/MB/GB/TB for powers of 1000)"
            ))
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

fn parse_on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{key}={value}: expected on or off")),
    }
}

/// The known option nearest to `key` (at most two edits away), for a typo's message.
fn nearest_option(key: &str) -> Option<&'static str> {
    let limit_keys = pollblk_engine::qos::LIMIT_KINDS.iter().map(|k| k.key());
    KNOWN_OPTIONS
        .iter()
        .copied()
        .chain(limit_keys)
        .map(|known| (edit_distance(key, known), known))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, known)| known)
}

/// Levenshtein distance (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let substitute = prev + usize::from(ca != b[j]);
            prev = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(prev + 1);
        }
    }
    row[b.len()]
}

/// What to say of an unknown option: the nearest known one, or all of them.
fn unknown_option(part: &str) -> String {
    let key = part.split_once('=').map_or(part, |(k, _)| k);
    match nearest_option(key) {
        Some(near) => format!("unknown export option {part:?}: did you mean {near}=?"),
        None => format!(
            "unknown export option {part:?}; the options are: {}, and the limits (iops-total, \
             bps-write, ... see README, Limits)",
            KNOWN_OPTIONS.join(", ")
        ),
    }
}

/// Every option an export takes; `null` is the one without a value.
const KNOWN_OPTIONS: [&str; 32] = [
    "socket",
    "dir",
    "domid",
    "devid",
    "file",
    "null",
    "size",
    "read-zeroes",
    "latency-ns",
    "pool",
    "volume",
    "rbd",
    "ceph-conf",
    "client",
    "rbd-timeout",
    "num-queues",
    "readonly",
    "block-size",
    "serial",
    "provision",
    "guest-stats",
    "guest-stats-bit",
    "reactor",
    "name",
    "qos-group",
    "socket-owner",
    "socket-group",
    "socket-mode",
    "format",
    "addr",
    "tls-creds",
    "tls-verify-peer",
];

/// The `key=value` options of a spec, checked for known keys and present values up front;
/// the parsers of the transport, the volume and the disk each read their own.
struct Options<'a> {
    parts: Vec<(&'a str, &'a str)>,
}

impl<'a> Options<'a> {
    fn parse(parts: impl Iterator<Item = &'a str>) -> Result<Options<'a>, String> {
        let mut checked = Vec::new();
        for part in parts {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let known = (KNOWN_OPTIONS.contains(&key) || crate::qos_options::is_limit_key(key))
                && (key != "null" || value.is_empty());
            if !known {
                return Err(unknown_option(part));
            }
            if key != "null" && value.is_empty() {
                return Err(format!("{key} needs a value ({key}=...)"));
            }
            checked.push((key, value));
        }
        Ok(Options { parts: checked })
    }

    /// The value of `key` (the last one given).
    fn get(&self, key: &str) -> Option<&'a str> {
        self.parts
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|&(_, v)| v)
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.get(key).map(PathBuf::from)
    }

    fn on_off(&self, key: &str) -> Result<Option<bool>, String> {
        self.get(key).map(|v| parse_on_off(key, v)).transpose()
    }

    /// A number in `range`, or an error saying what was expected.
    fn number<T>(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<T>,
        expected: &str,
    ) -> Result<Option<T>, String>
    where
        T: std::str::FromStr + PartialOrd,
    {
        self.get(key)
            .map(|v| {
                v.parse::<T>()
                    .ok()
                    .filter(|n| range.contains(n))
                    .ok_or_else(|| format!("{key}={v}: expected {expected}"))
            })
            .transpose()
    }

    /// Fails with `why` if any of `keys` was given.
    fn refuse(&self, keys: &[&str], why: &str) -> Result<(), String> {
        match keys.iter().any(|k| self.has(k)) {
            true => Err(why.to_string()),
            false => Ok(()),
        }
    }
}

/// The export types this build serves.
fn check_kind(kind: &str) -> Result<(), String> {
    match kind {
        "vhost-user-blk" | "xen-blkif-loopback" | "nbd" => Ok(()),
        "xen-blkif" if cfg!(feature = "xen") => Ok(()),
        "xen-blkif" => Err(
            "xen-blkif (real Xen) needs a pollblk built with the xen feature \
             (cargo build --features xen, with libxen-dev); without a hypervisor \
             use xen-blkif-loopback,dir=PATH,..."
                .into(),
        ),
        other => Err(format!(
            "unknown export type {other:?}: the supported types are vhost-user-blk, \
             nbd and xen-blkif-loopback"
        )),
    }
}

/// `vhost-user-blk,socket=PATH`.
fn vhost_user_transport(opts: &Options) -> Result<Transport, String> {
    opts.refuse(
        &["dir", "domid", "devid"],
        "dir=, domid= and devid= go with the Xen exports",
    )?;
    let socket = opts.path("socket").ok_or("socket=PATH is required")?;
    Ok(Transport::VhostUser { socket })
}

/// `nbd,socket=PATH` or `nbd,addr=HOST:PORT`, with `tls-creds=DIR[,tls-verify-peer=off]`
/// (required for TCP on an address other than loopback).
fn nbd_transport(opts: &Options) -> Result<Transport, String> {
    opts.refuse(
        &["dir", "domid", "devid"],
        "dir=, domid= and devid= go with the Xen exports",
    )?;
    opts.refuse(
        &["guest-stats", "guest-stats-bit", "provision"],
        "guest-stats= and provision= are virtio-blk features: not for NBD",
    )?;
    use pollblk_nbd::server::Address;
    let tls = match (opts.path("tls-creds"), opts.on_off("tls-verify-peer")?) {
        (Some(dir), verify_peer) => Some(pollblk_nbd::tls::TlsOptions {
            dir,
            verify_peer: verify_peer.unwrap_or(true),
        }),
        (None, Some(_)) => return Err("tls-verify-peer= goes with tls-creds=DIR".into()),
        (None, None) => None,
    };
    let address = match (opts.path("socket"), opts.get("addr")) {
        (Some(socket), None) => Address::Unix(socket),
        (None, Some(addr)) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| format!("addr={addr}: expected HOST:PORT (127.0.0.1:10809)"))?;
            if !addr.ip().is_loopback() && tls.is_none() {
                return Err(format!(
                    "addr={addr}: NBD over TCP on an address other than loopback needs TLS: \
                     add tls-creds=DIR (server-cert.pem, server-key.pem and ca-cert.pem, as \
                     for QEMU's tls-creds-x509), or listen on 127.0.0.1"
                ));
            }
            Address::Tcp(addr)
        }
        (Some(_), Some(_)) => return Err("socket= or addr=, not both".into()),
        (None, None) => return Err("socket=PATH or addr=HOST:PORT is required".into()),
    };
    Ok(Transport::Nbd { address, tls })
}

/// `socket-owner=USER,socket-group=GROUP,socket-mode=0660`: who may connect.
fn socket_access(opts: &Options) -> Result<pollblk_engine::unix_socket::Access, String> {
    let with_key = |key: &str, e: String| format!("{key}: {e}");
    Ok(pollblk_engine::unix_socket::Access {
        owner: opts
            .get("socket-owner")
            .map(crate::ids::parse_user)
            .transpose()
            .map_err(|e| with_key("socket-owner", e))?,
        group: opts
            .get("socket-group")
            .map(crate::ids::parse_group)
            .transpose()
            .map_err(|e| with_key("socket-group", e))?,
        mode: opts
            .get("socket-mode")
            .map(crate::ids::parse_mode)
            .transpose()
            .map_err(|e| with_key("socket-mode", e))?,
    })
}

/// `xen-blkif-loopback,dir=PATH,domid=N,devid=N` and `xen-blkif,domid=N,devid=N`.
fn xen_transport(kind: &str, opts: &Options) -> Result<Transport, String> {
    opts.refuse(
        &["socket", "socket-owner", "socket-group", "socket-mode"],
        "socket= and its socket-owner=, socket-group=, socket-mode= go with vhost-user-blk, \
         not with the Xen exports",
    )?;
    opts.refuse(
        &["guest-stats", "provision"],
        "guest-stats= and provision= are virtio-blk features: not for Xen",
    )?;
    let domid = opts
        .number("domid", 1..=0x7fef, "1 to 32751")?
        .ok_or("domid=N (the front end's domain) is required")?;
    let devid = opts
        .number("devid", 0..=u32::MAX, "a device number")?
        .ok_or("devid=N (the virtual device number) is required")?;
    match (kind, opts.path("dir")) {
        ("xen-blkif", None) => Ok(Transport::Xen { domid, devid }),
        ("xen-blkif", Some(_)) => Err("dir= goes with xen-blkif-loopback".into()),
        (_, dir) => Ok(Transport::XenLoopback {
            dir: dir.ok_or("dir=PATH (where the loopback store's socket goes) is required")?,
            domid,
            devid,
        }),
    }
}

/// The volume: exactly one of file=, null, pool=+volume=, rbd=.
fn parse_volume(opts: &Options, block_size: u32) -> Result<Volume, String> {
    if !opts.has("rbd") {
        opts.refuse(
            &["ceph-conf", "client", "rbd-timeout"],
            "ceph-conf=, client= and rbd-timeout= go with rbd=POOL/IMAGE",
        )?;
    }
    if !opts.has("null") {
        opts.refuse(
            &["read-zeroes", "latency-ns"],
            "read-zeroes= and latency-ns= go with null",
        )?;
    }
    if opts.has("file") && opts.has("null") {
        return Err("give either file=PATH or null, not both".into());
    }
    let thin = opts.has("pool") || opts.has("volume");
    let kinds = [opts.has("file"), opts.has("null"), thin, opts.has("rbd")];
    if kinds.iter().filter(|&&given| given).count() > 1 {
        return Err(
            "give one volume: file=PATH, null, pool=DIR,volume=NAME or rbd=POOL/IMAGE".into(),
        );
    }
    if !opts.has("null") {
        opts.refuse(
            &["size"],
            "size= goes with null; a file's size is its length",
        )?;
    }
    match kinds {
        [true, ..] => Ok(Volume::File(opts.path("file").expect("given"))),
        [_, true, ..] => null_volume(opts, block_size),
        [_, _, true, _] => thin_volume(opts),
        [.., true] => rbd_volume(opts),
        _ => Err("a volume is required: file=PATH, null or pool=DIR,volume=NAME".into()),
    }
}

/// `null,size=BYTES[,read-zeroes=on|off][,latency-ns=N]`.
fn null_volume(opts: &Options, block_size: u32) -> Result<Volume, String> {
    let size_bytes = parse_size(opts.get("size").ok_or("null needs size=BYTES")?)?;
    if size_bytes == 0 || size_bytes % u64::from(block_size) != 0 {
        return Err(format!(
            "size {size_bytes} is not a non-zero multiple of the block size {block_size}"
        ));
    }
    Ok(Volume::Null {
        size_bytes,
        read_zeroes: opts.on_off("read-zeroes")?.unwrap_or(true),
        latency_ns: opts
            .number("latency-ns", 0..=60_000_000_000, "0 to 60e9")?
            .unwrap_or(0),
    })
}

/// `pool=DIR,volume=NAME`.
fn thin_volume(opts: &Options) -> Result<Volume, String> {
    match (opts.path("pool"), opts.get("volume")) {
        (Some(pool), Some(volume)) => Ok(Volume::Thin {
            pool,
            volume: volume.to_string(),
        }),
        _ => Err("pool=DIR and volume=NAME go together".into()),
    }
}

/// `rbd=POOL/IMAGE[,ceph-conf=PATH][,client=NAME][,rbd-timeout=SECS]`.
fn rbd_volume(opts: &Options) -> Result<Volume, String> {
    let value = opts.get("rbd").expect("given");
    let (pool, image) = value
        .split_once('/')
        .filter(|(p, i)| !p.is_empty() && !i.is_empty() && !i.contains('/'))
        .ok_or_else(|| format!("rbd={value}: expected POOL/IMAGE"))?;
    Ok(Volume::Rbd(RbdVolume {
        pool: pool.to_string(),
        image: image.to_string(),
        conf: opts.path("ceph-conf"),
        client: opts.get("client").map(str::to_string),
        timeout_secs: opts
            .number("rbd-timeout", 1..=3600, "1 to 3600 seconds")?
            .unwrap_or(DEFAULT_RBD_TIMEOUT_SECS),
    }))
}

/// `format=raw` (with file=): serve the file as raw bytes even if it looks like an image.
fn parse_format(opts: &Options, volume: &Volume) -> Result<bool, String> {
    match opts.get("format") {
        None => Ok(false),
        Some("raw") if matches!(volume, Volume::File(_)) => Ok(true),
        Some("raw") => Err("format=raw goes with file=PATH".into()),
        Some(other) => Err(format!(
            "format={other}: pollblk serves raw images only; convert it \
             (qemu-img convert -O raw IMAGE IMAGE.raw)"
        )),
    }
}

/// `block-size=512|4096`.
fn parse_block_size(opts: &Options) -> Result<u32, String> {
    match opts.get("block-size") {
        None | Some("512") => Ok(512),
        Some("4096") => Ok(4096),
        Some(value) => Err(format!("block-size={value}: expected 512 or 4096")),
    }
}

/// `serial=ID`: the GET_ID answer.
fn parse_serial(opts: &Options) -> Result<Option<String>, String> {
    match opts.get("serial") {
        Some(id) if id.len() > 20 || !id.is_ascii() => {
            Err(format!("serial={id}: at most 20 ASCII characters"))
        }
        id => Ok(id.map(str::to_string)),
    }
}

/// `guest-stats=on[,guest-stats-bit=N]`: the stats virtqueue's feature bit, if offered.
fn parse_guest_stats(opts: &Options) -> Result<Option<u32>, String> {
    let expected = format!(
        "{} to {} (unassigned device feature bits)",
        GUEST_STATS_BITS.start(),
        GUEST_STATS_BITS.end()
    );
    let bit = opts.number("guest-stats-bit", GUEST_STATS_BITS, &expected)?;
    let on = opts.on_off("guest-stats")?.unwrap_or(false);
    if bit.is_some() && !on {
        return Err("guest-stats-bit= goes with guest-stats=on".into());
    }
    Ok(on.then(|| bit.unwrap_or(pollblk_engine::device::GuestStatsOptions::DEFAULT_FEATURE_BIT)))
}

impl std::str::FromStr for Export {
    type Err = String;

    fn from_str(spec: &str) -> Result<Export, String> {
        let mut parts = spec.split(',');
        let kind = parts.next().expect("split yields at least one part");
        check_kind(kind)?;
        let opts = Options::parse(parts)?;
        let transport = match kind {
            "vhost-user-blk" => vhost_user_transport(&opts)?,
            "nbd" => nbd_transport(&opts)?,
            _ => xen_transport(kind, &opts)?,
        };
        if !matches!(transport, Transport::Nbd { .. }) {
            opts.refuse(
                &["addr", "tls-creds", "tls-verify-peer"],
                "addr=, tls-creds= and tls-verify-peer= go with nbd exports",
            )?;
        }
        let default_queues = match transport {
            Transport::VhostUser { .. } => DEFAULT_NUM_QUEUES,
            Transport::XenLoopback { .. } | Transport::Xen { .. } => DEFAULT_XEN_QUEUES,
            Transport::Nbd { .. } => DEFAULT_NBD_CONNECTIONS,
        };
        let num_queues = opts
            .number(
                "num-queues",
                1..=MAX_NUM_QUEUES,
                &format!("1 to {MAX_NUM_QUEUES}"),
            )?
            .unwrap_or(default_queues);
        let block_size = parse_block_size(&opts)?;
        let provision = opts.on_off("provision")?.unwrap_or(false);
        let guest_stats_bit = parse_guest_stats(&opts)?;
        let volume = parse_volume(&opts, block_size)?;
        let force_raw = parse_format(&opts, &volume)?;
        if provision && matches!(volume, Volume::Rbd(_)) {
            return Err("provision=on: RBD images cannot reserve space".into());
        }
        Ok(Export {
            transport,
            volume,
            num_queues,
            readonly: opts.on_off("readonly")?.unwrap_or(false),
            block_size,
            serial: parse_serial(&opts)?,
            provision,
            guest_stats_bit,
            reactor: opts.number("reactor", 0..=1023, "a reactor index (0 to 1023)")?,
            name: opts.get("name").map(str::to_string),
            qos: crate::qos_options::parse(opts.parts.iter().copied())?,
            qos_group: opts.get("qos-group").map(str::to_string),
            socket_access: socket_access(&opts)?,
            force_raw,
        })
    }
}

/// Parses `--cores`: a list like `0-3,6`.
pub fn parse_cores(text: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for part in text.split(',') {
        let bad = || format!("--cores {text:?}: expected a list like 0-3,6");
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let core = part.parse().map_err(|_| bad())?;
                (core, core)
            }
        };
        if first > last {
            return Err(bad());
        }
        for core in first..=last {
            if !cores.contains(&core) {
                cores.push(core);
            }
        }
    }
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_export_with_every_option() {
        let e: Export =
            "vhost-user-blk,socket=/s,file=/f,num-queues=4,readonly=on,block-size=4096,serial=abc"
                .parse()
                .unwrap();
        assert_eq!(
            e.transport,
            Transport::VhostUser {
                socket: PathBuf::from("/s")
            }
        );
        assert_eq!(e.volume, Volume::File("/f".into()));
        assert_eq!((e.num_queues, e.readonly, e.block_size), (4, true, 4096));
        assert_eq!(e.serial.as_deref(), Some("abc"));
    }

    #[test]
    fn null_export_takes_a_size() {
        let e: Export = "vhost-user-blk,socket=/s,null,size=1G".parse().unwrap();
        assert_eq!(
            e.volume,
            Volume::Null {
                size_bytes: 1 << 30,
                read_zeroes: true,
                latency_ns: 0,
            }
        );
        assert_eq!(e.num_queues, DEFAULT_NUM_QUEUES);
        let e: Export = "vhost-user-blk,socket=/s,null,size=1M,read-zeroes=off"
            .parse()
            .unwrap();
        assert_eq!(
            e.volume,
            Volume::Null {
                size_bytes: 1 << 20,
                read_zeroes: false,
                latency_ns: 0,
            }
        );
    }

    #[test]
    fn xen_exports_name_the_domain_and_device() {
        let e: Export = "xen-blkif-loopback,dir=/x,domid=3,devid=51712,null,size=1M"
            .parse()
            .unwrap();
        assert_eq!(
            e.transport,
            Transport::XenLoopback {
                dir: PathBuf::from("/x"),
                domid: 3,
                devid: 51712
            }
        );
        assert_eq!(e.num_queues, DEFAULT_XEN_QUEUES);
        let err = |s: &str| s.parse::<Export>().unwrap_err();
        assert!(err("xen-blkif-loopback,domid=1,devid=1,null,size=1M").contains("dir=PATH"));
        assert!(err("xen-blkif-loopback,dir=/x,devid=1,null,size=1M").contains("domid=N"));
        assert!(err("xen-blkif-loopback,dir=/x,domid=0,devid=1,null,size=1M").contains("domid"));
        assert!(err("xen-blkif-loopback,dir=/x,domid=1,null,size=1M").contains("devid=N"));
        assert!(
            err("xen-blkif-loopback,dir=/x,domid=1,devid=1,socket=/s,null,size=1M")
                .contains("socket=")
        );
        assert!(
            err("xen-blkif-loopback,dir=/x,domid=1,devid=1,null,size=1M,guest-stats=on")
                .contains("virtio-blk features")
        );
        assert!(err("vhost-user-blk,socket=/s,domid=1,null,size=1M").contains("Xen exports"));
        if !cfg!(feature = "xen") {
            assert!(err("xen-blkif,domid=1,devid=1,null,size=1M").contains("xen feature"));
        }
    }

    #[test]
    fn bad_exports_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Export>().unwrap_err();
        assert!(err("vfio-user,socket=/s,null,size=1M").contains("unknown export type"));
        assert!(err("vhost-user-blk,file=/f").contains("socket=PATH is required"));
        assert!(err("vhost-user-blk,socket=/s").contains("a volume is required"));
        assert!(err("vhost-user-blk,socket=/s,null").contains("null needs size"));
        assert!(err("vhost-user-blk,socket=/s,null,size=1000").contains("multiple"));
        assert!(
            err("vhost-user-blk,socket=/s,null,size=4k,block-size=4096,x=1")
                .contains("unknown export option")
        );
        assert!(
            err("vhost-user-blk,socket=/s,null,size=8k,block-size=1024").contains("512 or 4096")
        );
        assert!(err("vhost-user-blk,socket=/s,file=/f,num-queues=0").contains("num-queues"));
        assert!(
            err("vhost-user-blk,socket=/s,file=/f,serial=123456789012345678901")
                .contains("at most 20")
        );
        assert!(err("vhost-user-blk,socket=/s,file=/f,null").contains("not both"));
        assert!(err("vhost-user-blk,socket=/s,null,size=lots").contains("not a number"));
        assert!(err("vhost-user-blk,socket=/s,file=/f,read-zeroes=off").contains("go with null"));
        assert!(err("vhost-user-blk,socket=/s,pool=/p").contains("go together"));
        assert!(err("vhost-user-blk,socket=/s,pool=/p,volume=v,file=/f").contains("one volume"));
        assert!(err("vhost-user-blk,socket=/s,rbd=img").contains("POOL/IMAGE"));
        assert!(err("vhost-user-blk,socket=/s,rbd=p/i,file=/f").contains("one volume"));
        assert!(err("vhost-user-blk,socket=/s,file=/f,client=x").contains("go with rbd"));
        assert!(err("vhost-user-blk,socket=/s,rbd=p/i,rbd-timeout=0").contains("rbd-timeout"));
        assert!(err("vhost-user-blk,socket=/s,rbd=p/i,provision=on").contains("RBD"));
        assert!(
            err("vhost-user-blk,socket=/s,file=/f,guest-stats-bit=19").contains("guest-stats=on")
        );
        assert!(
            err("vhost-user-blk,socket=/s,file=/f,guest-stats=on,guest-stats-bit=11")
                .contains("19 to 23")
        );
        let e: Export = "vhost-user-blk,socket=/s,rbd=pool/vm1,ceph-conf=/c,client=cinder"
            .parse()
            .unwrap();
        assert_eq!(
            e.volume,
            Volume::Rbd(RbdVolume {
                pool: "pool".into(),
                image: "vm1".into(),
                conf: Some("/c".into()),
                client: Some("cinder".into()),
                timeout_secs: DEFAULT_RBD_TIMEOUT_SECS,
            })
        );
        let e: Export = "vhost-user-blk,socket=/s,pool=/p,volume=v0"
            .parse()
            .unwrap();
        assert_eq!(
            e.volume,
            Volume::Thin {
                pool: "/p".into(),
                volume: "v0".into()
            }
        );
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("3MB").unwrap(), 3_000_000);
        assert!(parse_size("1 GB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("1Gb/s").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").unwrap_err().contains("not a number"));
        assert!(parse_size("20000000T").unwrap_err().contains("too large"));
    }

    #[test]
    fn a_disk_can_be_named_in_its_export() {
        let e: Export = "vhost-user-blk,socket=/s,null,size=1M,name=vm1"
            .parse()
            .unwrap();
        assert_eq!(e.name.as_deref(), Some("vm1"));
    }

    #[test]
    fn cores_lists() {
        assert_eq!(parse_cores("0-2,5,1").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("a").is_err());
    }
}
