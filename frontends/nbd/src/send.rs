//! A connection's replies waiting for the socket, in order: small bytes (reply headers,
//! errors, block status) written into a buffer, and READ data as the buffers the volume
//! filled, handed over whole rather than copied. One `sendmsg` sends as many pieces as the
//! socket takes (the kernel's copy into the socket is the only copy of a READ's data).
//!
//! Each piece owns its memory (reply bytes are closed into a piece of their own, and a
//! pooled buffer takes their place), so nothing is compacted or copied as replies go out.
//! Ordering: bytes written into [`SendQueue::bytes`] go before any data pushed after them.

use crate::channel::Channel;
use std::collections::VecDeque;
use std::io::{self, IoSlice};

/// Pieces one `sendmsg` takes at most (well under IOV_MAX).
const MAX_IOV: usize = 64;
/// Byte buffers kept for reuse (each holds one batch of reply headers).
const BYTE_POOL: usize = 16;

enum Piece {
    /// Reply bytes.
    Bytes(Vec<u8>),
    /// A READ's data: the first `len` bytes of the buffer.
    Data(Vec<u8>, usize),
}

impl Piece {
    fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Bytes(bytes) => bytes,
            Piece::Data(data, len) => &data[..*len],
        }
    }
}

#[derive(Default)]
pub struct SendQueue {
    /// Reply bytes not yet closed into a piece.
    bytes: Vec<u8>,
    pieces: VecDeque<Piece>,
    /// Bytes of the front piece already sent.
    front_sent: usize,
    /// Bytes in pieces, not yet sent.
    queued: usize,
    byte_pool: Vec<Vec<u8>>,
}

impl SendQueue {
    /// Where reply bytes are written (the protocol's encoders append to it).
    pub fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Queues the first `len` bytes of `data` after everything written so far.
    pub fn push_data(&mut self, data: Vec<u8>, len: usize) {
        assert!(len <= data.len(), "data past its buffer");
        self.close_bytes();
        self.queued += len;
        self.pieces.push_back(Piece::Data(data, len));
    }

    /// Bytes not yet sent.
    pub fn unsent(&self) -> usize {
        self.queued + self.bytes.len()
    }

    /// Sends what the socket takes now (system calls on the reactor's thread); data buffers
    /// fully sent go to `spare`. Err: the peer is gone (or TLS failed); `WouldBlock` is not
    /// an error.
    pub fn send(&mut self, channel: &mut Channel, spare: &mut Vec<Vec<u8>>) -> io::Result<()> {
        self.close_bytes();
        while !self.pieces.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let count = self.slices(&mut iov);
            match channel.send_vectored(&iov[..count]) {
                Ok(n) => self.advance(n, spare),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Marks `n` more bytes sent; data buffers fully sent go to `spare`.
    fn advance(&mut self, mut n: usize, spare: &mut Vec<Vec<u8>>) {
        assert!(n <= self.queued, "sent more than was queued");
        self.queued -= n;
        while n > 0 {
            let front = self.pieces.front().expect("bytes queued").as_slice().len();
            let step = (front - self.front_sent).min(n);
            n -= step;
            self.front_sent += step;
            if self.front_sent < front {
                return;
            }
            self.front_sent = 0;
            match self.pieces.pop_front().expect("a front piece") {
                Piece::Bytes(mut bytes) if self.byte_pool.len() < BYTE_POOL => {
                    bytes.clear();
                    self.byte_pool.push(bytes);
                }
                Piece::Bytes(_) => {}
                Piece::Data(data, _) => spare.push(data),
            }
        }
    }

    /// Drops everything unsent (the peer is gone); data buffers go to `spare`.
    pub fn discard(&mut self, spare: &mut Vec<Vec<u8>>) {
        self.close_bytes();
        self.advance(self.queued, spare);
    }

    /// Turns bytes written since the last piece into a piece.
    fn close_bytes(&mut self) {
        if self.bytes.is_empty() {
            return;
        }
        let fresh = self.byte_pool.pop().unwrap_or_default();
        let bytes = std::mem::replace(&mut self.bytes, fresh);
        self.queued += bytes.len();
        self.pieces.push_back(Piece::Bytes(bytes));
    }

    /// The unsent pieces as slices, at most `iov.len()`; returns how many.
    fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut count = 0;
        for (i, piece) in self.pieces.iter().take(iov.len()).enumerate() {
            let skip = if i == 0 { self.front_sent } else { 0 };
            iov[i] = IoSlice::new(&piece.as_slice()[skip..]);
            count += 1;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bytes_and_data_go_out_in_order_and_buffers_come_back() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut channel = Channel::plain(ours.into());
        let mut q = SendQueue::default();
        let mut expected = Vec::new();
        let mut spare = Vec::new();
        for i in 0..10u8 {
            q.bytes().extend_from_slice(&[i; 3]);
            expected.extend_from_slice(&[i; 3]);
            let data = vec![100 + i; 5000];
            expected.extend_from_slice(&data[..4096]);
            q.push_data(data, 4096);
        }
        q.bytes().extend_from_slice(b"end");
        expected.extend_from_slice(b"end");
        assert_eq!(q.unsent(), expected.len());
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        while got.len() < expected.len() {
            q.send(&mut channel, &mut spare).unwrap();
            // Read a little at a time, so sends are partial.
            let n = theirs.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        q.send(&mut channel, &mut spare).unwrap();
        assert_eq!(got, expected);
        assert_eq!(q.unsent(), 0);
        assert_eq!(spare.len(), 10, "every data buffer back");
    }
}
