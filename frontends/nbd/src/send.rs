//! A connection's replies waiting for the socket, in order: small bytes (reply headers,
//! errors, block status) written into one buffer, and READ data as the buffers the volume
//! filled, handed over whole rather than copied. One `sendmsg` sends as many pieces as the
//! socket takes (the kernel's copy into the socket is the only copy of a READ's data).
//!
//! Ordering: bytes written into [`SendQueue::bytes`] belong before any data pushed after
//! them; `push_data` closes the bytes written so far into a piece first.

use crate::channel::Channel;
use std::collections::VecDeque;
use std::io::{self, IoSlice};

/// Pieces one `sendmsg` takes at most (well under IOV_MAX).
const MAX_IOV: usize = 64;
/// Sent header bytes past which the byte buffer is compacted.
const COMPACT_AFTER: usize = 1 << 20;

enum Piece {
    /// The next `len` bytes of `bytes`.
    Bytes(usize),
    /// A READ's data: the first `len` bytes of the buffer.
    Data(Vec<u8>, usize),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Bytes(len) | Piece::Data(_, len) => *len,
        }
    }
}

#[derive(Default)]
pub struct SendQueue {
    bytes: Vec<u8>,
    /// `bytes[..bytes_sent]` is out; pieces start there.
    bytes_sent: usize,
    /// `bytes[..bytes_queued]` is covered by pieces; what follows is not yet.
    bytes_queued: usize,
    pieces: VecDeque<Piece>,
    /// Bytes of the front piece already sent.
    front_sent: usize,
    /// Data bytes in pieces, not yet sent.
    data_unsent: usize,
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
        self.data_unsent += len;
        self.pieces.push_back(Piece::Data(data, len));
    }

    /// Bytes not yet sent.
    pub fn unsent(&self) -> usize {
        self.bytes.len() - self.bytes_sent - self.front_bytes_sent() + self.data_unsent
    }

    /// Sends what the socket takes now; data buffers fully sent go to `spare`. Err: the
    /// peer is gone (or TLS failed); `WouldBlock` is not an error.
    pub fn send(&mut self, channel: &mut Channel, spare: &mut Vec<Vec<u8>>) -> io::Result<()> {
        self.close_bytes();
        while !self.pieces.is_empty() {
            let n = {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let count = self.slices(&mut iov);
                match channel.send_vectored(&iov[..count]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            };
            self.advance(n, spare);
        }
        if self.pieces.is_empty() {
            self.reset();
        } else if self.bytes_sent >= COMPACT_AFTER {
            // A client that keeps the socket full never lets the buffer empty: drop what
            // was sent, or it grows without end.
            self.bytes.drain(..self.bytes_sent);
            self.bytes_queued -= self.bytes_sent;
            self.bytes_sent = 0;
        }
        Ok(())
    }

    /// Drops everything unsent (the peer is gone); data buffers go to `spare`.
    pub fn discard(&mut self, spare: &mut Vec<Vec<u8>>) {
        self.close_bytes();
        let all = self.unsent();
        self.advance(all, spare);
        self.reset();
    }

    /// Everything is sent: the byte buffer starts over.
    fn reset(&mut self) {
        assert!(self.pieces.is_empty() && self.data_unsent == 0);
        self.bytes.clear();
        (self.bytes_sent, self.bytes_queued, self.front_sent) = (0, 0, 0);
    }

    /// Turns bytes written since the last piece into a piece.
    fn close_bytes(&mut self) {
        let new = self.bytes.len() - self.bytes_queued;
        if new > 0 {
            self.pieces.push_back(Piece::Bytes(new));
            self.bytes_queued = self.bytes.len();
        }
    }

    fn front_bytes_sent(&self) -> usize {
        match self.pieces.front() {
            Some(Piece::Bytes(_)) => self.front_sent,
            _ => 0,
        }
    }

    /// The unsent pieces as slices, at most `iov.len()`; returns how many.
    fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut at = self.bytes_sent;
        let mut count = 0;
        for (i, piece) in self.pieces.iter().take(iov.len()).enumerate() {
            let skip = if i == 0 { self.front_sent } else { 0 };
            iov[count] = match piece {
                Piece::Bytes(len) => {
                    let slice = &self.bytes[at + skip..at + len];
                    at += len;
                    IoSlice::new(slice)
                }
                Piece::Data(data, len) => IoSlice::new(&data[skip..*len]),
            };
            count += 1;
        }
        count
    }

    /// Marks `n` more bytes sent.
    fn advance(&mut self, mut n: usize, spare: &mut Vec<Vec<u8>>) {
        while n > 0 {
            let front = self.pieces.front().expect("sent no more than was queued");
            let left = front.len() - self.front_sent;
            let step = left.min(n);
            if let Piece::Data(..) = front {
                self.data_unsent -= step;
            }
            n -= step;
            if step < left {
                self.front_sent += step;
                return;
            }
            self.front_sent = 0;
            match self.pieces.pop_front() {
                Some(Piece::Bytes(len)) => self.bytes_sent += len,
                Some(Piece::Data(data, _)) => spare.push(data),
                None => unreachable!("a front piece"),
            }
        }
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
