#!/usr/bin/env python3
"""Regenerate examples/svm-vmm.core.zst and examples/vmx-vmm.core.zst.

    python3 tests/e2e/make_examples.py [--vendor svm|vmx|both]

Builds (or takes from the cache) the patched kernel, boots it under QEMU TCG
(AMD SVM) and Bochs (Intel VMX), runs the test VMM's long-mode 2-vCPU
scenario ("long2": both vCPUs halted at a known RIP, known registers, MSRs,
debug registers, XCR0 and a 4-slot memslot map with a read-only slot),
and stores the core the kernel wrote, zstd-compressed, with the VMM's side
report of what KVM's ioctls returned (examples/<vendor>-vmm.report.json).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvmnote  # noqa: E402
from harness import REPO, machines  # noqa: E402
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vendor", choices=["svm", "vmx", "both"], default="both")
    a = ap.parse_args()
    for v in (["svm", "vmx"] if a.vendor == "both" else [a.vendor]):
        make(v)


if __name__ == "__main__":
    main()
