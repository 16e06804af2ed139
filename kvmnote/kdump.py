"""The guest vmcore in makedumpfile's kdump-compressed format (`kvmnote vmcore --format kdump`).

Layout (makedumpfile's diskdump_mod.h, header version 6, plain, not flattened), in blocks of
one page:

    block 0           disk_dump_header ("KDUMP   ")
    block 1...        kdump_sub_header, then the ELF notes (NT_PRSTATUS per CPU, QEMU per
                      CPU, VMCOREINFO: the same notes as the ELF output)
    bitmap blocks     1st bitmap (pages that exist: the RAM slots), 2nd bitmap (pages dumped)
    page_desc table   one 24-byte descriptor per dumped page, in PFN order
    page data         one raw zero page, which every all-zero page's descriptor points
                      to (as makedumpfile -d 1 does); then each other page compressed
                      alone (or raw when that is not smaller)

Pages are read in batches, compressed by a pool of threads (the compressors release the GIL)
and written in PFN order by the caller's thread.
"""

import array
import ctypes
import ctypes.util
import itertools
import os
import shutil
import struct
import subprocess
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard

from . import vmcore as V
from .core import open_core
from .errors import KvmnoteError

PAGE = V.PAGE
BATCH = 512 * PAGE                     # pages compressed per task: 2 MiB
ZERO_PAGE = bytes(PAGE)
# Threads compressing; with 2 batches more in flight, at most ~5 MiB each (the batch, its
# copy, its compressed pages): RSS stays under 100 MiB on any machine.
MAX_WORKERS = 8
SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
# disk_dump_header: signature, header_version, utsname (6 x 65 chars), timeval, status,
# block_size, sub_hdr_size, bitmap_blocks, max_mapnr (32 bits), total_ram_blocks,
# device_blocks, written_blocks, current_cpu, nr_cpus.
DISK_DUMP_HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")
# kdump_sub_header: phys_base, dump_level, split, start_pfn, end_pfn, offset_vmcoreinfo,
# size_vmcoreinfo, offset_note, size_note, offset_eraseinfo, size_eraseinfo,
# start_pfn_64, end_pfn_64, max_mapnr_64.
KDUMP_SUB_HEADER = struct.Struct("<QiiQQqQqQqQQQQ")
PAGE_DESC = struct.Struct("<qIIQ")     # offset, size, flags, page_flags
# Compression flags of page_desc.flags and disk_dump_header.status.
COMPRESSIONS = {"zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
DEFAULT_COMPRESSION = "zstd"
# makedumpfile -d bits; kvmnote does 1 (zero pages: stored once) itself.
DUMP_LEVEL_BITS = {1: "zero", 2: "cache", 4: "cache private", 8: "user", 16: "free"}


class _Codec:
    """Per-page compression of a batch, one instance per thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "zstd":
            self.zstd = zstandard.ZstdCompressor(level=1)     # makedumpfile's level
        else:
            self.lib = _load(name)
            self.out = ctypes.create_string_buffer(2 * PAGE)
            self.size = ctypes.c_size_t()
            self.wrk = ctypes.create_string_buffer(1 << 17) if name == "lzo" else None

    def compress(self, data: bytearray, keep: list[int]) -> list:
        """Page `keep[i]` of `data` compressed, for each i."""
        if self.name == "zstd":
            segs = array.array("Q", itertools.chain.from_iterable((i * PAGE, PAGE)
                                                                    for i in keep))
            out = self.zstd.multi_compress_to_buffer(
                zstandard.BufferWithSegments(data, segs.tobytes()), threads=1)
            return [out[i] for i in range(len(out))]
        pinned = (ctypes.c_char * len(data)).from_buffer(data)
        base = ctypes.addressof(pinned)
        out, size = ctypes.addressof(self.out), self.size
        psize, room, string_at = ctypes.addressof(size), len(self.out), ctypes.string_at
        res = []
        if self.name == "lzo":
            fn, wrk = self.lib.lzo1x_1_compress, ctypes.addressof(self.wrk)
            for i in keep:
                rc = fn(base + i * PAGE, PAGE, out, psize, wrk)
                # A failure makes it longer than a page: the caller then stores it raw.
                res.append(string_at(out, size.value) if rc == 0 else ZERO_PAGE + b"x")
        elif self.name == "zlib":        # compress2(dst, &dst_len, src, len, level)
            fn = self.lib.compress2
            for i in keep:
                size.value = room
                rc = fn(out, psize, base + i * PAGE, PAGE, 1)     # makedumpfile's level
                res.append(string_at(out, size.value) if rc == 0 else ZERO_PAGE + b"x")
        else:
            fn = self.lib.snappy_compress
            for i in keep:
                size.value = room
                rc = fn(base + i * PAGE, PAGE, out, psize)
                res.append(string_at(out, size.value) if rc == 0 else ZERO_PAGE + b"x")
        del pinned
        return res


_LIBS: dict[str, ctypes.CDLL] = {}


# Per-page compressors of the system's libraries (as crash and makedumpfile use), called
# through ctypes, which releases the GIL during each call: (soname, function, argtypes).
_CFUNCS = {
    "lzo": ("lzo2", "lzo1x_1_compress", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p]),
    "snappy": ("snappy", "snappy_compress", [ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_void_p, ctypes.c_void_p]),
    "zlib": ("z", "compress2", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_ulong, ctypes.c_int]),
}
_PACKAGES = {"lzo": "liblzo2-2", "snappy": "libsnappy1v5", "zlib": "zlib1g"}


def _load(name: str) -> ctypes.CDLL:
    """liblzo2, libsnappy or libz, with the argument types of its compressor."""
    if name not in _LIBS:
        soname, func, argtypes = _CFUNCS[name]
        try:
            lib = ctypes.CDLL(ctypes.util.find_library(soname) or "")
            fn = getattr(lib, func)
        except (OSError, AttributeError):
            raise KvmnoteError(f"--compress {name} needs the {name} library "
                               f"(Debian: apt-get install {_PACKAGES[name]})") from None
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _LIBS[name] = lib
    return _LIBS[name]


def check_compression(name: str) -> None:
    """Refuse an unknown or unavailable compression before anything is written."""
    if name not in COMPRESSIONS:
        raise KvmnoteError(f"--compress {name}: not one of {', '.join(COMPRESSIONS)}")
    if name in _CFUNCS:
        _load(name)


MAKEDUMPFILE_FLAG = {"zlib": "-c", "lzo": "-l", "snappy": "-p", "zstd": "-z"}


def check_dump_level(level: int, compression: str) -> str | None:
    """None when kvmnote writes `level` itself (0, 1); else the makedumpfile to filter with
    (levels with cache, user or free pages need the guest's mem_map, which makedumpfile
    reads), or a refusal."""
    if not 0 <= level <= 31:
        raise KvmnoteError(f"--dump-level {level}: must be 0 to 31 (makedumpfile -d)")
    other = [n for b, n in DUMP_LEVEL_BITS.items() if level & b and b != 1]
    if not other:
        return None
    what = f"--dump-level {level} (leaving out {', '.join(other)} pages)"
    exe = shutil.which("makedumpfile")
    if exe is None:
        raise KvmnoteError(f"{what} reads the guest's mem_map through makedumpfile, which "
                           f"is not installed (Debian: apt-get install makedumpfile)")
    if compression != "zlib":
        try:
            caps = subprocess.run([exe, "-v"], capture_output=True, text=True).stdout
        except OSError as e:
            raise KvmnoteError(f"{exe}: cannot run: {e.strerror}") from None
        if f"{compression}\tenabled" not in caps:
            raise KvmnoteError(f"{what}: this makedumpfile was built without {compression} "
                               f"(makedumpfile -v); choose --compress zlib"
                               + (" or lzo" if "lzo\tenabled" in caps else ""))
    return exe


def _filter(exe: str, elf: str, out: str, level: int, compression: str) -> None:
    """makedumpfile -d `level` from our ELF vmcore; refuse a guest kernel it does not know."""
    cmd = [exe, MAKEDUMPFILE_FLAG[compression], "-d", str(level), elf, out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    said = (p.stdout + p.stderr).strip()
    if "kernel version is not supported" in said:
        raise KvmnoteError(f"--dump-level {level}: makedumpfile ({exe}) does not know this "
                           f"guest's kernel version, so cannot filter it safely; use "
                           f"--dump-level 1, or a newer makedumpfile")
    if p.returncode != 0:
        last = [ln for ln in said.splitlines() if ln.strip()][-3:]
        raise KvmnoteError(f"--dump-level {level}: makedumpfile failed: {' / '.join(last)}")


def _zero_pages(data: bytes | bytearray) -> list[int]:
    """Indices of the all-zero pages of `data` (a whole number of pages), found in C:
    only pages whose first byte is zero are compared."""
    heads, zero = data[::PAGE], []
    i = heads.find(0)
    while i >= 0:
        if data.startswith(ZERO_PAGE, i * PAGE):
            zero.append(i)
        i = heads.find(0, i + 1)
    return zero


def _batch(codecs: threading.local, name: str, data: bytearray
           ) -> tuple[list[int], list, list[int]]:
    """(zero page indices, page buffers, page_desc flags of the non-zero pages) of a batch;
    runs in a pool thread."""
    codec = getattr(codecs, "codec", None)
    if codec is None:
        codec = codecs.codec = _Codec(name)
    zero = _zero_pages(data)
    zs = set(zero)
    keep = [i for i in range(len(data) // PAGE) if i not in zs] if zero else \
        list(range(len(data) // PAGE))
    bufs = codec.compress(data, keep) if keep else []
    flag = COMPRESSIONS[name]
    flags = [flag] * len(bufs)
    view = memoryview(bytes(data)) if any(len(b) >= PAGE for b in bufs) else None
    if view is not None:                # incompressible pages are stored raw, flags 0
        for j, b in enumerate(bufs):
            if len(b) >= PAGE:
                bufs[j] = view[keep[j] * PAGE:(keep[j] + 1) * PAGE]
                flags[j] = 0
    return zero, bufs, flags


class _Bitmap:
    """A PFN bitmap (LSB first, as makedumpfile), set a batch at a time with int arithmetic."""

    def __init__(self, npfn: int) -> None:
        self.bits = bytearray((npfn + 7) // 8)

    def set_run(self, pfn: int, count: int, clear: list[int] | None = None) -> None:
        """Set `count` bits from `pfn`, except those at pfn + i for i in `clear`."""
        if count <= 0:
            return
        if not clear and count > 64:     # a long run (a whole RAM slot): whole bytes
            head = min(count, -pfn % 8)
            self.set_run(pfn, head)
            full = (count - head) // 8
            a = (pfn + head) // 8
            self.bits[a:a + full] = b"\xff" * full
            self.set_run(pfn + head + 8 * full, count - head - 8 * full)
            return
        mask = bytearray(b"1" * count)
        for i in clear or ():
            mask[i] = 0x30
        shift = pfn % 8
        val = int(mask[::-1], 2) << shift
        a, b = pfn // 8, (pfn + count + 7) // 8
        old = int.from_bytes(self.bits[a:b], "little")
        self.bits[a:b] = (old | val).to_bytes(b - a, "little")


def _vmcoreinfo_value(info: bytes | None, key: str) -> str | None:
    """The value of `key=` in the VMCOREINFO text."""
    for line in (info or b"").decode("ascii", "replace").splitlines():
        k, sep, v = line.partition("=")
        if sep and k == key:
            return v.strip()
    return None


def _number(text: str | None) -> int:
    """A VMCOREINFO NUMBER() (decimal, as the kernel prints it with %ld: phys_base is
    negative when KASLR loads the kernel below its link address); 0 if absent or bad."""
    try:
        return int(text or "0")
    except ValueError:
        return 0


START_KERNEL_MAP = 0xFFFFFFFF80000000
UTS_UNKNOWN = "(unknown: not found in guest RAM)"


def _utsname(core, vm_index: int, info: bytes | None, phys_base: int) -> bytes:
    """new_utsname (6 x 65 chars) for the header: the guest's own init_uts_ns.name when
    VMCOREINFO locates it, else sysname, release (OSRELEASE) and machine only.

    libkdumpfile (drgn) takes the architecture from it and wants release, version and
    machine non-empty."""
    release = _vmcoreinfo_value(info, "OSRELEASE") or UTS_UNKNOWN
    fields = ["Linux", UTS_UNKNOWN, release, UTS_UNKNOWN, "x86_64", ""]
    sym = _vmcoreinfo_value(info, "SYMBOL(init_uts_ns)")
    off = _vmcoreinfo_value(info, "OFFSET(uts_namespace.name)")
    if sym and off:
        try:
            gpa = int(sym, 16) - START_KERNEL_MAP + phys_base + int(off)
            raw = core.read_guest_phys(gpa, 6 * 65, vm_index)
        except (KvmnoteError, ValueError):
            raw = b""
        names = [raw[i * 65:(i + 1) * 65].split(b"\0")[0] for i in range(6)] if raw else []
        if names and names[0] == b"Linux" and names[4] == b"x86_64" and names[2] \
                and all(n.isascii() for n in names):
            fields = [n.decode() for n in names]
    return b"".join(f.encode()[:64].ljust(65, b"\0") for f in fields)


def write_kdump(core_path: str, out_path: str, *, vm_index: int | None = None,
                cpu_map: dict[int, int] | None = None, vmcoreinfo: bytes | None = None,
                allow_partial: bool = False, force: bool = False,
                progress: V.Progress | None = None, compression: str = DEFAULT_COMPRESSION,
                dump_level: int = 1, jobs: int | None = None) -> V.Result:
    """Convert VMM core `core_path` into a kdump-compressed guest vmcore `out_path`."""
    check_compression(compression)
    makedumpfile = check_dump_level(dump_level, compression)
    if makedumpfile is not None:
        return _write_filtered(makedumpfile, core_path, out_path, dump_level, compression,
                               vm_index=vm_index, cpu_map=cpu_map, vmcoreinfo=vmcoreinfo,
                               allow_partial=allow_partial, force=force, progress=progress)
    with open_core(core_path) as core:
        vm = V.select_vm(core, vm_index)
        slots = V._ram_slots(core, vm)
        if not vm.vcpus:
            raise KvmnoteError(f"{core.path}: VM {vm.vm_index} has no vCPU notes")
        cpus = V.assign_cpus(vm.vcpus, cpu_map)
        result = V.Result([(c, v.vcpu_id) for c, v in cpus], [(g, s) for g, s, _ in slots])
        cpu_notes = V.l1_cpu_notes(core, vm, cpus, allow_partial, result)
        info_room = len(V._note(V.S.VMCOREINFO_NOTE_NAME, 0, vmcoreinfo
                                if vmcoreinfo is not None else bytes(V.VMCOREINFO_MAX)))
        max_pfn = max((g + s + PAGE - 1) // PAGE for g, s, _ in slots)
        sub_blocks = -(-(KDUMP_SUB_HEADER.size + len(cpu_notes) + info_room) // PAGE)
        bitmap_bytes = -(-max_pfn // (8 * PAGE)) * PAGE        # each bitmap, whole blocks
        desc_off = (1 + sub_blocks) * PAGE + 2 * bitmap_bytes
        ram_pages = sum(-(-s // PAGE) for _, s, _ in slots)
        data_off = V.S.align(desc_off + ram_pages * PAGE_DESC.size, PAGE)
        fd = V._open_output(out_path, core_path, force)
        done = False
        try:
            scan = V.VmcoreinfoScanner() if vmcoreinfo is None else None
            bitmap_off = (1 + sub_blocks) * PAGE
            valid = _Bitmap(max_pfn)
            for gpa, size, _ in slots:
                valid.set_run(gpa // PAGE, -(-size // PAGE))
            os.pwrite(fd, valid.bits, bitmap_off)
            del valid
            dumped = _Bitmap(max_pfn)     # 1 bit per guest page: 32 MiB for 1 TiB
            out = _Out(fd, desc_off, data_off)
            out.zero = out.data          # zero pages: all point to one raw zero page
            out.append([ZERO_PAGE])
            result.missing = _copy(core, slots, out, dumped, scan, progress, compression,
                                   jobs)
            vmcoreinfo = V.settle_vmcoreinfo(vmcoreinfo, scan, result, "guest RAM",
                                             "; phys_base written as 0")
            info = V.clean_vmcoreinfo(vmcoreinfo) if vmcoreinfo is not None else None
            notes = cpu_notes
            if info is not None:
                notes += V._note(V.S.VMCOREINFO_NOTE_NAME, 0, info)
            phys_base = _number(_vmcoreinfo_value(info, "NUMBER(phys_base)"))
            note_off = PAGE + KDUMP_SUB_HEADER.size
            info_off = note_off + len(cpu_notes) + 12 + V.S.align(
                len(V.S.VMCOREINFO_NOTE_NAME) + 1, 4)     # the desc of the VMCOREINFO note
            sub = KDUMP_SUB_HEADER.pack(
                phys_base & (1 << 64) - 1, dump_level, 0, 0, min(max_pfn, 2**32 - 1),
                info_off if info else 0, len(info) if info else 0, note_off, len(notes),
                0, 0, 0, max_pfn, max_pfn)
            mtime = int(os.stat(core_path).st_mtime)
            head = DISK_DUMP_HEADER.pack(
                SIGNATURE, HEADER_VERSION, _utsname(core, vm.vm_index, info, phys_base), mtime, 0,
                COMPRESSIONS[compression], PAGE, sub_blocks, 2 * bitmap_bytes // PAGE,
                min(max_pfn, 2**32 - 1), 0, 0, 0, 0, len(cpus))
            os.pwrite(fd, head.ljust(PAGE, b"\0") + sub + notes, 0)
            os.pwrite(fd, dumped.bits, bitmap_off + bitmap_bytes)   # the rest: a hole
            os.ftruncate(fd, max(out.data, data_off))
            done = True
        except OSError as e:    # ENOSPC, EIO, EFBIG...
            raise KvmnoteError(f"{out_path}: cannot write: {e.strerror}") from None
        finally:
            os.close(fd)
            if not done:
                os.unlink(out_path)
    return result


def _write_filtered(exe: str, core_path: str, out_path: str, level: int, compression: str,
                    **elf_args) -> V.Result:
    """Our ELF vmcore beside the output, then makedumpfile -d `level` into the output."""
    force = elf_args["force"]
    os.close(V._open_output(out_path, core_path, force))      # the same refusals as ever
    elf = f"{out_path}.kvmnote-elf"
    done = False
    try:
        result = V.write_vmcore(core_path, elf, **{**elf_args, "force": True})
        os.unlink(out_path)                                    # makedumpfile creates it
        _filter(exe, elf, out_path, level, compression)
        done = True
    finally:
        for path in (elf,) if done else (elf, out_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return result


class _Out:
    """The descriptor table and the page data, both appended in PFN order."""

    def __init__(self, fd: int, desc_off: int, data_off: int) -> None:
        self.fd, self.desc, self.data = fd, desc_off, data_off
        self.zero: int | None = None      # offset of the shared zero page (dump level 0)

    def append(self, bufs: list) -> list[int]:
        """Write page buffers after the data so far; their offsets."""
        sizes = [len(b) for b in bufs]
        offs = list(itertools.accumulate(sizes, initial=self.data))
        for i in range(0, len(bufs), 1024):           # IOV_MAX
            part = bufs[i:i + 1024]
            want = offs[i + len(part)] - offs[i]
            if os.pwritev(self.fd, part, offs[i]) != want:
                raise OSError(28, os.strerror(28))    # short write: the disk is full
        self.data = offs[-1]
        return offs[:-1]

    def descs(self, offs: list[int], sizes: list[int], flags: list[int]) -> None:
        """Append page descriptors."""
        d = array.array("Q", bytes(24 * len(offs)))
        d[0::3] = array.array("Q", offs)
        d[1::3] = array.array("Q", [s | f << 32 for s, f in zip(sizes, flags)])
        os.pwrite(self.fd, d.tobytes(), self.desc)
        self.desc += len(d) * 8


def _read(reader: V._Reader, uaddr: int, foff: int, data: memoryview) -> int:
    """Fill `data` from the core (zeros past its end); how many bytes it had. A plain core
    in one pread (holes not read), a compressed one through the ELF writer's reader."""
    n = len(data)
    if reader.fd >= 0:
        have = max(0, min(n, reader.size - foff))
        try:
            hole = os.lseek(reader.fd, foff, os.SEEK_DATA) >= foff + have
        except OSError:                   # ENXIO: a hole up to the end of the file
            hole = True
        got = 0 if hole else os.preadv(reader.fd, [memoryview(data)[:have]], foff)
        if got < n:
            data[got:] = bytes(n - got)
        return have if hole else got
    got = 0
    while got < n:
        want = min(V.CHUNK, n - got)
        piece = reader.read(uaddr + got, foff + got, want)
        data[got:got + len(piece)] = piece
        got += len(piece)
        if len(piece) < want:
            data[got:] = bytes(n - got)
            break
    return got


def _copy(core, slots, out: _Out, dumped: _Bitmap, scan, progress, compression: str,
          jobs: int | None) -> list[V.Missing]:
    """Read every slot in batches, compress them in a thread pool, write them in order."""
    missing: list[V.Missing] = []
    total, done = sum(s[1] for s in slots), 0
    workers = jobs or min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    codecs = threading.local()
    pending: deque[tuple[int, int, Future, bytearray]] = deque()
    free: list[bytearray] = []      # batch buffers to reuse: no page faults per batch

    def lack(gpa: int, n: int, why: str) -> None:
        last = missing[-1] if missing else None
        if last and last.gpa + last.size == gpa and last.reason == why:
            last.size += n
        else:
            missing.append(V.Missing(gpa, n, why))

    def flush(limit: int) -> None:
        while len(pending) > limit:
            pfn, npages, fut, data = pending.popleft()
            zero, bufs, flags = fut.result()
            offs = out.append(bufs)
            if len(data) == BATCH:
                free.append(data)
            sizes = [len(b) for b in bufs]
            if zero:        # splice in the zero pages' descriptors: a loop per zero page
                o, s, f, j, prev = [], [], [], 0, 0
                for z in zero:
                    n = z - prev              # non-zero pages before this zero page
                    o += offs[j:j + n]
                    s += sizes[j:j + n]
                    f += flags[j:j + n]
                    o.append(out.zero)
                    s.append(PAGE)
                    f.append(0)
                    j, prev = j + n, z + 1
                offs, sizes, flags = o + offs[j:], s + sizes[j:], f + flags[j:]
            dumped.set_run(pfn, npages)
            out.descs(offs, sizes, flags)

    reader = V._Reader(core)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for gpa, size, uaddr in slots:
                for ua, n, foff, state in core.pieces(uaddr, size):
                    g = gpa + ua - uaddr
                    if foff is None:
                        lack(g, n, V.WHY[state])
                    for pos in range(0, n, BATCH):
                        step = min(BATCH, n - pos)
                        size_pages = step + -step % PAGE
                        data = free.pop() if free and size_pages == BATCH \
                            else bytearray(size_pages)
                        if foff is None:
                            data[:] = bytes(size_pages)
                        else:
                            got = _read(reader, ua + pos, foff + pos, memoryview(data)[:step])
                            if got < step:
                                lack(g + pos + got, step - got,
                                     "cut off: the core file ends before it (truncated core)")
                        if scan and foff is not None:
                            scan.feed(g + pos, data)
                        pending.append(((g + pos) // PAGE, len(data) // PAGE,
                                        pool.submit(_batch, codecs, compression, data), data))
                        flush(workers + 1)
                        if progress:
                            progress(done + pos + step, total)
                    done += n
            flush(0)
    finally:
        reader.close()
    return missing
