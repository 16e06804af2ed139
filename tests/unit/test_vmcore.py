"""`kvmnote vmcore`: synthetic VMM cores in, guest vmcores out, checked with pyelftools and
struct against the values the test put in (never against kvmnote's own parser)."""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import zstandard
from elftools.elf.elffile import ELFFile

import corebuilder as cb
from testlib import need
from kvmnote import schema as S
from kvmnote.cli import main

UADDR = 0x7F0000000000
PAGE = 4096
USER_REGS = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs "
             "eflags rsp ss fs_base gs_base ds es fs gs").split()
INFO = b"OSRELEASE=6.12.0-test\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0b000\n"
KERNEL_GS_BASE = 0xFFFF888007A00000


def info_note(text: bytes) -> bytes:
    """The kernel's VMCOREINFO ELF note as it lies in guest RAM."""
    return (struct.pack("<III", 11, len(text), 0) + b"VMCOREINFO\0\0" + text
            + bytes(-len(text) % 4))


def vcpu(vcpu_id: int, status: int = S.KVM_CORE_VCPU_VALID) -> dict[str, Any]:
    """sample_vcpu values with MSR_KERNEL_GS_BASE and `status`."""
    v = cb.sample_vcpu(vcpu_id, tid=5000 + vcpu_id)
    v["vcpu"]["status"] = status
    v["msrs"].append((0xC0000102, KERNEL_GS_BASE + vcpu_id))
    if not status & S.KVM_CORE_VCPU_VALID:
        v["vcpu"]["error"] = S.KVM_CORE_ERR_BUSY
    return v


def make_core(path: Path, vcpus: list[dict[str, Any]] | None = None,
              ram: dict[int, bytes] | None = None, slot_sizes: tuple[int, int] = (1 << 20, 4 << 20),
              nr_vms: int = 1, slots: list[dict[str, int]] | None = None,
              smram: bytes = b"") -> dict[str, Any]:
    """A VMM core: RAM slot 0 at gpa 0 and slot 1 at 4 GiB (`ram`: gpa -> bytes), and
    SMRAM (as_id 1) over slot 0, whose memory is in the core when `smram` is given."""
    vcpus = vcpus if vcpus is not None else [vcpu(0), vcpu(1)]
    s0, s1 = slot_sizes
    u1 = UADDR + (1 << 30)
    if slots is None:
        slots = [cb.memslot(0, 0, s0, UADDR), cb.memslot(1, 1 << 32, s1, u1),
                 cb.memslot(2, 0, s0, UADDR + (2 << 30), as_id=1)]  # SMRAM: never written
    img0, img1 = bytearray(s0), bytearray(s1)
    for gpa, data in (ram or {}).items():
        img, off = (img0, gpa) if gpa < s0 else (img1, gpa - (1 << 32))
        img[off:off + len(data)] = data
    notes = cb.prpsinfo(4242, "qemu-system-x86") + cb.siginfo(11)
    notes += b"".join(cb.prstatus(v["vcpu"]["tid"]) for v in vcpus)
    for i in range(nr_vms):
        vm = {"vm_index": i, "vendor": 1, "nr_vcpus": len(vcpus), "vm_type": 0, "flags": 0,
              "pid": 4242, "reserved": 0}
        notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, slots)))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
                      for v in vcpus)
    loads = [cb.Load(UADDR, s0, s0, bytes(img0)), cb.Load(u1, s1, s1, bytes(img1))]
    if smram:
        loads.append(cb.Load(UADDR + (2 << 30), s0, s0, smram))
    cb.write_core(path, notes, loads)
    return {"vcpus": vcpus, "slots": [(0, s0), (1 << 32, s1)], "img": [bytes(img0), bytes(img1)]}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """main(["vmcore", ...]): (exit status, stderr); stdout must stay empty."""
    try:
        rc = main(["vmcore", *argv])
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    assert out == ""
    return rc, err


def one_line_error(rc: int, err: str) -> str:
    """Assert a one-line `kvmnote: ` error with exit 2; return it."""
    assert rc == 2, err
    assert err.startswith("kvmnote: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def elf_notes(path: Path) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, desc) of every note of the first program header (which is PT_NOTE)."""
    with open(path, "rb") as f:
        seg = ELFFile(f).get_segment(0)
        assert seg["p_type"] == "PT_NOTE"
        data = seg.data()
    out, off = [], 0
    while off < len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        name = data[off + 12:off + 12 + namesz - 1]
        d0 = off + 12 + (namesz + 3) // 4 * 4
        out.append((name, ntype, data[d0:d0 + descsz]))
        off = d0 + (descsz + 3) // 4 * 4
    return out


def guest_read(path: Path, gpa: int, size: int) -> bytes:
    """Guest-physical bytes of a vmcore through its PT_LOADs' p_paddr."""
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            start, end = seg["p_paddr"], seg["p_paddr"] + seg["p_filesz"]
            if seg["p_type"] == "PT_LOAD" and start <= gpa < end:
                f.seek(seg["p_offset"] + gpa - seg["p_paddr"])
                return f.read(size)
    raise AssertionError(f"{gpa:#x} not in any PT_LOAD")


def test_layout_like_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = make_core(tmp_path / "core", ram={0x1000: b"hello", (1 << 32) + 0x2000: b"high"})
    rc, _ = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0
    with open(tmp_path / "vmcore", "rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_X86_64"
        segs = list(elf.iter_segments())
        assert segs[0]["p_type"] == "PT_NOTE"
        got = [(s["p_paddr"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_align"])
               for s in segs[1:]]
        assert all(s["p_type"] == "PT_LOAD" for s in segs[1:])
    assert got == [(g, g, n, n, 0) for g, n in want["slots"]]   # no SMRAM (as_id 1)
    assert guest_read(tmp_path / "vmcore", 0x1000, 5) == b"hello"
    assert guest_read(tmp_path / "vmcore", (1 << 32) + 0x2000, 4) == b"high"
    assert guest_read(tmp_path / "vmcore", 0, 4096) == bytes(4096)


def test_smram_left_out_and_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SMRAM (as_id 1) over normal RAM, with its own bytes in the core, and a vCPU
    inside SMM: the vmcore holds address space 0, and a warning says that the vCPU's
    interrupted state is in the SMRAM it left out."""
    in_smm = vcpu(1)
    in_smm["events"]["smi"]["smm"] = 1
    make_core(tmp_path / "core", vcpus=[vcpu(0), in_smm], ram={0x8000: b"normal"},
              smram=bytes(0x8000) + b"SMRAM!")
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0, err
    assert guest_read(tmp_path / "vmcore", 0x8000, 6) == b"normal"
    with open(tmp_path / "vmcore", "rb") as f:
        loads = [(s["p_paddr"], s["p_filesz"]) for s in ELFFile(f).iter_segments()
                 if s["p_type"] == "PT_LOAD"]
    assert [ld for ld in loads if ld[0] <= 0x8000 < ld[0] + ld[1]] == [(0, 1 << 20)], loads
    assert "vCPU 1 (CPU 1) was in SMM" in err and "SMRAM (address space 1)" in err
    assert "vCPU 0 (CPU 0) was in SMM" not in err and err.count("\n") == 1, err


def test_smm_flag_needs_valid_bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """events.smi means nothing without KVM_VCPUEVENT_VALID_SMM in events.flags."""
    v = vcpu(0)
    v["events"]["smi"]["smm"], v["events"]["flags"] = 1, 0x7
    make_core(tmp_path / "core", vcpus=[v])
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0 and "was in SMM" not in err, err


def _info_file(tmp_path: Path, text: bytes = INFO) -> Path:
    (tmp_path / "info").write_bytes(text)
    return tmp_path / "info"


def test_prstatus_per_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = make_core(tmp_path / "core")
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0 and err == ""
    notes = elf_notes(tmp_path / "vmcore")
    assert [(n, t, len(d)) for n, t, d in notes] == [
        (b"CORE", 1, 336), (b"CORE", 1, 336), (b"QEMU", 0, 440), (b"QEMU", 0, 440),
        (b"VMCOREINFO", 0, len(INFO))]
    for cpu, (_, _, desc) in enumerate(notes[:2]):
        v = want["vcpus"][cpu]
        regs, sregs = v["regs"], v["sregs"]
        assert struct.unpack_from("<i", desc, 32)[0] == cpu + 1
        got = dict(zip(USER_REGS, struct.unpack_from("<27Q", desc, 112)))
        expect = {r: regs[r] for r in USER_REGS if r in regs}
        expect.update(orig_rax=0, eflags=regs["rflags"], fs_base=sregs["fs"]["base"],
                      gs_base=sregs["gs"]["base"],
                      **{s: sregs[s]["selector"] for s in ("cs", "ss", "ds", "es", "fs", "gs")})
        assert got == expect
        assert desc[:32] == bytes(32) and desc[36:112] == bytes(76) and desc[328:] == bytes(8)


def test_qemu_cpustate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = make_core(tmp_path / "core")
    rc, _ = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0
    for cpu, (_, _, d) in enumerate(elf_notes(tmp_path / "vmcore")[2:4]):
        v = want["vcpus"][cpu]
        regs, sregs = v["regs"], v["sregs"]
        assert struct.unpack_from("<II", d, 0) == (1, 440)
        names = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"
        assert struct.unpack_from("<18Q", d, 8) == tuple(regs[n] for n in names.split())
        # Every sample segment: type 11, s, present, l, g, dpl 0, db 0 -> QEMU's
        # DESC_* bits: type << 8 | S (1<<12) | P (1<<15) | L (1<<21) | G (1<<23).
        flags = 11 << 8 | 1 << 12 | 1 << 15 | 1 << 21 | 1 << 23
        for i, name in enumerate(("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr")):
            seg = struct.unpack_from("<IIIIQ", d, 152 + 24 * i)
            s = sregs[name]
            assert seg == (s["selector"], s["limit"], flags, 0, s["base"]), name
        for i, name in enumerate(("gdt", "idt")):
            seg = struct.unpack_from("<IIIIQ", d, 152 + 24 * (8 + i))
            assert seg == (0, sregs[name]["limit"], 0, 0, sregs[name]["base"]), name
        assert struct.unpack_from("<5Q", d, 392) == (sregs["cr0"], 0, sregs["cr2"],
                                                     sregs["cr3"], sregs["cr4"])
        assert struct.unpack_from("<Q", d, 432)[0] == KERNEL_GS_BASE + cpu


def test_unusable_segment_not_present(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v = vcpu(0)
    v["sregs"]["ldt"] = dict(v["sregs"]["ldt"], unusable=1, type=2, s=0, l=0, g=0)
    make_core(tmp_path / "core", vcpus=[v])
    assert run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
               "--vmcoreinfo", str(_info_file(tmp_path)))[0] == 0
    d = elf_notes(tmp_path / "vmcore")[1][2]
    assert struct.unpack_from("<I", d, 152 + 24 * 6 + 8)[0] == 2 << 8   # no P bit


def test_zero_pages_are_holes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytes(range(256)) * 16
    make_core(tmp_path / "core", ram={0x5000: data, (1 << 32) + 0x300000: data},
              slot_sizes=(1 << 20, 64 << 20))
    rc, _ = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0
    out = tmp_path / "vmcore"
    assert out.stat().st_size > 65 << 20
    assert out.stat().st_blocks * 512 <= 64 << 10   # two data pages + headers, not 65 MiB
    fd = os.open(out, os.O_RDONLY)
    try:
        with open(out, "rb") as f:
            segs = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
        base = segs[0]["p_offset"]
        assert os.lseek(fd, base, os.SEEK_DATA) == base + 0x5000
        assert os.lseek(fd, base + 0x5000, os.SEEK_HOLE) == base + 0x6000
    finally:
        os.close(fd)
    assert guest_read(out, 0x5000, 4096) == data
    assert guest_read(out, (1 << 32) + 0x300000, 4096) == data


def test_vmcoreinfo_found_in_ram_without_crashtime(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    filler = b"".join(b"NUMBER(filler%d)=%d\n" % (i, i) for i in range(250))
    text = INFO + b"CRASHTIME=1700000000\n" + filler
    assert 4096 < len(text) < 8192
    # Page-aligned (as Linux allocates it), in the last page before a 1 MiB boundary of
    # slot 1 so that its text goes on in the next read; after decoys (no OSRELEASE=,
    # not page-aligned).
    at = (1 << 32) + (1 << 20) - PAGE
    decoy = struct.pack("<III", 11, 8, 0) + b"VMCOREINFO\0\0NOTHING="
    make_core(tmp_path / "core", ram={0x3000: decoy, 0x5010: info_note(b"OSRELEASE=x\n"),
                                      at: info_note(text)})
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"))
    assert rc == 0 and err == ""
    name, ntype, desc = elf_notes(tmp_path / "vmcore")[-1]
    assert (name, ntype) == (b"VMCOREINFO", 0)
    assert desc == INFO + filler


def test_vmcoreinfo_missing_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_core(tmp_path / "core")
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"))
    assert rc == 0 and "no VMCOREINFO" in err and "--vmcoreinfo" in err
    assert [n for n, _, _ in elf_notes(tmp_path / "vmcore")] == [b"CORE"] * 2 + [b"QEMU"] * 2


def test_vmcoreinfo_file_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_core(tmp_path / "core", ram={0x3000: info_note(b"OSRELEASE=other\n")})
    info = _info_file(tmp_path, INFO + b"CRASHTIME=1\n")
    assert run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
               "--vmcoreinfo", str(info))[0] == 0
    assert elf_notes(tmp_path / "vmcore")[-1][2] == INFO
    (tmp_path / "bad").write_text("hello\n")
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v2"),
                              "--vmcoreinfo", str(tmp_path / "bad")))
    assert "OSRELEASE=" in err and not (tmp_path / "v2").exists()


def test_truncated_core(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = b"\x5a" * PAGE
    make_core(tmp_path / "core", ram={0: data, (1 << 32): data, (1 << 32) + 0x2000: data})
    with open(tmp_path / "core", "rb") as f:
        last = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"][-1]
    cut = last["p_offset"] + 0x2000 + 100     # inside slot 1's third page
    os.truncate(tmp_path / "core", cut)
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 1
    first, lost = (1 << 32) + 0x2000 + 100, (4 << 20) - 0x2000 - 100
    assert f"missing {first:#x}-{first + lost - 1:#x} ({lost} bytes)" in err
    assert "truncated" in err and "Traceback" not in err
    out = tmp_path / "vmcore"
    assert guest_read(out, 0, PAGE) == data and guest_read(out, 1 << 32, PAGE) == data
    # What exists is written; the rest reads as zeros (and was reported).
    assert guest_read(out, first - 100, PAGE) == data[:100] + bytes(PAGE - 100)
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(out), "--force",
                  "--allow-partial", "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0 and f"missing {first:#x}" in err


def test_not_dumped_mapping_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slots = [cb.memslot(0, 0, 1 << 20, UADDR), cb.memslot(1, 1 << 32, 4 << 20, 0x10000000)]
    make_core(tmp_path / "core", slots=slots)   # slot 1's host range is in no PT_LOAD
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 1 and f"missing {1 << 32:#x}-{(1 << 32) + (4 << 20) - 1:#x}" in err
    assert "no PT_LOAD" in err


def test_compressed_input_same_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = INFO + b"CRASHTIME=5\n"
    make_core(tmp_path / "core", ram={0x7000: b"\x11" * 5000, 0x9000: info_note(text)})
    raw = (tmp_path / "core").read_bytes()
    (tmp_path / "core.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "a"))[0] == 0
    assert run(capsys, str(tmp_path / "core.zst"), "-o", str(tmp_path / "b"))[0] == 0
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert guest_read(tmp_path / "b", 0x7000, 5000) == b"\x11" * 5000


def test_truncated_compressed_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    low, high = os.urandom(256 << 10), os.urandom(256 << 10)   # incompressible
    make_core(tmp_path / "core", ram={0: low, (1 << 32) + (3 << 20): high})
    raw = (tmp_path / "core").read_bytes()
    comp = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "core.zst").write_bytes(comp[:len(comp) * 3 // 4])   # cut inside `high`
    rc, err = run(capsys, str(tmp_path / "core.zst"), "-o", str(tmp_path / "v"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "missing 0x" in ln]
    assert len(lines) == 1 and lines[0].split()[2].endswith(f"-{(1 << 32) + (4 << 20) - 1:#x}")
    start = int(lines[0].split()[2].split("-")[0], 16)
    assert (1 << 32) + (3 << 20) < start < (1 << 32) + (3 << 20) + len(high)
    assert guest_read(tmp_path / "v", 0, len(low)) == low
    n = start - (1 << 32) - (3 << 20)
    assert guest_read(tmp_path / "v", (1 << 32) + (3 << 20), n) == high[:n]


def test_refuses_overwrite_and_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_core(tmp_path / "core")
    info = str(_info_file(tmp_path))
    (tmp_path / "old").write_bytes(b"keep me")
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "old"),
                              "--vmcoreinfo", info))
    assert "--force" in err and (tmp_path / "old").read_bytes() == b"keep me"
    assert run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "old"), "--force",
               "--vmcoreinfo", info)[0] == 0
    assert (tmp_path / "old").read_bytes()[:4] == b"\x7fELF"
    before = (tmp_path / "core").read_bytes()
    os.link(tmp_path / "core", tmp_path / "hardlink")
    for target in ("core", "hardlink"):
        err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / target),
                                  "--force", "--vmcoreinfo", info))
        assert "input" in err
    assert (tmp_path / "core").read_bytes() == before


@pytest.mark.parametrize("cpu_map,want_order", [(None, [0, 2]), ("0=1,2=0", [2, 0])])
def test_cpu_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     cpu_map: str | None, want_order: list[int]) -> None:
    want = make_core(tmp_path / "core", vcpus=[vcpu(2), vcpu(0)])   # vcpu_id 2 written first
    rips = {v["vcpu"]["vcpu_id"]: v["regs"]["rip"] for v in want["vcpus"]}
    argv = [str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"), "--vmcoreinfo",
            str(_info_file(tmp_path))] + (["--cpu-map", cpu_map] if cpu_map else [])
    assert run(capsys, *argv)[0] == 0
    pr = [d for n, _, d in elf_notes(tmp_path / "vmcore") if n == b"CORE"]
    assert [struct.unpack_from("<i", d, 32)[0] for d in pr] == [1, 2]
    assert [struct.unpack_from("<Q", d, 112 + 8 * 16)[0] for d in pr] == \
        [rips[i] for i in want_order]


@pytest.mark.parametrize("cpu_map,msg", [("0=0", "unmapped [2]"), ("0=0,2=0", "same CPU"),
                                         ("0=0,2=1,5=2", "unknown [5]"), ("x", "VCPU_ID=CPU")])
def test_bad_cpu_map(tmp_path: Path, capsys: pytest.CaptureFixture[str], cpu_map: str,
                     msg: str) -> None:
    make_core(tmp_path / "core", vcpus=[vcpu(2), vcpu(0)])
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                              "--cpu-map", cpu_map))
    assert msg in err and not (tmp_path / "v").exists()


def test_vcpu_without_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_core(tmp_path / "core",
              vcpus=[vcpu(0), vcpu(1, S.KVM_CORE_VCPU_UNREADABLE)])
    info = str(_info_file(tmp_path))
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                              "--vmcoreinfo", info))
    assert "vCPU 1" in err and "unreadable" in err and "--allow-partial" in err
    assert not (tmp_path / "v").exists()
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"), "--vmcoreinfo",
                  info, "--allow-partial")
    assert rc == 0 and "warning" in err and "vCPU 1" in err and "zeros" in err
    pr = [d for n, _, d in elf_notes(tmp_path / "v") if n == b"CORE"]
    assert struct.unpack_from("<i", pr[1], 32)[0] == 2 and pr[1][112:] == bytes(224)


def test_several_vms_need_vm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_core(tmp_path / "core", nr_vms=2)
    info = str(_info_file(tmp_path))
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                              "--vmcoreinfo", info))
    assert "--vm N" in err
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                              "--vm", "7", "--vmcoreinfo", info))
    assert "vm_index 7" in err
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                              "--vm", "1", "--vmcoreinfo", info))
    assert "VM 1 has no vCPU notes" in err          # make_core's vCPUs are all VM 0's
    assert run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"), "--vm", "0",
               "--vmcoreinfo", info)[0] == 0


def test_no_memslots_and_no_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_core(tmp_path / "core", slots=[])
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v")))
    assert "no memslots" in err
    cb.write_core(tmp_path / "plain", cb.prstatus(1), [cb.Load(UADDR, PAGE, PAGE)])
    err = one_line_error(*run(capsys, str(tmp_path / "plain"), "-o", str(tmp_path / "v")))
    assert "no KVM notes" in err
    err = one_line_error(*run(capsys, str(tmp_path / "missing"), "-o", str(tmp_path / "v")))
    assert "no such file" in err and not (tmp_path / "v").exists()


def test_gdb_reads_registers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need(shutil.which("gdb") is not None, "gdb (apt-get install gdb)")
    want = make_core(tmp_path / "core")
    assert run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "vmcore"),
               "--vmcoreinfo", str(_info_file(tmp_path)))[0] == 0
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", "info registers rip rsp",
                          "-ex", "thread 2", "-ex", "info registers rip",
                          "-c", str(tmp_path / "vmcore")],
                         capture_output=True, text=True, timeout=60).stdout
    r0, r1 = want["vcpus"][0]["regs"], want["vcpus"][1]["regs"]
    assert f"rip            {r0['rip']:#x}" in out and f"rsp            {r0['rsp']:#x}" in out
    assert f"rip            {r1['rip']:#x}" in out


def test_disk_full_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need(os.geteuid() == 0, "root (to mount a tiny tmpfs)")
    make_core(tmp_path / "core", ram={0: os.urandom(1 << 20), 1 << 32: os.urandom(2 << 20)})
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(small / "v"),
                                  "--vmcoreinfo", str(_info_file(tmp_path))))
        assert "cannot write" in err and "No space left" in err
        assert not (small / "v").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


# One page of each kind: zero, data, and zeros that straddle a page boundary without
# filling a page (the case that makes a search for ZERO_PAGE match off a page start).
PAGE_KINDS = {
    "zero": bytes(4096),
    "data": b"\x5a" * 4096,
    "zero_tail": b"\x01" + bytes(4095),      # with the next zero_head: 8190 zeros
    "zero_head": bytes(4095) + b"\x02",
}


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(PAGE_KINDS)), min_size=1, max_size=24),
       tail=st.sampled_from([0, 1, 100, 4095]), tail_zero=st.booleans())
def test_writer_holes_exactly_the_zero_pages(tmp_path_factory: pytest.TempPathFactory,
                                              kinds: list[str], tail: int,
                                              tail_zero: bool) -> None:
    """_Writer against a page-by-page model: same bytes, holes exactly where a page (or the
    partial last page) is all zero."""
    from kvmnote.vmcore import _Writer
    data = b"".join(PAGE_KINDS[k] for k in kinds) + (bytes(tail) if tail_zero else b"\x07" * tail)
    path = tmp_path_factory.mktemp("w") / "out"
    base = 3 * 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _Writer(fd).write(base, bytearray(data))
        os.ftruncate(fd, base + -(-len(data) // 4096) * 4096 + 4096)
        assert os.pread(fd, len(data), base) == data
        for i in range(0, len(data), 4096):
            page = data[i:i + 4096]
            try:
                hole = os.lseek(fd, base + i, os.SEEK_DATA) > base + i
            except OSError:       # ENXIO: nothing but holes from here on
                hole = True
            assert hole == (page == bytes(len(page))), (i // 4096, kinds, tail, tail_zero)
    finally:
        os.close(fd)


@settings(max_examples=80, deadline=None)
@given(page=st.integers(1, 60), shift=st.sampled_from([0, 8, 4096 - 8, 100]),
       decoys=st.integers(0, 3))
def test_vmcoreinfo_scanner_only_page_aligned(page: int, shift: int, decoys: int) -> None:
    """Fed page-aligned chunks, the scanner finds the note at a page start in any chunk,
    and ignores copies of it off a page start and a page that only starts like it."""
    from kvmnote.vmcore import CHUNK, VmcoreinfoScanner
    text = b"OSRELEASE=6.12.0\nPAGESIZE=4096\n"
    note = S.build_note(S.VMCOREINFO_NOTE_NAME, 0, text)
    ram = bytearray(64 * 4096)
    for d in range(decoys):                 # off a page start: to be ignored
        at = 4096 * d + 24 + d
        ram[at:at + len(note)] = note
    ram[(page - 1) * 4096] = note[0]        # a page that only starts like the note
    at = page * 4096 + shift
    ram[at:at + len(note)] = note
    scan, base = VmcoreinfoScanner(), 0x100000
    for pos in range(0, len(ram), CHUNK // 4):
        scan.feed(base + pos, ram[pos:pos + CHUNK // 4])
    if (base + at) % 4096 == 0:
        assert scan.found == (base + at, text)
    else:
        assert scan.found is None


@pytest.mark.parametrize("what", ["memslot size", "memslot gpa", "load offset", "load vaddr"])
def test_impossible_sizes_are_one_line_errors(tmp_path: Path, what: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes and offsets near 2^63/2^64 (once OverflowError tracebacks): exit 2."""
    slots = None
    if what == "memslot size":
        slots = [cb.memslot(0, 0, (1 << 63) - PAGE, UADDR)]
    elif what == "memslot gpa":
        slots = [cb.memslot(0, (1 << 64) - PAGE, PAGE, UADDR)]
    make_core(tmp_path / "core", slots=slots)
    if what.startswith("load"):
        data = bytearray((tmp_path / "core").read_bytes())
        field = 8 if what == "load offset" else 16         # p_offset, p_vaddr
        struct.pack_into("<Q", data, 64 + 56 + field, (1 << 64) - 1)   # first PT_LOAD
        (tmp_path / "core").write_bytes(data)
    err = one_line_error(*run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v")))
    assert "corrupt" in err and not (tmp_path / "v").exists()


def test_duplicate_notes_first_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A duplicated VM note is not 'several VMs'; a duplicated vCPU note is one CPU, the
    first note's, with a warning (the same choice as `kvmnote read`)."""
    v0, v1 = vcpu(0), vcpu(1)
    other = vcpu(1)
    other["regs"]["rip"] = 0x1234
    make_core(tmp_path / "core", vcpus=[v0, v1, other], nr_vms=2)
    data = (tmp_path / "core").read_bytes()
    first = data.find(b"KVM\0")     # make_core's second VM note has vm_index 1: make it 0
    second = data.find(b"KVM\0", first + 4)
    rec = second + 4 + 16 + 8       # desc, header, VM record header: vm_index
    assert data[rec:rec + 4] == (1).to_bytes(4, "little")
    (tmp_path / "core").write_bytes(data[:rec] + bytes(4) + data[rec + 4:])
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0
    assert "second VM note with vm_index 0" in err and "second vCPU note for vcpu_id 1" in err
    prs = [d for name, t, d in elf_notes(tmp_path / "v") if name == b"CORE" and t == 1]
    assert len(prs) == 2
    rip = 112 + USER_REGS.index("rip") * 8
    assert struct.unpack_from("<Q", prs[1], rip)[0] == v1["regs"]["rip"]


# --- Guest RAM left out on purpose (dump-guest-core=off) against a cut core -------------

EXCLUDED_LINE = ("bytes of guest RAM excluded from the core by the VMM (MADV_DONTDUMP: QEMU "
                 "-machine dump-guest-core=off, libvirt's default), written as zeros; future "
                 "cores keep it with QEMU -machine dump-guest-core=on or libvirt "
                 "<memory dumpCore='on'/>\n")


def dontdump_core(path: Path) -> dict[str, Any]:
    """What QEMU's dump-guest-core=off gives: the PT_LOADs of guest RAM are there, with
    p_filesz 0 (MADV_DONTDUMP), the registers are all there."""
    vcpus = [vcpu(0), vcpu(1)]
    slots = [cb.memslot(0, 0, 1 << 20, UADDR), cb.memslot(1, 1 << 32, 4 << 20, UADDR + (1 << 30))]
    vm = {"vm_index": 0, "vendor": 1, "nr_vcpus": 2, "vm_type": 0, "flags": 0, "pid": 4242}
    notes = cb.prpsinfo(4242, "qemu-system-x86") + b"".join(
        cb.prstatus(v["vcpu"]["tid"]) for v in vcpus)
    notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, slots)))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
                      for v in vcpus)
    cb.write_core(path, notes, [cb.Load(0x400000, PAGE, PAGE, b"\x7fELF"),  # QEMU's own
                                cb.Load(UADDR, 0, 1 << 20), cb.Load(UADDR + (1 << 30), 0, 4 << 20)])
    return {"vcpus": vcpus}


def test_dontdump_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = dontdump_core(tmp_path / "core")
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 1 and err == f"kvmnote: {tmp_path / 'v'}: {5 << 20} {EXCLUDED_LINE}"
    prs = [d for name, t, d in elf_notes(tmp_path / "v") if name == b"CORE" and t == 1]
    rip = 112 + USER_REGS.index("rip") * 8
    assert [struct.unpack_from("<Q", d, rip)[0] for d in prs] == \
        [v["regs"]["rip"] for v in want["vcpus"]]
    rc, err = run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "v"), "--force",
                  "--allow-partial", "--vmcoreinfo", str(_info_file(tmp_path)))
    assert rc == 0 and err.count("\n") == 1 and "dump-guest-core=on" in err


def test_dontdump_in_read_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dontdump_core(tmp_path / "core")
    assert main(["read", str(tmp_path / "core")]) == 0
    out = capsys.readouterr().out
    assert ("  guest RAM: 0 bytes of 5.0 MiB in the core; 5.0 MiB excluded from the core by "
            "the VMM (MADV_DONTDUMP: QEMU -machine dump-guest-core=off, libvirt's default); future "
            "cores keep it with QEMU -machine dump-guest-core=on or libvirt "
            "<memory dumpCore='on'/>; the vCPU registers are all there\n") in out
    assert "cut off" not in out
    assert main(["read", "--json", str(tmp_path / "core")]) == 0
    ram = json.loads(capsys.readouterr().out)["vms"][0]["guest_ram"]
    assert ram == {"size": 5 << 20, "dumped": 0, "excluded": 5 << 20, "unmapped": 0,
                   "cut_off": 0}


@pytest.mark.parametrize("compressed", [False, True])
def test_cut_core_is_not_dontdump(tmp_path: Path, compressed: bool,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A core cut short (RLIMIT_CORE; systemd-coredump's size limit, which then compresses
    what it kept): every register is read, the missing ranges are listed, and nothing is
    called excluded by the VMM."""
    want = make_core(tmp_path / "core", ram={(1 << 32) + 0x3000: b"\x77" * PAGE})
    with open(tmp_path / "core", "rb") as f:
        last = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"][-1]
    cut = last["p_offset"] + 0x3000 + 8          # 8 bytes into the page at 4 GiB + 0x3000
    os.truncate(tmp_path / "core", cut)
    core = tmp_path / "core"
    if compressed:
        core = tmp_path / "core.zst"
        core.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "core").read_bytes()))
    assert main(["read", "--json", str(core)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [int(v["regs"]["rip"], 16) for v in doc["vcpus"]] == \
        [v["regs"]["rip"] for v in want["vcpus"]]
    lost = (4 << 20) - 0x3000 - 8
    ram = doc["vms"][0]["guest_ram"]
    assert ram["excluded"] == 0 and ram["cut_off"] == (None if compressed else lost)
    if not compressed:
        assert main(["read", str(core)]) == 0
        out = capsys.readouterr().out
        assert f"{(lost / 2**20):.1f} MiB cut off (truncated core: RLIMIT_CORE, a full " \
               f"disk, or systemd-coredump's size limits)" in out and "MADV" not in out
    rc, err = run(capsys, str(core), "-o", str(tmp_path / "v"),
                  "--vmcoreinfo", str(_info_file(tmp_path)))
    first = (1 << 32) + 0x3000 + 8
    if compressed:      # a compressed core is read by the page near its end
        first, lost = first - 8, lost + 8
    assert rc == 1 and f"missing {first:#x}-{first + lost - 1:#x} ({lost} bytes): cut off" in err
    assert "excluded" not in err and "dump-guest-core" not in err
    kept = b"" if compressed else b"\x77" * 8
    assert guest_read(tmp_path / "v", (1 << 32) + 0x3000, 16) == kept + bytes(16 - len(kept))
