#!/usr/bin/env bash
# A Linux guest with a shell, its disk served by pollblk: the README's quick start.
#   tests/guest/try.sh [--socket PATH] [--kvm]
# Builds the test guest once (Debian's kernel, busybox, fio: target/guest) and boots it in
# QEMU with the disk at PATH (default pollblk-data/disk0.sock, what `pollblk` serves) as
# /dev/vda and a shell on this terminal; `poweroff -f` in the guest ends it. QEMU runs with
# accel=tcg (emulation: slow, works on any host); --kvm uses accel=kvm where KVM works.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
socket=pollblk-data/disk0.sock
accel=tcg
while [[ $# -gt 0 ]]; do
	case $1 in
	--socket) socket=$2; shift 2 ;;
	--kvm) accel=kvm; shift ;;
	*) echo "usage: $0 [--socket PATH] [--kvm]" >&2; exit 2 ;;
	esac
done
[[ -S $socket ]] || {
	echo "try: no pollblk socket at $socket (start the daemon first: cargo run --release)" >&2
	exit 1
}
guest=$repo/target/guest
"$here/build-guest.sh" "$guest" >&2
echo "try: booting the guest (accel=$accel); leave it with: poweroff -f" >&2
# shellcheck disable=SC2054 # commas belong to QEMU's option syntax
exec qemu-system-x86_64 -machine "q35,accel=$accel" -cpu max -smp 2 -m 1G \
	-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
	-chardev "socket,id=disk0,path=$socket" \
	-device vhost-user-blk-pci,chardev=disk0,num-queues=2 \
	-nographic -no-reboot \
	-kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio.gz" \
	-append "console=ttyS0 panic=-1 quiet pollblk.mode=shell"
