#!/usr/bin/env python3
"""Regenerate examples/svm-vmm.core.zst and examples/vmx-vmm.core.zst, and the nested
examples examples/nested/{svm,vmx}.core.zst.

    python3 tests/e2e/make_examples.py [--vendor svm|vmx|both] [--only vmm|nested]

Builds (or takes from the cache) the patched kernel, boots it under QEMU TCG
(AMD SVM) and Bochs (Intel VMX), runs the test VMM's long-mode 2-vCPU
scenario ("long2": both vCPUs halted at a known RIP, known registers, MSRs,
debug registers, XCR0 and a 4-slot memslot map with a read-only slot),
and stores the core the kernel wrote, zstd-compressed, with the VMM's side
report of what KVM's ioctls returned (examples/<vendor>-vmm.report.json).

The nested examples come from the series' KVM selftest, case nested_l2 (patch
0014): L1 enables VMX or SVM and enters an L2 that sets known registers; the VMM
crashes while the vCPU is in L2. The selftest keeps that core, and prints what
L1 set up for the nested VM exit and what KVM_GET_REGS returned in L2, which
examples/nested/<vendor>.report.json keeps.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvmnote  # noqa: E402
from harness import REPO, machines  # noqa: E402
from harness.kernel import selftest  # noqa: E402
from harness.scenarios import BY_NAME  # noqa: E402

OUT = REPO / "examples"
LIMIT = 1 << 20


def make(vendor: str) -> Path:
    b = machines.boot(vendor, "patched", [BY_NAME["long2"].scenario], tag="examples")
    if b.errors:
        raise SystemExit(f"{vendor}: {b.errors}\n{b.context()}")
    core = b.file("long2", "core")
    notes = kvmnote.open_core(b.path("long2", "core"))
    if len(notes.vcpus) != 2 or len(notes.vms) != 1:
        raise SystemExit(f"{vendor}: core has {len(notes.vcpus)} vCPU notes, "
                         f"{len(notes.vms)} VM notes; want 2 and 1")
    OUT.mkdir(exist_ok=True)
    dst = OUT / f"{vendor}-vmm.core.zst"
    subprocess.run(["zstd", "-q", "-19", "-f", "-o", str(dst), str(b.path("long2", "core"))],
                   check=True)
    (OUT / f"{vendor}-vmm.report.json").write_bytes(b.file("long2", "report.json"))
    size = dst.stat().st_size
    if size >= LIMIT:
        raise SystemExit(f"{dst}: {size} bytes, not under 1 MB")
    print(f"{dst.relative_to(REPO)}: {size} bytes (core {len(core)} bytes, "
          f"boot {b.elapsed:.1f} s)")
    return dst


# The selftest's L2 tag (L2_TAG in coredump_test.c): L2 sets RBX = tag | 3,
# RSI = tag | 6, RDI = tag | 7, R12 = tag | 12, R13 = tag | 13.
L2_TAG = 0x2222000000000000


def make_nested(vendor: str) -> Path:
    # (the selftest keeps its core with rename(): a directory on its own file system)
    scn = machines.Scenario("nested", [], command="/bin/coredump_test nested_l2 /tmp/keep",
                            pre=["mkdir -p /tmp/keep"], post=["mv /tmp/keep/core @OUT@/nested/"],
                            timeout=600)
    b = machines.boot(vendor, "patched", [scn], tag="examples",
                      extra_files={"bin/coredump_test": selftest().read_bytes()},
                      slow=1 + 4 * (vendor == "vmx"))
    out = (b.file("nested", "stdout") or b"").decode("utf-8", "replace")
    if b.errors or not re.search(r"^ok \d+ nested_l2$", out, re.M):
        raise SystemExit(f"{vendor}: nested_l2 did not pass: {b.errors}\n{out}")
    m = re.search(r"L1 RIP (0x[0-9a-f]+) RSP (0x[0-9a-f]+) CR3 (0x[0-9a-f]+), "
                  r"L2 RIP (0x[0-9a-f]+) RSP (0x[0-9a-f]+)", out)
    if not m:
        raise SystemExit(f"{vendor}: the selftest printed no L1/L2 values\n{out}")
    l1_rip, l1_rsp, l1_cr3, l2_rip, l2_rsp = (int(x, 16) for x in m.groups())
    dst = OUT / "nested" / f"{vendor}.core.zst"
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["zstd", "-q", "-19", "-f", "-o", str(dst), str(b.path("nested", "core"))],
                   check=True)
    report = {
        "source": "KVM selftest x86_64/coredump_test, case nested_l2 (kpatch 0014)",
        "vendor": vendor,
        "l1": {"rip": l1_rip, "rsp": l1_rsp, "cr3": l1_cr3},
        "l2": {"rip": l2_rip, "rsp": l2_rsp, "rbx": L2_TAG | 3, "rsi": L2_TAG | 6,
               "rdi": L2_TAG | 7, "r12": L2_TAG | 12, "r13": L2_TAG | 13},
    }
    (OUT / "nested" / f"{vendor}.report.json").write_text(json.dumps(report, indent=1) + "\n")
    size = dst.stat().st_size
    if size >= LIMIT:
        raise SystemExit(f"{dst}: {size} bytes, not under 1 MB")
    print(f"{dst.relative_to(REPO)}: {size} bytes (boot {b.elapsed:.1f} s)")
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vendor", choices=["svm", "vmx", "both"], default="both")
    ap.add_argument("--only", choices=["vmm", "nested"], help="only these examples")
    a = ap.parse_args()
    for v in (["svm", "vmx"] if a.vendor == "both" else [a.vendor]):
        if a.only != "nested":
            make(v)
        if a.only != "vmm":
            make_nested(v)


if __name__ == "__main__":
    main()
