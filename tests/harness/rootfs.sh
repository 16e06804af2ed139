#!/bin/bash
# Build the Debian 12 root filesystem of the emulated L1 machines that run real
# userspace: python3-bpfcc (bcc 0.26 + LLVM) for the tracer's test, python3 with
# pytest and kvmnote's dependencies for the scenario list in native mode, and
# the few tools the init uses, as an ext4 image for virtio-blk. Made with mmdebstrap (no loop
# mounts: mke2fs -d), cached under $KVMNOTE_CACHE/bpf-rootfs keyed by the
# hash of this script; prints the image's path.
#
#   tests/harness/rootfs.sh [--print]
set -euo pipefail

cache=${KVMNOTE_CACHE:-$HOME/.cache/kvmnote}/bpf-rootfs
mirror=${KVMNOTE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
# essential (dpkg, coreutils, tar...) + these; no apt, no systemd.
packages=python3-bpfcc,xz-utils,gzip,bzip2,busybox,kmod,procps,mount,\
python3-pytest,python3-pyelftools,python3-construct,python3-zstandard,python3-lz4

key=$(sha256sum < "$0" | cut -c1-16)
img=$cache/rootfs-$key.ext4
if [ "${1:-}" = --print ]; then echo "$img"; exit 0; fi
if [ -f "$img" ]; then echo "$img"; exit 0; fi

command -v mmdebstrap >/dev/null || { echo "rootfs.sh: mmdebstrap missing: apt-get install mmdebstrap" >&2; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
[ -f "$img" ] && { echo "$img"; exit 0; }

dir=$cache/dir-$key.tmp
rm -rf "$dir" "$img.tmp"
# Docs, man pages and locales are a third of the tree and never read.
mmdebstrap --variant=essential --include="$packages" \
	--dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	--dpkgopt='path-exclude=/usr/share/info/*' \
	--customize-hook='rm -rf "$1"/var/cache/apt "$1"/var/lib/apt/lists/*' \
	"$suite" "$dir" "$mirror" >&2
mkdir -p "$dir/mnt/in" "$dir/mnt/out"
# The guest's init (kernel command line init=/sbin/kvmnote-init): unpack the
# run's inputs from the tar on /dev/vdb, run their run.sh, tar /mnt/out onto
# the raw disk /dev/vdc for the host to read, reboot (QEMU -no-reboot exits).
cat > "$dir/sbin/kvmnote-init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
echo "kvmnote-init: up $(cut -d' ' -f1 /proc/uptime)s"
tar -xf /dev/vdb -C /mnt/in && sh /mnt/in/run.sh > /mnt/out/run.log 2>&1
echo "kvmnote-init: run.sh exit $? at $(cut -d' ' -f1 /proc/uptime)s"
tar -cf /dev/vdc -C /mnt/out . && sync
echo "kvmnote-init: done"
exec busybox reboot -f
INIT
chmod 755 "$dir/sbin/kvmnote-init"
size_mb=$(( $(du -sm "$dir" | cut -f1) * 5 / 4 + 64 ))
mke2fs -q -t ext4 -L kvmnote-bpf -d "$dir" "$img.tmp" "${size_mb}M" >&2
rm -rf "$dir"
mv "$img.tmp" "$img"
echo "$img"
