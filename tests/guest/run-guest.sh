#!/usr/bin/env bash
# Boot the test guest (built by build-guest.sh) under QEMU TCG with one
# vhost-user-blk disk served by the back end listening on --socket.
# Exits 0 iff the guest reached "POLLBLK-GUEST: done"; judging the step
# results in the console log is left to the caller.
set -euo pipefail

usage="usage: $0 --socket PATH --guest-dir DIR [--queues N] [--log FILE] [--timeout SECS] [--append 'pollblk.size=16M ...'] [--reconnect]"
die() { echo "run-guest: $*" >&2; exit 2; }

socket='' guest_dir='' queues=2 log='' timeout=300 append='' reconnect=''
while [[ $# -gt 0 ]]; do
	if [[ $1 == --reconnect ]]; then
		# QEMU reconnects to a back end that went away, retrying every second.
		reconnect=',reconnect=1'
		shift
		continue
	fi
	[[ $# -ge 2 ]] || die "$usage"
	case $1 in
	--socket) socket=$2 ;;
	--guest-dir) guest_dir=$2 ;;
	--queues) queues=$2 ;;
	--log) log=$2 ;;
	--timeout) timeout=$2 ;;
	--append) append=$2 ;;
	*) die "$usage" ;;
	esac
	shift 2
done
[[ -n $socket && -n $guest_dir ]] || die "$usage"
[[ -f $guest_dir/vmlinuz && -f $guest_dir/initramfs.cpio.gz ]] || die "no guest in $guest_dir (run build-guest.sh)"
[[ -n $log ]] || log=$(mktemp "${TMPDIR:-/tmp}/pollblk-guest.XXXXXX.log")

# The back end may have just been started: give it time to create its socket.
for _ in $(seq 100); do
	[[ -S $socket ]] && break
	sleep 0.1
done
[[ -S $socket ]] || die "no listening socket at $socket"

# vhost-user needs guest RAM in a shared memfd so the back end can map it.
# panic=-1 plus -no-reboot turns a guest kernel panic into a QEMU exit.
# shellcheck disable=SC2054 # commas belong to QEMU's option syntax
qemu=(
	qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp 2 -m 1G
	-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
	-chardev "socket,id=vu0,path=$socket$reconnect"
	-device "vhost-user-blk-pci,chardev=vu0,num-queues=$queues"
	-nographic -no-reboot
	-kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initramfs.cpio.gz"
	-append "console=ttyS0 panic=-1 quiet $append"
)
start=$SECONDS
set +e
timeout -k 10 "$timeout" "${qemu[@]}" </dev/null 2>&1 | tee "$log"
qemu_rc=${PIPESTATUS[0]}
set -e

# The serial console ends lines with \r\n.
if tr -d '\r' <"$log" | grep -qx 'POLLBLK-GUEST: done'; then
	summary=$(tr -d '\r' <"$log" | grep -m1 '^POLLBLK-GUEST: summary' || true)
	echo "run-guest: guest done in $((SECONDS - start)) s ($summary), log: $log" >&2
	exit 0
fi
[[ $qemu_rc -eq 124 ]] && why="timed out after $timeout s" || why="QEMU exited $qemu_rc"
echo "run-guest: guest did not finish: $why, log: $log" >&2
exit 1
