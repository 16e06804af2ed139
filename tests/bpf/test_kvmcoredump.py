"""End-to-end test of bpf/kvmcoredump.py and bpf/verify.py.

Boots the patched kernel (kpatch/build.sh -c l1) under QEMU TCG -cpu max
(nested AMD SVM) with a Debian root filesystem holding python3-bpfcc
(tests/bpf/rootfs.sh). Inside: the tracer runs in the background, the static
test VMM runs two vCPUs to `hlt` and one spinning, then abort()s; the kernel
writes its core. The tracer's record, the core and the VMM's own report come
back on a raw virtio disk (tar). On the host, three independent sources are
compared: the tracer (kvm_exit / kvm_coredump_vcpu tracepoints), the core's
notes (kvmnote read --json) and the VMM (its chosen guest code and KVM_GET_REGS
after KVM_EXIT_HLT).

    python -m pytest tests/bpf -s      # -s shows the timings and tracer output
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO
from harness.kernel import kernel
from harness.kvmnote_read import notes as kvmnote_json
from harness.machines import run_qemu
from harness.rootfs import debian_rootfs
from harness.transfer import blank_disk, tar_disk, untar_disk
from harness.vmm import build_vmm
from testlib import need

QEMU = shutil.which("qemu-system-x86_64")
NHALT, NSPIN, NIDLE = 2, 1, 1
SVM_EXIT_HLT = 0x78          # AMD APM vol. 2, appendix C
STATUS_VALID, STATUS_NEVER_RAN = 1, 1 << 4   # docs/note-format.md

# In the guest: the VMM under test is started first but waits (its shell
# execs it on a signal file, keeping the PID), so the tracer can be given its
# PID with -p. Before it runs, an untraced "noise" VMM crashes too: the -p
# filter must keep it out of the record.
RUN_SH = f"""\
set -x
echo /mnt/out/core.%p > /proc/sys/kernel/core_pattern
ulimit -c unlimited
up() {{ cut -d' ' -f1 /proc/uptime; }}
sh -c 'while [ ! -e /tmp/go ]; do sleep 0.1; done; \\
    exec /mnt/in/vmm --report /mnt/out/vmm.json --mode long --halt {NHALT} --spin {NSPIN} --idle {NIDLE}' &
vmm=$!
echo "tracer start $(up)"
python3 /mnt/in/kvmcoredump.py -p $vmm --exit-on-dump -d 300 -j /mnt/out/trace.json \\
    > /mnt/out/tracer.out 2> /mnt/out/tracer.err &
tracer=$!
while ! grep -q '^Tracing' /mnt/out/tracer.out; do
    kill -0 $tracer 2>/dev/null || break
    sleep 0.2
done
echo "tracer ready $(up)"
/mnt/in/vmm --report /mnt/out/noise.json --mode long --halt 1
echo "noise vmm exit $? $(up)"
touch /tmp/go
wait $vmm
echo "vmm exit $? $(up)"
wait $tracer
echo "tracer exit $? $(up)"
ls -l /mnt/out
"""


def timed(what, fn, times):
    t = time.monotonic()
    r = fn()
    times[what] = round(time.monotonic() - t, 1)
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    need(QEMU is not None, "qemu-system-x86_64 not installed (apt install qemu-system-x86)")
    need(os.geteuid() == 0, "not root (mmdebstrap's root mode and the kernel build cache)")
    need(Path("/usr/src/linux-source-6.12.tar.xz").exists(),
         "linux-source-6.12 not installed (apt install linux-source-6.12)")
    need(shutil.which("mmdebstrap") is not None, "mmdebstrap not installed (apt install mmdebstrap)")
    need(shutil.which("gcc") is not None, "gcc not installed (the test VMM is built static)")

    times = {}
    t0 = time.monotonic()
    kern = timed("kernel build", lambda: kernel("-c", "l1"), times)
    rootfs = timed("rootfs build", debian_rootfs, times)
    vmm = timed("vmm build", build_vmm, times)

    d = tmp_path_factory.mktemp("bpf")
    tar_disk(d / "in.tar", {"kvmcoredump.py": REPO / "bpf" / "kvmcoredump.py", "vmm": vmm,
                            "run.sh": RUN_SH.encode()})
    blank_disk(d / "out.img", 256 << 20)
    rc, timed_out = timed("qemu run", lambda: run_qemu(
        d, kern, None, "root=/dev/vda rw rootfstype=ext4 init=/sbin/kvmnote-init", 900,
        memory=1024, disks=((rootfs, "snapshot"), (d / "in.tar", "ro"), (d / "out.img", "rw"))),
        times)
    console = (d / "console.log").read_text(errors="replace")
    assert rc == 0 and not timed_out, f"qemu exit {rc}; console:\n{console[-3000:]}"
    assert "kvmnote-init: done" in console, console[-3000:]
    out = untar_disk(d / "out.img", d / "out")
    times["total"] = round(time.monotonic() - t0, 1)
    up = dict(re.findall(r"^(tracer start|tracer ready|tracer exit \d+) ([\d.]+)$",
                         (out / "run.log").read_text(), re.M))
    if "tracer start" in up and "tracer ready" in up:
        times["in guest: bcc startup"] = round(float(up["tracer ready"]) - float(up["tracer start"]), 1)
    print(f"\nbpf e2e in {d}: " + ", ".join(f"{k} {v}s" for k, v in times.items()))
    for name in ("run.log", "tracer.out", "tracer.err"):
        print(f"--- {name}\n" + (out / name).read_text(errors="replace"))
    assert (out / "trace.json").exists(), (out / "tracer.err").read_text()
    vmm = json.loads((out / "vmm.json").read_text())
    noise = json.loads((out / "noise.json").read_text())
    cores = sorted(out.glob("core.*"))
    assert [c.name for c in cores] == sorted([f"core.{vmm['pid']}", f"core.{noise['pid']}"]), \
        (out / "run.log").read_text()
    core = out / f"core.{vmm['pid']}"
    return {"dir": d, "out": out, "core": core, "noise_core": out / f"core.{noise['pid']}",
            "trace": json.loads((out / "trace.json").read_text()),
            "vmm": vmm, "noise": noise, "notes": kvmnote_json(core)}


def verify(trace_path, core):
    return subprocess.run([sys.executable, str(REPO / "bpf" / "verify.py"),
                           str(trace_path), str(core)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)


def traced_vmm(run):
    procs = [p for p in run["trace"]["processes"] if p["pid"] == run["vmm"]["pid"]]
    assert len(procs) == 1, run["trace"]["processes"]
    return procs[0]


def test_pid_filter_kept_other_vmm_out(run):
    assert [p["pid"] for p in run["trace"]["processes"]] == [run["vmm"]["pid"]]
    assert run["noise"]["pid"] != run["vmm"]["pid"]


def test_one_coredump_event_per_vcpu_in_core(run):
    proc = traced_vmm(run)
    note_ids = sorted(v["vcpu_id"] for v in run["notes"]["vcpus"])
    vmm_ids = sorted(v["vcpu_id"] for v in run["vmm"]["vcpus"])
    assert note_ids == vmm_ids == list(range(NHALT + NSPIN + NIDLE))
    dumped = {v["vcpu_id"]: v["coredump"] for v in proc["vcpus"] if v["coredump"]}
    assert sorted(dumped) == note_ids
    assert all(cd["events"] == 1 for cd in dumped.values()), dumped


def test_rip_and_status_equal_notes(run):
    proc = traced_vmm(run)
    traced = {v["vcpu_id"]: v for v in proc["vcpus"]}
    vmm = {v["vcpu_id"]: v for v in run["vmm"]["vcpus"]}
    for nv in run["notes"]["vcpus"]:
        cd = traced[nv["vcpu_id"]]["coredump"]
        kind = vmm[nv["vcpu_id"]]["kind"]
        if kind == "never_ran":
            assert nv["status"] == ["valid", "never_ran"], nv["status"]
            assert cd["status"] == STATUS_VALID | STATUS_NEVER_RAN, cd
        else:
            assert nv["status"] == ["valid"] and cd["status"] == STATUS_VALID, (nv["status"], cd)
        assert cd["error"] == 0 and nv["error"] is None
        assert cd["rip"] == nv["regs"]["rip"], (nv["vcpu_id"], hex(cd["rip"]))
        if kind in ("halted", "never_ran"):
            # The VMM's own KVM_GET_REGS (after KVM_EXIT_HLT, or before any
            # KVM_RUN): a third source.
            assert cd["rip"] == vmm[nv["vcpu_id"]]["ioctl"]["regs"]["rip"]


def test_last_exit_equals_note_exit_code(run):
    proc = traced_vmm(run)
    traced = {v["vcpu_id"]: v for v in proc["vcpus"]}
    vmm = {v["vcpu_id"]: v for v in run["vmm"]["vcpus"]}
    for nv in run["notes"]["vcpus"]:
        tv = traced[nv["vcpu_id"]]
        if vmm[nv["vcpu_id"]]["kind"] == "never_ran":
            assert tv["last_exit"] is None and tv["exits"] == 0, tv
            continue
        le = tv["last_exit"]
        assert le and le["isa"] == "svm" and nv["exit"]["type"] == "svm"
        assert le["exit_reason"] == nv["exit"]["exit_code"], (nv["vcpu_id"], le, nv["exit"])
        if vmm[nv["vcpu_id"]]["kind"] == "halted":
            assert le["exit_reason"] == SVM_EXIT_HLT


def test_verifier_accepts_the_run(run):
    p = verify(run["out"] / "trace.json", run["core"])
    print(p.stdout)
    assert p.returncode == 0, p.stdout
    assert "verify: OK" in p.stdout


def test_verifier_rejects_another_vmms_core(run):
    p = verify(run["out"] / "trace.json", run["noise_core"])
    assert p.returncode == 1, p.stdout
    assert "MISMATCH" in p.stdout


@pytest.mark.parametrize("alter", ["rip", "status", "last_exit", "missing_vcpu", "extra_event",
                                   "exit_on_never_ran"])
def test_verifier_rejects_altered_trace(run, alter, tmp_path):
    trace = copy.deepcopy(run["trace"])
    proc = [p for p in trace["processes"] if p["pid"] == run["vmm"]["pid"]][0]
    v = proc["vcpus"][0]
    if alter == "rip":
        v["coredump"]["rip"] += 1
    elif alter == "status":
        v["coredump"]["status"] ^= 1 << 3
    elif alter == "last_exit":
        v["last_exit"]["exit_reason"] = 0x7b
    elif alter == "missing_vcpu":
        proc["vcpus"] = proc["vcpus"][1:]
    elif alter == "extra_event":
        v["coredump"]["events"] = 2
    elif alter == "exit_on_never_ran":
        v = proc["vcpus"][-1]
        assert v["coredump"]["status"] & STATUS_NEVER_RAN
        v["exits"] = 1
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    p = verify(path, run["core"])
    assert p.returncode == 1, p.stdout
    assert "MISMATCH vcpu %d" % v["vcpu_id"] in p.stdout, p.stdout
