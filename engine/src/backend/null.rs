//! The null volume: reads return zeroes (or, without read_zeroes, leave the buffer untouched,
//! like QEMU's null-co read-zeroes=off), writes are dropped, nothing is stored. With a latency
//! (QEMU null-co's latency-ns) every operation completes that long after it was submitted, on
//! a timer thread: a slow device for tests of requests in flight (pause, reconnect).

use super::{Backend, BackendInfo, Completer, IoOp, Submitted};
use io_uring::squeue;
use std::collections::BinaryHeap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A volume of a given size that stores nothing.
pub struct NullBackend {
    size_bytes: AtomicU64,
    read_zeroes: bool,
    delay: Option<Delay>,
}

/// An operation waiting for its completion time.
struct Delayed {
    due: Instant,
    seq: u64,
    user_data: u64,
    result: i32,
    completer: Completer,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    /// Reversed: BinaryHeap is a max-heap, the earliest due must come out first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct DelayQueue {
    heap: BinaryHeap<Delayed>,
    seq: u64,
    stop: bool,
}

/// The timer thread that completes delayed operations.
struct Delay {
    latency: Duration,
    shared: Arc<(Mutex<DelayQueue>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Delay {
    fn start(latency: Duration) -> io::Result<Delay> {
        let shared = Arc::new((Mutex::new(DelayQueue::default()), Condvar::new()));
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("null-latency".into())
            .spawn(move || Delay::run(&worker))?;
        Ok(Delay {
            latency,
            shared,
            thread: Some(thread),
        })
    }

    fn run(shared: &(Mutex<DelayQueue>, Condvar)) {
        let (lock, cv) = shared;
        let mut queue = lock.lock().unwrap();
        loop {
            if queue.stop {
                return;
            }
            let now = Instant::now();
            match queue.heap.peek().map(|d| d.due) {
                Some(due) if due <= now => {
                    let op = queue.heap.pop().expect("peeked");
                    drop(queue);
                    op.completer.complete(op.user_data, op.result);
                    queue = lock.lock().unwrap();
                }
                Some(due) => queue = cv.wait_timeout(queue, due - now).unwrap().0,
                None => queue = cv.wait(queue).unwrap(),
            }
        }
    }

    fn add(&self, user_data: u64, result: i32, completer: &Completer) {
        let (lock, cv) = &*self.shared;
        let mut queue = lock.lock().unwrap();
        queue.seq += 1;
        let seq = queue.seq;
        queue.heap.push(Delayed {
            due: Instant::now() + self.latency,
            seq,
            user_data,
            result,
            completer: completer.clone(),
        });
        cv.notify_one();
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap().stop = true;
        cv.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl NullBackend {
    /// A null volume of `size_bytes`; `read_zeroes` off skips zeroing read buffers (they keep
    /// the guest's own bytes, so nothing leaks), leaving only the request path to measure.
    pub fn new(size_bytes: u64, read_zeroes: bool) -> NullBackend {
        NullBackend {
            size_bytes: AtomicU64::new(size_bytes),
            read_zeroes,
            delay: None,
        }
    }

    /// A null volume whose operations each complete `latency` after submission.
    pub fn with_latency(
        size_bytes: u64,
        read_zeroes: bool,
        latency: Duration,
    ) -> io::Result<NullBackend> {
        Ok(NullBackend {
            size_bytes: AtomicU64::new(size_bytes),
            read_zeroes,
            delay: Some(Delay::start(latency)?),
        })
    }
}

impl Backend for NullBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            size_bytes: self.size_bytes.load(Ordering::Acquire),
            dio_alignment: 1,
            volatile_cache: false,
            discard: true,
        }
    }

    fn grow(&self, size_bytes: u64) -> io::Result<()> {
        self.size_bytes.store(size_bytes, Ordering::Release);
        Ok(())
    }

    fn submit(
        &self,
        op: &IoOp,
        user_data: u64,
        _: &mut squeue::SubmissionQueue<'_>,
        completer: &Completer,
    ) -> Submitted {
        let done = self.run(op);
        match (&self.delay, done) {
            (Some(delay), Submitted::Done(result)) => {
                delay.add(user_data, result, completer);
                Submitted::Deferred
            }
            (_, done) => done,
        }
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }
}

impl NullBackend {
    /// What the operation does at once (a delay only postpones telling).
    fn run(&self, op: &IoOp) -> Submitted {
        match *op {
            IoOp::Read { iov, iov_count, .. } => {
                // SAFETY: the caller passes iov_count valid iovecs into guest memory.
                let iov = unsafe { std::slice::from_raw_parts(iov, iov_count as usize) };
                if self.read_zeroes {
                    crate::blk::zero_iovecs(iov);
                }
                Submitted::Done(iov.iter().map(|v| v.iov_len as i32).sum())
            }
            IoOp::Write { iov, iov_count, .. } => {
                // SAFETY: as above; only the lengths are read.
                let iov = unsafe { std::slice::from_raw_parts(iov, iov_count as usize) };
                Submitted::Done(iov.iter().map(|v| v.iov_len as i32).sum())
            }
            IoOp::Flush { .. }
            | IoOp::Discard { .. }
            | IoOp::WriteZeroes { .. }
            | IoOp::Provision { .. } => Submitted::Done(0),
        }
    }
}
