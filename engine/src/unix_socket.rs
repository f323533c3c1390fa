//! Listening Unix sockets with their owner, group and mode set before anyone can connect:
//! bind, chown/chmod, then listen (a socket made with UnixListener::bind listens at once,
//! with the umask's mode, until it is changed).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Who may connect: unset fields keep what bind() gives (this process's user and group,
/// the umask's mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// Permission bits (0o660...).
    pub mode: Option<u32>,
}

impl Access {
    /// Each field of `self`, or `default`'s where unset.
    pub fn or(self, default: Access) -> Access {
        Access {
            owner: self.owner.or(default.owner),
            group: self.group.or(default.group),
            mode: self.mode.or(default.mode),
        }
    }
}

/// Why a socket could not be made.
#[derive(Debug)]
pub enum BindError {
    /// Another process listens on it.
    InUse,
    /// Something else than a socket is there.
    NotASocket,
    Io(io::Error),
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindError::InUse => f.write_str("another process listens on it"),
            BindError::NotASocket => f.write_str("exists and is not a socket"),
            BindError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Listens on `path` with `access`, replacing a stale socket nobody listens on.
pub fn listen(path: &Path, access: Access, backlog: i32) -> Result<UnixListener, BindError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket);
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse);
        }
        std::fs::remove_file(path).map_err(BindError::Io)?;
    }
    let fd = bind(path).map_err(|e| BindError::Io(explain(path, e)))?;
    // Owner and mode before listen(): nobody can connect until they are right.
    if access.owner.is_some() || access.group.is_some() {
        std::os::unix::fs::chown(path, access.owner, access.group).map_err(BindError::Io)?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(BindError::Io)?;
    }
    // SAFETY: listens on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(BindError::Io(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(fd))
}

/// A new socket bound to `path`, not listening yet.
fn bind(path: &Path) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket (108 bytes)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = b as libc::c_char;
    }
    // SAFETY: creates a socket; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: binds our socket to the address built above.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// "No such file or directory" alone does not say which: the directory.
fn explain(path: &Path, e: io::Error) -> io::Error {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => io::Error::new(
            e.kind(),
            format!(
                "its directory {} does not exist (create it first)",
                dir.display()
            ),
        ),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_mode_is_set_before_anyone_connects_and_a_live_socket_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let access = Access {
            mode: Some(0o600),
            ..Access::default()
        };
        let listener = listen(&path, access, 4).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(listen(&path, access, 4), Err(BindError::InUse)));
        drop(listener);
        // Stale now: replaced.
        listen(&path, access, 4).unwrap();
        let missing = dir.path().join("nodir/s.sock");
        let err = listen(&missing, access, 4).unwrap_err().to_string();
        assert!(err.contains("nodir does not exist"), "{err}");
    }
}
