#!/usr/bin/env bash
# Side-by-side benchmark of pollblk and qemu-storage-daemon on this machine: builds both
# binaries in release mode and runs `pollblk-bench compare` (see BENCHMARKS.md).
#   benches/compare.sh                      # the full run BENCHMARKS.md quotes (~10 min)
#   benches/compare.sh --runtime 1 --pairs 1 --size 64m   # smoke run (CI)
#   benches/compare.sh --json > out.json
#   benches/compare.sh --only rbd --ceph-conf "$(tests/ceph/cluster.sh start /tmp/ceph 1024)"
set -euo pipefail
cd "$(dirname "$0")/.."
# With Ceph's headers installed, pollblk serves RBD images too (the rbd group, --ceph-conf).
features=()
if [[ -e /usr/include/rbd/librbd.h ]]; then
	features=(--features pollblk/rbd)
fi
cargo build --release --quiet -p pollblk -p pollblk-bench "${features[@]}"
exec target/release/pollblk-bench compare "$@"
