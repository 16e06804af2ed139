#!/bin/bash
# Install everything kvmnote's tests need on a fresh Debian 12 machine (root):
# the kernel source the series applies to, the tool chain to build it, the
# emulators that run nested KVM (QEMU TCG for AMD SVM, Bochs for Intel VMX),
# and a virtualenv in .venv with kvmnote and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
	# the kernel series and its test kernels
	linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev
	cpio xz-utils zstd
	# the emulated machines and what boots in them
	qemu-system-x86 bochs bochsbios vgabios isolinux syslinux-common
	genisoimage busybox-static
	# the Debian rootfs of the emulated L1 machine (bcc tracer, native mode)
	mmdebstrap e2fsprogs
	# kvmnote vmcore acceptance: crash reads a Linux 6.1 guest built from
	# Debian's source (its crash 8.0.2 cannot read 6.12 guests)
	crash linux-source-6.1
	# the Python side; lz4 and jq: reading systemd-coredump's .lz4 cores and the
	# JSON as jq 1.6 sees it; makedumpfile: vmcore --format kdump's dump levels
	python3 python3-venv python3-pip lz4 jq makedumpfile
	# CI's static checks: every shell script, the Vagrantfile (with its provider)
	shellcheck vagrant vagrant-libvirt
	# looking at cores by hand
	gdb elfutils
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
echo "install-deps: ready (.venv, $(.venv/bin/python --version))"
