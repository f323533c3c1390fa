//! Puts the commit and the enabled features into `pollblk --version`.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success() && !o.stdout.is_empty())
        .map_or("", |_| "-modified");
    let features: Vec<&str> = [("rbd", "CARGO_FEATURE_RBD"), ("xen", "CARGO_FEATURE_XEN")]
        .into_iter()
        .filter(|(_, var)| std::env::var_os(var).is_some())
        .map(|(name, _)| name)
        .collect();
    let features = match features.is_empty() {
        true => "none".to_string(),
        false => features.join(", "),
    };
    println!(
        "cargo:rustc-env=POLLBLK_VERSION={} (commit {commit}{dirty}, features: {features})",
        env!("CARGO_PKG_VERSION")
    );
    // A new commit or checkout changes HEAD or the branch it points at.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
}
