//! `pollblk pool volume import` and `export`: raw images into and out of a thin volume,
//! sparse both ways. Going in, holes (SEEK_DATA) and blocks of zeroes take no space; going
//! out, blocks the volume never mapped stay holes in the file. `-` is stdin or stdout, so
//! `qemu-img convert -O raw IMAGE /dev/stdout | pollblk pool volume import POOL vm1 --from -`
//! brings in any format qemu-img reads.

use pollblk_engine::thin::{Pool, Volume};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How much a copy moved and kept.
pub struct Copied {
    pub bytes: u64,
    /// Bytes that held data (written into the volume, or into the file).
    pub data_bytes: u64,
}

/// Creates volume `name` in `pool` from the raw image `from` (`-`: stdin). An import that
/// fails part way (the pool full, a read error) leaves no volume behind.
pub fn import(pool: &Pool, name: &str, from: &Path) -> Result<Copied, String> {
    if pool.volume(name).is_ok() {
        return Err(format!("a volume named {name} exists already"));
    }
    let copied = if from == Path::new("-") {
        import_stream(pool, name, &mut std::io::stdin().lock())
    } else {
        import_file(pool, name, from)
    };
    copied.map_err(|e| match pool.volume_delete(name) {
        Ok(()) => format!("{e} (nothing imported: volume {name} removed)"),
        Err(_) => e,
    })
}

fn import_file(pool: &Pool, name: &str, from: &Path) -> Result<Copied, String> {
    let bs = u64::from(pool.block_size());
    let file = std::fs::File::open(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", from.display()))?
        .len();
    if len == 0 {
        return Err(format!("{}: empty, nothing to import", from.display()));
    }
    if crate::image_format::sniff(from).is_some() {
        return Err(format!(
            "{}: not a raw image; convert it: qemu-img convert -O raw {} /dev/stdout | \
             pollblk pool volume import POOL {name} --from -",
            from.display(),
            from.display()
        ));
    }
    let volume = pool
        .volume_create(name, len.next_multiple_of(512))
        .map_err(|e| e.to_string())?;
    let mut progress = Progress::new("import", Some(len));
    let mut buf = vec![0u8; bs as usize];
    let mut data_bytes = 0;
    let mut at = 0;
    while at < len {
        // Skip the file's holes without reading them.
        let Some(data) = next_data(&file, at) else {
            break;
        };
        at = data - data % bs;
        if at >= len {
            break;
        }
        let n = bs.min(len - at) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("{}: {e}", from.display()))?;
        data_bytes += store(pool, &volume, at, &buf[..n])?;
        at += n as u64;
        progress.update(at);
    }
    pool.flush().map_err(|e| e.to_string())?;
    progress.done(len);
    Ok(Copied {
        bytes: len,
        data_bytes,
    })
}

/// From a pipe: the size is known at the end; the volume grows as the data comes.
fn import_stream(pool: &Pool, name: &str, input: &mut dyn Read) -> Result<Copied, String> {
    let bs = u64::from(pool.block_size());
    const FIRST_SIZE: u64 = 1 << 30;
    let mut size = FIRST_SIZE;
    let volume = pool.volume_create(name, size).map_err(|e| e.to_string())?;
    let mut progress = Progress::new("import", None);
    let mut buf = vec![0u8; bs as usize];
    let (mut at, mut data_bytes) = (0u64, 0u64);
    loop {
        let n = read_full(input, &mut buf).map_err(|e| format!("stdin: {e}"))?;
        if n == 0 {
            break;
        }
        if at + n as u64 > size {
            size *= 2;
            pool.volume_resize(name, size).map_err(|e| e.to_string())?;
        }
        data_bytes += store(pool, &volume, at, &buf[..n])?;
        at += n as u64;
        progress.update(at);
    }
    if at == 0 {
        let _ = pool.volume_delete(name);
        return Err("stdin: empty, nothing to import".into());
    }
    // The volume ends where the data did (in whole sectors).
    pool.volume_resize(name, at.next_multiple_of(512))
        .map_err(|e| e.to_string())?;
    pool.flush().map_err(|e| e.to_string())?;
    progress.done(at);
    Ok(Copied {
        bytes: at,
        data_bytes,
    })
}

/// Writes `chunk` at `at` unless it is all zeroes (which an unmapped block reads as);
/// returns the bytes written.
fn store(pool: &Pool, volume: &Volume, at: u64, chunk: &[u8]) -> Result<u64, String> {
    if chunk.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    pool.write(volume, at, chunk)
        .map_err(|e| format!("writing at {at}: {e}"))?;
    Ok(chunk.len() as u64)
}

/// Writes volume `name` of `pool` to the raw file `to` (`-`: stdout), which must not exist.
pub fn export(pool: &Pool, name: &str, to: &Path) -> Result<Copied, String> {
    let volume = pool.volume(name).map_err(|e| e.to_string())?;
    let len = volume.size_bytes();
    let bs = u64::from(pool.block_size());
    let mut progress = Progress::new("export", Some(len));
    let mut buf = vec![0u8; bs as usize];
    let mut data_bytes = 0;
    if to == Path::new("-") {
        let mut out = std::io::stdout().lock();
        for at in (0..len).step_by(bs as usize) {
            let n = bs.min(len - at) as usize;
            pool.read(&volume, at, &mut buf[..n])
                .map_err(|e| e.to_string())?;
            out.write_all(&buf[..n])
                .map_err(|e| format!("stdout: {e}"))?;
            progress.update(at + n as u64);
        }
        out.flush().map_err(|e| format!("stdout: {e}"))?;
        progress.done(len);
        return Ok(Copied {
            bytes: len,
            data_bytes: volume.mapped_blocks() * bs,
        });
    }
    let file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| format!("{}: {e}", to.display()))?;
    file.set_len(len)
        .map_err(|e| format!("{}: {e}", to.display()))?;
    for (block, at) in (0..len).step_by(bs as usize).enumerate() {
        // A block the volume never mapped stays a hole.
        if volume.lookup(block as u64).is_none() {
            continue;
        }
        let n = bs.min(len - at) as usize;
        pool.read(&volume, at, &mut buf[..n])
            .map_err(|e| e.to_string())?;
        if buf[..n].iter().any(|&b| b != 0) {
            file.write_all_at(&buf[..n], at)
                .map_err(|e| format!("{}: {e}", to.display()))?;
            data_bytes += n as u64;
        }
        progress.update(at + n as u64);
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", to.display()))?;
    progress.done(len);
    Ok(Copied {
        bytes: len,
        data_bytes,
    })
}

/// The first offset at or after `at` that holds data (SEEK_DATA); `at` itself where the
/// file system cannot say; None past the last data.
fn next_data(file: &std::fs::File, at: u64) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let next = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
    if next >= 0 {
        return Some(next as u64);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(at),
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Bytes done, rate and time left on stderr, when stderr is a terminal.
struct Progress {
    what: &'static str,
    total: Option<u64>,
    started: Instant,
    shown: Instant,
    on: bool,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Progress {
        // SAFETY: isatty has no memory effects.
        let on = unsafe { libc::isatty(2) } == 1;
        let now = Instant::now();
        Progress {
            what,
            total,
            started: now,
            shown: now,
            on,
        }
    }

    fn update(&mut self, done: u64) {
        if !self.on || self.shown.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.shown = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let mib = |b: f64| b / (1 << 20) as f64;
        let left = match self.total {
            Some(total) if rate > 0.0 => {
                format!(
                    " of {:.0} MiB, {:.0} s left",
                    mib(total as f64),
                    (total - done.min(total)) as f64 / rate
                )
            }
            _ => String::new(),
        };
        eprint!(
            "\r{}: {:.0} MiB{left}, {:.0} MiB/s   ",
            self.what,
            mib(done as f64),
            mib(rate)
        );
    }

    fn done(&self, total: u64) {
        if self.on {
            eprintln!(
                "\r{}: {:.0} MiB in {:.1} s{}",
                self.what,
                total as f64 / (1 << 20) as f64,
                self.started.elapsed().as_secs_f64(),
                " ".repeat(24)
            );
        }
    }
}
