"""Nested virtualization (note format 1.2): the two levels of a vCPU in guest mode.

Level 1 is the guest the VMM runs (whose memory the memslots describe); level 2 is a
nested guest that level 1, itself a hypervisor, runs. A vCPU in guest mode
(KVM_CORE_VCPU_GUEST_MODE) was running level 2: its REGS/SREGS2/exit records are level
2's, L1_REGS/L1_SREGS2 level 1's as the nested VM exit will load them.
"""

from typing import Any

from construct import Construct

from . import schema as S
from .errors import CorruptCoreError
from .notes import Vcpu

LEVELS = (1, 2)


def guest_mode(vcpu: Vcpu) -> bool:
    """Was the vCPU running a nested guest (level 2)?"""
    return bool(vcpu.info["status"] & S.KVM_CORE_VCPU_GUEST_MODE)


def state(vcpu: Vcpu, level: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(regs, sregs) of `level`; (None, None) where the core does not hold them (level 2
    of a vCPU not in guest mode; level 1 of a guest-mode vCPU in a core before 1.2)."""
    r = vcpu.records
    if level == 2 and not guest_mode(vcpu):
        return None, None
    if level == 1 and guest_mode(vcpu):
        return r.get("l1_regs"), r.get("l1_sregs")
    return r.get("regs"), r.get("sregs")


def _view(con: Construct, data: bytes, size: int) -> dict[str, Any] | None:
    """The fields of `con` in the first `size` bytes of `data`, or None if shorter."""
    return S.plain(con.parse(data)) if len(data) >= size else None


def vmcs12(nested: dict[str, Any]) -> dict[str, Any] | None:
    """The vmcs12 fields kvmnote reads (VMX, a current vmcs12), or None."""
    if nested["format"] != S.KVM_STATE_NESTED_FORMAT_VMX:
        return None
    return _view(S.vmcs12, nested["data"], S.KVM_STATE_NESTED_VMX_VMCS_SIZE)


def vmcb12(nested: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(control-area fields, save-area fields) of vmcb12 (SVM, guest mode), or None.
    The save area is L1's (vmcb01's), as KVM_GET_NESTED_STATE puts it there."""
    if nested["format"] != S.KVM_STATE_NESTED_FORMAT_SVM:
        return None
    data = nested["data"]
    ctl = _view(S.vmcb_control, data, S.KVM_STATE_NESTED_SVM_VMCB_SIZE)
    return None if ctl is None else (ctl, S.plain(S.vmcb_save.parse(data)))


def paging(nested: dict[str, Any]) -> dict[str, Any] | None:
    """How L1 maps its nested guest's memory: {"type": "ept"|"npt", "enabled", "root"
    (EPTP / nCR3 as L1 wrote it), "levels"}; None without a vmcs12 / vmcb12."""
    v = vmcs12(nested)
    if v is not None:
        on = bool(v["cpu_based_vm_exec_control"] & S.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
                  and v["secondary_vm_exec_control"] & S.SECONDARY_EXEC_ENABLE_EPT)
        eptp = v["ept_pointer"]
        return {"type": "ept", "enabled": on, "root": eptp,
                "levels": ((eptp & S.VMX_EPTP_PWL_MASK) >> S.VMX_EPTP_PWL_SHIFT) + 1}
    c = vmcb12(nested)
    if c is not None:
        ctl, save = c
        # NPT walks in L1's (the host's) paging mode: 4- or 5-level in long mode; PAE or
        # 32-bit tables otherwise (levels None: kvmnote does not walk those).
        lma, la57 = save["efer"] >> 10 & 1, save["cr4"] >> 12 & 1
        return {"type": "npt", "enabled": bool(ctl["nested_ctl"] & S.SVM_NESTED_CTL_NP_ENABLE),
                "root": ctl["nested_cr3"], "levels": (5 if la57 else 4) if lma else None}
    return None


# --- L2's guest-physical address space, through L1's EPT / nested page tables ---------

ADDR_MASK = ((1 << 52) - 1) & ~0xFFF     # physical-address bits 51:12 of an entry
LARGE = 1 << 7                           # EPT and x86 paging: a leaf above level 1
Run = tuple[int, int, int]               # (L2 guest-physical, L1 guest-physical, size)
# Most table pages a walk reads (8 GiB of tables: a table that maps 4 TiB of L2 in 4 KiB
# pages); past it the table is taken as corrupt (tables that point at each other).
MAX_TABLES = 1 << 21


def _present(kind: str, entry: int) -> bool:
    """EPT: readable, writable or executable (bits 2:0); NPT: P (bit 0)."""
    return bool(entry & 7) if kind == "ept" else bool(entry & 1)


def walk(read_table: Any, kind: str, root: int, levels: int) -> Any:
    """Yield the runs (L2 GPA, L1 GPA, size) that L1's table maps, ascending in L2 GPA,
    adjacent leaves merged where both sides are contiguous. `read_table(gpa)` returns
    the 4096-byte table page at L1 guest-physical `gpa`, or None where the core lacks it
    (its part of L2's space is then left out)."""
    run: list[int] | None = None
    seen = [0]

    def tables(gpa: int, level: int, base: int) -> Any:
        seen[0] += 1
        if seen[0] > MAX_TABLES:
            raise CorruptCoreError(f"L1's {kind.upper()} table at {root:#x} has more than "
                                   f"{MAX_TABLES} table pages (corrupt: tables that point "
                                   f"at each other?)")
        page = read_table(gpa)
        if page is None:
            return
        shift = 12 + 9 * (level - 1)
        for i, entry in enumerate(memoryview(page).cast("Q")):
            if not _present(kind, entry):
                continue
            l2 = base + (i << shift)
            if level == 1 or (level <= 3 and entry & LARGE):
                yield l2, entry & ADDR_MASK & ~((1 << shift) - 1), 1 << shift
            else:
                yield from tables(entry & ADDR_MASK, level - 1, l2)

    for l2, l1, size in tables(root & ADDR_MASK, levels, 0):
        if run and run[0] + run[2] == l2 and run[1] + run[2] == l1:
            run[2] += size
            continue
        if run:
            yield tuple(run)
        run = [l2, l1, size]
    if run:
        yield tuple(run)


# --- L1's frame pointer at the nested VM exit ------------------------------------------

# Where x86-64 Linux keeps code: the kernel image and the modules (the top 2 GiB, less
# the fixmap).
KERNEL_CODE = range(0xFFFFFFFF80000000, 0xFFFFFFFFFF000000)
FRAME_SCAN = 0x200    # bytes of L1's stack searched, from RSP up
FRAME_FUNC = 0x1000   # how far into the called function RIP may be


def virt_to_phys(read: Any, sregs: dict[str, Any], va: int) -> int | None:
    """L1 guest-physical address of L1 virtual address `va`, through L1's own page tables
    (its CR3; long mode, 4- or 5-level); None where L1 does not map it, outside long mode,
    or where the core lacks a table. `read(gpa, n)` as vmcore._l1_reader."""
    if not sregs["efer"] >> 10 & 1:                 # EFER.LMA
        return None
    table = sregs["cr3"] & ADDR_MASK
    for level in range(5 if sregs["cr4"] >> 12 & 1 else 4, 0, -1):   # CR4.LA57
        shift = 12 + 9 * (level - 1)
        raw = read(table + (va >> shift & 511) * 8, 8)
        if raw is None:
            return None
        entry = int.from_bytes(raw, "little")
        if not entry & 1:
            return None
        if level == 1 or (level <= 3 and entry & LARGE):
            return entry & ADDR_MASK & ~((1 << shift) - 1) | va & ((1 << shift) - 1)
        table = entry & ADDR_MASK
    return None


def l1_frame_pointer(read: Any, regs: dict[str, Any], sregs: dict[str, Any]) -> int | None:
    """L1's frame pointer at the nested VM exit, found on L1's stack; None if not found.

    The nested VM exit leaves in RBP what L1's hypervisor loaded into it for L2 before
    the VM entry: L2's RBP (VMRUN and #VMEXIT switch RIP, RSP and RAX, a VM exit the
    host-state area; neither RBP). Linux's VM-entry functions (__svm_vcpu_run,
    __vmx_vcpu_run) push RBP and point it at the pushed value first, and ORC unwinds
    them through RBP, so an unwinder handed L2's RBP stops there. Their frame is below
    the return address of the call into them: the first 8-byte slot at or above RSP,
    within FRAME_SCAN bytes, that holds an address in kernel code right after a direct
    call (E8 rel32) whose target is at most FRAME_FUNC bytes before RIP, in L1's memory.
    The frame pointer is the slot below it."""
    rsp, rip = regs["rsp"], regs["rip"]
    if rip not in KERNEL_CODE or rsp % 8:
        return None

    def mem(va: int, n: int) -> bytes | None:      # within one page
        gpa = virt_to_phys(read, sregs, va)
        raw = None if gpa is None else read(gpa, n)
        return None if raw is None else bytes(raw)

    for slot in range(rsp + 8, rsp + FRAME_SCAN, 8):
        raw = mem(slot, 8)
        if raw is None:
            return None
        ret = int.from_bytes(raw, "little")
        if ret not in KERNEL_CODE:
            continue
        call = b"".join(mem(a, 1) or b"" for a in range(ret - 5, ret))   # may cross a page
        if len(call) == 5 and call[0] == 0xE8:
            target = ret + int.from_bytes(call[1:], "little", signed=True)
            if target <= rip < target + FRAME_FUNC:
                return slot - 8
    return None
