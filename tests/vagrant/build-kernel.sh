#!/bin/bash
# Vagrant provisioning, step 1 (as root, in the box, from /vagrant): the test
# dependencies, and the patched kernel built as Debian packages from Debian's
# own 6.12 source and configuration (linux-source-6.12, linux-config-6.12) plus
# kpatch/'s series, without debug info, then installed and made GRUB's default.
# The build runs on the box's second disk (the root disk of the box is too
# small for a distribution kernel build).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
work=/var/tmp/kvmnote
export DEBIAN_FRONTEND=noninteractive

# The second disk (Vagrantfile: lv.storage) holds the build and the caches.
disk=/dev/vdb
if ! mountpoint -q "$work"; then
	blkid "$disk" >/dev/null 2>&1 || mkfs.ext4 -q -L kvmnote "$disk"
	mkdir -p "$work"
	grep -q "LABEL=kvmnote" /etc/fstab || echo "LABEL=kvmnote $work ext4 defaults 0 2" >> /etc/fstab
	mount "$work"
fi

bash tests/install-deps.sh
apt-get install -y -qq --no-install-recommends linux-config-6.12 git patch rsync kmod \
	dpkg-dev debhelper-compat >/dev/null

src=$work/linux
rm -rf "$src"
mkdir -p "$src"
tar -xf /usr/src/linux-source-6.12.tar.xz -C "$src" --strip-components=1
for p in "$repo"/kpatch/0*.patch; do
	case "$p" in *0000-cover-letter.patch) continue ;; esac
	patch -s -p1 -d "$src" < "$p"
done

# Debian's configuration, the series' option, and no debug info (Debian's
# -dbg package alone would not fit the disk, and nothing here reads it).
xzcat /usr/src/linux-config-6.12/config.amd64_none_amd64.xz > "$src/.config"
cfg() { "$src/scripts/config" --file "$src/.config" "$@"; }
cfg -e KVM_COREDUMP -d DEBUG_INFO -d DEBUG_INFO_DWARF5 -d DEBUG_INFO_DWARF4 \
	-d DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT -e DEBUG_INFO_NONE -d DEBUG_INFO_BTF \
	--set-str SYSTEM_TRUSTED_KEYS "" --set-str SYSTEM_REVOCATION_KEYS "" \
	-d MODULE_SIG_ALL --set-str MODULE_SIG_KEY "" --set-str LOCALVERSION ""
make -s -C "$src" olddefconfig
grep -q '^CONFIG_KVM_COREDUMP=y' "$src/.config" || {
	echo "build-kernel: CONFIG_KVM_COREDUMP did not stick: is the series applied?" >&2
	exit 1
}
make -s -C "$src" -j"$(nproc)" bindeb-pkg LOCALVERSION=-kvmnote
release=$(make -s -C "$src" kernelrelease LOCALVERSION=-kvmnote)
dpkg -i "$work"/linux-image-"$release"_*.deb

# GRUB boots exactly this kernel next time (by its menu entry id, not by order),
# with the box configured as a host that wants KVM notes: coredump_filter bit 9
# (the series' v2 policy; harness/cmdline.py has the same for the emulated L1).
uuid=$(grub-probe --target=fs_uuid /)
sed -i -e '/^GRUB_DEFAULT=/d' -e '/^GRUB_CMDLINE_LINUX=.*kvmnote/d' /etc/default/grub
{
	echo "GRUB_DEFAULT=\"gnulinux-advanced-$uuid>gnulinux-$release-advanced-$uuid\""
	echo 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX coredump_filter=0x233" # kvmnote'
} >> /etc/default/grub
update-grub
echo "$release" > "$work/kernelrelease"
echo "build-kernel: installed $release; rebooting into it"
