#!/usr/bin/env bash
# Side-by-side benchmark of pollblk and qemu-storage-daemon on this machine: builds both
# binaries in release mode and runs `pollblk-bench compare` (see BENCHMARKS.md).
#   benches/compare.sh                      # the full run BENCHMARKS.md quotes (~10 min)
#   benches/compare.sh --runtime 1 --pairs 1 --size 64m   # smoke run (CI)
#   benches/compare.sh --json > out.json
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p pollblk -p pollblk-bench
exec target/release/pollblk-bench compare "$@"
