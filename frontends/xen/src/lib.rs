//! pollblk's Xen blkif back end (like Linux xen-blkback or QEMU's qdisk), on the engine's
//! reactors: each ring is owned by one reactor and polled like a virtqueue.
//!
//! - [`abi`]: ring and request layouts of io/blkif.h and io/ring.h, both protocol ABIs.
//! - [`ring`]: one ring as the engine's [`pollblk_engine::ring::Ring`].
//! - [`backend`]: the XenBus handshake of one virtual block device.
//! - [`platform`]: what the back end needs from Xen (store, grants, event channels).
//! - [`loopback`]: that platform without a hypervisor, for tests.
//! - `xen` (cargo feature `xen`): that platform on a real Xen host; built, not tested here.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod abi;
pub mod backend;
pub mod loopback;
pub mod platform;
pub mod ring;
#[cfg(feature = "xen")]
pub mod xen;
