"""Run Debian's real QEMU (-accel kvm) with a Linux guest inside our patched kernel (L1,
QEMU TCG -cpu max: nested SVM) and bring back QEMU's own dump and the cores our kernel
wrote. e2e-recipe.md, "A real QEMU inside the emulated machine".

    python tests/acceptance/qemurun.py OUTDIR     # run once by hand; prints the files
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.cpio import BUSYBOX, write_gz  # noqa: E402,F401 (qemurun.BUSYBOX: the test checks it)
from harness.kernel import kernel  # noqa: E402,F401 (qemurun.kernel: bench_qemu_script uses it)
from harness.machines import run_qemu  # noqa: E402
from harness.transfer import blank_disk, untar_disk  # noqa: E402

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


def guest_initramfs(work: Path) -> Path:
    """The L2 guest's initramfs (busybox, the dd workload)."""
    def fill(c):
        c.busybox()
        c.file("init", GUEST_INIT.encode())
    return write_gz(work / "l2-initramfs.gz", fill)


def host_initramfs(work: Path, guest_kernel: Path, guest_initrd: Path,
                   scenarios: tuple[str, ...] = ("paused", "running")) -> Path:
    """The L1 initramfs: busybox, Debian's QEMU with its libraries and firmware, L2."""
    init = HOST_INIT.replace("@MIB@", str(GUEST_MIB)).replace(
        "@SCENARIOS@", "\n".join(f"run {s} {s}" for s in scenarios))

    def fill(c):
        c.busybox()
        c.file("init", init.encode())
        c.program(QEMU, "usr/bin/qemu-system-x86_64")
        c.symlink("bin/qemu-system-x86_64", "/usr/bin/qemu-system-x86_64")
        for d in ("/usr/share/qemu", "/usr/share/seabios"):
            c.copy(d)
        c.copy(guest_kernel, "l2/bzImage")
        c.copy(guest_initrd, "l2/initramfs.gz")
    return write_gz(work / "l1-initramfs.gz", fill)


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
    disk = blank_disk(work / "out.img", 2 << 30)
    t1 = time.monotonic()
    rc, _ = run_qemu(work, host_kernel, host_rd, "", timeout, memory=4096,
                     disks=((disk, "rw"),))
    t_run = time.monotonic() - t1
    console = (work / "console.log").read_text(errors="replace")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    if "tar done" in console:
        untar_disk(disk, out)
    if "tar done" not in console or console.count("guest ready") != len(scenarios):
        raise RuntimeError(f"L1 run failed (rc {rc}); console tail:\n" + console[-3000:]
                           + _logs_tail(out))
    disk.unlink()
    return {"out": out, "console": console, "initramfs_s": t_rd, "l1_run_s": t_run}


# drgn's per-CPU current task and its stack trace, given the guest vmlinux.
DRGN_SCRIPT = r"""
import sys
import drgn
from drgn.helpers.linux.sched import cpu_curr
from drgn.helpers.linux.cpumask import for_each_online_cpu
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.load_debug_info([sys.argv[2]], default=False)
for cpu in for_each_online_cpu(prog):
    task = cpu_curr(prog, cpu)
    print(f"CPU {cpu} comm={task.comm.string_().decode()} pid={task.pid.value_()}")
    for frame in prog.stack_trace(task):
        print(f"  {frame.name or hex(frame.pc)}")
"""


def drgn_traces(vmcore: Path, vmlinux: Path) -> str:
    """drgn's per-CPU current task and stack trace of a vmcore."""
    p = subprocess.run([sys.executable, "-c", DRGN_SCRIPT, str(vmcore), str(vmlinux)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def per_cpu(text: str) -> dict[str, list[str]]:
    """drgn_traces output as {"CPU n comm=...": [frames]}."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("CPU "):
            key = line
            out[key] = []
        else:
            out[key].append(line.strip())
    return out


if __name__ == "__main__":
    w = Path(sys.argv[1])
    r = run(w, kernel("-c", "l1"), kernel("-n", "--base", "guest"))
    print({k: v for k, v in r.items() if k != "console"})
    for line in r["console"].splitlines():
        if "KVMNOTE-L1" in line:
            print(line)
    for p in sorted(r["out"].iterdir()):
        print(p.name, os.path.getsize(p))
