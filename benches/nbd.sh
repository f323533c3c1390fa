#!/usr/bin/env bash
# NBD exports side by side: pollblk (--export nbd) in its default adaptive poll mode and in
# interrupt mode (`pollblk-int`: the reactor sleeps whenever it has nothing to do, so its CPU
# time is its work), qemu-storage-daemon (--export type=nbd) and qemu-nbd, each serving a
# null volume (reads not filled, writes dropped: what is left
# is the NBD transport) from core 0, fio's nbd engine driving it from core 1. Per run: IOPS
# (MB/s for the 1 MiB row), fio's p50 latency, and the server's CPU seconds (utime + stime of
# its process from /proc), so IOPS per target CPU-second. The three servers alternate within
# each pair; medians of --pairs pairs.
#
# Two rows again over TLS (rustls for pollblk, GnuTLS for qsd; certificates made with openssl,
# no client certificate: tls-verify-peer=off / verify-peer=off).
#
# Then `nbdcopy URI null:` of a 4 GiB thin volume that is half holes (1 MiB of data, 1 MiB
# never written, in turn), served by pollblk with base:allocation, against the same bytes
# as a raw file served by qemu-storage-daemon; both on tmpfs.
#
#   benches/nbd.sh [--runtime SECONDS] [--pairs N] [--copy-size SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=5
pairs=3
copy_size=4G
while (($#)); do
	case $1 in
	--runtime) runtime=$2; shift 2 ;;
	--pairs) pairs=$2; shift 2 ;;
	--copy-size) copy_size=$2; shift 2 ;;
	*) echo "usage: $0 [--runtime S] [--pairs N] [--copy-size SIZE]" >&2; exit 2 ;;
	esac
done
for tool in qemu-storage-daemon qemu-nbd fio nbdcopy python3 taskset openssl; do
	command -v "$tool" >/dev/null || { echo "nbd.sh: $tool is missing" >&2; exit 1; }
done
cargo build --release --quiet -p pollblk
pollblk=$PWD/target/release/pollblk
dir=$(mktemp -d /dev/shm/pollblk-nbd-bench.XXXXXX)
server=
cleanup() {
	[[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	rm -rf "$dir"
}
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
size=$((1 << 30))

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

wait_socket() {
	for _ in $(seq 500); do
		[[ -S $1 ]] && return 0
		sleep 0.02
	done
	echo "nbd.sh: $1 never appeared" >&2
	exit 1
}

# TLS credentials: a CA, a server certificate for localhost (the server side of both), and
# the client's trust in the CA where libnbd looks for it ($HOME/.pki/libnbd).
make_tls() {
	local t=$dir/tls
	mkdir -p "$t/server" "$t/home/.pki/libnbd"
	local key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
	openssl req -x509 -days 2 -subj /CN=bench-ca "${key[@]}" -keyout "$t/ca-key.pem" \
		-out "$t/server/ca-cert.pem" 2>/dev/null
	printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$t/ext.cnf"
	openssl req -subj /CN=localhost "${key[@]}" -keyout "$t/server/server-key.pem" \
		-out "$t/server.csr" 2>/dev/null
	openssl x509 -req -in "$t/server.csr" -CA "$t/server/ca-cert.pem" -CAkey "$t/ca-key.pem" \
		-CAcreateserial -days 2 -extfile "$t/ext.cnf" -out "$t/server/server-cert.pem" 2>/dev/null
	cp "$t/server/ca-cert.pem" "$t/home/.pki/libnbd/ca-cert.pem"
}

# start NAME: the server NAME on core 0, listening on $dir/NAME.sock, export "x" (with TLS
# when $tls is 1).
tls=0
start() {
	local sock=$dir/$1.sock
	rm -f "$sock"
	case $1 in
	pollblk | pollblk-int)
		local mode=adaptive spec="nbd,socket=$sock,null,size=$size,read-zeroes=off,name=x"
		[[ $1 == pollblk-int ]] && mode=interrupt
		((tls)) && spec+=",tls-creds=$dir/tls/server,tls-verify-peer=off"
		(cd "$dir" && exec taskset -c 0 "$pollblk" serve --cores 0 --stats-dir "$dir/stats" --poll-mode $mode \
			--export "$spec") >/dev/null 2>"$dir/pollblk.log" &
		;;
	qsd)
		local object=() listen="addr.type=unix,addr.path=$sock"
		if ((tls)); then
			object=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$dir/tls/server,verify-peer=off")
			listen+=",tls-creds=tls0"
		fi
		taskset -c 0 qemu-storage-daemon "${object[@]}" \
			--blockdev "driver=null-co,node-name=n,size=$size,read-zeroes=off" \
			--nbd-server "$listen" \
			--export "type=nbd,id=e,node-name=n,name=x,writable=on" 2>"$dir/qsd.log" &
		;;
	qemu-nbd)
		taskset -c 0 qemu-nbd --image-opts "driver=null-co,size=$size,read-zeroes=off" \
			-x x -k "$sock" -e 16 -t 2>"$dir/qemu-nbd.log" &
		;;
	esac
	server=$!
	wait_socket "$sock"
	sleep 0.2
}

stop() {
	kill "$server" 2>/dev/null || true
	wait "$server" 2>/dev/null || true
	server=
}

# run NAME RW BS DEPTH: prints "value p50_us cpu_s" for one fio run against NAME.
run() {
	local name=$1 rw=$2 bs=$3 depth=$4
	start "$name"
	local before after
	before=$(cpu_ticks "$server")
	local scheme=nbd+unix
	((tls)) && scheme=nbds+unix
	HOME=$dir/tls/home taskset -c 1 fio --name=nbd --ioengine=nbd --uri="$scheme:///x?socket=$dir/$name.sock" \
		--rw="$rw" --bs="$bs" --iodepth="$depth" --size=$size --time_based \
		--runtime="$runtime" --ramp_time=1 --output-format=json >"$dir/fio.json" 2>"$dir/fio.err"
	after=$(cpu_ticks "$server")
	stop
	python3 - "$dir/fio.json" "$rw" "$bs" "$(((after - before)))" "$ticks" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
# fio's nbd engine says "connected" on stdout before the JSON.
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["write"] if "write" in sys.argv[2] else job["read"]
value = side["bw_bytes"] / 1e6 if sys.argv[3] == "1M" else side["iops"] / 1e3
p50 = side["clat_ns"]["percentile"]["50.000000"] / 1e3
print(value, p50, int(sys.argv[4]) / int(sys.argv[5]))
EOF
}

servers=(pollblk pollblk-int qsd qemu-nbd)
rows=("randread 4k 1" "randread 4k 32" "randwrite 4k 32" "read 1M 8")
results=$dir/results
: >"$results"
# run_rows SUFFIX SERVERS... : every row on every server, alternating within each pair.
run_rows() {
	local suffix=$1
	shift
	for row in "${rows[@]}"; do
		read -r rw bs depth <<<"$row"
		for ((p = 1; p <= pairs; p++)); do
			for s in "$@"; do
				echo "nbd.sh: $rw$suffix $bs QD$depth on $s (pair $p/$pairs)" >&2
				echo "$rw$suffix $bs $depth $s $(run "$s" "$rw" "$bs" "$depth")" >>"$results"
			done
		done
	done
}
run_rows "" "${servers[@]}"
make_tls
tls=1
rows=("randread 4k 32" "read 1M 8")
run_rows "+tls" pollblk pollblk-int qsd
tls=0

# nbdcopy of a half-sparse thin volume (pollblk) against the raw file (qsd).
echo "nbd.sh: making a $copy_size half-sparse image" >&2
python3 - "$dir/half.raw" "$copy_size" <<'EOF'
import os, sys
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
s = sys.argv[2]
size = int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)
chunk = os.urandom(1 << 20)
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    for at in range(0, size, 2 << 20):
        f.seek(at)
        f.write(chunk[: min(1 << 20, size - at)])
EOF
"$pollblk" pool create "$dir/pool" --size "$(( $(stat -c %s "$dir/half.raw") * 2 ))" >/dev/null
"$pollblk" pool volume import "$dir/pool" half --from "$dir/half.raw" 2>/dev/null
copy() {
	local name=$1 sock=$dir/$1-copy.sock
	rm -f "$sock"
	case $name in
	pollblk)
		(cd "$dir" && exec taskset -c 0 "$pollblk" serve --cores 0 --stats-dir "$dir/stats" \
			--export "nbd,socket=$sock,pool=$dir/pool,volume=half,name=x,readonly=on") >/dev/null 2>>"$dir/pollblk.log" &
		;;
	qsd)
		taskset -c 0 qemu-storage-daemon \
			--blockdev "driver=file,node-name=f,filename=$dir/half.raw,read-only=on" \
			--nbd-server "addr.type=unix,addr.path=$sock" \
			--export "type=nbd,id=e,node-name=f,name=x" 2>>"$dir/qsd.log" &
		;;
	esac
	server=$!
	wait_socket "$sock"
	sleep 0.2
	local start_ns end_ns
	start_ns=$(date +%s%N)
	taskset -c 1 nbdcopy "nbd+unix:///x?socket=$sock" null:
	end_ns=$(date +%s%N)
	stop
	echo "copy $name $(((end_ns - start_ns) / 1000000))"
}
for ((p = 1; p <= pairs; p++)); do
	for s in pollblk qsd; do
		echo "nbd.sh: nbdcopy from $s (pair $p/$pairs)" >&2
		copy "$s" >>"$results"
	done
done

python3 - "$results" "$copy_size" "$runtime" <<'EOF'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1]) if l.strip()]
# The CPU time covers fio's ramp second too, the rate only its runtime.
seconds = float(sys.argv[3]) + 1
med = lambda xs: statistics.median(xs) if xs else float("nan")
servers = ("pollblk", "pollblk-int", "qsd", "qemu-nbd")
print("| workload | metric | pollblk | pollblk interrupt | qsd | qemu-nbd | pollblk/qsd | "
      "pollblk interrupt/qsd | pollblk/qemu-nbd |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
rows = []
for r in runs:
    if r[0] != "copy" and tuple(r[:3]) not in rows:
        rows.append(tuple(r[:3]))
for rw, bs, depth in rows:
    def of(s):
        return [tuple(map(float, r[4:7])) for r in runs if r[:4] == [rw, bs, depth, s]]
    unit = "MB/s" if bs == "1M" else "kIOPS"
    metrics = [
        (unit, lambda s: med([v for v, _, _ in of(s)])),
        ("p50 latency us", lambda s: med([l for _, l, _ in of(s)])),
        (unit.replace("/s", "") + " per target CPU-s",
         lambda s: med([v * seconds / c for v, _, c in of(s) if c > 0])),
    ]
    for name, f in metrics:
        v = {s: f(s) for s in servers}
        show = lambda x: "-" if x != x else f"{x:.3g}"
        ratio = lambda a, b: "-" if v[a] != v[a] or v[b] != v[b] else f"{v[a] / v[b]:.2f}"
        print(f"| {rw} {bs} QD{depth} | {name} | {show(v['pollblk'])} | "
              f"{show(v['pollblk-int'])} | {show(v['qsd'])} | {show(v['qemu-nbd'])} | "
              f"{ratio('pollblk', 'qsd')} | {ratio('pollblk-int', 'qsd')} | "
              f"{ratio('pollblk', 'qemu-nbd')} |")
copies = {s: med([float(r[2]) for r in runs if r[0] == "copy" and r[1] == s]) for s in ("pollblk", "qsd")}
print(f"| nbdcopy of {sys.argv[2]}, half holes | seconds | {copies['pollblk'] / 1000:.2f} | - | "
      f"{copies['qsd'] / 1000:.2f} | - | {copies['pollblk'] / copies['qsd']:.2f} | - | - |")
EOF
