//! systemd readiness notification (sd_notify), without libsystemd: one datagram to
//! $NOTIFY_SOCKET per state change. Does nothing when not started by systemd.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (for example "READY=1") to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket address.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?path, "cannot notify the service manager");
    }
}
