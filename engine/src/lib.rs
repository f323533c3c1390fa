//! pollblk-engine: everything of pollblk that is not a transport.
//!
//! - [`reactor`]: per-core polled threads owning virtqueues and an io_uring each.
//! - [`virtqueue`]: the device side of split virtqueues.
//! - [`ring`]: request rings of other transports (Xen blkif), polled like virtqueues.
//! - [`blk`]: virtio-blk requests, status, features and config space.
//! - [`backend`]: volumes (null, file).
//! - [`device`]: a disk as guests see it.
//! - [`mem`]: guest memory shared by a front end.
//! - [`stats`]: statistics in KVM's binary stats layout.
//! - [`clock`]: the nanosecond clock request latencies use.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod blk;
pub mod clock;
pub mod device;
pub mod dirty_log;
pub mod guest_stats;
pub mod inflight;
pub mod mem;
pub mod reactor;
pub mod ring;
pub mod shm;
pub mod stats;
pub mod thin;
pub mod virtqueue;
