#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30) from its corpus in fuzz/corpus/TARGET
# (checked-in seeds; new finds are added there), then prints libFuzzer's final statistics.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP=1 lets stable Rust build the
# sanitizer instrumentation cargo-fuzz asks for. A crash stops the run with its reproducer
# in fuzz/artifacts/TARGET/ (replay: cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
	targets=(chain blkif vhost_user backend_channel stats_reader thin_metadata thin_model nbd)
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build --debug-assertions
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
	mkdir -p "corpus/$target"
	echo "== $target: $seconds s"
	status=0
	cargo fuzz run --debug-assertions "$target" "corpus/$target" -- \
		-max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
		>"$log" 2>&1 || status=$?
	grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)|^#[0-9]+ +DONE" "$log" || true
	if ((status != 0)); then
		tail -n 60 "$log"
		echo "fuzz: $target failed (exit $status)" >&2
		exit 1
	fi
done
