#!/bin/bash
# Build the Debian 12 root filesystem of the emulated L1 machines that run real
# userspace: python3-bpfcc (bcc 0.26 + LLVM) for the tracer's test, python3 with
# pytest and kvmnote's dependencies for the scenario list in native mode, systemd
# with systemd-coredump, Debian's QEMU and a venv for kvmnote (/opt/kvmnote) for the
# systemd-coredump acceptance, and the few tools the init uses, as an ext4 image for
# virtio-blk. Made with mmdebstrap (no loop mounts: mke2fs -d), cached under
# $KVMNOTE_CACHE/bpf-rootfs keyed by the hash of this script; prints the image's path.
#
# Two ways to boot it, both running the same /sbin/kvmnote-run (inputs from the tar on
# /dev/vdb, run.sh, outputs as a tar on /dev/vdc, then reboot):
#   init=/sbin/kvmnote-init     a shell as PID 1 (bcc, native mode)
#   init=/lib/systemd/systemd kvmnote.run
#                               systemd as PID 1; kvmnote-run.service runs it once
#                               the system is up (journald, systemd-coredump)
#
#   tests/harness/rootfs.sh [--print]
set -euo pipefail

cache=${KVMNOTE_CACHE:-$HOME/.cache/kvmnote}/bpf-rootfs
mirror=${KVMNOTE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
# essential (dpkg, coreutils, tar...) + these; no apt, no udev.
packages=python3-bpfcc,xz-utils,gzip,bzip2,busybox,kmod,procps,mount,\
python3-pytest,python3-pyelftools,python3-construct,python3-zstandard,python3-lz4,\
systemd,systemd-coredump,python3-venv,qemu-system-x86

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
	--customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/kvmnote' \
	--customize-hook='rm -rf "$1"/var/cache/apt "$1"/var/lib/apt/lists/*' \
	"$suite" "$dir" "$mirror" >&2
mkdir -p "$dir/mnt/in" "$dir/mnt/out"
# The run: unpack the inputs from the tar on /dev/vdb, run their run.sh, tar
# /mnt/out onto the raw disk /dev/vdc for the host to read.
cat > "$dir/sbin/kvmnote-run" <<'RUN'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "kvmnote-init: up $(cut -d' ' -f1 /proc/uptime)s"
tar -xf /dev/vdb -C /mnt/in && sh /mnt/in/run.sh > /mnt/out/run.log 2>&1
echo "kvmnote-init: run.sh exit $? at $(cut -d' ' -f1 /proc/uptime)s"
tar -cf /dev/vdc -C /mnt/out . && sync
echo "kvmnote-init: done"
RUN
# The shell init (init=/sbin/kvmnote-init): mounts, the run, reboot (QEMU -no-reboot exits).
cat > "$dir/sbin/kvmnote-init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
/sbin/kvmnote-run
exec busybox reboot -f
INIT
# Under systemd (init=/lib/systemd/systemd kvmnote.run): the same run as a service.
cat > "$dir/etc/systemd/system/kvmnote-run.service" <<'UNIT'
[Unit]
Description=kvmnote test run (inputs /dev/vdb, outputs /dev/vdc), then reboot
ConditionKernelCommandLine=kvmnote.run
After=basic.target systemd-journald.service

[Service]
Type=oneshot
LimitCORE=infinity
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/sbin/kvmnote-run
ExecStopPost=/bin/busybox reboot -f

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$dir/etc/systemd/system/multi-user.target.wants"
ln -s ../kvmnote-run.service "$dir/etc/systemd/system/multi-user.target.wants/"
# Without udev no device unit ever appears: the consoles' gettys would wait 90 s each.
for u in serial-getty@ttyS0.service getty@tty1.service; do
	ln -s /dev/null "$dir/etc/systemd/system/$u"
done
chmod 755 "$dir/sbin/kvmnote-run"  "$dir/sbin/kvmnote-init"
# 1 GiB free for what runs in it (systemd-coredump's cores; the image is sparse).
size_mb=$(( $(du -sm "$dir" | cut -f1) * 5 / 4 + 1024 ))
mke2fs -q -t ext4 -L kvmnote-bpf -d "$dir" "$img.tmp" "${size_mb}M" >&2
rm -rf "$dir"
mv "$img.tmp" "$img"
echo "$img"
