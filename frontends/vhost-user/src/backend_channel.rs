//! The back-end-to-front-end channel (VHOST_USER_SET_BACKEND_REQ_FD), used to tell the front
//! end that the device's configuration changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG): QEMU
//! then reads the config space again and, when the capacity changed, interrupts the guest.
//!
//! The vhost crate (0.18) keeps the channel it builds private and has no way to send
//! CONFIG_CHANGE_MSG on it, so SET_BACKEND_REQ_FD is taken off the socket here, before the
//! crate reads the next message, and acknowledged as the crate would.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// vhost-user message header: request, flags, payload size (all u32 little endian).
const HEADER_LEN: usize = 12;
/// Front-end request VHOST_USER_SET_BACKEND_REQ_FD.
const SET_BACKEND_REQ_FD: u32 = 21;
/// Back-end request VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, this is a reply, a reply is wanted.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// How long the front end may take to acknowledge a config change (QEMU reads the config
/// space back over the main socket before it replies).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The channel to the front end, as received.
pub struct BackendChannel {
    stream: UnixStream,
}

fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// If the next message on the front end's socket `fd` is a well-formed SET_BACKEND_REQ_FD,
/// consumes it, acknowledges it when asked to, and returns the channel. Anything else is left
/// on the socket for the vhost crate (which also rejects a malformed SET_BACKEND_REQ_FD).
pub fn take_from(fd: RawFd) -> io::Result<Option<BackendChannel>> {
    let mut hdr = [0u8; HEADER_LEN];
    // SAFETY: peeks into a local buffer of the length given; no descriptors are received
    // (no control buffer), so none are taken off the socket.
    let n = unsafe {
        libc::recv(
            fd,
            hdr.as_mut_ptr().cast(),
            HEADER_LEN,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != HEADER_LEN as isize
        || u32_at(&hdr, 0) != SET_BACKEND_REQ_FD
        || u32_at(&hdr, 8) != 0
        || u32_at(&hdr, 4) & 0x3 != VERSION_1
    {
        return Ok(None);
    }
    let flags = u32_at(&hdr, 4);
    let channel = receive_channel(fd, &mut hdr);
    if flags & NEED_REPLY != 0 {
        // The acknowledgement the vhost crate would send: 0 for success.
        let mut reply = header(SET_BACKEND_REQ_FD, VERSION_1 | REPLY, 8).to_vec();
        reply.extend_from_slice(&u64::from(channel.is_err()).to_le_bytes());
        // SAFETY: `fd` is the front end's socket, open for this call; a borrowed stream is
        // built only to write and is forgotten, never closing the descriptor.
        let mut socket = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
        socket.write_all(&reply)?;
    }
    channel.map(Some)
}

/// Consumes the peeked SET_BACKEND_REQ_FD and checks its one descriptor.
fn receive_channel(fd: RawFd, hdr: &mut [u8; HEADER_LEN]) -> io::Result<BackendChannel> {
    let (read, fds) = recv_with_fds(fd, hdr)?;
    if read != HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "SET_BACKEND_REQ_FD cut short",
        ));
    }
    let mut fds = fds.into_iter();
    let (Some(channel), None) = (fds.next(), fds.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SET_BACKEND_REQ_FD needs exactly one descriptor",
        ));
    };
    check_unix_stream(&channel)?;
    Ok(BackendChannel {
        stream: UnixStream::from(channel),
    })
}

/// Reads one message header with its descriptors (at most 8, as vhost-user allows).
fn recv_with_fds(fd: RawFd, buf: &mut [u8; HEADER_LEN]) -> io::Result<(usize, Vec<OwnedFd>)> {
    const MAX_FDS: usize = 8;
    let mut control = [0u64; 16]; // 128 bytes, aligned: room for CMSG_SPACE(8 fds)
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: receives into the buffers described by `msg`, all alive for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into `control`, within
    // msg_controllen; SCM_RIGHTS payloads are arrays of descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                // Every descriptor received is ours to close, however many came.
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors with SET_BACKEND_REQ_FD",
        ));
    }
    Ok((n as usize, fds))
}

/// The channel must be an AF_UNIX stream socket (the spec's requirement).
fn check_unix_stream(fd: &OwnedFd) -> io::Result<()> {
    let get = |option| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one int option of a descriptor we own into a local.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if get(libc::SO_DOMAIN)? != libc::AF_UNIX || get(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SET_BACKEND_REQ_FD: not a Unix stream socket",
        ));
    }
    Ok(())
}

impl BackendChannel {
    /// A second handle on the same channel, so a message can be sent without holding the
    /// connection's handler (the front end answers over the main socket first).
    pub fn try_clone(&self) -> io::Result<BackendChannel> {
        Ok(BackendChannel {
            stream: self.stream.try_clone()?,
        })
    }

    /// Sends CONFIG_CHANGE_MSG; with `reply_ack` (REPLY_ACK negotiated) waits for the front
    /// end's answer and fails if it reports an error.
    pub fn config_changed(&mut self, reply_ack: bool) -> io::Result<()> {
        let flags = VERSION_1 | if reply_ack { NEED_REPLY } else { 0 };
        self.stream
            .write_all(&header(CONFIG_CHANGE_MSG, flags, 0))?;
        if !reply_ack {
            return Ok(());
        }
        self.stream.set_read_timeout(Some(ACK_TIMEOUT))?;
        let mut reply = [0u8; HEADER_LEN + 8];
        self.stream.read_exact(&mut reply)?;
        let status = u64::from_le_bytes(reply[HEADER_LEN..].try_into().expect("8 bytes"));
        if u32_at(&reply, 0) != CONFIG_CHANGE_MSG
            || u32_at(&reply, 4) & REPLY == 0
            || u32_at(&reply, 8) != 8
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the front end's reply to CONFIG_CHANGE_MSG is malformed",
            ));
        }
        if status != 0 {
            return Err(io::Error::other(format!(
                "the front end failed the config change (status {status})"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    #[test]
    fn set_backend_req_fd_is_taken_acknowledged_and_carries_config_changes() {
        let (front, back) = UnixStream::pair().unwrap();
        let (channel_front, channel_back) = UnixStream::pair().unwrap();
        front
            .send_with_fd(
                &header(SET_BACKEND_REQ_FD, VERSION_1 | NEED_REPLY, 0)[..],
                channel_back.as_raw_fd(),
            )
            .unwrap();
        drop(channel_back);
        let mut channel = take_from(back.as_raw_fd()).unwrap().expect("taken");
        let mut ack = [0u8; HEADER_LEN + 8];
        (&front).read_exact(&mut ack).unwrap();
        assert_eq!(
            ack[..HEADER_LEN],
            header(SET_BACKEND_REQ_FD, VERSION_1 | REPLY, 8)
        );
        assert_eq!(ack[HEADER_LEN..], [0; 8]);

        // The front end's side: answer the config change with success.
        let answer = std::thread::spawn(move || {
            let mut msg = [0u8; HEADER_LEN];
            (&channel_front).read_exact(&mut msg).unwrap();
            let mut reply = header(CONFIG_CHANGE_MSG, VERSION_1 | REPLY, 8).to_vec();
            reply.extend_from_slice(&0u64.to_le_bytes());
            (&channel_front).write_all(&reply).unwrap();
            msg
        });
        channel.config_changed(true).unwrap();
        assert_eq!(
            answer.join().unwrap(),
            header(CONFIG_CHANGE_MSG, VERSION_1 | NEED_REPLY, 0)
        );
    }

    #[test]
    fn other_messages_stay_on_the_socket() {
        let (front, back) = UnixStream::pair().unwrap();
        // GET_FEATURES (1): not ours.
        (&front).write_all(&header(1, VERSION_1, 0)).unwrap();
        assert!(take_from(back.as_raw_fd()).unwrap().is_none());
        let mut still = [0u8; HEADER_LEN];
        (&back).read_exact(&mut still).unwrap();
        assert_eq!(still, header(1, VERSION_1, 0));
        // SET_BACKEND_REQ_FD without a descriptor is refused, and the front end told so.
        (&front)
            .write_all(&header(SET_BACKEND_REQ_FD, VERSION_1 | NEED_REPLY, 0))
            .unwrap();
        assert!(take_from(back.as_raw_fd()).is_err());
        let mut nack = [0u8; HEADER_LEN + 8];
        (&front).read_exact(&mut nack).unwrap();
        assert_eq!(nack[HEADER_LEN..], 1u64.to_le_bytes());
    }
}
