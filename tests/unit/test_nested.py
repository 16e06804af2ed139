"""Nested virtualization (note format 1.2): `kvmnote read` shows both levels of a vCPU
in guest mode, the NESTED record, and --level picks one; `kvmnote vmcore` uses L1's
state by default and writes the nested guest's with --level 2."""

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

import corebuilder as cb
from kvmnote import schema as S
from test_cli import run

VENDORS = {"vmx": S.KVM_CORE_VENDOR_VMX, "svm": S.KVM_CORE_VENDOR_SVM}


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
    assert bytes.fromhex(n["data_hex"]) == v["nested"][128:]   # as cb.nested_vcpu built it
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


# --- kvmnote vmcore ---------------------------------------------------------------------

from test_vmcore import (USER_REGS, elf_notes, guest_read, info_note, make_core,  # noqa: E402
                         one_line_error)
from test_vmcore import run as vmcore_run  # noqa: E402

L2_BASE = 1 << 30          # where the hand-built tables map the nested guest's memory
PRESENT = 0x7              # EPT R/W/X; NPT P/RW/US


def u64s(entries: dict[int, int]) -> bytes:
    """A 4096-byte table page: entry index -> value."""
    page = bytearray(4096)
    for i, e in entries.items():
        page[i * 8:i * 8 + 8] = e.to_bytes(8, "little")
    return bytes(page)


def tables(root: int = 0x7000) -> dict[int, bytes]:
    """L1 guest RAM (gpa -> bytes) holding a 4-level table at `root` that maps L2 GPAs:
    L2_BASE + 0 -> L1 0x10000 ("A" page), + 0x1000 -> 0x20000 ("B"), + 0x5000 -> 0x11000
    ("C"), + 0x7000 -> 0x5000000 (outside guest RAM), + 0x9000 -> 0x12000 ("D", execute
    only: present for EPT, not for NPT), + 0x14000 -> 0x1ff000 ("E", the last page of a
    2 MiB slot 0) and + 0x15000 -> 0x200000 (past it: one L1-contiguous run, half in the
    core), and a 2 MiB page at L2_BASE + 6 MiB -> L1 0."""
    return {root: u64s({0: 0x8000 | PRESENT}),                   # PML4[0] -> PDPT
            0x8000: u64s({1: 0x9000 | PRESENT}),                 # PDPT[1] (1 GiB) -> PD
            0x9000: u64s({0: 0xA000 | PRESENT, 3: 0x0 | 0x80 | PRESENT}),   # PD[3]: 2M
            0xA000: u64s({0: 0x10000 | PRESENT, 1: 0x20000 | PRESENT, 5: 0x11000 | PRESENT,
                          7: 0x5000000 | PRESENT, 9: 0x12000 | 0x4,
                          20: 0x1FF000 | PRESENT, 21: 0x200000 | PRESENT}),  # PT
            0x10000: b"A" * 4096, 0x20000: b"B" * 4096, 0x11000: b"C" * 4096,
            0x12000: b"D" * 4096, 0x1FF000: b"E" * 4096}


@pytest.mark.parametrize("vendor", VENDORS)
def test_vmcore_default_uses_l1_state(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      vendor: str) -> None:
    vcpus = [cb.nested_vcpu(0, VENDORS[vendor]), cb.sample_vcpu(1, VENDORS[vendor])]
    make_core(tmp_path / "core", vcpus, ram={0x30000: info_note(b"OSRELEASE=6.12\n")})
    rc, err = vmcore_run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"))
    assert rc == 0
    assert err == ("kvmnote: vCPU 0 (CPU 0) was running a nested guest: using L1's state "
                   "(registers, CR3) as the nested VM exit will load it; --level 2 writes the "
                   "nested guest's vmcore\n"
                   "kvmnote: warning: vCPU 0 (CPU 0): L1's frame pointer was not found on its "
                   "stack at RSP 0xffffc90000008000: RBP is L2's, as the VM entry left it, and "
                   "a debugger may not unwind past L1's VM-entry function\n")
    notes = elf_notes(tmp_path / "vmcore")
    pr = [dict(zip(USER_REGS, struct.unpack_from("<27Q", d, 112))) for n, t, d in notes
          if t == 1 and n == b"CORE"]
    # the L1 record's values as cb.nested_vcpu put them in, not L2's (RIP 0x2000)
    assert (pr[0]["rip"], pr[0]["rsp"], pr[0]["eflags"], pr[0]["rax"]) == (
        0xFFFFFFFF81E00000, 0xFFFFC90000008000, 0x2, 0xA1A1)
    assert (pr[1]["rip"], pr[1]["rsp"]) == (vcpus[1]["regs"]["rip"], vcpus[1]["regs"]["rsp"])
    qemu = [d for n, t, d in notes if n == b"QEMU"]
    cr = struct.unpack_from("<5Q", qemu[0], 8 + 18 * 8 + 10 * 24)
    assert cr[3] == 0x5000000                     # L1's CR3, not L2's 0x3000


def l1_memory(cr3: int, data: dict[int, bytes]) -> dict[int, bytes]:
    """L1 guest RAM holding `data` (L1 virtual address -> bytes, within a page) and a
    4-level table at `cr3` that maps each page of it, tables and pages from cr3 up."""
    ram: dict[int, bytearray] = {cr3: bytearray(4096)}
    nxt = [cr3 + 0x1000]

    def new() -> int:
        nxt[0] += 0x1000
        ram[nxt[0] - 0x1000] = bytearray(4096)
        return nxt[0] - 0x1000

    for va, b in data.items():
        table = cr3
        for shift in (39, 30, 21, 12):
            i = (va >> shift & 511) * 8
            entry = int.from_bytes(ram[table][i:i + 8], "little")
            if not entry:
                entry = new() | 3
                ram[table][i:i + 8] = entry.to_bytes(8, "little")
            table = entry & ~0xFFF
        ram[table][va & 0xFFF:(va & 0xFFF) + len(b)] = b
    return {g: bytes(b) for g, b in ram.items()}


def call_into(rip: int, ret: int) -> bytes:
    """The 5 bytes before return address `ret`: a direct call of a function at rip - 0x20."""
    return b"\xe8" + (rip - 0x20 - ret).to_bytes(4, "little", signed=True)


def q(*words: int) -> bytes:
    return b"".join(w.to_bytes(8, "little") for w in words)


@pytest.mark.parametrize("vendor", VENDORS)
def test_vmcore_l1_frame_pointer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 vendor: str) -> None:
    """The nested VM exit leaves L2's RBP in L1's: the vmcore gets L1's frame pointer,
    the slot below the return address of the call into the function RIP is in (as
    __svm_vcpu_run / __vmx_vcpu_run leave it: RSP + 0x40)."""
    v = cb.nested_vcpu(0, VENDORS[vendor])
    rsp, rip = v["l1_regs"]["rsp"], v["l1_regs"]["rip"]
    v["l1_regs"]["rbp"] = 0x2B2B                  # L2's, as VMRUN / the VM exit leave it
    v["l1_sregs"]["cr3"] = 0x40000
    ret, other, nocall = 0xFFFFFFFF8123ABCD, 0xFFFFFFFF8123B002, 0xFFFFFFFF8124A010
    stack = q(0xFFFF888012345000, 0x1234000, 1,
              nocall,                             # code, but after no call
              other,                              # after a call of another function
              0, 0, 0, 0xFFFF888000001000,
              ret)                                # RSP + 0x48: the call into rip's
    mem = l1_memory(0x40000, {rsp: stack, ret - 5: call_into(rip, ret),
                              other - 5: b"\xe8" + (0x1000).to_bytes(4, "little"),
                              nocall - 5: b"\x90" + call_into(rip, nocall)[1:]})
    make_core(tmp_path / "core", [v], ram=mem)
    rc, err = vmcore_run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"))
    assert rc == 0, err
    assert (f"vCPU 0 (CPU 0): RBP {rsp + 0x40:#x}, L1's frame pointer (RSP + 0x40 on its "
            f"stack), for unwinders; the register held L2's RBP 0x2b2b") in err
    pr = [dict(zip(USER_REGS, struct.unpack_from("<27Q", d, 112)))
          for n, t, d in elf_notes(tmp_path / "vmcore") if t == 1 and n == b"CORE"]
    assert (pr[0]["rbp"], pr[0]["rsp"], pr[0]["rip"]) == (rsp + 0x40, rsp, rip)
    # kvmnote read shows the register as the note has it
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    assert json.loads(out)["vcpus"][0]["l1"]["regs"]["rbp"] == "0x2b2b"


@pytest.mark.parametrize("rsp,at_ret", [
    (0xFFFFC90000008000, None),                   # the frame is past FRAME_SCAN (0x200)
    (0xFFFFC90000008FE0, None),                   # the stack runs into an unmapped page
    (0xFFFFC90000008000, b"\xe8\0\0\0\0"),        # a call, of the next instruction
])
def test_vmcore_l1_frame_pointer_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           rsp: int, at_ret: bytes | None) -> None:
    """No frame found: RBP stays, and the user is told."""
    v = cb.nested_vcpu(0, S.KVM_CORE_VENDOR_SVM)
    v["l1_regs"]["rsp"], v["l1_sregs"]["cr3"] = rsp, 0x40000
    ret = 0xFFFFFFFF8123ABCD
    words = [0xFFFF888012345000] * 4 if rsp & 0xFFF else [0xFFFF888012345000] * 64 + [ret]
    if at_ret:
        words = [0, ret]
    mem = l1_memory(0x40000, {rsp: q(*words),
                              ret - 5: at_ret or call_into(v["l1_regs"]["rip"], ret)})
    make_core(tmp_path / "core", [v], ram=mem)
    rc, err = vmcore_run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"))
    assert rc == 0 and f"L1's frame pointer was not found on its stack at RSP {rsp:#x}: " \
        "RBP is L2's" in err
    pr = [dict(zip(USER_REGS, struct.unpack_from("<27Q", d, 112)))
          for n, t, d in elf_notes(tmp_path / "vmcore") if t == 1 and n == b"CORE"]
    assert pr[0]["rbp"] == v["l1_regs"]["rbp"]


def test_vmcore_old_core_in_guest_mode_warns(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    v = cb.sample_vcpu(0)
    v["vcpu"]["status"] |= S.KVM_CORE_VCPU_GUEST_MODE       # a 1.1 core: no L1 records
    make_core(tmp_path / "core", [v])
    rc, err = vmcore_run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"))
    assert rc == 0 and "was running a nested guest and this core (note format 1.2) has no " \
        "L1 state: its registers are the nested guest's (L2's)" in err


@pytest.mark.parametrize("vendor", VENDORS)
def test_vmcore_level2_translates_through_l1_tables(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    vendor: str) -> None:
    ram = tables()
    ram[0x30000] = info_note(b"OSRELEASE=6.12-l2\n")     # inside the 2 MiB page: L2 too
    vcpus = [cb.nested_vcpu(0, VENDORS[vendor]), cb.nested_vcpu(1, VENDORS[vendor]),
             cb.sample_vcpu(2, VENDORS[vendor])]
    make_core(tmp_path / "core", vcpus, ram=ram, slot_sizes=(2 << 20, 1 << 20))
    out = tmp_path / "l2.vmcore"
    rc, err = vmcore_run(capsys, str(tmp_path / "core"), "-o", str(out), "--level", "2")
    assert rc == 1, err              # L2 page 7 maps L1 memory outside the memslots
    assert "vCPU 2 not in guest mode (running L1, not the nested guest): left out" in err
    assert f"{L2_BASE + 0x7000:#x}-{L2_BASE + 0x7fff:#x} (4096 bytes)" in err
    assert f"{L2_BASE + 0x15000:#x}-{L2_BASE + 0x15fff:#x} (4096 bytes)" in err
    assert guest_read(out, L2_BASE + 0x14000, 4096) == b"E" * 4096
    assert guest_read(out, L2_BASE + 0x15000, 4096) == bytes(4096)
    assert guest_read(out, L2_BASE, 4096) == b"A" * 4096
    assert guest_read(out, L2_BASE + 0x1000, 4096) == b"B" * 4096
    assert guest_read(out, L2_BASE + 0x5000, 4096) == b"C" * 4096
    assert guest_read(out, L2_BASE + 0x7000, 4096) == bytes(4096)
    big = L2_BASE + (6 << 20)
    assert guest_read(out, big + 0x10000, 4096) == b"A" * 4096
    assert guest_read(out, big + 0x8008, 8) == (0x9000 | PRESENT).to_bytes(8, "little")
    with pytest.raises(AssertionError, match="not in any PT_LOAD"):
        guest_read(out, L2_BASE + 0x2000, 1)       # PT[2] not present
    if vendor == "vmx":    # execute-only: an EPT mapping, not an NPT one
        assert guest_read(out, L2_BASE + 0x9000, 4096) == b"D" * 4096
    else:
        with pytest.raises(AssertionError, match="not in any PT_LOAD"):
            guest_read(out, L2_BASE + 0x9000, 1)
    notes = elf_notes(out)
    pr = [dict(zip(USER_REGS, struct.unpack_from("<27Q", d, 112))) for n, t, d in notes
          if t == 1 and n == b"CORE"]
    assert [p["rip"] for p in pr] == [vcpus[0]["regs"]["rip"], vcpus[1]["regs"]["rip"]] \
        == [0x2000, 0x2001]
    assert (b"VMCOREINFO", 0, b"OSRELEASE=6.12-l2\n") in [(n, t, d.rstrip(b"\0"))
                                                          for n, t, d in notes]


def test_vmcore_level2_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    core, out = tmp_path / "core", str(tmp_path / "vmcore")
    make_core(core, [cb.sample_vcpu(0), cb.nested_vcpu(1, 1, guest_mode=False)])
    err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2"))
    assert "no vCPU was running a nested guest (none in guest mode)" in err
    for vendor, what in ((1, "EPT off in vmcs12"), (2, "nested paging off in vmcb12")):
        make_core(core, [cb.nested_vcpu(0, vendor, paging_root=None)])
        err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2"))
        assert f"L1 runs its nested guest with shadow paging ({what})" in err
    for vendor, name in ((1, "EPTP"), (2, "nCR3")):
        make_core(core, [cb.nested_vcpu(0, vendor), cb.nested_vcpu(1, vendor,
                                                                    paging_root=0xB000)])
        err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2"))
        assert f"the vCPUs in guest mode disagree about the {name} (0x7000: vCPU 0; " \
            f"0xb000: vCPU 1)" in err
    v = cb.nested_vcpu(0, 2)                 # NPT of an L1 outside long mode
    raw = bytearray(v["nested"])
    raw[128 + 0x400 + 0xD0:128 + 0x400 + 0xD8] = bytes(8)   # vmcb01 save area EFER
    v["nested"] = bytes(raw)
    make_core(core, [v])
    err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2"))
    assert "L1 is not in 64-bit mode (EFER.LMA clear in vmcb01)" in err
    v = cb.nested_vcpu(0, 1)
    raw = bytearray(v["nested"])
    raw[128 + 120:128 + 128] = (0x7000 | 1 << 3 | 6).to_bytes(8, "little")  # walk length 2
    v["nested"] = bytes(raw)
    make_core(core, [v])
    err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2"))
    assert "asks for a 2-level EPT walk; only 4 and 5 exist" in err
    v = cb.sample_vcpu(0)
    v["vcpu"]["status"] |= S.KVM_CORE_VCPU_GUEST_MODE       # 1.1: no NESTED record
    make_core(core, [v])
    err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2"))
    assert "has no vmcs12 / vmcb12 for it" in err
    make_core(core, [cb.nested_vcpu(0, 1)])
    err = one_line_error(*vmcore_run(capsys, str(core), "-o", out, "--level", "2",
                                     "--format", "kdump"))
    assert "--level 2 writes the nested guest's vmcore as ELF only" in err
    assert not os.path.exists(out)


def test_read_vmx_without_current_vmcs12(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """After VMXON, before VMPTRLD: vmcs12_pa is -1 and there is no vmcs12 data."""
    v = cb.sample_vcpu(0)
    v["nested"] = cb.nested_state(S.KVM_STATE_NESTED_FORMAT_VMX, 0,
                                  {"vmxon_pa": 0x4000, "vmcs12_pa": (1 << 64) - 1})
    nested_core(tmp_path / "core", [v], S.KVM_CORE_VENDOR_VMX)
    rc, out, _ = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 0
    assert "  nested state (vmx): flags 0x0 [], vmxon 0x4000, vmcs12 none" in out.splitlines()
    assert "L1's last exit" not in out and "EPT" not in out
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    n = json.loads(out)["vcpus"][0]["nested"]
    assert n["vmx"]["vmcs12_pa"] == "0xffffffffffffffff" and "vmcs12" not in n


def test_kdump_default_uses_l1_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--format kdump writes the same CPU notes as the ELF output: L1's registers."""
    from test_kdump import Kdump
    make_core(tmp_path / "core", [cb.nested_vcpu(0, S.KVM_CORE_VENDOR_VMX)])
    rc, err = vmcore_run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                         "--format", "kdump")
    assert rc == 0 and "vCPU 0 (CPU 0) was running a nested guest: using L1's state" in err
    notes = Kdump(tmp_path / "k").notes
    namesz, descsz, ntype = struct.unpack_from("<III", notes, 0)
    assert (notes[12:16], ntype) == (b"CORE", 1)
    d0 = 12 + (namesz + 3) // 4 * 4
    regs = dict(zip(USER_REGS, struct.unpack_from("<27Q", notes, d0 + 112)))
    assert (regs["rip"], regs["rsp"]) == (0xFFFFFFFF81E00000, 0xFFFFC90000008000)


def test_triage_labels_the_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v = cb.nested_vcpu(0, S.KVM_CORE_VENDOR_SVM)
    nested_core(tmp_path / "core", [v, cb.sample_vcpu(1, S.KVM_CORE_VENDOR_SVM)],
                S.KVM_CORE_VENDOR_SVM)
    rc, out, _ = run(capsys, "triage", str(tmp_path / "core"))
    assert rc == 0
    assert ("  vCPU 0: in a nested guest (L2): long 64-bit CPL 0, RIP 0x2000, RSP 0x2f00, last "
            "exit HLT (0x78) to KVM; its hypervisor (L1) at the nested VM exit: long 64-bit "
            "CPL 0, RIP 0xffffffff81e00000, RSP 0xffffc90000008000, status valid guest_mode"
            ) in out.splitlines()
    assert "  vCPU 1: long 64-bit CPL 0, RIP 0xffffffff81000002" in out
    rc, out, _ = run(capsys, "triage", "--json", str(tmp_path / "core"))
    cpus = json.loads(out)["vms"][0]["vcpus"]
    assert cpus[0]["guest_mode"] is True and cpus[0]["rip"] == "0x2000"
    assert cpus[0]["l1"]["rip"] == "0xffffffff81e00000"
    assert "guest_mode" not in cpus[1] and "l1" not in cpus[1]


def test_read_guest_mode_in_a_core_before_1_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A 1.1 core marks guest mode but has no L1 records: the registers are labelled L2's,
    and --level 1 says L1's are not there rather than showing L2's."""
    v = cb.sample_vcpu(0)
    v["vcpu"]["status"] |= S.KVM_CORE_VCPU_GUEST_MODE
    nested_core(tmp_path / "core", [v], S.KVM_CORE_VENDOR_VMX)
    rc, out, _ = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 0 and "  L2 (nested guest) registers:" in out and "L1 (hypervisor)" not in out
    rc, out, _ = run(capsys, "read", "--level", "1", str(tmp_path / "core"))
    assert "  L1 registers: not in this core (note format before 1.2)" in out.splitlines()
    assert "RIP" not in out
    rc, out, _ = run(capsys, "read", "--json", "--level", "1", str(tmp_path / "core"))
    j = json.loads(out)["vcpus"][0]
    assert j["level"] == 1 and "regs" not in j and "sregs" not in j
