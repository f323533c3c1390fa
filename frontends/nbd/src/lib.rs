//! pollblk's NBD server (the NBD project's doc/proto.md, as qemu-nbd and nbdkit implement
//! it): the protocol without I/O (wire, handshake, request), and the transport on the
//! engine's reactors (ring, server).
//!
//! - [`wire`]: the protocol's numbers and the encoders of everything the server sends.
//! - [`handshake`]: option haggling after the fixed-newstyle greeting, as a state machine
//!   fed one option at a time (NBD_OPT_GO / INFO / LIST / ABORT / EXPORT_NAME,
//!   STRUCTURED_REPLY, LIST_META_CONTEXT / SET_META_CONTEXT with `base:allocation`).
//! - [`request`]: a transmission-phase request header, checked against the export and what
//!   the handshake agreed, into a command or the error the protocol prescribes.
//! - [`ring`]: one connection after the handshake as the engine's `Ring`, polled by a
//!   reactor like a virtqueue.
//! - [`server`]: listening sockets (Unix, loopback TCP), a thread each that accepts and
//!   haggles, and the exports they offer.
//!
//! Not here yet: STARTTLS (refused as unsupported), extended headers (refused as
//! unsupported), `base:allocation` answers (the context is offered only where the export
//! says it can tell holes).

pub mod handshake;
pub mod request;
pub mod ring;
pub mod server;
pub mod wire;
