#!/usr/bin/env bash
# Build the pollblk test guest into OUTDIR:
#   OUTDIR/vmlinuz            Debian's linux-image-amd64 kernel
#   OUTDIR/initramfs.cpio.gz  busybox + fio + virtio-blk and ext4 modules + guest-init.sh as /init
#   OUTDIR/kernel-version
# Re-running is cheap: nothing is rebuilt while OUTDIR/stamp matches the inputs.
set -euo pipefail

usage="usage: $0 OUTDIR"
[[ $# -eq 1 ]] || { echo "$usage" >&2; exit 2; }
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "build-guest: $*" >&2; exit 1; }

# Host tools: the guest's userland is copied from the host.
packages=(qemu-system-x86 fio busybox-static cpio xz-utils)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
	[[ $EUID -eq 0 ]] || die "missing packages: ${missing[*]} (run: apt-get install ${missing[*]})"
	echo "build-guest: installing ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi

# The stamp leaves out the kernel version on purpose: a Debian kernel update
# should not force a 70 MB download while OUTDIR is otherwise current.
stamp=$( {
	cat "$here/build-guest.sh" "$here/guest-init.sh"
	dpkg-query -W fio busybox-static util-linux libc6
} | sha256sum | cut -d' ' -f1)
if [[ -f $out/stamp && $(cat "$out/stamp") == "$stamp" ]]; then
	echo "build-guest: $out is up to date" >&2
	exit 0
fi

# linux-image-amd64 is a metapackage; the kernel lives in the versioned package it depends on.
kpkg=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[[ -n $kpkg ]] || die "cannot resolve linux-image-amd64 (apt-get update?)"

mkdir -p "$out/cache"
work=$out/work
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# Kernel package: downloaded once into the cache, unpacked, never installed.
deb=$(compgen -G "$out/cache/${kpkg}_*.deb" | head -n 1 || true)
if [[ -z $deb ]]; then
	(cd "$out/cache" && apt-get download "$kpkg" >&2)
	deb=$(compgen -G "$out/cache/${kpkg}_*.deb" | head -n 1) || die "apt-get download $kpkg produced no .deb"
fi
dpkg -x "$deb" "$work/pkg"
kver=$(basename "$(compgen -G "$work/pkg/boot/vmlinuz-*")")
kver=${kver#vmlinuz-}
moddir=$work/pkg/lib/modules/$kver

# The package ships no modules.dep (its postinst runs depmod), so generate it.
# busybox depmod reads .ko.xz too.
/bin/busybox depmod -b "$work/pkg" "$kver"

# modname PATH: kernel/drivers/virtio/virtio_pci.ko.xz -> virtio_pci (in REPLY).
modname() {
	REPLY=${1##*/}
	REPLY=${REPLY%%.ko*}
	REPLY=${REPLY//-/_}
}
declare -A mod_path mod_deps builtin
while IFS= read -r line; do
	modname "${line%%:*}"
	mod_path[$REPLY]=${line%%:*}
	mod_deps[$REPLY]=${line#*:}
done <"$moddir/modules.dep"
while IFS= read -r line; do
	modname "$line"
	builtin[$REPLY]=1
done <"$moddir/modules.builtin"

# Depth-first over modules.dep: dependencies land in load_order before their users.
load_order=()
declare -A seen
visit() {
	local name=$1 dep
	[[ -z ${seen[$name]:-} ]] || return 0
	seen[$name]=1
	if [[ -z ${mod_path[$name]:-} ]]; then
		[[ -n ${builtin[$name]:-} ]] || die "module $name not found in $kver"
		return 0
	fi
	for dep in ${mod_deps[$name]}; do
		modname "$dep"
		visit "$REPLY"
	done
	load_order+=("$name")
}
# ext4 (and the crc32c its checksums ask the crypto API for): the clones test mounts
# file systems.
for m in virtio virtio_ring virtio_pci virtio_blk crc32c_generic ext4; do
	visit "$m"
done

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
for name in "${load_order[@]}"; do
	src=$moddir/${mod_path[$name]}
	case $src in
	*.xz) xz -dc "$src" ;; # newer Debian kernels compress modules
	*) cat "$src" ;;
	esac >"$root/lib/modules/$name.ko"
done
printf '%s\n' "${load_order[@]}" >"$root/lib/modules/load-order"

# Busybox (static) provides the shell and all small tools.
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
	[[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done

# copy_with_libs BINARY: the binary plus every library and the loader that ldd
# names, at the same paths, so the guest's ld.so finds them without a cache.
copy_with_libs() {
	local f
	for f in "$1" $(ldd "$1" | grep -o '/[^ ]*'); do
		mkdir -p "$root${f%/*}"
		cp -L "$f" "$root$f"
	done
}
copy_with_libs /usr/bin/fio
# util-linux blkdiscard: busybox's lacks -z (BLKZEROOUT). /init calls it by full
# path because busybox sh runs its own applets ahead of PATH.
copy_with_libs /usr/sbin/blkdiscard

install -m 0755 "$here/guest-init.sh" "$root/init"

# gzip -1: 2 s instead of 5 s for -6, and only 3 MB bigger (of ~36 MB).
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$work/initramfs.cpio.gz"

mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
cp "$work/pkg/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$kver" >"$out/kernel-version"
echo "$stamp" >"$out/stamp"
echo "build-guest: kernel $kver, modules: ${load_order[*]}, initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1)" >&2
