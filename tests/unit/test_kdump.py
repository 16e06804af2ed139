"""`kvmnote vmcore --format kdump`: synthetic VMM cores in, kdump-compressed vmcores out.

The output is parsed by a reader written here from makedumpfile's layout (diskdump_mod.h:
disk_dump_header, kdump_sub_header, the two bitmaps, page_desc), not with kvmnote's own
structs, and checked against the values the test put in; drgn (libkdumpfile) reads it too.
"""

import ctypes
import ctypes.util
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from elftools.elf.elffile import ELFFile

import test_vmcore as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testlib import need  # noqa: E402

PAGE = 4096
FLAG = {"zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
PHYS_BASE = 0x3A00000
INFO = T.INFO + f"NUMBER(phys_base)={PHYS_BASE}\n".encode()


def decompress(flags: int, data: bytes) -> bytes:
    """One page, as crash's diskdump.c does it (by page_desc.flags)."""
    if flags & 0x1:
        return zlib.decompress(data)
    if flags & 0x20:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=PAGE)
    out, size = ctypes.create_string_buffer(PAGE), ctypes.c_size_t(PAGE)
    if flags & 0x2:
        lib = ctypes.CDLL(ctypes.util.find_library("lzo2"))
        assert lib.lzo1x_decompress_safe(data, len(data), out, ctypes.byref(size), None) == 0
    elif flags & 0x4:
        lib = ctypes.CDLL(ctypes.util.find_library("snappy"))
        assert lib.snappy_uncompress(data, len(data), out, ctypes.byref(size)) == 0
    else:
        return data
    return out.raw[:size.value]


class Kdump:
    """An independent reader of makedumpfile's kdump-compressed format (64-bit x86)."""

    def __init__(self, path: Path) -> None:
        self.raw = raw = path.read_bytes()
        assert raw[:8] == b"KDUMP   "
        self.version = struct.unpack_from("<i", raw, 8)[0]
        uts = raw[12:12 + 390]
        self.uts = [uts[i * 65:(i + 1) * 65].split(b"\0")[0] for i in range(6)]
        (self.tv_sec, _, self.status, self.block_size, self.sub_hdr_size, self.bitmap_blocks,
         self.max_mapnr, _, _, _, _, self.nr_cpus) = struct.unpack_from("<qqIiiIIIIIIi", raw, 408)
        b = self.block_size
        (self.phys_base, self.dump_level, self.split, _, _, self.off_info, self.size_info,
         self.off_note, self.size_note, _, _, _, _, self.max_mapnr_64) = \
            struct.unpack_from("<QiiQQQQQQQQQQQ", raw, b)
        self.notes = raw[self.off_note:self.off_note + self.size_note]
        self.vmcoreinfo = raw[self.off_info:self.off_info + self.size_info]
        bm = raw[(1 + self.sub_hdr_size) * b:(1 + self.sub_hdr_size + self.bitmap_blocks) * b]
        half = len(bm) // 2
        self.bitmap1, self.bitmap2 = bm[:half], bm[half:]
        self.desc_off = (1 + self.sub_hdr_size + self.bitmap_blocks) * b
        self.rank = {p: i for i, p in enumerate(self.dumped())}

    @staticmethod
    def bit(bitmap: bytes, pfn: int) -> bool:
        return bool(bitmap[pfn >> 3] >> (pfn & 7) & 1)

    def dumped(self) -> list[int]:
        return [p for p in range(self.max_mapnr_64) if self.bit(self.bitmap2, p)]

    def desc(self, pfn: int) -> tuple[int, int, int, int]:
        """page_desc of a dumped page: its index is the number of dumped pages before it."""
        return struct.unpack_from("<qIIQ", self.raw, self.desc_off + 24 * self.rank[pfn])

    def page(self, pfn: int) -> bytes:
        off, size, flags, _ = self.desc(pfn)
        data = decompress(flags, self.raw[off:off + size])
        assert len(data) == PAGE
        return data


def content() -> dict[int, bytes]:
    """Guest RAM of the sample core: text, random (incompressible) data, a VMCOREINFO."""
    text = Path(T.__file__).read_bytes()
    return {0x3000: text[:3 * PAGE], 0x8000: os.urandom(2 * PAGE) + b"tail",
            0x20000: T.info_note(INFO), (1 << 32) + 0x5000: b"high" * 3000}


def ram_image(want: dict) -> dict[int, bytes]:
    """Every page of guest RAM by PFN, from make_core's images."""
    pages = {}
    for (gpa, size), img in zip(want["slots"], want["img"]):
        for off in range(0, size, PAGE):
            pages[(gpa + off) // PAGE] = img[off:off + PAGE]
    return pages


@pytest.mark.parametrize("algo", ["zstd", "zlib", "lzo", "snappy"])
def test_layout_and_every_page(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               algo: str) -> None:
    want = T.make_core(tmp_path / "core", ram=content())
    rc, err = T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"), "--format",
                    "kdump", "--compress", algo)
    assert rc == 0, err
    k = Kdump(tmp_path / "k")
    assert (k.version, k.block_size, k.nr_cpus, k.split) == (6, PAGE, 2, 0)
    assert k.status & FLAG[algo] and k.dump_level == 1
    assert k.uts[0] == b"Linux" and k.uts[2] == b"6.12.0-test" and k.uts[4] == b"x86_64"
    assert k.tv_sec == int(os.stat(tmp_path / "core").st_mtime)
    assert k.phys_base == PHYS_BASE
    top = (1 << 32) // PAGE + (4 << 20) // PAGE
    assert k.max_mapnr_64 == top and k.max_mapnr == top
    pages = ram_image(want)
    # Both bitmaps: the RAM slots exactly (as makedumpfile -d 1: zero pages are not left
    # out, they share one stored page).
    assert [p for p in range(top) if k.bit(k.bitmap1, p)] == sorted(pages)
    assert k.dumped() == sorted(pages)
    for pfn in k.dumped():
        assert k.page(pfn) == pages[pfn], f"pfn {pfn:#x}"
    nonzero = {p for p, d in pages.items() if d != bytes(PAGE)}
    assert {k.desc(p)[2] for p in nonzero} == {FLAG[algo], 0}   # text compressed, random raw
    zero_descs = {k.desc(p) for p in pages if p not in nonzero}
    assert len(zero_descs) == 1 and zero_descs.pop()[1:3] == (PAGE, 0)
    assert len({k.desc(p)[0] for p in nonzero}) == len(nonzero)


def test_notes_as_elf_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    T.make_core(tmp_path / "core", ram=content())
    assert T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                 "--format", "kdump")[0] == 0
    assert T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "elf"))[0] == 0
    k = Kdump(tmp_path / "k")
    notes, off = [], 0
    while off < len(k.notes):
        namesz, descsz, ntype = struct.unpack_from("<III", k.notes, off)
        d0 = off + 12 + (namesz + 3) // 4 * 4
        notes.append((k.notes[off + 12:off + 11 + namesz], ntype, k.notes[d0:d0 + descsz]))
        off = d0 + (descsz + 3) // 4 * 4
    assert [(n, t) for n, t, _ in notes] == [(b"CORE", 1)] * 2 + [(b"QEMU", 0)] * 2 \
        + [(b"VMCOREINFO", 0)]
    assert [struct.unpack_from("<I", d, 32)[0] for n, _, d in notes if n == b"CORE"] == [1, 2]
    assert k.vmcoreinfo == INFO == notes[-1][2]
    assert notes == T.elf_notes(tmp_path / "elf")


def test_dump_level_0_same_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    T.make_core(tmp_path / "core", ram=content())
    for level in ("0", "1"):
        assert T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / f"k{level}"),
                     "--format", "kdump", "-d", level)[0] == 0
    k0, k1 = Kdump(tmp_path / "k0"), Kdump(tmp_path / "k1")
    assert (k0.dump_level, k1.dump_level) == (0, 1)
    assert k0.dumped() == k1.dumped() and all(k0.page(p) == k1.page(p) for p in k0.dumped())


def test_drgn_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drgn = pytest.importorskip("drgn")
    want = T.make_core(tmp_path / "core", ram=content())
    for algo in FLAG:
        out = tmp_path / f"k.{algo}"
        assert T.run(capsys, str(tmp_path / "core"), "-o", str(out), "--format", "kdump",
                     "--compress", algo)[0] == 0
        prog = drgn.Program()
        prog.set_core_dump(str(out))
        for pfn, data in ram_image(want).items():
            assert prog.read(pfn * PAGE, PAGE, True) == data, (algo, hex(pfn))


def test_utsname_from_guest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uts = b"".join(s.ljust(65, b"\0") for s in (b"Linux", b"guest1", b"6.12.0-test",
                                                b"#1 SMP PREEMPT_DYNAMIC", b"x86_64", b"(none)"))
    sym, name_off = 0xFFFFFFFF80100F20, 4     # 59 MiB with PHYS_BASE
    gpa = sym - 0xFFFFFFFF80000000 + PHYS_BASE + name_off
    info = INFO + f"SYMBOL(init_uts_ns)={sym:x}\nOFFSET(uts_namespace.name)={name_off}\n".encode()
    T.make_core(tmp_path / "core", ram={0x20000: T.info_note(info)},
                slot_sizes=(64 << 20, 4 << 20))
    with open(tmp_path / "core", "r+b") as f:       # slot 0 is the first PT_LOAD's data
        f.seek(_load_offset(tmp_path / "core", 0) + gpa)
        f.write(uts)
    assert T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                 "--format", "kdump")[0] == 0
    assert Kdump(tmp_path / "k").uts == [b"Linux", b"guest1", b"6.12.0-test",
                                         b"#1 SMP PREEMPT_DYNAMIC", b"x86_64", b"(none)"]


def _load_offset(path: Path, index: int) -> int:
    """p_offset of a PT_LOAD of the VMM core (0: slot 0's memory, -1: slot 1's)."""
    with open(path, "rb") as f:
        loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
        return loads[index]["p_offset"]


def test_negative_phys_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KASLR below the link address: the kernel prints phys_base as a negative %ld (seen
    on a real 6.12 guest: -633339904); the sub-header holds it as an unsigned long."""
    info = T.INFO + b"NUMBER(phys_base)=-633339904\n"
    T.make_core(tmp_path / "core", ram={0x20000: T.info_note(info)})
    assert T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                 "--format", "kdump")[0] == 0
    assert Kdump(tmp_path / "k").phys_base == (1 << 64) - 633339904


def test_no_vmcoreinfo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    T.make_core(tmp_path / "core", ram={0x3000: b"x" * 100})
    rc, err = T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                    "--format", "kdump")
    assert rc == 0 and "no VMCOREINFO" in err and "phys_base" in err
    k = Kdump(tmp_path / "k")
    assert k.phys_base == 0 and k.size_info == 0 and k.uts[4] == b"x86_64"
    assert k.page(3)[:100] == b"x" * 100


def test_truncated_core(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = b"\x5a" * PAGE
    T.make_core(tmp_path / "core", ram={0: data, (1 << 32): data, (1 << 32) + 0x2000: data})
    os.truncate(tmp_path / "core", _load_offset(tmp_path / "core", -1) + 0x2000 + 100)
    rc, err = T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                    "--format", "kdump")
    first = (1 << 32) + 0x2000 + 100
    assert rc == 1 and f"missing {first:#x}-" in err and "truncated" in err
    k = Kdump(tmp_path / "k")
    base = (1 << 32) // PAGE
    assert k.page(0) == data and k.page(base) == data
    assert k.page(base + 2) == data[:100] + bytes(PAGE - 100)
    assert k.page(base + 3) == bytes(PAGE)      # missing: zeros, as in the ELF output


@pytest.mark.parametrize("argv, words", [
    (["--format", "kdump", "-d", "32"], ["0 to 31"]),
    (["--format", "kdump", "--compress", "bzip2"], ["zstd"]),
    (["--compress", "zstd"], ["--format kdump"]),
    (["-d", "1"], ["--format kdump"]),
])
def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                  words: list[str]) -> None:
    T.make_core(tmp_path / "core")
    err = T.one_line_error(*T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                                  *argv))
    assert all(w in err for w in words), err
    assert not (tmp_path / "k").exists()


def test_big_guest_many_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Slots of several batches, pages at batch edges, zero runs across them."""
    ram = {0x1FF000: b"a" * PAGE, 0x200000: b"b" * 10, 0x5FF000: os.urandom(PAGE),
           (1 << 32) + 0x3FF000: b"end"}
    want = T.make_core(tmp_path / "core", ram=ram, slot_sizes=(8 << 20, 4 << 20))
    assert T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                 "--format", "kdump")[0] == 0
    k = Kdump(tmp_path / "k")
    pages = ram_image(want)
    assert k.dumped() == sorted(pages)
    assert all(k.page(p) == pages[p] for p in k.dumped())


def _makedumpfile_has(algo: str) -> bool:
    exe = shutil.which("makedumpfile")
    return bool(exe) and f"{algo}\tenabled" in subprocess.run(
        [exe, "-v"], capture_output=True, text=True).stdout


def test_mem_map_levels_need_makedumpfile(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    T.make_core(tmp_path / "core")
    monkeypatch.setenv("PATH", str(tmp_path))          # no makedumpfile
    err = T.one_line_error(*T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                                  "--format", "kdump", "-d", "31"))
    assert "cache, cache private, user, free" in err and "not installed" in err
    assert not (tmp_path / "k").exists()


def test_mem_map_levels_refuse_what_makedumpfile_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need(shutil.which("makedumpfile") is not None, "makedumpfile not installed "
           "(apt-get install makedumpfile)")
    if _makedumpfile_has("zstd"):
        pytest.skip("this makedumpfile has zstd (Debian 12's has not)")
    T.make_core(tmp_path / "core")
    err = T.one_line_error(*T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                                  "--format", "kdump", "-d", "8"))
    assert "without zstd" in err and "--compress zlib" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "core"]


def test_mem_map_levels_makedumpfile_failure(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A synthetic core has no kernel in it: makedumpfile fails, we say so in one line and
    leave nothing behind (the temporary ELF vmcore included)."""
    need(shutil.which("makedumpfile") is not None, "makedumpfile not installed "
           "(apt-get install makedumpfile)")
    T.make_core(tmp_path / "core", ram={0x20000: T.info_note(INFO)})
    err = T.one_line_error(*T.run(capsys, str(tmp_path / "core"), "-o", str(tmp_path / "k"),
                                  "--format", "kdump", "-d", "31", "--compress", "zlib"))
    assert "makedumpfile failed" in err and "system_utsname" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "core"]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4000), st.integers(0, 3000), st.sets(st.integers(0, 2999), max_size=20))
def test_bitmap_runs(pfn: int, count: int, clear: set[int]) -> None:
    """The bitmap against a bit-by-bit model: LSB first, runs long and short, holes."""
    from kvmnote.kdump import _Bitmap
    clear = sorted(i for i in clear if i < count)
    bm = _Bitmap(8000)
    bm.set_run(pfn, count, clear)
    want = [pfn <= p < pfn + count and p - pfn not in clear for p in range(8000)]
    assert [Kdump.bit(bm.bits, p) for p in range(8000)] == want
