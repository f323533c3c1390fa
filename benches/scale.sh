#!/usr/bin/env bash
# One busy disk among many idle ones: a daemon serving DISKS single-queue null disks on one
# reactor (core 0), pollblk-bench (core 1) driving the last disk at QD1 and QD32, alone and
# beside DISKS-1 idle front ends (each connected, its queue started, one read served, then
# quiet). Runs alternate between this build and BASELINE (another pollblk binary) when given.
#   benches/scale.sh [--disks N] [--runs R] [--baseline PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
disks=501 runs=3 baseline=''
while (($#)); do
	case $1 in
	--disks) disks=$2; shift ;;
	--runs) runs=$2; shift ;;
	--baseline) baseline=$2; shift ;;
	*) echo "usage: $0 [--disks N] [--runs R] [--baseline PATH]" >&2; exit 2 ;;
	esac
	shift
done
cargo build --release --quiet -p pollblk -p pollblk-bench
dir=$(mktemp -d /tmp/pollblk-scale.XXXXXX)
trap 'rm -rf "$dir"' EXIT
{
	echo "stats-dir = \"$dir/stats\""
	echo "control = \"$dir/control.sock\""
	for ((i = 0; i < disks; i++)); do
		echo '[[export]]'
		echo "spec = \"vhost-user-blk,socket=$dir/d$i.sock,null,size=64M,num-queues=1\""
	done
} >"$dir/disks.toml"
last=$((disks - 1))

# run BINARY IDLE QD: prints "kIOPS p50_us"
run() {
	rm -rf "$dir/stats" "$dir"/*.sock
	taskset -c 0 "$1" serve --config "$dir/disks.toml" --cores 0 >"$dir/daemon.log" 2>&1 &
	local pid=$!
	for _ in $(seq 300); do [[ -S $dir/d$last.sock ]] && break; sleep 0.1; done
	sleep 0.5
	local idle=()
	if (($2 > 0)); then idle=(--idle-sockets "$dir/d{}.sock" --idle-count "$2"); fi
	taskset -c 1 target/release/pollblk-bench --socket "$dir/d$last.sock" --driver lean \
		--iodepth "$3" --runtime 3 --ramp 1 --json "${idle[@]}" >"$dir/out.json"
	kill "$pid"; wait "$pid" 2>/dev/null || true
	python3 -c "import json; d=json.load(open('$dir/out.json')); print('%.0f %.2f' % (d['iops']/1e3, d['latency_ns']['p50']/1e3))"
}

targets=(target/release/pollblk)
[[ -n $baseline ]] && targets+=("$baseline")
echo "| target | QD | idle disks | run | kIOPS | p50 us |"
echo "|---|---:|---:|---:|---:|---:|"
for qd in 1 32; do
	for ((r = 1; r <= runs; r++)); do
		for idle in 0 "$last"; do
			for t in "${targets[@]}"; do
				read -r kiops p50 < <(run "$t" "$idle" "$qd")
				echo "| $t | $qd | $idle | $r | $kiops | $p50 |"
			done
		done
	done
done
