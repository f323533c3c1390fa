//! Many disks driven as one load (`--sockets PATTERN --disks N`): disk `i` is the socket
//! PATTERN names with `{}` replaced by `i`, each its own vhost-user connection and memory
//! table with one queue, and the generator's queue `i` is disk `i`'s. The run reports each
//! disk's share and Jain's fairness index over them.

use crate::idle::socket_of;
use crate::lean::LeanQueues;
use crate::load::{LoadSpec, Queues, MAX_QUEUES};

/// One lean front end per disk.
pub struct ManyDisks {
    disks: Vec<LeanQueues>,
}

impl ManyDisks {
    /// Connects `count` disks; returns them and the smallest capacity among them.
    pub fn open(spec: &LoadSpec, pattern: &str, count: usize) -> Result<(ManyDisks, u64), String> {
        if !pattern.contains("{}") {
            return Err(format!(
                "--sockets {pattern:?}: give a pattern with {{}} for the disk's index"
            ));
        }
        if count == 0 || count > MAX_QUEUES {
            return Err(format!("--disks must be 1..={MAX_QUEUES}"));
        }
        let mut disks = Vec::with_capacity(count);
        let mut capacity = u64::MAX;
        for index in 0..count {
            let one = LoadSpec {
                socket: socket_of(pattern, index),
                queues: 1,
                iodepth: spec.depth_of(index),
                depths: Vec::new(),
                ..spec.clone()
            };
            let (queues, bytes) = LeanQueues::open(&one)?;
            capacity = capacity.min(bytes);
            disks.push(queues);
        }
        Ok((ManyDisks { disks }, capacity))
    }
}

impl Queues for ManyDisks {
    fn submit(&mut self, queue: usize, slot: usize, write: bool, offset: u64) {
        self.disks[queue].submit(0, slot, write, offset);
    }

    fn commit(&mut self, queue: usize) -> Result<(), String> {
        self.disks[queue].commit(0)
    }

    fn reap(&mut self, queue: usize, done: &mut [(usize, bool)]) -> Result<usize, String> {
        self.disks[queue].reap(0, done)
    }
}

/// Jain's fairness index of `shares`: 1 when all are equal, 1/n when one takes everything.
pub fn jain_index(shares: &[u64]) -> f64 {
    let n = shares.len() as f64;
    let sum: f64 = shares.iter().map(|&x| x as f64).sum();
    let squares: f64 = shares.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if squares == 0.0 {
        return 1.0;
    }
    sum * sum / (n * squares)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_of_equal_and_of_one_taking_all() {
        assert!((jain_index(&[5, 5, 5, 5]) - 1.0).abs() < 1e-9);
        assert!((jain_index(&[8, 0, 0, 0]) - 0.25).abs() < 1e-9);
    }
}
