//! pollblk-engine: everything of pollblk that is not a transport's handshake.
//!
//! One request's walk, layer by layer (ARCHITECTURE.md has it file by file):
//!
//! - [`reactor`]: per-core polled threads, each with its own io_uring; the loop only: polls
//!   queues, routes completions, sleeps on kicks, messages and timers.
//! - [`queue`]: what a reactor polls ([`queue::PolledQueue`]) and the request pipeline every
//!   ring runs through ([`queue::RequestQueue`]).
//! - [`ring`]: the trait of request rings; [`virtio`] (split virtqueues, with their
//!   in-flight records, dirty log and eventfds, and the stats virtqueue) implements it here,
//!   the Xen blkif ring in its own crate.
//! - [`request`]: transport-neutral request rules: checks, operation plans, bounce buffers,
//!   status.
//! - [`volume`]: between requests and backends: "not now" holds, per-disk limits ([`qos`]:
//!   the buckets, shared by a disk's queues or a group's disks), accounting.
//! - [`backend`]: volumes (null, file, thin, rbd), shaped like SPDK's bdev table.
//! - [`thin`]: the thin pool (block map, allocator, metadata journal).
//! - [`virtqueue`]: the device side of split virtqueues; [`blk`]: virtio-blk requests,
//!   features and config space; [`device`]: a disk as guests see it.
//! - [`mem`], [`shm`], [`inflight`], [`dirty_log`], [`guest_stats`]: guest memory and the
//!   regions front ends share; [`stats`]: statistics in KVM's binary stats layout;
//!   [`clock`]: the nanosecond clock request latencies use; [`wait`]: the control plane's
//!   blocking waits; [`unix_socket`]: listening sockets with their owner and mode set first.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod blk;
pub mod clock;
pub mod device;
pub mod dirty_log;
pub mod guest_stats;
pub mod inflight;
pub mod mem;
pub mod qos;
pub mod queue;
pub mod reactor;
pub mod request;
pub mod ring;
pub mod shm;
pub mod stats;
pub mod thin;
pub mod unix_socket;
pub mod virtio;
pub mod virtqueue;
pub mod volume;
pub mod wait;
