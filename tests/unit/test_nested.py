"""Nested virtualization (note format 1.2): `kvmnote read` shows both levels of a vCPU
in guest mode, the NESTED record, and --level picks one; `kvmnote vmcore` uses L1's
state by default and writes the nested guest's with --level 2."""

import json
from pathlib import Path
from typing import Any

import pytest

import corebuilder as cb
from kvmnote import schema as S
from kvmnote.cli import main

VENDORS = {"vmx": S.KVM_CORE_VENDOR_VMX, "svm": S.KVM_CORE_VENDOR_SVM}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main() on argv: (exit status, stdout, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def nested_core(path: Path, vcpus: list[dict[str, Any]], vendor: int,
                slots: list[dict[str, int]] | None = None,
                loads: list[cb.Load] | None = None) -> None:
    """A one-VM core of `vcpus` (cb.nested_vcpu / cb.sample_vcpu values)."""
    vm = {"vm_index": 0, "vendor": vendor, "nr_vcpus": len(vcpus), "vm_type": 0,
          "flags": 0, "pid": 4242, "reserved": 0}
    notes = cb.prstatus(4242) + cb.prpsinfo(4242, "qemu-system-x86")
    notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, slots or [])))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
                      for v in vcpus)
    cb.write_core(path, notes, loads or [])


def h(n: int) -> str:
    return f"{n:#x}"


# --- kvmnote read ---------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_read_guest_mode_shows_both_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           vendor: str) -> None:
    v = cb.nested_vcpu(0, VENDORS[vendor], run_pending=True)
    nested_core(tmp_path / "core", [v], VENDORS[vendor])
    rc, out, _ = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 0
    lines = out.splitlines()
    assert "  guest mode: running a nested guest (L2); L1 is the guest's own hypervisor" in lines
    l2 = lines.index("  L2 (nested guest) registers:")
    l1 = lines.index("  L1 (hypervisor) registers, as the nested VM exit that ends guest "
                     "mode will load them:")
    assert lines[l2 + 1].startswith("    RIP 0x0000000000002000  RSP 0x0000000000002f00")
    assert lines[l1 + 1].startswith("    RIP 0xffffffff81e00000  RSP 0xffffc90000008000")
    assert "    CR0 0x80050033 [PE MP ET NE WP AM PG]  CR2 0xdead001  CR3 0x3000  CR8 0x1" \
        in lines[l2:l1]
    assert any("CR3 0x5000000" in ln for ln in lines[l1:])
    assert any(ln.startswith("  L2's last exit to KVM") for ln in lines)
    assert "    nested_run_pending: L1's VMLAUNCH/VMRESUME/VMRUN is not complete (L2 has " \
        "not run an instruction yet)" in lines
    if vendor == "vmx":
        assert "  nested state (vmx): flags 0x3 [guest_mode nested_run_pending], vmxon " \
            "0x4000, vmcs12 0x6000" in lines
        assert "    L1's last exit seen (vmcs12): EPT_VIOLATION (0x30), qualification 0x181, " \
            "GPA 0x1234000" in lines
        assert "    EPT, EPTP 0x701e (4-level)" in lines
    else:
        assert "  nested state (svm): flags 0x103 [guest_mode nested_run_pending gif_set], " \
            "vmcb12 0x6000" in lines
        assert "    L1's last exit seen (vmcb12): NPF (0x400), info1 0x6 info2 0x1234000" \
            in lines
        assert "    nested paging (NPT), nCR3 0x7000 (4-level)" in lines


@pytest.mark.parametrize("vendor", VENDORS)
def test_read_json_both_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               vendor: str) -> None:
    v = cb.nested_vcpu(0, VENDORS[vendor])
    nested_core(tmp_path / "core", [v], VENDORS[vendor])
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    assert rc == 0
    j = json.loads(out)["vcpus"][0]
    assert j["guest_mode"] is True and j["level"] == 2
    assert j["regs"]["rip"] == h(v["regs"]["rip"]) == "0x2000"
    assert j["sregs"]["cr3"] == "0x3000"
    assert j["l1"]["regs"]["rip"] == h(v["l1_regs"]["rip"]) == "0xffffffff81e00000"
    assert j["l1"]["regs"]["rsp"] == "0xffffc90000008000"
    assert j["l1"]["sregs"]["cr3"] == "0x5000000"
    assert j["exit"]["level"] == 2
    n = j["nested"]
    assert n["format"] == vendor and n["nested_run_pending"] is False
    assert "guest_mode" in n["flags_names"]
    assert n["nested_paging"]["enabled"] is True
    if vendor == "vmx":
        assert n["vmx"]["vmxon_pa"] == "0x4000" and n["vmx"]["vmcs12_pa"] == "0x6000"
        assert n["l1_last_exit"]["exit_reason"] == 48
        assert n["nested_paging"]["root"] == "0x701e"
        assert n["vmcs12"]["host_rip"] == "0xffffffff81e00000"
    else:
        assert n["svm"]["vmcb_pa"] == "0x6000"
        assert n["l1_last_exit"]["exit_code"] == "0x400"
        assert n["nested_paging"]["root"] == "0x7000"


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("level", [1, 2])
def test_read_level_picks_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              vendor: str, level: int) -> None:
    v = cb.nested_vcpu(0, VENDORS[vendor])
    nested_core(tmp_path / "core", [v], VENDORS[vendor])
    rc, out, _ = run(capsys, "read", "--level", str(level), str(tmp_path / "core"))
    assert rc == 0
    l1, l2 = "L1 (hypervisor) registers", "L2 (nested guest) registers"
    want, other = (l1, l2) if level == 1 else (l2, l1)
    assert f"  {want}" in out and other not in out
    rips = [ln.split()[1] for ln in out.splitlines() if ln.startswith("    RIP ")]
    assert rips == [f"{(v['l1_regs'] if level == 1 else v['regs'])['rip']:#018x}"]
    rc, out, _ = run(capsys, "read", "--json", "--level", str(level), str(tmp_path / "core"))
    j = json.loads(out)["vcpus"][0]
    assert j["level"] == level and "l1" not in j
    assert j["regs"]["rip"] == h((v["l1_regs"] if level == 1 else v["regs"])["rip"])
    assert j["sregs"]["cr3"] == h((v["l1_sregs"] if level == 1 else v["sregs"])["cr3"])


def test_read_level_2_of_a_vcpu_not_in_guest_mode(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    nested_core(tmp_path / "core", [cb.sample_vcpu(0)], S.KVM_CORE_VENDOR_VMX)
    rc, out, _ = run(capsys, "read", "--level", "2", str(tmp_path / "core"))
    assert rc == 0 and "  not in guest mode: no nested guest (L2) registers" in out
    assert "RIP" not in out


@pytest.mark.parametrize("vendor", VENDORS)
def test_read_nested_state_outside_guest_mode(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              vendor: str) -> None:
    v = cb.nested_vcpu(0, VENDORS[vendor], guest_mode=False)
    nested_core(tmp_path / "core", [v], VENDORS[vendor])
    rc, out, _ = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 0
    assert "guest mode:" not in out and "L1 (hypervisor)" not in out
    assert f"  RIP {v['regs']['rip']:#018x}" in out       # the one level, as before
    assert f"  nested state ({vendor}): flags" in out
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    j = json.loads(out)["vcpus"][0]
    assert j["guest_mode"] is False and j["level"] == 1 and "l1" not in j
    assert j["nested"]["format"] == vendor and "guest_mode" not in j["nested"]["flags_names"]


def test_read_corrupt_nested_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v = cb.nested_vcpu(0, S.KVM_CORE_VENDOR_VMX)
    raw = bytearray(v["nested"])
    raw[4:8] = (len(raw) + 8).to_bytes(4, "little")    # header.size past the payload
    v["nested"] = bytes(raw)
    nested_core(tmp_path / "core", [v], S.KVM_CORE_VENDOR_VMX)
    rc, out, err = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert "kvm_nested_state.size" in err
