//! A connection's byte stream, plain or TLS, over a non-blocking socket: what the handshake
//! and the ring read and write. Nothing here blocks; "no bytes now" is `WouldBlock`.
//!
//! TLS runs over the same socket once NBD_OPT_STARTTLS is agreed ([`Channel::start_tls`]).
//! rustls keeps records it could not send yet ([`Channel::wants_send`]) and plaintext it
//! decrypted but was not asked for ([`Channel::has_buffered`]); a poller must not sleep on
//! the socket while either holds bytes, since the socket will not say so.

use rustls::{ServerConfig, ServerConnection};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Encrypted bytes rustls may hold for the socket before a write is refused (its default,
/// 64 KiB, is one 1 MiB READ reply in 16 pieces).
const TLS_SEND_LIMIT: usize = 1 << 20;

pub struct Channel {
    fd: OwnedFd,
    tls: Option<Box<ServerConnection>>,
}

impl Channel {
    /// A plain channel over `fd` (non-blocking).
    pub fn plain(fd: OwnedFd) -> Channel {
        Channel { fd, tls: None }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Switches to TLS (the server side of a handshake the client starts); `early` are
    /// bytes already read from the socket past the STARTTLS option (its ClientHello).
    pub fn start_tls(&mut self, config: Arc<ServerConfig>, mut early: &[u8]) -> io::Result<()> {
        assert!(self.tls.is_none(), "STARTTLS is agreed once");
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_SEND_LIMIT));
        while !early.is_empty() {
            conn.read_tls(&mut early)?;
            process(&mut conn, self.fd.as_raw_fd())?;
        }
        self.tls = Some(Box::new(conn));
        self.flush()
    }

    /// Bytes received: `Ok(0)` once the peer closed.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let Some(conn) = self.tls.as_deref_mut() else {
            return Socket(fd).read(buf);
        };
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Closed without close_notify: a peer that left.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if conn.read_tls(&mut Socket(fd))? == 0 {
                return Ok(0);
            }
            process(conn, fd)?;
            // Handshake messages (and alerts) the records just read call for.
            match flush_tls(conn, fd) {
                Err(e) if e.kind() != ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }

    /// Bytes taken from `buf` (sent, or with TLS, encrypted and queued for the socket).
    pub fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_vectored(&[IoSlice::new(buf)])
    }

    /// As `send`, from several buffers in order (one sendmsg without TLS).
    pub fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let Some(conn) = self.tls.as_deref_mut() else {
            return Socket(fd).write_vectored(bufs);
        };
        let taken = conn.writer().write_vectored(bufs)?;
        match flush_tls(conn, fd) {
            Err(e) if e.kind() != ErrorKind::WouldBlock => Err(e),
            _ if taken == 0 => Err(ErrorKind::WouldBlock.into()),
            _ => Ok(taken),
        }
    }

    /// Sends the TLS records waiting for the socket (`WouldBlock` if some still wait).
    pub fn flush(&mut self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        match self.tls.as_deref_mut() {
            Some(conn) => flush_tls(conn, fd),
            None => Ok(()),
        }
    }

    /// TLS records wait for the socket to take them.
    pub fn wants_send(&self) -> bool {
        self.tls.as_deref().is_some_and(|c| c.wants_write())
    }

    /// Decrypted bytes wait to be read (the socket may have nothing more to say).
    pub fn has_buffered(&mut self) -> bool {
        let Some(conn) = self.tls.as_deref_mut() else {
            return false;
        };
        conn.process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }

    /// Says goodbye (TLS close_notify) as far as the socket takes it now.
    pub fn close(&mut self) {
        if let Some(conn) = self.tls.as_deref_mut() {
            conn.send_close_notify();
            let _ = flush_tls(conn, self.fd.as_raw_fd());
        }
    }
}

/// Decrypts what rustls read; a TLS error sends its alert and becomes InvalidData.
fn process(conn: &mut ServerConnection, fd: RawFd) -> io::Result<()> {
    conn.process_new_packets().map(drop).map_err(|e| {
        let _ = flush_tls(conn, fd);
        io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}"))
    })
}

fn flush_tls(conn: &mut ServerConnection, fd: RawFd) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut Socket(fd))?;
    }
    Ok(())
}

/// The socket as Read/Write: recv and send that never block (and no SIGPIPE).
struct Socket(RawFd);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe {
            libc::recv(
                self.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: send from a buffer we own, of its length.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec; sendmsg only reads through it.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: the iovecs point into buffers borrowed for this call.
        let n = unsafe { libc::sendmsg(self.0, &msg, flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
