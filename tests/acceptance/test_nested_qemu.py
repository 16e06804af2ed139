"""A crashed QEMU whose guest runs its own KVM (issue 11): the core must say a vCPU was in
guest mode, and `kvmnote vmcore` must give drgn the guest kernel as it was, not the
nested guest's registers dressed up as the kernel's.

Levels as the note names them: L1 is the Linux guest QEMU runs, L2 the nested guest L1's
KVM runs. One boot of our patched kernel (QEMU TCG -cpu max, nested SVM; the kernel
command line of harness/cmdline.py, coredump_filter=0x233) on the harness's Debian root
filesystem with a shell as init. Inside, Debian's QEMU (-accel kvm -cpu host, -machine
dump-guest-core=on) boots L1: the acceptance tests' 6.12 guest kernel (kvm_amd built in,
kpatch/configs/guest.config) with the test VMM (tests/vmm, static) in its initramfs,
`vmm --halt 0 --spin 1 --crash none`: one long-mode vCPU, L2, spinning in `jmp .` at
0x1103 (harness/expected.py), and the VMM waits. L2 spins for SPIN_S seconds, with the
kvm_nested_vmenter and kvm_nested_vmexit_inject tracepoints of our kernel counting L1's
VMRUNs and the #VMEXITs to L1; then QEMU is killed with SIGSEGV. Back on the host:

- `kvmnote read` of QEMU's core: one vCPU in guest mode, its registers L2's (the spinner's
  RIP and RBX), and L1's registers beside them;
- `kvmnote vmcore` of the core (the default level: L1's state): drgn, given the guest
  vmlinux, unwinds the CPU that ran the VMM through KVM's vcpu-run path (the frames of
  VCPU_RUN_FRAMES); the other CPU idles (do_idle).

With note format 1.1 (kernel series v2: no L1 state) the vCPU note holds L2's registers
only, and `kvmnote vmcore` hands them to drgn as if they were the kernel's: seen twice on
v2, the vCPU in guest mode (the other halted in the idle loop), drgn's "CPU 1 comm=vmm"
unwinding to the single frame ['0x1103'] (L2's RIP), so
test_drgn_unwinds_the_guest_kernel_in_kvm fails, and test_kvmnote_read_shows_both_levels
with it (no L1 registers); the other two pass.

On series v3 (format 1.2) with the reader of branch py11 (L1's state by default), seen
once: L1's RIP is __svm_vcpu_run+0xa0, right after `vmrun`, equal to the tracepoint's,
and its RSP L1's stack; drgn still gave the single frame ['__svm_vcpu_run']. ORC's CFA
there is RBP + 16 (__svm_vcpu_run set up a frame pointer, then loaded L2's RBP before
VMRUN), and the RBP of L1's state is L2's, as VMRUN left it. kvmnote vmcore now puts L1's
frame pointer into RBP (nested.l1_frame_pointer: found at RSP + 0x40, below the return
address of svm_vcpu_enter_exit's call), and drgn gives the whole path: __svm_vcpu_run
svm_vcpu_enter_exit svm_vcpu_run vcpu_enter_guest vcpu_run kvm_arch_vcpu_ioctl_run
kvm_vcpu_ioctl vfs_ioctl __do_sys_ioctl ... do_syscall_64 entry_SYSCALL_64. (QEMU's -cpu
max has LA57: L1 runs with 5-level paging, its stacks at 0xff63...)

The vCPU was in guest mode at the crash in each of the three runs so far (KVM's
tracepoints: about 240 nested entries a second, one per tick of L1, L2 spinning between).

Cost on this machine (2 shared cores): 27-43 s warm (the emulated machine's run 25-40 s:
boot, L1 ready after 8-15 s, SPIN_S, the core; kvmnote vmcore and drgn under 1 s each). Cold it
needs what test_vmcore_qemu.py and test_systemd_coredump.py need too (the L1 kernel, the
root filesystem, the guest kernel: 353 s to build with KVM, on the loaded machine).

    CI=true .venv/bin/python -m pytest tests/acceptance/test_nested_qemu.py -s
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO, expected as E
from harness.cpio import write_gz
from harness.kernel import kernel
from harness.kvmnote_read import read as kvmnote_read
from harness.machines import qemu_available, run_qemu
from harness.rootfs import debian_rootfs
from harness.transfer import blank_disk, tar_disk, untar_disk
from harness.vmm import build_vmm
from testlib import need

sys.path.insert(0, str(Path(__file__).parent))
import qemurun  # noqa: E402  (L1's memory size, drgn)
from qemurun import drgn_traces, per_cpu  # noqa: E402

pytestmark = pytest.mark.acceptance
WORK = Path(os.environ.get("KVMNOTE_ACCEPTANCE_DIR", "/tmp/kvmnote-acceptance")) / "nested"
CMDLINE = "root=/dev/vda rw rootfstype=ext4 init=/sbin/kvmnote-init"
SPIN_S = 5
VMM_ARGS = "--halt 0 --spin 1 --crash none"
# L1's kernel in its vcpu-run path (arch/x86/kvm/x86.c, svm/svm.c); inlined ones count,
# drgn names inline frames too.
VCPU_RUN_FRAMES = ("kvm_arch_vcpu_ioctl_run", "vcpu_run", "vcpu_enter_guest", "svm_vcpu_run")
TIMINGS: dict[str, float] = {}

# L1's init: the VMM in the background, its report, then the line the host waits for.
GUEST_INIT = """#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
/vmm @ARGS@ --report /report.json > /vmm.out 2>&1 &
for i in $(seq 600); do grep -q ']}' /report.json 2>/dev/null && break; sleep 0.1; done
echo "vmm $!: $(cat /vmm.out) report: $(tr -d '\\n' < /report.json | head -c 200)" > /dev/ttyS0
grep -q '"timed_out": false' /report.json && echo KVMNOTE-NESTED-READY > /dev/ttyS0
while :; do sleep 1000; done
"""

RUN_SH = r"""
O=/mnt/out I=/mnt/in T=/sys/kernel/tracing
log() { echo "KVMNOTE-NESTED $(cut -d' ' -f1 /proc/uptime) $*" > /dev/console; }
ulimit -c unlimited
echo $O/core.%p > /proc/sys/kernel/core_pattern
qemu-system-x86_64 -accel kvm -cpu host -machine pc,dump-guest-core=on \
    -smp 2,sockets=2,cores=1,threads=1 -m @MIB@ -nodefaults -display none -vga none \
    -no-reboot -serial file:$O/guest.log -device vmcoreinfo \
    -kernel $I/l1/bzImage -initrd $I/l1/initramfs.gz \
    -append "console=ttyS0 panic=-1 qemu_fw_cfg.ioport=12@0x510:0:1:4" 2> $O/qemu.err &
pid=$!
echo $pid > $O/qemu.pid
log "qemu $pid started"
for i in $(seq 1800); do
    grep -q KVMNOTE-NESTED-READY $O/guest.log 2>/dev/null && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
grep -q KVMNOTE-NESTED-READY $O/guest.log || { log "L1 not ready"; kill -9 $pid; exit 1; }
log "L1 ready, its VMM running L2"
echo 1 > $T/events/kvm/kvm_nested_vmenter/enable
echo 1 > $T/events/kvm/kvm_nested_vmexit_inject/enable
echo > $T/trace
sleep @SPIN@
kill -SEGV $pid; wait $pid; echo $? > $O/qemu.rc
echo 0 > $T/events/kvm/enable
for e in kvm_nested_vmenter kvm_nested_vmexit_inject; do
    echo "$e $(grep -c " $e:" $T/trace)" >> $O/nested-events.txt
done
tail -n 20 $T/trace > $O/trace-tail.txt
log "qemu killed with SIGSEGV after @SPIN@ s of L2: $(tr '\n' ' ' < $O/nested-events.txt)"
"""


def guest_initramfs(work: Path, vmm: Path) -> Path:
    """L1's initramfs: busybox, the static test VMM, GUEST_INIT."""
    def fill(c):
        c.busybox()
        c.file("init", GUEST_INIT.replace("@ARGS@", VMM_ARGS).encode())
        c.file("vmm", vmm.read_bytes())
    return write_gz(work / "l1-initramfs.gz", fill)


def timed(what, fn):
    t = time.monotonic()
    r = fn()
    TIMINGS[what] = round(time.monotonic() - t, 1)
    return r


@pytest.fixture(scope="module")
def run() -> dict:
    need(qemu_available(), "qemu-system-x86_64 not installed (apt install qemu-system-x86)")
    need(os.geteuid() == 0, "not root (mmdebstrap's root mode and the kernel build cache)")
    need(Path("/usr/src/linux-source-6.12.tar.xz").exists(),
         "linux-source-6.12 not installed (apt install linux-source-6.12)")
    need(shutil.which("mmdebstrap") is not None, "mmdebstrap not installed (apt install mmdebstrap)")
    need(shutil.which("gcc") is not None, "gcc not installed (the test VMM is built static)")
    try:
        import drgn  # noqa: F401
    except ImportError:
        need(False, "drgn not installed (pip install drgn)")
    t0 = time.monotonic()
    host = timed("host kernel", lambda: kernel("-c", "l1"))
    guest = timed("guest kernel", lambda: kernel("-n", "--base", "guest"))
    need((guest.parent / "vmlinux").exists(), f"no vmlinux beside {guest}")
    rootfs = timed("rootfs", debian_rootfs)
    vmm = build_vmm()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    run_sh = RUN_SH.replace("@MIB@", str(qemurun.GUEST_MIB)).replace("@SPIN@", str(SPIN_S))
    tar_disk(WORK / "in.tar", {"run.sh": run_sh.encode(), "l1/bzImage": guest,
                               "l1/initramfs.gz": guest_initramfs(WORK, vmm)})
    blank_disk(WORK / "out.img", 1 << 30)
    rc, timed_out = timed("emulated machine run", lambda: run_qemu(
        WORK, host, None, CMDLINE, 1200, memory=2048,
        disks=((rootfs, "snapshot"), (WORK / "in.tar", "ro"), (WORK / "out.img", "rw"))))
    console = (WORK / "console.log").read_text(errors="replace")
    out = WORK / "out"
    if "kvmnote-init: done" in console:
        untar_disk(WORK / "out.img", out)
    logs = "".join(f"\n--- {p.name}:\n" + p.read_text(errors="replace")[-3000:]
                   for p in sorted(out.glob("*.log")) + sorted(out.glob("*.err")))
    assert "kvmnote-init: run.sh exit 0" in console, \
        f"the run failed (rc {rc}, timed out {timed_out}):\n{console[-4000:]}{logs}"
    (WORK / "out.img").unlink()
    core = out / f"core.{(out / 'qemu.pid').read_text().strip()}"
    vmcore = out / "kvmnote.vmcore"
    p = timed("kvmnote vmcore", lambda: subprocess.run(
        [sys.executable, "-m", "kvmnote", "vmcore", str(core), "-o", str(vmcore)],
        capture_output=True, text=True, cwd=REPO))
    assert p.returncode == 0, f"kvmnote vmcore {core}: rc {p.returncode}\n{p.stderr}"
    traces = timed("drgn", lambda: drgn_traces(vmcore, guest.parent / "vmlinux"))
    TIMINGS["total"] = round(time.monotonic() - t0, 1)
    print(f"\nnested acceptance in {WORK}: "
          + ", ".join(f"{k} {v} s" for k, v in TIMINGS.items()))
    print("".join(line + "\n" for line in console.splitlines() if "KVMNOTE-NESTED" in line))
    return {"out": out, "core": core, "console": console, "logs": logs, "traces": traces}


def guest_mode_vcpus(notes: dict) -> list[dict]:
    return [v for v in notes["vcpus"] if "guest_mode" in v["status"]]


TRACE_LINE = re.compile(r"^\s*.+-(\d+)\s+\[\d+\].*?: (kvm_nested_\w+): (.*)$")


def last_nested_event(out: Path, tid: int) -> tuple[str, dict[str, str]]:
    """The last kvm_nested_* tracepoint our kernel hit in thread `tid` before the crash:
    (event, its fields), e.g. ("kvm_nested_vmenter", {"rip": "0xffff...", ...})."""
    last = None
    for line in (out / "trace-tail.txt").read_text().splitlines():
        m = TRACE_LINE.match(line)
        if m and int(m[1]) == tid:
            last = m[2], dict(re.findall(r"(\w+)[:=] ?(\S+)", m[3]))
    assert last, f"no kvm_nested_* event of thread {tid} in trace-tail.txt"
    return last


def test_l1_ran_l2_until_the_crash(run: dict) -> None:
    """The nested guest really ran (our kernel's own tracepoints saw L1's VMRUNs), and
    QEMU died of the SIGSEGV."""
    out = run["out"]
    assert int((out / "qemu.rc").read_text()) == 128 + 11
    events = dict(line.split() for line in (out / "nested-events.txt").read_text().splitlines())
    print(f"\nin the {SPIN_S} s before the crash: {events}\n"
          + (out / "trace-tail.txt").read_text())
    assert int(events["kvm_nested_vmenter"]) > 0, events
    guest_log = (out / "guest.log").read_text(errors="replace")
    assert "KVMNOTE-NESTED-READY" in guest_log and "vmm: " not in guest_log, guest_log[-2000:]
    assert run["core"].stat().st_size >= qemurun.GUEST_MIB << 20


def test_core_has_a_vcpu_in_guest_mode(run: dict) -> None:
    r = kvmnote_read(run["core"])
    assert r.rc == 0, f"kvmnote read --json {run['core']}: rc {r.rc}\n{r.text[-2000:]}"
    text = subprocess.run([sys.executable, "-m", "kvmnote", "read", str(run["core"])],
                          capture_output=True, text=True, cwd=REPO)
    print(f"\nkvmnote read {run['core'].name}:\n{text.stdout}{text.stderr}")
    (vm,) = r.data["vms"]
    assert len(r.data["vcpus"]) == 2, r.data["vcpus"]
    gm = guest_mode_vcpus(r.data)
    assert len(gm) == 1, [(v["vcpu_id"], v["status"]) for v in r.data["vcpus"]]
    # KVM's own tracepoint agrees: that vCPU thread's last nested event was L1's VMRUN,
    # of L2 at the spinner's RIP
    event, fields = last_nested_event(run["out"], gm[0]["tid"])
    assert event == "kvm_nested_vmenter" and int(fields["nested_rip"], 16) == E.GPA_SPIN_JMP, \
        (event, fields)
    # L2's registers, in the note as ever: the test VMM's spinner (its vCPU 0)
    regs = gm[0]["regs"]
    assert (regs["rip"], regs["rbx"]) == (E.GPA_SPIN_JMP, E.GPA_FLAGS), \
        {k: hex(v) for k, v in regs.items()}


def test_kvmnote_read_shows_both_levels(run: dict) -> None:
    """Beside L2's registers, L1's: RIP where L1's last VMRUN returns to, as KVM's
    kvm_nested_vmenter tracepoint reported it (vmcb01's RIP), and a kernel stack."""
    (v,) = guest_mode_vcpus(kvmnote_read(run["core"]).data)
    assert "l1" in v, "no L1 registers for the vCPU in guest mode: " + json.dumps(
        {k: v[k] for k in v if k in ("vcpu_id", "status", "level", "guest_mode")})
    l1 = v["l1"]["regs"]
    _, fields = last_nested_event(run["out"], v["tid"])
    assert l1["rip"] == int(fields["rip"], 16), (hex(l1["rip"]), fields)
    # a kernel stack: the upper half (canonical with 4- or 5-level paging; QEMU's -cpu max
    # has LA57, so L1's vmalloc'd stacks are at 0xff...)
    assert l1["rsp"] >> 63 and l1["rsp"] != v["regs"]["rsp"], {k: hex(x) for k, x in l1.items()}


def test_drgn_unwinds_the_guest_kernel_in_kvm(run: dict) -> None:
    print(f"\ndrgn on kvmnote's vmcore of the nested core:\n{run['traces']}")
    cpus = per_cpu(run["traces"])
    assert len(cpus) == 2, cpus
    (vcpu,) = guest_mode_vcpus(kvmnote_read(run["core"]).data)
    vmm = [(k, f) for k, f in cpus.items() if " comm=vmm " in k]
    assert [k.split()[1] for k, _ in vmm] == [str(vcpu["vcpu_id"])], \
        f"the VMM's CPU is not the vCPU in guest mode ({vcpu['vcpu_id']}): {cpus}"
    frames = vmm[0][1]
    assert "kvm_arch_vcpu_ioctl_run" in frames and \
        any(f in frames for f in VCPU_RUN_FRAMES[1:]), \
        f"{vmm[0][0]}: not in KVM's vcpu-run path: {frames}"
    idle = [f for k, f in cpus.items() if "comm=swapper" in k]
    assert idle and "do_idle" in idle[0], cpus
