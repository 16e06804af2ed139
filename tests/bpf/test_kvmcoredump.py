"""End-to-end test of bpf/kvmcoredump.py and `kvmnote verify`.

Boots the patched kernel (kpatch/build.sh -c l1) with the Debian root filesystem of the
harness (python3-bpfcc) on each backend: `svm`, QEMU TCG -cpu max (nested AMD SVM), and
`vmx`, Bochs (Intel VMX; its root filesystem on ATA disks). Inside: the tracer runs
with -p on the test VMM (halted, spinning and never-run vCPUs), which then abort()s and
dumps core (the L1 command line's coredump_filter=0x233 gives it KVM notes under series
v2); an untraced "noise" VMM crashes too. The record, both cores and the VMMs' side
reports come back on a raw virtio disk (tar). On the host the record is held against the
VMM's report and tests/harness/expected.py, then `kvmnote verify` against the cores.

Then nested guests (series v3): an unfiltered tracer watches the series' KVM selftest
(kpatch 0014) crash in its cases nested_l2 (the vCPU in L2: its last exit an L2 port
I/O that L1 does not intercept) and nested_l1 (in L1 between two nested entries); the
record must say which level each last exit came from (kvm:kvm_nested_vmexit), and
`kvmnote verify` must accept both cores and reject the record with the level flipped.

    python -m pytest tests/bpf -s      # -s shows the timings and the tracer's output
    python -m pytest tests/bpf -s -k vmx      # Bochs only
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

from harness import REPO, expected as E
from harness.kernel import kernel, selftest
from harness.kvmnote_read import notes
from harness.machines import bochs_available, qemu_available, run_disk_root
from harness.rootfs import debian_rootfs
from harness.transfer import blank_disk, tar_disk, untar_disk
from harness.vmm import build_vmm
from testlib import need

NHALT, NSPIN, NIDLE = 2, 1, 1
ROOT_CMDLINE = "root=/dev/vda rw rootfstype=ext4 init=/sbin/kvmnote-init"

# The VMM under test is started first but waits (its shell execs it on a signal file,
# keeping the PID), so the tracer can be given its PID with -p. Before it runs, an
# untraced "noise" VMM crashes: the -p filter must keep it out of the record. The tracer
# prints a summary every 60 s, at most 10 times, and exits once the VMM's core is written.
RUN_SH = f"""\
set -x
echo /mnt/out/core.%p > /proc/sys/kernel/core_pattern
ulimit -c unlimited
up() {{ cut -d' ' -f1 /proc/uptime; }}
sh -c 'while [ ! -e /tmp/go ]; do sleep 0.1; done; \\
    exec /mnt/in/vmm --report /mnt/out/vmm.json --mode long --halt {NHALT} --spin {NSPIN} --idle {NIDLE}' &
vmm=$!
echo "tracer start $(up)"
python3 /mnt/in/kvmcoredump.py -p $vmm --exit-on-dump 60 10 -j /mnt/out/trace.json \\
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

# Nested guests: the series' KVM selftest under a tracer of all processes. (It keeps
# its core with rename(): into a directory on its own file system, then moved.)
python3 /mnt/in/kvmcoredump.py -j /mnt/out/nested-trace.json \
    > /mnt/out/nested-tracer.out 2> /mnt/out/nested-tracer.err &
tracer=$!
while ! grep -q '^Tracing' /mnt/out/nested-tracer.out; do
    kill -0 $tracer 2>/dev/null || break
    sleep 0.2
done
echo "nested tracer ready $(up)"
for c in nested_l2 nested_l1; do
    mkdir -p /tmp/keep/$c
    /mnt/in/coredump_test $c /tmp/keep/$c > /mnt/out/$c.out 2>&1
    echo "$c exit $? $(up)"
    mv /tmp/keep/$c/core /mnt/out/$c.core
done
kill -TERM $tracer
wait $tracer
echo "nested tracer exit $? $(up)"
ls -l /mnt/out
"""


def timed(what, fn, times):
    t = time.monotonic()
    r = fn()
    times[what] = round(time.monotonic() - t, 1)
    return r


# Each backend's timeout (seconds; the run took 70 s under QEMU, 163 s under Bochs) and
# prerequisite.
BACKENDS = {"svm": (900, qemu_available, "qemu-system-x86_64 not installed "
                    "(apt install qemu-system-x86)"),
            "vmx": (1200, bochs_available, "bochs/isolinux/genisoimage not installed (apt "
                    "install bochs bochsbios vgabios isolinux syslinux-common genisoimage)")}


@pytest.fixture(scope="module", params=[
    pytest.param("svm", marks=pytest.mark.svm, id="svm"),
    pytest.param("vmx", marks=pytest.mark.vmx, id="vmx")])
def run(request, tmp_path_factory):
    backend = request.param
    timeout, available, why = BACKENDS[backend]
    need(available(), why)
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

    d = tmp_path_factory.mktemp(f"bpf-{backend}")
    test = timed("selftest build", selftest, times)
    tar_disk(d / "in.tar", {"kvmcoredump.py": REPO / "bpf" / "kvmcoredump.py", "vmm": vmm,
                            "coredump_test": test, "run.sh": RUN_SH.encode()})
    blank_disk(d / "out.img", 256 << 20)
    rc, timed_out = timed(f"{backend} run", lambda: run_disk_root(
        backend, d, kern, ROOT_CMDLINE, timeout, memory=1024,
        disks=((rootfs, "snapshot"), (d / "in.tar", "ro"), (d / "out.img", "rw"))), times)
    console = (d / "console.log").read_text(errors="replace")
    assert rc is not None and not timed_out, f"{backend} exit {rc}; console:\n{console[-3000:]}"
    assert "kvmnote-init: done" in console, console[-3000:]
    out = untar_disk(d / "out.img", d / "out")
    times["total"] = round(time.monotonic() - t0, 1)
    up = dict(re.findall(r"^(tracer start|tracer ready) ([\d.]+)$",
                         (out / "run.log").read_text(), re.M))
    if len(up) == 2:
        times["in guest: bcc startup"] = round(float(up["tracer ready"]) -
                                               float(up["tracer start"]), 1)
    print(f"\nbpf e2e ({backend}) in {d}: " + ", ".join(f"{k} {v}s" for k, v in times.items()))
    for name in ("run.log", "tracer.out", "tracer.err", "nested-tracer.out",
                 "nested-tracer.err", "nested_l2.out", "nested_l1.out"):
        if (out / name).exists():
            print(f"--- {name}\n" + (out / name).read_text(errors="replace"))
    assert (out / "trace.json").exists(), (out / "tracer.err").read_text()
    vmm = json.loads((out / "vmm.json").read_text())
    noise = json.loads((out / "noise.json").read_text())
    cores = sorted(c.name for c in out.glob("core.*"))
    assert cores == sorted([f"core.{vmm['pid']}", f"core.{noise['pid']}"]), \
        (out / "run.log").read_text()
    return {"backend": backend, "out": out, "trace_path": out / "trace.json",
            "core": out / f"core.{vmm['pid']}", "noise_core": out / f"core.{noise['pid']}",
            "trace": json.loads((out / "trace.json").read_text()),
            "vmm": vmm, "noise": noise}


def verify(core, trace_path, *args):
    p = subprocess.run([sys.executable, "-m", "kvmnote", "verify", str(core),
                        "--trace", str(trace_path), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    print(p.stdout)
    return p


def traced_proc(trace, pid):
    procs = [p for p in trace["processes"] if p["pid"] == pid]
    assert len(procs) == 1, trace["processes"]
    return procs[0]


def entries(proc, vcpu_id, tid=None):
    return [e for e in proc["vcpus"]
            if e["vcpu_id"] == vcpu_id and (tid is None or e["tid"] == tid)]


def test_record_is_clean_and_filtered(run):
    t = run["trace"]
    assert t["schema"] == "kvmcoredump/3"
    assert t["lost_events"] == 0 and t["map_full_drops"] == 0, t
    assert [p["pid"] for p in t["processes"]] == [run["vmm"]["pid"]]
    assert run["noise"]["pid"] != run["vmm"]["pid"]


def test_dump_seen_once_per_vcpu_note(run):
    written = notes(run["core"])["vcpus"]
    assert sorted(v["vcpu_id"] for v in written) == list(range(NHALT + NSPIN + NIDLE))
    proc = traced_proc(run["trace"], run["vmm"]["pid"])
    assert proc["dumped"] is True
    assert proc["dump_events"] == len(written)


def test_last_exit_per_vcpu_kind(run):
    proc = traced_proc(run["trace"], run["vmm"]["pid"])
    kinds = sorted(v["kind"] for v in run["vmm"]["vcpus"])
    assert kinds == sorted(["halted"] * NHALT + ["spinning"] * NSPIN + ["never_ran"] * NIDLE)
    isa = run["backend"]     # the exit records of the vendor KVM ran on
    halt, spin = {"svm": (E.SVM_EXIT_HLT, {0x60}),     # INTR: the dump's kick
                  "vmx": (E.VMX_EXIT_HLT, E.VMX_SPIN_EXITS)}[isa]
    for v in run["vmm"]["vcpus"]:
        if v["kind"] == "never_ran":
            assert entries(proc, v["vcpu_id"]) == [], v
            continue
        mine = entries(proc, v["vcpu_id"], v["tid"])
        assert len(mine) == 1, (v, proc["vcpus"])
        e = mine[0]
        assert e["exits"] > 0, e
        le = e["last_exit"]
        assert le["isa"] == isa, le
        if v["kind"] == "halted":
            assert (le["exit_reason"], le["guest_rip"]) == (halt, E.GPA_HLT), (v, le)
        else:
            assert le["exit_reason"] in spin and le["guest_rip"] == E.GPA_SPIN_JMP, (v, le)


def test_verify_accepts_the_run(run):
    p = verify(run["core"], run["trace_path"])
    assert p.returncode == 0, p.stdout
    assert "verify: OK" in p.stdout


def test_verify_rejects_the_noise_vmms_core(run):
    p = verify(run["noise_core"], run["trace_path"])
    assert p.returncode == 1, p.stdout
    assert "MISMATCH process:" in p.stdout


def _kind(run, kind):
    return [v for v in run["vmm"]["vcpus"] if v["kind"] == kind][0]


def _alter(run, how):
    """(altered record, the MISMATCH rule it must break)."""
    trace = copy.deepcopy(run["trace"])
    proc = traced_proc(trace, run["vmm"]["pid"])
    halted = _kind(run, "halted")
    e = entries(proc, halted["vcpu_id"], halted["tid"])[0]
    if how == "lost_events":
        trace["lost_events"] = 1
        return trace, "trace"
    if how == "info1":
        e["last_exit"]["info1"] += 1
        return trace, "exit"
    if how == "guest_rip":
        e["last_exit"]["guest_rip"] -= 1
        return trace, "rip"
    if how == "drop_vcpu":
        proc["vcpus"].remove(e)
        return trace, "ran"
    if how == "exits_never_ran":
        idle = _kind(run, "never_ran")
        proc["vcpus"].append(dict(copy.deepcopy(e), tid=idle["tid"], vcpu_id=idle["vcpu_id"]))
        return trace, "ran"
    if how == "not_dumped":
        proc["dumped"] = False
        return trace, "dumped"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["lost_events", "info1", "guest_rip", "drop_vcpu",
                                 "exits_never_ran", "not_dumped"])
def test_verify_rejects_altered_record(run, how, tmp_path):
    trace, rule = _alter(run, how)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    p = verify(run["core"], path)
    assert p.returncode == 1, p.stdout
    bad = [line for line in p.stdout.splitlines() if line.startswith("MISMATCH")]
    assert bad and all(line.startswith(f"MISMATCH {rule}:") for line in bad), p.stdout


def test_verify_rejects_another_pid(run):
    p = verify(run["core"], run["trace_path"], "--pid", str(run["noise"]["pid"]))
    assert p.returncode == 1, p.stdout
    assert "MISMATCH process:" in p.stdout


def test_verify_errors_on_a_missing_key(run, tmp_path):
    trace = copy.deepcopy(run["trace"])
    proc = traced_proc(trace, run["vmm"]["pid"])
    del [e for e in proc["vcpus"] if e["exits"]][0]["last_exit"]["guest_rip"]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    p = verify(run["core"], path)
    assert p.returncode == 2, p.stdout
    assert "MISMATCH" not in p.stdout and "Traceback" not in p.stdout, p.stdout


# --- nested guests: the selftest's cores against the unfiltered tracer ----------------

def nested_run(run, case):
    """(the case's core, its process's record entry): the selftest passed, its core is
    back and the tracer saw that process dump it."""
    out = run["out"]
    text = (out / f"{case}.out").read_text(errors="replace")
    assert re.search(rf"^ok \d+ {case}$", text, re.M), text
    core = out / f"{case}.core"
    assert core.exists(), (out / "run.log").read_text()
    trace = json.loads((out / "nested-trace.json").read_text())
    assert trace["lost_events"] == 0 and trace["map_full_drops"] == 0, trace
    pid = notes(core)["vms"][0]["pid"]
    proc = traced_proc(trace, pid)
    assert proc["dumped"], proc
    return core, proc


@pytest.mark.parametrize("case,l2", [("nested_l2", True), ("nested_l1", False)])
def test_nested_last_exit_level(run, case, l2):
    """The tracer's account of the level, held against the selftest (not the note): in
    nested_l2 the vCPU's last exit is L2's port I/O (L2 at its out instruction), in
    nested_l1 L1's."""
    core, proc = nested_run(run, case)
    (v,) = [e for e in proc["vcpus"] if e["exits"]]
    assert v["last_exit"]["guest_mode"] is l2, v
    (note,) = notes(core)["vcpus"]
    assert ("guest_mode" in note["status"]) is l2, note["status"]
    p = verify(core, run["out"] / "nested-trace.json")
    assert p.returncode == 0 and "verify: OK" in p.stdout, p.stdout
    assert (f"from L2 at 0x{v['last_exit']['guest_rip']:x}" in p.stdout) is l2, p.stdout


@pytest.mark.parametrize("case", ["nested_l2", "nested_l1"])
def test_nested_verify_rejects_the_other_level(run, case, tmp_path):
    core, proc = nested_run(run, case)
    trace = json.loads((run["out"] / "nested-trace.json").read_text())
    for e in traced_proc(trace, proc["pid"])["vcpus"]:
        if e["last_exit"]:
            e["last_exit"]["guest_mode"] = not e["last_exit"]["guest_mode"]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    p = verify(core, path)
    assert p.returncode == 1, p.stdout
    bad = [line for line in p.stdout.splitlines() if line.startswith("MISMATCH")]
    assert bad and all(line.startswith("MISMATCH level:") for line in bad), p.stdout
