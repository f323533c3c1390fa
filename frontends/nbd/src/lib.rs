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
//! - [`channel`]: a connection's bytes, plain or TLS (rustls), over a non-blocking socket.
//! - [`tls`]: a listener's credentials from a QEMU-style x509 directory.
//! - [`ring`]: one connection after the handshake as the engine's `Ring`, polled by a
//!   reactor like a virtqueue.
//! - [`send`]: its replies in order, READ data as the volume's own buffers (no copy).
//! - [`server`]: listening sockets (Unix, TCP), a thread each that accepts and haggles
//!   (STARTTLS included), and the exports they offer.
//!
//! `base:allocation` is offered where the volume can tell its holes (thin volumes, files):
//! BLOCK_STATUS answers from the thin map or SEEK_DATA, and a structured READ sends holes as
//! OFFSET_HOLE chunks.
//!
//! A listener with TLS credentials requires TLS before any export is visible; TCP on an
//! address other than loopback is served only with TLS.
//!
//! Not here yet: extended headers (refused as unsupported). Requests are read and replies
//! sent with recv(2) and sendmsg(2) from the reactor's thread (reads only once the
//! reactor's poll of the socket fired), not through its io_uring.

pub mod channel;
pub mod handshake;
pub mod request;
pub mod ring;
pub mod send;
pub mod server;
pub mod tls;
pub mod wire;
