//! A one-node Ceph cluster for a test (tests/ceph/cluster.sh), stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    dir: PathBuf,
    pub conf: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh")
}

/// Whether the Ceph daemons are installed; the RBD tests need them (CI installs them).
pub fn available() -> bool {
    ["ceph-mon", "ceph-osd", "rbd"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

impl Cluster {
    /// Starts a cluster in `dir` with image rbd/img of `image_mb` MiB.
    pub fn start(dir: &Path, image_mb: u64) -> Cluster {
        assert!(
            available(),
            "the RBD tests need ceph-mon, ceph-osd and rbd (apt-get install ceph-mon ceph-osd ceph-common)"
        );
        // A cluster that fails to start is retried once (its reasons printed): on a fresh,
        // busy machine Ceph's own start-up is the flaky part, not what the tests check.
        let start = || {
            Command::new(script())
                .arg("start")
                .arg(dir)
                .arg(image_mb.to_string())
                .arg(std::process::id().to_string())
                .output()
                .expect("run cluster.sh")
        };
        let mut out = start();
        if !out.status.success() {
            eprintln!(
                "cluster.sh start failed, retrying once: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out = start();
        }
        assert!(
            out.status.success(),
            "cluster.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = String::from_utf8(out.stdout).unwrap();
        Cluster {
            dir: dir.to_owned(),
            conf: PathBuf::from(conf.trim().lines().last().unwrap()),
        }
    }

    /// `rbd ARGS` against this cluster.
    pub fn rbd(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Creates image rbd/NAME of `mb` MiB.
    pub fn create_image(&self, name: &str, mb: u64) {
        self.rbd(&[
            "create",
            "--size",
            &format!("{mb}M"),
            &format!("rbd/{name}"),
        ]);
    }

    /// The OSD's process id (the second daemon cluster.sh started).
    pub fn osd_pid(&self) -> i32 {
        // The monitor's PID comes first, then one line per OSD start: cluster.sh starts the
        // OSD again when it exits during start-up, so the live one is the last.
        let pids = std::fs::read_to_string(self.dir.join("pids")).unwrap();
        pids.lines().last().unwrap().trim().parse().unwrap()
    }

    /// The export option naming image `name` of this cluster.
    pub fn export(&self, name: &str) -> String {
        format!("rbd=rbd/{name},ceph-conf={}", self.conf.display())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}
