#!/usr/bin/env bash
# Xen blkif over the loopback platform next to vhost-user-blk, on the same volume and the same
# reactor: 4 KiB random reads on one queue of a null disk (read-zeroes=off, so the transport
# and the request path are what is measured), pollblk on core 0, the front end on core 1.
# The blkif front end is tests/xen/blkfront.c (Xen's ring.h macros, polling for responses);
# the vhost-user one is pollblk-bench's lean split-ring driver. Runs alternate B A B A ...
# and the medians are printed (BENCHMARKS.md quotes this).
#
#   benches/xen-loopback.sh [--runtime S] [--pairs N] [--iodepth N]
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=5 pairs=3 iodepth=32
while (($#)); do
	case $1 in
	--runtime) runtime=$2; shift 2 ;;
	--pairs) pairs=$2; shift 2 ;;
	--iodepth) iodepth=$2; shift 2 ;;
	*) echo "usage: $0 [--runtime S] [--pairs N] [--iodepth N]" >&2; exit 2 ;;
	esac
done
cargo build --release --quiet -p pollblk -p pollblk-bench
dir=$(mktemp -d)
trap 'kill "$daemon" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
cc -O2 -fno-strict-aliasing -o "$dir/blkfront" tests/xen/blkfront.c

volume=null,size=1G,read-zeroes=off
(cd "$dir" && exec taskset -c 0 "$OLDPWD/target/release/pollblk" serve --cores 0 \
	--export "vhost-user-blk,socket=$dir/vu.sock,$volume,num-queues=1" \
	--export "xen-blkif-loopback,dir=$dir/xs,domid=1,devid=51712,$volume,num-queues=1" \
	>"$dir/daemon.log" 2>&1) &
daemon=$!
for _ in $(seq 100); do
	[[ -S $dir/vu.sock && -S $dir/xs/xenstore.sock ]] && break
	sleep 0.1
done

blkif=() vhost=()
for ((i = 0; i < pairs; i++)); do
	out=$(taskset -c 1 "$dir/blkfront" "$dir/xs/xenstore.sock" 1 51712 1 3 bench "$runtime" "$iodepth")
	blkif+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["iops"])' "$out")")
	out=$(taskset -c 1 target/release/pollblk-bench --socket "$dir/vu.sock" --driver lean \
		--rw randread --bs 4k --iodepth "$iodepth" --runtime "$runtime" --ramp 0.5 --json)
	vhost+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["iops"])' "$out")")
done
python3 - "$iodepth" "${blkif[*]}" "${vhost[*]}" <<'EOF'
import statistics, sys
depth, blkif, vhost = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
b, v = statistics.median(blkif), statistics.median(vhost)
print(f"4k randread QD{depth}, 1 queue, null disk, 1 reactor")
print(f"xen blkif (loopback, ring order 3): {b/1e3:8.0f} k IOPS  runs {[round(x/1e3) for x in blkif]}")
print(f"vhost-user-blk (lean driver):        {v/1e3:8.0f} k IOPS  runs {[round(x/1e3) for x in vhost]}")
print(f"blkif / vhost-user: {b/v:.2f}")
EOF
