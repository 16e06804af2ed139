"""The shipped example cores, written by the patched kernel (examples/: the current
series; examples/v1/: note format 1.0, which kvmnote keeps reading), read back as the
VMM's own KVM_GET_* ioctls saw its vCPUs just before the crash (the side report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvmnote

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CORES = sorted(EXAMPLES.glob("*.core.zst")) + sorted(EXAMPLES.glob("v1/*.core.zst"))


@pytest.mark.parametrize("core", CORES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_registers_equal_the_vmms_ioctls(core: Path) -> None:
    report = json.loads(core.with_name(core.name.replace(".core.zst", ".report.json"))
                        .read_text())
    c = kvmnote.open_core(core)
    try:
        by_id = {v.vcpu_id: v for v in c.vcpus}
        assert len(c.vms) == 1 and c.vms[0].info["pid"] == report["pid"]
        assert sorted(by_id) == sorted(v["vcpu_id"] for v in report["vcpus"])
        for want in report["vcpus"]:
            got = by_id[want["vcpu_id"]].records
            assert {k: got["regs"][k] for k in want["ioctl"]["regs"]} == want["ioctl"]["regs"]
            assert got["sregs"]["cr3"] == want["ioctl"]["sregs"]["cr3"]
    finally:
        c.close()


def test_v1_examples_are_format_1_0() -> None:
    v1 = sorted(EXAMPLES.glob("v1/*.core.zst"))
    assert v1, "examples/v1 holds the 1.0 cores kvmnote must keep reading"
    for core in v1:
        c = kvmnote.open_core(core)
        try:
            assert {v.version for v in c.vcpus} == {(1, 0)}
        finally:
            c.close()
