"""Malformed notes and files: a clear KvmnoteError, never a crash or a hang."""

import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corebuilder as cb
import kvmnote
from kvmnote import core as core_mod, report, schema as S, triage, vmcore
from kvmnote.errors import CorruptNoteError, KvmnoteError, VersionError
from kvmnote.notes import parse_desc

VCPU = cb.sample_vcpu(0)
GOOD_VCPU = S.build_desc(cb.vcpu_records(VCPU))
GOOD_VM = S.build_desc(cb.vm_records({"vm_index": 0}, [cb.memslot(0, 0, 4096, 0x1000)]))


def patch(desc: bytes, offset: int, value: int, size: int = 4) -> bytes:
    """`desc` with a little-endian integer written at `offset`."""
    return desc[:offset] + value.to_bytes(size, "little") + desc[offset + size:]


def test_good_descs_parse() -> None:
    assert parse_desc(S.NT_KVM_VCPU, GOOD_VCPU, "n").records["regs"] == VCPU["regs"]
    assert parse_desc(S.NT_KVM_VM, GOOD_VM, "n").memslots[0]["userspace_addr"] == 0x1000


CORRUPT = {
    "shorter than header": GOOD_VCPU[:10],
    "size disagrees with descsz": patch(GOOD_VCPU, 8, len(GOOD_VCPU) + 8),
    "descsz longer than size": GOOD_VCPU + bytes(8),
    "nr_records too many": patch(GOOD_VCPU, 12, 50),
    "nr_records huge": patch(GOOD_VCPU, 12, 0xFFFFFFFF),
    "nr_records too few": patch(GOOD_VCPU, 12, 3),
    "record past end": patch(GOOD_VCPU, 16 + 4, 0xFFFFFFF0),
    "header_size too small": patch(GOOD_VCPU, 4, 8, 2),
    "record_header_size too small": patch(GOOD_VCPU, 6, 0, 2),
    "first record not VCPU": S.build_desc(cb.vcpu_records(VCPU)[1:]),
    "duplicate record": S.build_desc(cb.vcpu_records(VCPU) + [cb.vcpu_records(VCPU)[1]]),
    "regs shorter than struct": S.build_desc([cb.vcpu_records(VCPU)[0],
                                              (S.KVM_CORE_REC_REGS, bytes(100))]),
    "xsave shorter than 4096": S.build_desc([cb.vcpu_records(VCPU)[0],
                                             (S.KVM_CORE_REC_XSAVE, bytes(512))]),
    "msrs nmsrs too large": S.build_desc([cb.vcpu_records(VCPU)[0],
                                          (S.KVM_CORE_REC_MSRS, S.kvm_msrs_header.build(
                                              {"nmsrs": 1000, "pad": 0}) + bytes(16))]),
    "empty": b"",
}


@pytest.mark.parametrize("desc", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_vcpu_desc(desc: bytes) -> None:
    with pytest.raises(CorruptNoteError, match="^note0: "):
        parse_desc(S.NT_KVM_VCPU, desc, "note0")


def test_corrupt_vm_descs() -> None:
    slots = S.build_desc([cb.vm_records({"vm_index": 0}, [])[0],
                          (S.KVM_CORE_REC_MEMSLOTS, bytes(60))])
    with pytest.raises(CorruptNoteError, match="whole number"):
        parse_desc(S.NT_KVM_VM, slots, "n")
    wrong_count = S.build_desc([cb.record(S.KVM_CORE_REC_VM, {"nr_memslots": 3})])
    with pytest.raises(CorruptNoteError, match="nr_memslots 3"):
        parse_desc(S.NT_KVM_VM, wrong_count, "n")


def test_error_names_offset() -> None:
    with pytest.raises(CorruptNoteError, match=r"record 1 \(type 2\) at offset 56"):
        parse_desc(S.NT_KVM_VCPU, patch(GOOD_VCPU, 56 + 4, 0xFFFF0000), "n")


def test_future_major_refused() -> None:
    with pytest.raises(VersionError, match=r"note format version 2\.5 is newer than this "
                       r"kvmnote understands \(major 1\); upgrade kvmnote"):
        parse_desc(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(VCPU), major=2, minor=5), "n")


def test_larger_header_size_newer_minor() -> None:
    recs = cb.vcpu_records(VCPU)[:2]
    body = b"".join(S.build_record(t, p) for t, p in recs)
    hdr = S.kvm_core_header.build({"major": 1, "minor": 1, "header_size": 24,
                                   "record_header_size": 8, "size": 24 + len(body),
                                   "nr_records": 2})
    vcpu = parse_desc(S.NT_KVM_VCPU, hdr + bytes(8) + body, "n")
    assert vcpu.records["regs"] == VCPU["regs"]


FUZZ = settings(max_examples=150, deadline=None,  # time is not what these test; a loaded CI box is slow
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([S.NT_KVM_VM, S.NT_KVM_VCPU]))
def test_fuzz_random_desc(desc: bytes, ntype: int) -> None:
    try:
        parse_desc(ntype, desc, "n")
    except KvmnoteError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD_VCPU) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_fuzz_mutated_desc(flips: list[tuple[int, int]]) -> None:
    desc = bytearray(GOOD_VCPU)
    for pos, val in flips:
        desc[pos] = val
    try:
        parse_desc(S.NT_KVM_VCPU, bytes(desc), "n")
    except KvmnoteError:
        pass


def _small_core() -> bytes:
    """Bytes of a small valid core (notes and one small load)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "core"
        notes = cb.prstatus(1) + cb.prpsinfo(1, "vmm")
        notes += cb.kvm_note(S.NT_KVM_VM, GOOD_VM) + cb.kvm_note(S.NT_KVM_VCPU, GOOD_VCPU)
        cb.write_core(path, notes, [cb.Load(0x1000, 4096, 4096, b"x")])
        return path.read_bytes()


SMALL_CORE = _small_core()



def _open_bytes(data: bytes) -> None:
    """open_core, the read report (JSON and text) and write_vmcore on `data` in a temp
    file; only KvmnoteError may escape."""
    with tempfile.TemporaryDirectory() as d:
        path, out = os.path.join(d, "core"), os.path.join(d, "vmcore")
        with open(path, "wb") as f:
            f.write(data)
        try:
            with kvmnote.open_core(path) as core:
                report.to_json(core, core.vcpus)
                report.text(core, core.vcpus, True)
                triage.triage(core)
                for i, _ in enumerate(core.vms):
                    for base, size, _ in core.guest_ranges(i):
                        core.read_guest_phys(base, min(size, 64), i)
        except KvmnoteError:
            pass
        try:
            vmcore.write_vmcore(path, out, allow_partial=True)
        except KvmnoteError:
            pass


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_file(data: bytes) -> None:
    for prefix in (b"", b"\x7fELF\x02\x01\x01", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18",
                   b"\xfd7zXZ\x00"):
        _open_bytes(prefix + data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SMALL_CORE) - 1), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_fuzz_mutated_file(flips: list[tuple[int, int]]) -> None:
    data = bytearray(SMALL_CORE)
    for pos, val in flips:
        data[pos] = val
    _open_bytes(bytes(data))


# 8-byte fields of the program headers and of the VM note (memslot sizes and addresses)
# set to the values that overflowed before: sizes near 2^63, offsets of all ones.
EXTREMES = [0, 1, 0xFFF, 1 << 52, (1 << 63) - 4096, 1 << 63, (1 << 64) - 4096, (1 << 64) - 1]
FIELDS = [*range(64 // 8, 176 // 8),    # the two program headers
          *range(SMALL_CORE.find(GOOD_VM) // 8, (SMALL_CORE.find(GOOD_VM) + len(GOOD_VM)) // 8)]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(EXTREMES)),
                min_size=1, max_size=3))
def test_fuzz_extreme_fields(sets: list[tuple[int, int]]) -> None:
    data = bytearray(SMALL_CORE)
    for slot, val in sets:
        data[slot * 8:slot * 8 + 8] = val.to_bytes(8, "little")
    _open_bytes(bytes(data))


def _zero_note_core(path: Path, notes_size: int, compress: bool) -> None:
    """An ELF core whose one PT_NOTE is `notes_size` zero bytes (zstd: in a small file)."""
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01", 4, 62, 1, 0, 64, 0, 0,
                       64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, notes_size, 0, 0)
    if not compress:
        with open(path, "wb") as f:
            f.write(ehdr + phdr)
            f.truncate(120 + notes_size)          # sparse
        return
    z = zstandard.ZstdCompressor(level=1).compressobj()
    zero = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(z.compress(ehdr + phdr))
        for _ in range(notes_size >> 20):
            f.write(z.compress(zero))
        f.write(z.flush())


def _read_limited(path: Path) -> tuple[int, str, float]:
    """`kvmnote read` with 1 GiB of address space and 60 s: (status, stderr, seconds)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "kvmnote", "read", str(path)], text=True,
                       capture_output=True, timeout=60, preexec_fn=limit)
    return p.returncode, p.stderr, time.monotonic() - t


def test_note_segment_size_cap(tmp_path: Path) -> None:
    """A small zstd file holding a 1 GiB all-zero PT_NOTE is refused before it is read."""
    _zero_note_core(tmp_path / "core.zst", 1 << 30, compress=True)
    assert (tmp_path / "core.zst").stat().st_size < 64 << 10
    rc, err, secs = _read_limited(tmp_path / "core.zst")
    assert rc == 2 and "PT_NOTE of 1073741824 bytes" in err and err.count("\n") == 1, err
    assert secs < 10


def test_note_count_cap(tmp_path: Path) -> None:
    """A PT_NOTE under the size cap but full of empty 12-byte notes stops at the count cap."""
    size = 16 << 20
    assert size < core_mod.MAX_NOTES and size // 12 > core_mod.MAX_NOTE_COUNT
    _zero_note_core(tmp_path / "core", size, compress=False)
    rc, err, secs = _read_limited(tmp_path / "core")
    assert rc == 2 and f"more than {core_mod.MAX_NOTE_COUNT} notes" in err, err
    assert err.count("\n") == 1 and secs < 10
