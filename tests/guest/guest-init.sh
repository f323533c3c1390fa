#!/bin/sh
# /init of the pollblk test guest (busybox sh). Loads virtio-blk, exercises
# /dev/vda and powers off. Every step prints "POLLBLK-GUEST: <step> rc=<n>";
# fio's JSON is framed by "POLLBLK-GUEST: begin-json <step>" / "end-json <step>".
# Parameters come from the kernel command line as pollblk.<name>=<value>.

# The initramfs has no /dev/console node (building it needs no root), so
# stdin/stdout/stderr only exist once devtmpfs is mounted.
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
export PATH=/usr/sbin:/usr/bin:/bin
# Start markers on a fresh line: the firmware leaves escape codes on the console.
echo

# Whatever happens (error, early exit), never leave QEMU running.
trap 'poweroff -f' EXIT

mark() { echo "POLLBLK-GUEST: $*"; }

# param NAME DEFAULT: value of pollblk.NAME= on the kernel command line.
param() {
	v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^pollblk\.$1=//p" | tail -n 1)
	echo "${v:-$2}"
}

# bytes SIZE: 64M -> 67108864 (K, M, G suffixes, powers of 1024).
bytes() {
	case $1 in
	*[kK]) echo $((${1%?} * 1024)) ;;
	*[mM]) echo $((${1%?} * 1024 * 1024)) ;;
	*[gG]) echo $((${1%?} * 1024 * 1024 * 1024)) ;;
	*) echo "$1" ;;
	esac
}

# Sizes take K/M/G suffixes and must be whole MiB (dd works in 1 MiB blocks).
SIZE=$(param size 64M)          # region written by each of the two fio jobs
IODEPTH=$(param iodepth 16)
IOENGINE=$(param ioengine libaio)
RUNTIME=$(param runtime 0)      # >0 adds a time-based write+verify soak step
RANGE=$(param range 16M)        # length of the discard, write-zeroes and flush ranges
WAIT=$(param wait 20)           # seconds to wait for /dev/vda
MODE=$(param mode verify)       # verify: exercise vda; hotplug: the run-time disk steps;
                                # pair: vda and vdb written and verified at once;
                                # rate: fio for RUNTIME s, what a limited disk gives;
                                # shell: a shell on the console (tests/guest/try.sh);
                                # clones: ext4 on a snapshot (vda) and its clones

MiB=1048576
SIZE_B=$(bytes "$SIZE")
RANGE_B=$(bytes "$RANGE")
# Layout on the disk: [fio job 0][fio job 1][discard][write-zeroes][flush]
DISCARD_OFF=$((2 * SIZE_B))
ZERO_OFF=$((DISCARD_OFF + RANGE_B))
FLUSH_OFF=$((ZERO_OFF + RANGE_B))

mark "kernel $(uname -r)"
mark "params mode=$MODE size=$SIZE iodepth=$IODEPTH ioengine=$IOENGINE runtime=$RUNTIME range=$RANGE"

# Modules in dependency order, worked out at build time from modules.dep.
for m in $(cat /lib/modules/load-order); do
	insmod "/lib/modules/$m.ko" || { mark "insmod-$m rc=$?"; exit 1; }
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt $((WAIT * 10)) ]; do
	sleep 0.1
	i=$((i + 1))
done
[ -b /dev/vda ] || { mark "vda rc=1 missing"; exit 1; }
need=$((FLUSH_OFF + RANGE_B))
[ $(($(cat /sys/block/vda/size) * 512)) -ge $need ] || { mark "vda rc=1 smaller-than=$need"; exit 1; }
mark "vda rc=0"

failed=0
# step NAME RC [EXTRA...]: print the marker and count failures.
step() {
	[ "$2" -eq 0 ] || failed=$((failed + 1))
	name=$1 rc=$2
	shift 2
	mark "$name rc=$rc${*:+ $*}"
}

# run_fio STEP ARGS...: JSON goes to a file so fio's warnings and verify
# messages (stderr) cannot end up inside the framed JSON.
run_fio() {
	name=$1
	shift
	fio --eta=never --output-format=json --output="/tmp/$name.json" "$@" 2>"/tmp/$name.err"
	rc=$?
	cat "/tmp/$name.err"
	mark "begin-json $name"
	cat "/tmp/$name.json"
	mark "end-json $name"
	step "$name" $rc "verify_errors=$(grep -c '^verify:' "/tmp/$name.err")"
}

# zeroes OFF LEN: "yes" if the range reads back as zeroes (O_DIRECT, no cache).
zeroes() {
	got=$(dd if=/dev/vda bs=$MiB skip=$(($1 / MiB)) count=$(($2 / MiB)) iflag=direct 2>/dev/null | md5sum)
	want=$(dd if=/dev/zero bs=$MiB count=$(($2 / MiB)) 2>/dev/null | md5sum)
	[ "$got" = "$want" ] && echo yes || echo no
}

# fill OFF LEN: random data, so a later "reads as zeroes" proves something.
fill() {
	dd if=/dev/urandom of=/dev/vda bs=$MiB seek=$(($1 / MiB)) count=$(($2 / MiB)) oflag=direct 2>/dev/null
}

# wait_for TEST SECONDS: rc 0 once the shell test TEST holds, polled every 0.1 s.
wait_for() {
	i=0
	while ! eval "$1"; do
		[ $i -ge $(($2 * 10)) ] && return 1
		sleep 0.1
		i=$((i + 1))
	done
}

# Hot-plug mode: the host adds /dev/vdb at run time, grows it, then removes it. Each
# "hotplug-*" marker tells the host what the guest waits for next.
hotplug() {
	mark "hotplug-ready"
	wait_for '[ -b /dev/vdb ]' 300
	step vdb-added $? "size=$(cat /sys/block/vdb/size 2>/dev/null)"
	[ -b /dev/vdb ] || return
	run_fio fio-vdb --filename=/dev/vdb --direct=1 --rw=randwrite --bssplit=4k/80:64k/20 \
		--size=16M --iodepth=8 --ioengine="$IOENGINE" --verify=crc32c --verify_fatal=1 \
		--do_verify=1 --name=vdb
	old=$(cat /sys/block/vdb/size)
	mark "hotplug-resize-wait size=$old"
	wait_for "[ \$(cat /sys/block/vdb/size) -ne $old ]" 300
	rc=$?
	new=$(cat /sys/block/vdb/size)
	step vdb-resized $rc "size=$new"
	# The grown part is usable: its last MiB written and read back.
	last=$((new / 2048 - 1))
	dd if=/dev/urandom of=/tmp/tail.dat bs=$MiB count=1 2>/dev/null
	dd if=/tmp/tail.dat of=/dev/vdb bs=$MiB seek=$last oflag=direct 2>/dev/null &&
		[ "$(dd if=/dev/vdb bs=$MiB skip=$last count=1 iflag=direct 2>/dev/null | md5sum)" = \
			"$(md5sum </tmp/tail.dat)" ]
	step vdb-tail $?
	mark "hotplug-remove-wait"
	wait_for '[ ! -e /sys/block/vdb ]' 300
	step vdb-removed $?
	# The first disk did not notice.
	dd if=/dev/vda of=/dev/null bs=$MiB count=4 iflag=direct 2>/dev/null
	step vda-after $?
}

if [ "$MODE" = hotplug ]; then
	hotplug
	mark "summary failed=$failed"
	mark "done"
	# Time for the host to finish with the removed disk before QEMU exits.
	sleep "$(param linger 10)"
	exit 0
fi

# Shell mode (tests/guest/try.sh): a shell on the console with the disk at /dev/vda;
# leaving it powers the guest off.
if [ "$MODE" = shell ]; then
	echo "pollblk guest: /dev/vda is the served disk ($(($(cat /sys/block/vda/size) / 2048)) MiB)."
	echo "Try: dd if=/dev/urandom of=/dev/vda bs=1M count=16 oflag=direct; fio is installed."
	echo "Leave with: poweroff -f"
	setsid cttyhack sh -l || sh
	exit 0
fi

# Rate mode: as many random reads and writes as the disk gives for RUNTIME seconds (a disk
# with limits: what the guest gets of them).
if [ "$MODE" = rate ]; then
	run_fio fio-rate --filename=/dev/vda --direct=1 --rw=randrw --bs=4k --iodepth="$IODEPTH" \
		--ioengine="$IOENGINE" --size="$SIZE" --time_based --runtime="$RUNTIME" --name=rate
	mark "summary failed=$failed"
	mark "done"
	exit 0
fi

# Clones mode: vda is a snapshot of an ext4 image (served read-only), vdb and on its
# CLONES clones. Every file system is mounted and its files checked against SHA256SUMS;
# each clone gets a file of its own (mine: "clone N" lines), read again after a remount;
# the snapshot must have none.
if [ "$MODE" = clones ]; then
	mkdir -p /mnt
	mount -t ext4 -o ro,noload /dev/vda /mnt
	step snapshot-mount $?
	(cd /mnt && sha256sum -c -s SHA256SUMS)
	step snapshot-files $?
	[ ! -e /mnt/mine ]
	step snapshot-untouched $?
	umount /mnt
	n=0 # (wait_for uses i)
	for d in vdb vdc vdd vde vdf vdg; do
		[ $n -lt "$(param clones 3)" ] || break
		wait_for "[ -b /dev/$d ]" "$WAIT"
		mount -t ext4 "/dev/$d" /mnt
		step "clone-$n-mount" $?
		(cd /mnt && sha256sum -c -s SHA256SUMS)
		step "clone-$n-files" $?
		[ ! -e /mnt/mine ]
		step "clone-$n-fresh" $?
		yes "clone $n" | head -c 262144 >/mnt/mine
		umount /mnt
		mount -t ext4 "/dev/$d" /mnt
		[ "$(sort -u /mnt/mine)" = "clone $n" ]
		step "clone-$n-mine" $?
		umount /mnt
		step "clone-$n-umount" $?
		n=$((n + 1))
	done
	mark "summary failed=$failed"
	mark "done"
	exit 0
fi

# Pair mode: two disks, one fio job on each, written and verified at the same time.
if [ "$MODE" = pair ]; then
	wait_for '[ -b /dev/vdb ]' "$WAIT"
	step vdb $?
	PAIR="--direct=1 --rw=randwrite --bssplit=4k/80:64k/20 --size=$SIZE --iodepth=$IODEPTH
	 --ioengine=$IOENGINE --verify=crc32c --verify_fatal=1"
	DISKS="--name=vda --filename=/dev/vda --name=vdb --filename=/dev/vdb"
	run_fio fio-pair $PAIR --do_verify=1 $DISKS
	run_fio fio-pair-reverify $PAIR --verify_only $DISKS
	mark "summary failed=$failed"
	mark "done"
	exit 0
fi

# a) Two jobs on disjoint halves, pinned to different vCPUs so blk-mq submits
# on both virtqueues. Options before the first --name are shared: an option
# after a --name only applies to that job. $FIO and $JOBS are split into words
# on purpose.
FIO="--filename=/dev/vda --direct=1 --rw=randwrite --bssplit=4k/80:64k/20
 --size=$SIZE --iodepth=$IODEPTH --ioengine=$IOENGINE
 --verify=crc32c --verify_fatal=1 --group_reporting"
JOBS="--name=q0 --offset=0 --cpus_allowed=0 --name=q1 --offset=$SIZE_B --cpus_allowed=1"
run_fio fio-write-verify $FIO --do_verify=1 $JOBS
# Same job definitions and seeds: re-reads and checks what the first pass wrote.
run_fio fio-read-verify $FIO --verify_only $JOBS
if [ "$RUNTIME" -gt 0 ]; then
	# verify_backlog verifies while writing; a plain runtime cap skips the verify phase.
	run_fio fio-soak $FIO --do_verify=1 --time_based --runtime="$RUNTIME" --verify_backlog=1024 $JOBS
fi

# b) Discard, then report (not judge) whether the range reads as zeroes.
fill "$DISCARD_OFF" "$RANGE_B"
/usr/sbin/blkdiscard -o "$DISCARD_OFF" -l "$RANGE_B" /dev/vda
step discard $?
mark "discard-zeroes $(zeroes "$DISCARD_OFF" "$RANGE_B")"

# Write-zeroes (BLKZEROOUT) must read back as zeroes, unlike discard.
fill "$ZERO_OFF" "$RANGE_B"
/usr/sbin/blkdiscard -z -o "$ZERO_OFF" -l "$RANGE_B" /dev/vda
step write-zeroes $?
[ "$(zeroes "$ZERO_OFF" "$RANGE_B")" = yes ]
step write-zeroes-readback $?

# c) Buffered write, then fsync the block device: plain `sync` only writes back
# a raw block device's page cache, fsync also sends a FLUSH if the device
# reports a write-back cache (flush_requests counts them).
# A device offering CONFIG_WCE (feature bit 11) may start write-through, where
# the guest never sends FLUSH: switch it to write-back (a config-space write).
if [ "$(cut -c12 /sys/block/vda/device/features)" = 1 ] &&
	[ "$(cat /sys/block/vda/queue/write_cache)" = "write through" ]; then
	echo "write back" >/sys/block/vda/cache_type
	step cache-writeback $?
fi
dd if=/dev/urandom of=/tmp/flush.dat bs=$MiB count=$((RANGE_B / MiB)) 2>/dev/null
flushes_before=$(awk '{print $16}' /sys/block/vda/stat)
dd if=/tmp/flush.dat of=/dev/vda bs=$MiB seek=$((FLUSH_OFF / MiB)) 2>/dev/null &&
	sync /dev/vda
rc=$?
step flush $rc "flush_requests=$(($(awk '{print $16}' /sys/block/vda/stat) - flushes_before))"
echo 3 >/proc/sys/vm/drop_caches
[ "$(dd if=/dev/vda bs=$MiB skip=$((FLUSH_OFF / MiB)) count=$((RANGE_B / MiB)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = \
	"$(md5sum </tmp/flush.dat | cut -d' ' -f1)" ]
step flush-readback $?

# d) What the guest saw of the device.
q=/sys/block/vda/queue
mark "sysfs size=$(cat /sys/block/vda/size)"
mark "sysfs logical_block_size=$(cat $q/logical_block_size)"
mark "sysfs mq_queues=$(ls /sys/block/vda/mq | wc -l)"
mark "sysfs discard_max_bytes=$(cat $q/discard_max_bytes)"
mark "sysfs write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)"
mark "sysfs write_cache=$(sed 's/ /-/g' $q/write_cache)"
# Negotiated virtio feature bits, bit 0 first (FLUSH=9 CONFIG_WCE=11 MQ=12 DISCARD=13 WRITE_ZEROES=14).
mark "sysfs virtio_features=$(cat /sys/block/vda/device/features)"
# Completion interrupts per virtqueue: shows whether every queue carried I/O.
awk 'NR == 1 { ncpu = NF }
	$NF ~ /-req\.[0-9]+$/ { n = 0; for (i = 2; i <= ncpu + 1; i++) n += $i; sub(/.*-/, "", $NF); print $NF "=" n }' /proc/interrupts |
	while read -r q; do mark "irq $q"; done

mark "summary failed=$failed"
mark "done"
