"""`kvmnote vmcore` against the incumbent converter, QEMU's own scripts/dump-guest-memory.py,
run in gdb on the same QEMU core: time of each and the ratio, measured in one run.

dump-guest-memory.py reads QEMU's RAMBlock list through QEMU's debug symbols. Debian's are
in the debian-debug archive, which this machine may not reach, so QEMU 7.2 (the version
Debian 12 ships) is built here from Debian's source tarball with debug info, cached under
~/.cache/kvmnote/qemu-debug-*. That QEMU runs the L2 guest (GUEST_MIB of RAM) inside our
patched kernel under QEMU TCG, as in tests/acceptance; the guest is running when
kill -SEGV makes the kernel write the core. Then, on this host, from the page cache:

    gdb -batch -ex 'source dump-guest-memory.py' -ex 'dump-guest-memory OUT X86_64' qemu core
    kvmnote vmcore core -o OUT

Each runs REPEAT times, alternating; the best and the median count. Both outputs' guest
RAM is compared byte for byte. Prints figures, asserts nothing.

Run (root): python tests/bench/bench_qemu_script.py
Needs: the acceptance prerequisites, gdb, meson, ninja-build, libglib2.0-dev, libpixman-1-dev, libfdt-dev,
and Debian's qemu_7.2+dfsg.orig.tar.xz in ~/.cache/kvmnote/src (fetched from
deb.debian.org's source pool if missing).
"""

import bz2
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

from elftools.elf.elffile import ELFFile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/acceptance"))
import qemurun  # noqa: E402

CACHE = Path(os.environ.get("KVMNOTE_CACHE", Path.home() / ".cache" / "kvmnote"))
TARBALL = CACHE / "src/qemu_7.2+dfsg.orig.tar.xz"
TARBALL_URL = "http://deb.debian.org/debian/pool/main/q/qemu/qemu_7.2+dfsg.orig.tar.xz"
TARBALL_MD5 = "865ae004abc45245029b6812734365c8"     # from Debian's qemu_7.2+dfsg-7+deb12u18.dsc
CONFIGURE = ["--prefix=/usr", "--firmwarepath=/usr/share/qemu:/usr/share/seabios",  # as Debian's
             "--target-list=x86_64-softmmu", "--enable-kvm", "--enable-debug-info",
             "--disable-docs", "--disable-werror", "--disable-user", "--disable-tools",
             "--disable-guest-agent", "--disable-install-blobs"]
EDK2 = ["edk2-aarch64-code.fd", "edk2-arm-code.fd", "edk2-arm-vars.fd", "edk2-i386-code.fd",
        "edk2-i386-secure-code.fd", "edk2-i386-vars.fd", "edk2-x86_64-code.fd",
        "edk2-x86_64-secure-code.fd"]
GUEST_MIB = 1024
REPEAT = 3
WORK = Path(os.environ.get("KVMNOTE_BENCH_DIR", "/var/tmp/kvmnote-bench-qemu"))


def qemu_debug() -> tuple[Path, Path]:
    """QEMU 7.2 with debug info: (the binary, its source tree), built once and cached."""
    if not TARBALL.exists():
        TARBALL.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(TARBALL_URL, TARBALL)
    if hashlib.md5(TARBALL.read_bytes()).hexdigest() != TARBALL_MD5:
        raise SystemExit(f"{TARBALL}: not Debian's qemu 7.2 tarball (md5 differs)")
    key = hashlib.sha256((TARBALL_MD5 + " ".join(CONFIGURE)).encode()).hexdigest()[:16]
    top = CACHE / f"qemu-debug-{key}"
    binary = top / "build/qemu-system-x86_64"
    src = top / "src"
    if binary.exists():
        return binary, src
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    with tarfile.open(TARBALL) as tar:
        tar.extractall(top, filter="data")
    (next(p for p in top.iterdir() if p.is_dir())).rename(src)
    # Debian's dfsg tarball drops the prebuilt EDK2 images that QEMU's build unpacks;
    # empty stand-ins let it build (the L1 machine gets Debian's firmware, as always).
    for name in EDK2:
        stand_in = src / "pc-bios" / f"{name}.bz2"
        if not stand_in.exists():
            stand_in.write_bytes(bz2.compress(b""))
    build = top / "build"
    build.mkdir()
    log = open(top / "build.log", "w")
    t = time.monotonic()
    for cmd in ([str(src / "configure"), *CONFIGURE], ["ninja", "qemu-system-x86_64"]):
        if subprocess.run(cmd, cwd=build, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"QEMU build failed: {' '.join(cmd)}; see {top / 'build.log'}")
    print(f"built QEMU 7.2 with debug info in {time.monotonic() - t:.0f} s")
    return binary, src


def guest_ram(path: Path) -> dict[int, bytes]:
    """A vmcore's guest RAM as {guest-physical page: bytes} for its non-zero pages."""
    pages: dict[int, bytes] = {}
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            f.seek(seg["p_offset"])
            for off in range(0, seg["p_filesz"], 4096):
                page = f.read(4096)
                if page.count(0) != len(page):
                    pages[seg["p_paddr"] + off] = page
    return pages


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    """Build QEMU, get a core from L1, time both converters, print the figures."""
    if os.geteuid() != 0:
        raise SystemExit("must run as root (the L1 boot needs it)")
    binary, src = qemu_debug()
    core = WORK / "out/running.core"
    if not core.exists():
        qemurun.QEMU, qemurun.GUEST_MIB = str(binary), GUEST_MIB
        qemurun.run(WORK, qemurun.kernel("-c", "l1"), qemurun.kernel("-n", "--base", "guest"),
                    scenarios=("running",))
    print(f"core: {core.stat().st_size >> 20} MiB, a {GUEST_MIB} MiB guest, "
          f"from QEMU 7.2 built with debug info")
    ours, theirs = WORK / "kvmnote.vmcore", WORK / "dump-guest-memory.vmcore"
    script = src / "scripts/dump-guest-memory.py"
    gdb = ["gdb", "-batch", "-nx", "-ex", f"source {script}",
           "-ex", f"dump-guest-memory {theirs} X86_64", str(binary), str(core)]
    kv = [sys.executable, "-m", "kvmnote", "vmcore", "--force", str(core), "-o", str(ours)]
    subprocess.run(["cat", str(core)], stdout=subprocess.DEVNULL, check=True)  # page cache
    times: dict[str, list[float]] = {"gdb": [], "kv": []}
    for _ in range(REPEAT):
        for name, cmd, out in (("gdb", gdb, theirs), ("kv", kv, ours)):
            out.unlink(missing_ok=True)
            os.sync()
            times[name].append(timed(cmd))
    for name, label in (("gdb", "dump-guest-memory.py in gdb"), ("kv", "kvmnote vmcore")):
        print(f"{label:28s} best {min(times[name]):6.2f} s, "
              f"median {statistics.median(times[name]):6.2f} s")
    print(f"speed ratio kvmnote / dump-guest-memory.py: best "
          f"{min(times['gdb']) / min(times['kv']):.1f}x, median "
          f"{statistics.median(times['gdb']) / statistics.median(times['kv']):.1f}x")
    a, b = guest_ram(ours), guest_ram(theirs)
    same = a == b
    print(f"guest RAM: {len(a)} non-zero pages from kvmnote, {len(b)} from "
          f"dump-guest-memory.py, {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
