"""Reading synthetic cores: every record, both vendors, several VMs, memory."""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import corebuilder as cb
from testlib import need
import kvmnote
from kvmnote import schema as S
from kvmnote.errors import MissingDataError


def check_vcpu(vcpu: kvmnote.Vcpu, want: dict[str, Any]) -> None:
    """Every record of `vcpu` equals the values the test put in."""
    assert vcpu.info == cb.merge(S.zeroed(S.kvm_core_vcpu), want["vcpu"])
    for name in ("regs", "sregs", "debugregs", "events", "mp_state", "xcrs",
                 "vmx_exit", "svm_exit"):
        if name in want:
            struct = next(st for n, st in S.RECORDS.values() if n == name)
            assert vcpu.records[name] == cb.merge(S.zeroed(struct), want[name]), name
        else:
            assert name not in vcpu.records
    assert vcpu.records["xsave"] == want["xsave"]
    assert vcpu.records["lapic"] == want["lapic"]
    assert [(m["index"], m["data"]) for m in vcpu.records["msrs"]] == want["msrs"]
    assert vcpu.unknown_records == []


@pytest.mark.parametrize("vendor", [S.KVM_CORE_VENDOR_VMX, S.KVM_CORE_VENDOR_SVM])
def test_round_trip(tmp_path: Path, vendor: int) -> None:
    want = cb.standard_core(tmp_path / "core", vendor=vendor, nr_vcpus=3)
    with kvmnote.open_core(tmp_path / "core") as core:
        assert (core.pid, core.comm, core.signal) == (4242, "qemu-system-x86", 6)
        assert [t.tid for t in core.threads] == [4242, 5000, 5001, 5002]
        assert len(core.vms) == 1
        assert core.vms[0].info == cb.merge(S.zeroed(S.kvm_core_vm), want["vm"])
        assert core.vms[0].memslots == want["slots"]
        assert core.vms[0].vcpus == core.vcpus
        assert len(core.vcpus) == 3
        for vcpu, w in zip(core.vcpus, want["vcpus"]):
            check_vcpu(vcpu, w)


def test_memory_reads(tmp_path: Path) -> None:
    want = cb.standard_core(tmp_path / "core")
    with kvmnote.open_core(tmp_path / "core") as core:
        assert core.read(want["uaddr"] + 100, 50) == want["ram"][100:150]
        assert core.read_guest_phys(0x20, 16) == want["ram"][0x20:0x30]
        assert core.read_guest_phys(0x100000000, 20) == b"\xaa" * 16 + bytes(4)
        assert core.guest_ranges() == [(0, 1 << 20, want["uaddr"]),
                                       (0x100000000, 1 << 20, want["uaddr"] + (1 << 30))]
        with pytest.raises(MissingDataError):
            core.read(0x1000, 4)
        with pytest.raises(MissingDataError):
            core.read_guest_phys(0x200000, 4)


def test_memsz_tail_is_zero_and_cut_file_is_missing(tmp_path: Path) -> None:
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(
        {"vm_index": 0, "vendor": 1}, [])))
    cb.write_core(tmp_path / "core", notes, [cb.Load(0x10000, 0x1000, 0x3000, b"hi"),
                                             cb.Load(0x20000, 0x2000, 0x2000, b"yo")])
    size = os.path.getsize(tmp_path / "core")
    os.truncate(tmp_path / "core", size - 0x1000)  # cut the second load in half
    with kvmnote.open_core(tmp_path / "core") as core:
        assert core.read(0x10000, 2) == b"hi"
        assert core.read(0x11000, 0x2000) == bytes(0x2000)  # p_filesz < p_memsz
        assert core.read(0x20000, 2) == b"yo"
        with pytest.raises(MissingDataError, match="cut off"):
            core.read(0x20ff0, 0x20)


def test_multiple_vms_and_lone_vcpu(tmp_path: Path) -> None:
    notes = b""
    for vmi, vendor in ((0, S.KVM_CORE_VENDOR_VMX), (1, S.KVM_CORE_VENDOR_VMX)):
        notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(
            {"vm_index": vmi, "vendor": vendor, "nr_vcpus": 1, "pid": 7},
            [cb.memslot(vmi, 0, 4096, 0x5000 + vmi * 0x1000)])))
        v = cb.sample_vcpu(vmi, vendor, vm_index=vmi)
        notes += cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
    dead = {"vcpu": {"vcpu_id": 9, "vcpu_idx": 1, "vm_index": 1, "vendor": 1,
                     "status": S.KVM_CORE_VCPU_UNREADABLE, "error": S.KVM_CORE_ERR_BUSY,
                     "tid": 0}}
    notes += cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(dead)))
    cb.write_core(tmp_path / "core", notes, [cb.Load(0x5000, 0x2000, 0x2000, b"A" * 4096 + b"B")])
    with kvmnote.open_core(tmp_path / "core") as core:
        assert [vm.vm_index for vm in core.vms] == [0, 1]
        assert [v.vcpu_id for v in core.vms[1].vcpus] == [1, 9]
        assert core.vcpus[2].records == {}
        assert core.read_guest_phys(0, 1, vm=1) == b"B"
        assert core.read_guest_phys(0, 1, vm=0) == b"A"


def test_unknown_record_skipped_and_newer_minor_prefix(tmp_path: Path) -> None:
    v = cb.sample_vcpu(0)
    recs = cb.vcpu_records(v)
    recs = [(t, p + b"\x99" * 24 if t == S.KVM_CORE_REC_REGS else p) for t, p in recs]
    recs.insert(2, (200, b"future" * 5))
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records({"vm_index": 0}, [])))
    notes += cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(recs, minor=3))
    cb.write_core(tmp_path / "core", notes, [])
    with kvmnote.open_core(tmp_path / "core") as core:
        vcpu = core.vcpus[0]
        assert vcpu.version == (1, 3)
        assert vcpu.records["regs"] == v["regs"]
        assert vcpu.unknown_records == [(200, 30)]


COMPRESSORS = {"zst": ["zstd", "-q", "-c"], "lz4": ["lz4", "-q", "-c"],
               "xz": ["xz", "-q", "-c", "-T1"]}


@pytest.mark.parametrize("ext", COMPRESSORS)
def test_compressed_same_as_plain(tmp_path: Path, ext: str) -> None:
    if not shutil.which(COMPRESSORS[ext][0]):
        need(False, f"{COMPRESSORS[ext][0]} (apt-get install zstd lz4 xz-utils)")
    want = cb.standard_core(tmp_path / "core", nr_vcpus=2)
    packed = tmp_path / "core.bin"  # detection is by magic, not name
    with open(tmp_path / "core", "rb") as src, open(packed, "wb") as dst:
        subprocess.run(COMPRESSORS[ext], stdin=src, stdout=dst, check=True)
    with kvmnote.open_core(packed) as core:
        assert core.compression in ("zstd", "lz4", "xz")
        for vcpu, w in zip(core.vcpus, want["vcpus"]):
            check_vcpu(vcpu, w)
        assert core.vms[0].memslots == want["slots"]
        assert core.read_guest_phys(0x30, 8) == want["ram"][0x30:0x38]
        assert core.read_guest_phys(0x100000000, 20) == b"\xaa" * 16 + bytes(4)


def test_nt_file_and_threads(tmp_path: Path) -> None:
    files = [(0x400000, 0x401000, 0, "/usr/bin/qemu"), (0x7F00000, 0x7F02000, 3, "/lib/libc")]
    notes = cb.prstatus(77, signo=11, regs={"rip": 0x401234, "rsp": 0x7FFF0})
    notes += cb.nt_file(4096, files)
    notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records({"vm_index": 0}, [])))
    cb.write_core(tmp_path / "core", notes, [])
    with kvmnote.open_core(tmp_path / "core") as core:
        assert core.files == [(0x400000, 0x401000, 0, "/usr/bin/qemu"),
                              (0x7F00000, 0x7F02000, 3 * 4096, "/lib/libc")]
        assert core.threads[0].tid == 77 and core.threads[0].cursig == 11
        assert core.threads[0].regs["rip"] == 0x401234
        assert core.threads[0].regs["rsp"] == 0x7FFF0
        assert core.signal is None and core.vcpus == []


def test_compressed_reads_past_cached_head(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("zstd"):
        need(False, "zstd (apt-get install zstd)")
    monkeypatch.setattr("kvmnote.core.HEAD_MAX", 1 << 16)  # force the streaming path
    pattern = bytes(range(256)) * 64
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records({"vm_index": 0}, [])))
    cb.write_core(tmp_path / "core", notes, [cb.Load(0x10000, 0x40000, 0x40000,
                                                     b"\x55" * 0x30000 + pattern)])
    subprocess.run(["zstd", "-q", "--rm", str(tmp_path / "core")], check=True)
    with kvmnote.open_core(tmp_path / "core.zst") as core:
        assert core.read(0x10000 + 0x30000, len(pattern)) == pattern
        # backwards past the head: decompression restarts from the beginning
        assert core.read(0x10000 + 0x2FFF0, 32) == b"\x55" * 16 + pattern[:16]
        assert core.read(0x10000, 4) == b"\x55" * 4  # the cached head


def test_decompression_steps_stay_bounded() -> None:
    """Data that compresses little (guest RAM full of data) is fed in growing steps for
    speed; zero pages right after it must not come out as one huge block: a 4-byte zstd
    RLE block is 128 KiB, so a step stays at most 64 MiB (2048 input bytes)."""
    import io
    import zstandard
    from kvmnote.core import _chunks
    z = zstandard.ZstdCompressor(level=1).compressobj()
    packed = z.compress(os.urandom(4 << 20))
    zero = bytes(1 << 20)
    packed += b"".join(z.compress(zero) for _ in range(1024)) + z.flush()
    sizes = [len(c) for c in _chunks(lambda: io.BytesIO(packed), "zstd", "t")]
    assert sum(sizes) == (4 << 20) + (1 << 30)
    assert max(sizes) <= (64 << 20) + (64 << 10)
