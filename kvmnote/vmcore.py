"""Turn a crashed VMM's core into a guest vmcore (the format of QEMU's dump-guest-memory).

The output is what `crash`, `gdb` and `drgn` open: an ELF64 ET_CORE file whose PT_NOTE
program header comes first, holding one CORE/NT_PRSTATUS per guest CPU (pr_pid = CPU + 1),
then one QEMU note (QEMUCPUState) per CPU, then the guest kernel's VMCOREINFO; and one
PT_LOAD per guest RAM slot with p_paddr = p_vaddr = guest-physical address.
"""

import bisect
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import nested as N
from . import schema as S
from .core import (EXCLUDED, EXCLUDED_FIX, EXCLUDED_WHY, TRUNCATED_WHY, UNMAPPED, Core,
                   open_core)
from .errors import CompressedError, CorruptCoreError, KvmnoteError, MissingDataError
from .notes import Vcpu, Vm

PAGE = 4096
CHUNK = 1 << 18
ZERO_CHUNK = bytes(CHUNK)
ZERO_PAGE = bytes(PAGE)
# Largest VMCOREINFO accepted (the kernel's is at most one page).
VMCOREINFO_MAX = 8192
PT_LOAD, PT_NOTE, ET_CORE, EM_X86_64 = 1, 4, 4, 62
# What KVM_SET_USER_MEMORY_REGION accepts: at most KVM_MEM_MAX_NR_PAGES (2^31 - 1) pages
# per slot, guest-physical addresses below 2^52 (the architectural MAXPHYADDR limit), and
# userspace addresses below 2^56 (TASK_SIZE with 5-level paging). A memslot beyond them
# is corrupt, and would ask for an output file no file system holds.
MAX_SLOT_SIZE = ((1 << 31) - 1) * PAGE
MAX_GPA = 1 << 52
MAX_UADDR = 1 << 56

Progress = Callable[[int, int], None]
WHY = {EXCLUDED: "excluded by the VMM (MADV_DONTDUMP: the PT_LOAD has p_filesz < p_memsz)",
       UNMAPPED: "not in the core (no PT_LOAD)"}
CUT = f"cut off: the core file ends before it ({TRUNCATED_WHY})"
# One line for guest RAM left out on purpose (after the byte count).
EXCLUDED_HINT = f"{EXCLUDED_WHY}, written as zeros; {EXCLUDED_FIX}"


@dataclass
class Missing:
    """A guest-physical range the core does not hold, and why."""

    gpa: int
    size: int
    reason: str

    def __str__(self) -> str:
        return f"{self.gpa:#x}-{self.gpa + self.size - 1:#x} ({self.size} bytes): {self.reason}"


@dataclass
class Result:
    """What `write_vmcore` wrote: CPUs, RAM ranges, and what is missing or odd."""

    cpus: list[tuple[int, int]]           # (guest CPU number, vcpu_id)
    ram: list[tuple[int, int]]            # (gpa, size) of each PT_LOAD
    missing: list[Missing] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stateless: list[int] = field(default_factory=list)   # CPUs written with zero registers
    notes: list[str] = field(default_factory=list)       # what the user should know, not bad
    vmcoreinfo: str | None = None         # "guest RAM at 0x...", "given", or None

    @property
    def complete(self) -> bool:
        """True when every guest RAM byte and every CPU's state was written."""
        return not self.missing and not self.stateless


def parse_cpu_map(text: str) -> dict[int, int]:
    """`VCPU_ID=CPU,...` (as given to --cpu-map) as {vcpu_id: cpu}."""
    out: dict[int, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, val = item.partition("=")
        try:
            vcpu_id, cpu = int(key, 0), int(val, 0)
        except ValueError:
            raise KvmnoteError(f"--cpu-map: {item!r} is not VCPU_ID=CPU") from None
        if not sep or vcpu_id < 0 or cpu < 0:
            raise KvmnoteError(f"--cpu-map: {item!r} is not VCPU_ID=CPU")
        if vcpu_id in out:
            raise KvmnoteError(f"--cpu-map: vcpu_id {vcpu_id} given twice")
        out[vcpu_id] = cpu
    return out


def select_vm(core: Core, vm_index: int | None) -> Vm:
    """The VM to convert: the only one, or the one with `vm_index`."""
    if not core.vms:
        raise KvmnoteError(f"{core.path}: vCPU notes but no VM note (no memslot map)")
    if vm_index is None:
        if len(core.vms) > 1:
            raise KvmnoteError(f"{core.path}: {len(core.vms)} VMs in this core "
                               f"(vm_index {sorted(v.vm_index for v in core.vms)}): "
                               f"choose one with --vm N")
        return core.vms[0]
    for vm in core.vms:
        if vm.vm_index == vm_index:
            return vm
    raise KvmnoteError(f"{core.path}: no VM with vm_index {vm_index} "
                       f"(have {sorted(v.vm_index for v in core.vms)})")


def assign_cpus(vcpus: list[Vcpu], cpu_map: dict[int, int] | None) -> list[tuple[int, Vcpu]]:
    """(guest CPU number, vCPU) in CPU order: by vcpu_id, or as `cpu_map` says."""
    by_id = {v.vcpu_id: v for v in vcpus}
    if cpu_map is None:
        return list(enumerate(by_id[i] for i in sorted(by_id)))
    unknown = sorted(set(cpu_map) - set(by_id))
    unmapped = sorted(set(by_id) - set(cpu_map))
    if unknown or unmapped:
        raise KvmnoteError(f"--cpu-map must map exactly the vcpu_ids {sorted(by_id)}"
                           + (f"; unknown {unknown}" if unknown else "")
                           + (f"; unmapped {unmapped}" if unmapped else ""))
    if len(set(cpu_map.values())) != len(cpu_map):
        raise KvmnoteError("--cpu-map gives two vCPUs the same CPU number")
    return sorted((cpu, by_id[vid]) for vid, cpu in cpu_map.items())


def _seg_flags(seg: dict[str, int]) -> int:
    """kvm_segment attributes as QEMU's SegmentCache.flags (target/i386/kvm/kvm.c get_seg)."""
    return (seg["type"] << S.DESC_TYPE_SHIFT | seg["s"] << S.DESC_S_SHIFT
            | seg["dpl"] << S.DESC_DPL_SHIFT
            | int(bool(seg["present"]) and not seg["unusable"]) << S.DESC_P_SHIFT
            | seg["avl"] << S.DESC_AVL_SHIFT | seg["l"] << S.DESC_L_SHIFT
            | seg["db"] << S.DESC_B_SHIFT | seg["g"] << S.DESC_G_SHIFT)


State = tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]   # regs, sregs, msrs


def prstatus_desc(cpu: int, state: State | None) -> bytes:
    """NT_PRSTATUS of guest CPU `cpu` as QEMU writes it (zeros but pr_pid without state)."""
    st = S.zeroed(S.elf_prstatus)
    st["pr_pid"] = cpu + 1
    if state is not None:
        regs, sregs, _ = state
        reg = st["pr_reg"]
        for name in S.USER_REGS:
            if name in regs:
                reg[name] = regs[name]
        reg.update(eflags=regs["rflags"], orig_rax=0,
                   fs_base=sregs["fs"]["base"], gs_base=sregs["gs"]["base"],
                   **{s: sregs[s]["selector"] for s in ("cs", "ss", "ds", "es", "fs", "gs")})
    return S.elf_prstatus.build(st)


def qemu_desc(state: State | None) -> bytes:
    """The QEMU note's QEMUCPUState (version 1, with kernel_gs_base) of a vCPU."""
    st = S.zeroed(S.QEMUCPUState)
    st.update(version=S.QEMUCPUSTATE_VERSION, size=S.size(S.QEMUCPUState))
    if state is not None:
        regs, sregs, msrs_list = state
        st.update({k: v for k, v in regs.items() if k in st})
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr"):
            seg = sregs[name]
            st[name] = {"selector": seg["selector"], "limit": seg["limit"],
                        "flags": _seg_flags(seg), "pad": 0, "base": seg["base"]}
        for name in ("gdt", "idt"):  # QEMU keeps base and limit only
            st[name] = {"selector": 0, "limit": sregs[name]["limit"], "flags": 0, "pad": 0,
                        "base": sregs[name]["base"]}
        st["cr"] = [sregs["cr0"], 0, sregs["cr2"], sregs["cr3"], sregs["cr4"]]
        msrs = {m["index"]: m["data"] for m in msrs_list}
        st["kernel_gs_base"] = msrs.get(S.MSR_KERNEL_GS_BASE, 0)
    return S.QEMUCPUState.build(st)


def clean_vmcoreinfo(text: bytes) -> bytes:
    """VMCOREINFO text without CRASHTIME (drgn then takes registers from NT_PRSTATUS)."""
    text = text.rstrip(b"\0")
    lines = [ln for ln in text.split(b"\n") if not ln.startswith(b"CRASHTIME=")]
    return b"\n".join(lines)


def _valid_vmcoreinfo(desc: bytes) -> bool:
    """Plausible VMCOREINFO text: OSRELEASE= first, printable KEY=VALUE lines."""
    text = desc.rstrip(b"\0")
    if not text.startswith(b"OSRELEASE=") or not text.isascii():
        return False
    return all(b"=" in ln for ln in text.split(b"\n") if ln)


def read_vmcoreinfo_file(path: str) -> bytes:
    """VMCOREINFO from a file: its text, or a whole VMCOREINFO ELF note."""
    try:
        with open(path, "rb") as f:
            data = f.read(VMCOREINFO_MAX + 64)
    except OSError as e:
        raise KvmnoteError(f"--vmcoreinfo {path}: {e.strerror}") from None
    if data[12:24] == S.VMCOREINFO_NOTE_NAME + b"\0\0":
        data = data[24:24 + int.from_bytes(data[4:8], "little")]
    if len(data) > VMCOREINFO_MAX or not _valid_vmcoreinfo(data):
        raise KvmnoteError(f"--vmcoreinfo {path}: not VMCOREINFO text "
                           f"(expected KEY=VALUE lines starting with OSRELEASE=)")
    return data


class VmcoreinfoScanner:
    """Find the kernel's VMCOREINFO ELF note in guest RAM fed in ascending order.

    Linux (since 4.13) allocates the note with alloc_pages_exact(), so only notes at a
    page start count, and only pages that start with the note's first byte are looked at.
    """

    HEAD = (len(S.VMCOREINFO_NOTE_NAME) + 1).to_bytes(4, "little")       # n_namesz
    NAME = bytes(4) + S.VMCOREINFO_NOTE_NAME + b"\0\0OSRELEASE="       # n_type 0, name

    def __init__(self) -> None:
        self.found: tuple[int, bytes] | None = None      # (gpa of the note, desc)
        self._partial: tuple[int, bytes, int] | None = None

    def feed(self, gpa: int, data: bytes | bytearray) -> None:
        """Scan `data` at guest-physical `gpa` (page-aligned pieces, ascending)."""
        if self.found is not None:
            return
        if self._partial is not None:           # a note whose text goes on here
            at, note, descsz = self._partial
            self._partial = None
            if at + len(note) == gpa:
                self._check(at, note + bytes(data[:24 + descsz - len(note)]), descsz)
                if self.found is not None or self._partial is not None:
                    return
        # Candidates: the page starts whose first byte is n_namesz's, found in C.
        heads = data[::PAGE]
        i = heads.find(self.HEAD[0])
        while i >= 0:
            p = i * PAGE
            i = heads.find(self.HEAD[0], i + 1)
            if not (data.startswith(self.HEAD, p) and data.startswith(self.NAME, p + 8)):
                continue
            descsz = int.from_bytes(data[p + 4:p + 8], "little")
            if 10 < descsz <= VMCOREINFO_MAX:
                self._check(gpa + p, bytes(data[p:p + 24 + descsz]), descsz)
                if self.found is not None or self._partial is not None:
                    return

    def _check(self, gpa: int, note: bytes, descsz: int) -> None:
        """Accept a complete, valid note; remember an incomplete one."""
        if len(note) < 24 + descsz:
            self._partial = (gpa, note, descsz)
        elif _valid_vmcoreinfo(note[24:]):
            self.found = (gpa, note[24:])


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note."""
    return S.build_note(name, ntype, desc)


class _Reader:
    """Core bytes by (address, file offset): plain files with pread (holes skipped)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        plain = core.compression is None and core.file is not None
        self.fd = os.open(core.file, os.O_RDONLY) if plain else -1
        self.size = os.fstat(self.fd).st_size if self.fd >= 0 else 0
        self.buf = bytearray(CHUNK)   # reused: no allocation (and page faults) per chunk

    def close(self) -> None:
        """Close the plain file."""
        if self.fd >= 0:
            os.close(self.fd)

    def read(self, uaddr: int, foff: int, n: int) -> bytes | bytearray:
        """Up to `n` (<= CHUNK) bytes, valid until the next call; fewer only where the
        core file ends (truncated core)."""
        if self.fd < 0:
            return self._read_compressed(uaddr, n)
        n = max(0, min(n, self.size - foff))
        try:
            data_at = os.lseek(self.fd, foff, os.SEEK_DATA)
        except OSError:       # ENXIO: only a hole up to the end of the file
            data_at = self.size
        if data_at >= foff + n:
            return ZERO_CHUNK if n == CHUNK else bytes(n)
        got = os.preadv(self.fd, [memoryview(self.buf)[:n]], foff)
        return self.buf if got == CHUNK else self.buf[:got]

    def _read_compressed(self, uaddr: int, n: int) -> bytes:
        """Through kvmnote.core (decompressing); on a cut, the pages before it."""
        try:
            return self.core.read(uaddr, n)
        except (MissingDataError, CompressedError):
            pass
        out = bytearray()
        for p in range(0, n, PAGE):
            try:
                out += self.core.read(uaddr + p, min(PAGE, n - p))
            except (MissingDataError, CompressedError):
                break
        return bytes(out)


class _Writer:
    """Sparse output: data written with pwrite, all-zero pages left as holes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, offset: int, data: bytes | bytearray) -> None:
        """Write `data` at `offset`, skipping its all-zero pages (and an all-zero last
        partial page).

        Only pages whose first byte is zero can be zero pages: those are found with one
        slice and bytes.find (in C), and only they are compared whole, so the Python loop
        runs per candidate page, not per page.
        """
        n = len(data)
        if data == ZERO_CHUNK[:n]:
            return
        view = memoryview(data)
        full = n // PAGE
        heads = data[::PAGE]                        # the first byte of every page
        pos = 0                                     # [pos, n) is not written yet
        i = heads.find(0)
        while 0 <= i < full:
            page = i * PAGE
            if data.startswith(ZERO_PAGE, page):
                if page > pos:
                    os.pwrite(self.fd, view[pos:page], offset + pos)
                pos = page + PAGE
            i = heads.find(0, i + 1)
        end, tail = n, n - full * PAGE              # a partial last page, all zero: a hole
        if tail and data.startswith(ZERO_PAGE[:tail], full * PAGE):
            end = full * PAGE
        if end > pos:
            os.pwrite(self.fd, view[pos:end], offset + pos)


def _copy_ram(core: Core, slots: list[tuple[int, int, int]], offsets: list[int],
              out: _Writer, scan: VmcoreinfoScanner | None,
              progress: Progress | None) -> list[Missing]:
    """Copy each slot's bytes to its file offset; return what the core lacks."""
    missing: list[Missing] = []
    total, done = sum(s[1] for s in slots), 0

    def lack(gpa: int, n: int, why: str) -> None:
        last = missing[-1] if missing else None
        if last and last.gpa + last.size == gpa and last.reason == why:
            last.size += n
        else:
            missing.append(Missing(gpa, n, why))

    reader = _Reader(core)
    try:
        for (gpa, size, uaddr), base in zip(slots, offsets):
            for ua, n, foff, state in core.pieces(uaddr, size):
                g = gpa + ua - uaddr
                if foff is None:
                    lack(g, n, WHY[state])
                    done += n
                    continue
                for pos in range(0, n, CHUNK):
                    step = min(CHUNK, n - pos)
                    data = reader.read(ua + pos, foff + pos, step)
                    out.write(base + g - gpa + pos, data)
                    if scan:
                        scan.feed(g + pos, data)
                    if len(data) < step:
                        lack(g + pos + len(data), step - len(data), CUT)
                    if progress:
                        progress(done + pos + step, total)
                done += n
    finally:
        reader.close()
    return missing


def find_vmcoreinfo(core: Core, vm: Vm, limit: int) -> bytes | None:
    """The guest kernel's VMCOREINFO text, searched in the first `limit` bytes of the
    VM's dumped guest RAM (in guest-physical order), or None."""
    scan, seen = VmcoreinfoScanner(), 0
    reader = _Reader(core)
    try:
        for gpa, size, uaddr in _ram_slots(core, vm):
            for ua, n, foff, _ in core.pieces(uaddr, size):
                for pos in range(0, n if foff is not None else 0, CHUNK):
                    if seen >= limit:
                        return None
                    data = reader.read(ua + pos, foff + pos, min(CHUNK, n - pos))
                    scan.feed(gpa + ua - uaddr + pos, data)
                    if scan.found:
                        return scan.found[1]
                    seen += len(data)
                    if len(data) < min(CHUNK, n - pos):
                        return None         # the core ends here
    finally:
        reader.close()
    return None


def _ram_slots(core: Core, vm: Vm) -> list[tuple[int, int, int]]:
    """(gpa, size, userspace_addr) of the VM's as_id 0 memslots, by gpa."""
    slots = sorted((m["guest_phys_addr"], m["memory_size"], m["userspace_addr"])
                   for m in vm.memslots if m["as_id"] == 0 and m["memory_size"])
    for gpa, size, uaddr in slots:
        if size > MAX_SLOT_SIZE or gpa + size > MAX_GPA or uaddr + size > MAX_UADDR:
            raise CorruptCoreError(
                f"{core.path}: VM {vm.vm_index}: memslot at guest-physical {gpa:#x}, size "
                f"{size:#x}, userspace {uaddr:#x} is beyond what KVM accepts (corrupt note)")
    if not slots:
        raise KvmnoteError(f"{core.path}: VM {vm.vm_index} has no memslots "
                           f"(no guest RAM to write)")
    return slots


def _smm_warnings(cpus: list[tuple[int, Vcpu]]) -> list[str]:
    """A vmcore holds address space 0, the guest's normal view of memory, as QEMU's
    dump-guest-memory: SMRAM (as_id 1 memslots, which may overlap normal RAM) is left
    out. A vCPU that was in SMM then has its SMM handler's registers, and the state it
    left is in SMRAM: say so."""
    out = []
    for cpu, v in cpus:
        events = v.records.get("events")
        if events is not None and events["flags"] & S.KVM_VCPUEVENT_VALID_SMM \
                and events["smi"]["smm"]:
            out.append(f"vCPU {v.vcpu_id} (CPU {cpu}) was in SMM: its registers are its SMM "
                       f"handler's; the state it left is in SMRAM (address space 1), which "
                       f"a vmcore leaves out")
    return out


def _level_state(cpu: int, v: Vcpu, level: int, result: Result,
                 read: Callable[[int, int], Any] | None = None) -> State | None:
    """The registers of `level` that CPU `cpu` goes into the vmcore with, saying on the way
    which level a vCPU in guest mode contributes. Level 1 is the guest the memslots
    describe: a vCPU running a nested guest gives L1's state, as the nested VM exit will
    load it (a core before note format 1.2 has only L2's: a warning), with RBP L1's frame
    pointer found on its stack through `read` (N.l1_frame_pointer). The MSRs (for
    KERNEL_GS_BASE) are the vCPU's current ones, L2's in guest mode, L1's otherwise."""
    regs, sregs = N.state(v, level)
    if level == 1 and N.guest_mode(v):
        if regs is None or sregs is None:
            regs, sregs = N.state(v, 2)
            result.warnings.append(
                f"vCPU {v.vcpu_id} (CPU {cpu}) was running a nested guest and this core "
                f"(note format {v.version[0]}.{v.version[1]}) has no L1 state: its registers "
                f"are the nested guest's (L2's), not the guest kernel's")
        else:
            result.notes.append(
                f"vCPU {v.vcpu_id} (CPU {cpu}) was running a nested guest: using L1's state "
                f"(registers, CR3) as the nested VM exit will load it; --level 2 writes the "
                f"nested guest's vmcore")
            fp = N.l1_frame_pointer(read, regs, sregs) if read else None
            if fp is None:
                result.warnings.append(
                    f"vCPU {v.vcpu_id} (CPU {cpu}): L1's frame pointer was not found on its "
                    f"stack at RSP {regs['rsp']:#x}: RBP is L2's, as the VM entry left it, "
                    f"and a debugger may not unwind past L1's VM-entry function")
            else:
                result.notes.append(
                    f"vCPU {v.vcpu_id} (CPU {cpu}): RBP {fp:#x}, L1's frame pointer (RSP + "
                    f"{fp - regs['rsp']:#x} on its stack), for unwinders; the register held "
                    f"L2's RBP {regs['rbp']:#x}, as the VM entry left it")
                regs = dict(regs, rbp=fp)
    if regs is None or sregs is None:
        return None
    msrs = v.records.get("msrs", []) if level == 2 or not N.guest_mode(v) else [
        m for m in v.records.get("msrs", []) if m["index"] != S.MSR_KERNEL_GS_BASE]
    return regs, sregs, msrs


def _cpu_notes(cpus: list[tuple[int, Vcpu]], allow_partial: bool, result: Result,
               level: int = 1, read: Callable[[int, int], Any] | None = None) -> bytes:
    """All NT_PRSTATUS notes, then all QEMU notes, in CPU order, with the registers of
    `level` (1: the guest the memslots describe, whose memory `read` reads; 2: its nested
    guest)."""
    states: list[tuple[int, State | None]] = []
    for cpu, v in cpus:
        state = _level_state(cpu, v, level, result, read) \
            if v.info["status"] & S.KVM_CORE_VCPU_VALID else None
        ok = state is not None
        if not ok:
            flags = [n for b, n in S.STATUS_NAMES.items() if v.info["status"] & b]
            err = S.ERROR_NAMES.get(v.info["error"], "")
            what = (f"vCPU {v.vcpu_id} (CPU {cpu}) has no state in the core "
                    f"(status {','.join(flags) or 'none'}{', error ' + err if err else ''})")
            if not allow_partial:
                raise KvmnoteError(f"{what}; --allow-partial writes zero registers for it")
            result.warnings.append(f"{what}: its registers are written as zeros")
            result.stateless.append(cpu)
        states.append((cpu, state))
    return (b"".join(_note(b"CORE", S.NT_PRSTATUS, prstatus_desc(c, v)) for c, v in states)
            + b"".join(_note(S.QEMU_NOTE_NAME, 0, qemu_desc(v)) for _, v in states))


def l1_cpu_notes(core: Core, vm: Vm, cpus: list[tuple[int, Vcpu]], allow_partial: bool,
                 result: Result) -> bytes:
    """_cpu_notes() of level 1, reading L1's stacks out of the VM's memory."""
    reader = _Reader(core)
    try:
        return _cpu_notes(cpus, allow_partial, result, read=_l1_reader(core, vm, reader))
    finally:
        reader.close()


def _open_output(path: str, core_path: str, force: bool) -> int:
    """Create the output file; refuse the input itself, or an existing file without force."""
    st_in = os.stat(core_path)
    try:
        st_out: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st_out = None
    if st_out is not None:
        if (st_out.st_dev, st_out.st_ino) == (st_in.st_dev, st_in.st_ino):
            raise KvmnoteError(f"{path}: is the input core itself; refusing to write onto it")
        if not force:
            raise KvmnoteError(f"{path}: exists; use --force to overwrite it")
        if not stat.S_ISREG(st_out.st_mode):
            raise KvmnoteError(f"{path}: not a regular file; refusing to overwrite it")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        return os.open(path, flags, 0o600)
    except OSError as e:
        raise KvmnoteError(f"{path}: cannot create: {e.strerror}") from None


def write_vmcore(core_path: str, out_path: str, *, vm_index: int | None = None,
                 cpu_map: dict[int, int] | None = None, vmcoreinfo: bytes | None = None,
                 allow_partial: bool = False, force: bool = False,
                 progress: Progress | None = None, name: str | None = None,
                 level: int = 1) -> Result:
    """Convert VMM core `core_path` into guest vmcore `out_path`; see the module doc.
    `name` names the core in messages instead of `core_path` (a copy of stdin).
    `level` 1: the guest the memslots describe (L1's state of vCPUs that were running a
    nested guest); 2: the nested guest of the vCPUs in guest mode (see _write_l2)."""
    with open_core(core_path, name=name) as core:
        vm = select_vm(core, vm_index)
        slots = _ram_slots(core, vm)
        if not vm.vcpus:
            raise KvmnoteError(f"{core.path}: VM {vm.vm_index} has no vCPU notes")
        if level == 2:
            return _write_l2(core, vm, out_path, core_path, cpu_map=cpu_map,
                             vmcoreinfo=vmcoreinfo, allow_partial=allow_partial,
                             force=force, progress=progress)
        cpus = assign_cpus(vm.vcpus, cpu_map)
        result = Result([(c, v.vcpu_id) for c, v in cpus], [(g, s) for g, s, _ in slots])
        result.warnings += core.warnings + _smm_warnings(cpus)
        cpu_notes = l1_cpu_notes(core, vm, cpus, allow_partial, result)
        notes_off, offsets, off = _layout([size for _, size, _ in slots], cpu_notes,
                                          vmcoreinfo)
        fd = _open_output(out_path, core_path, force)
        done = False
        try:
            os.ftruncate(fd, off)
            scan = VmcoreinfoScanner() if vmcoreinfo is None else None
            result.missing = _copy_ram(core, slots, offsets, _Writer(fd), scan, progress)
            vmcoreinfo = settle_vmcoreinfo(vmcoreinfo, scan, result, "guest RAM")
            _write_headers(fd, slots, offsets, notes_off, cpu_notes, vmcoreinfo)
            done = True
        except OSError as e:    # ENOSPC, EIO, EFBIG...
            raise KvmnoteError(f"{out_path}: cannot write: {e.strerror}") from None
        finally:
            os.close(fd)
            if not done:
                os.unlink(out_path)
    return result


def l2_paging(core: Core, vcpus: list[Vcpu]) -> tuple[str, int, int]:
    """(kind "ept"|"npt", root, levels) of the table through which L1 maps the nested
    guest that `vcpus` (all in guest mode) run; KvmnoteError when there is none to use."""
    seen: dict[tuple[str, int, int], list[int]] = {}
    for v in vcpus:
        p = N.paging(v.records["nested"]) if "nested" in v.records else None
        if p is None:
            raise KvmnoteError(f"{core.path}: vCPU {v.vcpu_id} is in guest mode but the core "
                               f"has no vmcs12 / vmcb12 for it (note format "
                               f"{v.version[0]}.{v.version[1]}; the nested state record "
                               f"came in 1.2): cannot translate the nested guest's memory")
        if not p["enabled"]:
            what = "EPT off in vmcs12" if p["type"] == "ept" else "nested paging off in vmcb12"
            raise KvmnoteError(f"{core.path}: vCPU {v.vcpu_id}: L1 runs its nested guest with "
                               f"shadow paging ({what}): no table maps the nested guest's "
                               f"physical memory; --level 2 needs EPT / NPT")
        if p["levels"] not in (4, 5):
            raise KvmnoteError(f"{core.path}: vCPU {v.vcpu_id}: L1 is not in 64-bit mode "
                               f"(EFER.LMA clear in vmcb01), so its nested page table has "
                               f"PAE or 32-bit format, which --level 2 does not walk"
                               if p["type"] == "npt" else
                               f"{core.path}: vCPU {v.vcpu_id}: EPTP {p['root']:#x} asks for "
                               f"a {p['levels']}-level EPT walk; only 4 and 5 exist")
        seen.setdefault((p["type"], p["root"] & N.ADDR_MASK, p["levels"]), []).append(v.vcpu_id)
    if len(seen) > 1:
        name = "EPTP" if next(iter(seen))[0] == "ept" else "nCR3"
        raise KvmnoteError(f"{core.path}: the vCPUs in guest mode disagree about the {name} ("
                           + "; ".join(f"{root:#x}: vCPU {', '.join(map(str, ids))}"
                                       for (_, root, _), ids in seen.items())
                           + "): they run different nested guests; --level 2 needs one")
    return next(iter(seen))


def _l1_reader(core: Core, vm: Vm, reader: _Reader) -> Callable[[int, int], Any]:
    """read(L1 GPA, n <= CHUNK): n bytes of the VM's guest-physical memory, valid until
    the next call (`reader`'s buffer), or None where the core does not hold them all
    (outside the memslots, not dumped, cut off)."""
    slots = _ram_slots(core, vm)
    starts = [g for g, _, _ in slots]

    def read(gpa: int, n: int) -> bytes | bytearray | None:
        i = bisect.bisect_right(starts, gpa) - 1
        if i < 0 or gpa + n > slots[i][0] + slots[i][1]:
            return None
        pieces = list(core.pieces(slots[i][2] + gpa - slots[i][0], n))
        if any(foff is None for _, _, foff, _ in pieces):
            return None
        if len(pieces) == 1:
            data = reader.read(pieces[0][0], pieces[0][2], n)
            return data if len(data) == n else None
        out = b"".join(bytes(reader.read(ua, foff, k)) for ua, k, foff, _ in pieces)
        return out if len(out) == n else None
    return read


def _write_l2(core: Core, vm: Vm, out_path: str, core_path: str, *,
              cpu_map: dict[int, int] | None, vmcoreinfo: bytes | None,
              allow_partial: bool, force: bool, progress: Progress | None) -> Result:
    """The nested guest's vmcore: its guest-physical memory as L1's EPT / nested page
    table (read out of L1's memory, the memslots) maps it, one PT_LOAD per run of
    contiguous L2 addresses, and the registers of the vCPUs in guest mode. Two walks of
    the table: one to lay out the file, one to copy; memory use is the run list."""
    guests = [v for v in vm.vcpus if N.guest_mode(v)]
    if not guests:
        raise KvmnoteError(f"{core.path}: no vCPU was running a nested guest (none in guest "
                           f"mode): there is no level-2 state; --level 1 is the guest's")
    kind, root, levels = l2_paging(core, guests)
    reader = _Reader(core)
    try:
        return _write_l2_with(core, vm, guests, (kind, root, levels), out_path, core_path,
                              _l1_reader(core, vm, reader), cpu_map=cpu_map,
                              vmcoreinfo=vmcoreinfo, allow_partial=allow_partial,
                              force=force, progress=progress)
    finally:
        reader.close()


def _write_l2_with(core: Core, vm: Vm, guests: list[Vcpu], paging: tuple[str, int, int],
                   out_path: str, core_path: str, read: Callable[[int, int], Any], *,
                   cpu_map: dict[int, int] | None, vmcoreinfo: bytes | None,
                   allow_partial: bool, force: bool, progress: Progress | None) -> Result:
    """_write_l2 once the table is known, reading L1's memory with `read`."""
    kind, root, levels = paging
    missing_tables: set[int] = set()

    def table(gpa: int) -> bytes | None:
        page = read(gpa, PAGE)
        if page is None:
            missing_tables.add(gpa)
            return None
        return bytes(page)     # kept while the walk reads the tables below it

    segs: list[list[int]] = []                      # [L2 start, size]
    for l2, _, n in N.walk(table, kind, root, levels):
        if segs and segs[-1][0] + segs[-1][1] == l2:
            segs[-1][1] += n
        else:
            segs.append([l2, n])
    if not segs:
        raise KvmnoteError(f"{core.path}: L1's {kind.upper()} table at {root:#x} maps no "
                           f"memory of the nested guest"
                           + (" (its root is not in the core)" if missing_tables else ""))
    cpus = assign_cpus(guests, cpu_map)
    slots = [(g, n, 0) for g, n in segs]
    result = Result([(c, v.vcpu_id) for c, v in cpus], [(g, n) for g, n in segs])
    result.warnings += core.warnings + _smm_warnings(cpus)
    if missing_tables:
        result.warnings.append(f"{len(missing_tables)} page(s) of L1's {kind.upper()} table "
                               f"are not in the core (first at L1 guest-physical "
                               f"{min(missing_tables):#x}): the nested guest's memory they "
                               f"map is left out of the vmcore")
    left = sorted(v.vcpu_id for v in vm.vcpus if not N.guest_mode(v))
    if left:
        result.notes.append(f"vCPU {', '.join(map(str, left))} not in guest mode (running "
                            f"L1, not the nested guest): left out of the level-2 vmcore")
    result.notes.append(f"nested guest's memory: {sum(n for _, n in segs)} bytes in "
                        f"{len(segs)} ranges, mapped by L1's {kind.upper()} table at "
                        f"{root:#x} ({levels}-level)")
    cpu_notes = _cpu_notes(cpus, allow_partial, result, level=2)
    notes_off, offsets, off = _layout([n for _, n in segs], cpu_notes, vmcoreinfo)
    seg_starts = [g for g, _ in segs]
    fd = _open_output(out_path, core_path, force)
    done = False
    try:
        os.ftruncate(fd, off)
        out = _Writer(fd)
        scan = VmcoreinfoScanner() if vmcoreinfo is None else None
        total, copied = sum(n for _, n in segs), 0

        def lack(l2: int, l1: int, n: int) -> None:
            last = result.missing[-1] if result.missing else None
            if last and last.gpa + last.size == l2:
                last.size += n
            else:
                result.missing.append(Missing(l2, n, f"its L1 guest-physical memory (from "
                                                     f"{l1:#x}) is not in the core"))

        for l2, l1, n in N.walk(table, kind, root, levels):
            i = bisect.bisect_right(seg_starts, l2) - 1
            base = offsets[i] + l2 - seg_starts[i]
            for pos in range(0, n, CHUNK):
                step = min(CHUNK, n - pos)
                data = read(l1 + pos, step)
                pieces = [(pos, data)] if data is not None else [   # page by page
                    (p, None if page is None else bytes(page))
                    for p in range(pos, pos + step, PAGE)
                    for page in (read(l1 + p, min(PAGE, pos + step - p)),)]
                for p, piece in pieces:
                    if piece is None:
                        lack(l2 + p, l1 + p, min(PAGE, pos + step - p))
                        continue
                    out.write(base + p, piece)
                    if scan:
                        scan.feed(l2 + p, piece)
                if progress:
                    progress(copied + pos + step, total)
            copied += n
        vmcoreinfo = settle_vmcoreinfo(vmcoreinfo, scan, result, "the nested guest's memory")
        _write_headers(fd, slots, offsets, notes_off, cpu_notes, vmcoreinfo)
        done = True
    except OSError as e:
        raise KvmnoteError(f"{out_path}: cannot write: {e.strerror}") from None
    finally:
        os.close(fd)
        if not done:
            os.unlink(out_path)
    return result


def _layout(sizes: list[int], cpu_notes: bytes,
            vmcoreinfo: bytes | None) -> tuple[int, list[int], int]:
    """(notes offset, data offset of each PT_LOAD of `sizes`, file size) of an ELF vmcore:
    headers, the notes with room for a VMCOREINFO (the given one, or the largest that a
    scan of guest memory may find), then the data from a page boundary."""
    info_room = len(_note(S.VMCOREINFO_NOTE_NAME, 0,
                          vmcoreinfo if vmcoreinfo is not None else bytes(VMCOREINFO_MAX)))
    notes_off = S.size(S.Elf64_Ehdr) + S.size(S.Elf64_Phdr) * (1 + len(sizes))
    off = S.align(notes_off + len(cpu_notes) + info_room, PAGE)
    offsets = []
    for n in sizes:
        offsets.append(off)
        off += n
    return notes_off, offsets, off


def settle_vmcoreinfo(given: bytes | None, scan: VmcoreinfoScanner | None, result: Result,
                      where: str, consequence: str = "") -> bytes | None:
    """The VMCOREINFO to write: `given` (--vmcoreinfo), else the note the scan found in
    guest memory, else None with a warning (`where` the scan looked; `consequence` what
    the output lacks besides). Says which in `result`."""
    if given is not None:
        result.vmcoreinfo = "given"
        return given
    if scan and scan.found:
        result.vmcoreinfo = f"guest RAM at {scan.found[0]:#x}"
        return scan.found[1]
    result.warnings.append(f"no VMCOREINFO note found in {where} (drgn needs one: give it "
                           f"with --vmcoreinfo FILE){consequence}")
    return None


def _write_headers(fd: int, slots: list[tuple[int, int, int]], offsets: list[int],
                   notes_off: int, cpu_notes: bytes, vmcoreinfo: bytes | None) -> None:
    """The ELF and program headers, then the notes: the CPUs', then VMCOREINFO's."""
    notes = cpu_notes
    if vmcoreinfo is not None:
        notes += _note(S.VMCOREINFO_NOTE_NAME, 0, clean_vmcoreinfo(vmcoreinfo))
    os.pwrite(fd, _headers(slots, offsets, notes_off, len(notes)) + notes, 0)


def _headers(slots: list[tuple[int, int, int]], offsets: list[int], notes_off: int,
             notes_size: int) -> bytes:
    """ELF header and program headers: PT_NOTE first, then one PT_LOAD per slot."""
    ehdr = S.Elf64_Ehdr.build({
        "e_ident": b"\x7fELF\x02\x01\x01".ljust(16, b"\0"), "e_type": ET_CORE,
        "e_machine": EM_X86_64, "e_version": 1, "e_entry": 0,
        "e_phoff": S.size(S.Elf64_Ehdr), "e_shoff": 0, "e_flags": 0,
        "e_ehsize": S.size(S.Elf64_Ehdr), "e_phentsize": S.size(S.Elf64_Phdr),
        "e_phnum": 1 + len(slots), "e_shentsize": 0, "e_shnum": 0, "e_shstrndx": 0})
    ph = [S.Elf64_Phdr.build({"p_type": PT_NOTE, "p_flags": 0, "p_offset": notes_off,
                              "p_vaddr": 0, "p_paddr": 0, "p_filesz": notes_size,
                              "p_memsz": notes_size, "p_align": 0})]
    for (gpa, size, _), off in zip(slots, offsets):
        ph.append(S.Elf64_Phdr.build({"p_type": PT_LOAD, "p_flags": 0, "p_offset": off,
                                      "p_vaddr": gpa, "p_paddr": gpa, "p_filesz": size,
                                      "p_memsz": size, "p_align": 0}))
    return ehdr + b"".join(ph)


def tty_progress(stream: Any = sys.stderr) -> Progress | None:
    """A progress bar on `stream` when it is a terminal, else None (quiet)."""
    if not stream.isatty():
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct != last[0]:
            last[0] = pct
            bar = "#" * (pct // 4)
            stream.write(f"\rkvmnote: [{bar:<25}] {pct:3d}% of {total / 2**20:.0f} MiB")
            if done >= total:
                stream.write("\n")
            stream.flush()
    return show


