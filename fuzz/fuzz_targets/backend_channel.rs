//! The back-end channel from a hostile front end: whatever bytes and descriptors arrive as the
//! next message, `take_from` takes only a well-formed SET_BACKEND_REQ_FD carrying exactly one
//! Unix stream socket, leaves everything else on the socket for the vhost crate, and answers
//! NEED_REPLY with the right status; the front end's reply to CONFIG_CHANGE_MSG is accepted
//! only when well formed and successful.
//!
//! Input: byte 0 picks the descriptors sent with the message, byte 1 where the message ends
//! and the front end's reply (used if a channel was taken) begins.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollblk_vhost_user::backend_channel::take_from;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_BACKEND_REQ_FD: u32 = 21;
const NEED_REPLY: u32 = 0x8;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// What is readable on `socket` without blocking.
fn drain(socket: &UnixStream) -> Vec<u8> {
    socket.set_nonblocking(true).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = (&*socket).read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    all
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (kind, split) = (data[0] % 5, usize::from(data[1]));
    let rest = &data[2..];
    let (message, reply) = rest.split_at(split.min(rest.len()));

    let (front, back) = UnixStream::pair().unwrap();
    let (channel_front, channel_back) = UnixStream::pair().unwrap();
    let (datagram, _) = UnixDatagram::pair().unwrap();
    let event = EventFd::new(0).unwrap();
    let fds: Vec<RawFd> = match kind {
        0 => vec![],
        1 => vec![channel_back.as_raw_fd()],
        2 => vec![datagram.as_raw_fd()],
        3 => vec![event.as_raw_fd()],
        _ => vec![channel_back.as_raw_fd(), event.as_raw_fd()],
    };
    if message.is_empty() {
        return;
    }
    if fds.is_empty() {
        (&front).write_all(message).unwrap();
    } else {
        front.send_with_fds(&[message], &fds).unwrap();
    }
    drop(channel_back);

    let ours = message.len() >= 12
        && u32_at(message, 0) == SET_BACKEND_REQ_FD
        && u32_at(message, 8) == 0
        && u32_at(message, 4) & 0x3 == 1;
    let wants_reply = ours && u32_at(message, 4) & NEED_REPLY != 0;
    let taken = take_from(back.as_raw_fd());
    let left = drain(&back);
    match &taken {
        Ok(None) => {
            assert!(!ours, "a well-formed SET_BACKEND_REQ_FD was left");
            assert_eq!(left, message, "a message not ours must stay whole on the socket");
        }
        Ok(Some(_)) => {
            assert!(ours && kind == 1, "taken with descriptors of kind {kind}");
            assert_eq!(left, &message[12..], "only the header is consumed");
        }
        Err(_) => {
            assert!(ours && kind != 1, "refused a good one");
            assert_eq!(left, &message[12..], "only the header is consumed");
        }
    }
    let answer = drain(&front);
    if wants_reply {
        assert_eq!(answer.len(), 20, "NEED_REPLY gets one u64 reply");
        assert_eq!(u32_at(&answer, 0), SET_BACKEND_REQ_FD);
        let status = u64::from_le_bytes(answer[12..20].try_into().unwrap());
        assert_eq!(status, u64::from(taken.is_err()));
    } else {
        assert!(answer.is_empty(), "a reply nobody asked for");
    }

    if let Ok(Some(mut channel)) = taken {
        (&channel_front).write_all(reply).unwrap();
        channel_front.shutdown(std::net::Shutdown::Write).unwrap();
        let told = channel.config_changed(true);
        let good = reply.len() >= 20
            && u32_at(reply, 0) == 2
            && u32_at(reply, 4) & 0x4 != 0
            && u32_at(reply, 8) == 8
            && reply[12..20] == [0; 8];
        assert_eq!(told.is_ok(), good, "reply {reply:?}: {told:?}");
        let sent = drain(&channel_front);
        assert_eq!(sent.len(), 12, "one CONFIG_CHANGE_MSG header");
        assert_eq!(u32_at(&sent, 0), 2);
    }
});
