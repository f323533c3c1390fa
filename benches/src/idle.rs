//! Idle front ends beside the measured one (`--idle-sockets PATTERN --idle-count N`): each
//! connects to its own socket with its own memory table, starts one queue, has one read
//! served, then stays connected and quiet for the whole run, as the disks of idle guests do.
//! What the measured disk then gets, against the same run without them, is what idle disks
//! cost a busy one.

use crate::lean::LeanQueues;
use crate::load::{LoadSpec, Pattern, Queues};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Most idle front ends one generator holds (each maps about 1 MiB of guest RAM).
pub const MAX_IDLE: usize = 4096;

/// The idle front ends, kept connected while they live.
pub struct IdleFrontEnds {
    _queues: Vec<LeanQueues>,
}

/// `pattern` with `{}` replaced by `index`.
pub fn socket_of(pattern: &str, index: usize) -> PathBuf {
    PathBuf::from(pattern.replace("{}", &index.to_string()))
}

/// Connects `count` idle front ends to the sockets `pattern` names (`{}`: 0 to count - 1).
pub fn connect(pattern: &str, count: usize) -> Result<IdleFrontEnds, String> {
    if !pattern.contains("{}") {
        return Err(format!(
            "--idle-sockets {pattern:?}: give a pattern with {{}} for the disk's index"
        ));
    }
    if count > MAX_IDLE {
        return Err(format!("--idle-count must be at most {MAX_IDLE}"));
    }
    let mut queues = Vec::with_capacity(count);
    for index in 0..count {
        let spec = LoadSpec {
            socket: socket_of(pattern, index),
            pattern: Pattern::RandRead,
            bs: 4096,
            iodepth: 1,
            queues: 1,
            runtime: Duration::ZERO,
            ramp: Duration::ZERO,
            target_pid: None,
            depths: Vec::new(),
        };
        let (mut q, _) = LeanQueues::open(&spec)?;
        one_read(&mut q).map_err(|e| format!("{}: {e}", spec.socket.display()))?;
        queues.push(q);
    }
    Ok(IdleFrontEnds { _queues: queues })
}

/// One read, served, so the queue is started and has been used.
fn one_read(q: &mut LeanQueues) -> Result<(), String> {
    q.submit(0, 0, false, 0);
    q.commit(0)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = [(0usize, false); 1];
    loop {
        if q.reap(0, &mut done)? == 1 {
            return if done[0].1 {
                Ok(())
            } else {
                Err("the first read failed".into())
            };
        }
        if Instant::now() > deadline {
            return Err("the first read did not complete in 10 s".into());
        }
        std::thread::yield_now();
    }
}
