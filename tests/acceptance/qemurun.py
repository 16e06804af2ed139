"""Run Debian's real QEMU (-accel kvm) with a Linux guest inside our patched kernel (L1,
QEMU TCG -cpu max: nested SVM) and bring back QEMU's own dump and the cores our kernel
wrote. e2e-recipe.md, "A real QEMU inside the emulated machine".

    python tests/acceptance/qemurun.py OUTDIR     # run once by hand; prints the files
"""

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testlib import L1_TSC  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "/bin/busybox"
QEMU = "/usr/bin/qemu-system-x86_64"
GUEST_MIB = 128

# L2: one CPU runs dd (reading /dev/zero: in the kernel, clear_user), the other idles.
GUEST_INIT = """#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
taskset 2 dd if=/dev/zero of=/dev/null bs=64k &
sleep 1
echo "KVMNOTE-GUEST-READY vmcoreinfo=$(cat /sys/kernel/vmcoreinfo 2>&1)" > /dev/ttyS0
while :; do sleep 1000; done
"""

# L1: for each scenario start QEMU, wait for the guest, (paused: QMP stop and QEMU's
# dump-guest-memory), kill -SEGV; then tar everything onto /dev/vda.
HOST_INIT = r"""#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=3g tmp /tmp
mkdir -p /tmp/out; ulimit -c unlimited
echo /tmp/core.%p > /proc/sys/kernel/core_pattern
log() { echo "KVMNOTE-L1 $(cut -d' ' -f1 /proc/uptime) $*"; }
qmp() {  # send one command, wait for its "return" (or "error")
    echo "$1" >&3
    while read -r line <&4; do
        echo "$line" >> /tmp/out/$2.qmp.log
        case "$line" in *'"return"'*|*'"error"'*) break ;; esac
    done
}
start() {  # $1 = scenario name: start QEMU and its QMP session, wait for the guest
    rm -f /tmp/qmp.in /tmp/qmp.out /tmp/out/$1.guest.log; mkfifo /tmp/qmp.in /tmp/qmp.out
    qemu-system-x86_64 -accel kvm -cpu host -machine pc,dump-guest-core=on \
        -smp 2,sockets=2,cores=1,threads=1 -m @MIB@ -nodefaults -display none -vga none \
        -no-reboot -serial file:/tmp/out/$1.guest.log -chardev pipe,id=qmp,path=/tmp/qmp \
        -mon chardev=qmp,mode=control -device vmcoreinfo -kernel /l2/bzImage \
        -initrd /l2/initramfs.gz -append "console=ttyS0 panic=-1 \
qemu_fw_cfg.ioport=12@0x510:0:1:4" 2> /tmp/out/$1.qemu.err &
    qpid=$!
    exec 3>/tmp/qmp.in 4</tmp/qmp.out
    read -r greeting <&4
    qmp '{"execute":"qmp_capabilities"}' $1
    log "$1: qemu $qpid started"
    for i in $(seq 300); do
        grep -q KVMNOTE-GUEST-READY /tmp/out/$1.guest.log 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
run() {  # $1 = scenario name, $2 = paused|running
    # QEMU reporting "running" with a guest that never prints was L1's failed TSC
    # calibration (tests/testlib.py, L1_TSC); the retries stay for any other slow start.
    for attempt in 1 2 3; do
        start $1 && break
        qmp '{"execute":"query-status"}' $1
        log "$1: guest NOT ready after 30 s (attempt $attempt): $(tail -1 /tmp/out/$1.qmp.log)"
        kill -9 $qpid; wait $qpid; exec 3>&- 4<&-
    done
    grep -q KVMNOTE-GUEST-READY /tmp/out/$1.guest.log && log "$1: guest ready" || return
    sleep 2
    if [ "$2" = paused ]; then
        qmp '{"execute":"stop"}' $1
        log "$1: stopped"
        qmp '{"execute":"dump-guest-memory","arguments":{"paging":false,'\
'"protocol":"file:/tmp/out/'$1'.qemu-dump"}}' $1
        log "$1: dump-guest-memory done"
    fi
    kill -SEGV $qpid; wait $qpid
    exec 3>&- 4<&-
    mv /tmp/core.* /tmp/out/$1.core
    log "$1: core written ($(wc -c < /tmp/out/$1.core) bytes)"
}
@SCENARIOS@
cd /tmp/out && tar cf /dev/vda . && sync
log "tar done"
reboot -f
"""


class Cpio:
    """A newc cpio archive of a directory tree made with the cpio tool."""

    @staticmethod
    def pack(tree: Path, out: Path) -> None:
        """gzip -1 of `find tree | cpio -o -H newc`."""
        with open(out, "wb") as f:
            find = subprocess.Popen(["find", "."], cwd=tree, stdout=subprocess.PIPE)
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                                    stdin=find.stdout, stdout=subprocess.PIPE)
            subprocess.run(["gzip", "-1"], stdin=cpio.stdout, stdout=f, check=True)
            if find.wait() or cpio.wait():
                raise RuntimeError("cpio failed")


def _busybox_tree(root: Path, init: str) -> None:
    """A busybox-static root with `init` as /init."""
    for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    for applet in subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split():
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)


def guest_initramfs(work: Path) -> Path:
    """The L2 guest's initramfs (busybox, the dd workload)."""
    tree = work / "l2-root"
    shutil.rmtree(tree, ignore_errors=True)
    _busybox_tree(tree, GUEST_INIT)
    out = work / "l2-initramfs.gz"
    Cpio.pack(tree, out)
    return out


def host_initramfs(work: Path, guest_kernel: Path, guest_initrd: Path,
                   scenarios: tuple[str, ...] = ("paused", "running")) -> Path:
    """The L1 initramfs: busybox, Debian's QEMU with its libraries and firmware, L2."""
    tree = work / "l1-root"
    shutil.rmtree(tree, ignore_errors=True)
    init = HOST_INIT.replace("@MIB@", str(GUEST_MIB))
    _busybox_tree(tree, init.replace("@SCENARIOS@", "\n".join(f"run {s} {s}" for s in scenarios)))
    (tree / "usr/bin").mkdir(parents=True)
    shutil.copy(QEMU, tree / "usr/bin")
    (tree / "bin/qemu-system-x86_64").symlink_to("/usr/bin/qemu-system-x86_64")
    ldd = subprocess.run(["ldd", QEMU], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            dest = tree / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, dest)  # follows symlinks
    for d in ("/usr/share/qemu", "/usr/share/seabios"):
        shutil.copytree(d, tree / d.lstrip("/"), symlinks=True)
    (tree / "l2").mkdir()
    shutil.copy(guest_kernel, tree / "l2/bzImage")
    shutil.copy(guest_initrd, tree / "l2/initramfs.gz")
    for lib in ("lib", "lib64"):  # merged-/usr layout of Debian
        if (tree / "usr" / lib).exists() and not (tree / lib).exists():
            (tree / lib).symlink_to(f"usr/{lib}")
    out = work / "l1-initramfs.gz"
    Cpio.pack(tree, out)
    return out


def kernel(*args: str, env: dict[str, str] | None = None) -> Path:
    """The bzImage kpatch/build.sh makes for `args` (cached: found without its lock)."""
    build = [str(ROOT / "kpatch/build.sh"), *args]
    path = Path(subprocess.run(build + ["--print"], capture_output=True, text=True,
                               check=True, env=env).stdout.split()[-1])
    if not path.exists():
        subprocess.run(build, check=True, env=env, stdout=subprocess.DEVNULL)
    return path


def _logs_tail(out: Path) -> str:
    """The last lines of every L2 console and QEMU stderr that came back, for a failure."""
    text = ""
    for p in sorted(out.glob("*.guest.log")) + sorted(out.glob("*.qemu.err")):
        tail = p.read_text(errors="replace").splitlines()[-15:]
        text += f"\n--- {p.name} (last {len(tail)} lines)\n" + "\n".join(tail)
    return text


def run(work: Path, host_kernel: Path, guest_kernel: Path, timeout: float = 900,
        scenarios: tuple[str, ...] = ("paused", "running")) -> dict:
    """Boot L1 once (all `scenarios`); return paths and timings of what came out."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    host_rd = host_initramfs(work, guest_kernel, guest_initramfs(work), scenarios)
    t_rd = time.monotonic() - t0
    disk = work / "out.img"
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(2 << 30)
    cmd = ["timeout", str(int(timeout)), "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max",
           "-smp", "2,sockets=2,cores=1,threads=1", "-m", "4096", "-nographic", "-no-reboot",
           "-kernel", str(host_kernel), "-initrd", str(host_rd),
           "-drive", f"file={disk},format=raw,if=virtio",
           "-append", "console=ttyS0 panic=-1 " + L1_TSC]
    t1 = time.monotonic()
    with open(work / "l1-console.log", "wb") as log:
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    t_run = time.monotonic() - t1
    console = (work / "l1-console.log").read_text(errors="replace")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    if "tar done" in console:
        with tarfile.open(disk) as tar:
            tar.extractall(out, filter="data")
    if "tar done" not in console or console.count("guest ready") != len(scenarios):
        raise RuntimeError(f"L1 run failed (rc {rc}); console tail:\n" + console[-3000:]
                           + _logs_tail(out))
    disk.unlink()
    return {"out": out, "console": console, "initramfs_s": t_rd, "l1_run_s": t_run}


if __name__ == "__main__":
    w = Path(sys.argv[1])
    r = run(w, kernel("-c", "l1"), kernel("-n", "--base", "guest"))
    print({k: v for k, v in r.items() if k != "console"})
    for line in r["console"].splitlines():
        if "KVMNOTE-L1" in line:
            print(line)
    for p in sorted(r["out"].iterdir()):
        print(p.name, os.path.getsize(p))
