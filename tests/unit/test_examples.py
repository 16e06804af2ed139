"""The shipped example cores, written by the patched kernel (examples/: the current
series; examples/v1/: note format 1.0, which kvmnote keeps reading), read back as the
VMM's own KVM_GET_* ioctls saw its vCPUs just before the crash (the side report)."""

from __future__ import annotations

import json
import struct
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


NESTED = sorted(EXAMPLES.glob("nested/*.core.zst"))


@pytest.mark.parametrize("core", NESTED, ids=lambda p: p.name)
def test_nested_example_shows_both_levels(core: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The KVM selftest's nested_l2 core (series v3): `kvmnote read --json` gives L2's
    registers as L2's code set them and L1's as L1 set up the nested VM exit (the
    selftest's printout, in the side report); `kvmnote vmcore` writes L1's by default
    and refuses --level 2 (L1 runs L2 with shadow paging)."""
    from kvmnote.cli import main
    report = json.loads(core.with_name(core.name.replace(".core.zst", ".report.json"))
                        .read_text())
    assert main(["read", "--json", str(core)]) == 0
    (v,) = json.loads(capsys.readouterr().out)["vcpus"]
    assert v["guest_mode"] and v["level"] == 2 and v["vendor"] == report["vendor"]
    assert {k: int(v["regs"][k], 16) for k in report["l2"]} == report["l2"]
    l1 = v["l1"]
    assert (int(l1["regs"]["rip"], 16), int(l1["regs"]["rsp"], 16),
            int(l1["sregs"]["cr3"], 16)) == tuple(report["l1"][k] for k in ("rip", "rsp", "cr3"))
    assert v["nested"]["format"] == report["vendor"] and "guest_mode" in v["nested"]["flags_names"]
    assert not v["nested"]["nested_run_pending"]

    assert main(["vmcore", str(core), "-o", str(tmp_path / "vmcore")]) == 0
    data = (tmp_path / "vmcore").read_bytes()
    at = data.index(b"CORE\0\0\0\0") + 8            # the first NT_PRSTATUS descriptor
    regs = dict(zip(("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
                     "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp"),
                    struct.unpack_from("<20Q", data, at + 112)))
    assert (regs["rip"], regs["rsp"]) == (report["l1"]["rip"], report["l1"]["rsp"])
    assert main(["vmcore", str(core), "-o", str(tmp_path / "l2"), "--level", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].endswith("--level 2 needs EPT / NPT") and "shadow paging" in err[-1]
    assert not (tmp_path / "l2").exists()
