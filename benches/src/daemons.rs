//! Starting the daemons a comparison runs: pinned to a core, logs to a file, and ready
//! once their last socket accepts.

use crate::compare::pin_self;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to listen on every disk's socket.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

pub fn spawn_pinned(command: &mut Command, core: usize, dir: &Path) -> Result<Child, String> {
    let log = dir.join("daemon.log");
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    // SAFETY: sched_setaffinity is async-signal-safe; the closure touches no shared state.
    unsafe {
        command.pre_exec(move || pin_self(core));
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))
}

/// Waits until `last` accepts (the daemons create their sockets in order: the last one
/// made means all are).
pub fn wait_listening(child: &mut Child, last: &Path) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    while std::os::unix::net::UnixStream::connect(last).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited at start ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not accept in {STARTUP_LIMIT:?}",
                last.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The probe connection was closed at once; let the daemon notice before the real one.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}
