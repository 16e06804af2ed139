"""On a machine with real VT-x/AMD-V running the patched kernel (the Vagrant
boxes): run the e2e test VMM natively, let it crash, and check that the
kernel-written core's notes equal what the VMM's own KVM_GET_* ioctls
returned. Exit status 0 when everything matches.

    python3 tests/hw/native_check.py [--workdir DIR]
    python3 tests/hw/native_check.py --core CORE --report REPORT   # check only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--core", type=Path, help="check this core instead of running the VMM")
    ap.add_argument("--report", type=Path, help="the VMM's side report for --core")
    a = ap.parse_args()
    if a.core:
        return check(a.core, json.loads(a.report.read_text()))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kvmnote-hw-"))
    work.mkdir(parents=True, exist_ok=True)
    if not Path("/sys/module/kvm/parameters/coredump_notes").exists():
        print("native_check: this kernel has no kvm.coredump_notes: not the patched kernel")
        return 2
    subprocess.run(["make", "-s", "-C", str(REPO / "tests" / "vmm")], check=True)
    pattern = Path("/proc/sys/kernel/core_pattern")
    old = pattern.read_text()
    pattern.write_text(str(work / "core.%p"))
    try:
        p = subprocess.run(["sh", "-c", f"ulimit -c unlimited; exec {REPO}/tests/vmm/vmm "
                            f"--report {work}/report.json --mode long --halt 2 --spin 1 "
                            f"--idle 1 --timeout 60"])
    finally:
        pattern.write_text(old)
    report = json.loads((work / "report.json").read_text())
    core = work / f"core.{report['pid']}"
    print(f"native_check: VMM exited {p.returncode}, core {core}")
    return check(core, report)


def check(core: Path, report: dict) -> int:
    """Compare the core's notes with the VMM's ioctl report; print mismatches."""
    notes = json.loads(subprocess.run([sys.executable, "-m", "kvmnote", "read", "--json",
                                       str(core)], check=True, capture_output=True,
                                      text=True, cwd=REPO).stdout)
    got = {v["vcpu_id"]: v for v in notes["vcpus"]}
    bad = []
    for v in report["vcpus"]:
        if v["kind"] not in ("halted", "never_ran"):
            continue  # a spinning vCPU moved on after the VMM read it
        n, io = got.get(v["vcpu_id"]), v["ioctl"]
        if n is None or "valid" not in n["status"]:
            bad.append(f"vcpu {v['vcpu_id']}: no valid note ({n and n['status']})")
            continue
        for k, val in io["regs"].items():
            if n["regs"][k] != val:
                bad.append(f"vcpu {v['vcpu_id']} {k}: note {n['regs'][k]:#x} ioctl {val:#x}")
        for k in ("cr0", "cr3", "cr4", "efer"):
            if n["sregs"][k] != io["sregs"][k]:
                bad.append(f"vcpu {v['vcpu_id']} {k}: note {n['sregs'][k]:#x} "
                           f"ioctl {io['sregs'][k]:#x}")
        for s in SEGMENTS:
            if n["sregs"][s]["selector"] != io["sregs"][s]["selector"]:
                bad.append(f"vcpu {v['vcpu_id']} {s}.selector differs")
    print("\n".join(bad) or f"native_check: {len(got)} vCPU notes agree with the VMM's ioctls")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
