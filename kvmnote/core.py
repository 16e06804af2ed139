"""Open a VMM core file (plain or compressed), read its notes and its memory."""

import bisect
import io
import lzma
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import lz4.frame
import zstandard
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import schema as S
from .errors import (CompressedError, CorruptCoreError, CorruptNoteError, KvmnoteError,
                     MissingDataError, NoKvmNotesError, NotCoreError, NotElfError, TruncatedError)
from .notes import Dropped, Vcpu, Vm, parse_desc

ELF_MAGIC = b"\x7fELF"
COMPRESSION_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4",
                     b"\xfd7zXZ\x00": "xz"}
# Largest PT_NOTE total kvmnote accepts, and most notes in it. The largest real core:
# KVM's 4096 vCPUs (CONFIG_MAXSMP) at about 14 KiB of KVM note each (11 KiB of AMX
# XSAVE) plus 12 KiB of thread notes (NT_PRSTATUS, NT_FPREGSET, NT_X86_XSTATE), and an
# NT_FILE of 65530 mappings (vm.max_map_count): about 120 MiB in some 25,000 notes.
MAX_NOTES = 256 << 20
MAX_NOTE_COUNT = 1 << 18
# Decompressed head of a compressed core kept in memory (headers and notes).
HEAD_MAX = 64 << 20
FEED_MAX = 2048
CHUNK = 1 << 16
# Largest file offset (off_t) and address (u64): a program header beyond them is corrupt.
MAX_OFFSET = (1 << 63) - 1
MAX_ADDRESS = 1 << 64
# Where the bytes of a host range are (Core.pieces).
DUMPED, EXCLUDED, UNMAPPED = "dumped", "excluded", "unmapped"
# Guest RAM left out on purpose, and the settings that keep it in the next core.
EXCLUDED_WHY = ("excluded from the core by the VMM (MADV_DONTDUMP: QEMU -machine "
                "dump-guest-core=off, libvirt's default)")
EXCLUDED_FIX = ("future cores keep it with QEMU -machine dump-guest-core=on or libvirt "
                "<memory dumpCore='on'/>")
TRUNCATED_WHY = "truncated core: RLIMIT_CORE, a full disk, or systemd-coredump's size limits"


def _decompressor(kind: str) -> Callable[[bytes], tuple[bytes, bool, bytes]]:
    """A per-frame decompress(data) -> (output, frame ended, unused input)."""
    if kind == "zstd":
        obj: Any = zstandard.ZstdDecompressor().decompressobj()
    elif kind == "lz4":
        obj = lz4.frame.LZ4FrameDecompressor()
    else:
        obj = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def step(data: bytes) -> tuple[bytes, bool, bytes]:
        out = obj.decompress(data)
        return out, obj.eof, obj.unused_data if obj.eof else b""
    return step


def _chunks(opener: Callable[[], Any], kind: str, path: str) -> Iterator[bytes]:
    """Decompressed blocks of a multi-frame stream (opener() gives a context manager of
    a binary file); raise if it is corrupt or cut. `path` names it in errors."""
    # zstd and lz4 can expand a small input enormously (zero pages: a 4-byte zstd RLE
    # block is 128 KiB), so feed little at a time to bound memory: 256 bytes, doubled up
    # to FEED_MAX while the data compresses less than 16:1 (guest RAM full of data, where
    # 256-byte steps ran at 55 MB/s), so one step's output stays below 64 MiB.
    adaptive = kind in ("zstd", "lz4")
    feed = 256 if adaptive else 4096
    try:
        with opener() as f:
            step, pending, in_frame = _decompressor(kind), b"", False
            parts: list[bytes] = []
            held = 0
            inbuf, inpos = b"", 0           # read in 1 MiB blocks, fed `feed` at a time
            while True:
                if not pending and inpos >= len(inbuf):
                    inbuf, inpos = f.read(1 << 20), 0
                data = pending or inbuf[inpos:inpos + feed]
                inpos += 0 if pending else len(data)
                pending = b""
                if not data:
                    if parts:
                        yield b"".join(parts)
                    if in_frame:
                        raise CompressedError(f"{path}: {kind} stream ends early "
                                              f"(truncated compressed core)")
                    return
                out, ended, pending = step(data)
                if adaptive:
                    feed = min(feed * 2, FEED_MAX) if len(out) < 16 * len(data) else 256
                in_frame = not ended
                if ended:
                    step = _decompressor(kind)
                if out:         # handed on in blocks of CHUNK or more, not per step
                    parts.append(out)
                    held += len(out)
                    if held >= CHUNK:
                        yield b"".join(parts)
                        parts, held = [], 0
    except (zstandard.ZstdError, lzma.LZMAError, RuntimeError, EOFError, ValueError) as e:
        raise CompressedError(f"{path}: corrupt {kind} stream: {e}") from None


class Stream:
    """A core read forward once, from a pipe (stdin, `coredumpctl dump`): its first
    bytes are peeked for the magic; `on_close` runs when the core is closed."""

    def __init__(self, f: BinaryIO, name: str,
                 on_close: Callable[[], None] | None = None) -> None:
        self.f, self.name, self.on_close = f, name, on_close
        self.prefix = b""
        while len(self.prefix) < 6:
            got = f.read(6 - len(self.prefix))
            if not got:
                break
            self.prefix += got
        self.magic = self.prefix

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (the peeked ones first); b"" at the end."""
        if self.prefix:
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            return out
        return self.f.read(n)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _raw_chunks(stream: Stream) -> Iterator[bytes]:
    """The blocks of an uncompressed stream."""
    while data := stream.read(CHUNK):
        yield data


class _Source:
    """Random access to the (decompressed) bytes of a core file, or forward access to
    the first HEAD_MAX bytes of a core read from a pipe."""

    def __init__(self, path: str, kind: str | None, stream: Stream | None = None,
                 file_path: str | None = None) -> None:
        # path names the core in messages; file_path (default: path) is the file opened
        self.path, self.kind, self.stream = path, kind, stream
        self.file_path = None if stream else file_path or path
        self.plain = kind is None and stream is None
        self.size: int | None = None
        if self.plain:
            self.file: BinaryIO = open(self.file_path or "", "rb")
            self.size = os.fstat(self.file.fileno()).st_size
            return
        self._kind = kind
        self._head = bytearray()
        if stream is None:
            self._gen = _chunks(lambda: open(self.file_path or "", "rb"), kind or "", path)
        elif kind is None:
            self._gen = _raw_chunks(stream)
        else:
            self._gen = _chunks(lambda: stream, kind, path)
        self._tail_gen: Iterator[bytes] | None = None
        self._tail_pos, self._tail_buf = 0, b""

    def close(self) -> None:
        """Release the file descriptor of a plain core; finish a stream."""
        if self.plain:
            self.file.close()
        elif self.stream is not None and self.stream.on_close is not None:
            self.stream.on_close()

    def pread(self, pos: int, n: int) -> bytes:
        """Up to `n` bytes at `pos`; fewer only at the end of the data."""
        if self.plain:
            return os.pread(self.file.fileno(), n, pos) if pos < (self.size or 0) else b""
        out = bytearray()
        while n > 0:
            got = self._head_read(pos, n) if pos < HEAD_MAX else self._tail_read(pos, n)
            if not got:
                break
            out += got
            pos, n = pos + len(got), n - len(got)
        return bytes(out)

    def _head_read(self, pos: int, n: int) -> bytes:
        """Read from the cached head, decompressing more of it as needed."""
        while len(self._head) < min(pos + n, HEAD_MAX):
            chunk = next(self._gen, b"")
            if not chunk:
                break
            self._head += chunk
        return bytes(self._head[pos:min(pos + n, HEAD_MAX)])

    def _tail_read(self, pos: int, n: int) -> bytes:
        """Read past the head by decompressing forward (restarting to go back)."""
        if self.stream is not None:
            raise KvmnoteError(f"{self.path}: data beyond the first {HEAD_MAX >> 20} MiB of a "
                               f"core read from a pipe is not kept; save the core to a file")
        if self._tail_gen is None or pos < self._tail_pos:
            self._tail_gen, self._tail_pos, self._tail_buf = (
                _chunks(lambda: open(self.file_path or "", "rb"), self._kind or "", self.path),
                0, b"")
        while self._tail_pos + len(self._tail_buf) <= pos:
            self._tail_pos += len(self._tail_buf)
            self._tail_buf = next(self._tail_gen, b"")
            if not self._tail_buf:
                return b""
        start = pos - self._tail_pos
        return self._tail_buf[start:start + n]


@dataclass
class Thread:
    """One NT_PRSTATUS: a thread's pid, signal and user registers."""

    tid: int
    cursig: int
    regs: dict[str, int]


@dataclass
class Load:
    """One PT_LOAD: process-virtual range and where its bytes are in the file."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int


@dataclass
class Core:
    """An opened core file: process info, KVM VMs and vCPUs, and memory access."""

    path: str                       # names the core in messages
    compression: str | None
    file: str | None = None         # the file to open, None for a core read from a pipe
    pid: int | None = None
    comm: str | None = None
    signal: int | None = None
    threads: list[Thread] = field(default_factory=list)
    files: list[tuple[int, int, int, str]] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)
    vcpus: list[Vcpu] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _source: Any = None

    def close(self) -> None:
        """Close the underlying file."""
        self._source.close()

    def __enter__(self) -> "Core":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, vaddr: int, size: int) -> bytes:
        """`size` bytes of process memory at `vaddr`; MissingDataError if absent."""
        out = bytearray()
        starts = [ld.vaddr for ld in self.loads]
        while size > 0:
            i = bisect.bisect_right(starts, vaddr) - 1
            if i < 0 or vaddr >= self.loads[i].vaddr + self.loads[i].memsz:
                raise MissingDataError(f"address {vaddr:#x} is not in any PT_LOAD")
            ld = self.loads[i]
            rel = vaddr - ld.vaddr
            n = min(size, ld.memsz - rel)
            if rel < ld.filesz:
                n = min(n, ld.filesz - rel)
                data = self._source.pread(ld.offset + rel, n)
                if len(data) < n:
                    raise MissingDataError(
                        f"address {vaddr + len(data):#x} is cut off: the core file ends "
                        f"inside the PT_LOAD at offset {ld.offset:#x} (truncated core)")
                out += data
            else:
                out += bytes(n)  # p_filesz < p_memsz: the tail is not dumped, reads as 0
            vaddr, size = vaddr + n, size - n
        return bytes(out)

    def pieces(self, uaddr: int, size: int) -> Iterator[tuple[int, int, int | None, str]]:
        """(uaddr, size, file offset or None, state) of a host range, per PT_LOAD. State
        DUMPED: the bytes are in the file, at that offset (as far as the file goes);
        EXCLUDED: the PT_LOAD is there but its p_filesz stops short (the kernel did not
        dump the mapping: MADV_DONTDUMP, or the coredump_filter); UNMAPPED: in no PT_LOAD."""
        end = uaddr + size
        for ld in self.loads:
            if ld.vaddr + ld.memsz <= uaddr:
                continue
            if ld.vaddr >= end:
                break
            if ld.vaddr > uaddr:
                yield uaddr, ld.vaddr - uaddr, None, UNMAPPED
                uaddr = ld.vaddr
            stop = min(end, ld.vaddr + ld.memsz)
            dumped = min(stop, ld.vaddr + ld.filesz)
            if dumped > uaddr:
                yield uaddr, dumped - uaddr, ld.offset + uaddr - ld.vaddr, DUMPED
                uaddr = dumped
            if stop > uaddr:
                yield uaddr, stop - uaddr, None, EXCLUDED
                uaddr = stop
        if end > uaddr:
            yield uaddr, end - uaddr, None, UNMAPPED

    def guest_ram(self, vm: Vm) -> dict[str, int | None]:
        """Bytes of `vm`'s guest RAM (as_id 0 memslots): in all ("size"), in the file
        ("dumped"), EXCLUDED, UNMAPPED, and "cut_off" (dumped per the headers, but past the
        end of the file: a truncated core; None when the file size is unknown, as for a
        compressed core, which would have to be decompressed to the end)."""
        fsize = self._source.size
        out: dict[str, int | None] = {"size": 0, DUMPED: 0, EXCLUDED: 0, UNMAPPED: 0,
                                      "cut_off": None if fsize is None else 0}
        for m in vm.memslots:
            if m["as_id"] != 0:
                continue
            out["size"] += m["memory_size"]  # type: ignore[operator]
            for _, n, foff, state in self.pieces(m["userspace_addr"], m["memory_size"]):
                if state == DUMPED and fsize is not None and foff is not None:
                    cut = min(n, max(0, foff + n - fsize))
                    out["cut_off"] += cut  # type: ignore[operator]
                    n -= cut
                out[state] += n  # type: ignore[operator]
        return out

    def guest_ranges(self, vm: int = 0) -> list[tuple[int, int, int]]:
        """(guest_phys_addr, memory_size, userspace_addr) of VM `vm`'s as_id 0 slots."""
        return sorted((m["guest_phys_addr"], m["memory_size"], m["userspace_addr"])
                      for m in self.vms[vm].memslots if m["as_id"] == 0)

    def read_guest_phys(self, gpa: int, size: int, vm: int = 0) -> bytes:
        """`size` bytes of guest-physical memory of VM `vm`, via its memslots."""
        out = bytearray()
        while size > 0:
            for base, length, uaddr in self.guest_ranges(vm):
                if base <= gpa < base + length:
                    n = min(size, base + length - gpa)
                    out += self.read(uaddr + gpa - base, n)
                    gpa, size = gpa + n, size - n
                    break
            else:
                raise MissingDataError(f"guest-physical address {gpa:#x} is in no memslot")
        return bytes(out)


def _magic_kind(magic: bytes, path: str) -> str | None:
    """Compression by magic (None = plain ELF); raise if not ELF at all."""
    if magic.startswith(ELF_MAGIC):
        return None
    for prefix, kind in COMPRESSION_MAGIC.items():
        if magic.startswith(prefix):
            return kind
    raise NotElfError(f"{path}: not an ELF file (nor a zstd/lz4/xz compressed one)")


def _kind(path: str) -> str | None:
    """Compression of the file by magic (None = plain); raise if not ELF at all."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = "a directory" if os.path.isdir(path) else "not a regular file"
            raise KvmnoteError(f"{path}: {kind}, not a core file")
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise KvmnoteError(f"{path}: no such file") from None
    except OSError as e:
        raise KvmnoteError(f"{path}: cannot read: {e.strerror}") from None
    return _magic_kind(magic, path)


def _elf(src: _Source) -> ELFFile:
    """pyelftools' view of the ELF and program headers of the core."""
    head = src.pread(0, 64)
    if not head.startswith(ELF_MAGIC):
        raise NotElfError(f"{src.path}: not an ELF file (decompressed data)")
    if len(head) < 64:
        raise TruncatedError(f"{src.path}: truncated: ELF header cut off at {len(head)} bytes")
    if head[4] != 2 or head[5] != 1:
        raise NotCoreError(f"{src.path}: not a 64-bit little-endian ELF file")
    phoff, phentsize, phnum = (int.from_bytes(head[32:40], "little"),
                               int.from_bytes(head[54:56], "little"),
                               int.from_bytes(head[56:58], "little"))
    phend = phoff + phentsize * phnum
    try:
        if src.plain:
            elf = ELFFile(src.file)
        else:
            elf = ELFFile(io.BytesIO(src.pread(0, min(phend, 16 << 20))))
    except ELFError as e:
        raise NotCoreError(f"{src.path}: bad ELF header: {e}") from None
    if elf["e_type"] != "ET_CORE":
        raise NotCoreError(f"{src.path}: ELF file but not a core dump "
                           f"(e_type {elf['e_type']})")
    if elf["e_machine"] != "EM_X86_64":
        raise NotCoreError(f"{src.path}: core of {elf['e_machine']}, not x86-64")
    if phnum and phentsize != S.size(S.Elf64_Phdr):
        raise NotCoreError(f"{src.path}: e_phentsize {phentsize}, expected 56")
    if src.size is not None and phend > src.size:
        raise TruncatedError(f"{src.path}: truncated: program headers end at {phend}, "
                             f"file has {src.size} bytes")
    return elf


def _segments(elf: ELFFile, path: str) -> list[Any]:
    """Program headers (raw containers), errors as KvmnoteError."""
    try:
        return [elf.get_segment(i).header for i in range(elf.num_segments())]
    except ELFError as e:
        raise TruncatedError(f"{path}: truncated or bad program headers: {e}") from None


def _check_phdr(ph: Any, i: int, path: str) -> None:
    """Refuse a program header whose file range or address range cannot exist."""
    if ph["p_offset"] + ph["p_filesz"] > MAX_OFFSET:
        raise CorruptCoreError(f"{path}: program header {i}: p_offset {ph['p_offset']:#x} + "
                               f"p_filesz {ph['p_filesz']:#x} is beyond any file (corrupt core)")
    if ph["p_type"] == "PT_LOAD" and ph["p_vaddr"] + ph["p_memsz"] > MAX_ADDRESS:
        raise CorruptCoreError(f"{path}: program header {i}: p_vaddr {ph['p_vaddr']:#x} + "
                               f"p_memsz {ph['p_memsz']:#x} is beyond 2^64 (corrupt core)")


def _notes(data: bytes, where: str) -> Iterator[tuple[bytes, int, bytes, int]]:
    """(name, type, desc, offset) of each ELF note in a PT_NOTE segment's bytes."""
    off, count = 0, 0
    while off + 12 <= len(data):
        count += 1
        if count > MAX_NOTE_COUNT:
            raise CorruptNoteError(f"{where}: more than {MAX_NOTE_COUNT} notes, more than any "
                                   f"real core holds (corrupt core)")
        namesz, descsz, ntype = (int.from_bytes(data[off + i:off + i + 4], "little")
                                 for i in (0, 4, 8))
        dstart = off + 12 + S.align(namesz, 4)
        dend = dstart + descsz
        if dend > len(data):
            raise CorruptNoteError(f"{where}: note at offset {off} (namesz {namesz}, "
                                   f"descsz {descsz}) runs past the segment end ({len(data)})")
        yield data[off + 12:off + 12 + namesz].rstrip(b"\0"), ntype, data[dstart:dend], off
        off = S.align(dend, 4)


def _c_string(raw: bytes) -> str:
    """A NUL-terminated byte string as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _nt_file(desc: bytes, where: str) -> list[tuple[int, int, int, str]]:
    """NT_FILE: (start, end, file_ofs, path) of each file-backed mapping."""
    hsize, esize = S.size(S.nt_file_header), S.size(S.nt_file_entry)
    if len(desc) < hsize:
        raise CorruptNoteError(f"{where}: NT_FILE shorter than its header")
    hdr = S.parse(S.nt_file_header, desc)
    if hsize + hdr["count"] * esize > len(desc):
        raise CorruptNoteError(f"{where}: NT_FILE count {hdr['count']} exceeds the note")
    names = desc[hsize + hdr["count"] * esize:].split(b"\0")
    out = []
    for i in range(hdr["count"]):
        e = S.parse(S.nt_file_entry, desc[hsize + i * esize:])
        name = names[i].decode("utf-8", "replace") if i < len(names) else ""
        out.append((e["start"], e["end"], e["file_ofs"] * hdr["page_size"], name))
    return out


def _standard_note(core: Core, ntype: int, desc: bytes, where: str) -> None:
    """Record the process info of a CORE note kvmnote uses."""
    def need(struct: Any) -> dict[str, Any]:
        if len(desc) < S.size(struct):
            raise CorruptNoteError(f"{where}: {len(desc)} bytes, shorter than "
                                   f"{S.size(struct)}")
        return S.parse(struct, desc)
    if ntype == S.NT_PRSTATUS:
        st = need(S.elf_prstatus)
        core.threads.append(Thread(st["pr_pid"], st["pr_cursig"], st["pr_reg"]))
    elif ntype == S.NT_PRPSINFO:
        ps = need(S.elf_prpsinfo)
        core.pid, core.comm = ps["pr_pid"], _c_string(ps["pr_fname"])
    elif ntype == S.NT_SIGINFO:
        core.signal = need(S.siginfo)["si_signo"]
    elif ntype == S.NT_FILE:
        core.files = _nt_file(desc, where)


def open_core(path: str | os.PathLike[str], require_kvm: bool = True,
              stream: Stream | None = None, name: str | None = None) -> Core:
    """Open a core file and parse its notes; raises KvmnoteError for bad input.

    With `stream` the core comes from that pipe instead, read forward once: its headers
    and notes are parsed, its memory beyond HEAD_MAX cannot be read (`path` only names
    it in messages). `name`, if given, names the file `path` in messages (a temporary
    copy of stdin)."""
    path = os.fspath(path)
    if stream is not None:
        try:
            src = _Source(path, _magic_kind(stream.magic, path), stream)
        except BaseException:
            if stream.on_close is not None:
                stream.on_close()
            raise
    else:
        src = _Source(name or path, _kind(path), file_path=path)
    try:
        return _parse(src, require_kvm)
    except BaseException:
        src.close()
        raise


def _parse(src: _Source, require_kvm: bool) -> Core:
    """Read the headers and all PT_NOTE segments of `src` into a Core."""
    core = Core(src.path, src.kind, src.file_path, _source=src)
    elf = _elf(src)
    phdrs = _segments(elf, src.path)
    total = 0
    for i, ph in enumerate(phdrs):
        _check_phdr(ph, i, src.path)
        if ph["p_type"] == "PT_LOAD":
            core.loads.append(Load(ph["p_vaddr"], ph["p_memsz"], ph["p_offset"],
                                   ph["p_filesz"], ph["p_flags"]))
        if ph["p_type"] != "PT_NOTE":
            continue
        where = f"{src.path}: PT_NOTE (program header {i}, file offset {ph['p_offset']})"
        total += ph["p_filesz"]
        if total > MAX_NOTES:
            raise CorruptNoteError(f"{where}: PT_NOTE of {ph['p_filesz']} bytes ({total} in "
                                   f"all), more than any real core holds ({MAX_NOTES}; "
                                   f"corrupt core)")
        end = ph["p_offset"] + ph["p_filesz"]
        if src.size is not None and end > src.size:
            raise TruncatedError(f"{where}: truncated: notes end at {end}, "
                                 f"file has {src.size} bytes")
        data = src.pread(ph["p_offset"], ph["p_filesz"])
        if len(data) < ph["p_filesz"]:
            raise TruncatedError(f"{where}: truncated: notes end at {end}, the "
                                 f"decompressed core ends at {ph['p_offset'] + len(data)}")
        for name, ntype, desc, off in _notes(data, where):
            note_where = f"{where}: note at offset {off}"
            if name == S.KVM_CORE_NOTE_NAME and ntype in (S.NT_KVM_VM, S.NT_KVM_VCPU,
                                                          S.NT_KVM_DROPPED):
                obj = parse_desc(ntype, desc, note_where)
                if isinstance(obj, Vm):
                    core.vms.append(obj)
                elif isinstance(obj, Dropped):
                    core.dropped.append(obj)
                else:
                    core.vcpus.append(obj)
            elif name == b"CORE":
                try:
                    _standard_note(core, ntype, desc, note_where)
                except CorruptNoteError as e:   # not needed for the KVM state: go on
                    core.warnings.append(f"{e} (note ignored)")
    core.loads.sort(key=lambda ld: ld.vaddr)
    if require_kvm and not core.vms and not core.vcpus and not core.dropped:
        raise NoKvmNotesError(_no_kvm_notes(core))
    _drop_duplicates(core)
    by_index = {vm.vm_index: vm for vm in core.vms}
    for vcpu in core.vcpus:
        if vcpu.vm_index in by_index:
            by_index[vcpu.vm_index].vcpus.append(vcpu)
    return core


def _no_kvm_notes(core: Core) -> str:
    """Why a core has no KVM notes, as far as its NT_FILE tells."""
    vcpu_maps = sorted({name for *_, name in core.files
                        if name.startswith("anon_inode:kvm-vcpu")})
    if not vcpu_maps:
        return (f"{core.path}: no KVM notes: was this core written by a kernel with the "
                f"kvmnote patches, and was the process a KVM VMM?")
    return (f"{core.path}: no KVM notes, yet the process had KVM vCPUs ({len(vcpu_maps)} "
            f"anon_inode:kvm-vcpu mappings in NT_FILE): the kernel that wrote the core lacks "
            f"the kvmnote series, or the notes were switched off (kvm.coredump_notes=0, or "
            f"bit 9, 0x200, clear in the process's /proc/PID/coredump_filter)")


def _drop_duplicates(core: Core) -> None:
    """Keep the first VM note of each vm_index and the first vCPU note of each (vm_index,
    vcpu_id); the kernel never writes two, so a later one is dropped with a warning."""
    vms: dict[int, Vm] = {}
    for vm in core.vms:
        if vm.vm_index in vms:
            core.warnings.append(f"{core.path}: a second VM note with vm_index {vm.vm_index} "
                                 f"(corrupt core): the first one is used")
        else:
            vms[vm.vm_index] = vm
    vcpus: dict[tuple[int, int], Vcpu] = {}
    for v in core.vcpus:
        if (v.vm_index, v.vcpu_id) in vcpus:
            core.warnings.append(f"{core.path}: a second vCPU note for vcpu_id {v.vcpu_id} "
                                 f"of VM {v.vm_index} (corrupt core): the first one is used")
        else:
            vcpus[(v.vm_index, v.vcpu_id)] = v
    core.vms, core.vcpus = list(vms.values()), list(vcpus.values())
