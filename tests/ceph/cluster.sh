#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for tests and benchmarks: one monitor on 127.0.0.1 with
# a free port, auth none, one OSD on memstore, pool "rbd" of size 1. No systemd, no kernel
# module; daemons run in the foreground of background jobs, their PIDs in DIR/pids.
#
#   tests/ceph/cluster.sh start DIR [IMAGE_SIZE_MB [OWNER_PID]]
#       prints the ceph.conf path; makes image rbd/img; with OWNER_PID the cluster is
#       stopped when that process exits (tests that die never leave daemons behind)
#   tests/ceph/cluster.sh stop DIR
#
# Each cluster gets its own port and fsid: two clusters on one port would silently merge.
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop DIR}
dir=${2:?usage: cluster.sh start|stop DIR}

stop() {
	if [[ -f $dir/pids ]]; then
		while read -r pid; do
			kill -9 "$pid" 2>/dev/null || true
		done <"$dir/pids"
		rm -f "$dir/pids"
	fi
}

if [[ $cmd == stop ]]; then
	stop
	exit 0
fi
[[ $cmd == start ]] || { echo "cluster.sh: unknown command $cmd" >&2; exit 2; }

for tool in ceph-mon ceph-osd monmaptool ceph rbd uuidgen python3; do
	command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is missing (apt-get install ceph-mon ceph-osd ceph-common)" >&2; exit 1; }
done

image_mb=${3:-256}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stop
rm -rf "$dir"/{mon.a,osd.0,run,log,ceph.conf,monmap}
mkdir -p "$dir"/{run,log,osd.0}

# A free port: bind to 0 and read it back (closed again before the monitor binds it).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fsid=$(uuidgen)
conf=$dir/ceph.conf
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
ms bind msgr2 = false
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = $(((image_mb + 512) << 20))
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon.\$id
osd data = $dir/osd.\$id
keyring = $dir/keyring
CONF

# Right after it starts, the monitor may refuse a command now and then ("problem getting
# command descriptions"): every command used here is idempotent, so each is retried.
ceph_cli() {
	local try
	for try in 1 2 3 4 5 6 7 8 9 10; do
		if timeout 30 ceph -c "$conf" --connect-timeout 10 "$@"; then
			return 0
		fi
		sleep 0.5
	done
	return 1
}

monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >/dev/null
ceph-mon -c "$conf" -i a -f >"$dir/log/mon.out" 2>&1 &
echo $! >>"$dir/pids"

# The monitor answers commands only once it has formed its quorum of one.
ceph_cli mon stat >/dev/null 2>&1 || { echo "cluster.sh: the monitor did not come up; logs in $dir/log" >&2; exit 1; }

osd_uuid=$(uuidgen)
osd_id=$(ceph_cli osd create "$osd_uuid")
[[ $osd_id == 0 ]] || { echo "cluster.sh: expected osd 0, got $osd_id" >&2; exit 1; }
ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd.mkfs" 2>&1
start_osd() {
	ceph-osd -c "$conf" -i 0 -f >>"$dir/log/osd.out" 2>&1 &
	osd_pid=$!
	echo $osd_pid >>"$dir/pids"
}
start_osd

# A fresh machine's first OSD can take a while (cold caches, two clusters starting at once on
# two cores): wait up to 120 s, and show why if it died. Ceph 16's OSD sometimes sends its
# first monitor command before it has the monitor map, with a zero fsid ("wrong fsid" in its
# log, "handle_command on fsid 00000000-..." in the monitor's) and exits: about 1 start in 8
# here. Only the OSD is started again then, up to three times.
osd_failed() {
	echo "cluster.sh: the OSD did not come up ($1); logs in $dir/log" >&2
	tail -n 20 "$dir/log/osd.out" "$dir/log/osd.0.log" >&2 2>/dev/null || true
	exit 1
}
osd_starts=1
deadline=$((SECONDS + 120))
until timeout 30 ceph -c "$conf" --connect-timeout 10 osd stat 2>/dev/null | grep -q '1 up'; do
	if ! kill -0 "$osd_pid" 2>/dev/null; then
		((osd_starts < 4)) || osd_failed "ceph-osd exited $osd_starts times"
		echo "cluster.sh: ceph-osd exited during start-up, starting it again" >&2
		osd_starts=$((osd_starts + 1))
		start_osd
	fi
	((SECONDS < deadline)) || osd_failed "not up after 120 s"
	sleep 0.2
done

# The monitor answering is ours (its fsid), not another cluster's on the same port.
[[ $(ceph_cli fsid) == "$fsid" ]] || { echo "cluster.sh: fsid mismatch: another cluster on port $port?" >&2; exit 1; }

ceph_cli osd pool create rbd 8 8 >/dev/null 2>&1
ceph_cli osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
ceph_cli osd pool application enable rbd rbd >/dev/null 2>&1
timeout 60 rbd -c "$conf" create --size "${image_mb}M" rbd/img
owner=${4:-}
if [[ -n $owner ]]; then
	# Not a child of the owner: it must outlive it to clean up.
	setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; '$0' stop '$dir'" \
		</dev/null >/dev/null 2>&1 &
fi
echo "$conf"
