//! One NBD connection in the transmission phase, as the engine's [`Ring`]: the reactor that
//! owns it polls it like a virtqueue. `pop` reads request headers from the connection's
//! [`Channel`] (the socket, plain or TLS; never blocking) and a WRITE's data straight into
//! the request's buffer; `complete` queues the reply (a READ's buffer goes along as it is,
//! send.rs); `publish` sends it. The socket is the kick: readable means requests arrived
//! (with TLS, bytes rustls decrypted already keep the ring awake instead).
//!
//! Requests the protocol lets the server refuse are answered here without reaching the
//! volume (request.rs says with what). A client that sends what cannot be answered (bad
//! magic, a WRITE larger than the maximum) or goes away breaks the ring: the queue stops
//! once its requests are done, and `on_close` tells the server to detach it.

use crate::channel::Channel;
use crate::handshake::Agreed;
use crate::request::{check, Command, Header, Refusal};
use crate::send::SendQueue;
use crate::wire::*;
use pollblk_engine::blk::{self, Request, RequestKind};
use pollblk_engine::device::BlkDevice;
use pollblk_engine::request::Status;
use pollblk_engine::ring::{Notified, Popped, Ring};
use pollblk_engine::virtqueue::{Broken, Segments};
use std::os::fd::RawFd;

/// Requests in flight at once on one connection.
pub const SLOTS: usize = 64;
/// Bytes of received headers kept before parsing.
const INBUF: usize = 64 << 10;
/// Reply bytes waiting for the socket past which no new request is taken.
const BACKLOG_LIMIT: usize = 8 << 20;
/// Most extents one BLOCK_STATUS reply lists.
const MAX_EXTENTS: usize = 1024;

/// What the ring keeps per slot to answer its request.
#[derive(Default)]
struct Slot {
    cookie: u64,
    command: Option<Command>,
    /// The request's data (READ: what the volume filled; WRITE: what the client sent).
    data: Vec<u8>,
    /// Discard / write-zeroes segments handed to the volume.
    ranges: [u8; 2 * blk::DWZ_SEGMENT_SIZE],
}

/// A WRITE whose data is still arriving.
struct Incoming {
    header: Header,
    command: Command,
    data: Vec<u8>,
    received: usize,
}

pub struct NbdRing {
    channel: Channel,
    /// The socket may have bytes: set by the kick (the reactor's poll of the socket
    /// fired), cleared when a read comes back short. Reads wait for it, so a polled
    /// connection with nothing to say costs no system call.
    readable: bool,
    agreed: Agreed,
    /// Answers BLOCK_STATUS and finds the holes of structured reads (its backend).
    device: std::sync::Arc<BlkDevice>,
    /// Allocation runs of the range being answered (kept: no allocation per request).
    runs: Vec<(u64, bool)>,
    slots: Vec<Slot>,
    /// Received, not yet parsed: `inbuf[in_start..in_end]`.
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    incoming: Option<Incoming>,
    /// Data buffers not in use (a WRITE's buffer is taken from here before it has a slot;
    /// a READ's goes out with its reply and comes back here once sent).
    spare: Vec<Vec<u8>>,
    /// Cookies of TRIM / WRITE_ZEROES with FUA that completed: each is answered by a FLUSH
    /// taken as the next request (the volume has no FUA for ranges).
    fua_pending: std::collections::VecDeque<u64>,
    /// WRITE data of a refused request still to be read and dropped.
    skip: u64,
    /// Replies not yet sent.
    send: SendQueue,
    in_flight: usize,
    /// NBD_CMD_DISC arrived: no more requests; close once the replies are out.
    disconnecting: bool,
    /// The peer went away or broke the protocol.
    closed: bool,
    on_close: Option<Box<dyn FnOnce() + Send>>,
}

impl NbdRing {
    /// A ring over `channel` (past the handshake; `early`: bytes the handshake read past
    /// its last option) for what `agreed` says; `on_close` runs once, on the reactor, when
    /// the connection ends.
    pub fn new(
        channel: Channel,
        early: &[u8],
        agreed: Agreed,
        device: std::sync::Arc<BlkDevice>,
        on_close: Box<dyn FnOnce() + Send>,
    ) -> NbdRing {
        let mut inbuf = vec![0u8; INBUF.max(early.len())].into_boxed_slice();
        inbuf[..early.len()].copy_from_slice(early);
        NbdRing {
            channel,
            readable: true,
            agreed,
            device,
            runs: Vec::with_capacity(MAX_EXTENTS),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            inbuf,
            in_start: 0,
            in_end: early.len(),
            incoming: None,
            spare: Vec::new(),
            fua_pending: std::collections::VecDeque::new(),
            skip: 0,
            send: SendQueue::default(),
            in_flight: 0,
            disconnecting: false,
            closed: false,
            on_close: Some(on_close),
        }
    }

    /// Reads what the socket has into `inbuf`; marks the ring closed once nothing more
    /// will come.
    fn fill(&mut self) {
        if self.in_start == self.in_end {
            (self.in_start, self.in_end) = (0, 0);
        } else if self.in_end == self.inbuf.len() {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            (self.in_start, self.in_end) = (0, self.in_end - self.in_start);
        }
        let end = self.in_end;
        self.in_end += receive(
            &mut self.channel,
            &mut self.readable,
            &mut self.closed,
            &mut self.inbuf[end..],
        );
    }

    fn buffered(&self) -> usize {
        self.in_end - self.in_start
    }

    /// Moves buffered bytes into `to` (as many as fit), then reads the rest from the socket
    /// straight into it as far as it has them; returns how many bytes `to` got.
    fn take_into(&mut self, to: &mut [u8]) -> usize {
        let from_buf = self.buffered().min(to.len());
        to[..from_buf].copy_from_slice(&self.inbuf[self.in_start..self.in_start + from_buf]);
        self.in_start += from_buf;
        let mut got = from_buf;
        while got < to.len() {
            let (channel, readable, closed) =
                (&mut self.channel, &mut self.readable, &mut self.closed);
            match receive(channel, readable, closed, &mut to[got..]) {
                0 => break,
                n => got += n,
            }
        }
        got
    }

    /// Drops the data of a refused WRITE as it arrives; true once all of it is gone.
    fn skip_payload(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        while self.skip > 0 {
            let n = (self.skip as usize).min(sink.len());
            let got = self.take_into(&mut sink[..n]);
            self.skip -= got as u64;
            if got < n {
                return false;
            }
        }
        true
    }

    /// The next complete request (a WRITE with all its data), answering refused ones on the
    /// way; None when there is none yet.
    fn next_request(&mut self) -> Option<(Header, Command, Vec<u8>)> {
        loop {
            if self.skip > 0 && !self.skip_payload() {
                return None;
            }
            if let Some(mut incoming) = self.incoming.take() {
                let received = incoming.received;
                incoming.received += self.take_into(&mut incoming.data[received..]);
                if incoming.received < incoming.data.len() {
                    self.incoming = Some(incoming);
                    return None;
                }
                return Some((incoming.header, incoming.command, incoming.data));
            }
            if self.buffered() < REQUEST_HEADER {
                self.fill();
                if self.buffered() < REQUEST_HEADER {
                    return None;
                }
            }
            let raw: &[u8; REQUEST_HEADER] = self.inbuf[self.in_start..][..REQUEST_HEADER]
                .try_into()
                .expect("a header's bytes");
            let Ok(header) = Header::parse(raw) else {
                self.closed = true;
                return None;
            };
            self.in_start += REQUEST_HEADER;
            match check(&header, &self.agreed) {
                Ok(command @ Command::Write { length, .. }) => {
                    let mut data = self.spare.pop().unwrap_or_default();
                    data.resize(length as usize, 0);
                    self.incoming = Some(Incoming {
                        header,
                        command,
                        data,
                        received: 0,
                    });
                }
                Ok(Command::BlockStatus {
                    offset,
                    length,
                    one,
                }) => self.block_status(header.cookie, offset, length, one),
                Ok(command) => return Some((header, command, Vec::new())),
                Err(Refusal::Error(errno)) => {
                    self.skip = u64::from(header.payload());
                    self.reply_error(header.cookie, errno, "request refused");
                }
                Err(Refusal::Hangup) => {
                    self.closed = true;
                    return None;
                }
            }
        }
    }

    /// Answers BLOCK_STATUS for `base:allocation` at once (map lookups, or SEEK_DATA on a
    /// file): holes read as zeroes.
    fn block_status(&mut self, cookie: u64, offset: u64, length: u32, one: bool) {
        let context = self
            .agreed
            .allocation_context
            .expect("checked: a context was agreed");
        self.runs.clear();
        let max = if one { 1 } else { MAX_EXTENTS };
        let backend = self.device.backend();
        if !backend.allocation(offset, u64::from(length), max, &mut self.runs)
            || self.runs.is_empty()
        {
            self.runs.clear();
            self.runs.push((u64::from(length), true));
        }
        let extents = self.runs.iter().map(|&(n, data)| {
            let state = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            (n as u32, state)
        });
        chunk_block_status(self.send.bytes(), REPLY_FLAG_DONE, cookie, context, extents);
    }

    /// A structured READ's reply: its holes as OFFSET_HOLE chunks, its data as OFFSET_DATA.
    fn structured_read(&mut self, slot: u32, cookie: u64, offset: u64, length: u32, df: bool) {
        self.runs.clear();
        let backend = self.device.backend();
        let known =
            !df && backend.allocation(offset, u64::from(length), MAX_EXTENTS, &mut self.runs);
        let covered: u64 = self.runs.iter().map(|r| r.0).sum();
        if !known || covered != u64::from(length) || self.runs.iter().all(|r| r.1) {
            chunk_data(self.send.bytes(), REPLY_FLAG_DONE, cookie, offset, length);
            self.send_data(slot, length);
            return;
        }
        let mut at = 0usize;
        for (i, &(n, data)) in self.runs.iter().enumerate() {
            let flags = if i + 1 == self.runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let (n32, here) = (n as u32, offset + at as u64);
            if data {
                // Copied: the buffer's other runs are holes, not sent.
                let data = &self.slots[slot as usize].data[at..at + n as usize];
                chunk_data(self.send.bytes(), flags, cookie, here, n32);
                self.send.bytes().extend_from_slice(data);
            } else {
                chunk_hole(self.send.bytes(), flags, cookie, here, n32);
            }
            at += n as usize;
        }
    }

    fn reply_error(&mut self, cookie: u64, errno: u32, why: &str) {
        if self.agreed.structured {
            chunk_error(self.send.bytes(), cookie, errno, why);
        } else {
            simple_reply(self.send.bytes(), errno, cookie);
        }
    }

    /// Fills `segs` and `request` for `command`, its data in `slot`.
    fn describe(
        &mut self,
        slot: u32,
        command: Command,
        segs: &mut Segments,
        request: &mut Request,
    ) {
        let s = &mut self.slots[slot as usize];
        segs.clear();
        let sector = |offset: u64| offset / blk::SECTOR_SIZE;
        *request = match command {
            Command::Read { offset, length, .. } | Command::Write { offset, length, .. } => {
                let read = matches!(command, Command::Read { .. });
                if read {
                    s.data.resize(length as usize, 0);
                }
                segs.push(s.data.as_mut_ptr(), length, read);
                Request {
                    kind: if read {
                        RequestKind::In
                    } else {
                        RequestKind::Out
                    },
                    sector: sector(offset),
                    data: 0..1,
                    data_len: u64::from(length),
                    fua: matches!(command, Command::Write { fua: true, .. }),
                }
            }
            Command::Trim { offset, length, .. } | Command::WriteZeroes { offset, length, .. } => {
                let unmap = matches!(command, Command::WriteZeroes { unmap: true, .. });
                let used = encode_ranges(
                    &mut s.ranges,
                    sector(offset),
                    u64::from(length) / 512,
                    unmap,
                );
                segs.push(s.ranges.as_mut_ptr(), used as u32, false);
                Request {
                    kind: match command {
                        Command::Trim { .. } => RequestKind::Discard,
                        _ => RequestKind::WriteZeroes,
                    },
                    sector: 0,
                    data: 0..1,
                    data_len: used as u64,
                    fua: false,
                }
            }
            Command::Flush | Command::BlockStatus { .. } | Command::Disconnect => {
                Request::default()
            }
        };
    }
}

/// Writes virtio-blk discard / write-zeroes segments for `sectors` at `sector` into `raw`;
/// returns the bytes used (each segment covers at most MAX_DWZ_SECTORS).
fn encode_ranges(raw: &mut [u8], mut sector: u64, mut sectors: u64, unmap: bool) -> usize {
    let mut used = 0;
    while sectors > 0 {
        let n = sectors.min(u64::from(blk::MAX_DWZ_SECTORS));
        let seg = &mut raw[used..used + blk::DWZ_SEGMENT_SIZE];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&(n as u32).to_le_bytes());
        seg[12..].copy_from_slice(&u32::from(unmap).to_le_bytes());
        (sector, sectors, used) = (sector + n, sectors - n, used + blk::DWZ_SEGMENT_SIZE);
    }
    used
}

impl Ring for NbdRing {
    fn slots(&self) -> usize {
        SLOTS
    }

    fn max_segments(&self) -> usize {
        1
    }

    fn pop(
        &mut self,
        slot: u32,
        segs: &mut Segments,
        request: &mut Request,
    ) -> Result<Popped, Broken> {
        if let Some(cookie) = self.fua_pending.pop_front() {
            let s = &mut self.slots[slot as usize];
            (s.cookie, s.command) = (cookie, Some(Command::Flush));
            self.describe(slot, Command::Flush, segs, request);
            self.in_flight += 1;
            return Ok(Popped::Request);
        }
        if self.send.unsent() > BACKLOG_LIMIT || self.disconnecting {
            return self.closing();
        }
        let Some((header, command, data)) = (if self.closed {
            None
        } else {
            self.next_request()
        }) else {
            return self.closing();
        };
        if command == Command::Disconnect {
            self.disconnecting = true;
            return self.closing();
        }
        let s = &mut self.slots[slot as usize];
        s.cookie = header.cookie;
        s.command = Some(command);
        if !data.is_empty() {
            let old = std::mem::replace(&mut s.data, data);
            self.spare.push(old);
        }
        self.describe(slot, command, segs, request);
        self.in_flight += 1;
        Ok(Popped::Request)
    }

    fn complete(&mut self, slot: u32, _segs: &Segments, status: Status, _written: u32) {
        self.in_flight -= 1;
        let s = &mut self.slots[slot as usize];
        let (cookie, command) = (s.cookie, s.command.take());
        let errno = match status {
            Status::Ok => 0,
            Status::IoError => EIO,
            Status::Unsupported => ENOTSUP,
        };
        match command {
            Some(Command::Trim { fua: true, .. } | Command::WriteZeroes { fua: true, .. })
                if errno == 0 =>
            {
                self.fua_pending.push_back(cookie)
            }
            Some(Command::Read { offset, length, df }) if errno == 0 => {
                if self.agreed.structured {
                    self.structured_read(slot, cookie, offset, length, df);
                } else {
                    simple_reply(self.send.bytes(), 0, cookie);
                    self.send_data(slot, length);
                }
            }
            _ if errno != 0 => self.reply_error(cookie, errno, "I/O error"),
            _ if self.agreed.structured => {
                chunk(
                    self.send.bytes(),
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    cookie,
                    0,
                );
            }
            _ => simple_reply(self.send.bytes(), 0, cookie),
        }
    }

    fn publish(&mut self) -> Notified {
        if self.send.unsent() == 0 && !self.channel.wants_send() {
            return Notified::Nobody;
        }
        self.send_out();
        Notified::Sent
    }

    fn enable_notification(&mut self) -> bool {
        // Stay awake while replies wait for the socket or a request is already buffered.
        self.send.unsent() > 0
            || self.channel.wants_send()
            || self.channel.has_buffered()
            || self.buffered() >= REQUEST_HEADER
            || self.closed
            || !self.fua_pending.is_empty()
    }

    fn disable_notification(&mut self) {}

    fn kick_fd(&self) -> RawFd {
        self.channel.fd()
    }

    fn ack_kick(&mut self) -> u64 {
        // Level-triggered: the data itself is the notification, read by `pop`.
        self.readable = true;
        1
    }

    fn detach(&mut self) -> u16 {
        0
    }

    fn broken(&mut self, _why: Broken) {
        if let Some(on_close) = self.on_close.take() {
            on_close();
        }
    }
}

impl NbdRing {
    /// Sends what the socket takes of the replies now.
    fn send_out(&mut self) {
        let sent = self.send.send(&mut self.channel, &mut self.spare);
        let flushed = sent.and_then(|()| match self.channel.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        });
        if flushed.is_err() {
            self.closed = true;
            self.send.discard(&mut self.spare);
        }
    }

    /// A READ's reply data: the slot's buffer goes to the socket as it is, and the slot
    /// takes a spare one for its next request.
    fn send_data(&mut self, slot: u32, length: u32) {
        let spare = self.spare.pop().unwrap_or_default();
        let data = std::mem::replace(&mut self.slots[slot as usize].data, spare);
        self.send.push_data(data, length as usize);
    }

    /// Nothing to take: once the connection is over and every reply is out, the ring is
    /// broken so its queue stops. Replies written without a request (refusals) go now:
    /// nothing else would publish them.
    fn closing(&mut self) -> Result<Popped, Broken> {
        self.send_out();
        let over = self.closed || self.disconnecting;
        let done = self.in_flight == 0 && self.fua_pending.is_empty();
        let sent = self.send.unsent() == 0 && !self.channel.wants_send();
        if over && done && (self.closed || sent) {
            if !self.closed {
                self.channel.close();
            }
            return Err(Broken::Disconnected);
        }
        Ok(Popped::Nothing)
    }
}

/// Reads what the connection has into `buf` (0: nothing now, or it ended: `closed`), without
/// a system call while it is known to have nothing (`readable` clear, no TLS plaintext
/// waiting). A short read clears `readable`: the socket is drained until its next kick.
fn receive(channel: &mut Channel, readable: &mut bool, closed: &mut bool, buf: &mut [u8]) -> usize {
    if *closed || buf.is_empty() || !(*readable || channel.has_buffered()) {
        return 0;
    }
    match channel.recv(buf) {
        Ok(0) => {
            *closed = true;
            0
        }
        Ok(n) => {
            *readable = n == buf.len();
            n
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            *readable = false;
            0
        }
        Err(_) => {
            *closed = true;
            0
        }
    }
}
