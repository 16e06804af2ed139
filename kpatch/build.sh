#!/bin/bash
# Apply the kvmnote series to Debian's linux-source-6.12 and build test kernels.
#
#   kpatch/build.sh [-n] [-c CONFIG]... [--base BASE] [--bisect] [--checkpatch]
#   kpatch/build.sh --selftest
#
#   -c CONFIG     build kernel CONFIG (a name under kpatch/configs/ besides
#                 base, e.g. "modules" or "debug"; "base" is the minimal one).
#                 May be given several times; default: base.
#   -n            build the unpatched base kernel instead (no series).
#   --base BASE   the fragment applied first on tinyconfig (default: base);
#                 a standalone fragment such as "guest" is built with
#                 `--base guest` (alone, as `-c guest` is then implied).
#   --bisect      build the base config after every patch of the series.
#   --checkpatch  run scripts/checkpatch.pl --strict on every patch.
#   --print       print the paths the kernels would have, build nothing.
#   --selftest    build the series' KVM selftest (x86_64/coredump_test),
#                 statically linked, and print "selftest PATH" instead.
#
# Nothing is fetched from the network. Results are cached under
# $KVMNOTE_CACHE (default ~/.cache/kvmnote), keyed by the hash of their inputs
# (source tarball, series, config fragments); for each kernel the script
# prints "NAME PATH-TO-bzImage". Modules, when the config has them, are
# installed under the directory of the bzImage (lib/modules/...).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${KVMNOTE_CACHE:-$HOME/.cache/kvmnote}
tarball=${KVMNOTE_LINUX_TARBALL:-/usr/src/linux-source-6.12.tar.xz}
jobs=${KVMNOTE_JOBS:-$(nproc)}
source "$here/BASE"

configs=()
patched=1
bisect=0
checkpatch=0
print_only=0
selftest=0
basecfg=base
while [ $# -gt 0 ]; do
	case "$1" in
	-c) configs+=("$2"); shift 2 ;;
	-n) patched=0; shift ;;
	--base) basecfg=$2; shift 2 ;;
	--bisect) bisect=1; shift ;;
	--checkpatch) checkpatch=1; shift ;;
	--print) print_only=1; shift ;;
	--selftest) selftest=1; shift ;;
	-h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "build.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
done
[ ${#configs[@]} -gt 0 ] || configs=("$basecfg")

die() { echo "build.sh: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

[ -r "$tarball" ] || die "$tarball missing: apt-get install linux-source-6.12"
series=()
kernel_series=()
shopt -s nullglob
for p in "$here"/0*.patch; do
	case "$p" in *0000-cover-letter.patch) continue ;; esac
	series+=("$p")
	# Patches that touch only tools/ or Documentation/ do not change a
	# kernel: they are left out of the kernels' cache key.
	if grep '^diff --git ' "$p" | grep -qv '^diff --git a/\(tools\|Documentation\)/'; then
		kernel_series+=("$p")
	fi
done

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
src_hash=$(printf '%s\n' "$LINUX_DEB_VERSION" "$(stat -c %s "$tarball")" | sha256sum | cut -c1-16)
tree=$cache/tree-$src_hash

# The pristine source as a git repository (commit "base"), made once.
prepare_tree() {
	[ -e "$tree/.kvmnote-ready" ] && return
	rm -rf "$tree" "$tree.tmp"
	mkdir -p "$tree.tmp"
	log "extracting $tarball"
	tar -xf "$tarball" -C "$tree.tmp" --strip-components=1
	git -C "$tree.tmp" init -q
	git -C "$tree.tmp" add -A -f
	git -C "$tree.tmp" -c user.name=kvmnote -c user.email=kvmnote@localhost \
		commit -q -m "Linux $LINUX_DEB_VERSION (Debian linux-source-6.12)"
	git -C "$tree.tmp" tag base
	touch "$tree.tmp/.kvmnote-ready"
	mv "$tree.tmp" "$tree"
}

# Check out base (+ the series when $1 is 1) on branch kvmnote.
checkout() {
	git -C "$tree" am --abort >/dev/null 2>&1 || true
	git -C "$tree" checkout -q -f -B kvmnote base
	git -C "$tree" clean -q -fdx -e .kvmnote-ready
	if [ "$1" = 1 ] && [ ${#series[@]} -gt 0 ]; then
		git -C "$tree" -c user.name=kvmnote -c user.email=kvmnote@localhost \
			am -q --keep-cr "${series[@]}" || die "series does not apply"
	fi
}

# make_config BUILDDIR CONFIG: tinyconfig + base.config (+ CONFIG.config).
make_config() {
	local out=$1 name=$2 frag
	frag=("$here/configs/$basecfg.config")
	[ "$name" = "$basecfg" ] || frag+=("$here/configs/$name.config")
	make -s -C "$tree" O="$out" tinyconfig >/dev/null
	# KVM's options appear only once VIRTUALIZATION is set: merge twice.
	for _ in 1 2; do
		cat "${frag[@]}" | grep -E '^CONFIG_' | while IFS= read -r line; do
			key=${line%%=*}; val=${line#*=}
			case "$val" in
			n) "$tree/scripts/config" --file "$out/.config" -d "${key#CONFIG_}" ;;
			y) "$tree/scripts/config" --file "$out/.config" -e "${key#CONFIG_}" ;;
			m) "$tree/scripts/config" --file "$out/.config" -m "${key#CONFIG_}" ;;
			*) "$tree/scripts/config" --file "$out/.config" --set-val "${key#CONFIG_}" "$val" ;;
			esac
		done
		make -s -C "$tree" O="$out" olddefconfig >/dev/null
	done
	# Every requested option (the last value given for it) must have
	# survived olddefconfig.
	cat "${frag[@]}" | grep -E '^CONFIG_' | tac | awk -F= '!seen[$1]++' |
	while IFS= read -r line; do
		case "$line" in
		*=n) if grep -q "^${line%=n}=[ym]" "$out/.config"; then die "$name: ${line%=n} still set"; fi ;;
		*) if ! grep -qx "$line" "$out/.config"; then die "$name: $line did not stick"; fi ;;
		esac
	done || exit 1
}

# build BUILDDIR: bzImage (+ modules when configured).
build() {
	local out=$1
	make -s -C "$tree" O="$out" -j"$jobs" bzImage >&2
	if grep -q '^CONFIG_MODULES=y' "$out/.config"; then
		make -s -C "$tree" O="$out" -j"$jobs" modules >&2
	fi
}

result_dir() {
	local name=$1 h inputs=()
	[ "$patched" = 1 ] && inputs=("${kernel_series[@]}")
	h=$(hash_of "$here/configs/$basecfg.config" "$here/configs/$name.config" "$here/build.sh" \
		<(echo "$src_hash $patched") "${inputs[@]}")
	echo "$cache/kernel/$([ "$patched" = 1 ] && echo patched || echo unpatched)-$name-$h"
}

# The KVM selftest of the series, statically linked so that it runs in the
# test machines' busybox initramfs; keyed by the whole series.
if [ "$selftest" = 1 ]; then
	res=$cache/selftest/coredump_test-$(hash_of "$here/build.sh" <(echo "$src_hash") "${series[@]}")
	if [ "$print_only" = 0 ] && [ ! -x "$res" ]; then
		mkdir -p "$cache/selftest"
		exec 9>"$cache/.build.lock"
		flock 9
		prepare_tree
		checkout 1
		sdir=$cache/build-selftest
		rm -rf "$sdir"
		log "building the KVM selftest in $sdir"
		make -s -C "$tree" O="$sdir/hdr" INSTALL_HDR_PATH="$sdir/hdr/usr" \
			headers_install >&2
		make -s -C "$tree/tools/testing/selftests/kvm" OUTPUT="$sdir/out" \
			KHDR_INCLUDES="-isystem $sdir/hdr/usr/include" \
			LDFLAGS="-static -pthread" "$sdir/out/x86_64/coredump_test" >&2 ||
			die "the KVM selftest does not build"
		cp "$sdir/out/x86_64/coredump_test" "$res.tmp"
		mv "$res.tmp" "$res"
	fi
	echo "selftest $res"
	exit 0
fi

if [ "$print_only" = 1 ]; then
	for name in "${configs[@]}"; do
		echo "$name $(result_dir "$name")/bzImage"
	done
	exit 0
fi

# Nothing to do when every result is cached: don't queue behind a build.
if [ "$checkpatch" = 0 ] && [ "$bisect" = 0 ]; then
	cached=1
	for name in "${configs[@]}"; do
		[ -f "$(result_dir "$name")/bzImage" ] || cached=0
	done
	if [ "$cached" = 1 ]; then
		for name in "${configs[@]}"; do
			echo "$name $(result_dir "$name")/bzImage"
		done
		exit 0
	fi
fi

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
prepare_tree

if [ "$checkpatch" = 1 ]; then
	fail=0
	for p in "${series[@]}"; do
		# Ignored: FILE_PATH_CHANGES (new files fall under existing
		# MAINTAINERS entries), OPEN_ENDED_LINE and PARENTHESIS_ALIGNMENT
		# (TRACE_EVENT() macro style); see the cover letter.
		if ! out=$("$tree/scripts/checkpatch.pl" --strict --no-tree -q \
			--ignore FILE_PATH_CHANGES,OPEN_ENDED_LINE,PARENTHESIS_ALIGNMENT \
			"$p" 2>&1); then
			echo "$out" >&2
			fail=1
		fi
		echo "checkpatch: $(basename "$p"): ${out:-clean}" | head -3
	done
	[ "$fail" = 0 ] || die "checkpatch --strict found problems"
fi

if [ "$bisect" = 1 ]; then
	checkout 1
	# The base config's build directory: builds after the last patch leave
	# it ready for the patched base kernel.
	bdir=$cache/build-base
	n=$(git -C "$tree" rev-list --count base..kvmnote)
	[ "$n" -gt 0 ] || die "no patches to bisect"
	mkdir -p "$bdir"
	make_config "$bdir" base
	for c in $(git -C "$tree" rev-list --reverse base..kvmnote); do
		git -C "$tree" checkout -q "$c"
		subject=$(git -C "$tree" log -1 --format=%s "$c")
		log "bisect build: $subject"
		make -s -C "$tree" O="$bdir" olddefconfig >/dev/null
		build "$bdir" || die "build failed at: $subject"
		echo "bisect: builds: $subject"
	done
fi

for name in "${configs[@]}"; do
	[ -f "$here/configs/$name.config" ] || die "no config kpatch/configs/$name.config"
	res=$(result_dir "$name")
	if [ ! -f "$res/bzImage" ]; then
		checkout "$patched"
		# One build directory per config, patched or not: switching
		# rebuilds only what the series touches.
		bdir=$cache/build-$name
		mkdir -p "$bdir"
		make_config "$bdir" "$name"
		log "building $name ($([ "$patched" = 1 ] && echo patched || echo unpatched)) in $bdir"
		build "$bdir"
		rm -rf "$res.tmp"
		mkdir -p "$res.tmp"
		cp "$bdir/arch/x86/boot/bzImage" "$bdir/.config" "$res.tmp/"
		# Debug-info kernels keep their vmlinux (for drgn, crash, gdb).
		if grep -q '^CONFIG_DEBUG_INFO=y' "$bdir/.config"; then
			cp "$bdir/vmlinux" "$res.tmp/"
		fi
		if grep -q '^CONFIG_MODULES=y' "$bdir/.config"; then
			make -s -C "$tree" O="$bdir" INSTALL_MOD_PATH="$res.tmp" INSTALL_MOD_STRIP=1 \
				modules_install >&2
		fi
		rm -rf "$res"
		mv "$res.tmp" "$res"
	fi
	echo "$name $res/bzImage"
done
