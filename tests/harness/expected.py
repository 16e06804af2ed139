"""What the test VMM (tests/vmm) puts into its vCPUs and VM, written down
independently of the C code: the tests compare this, the VMM's ioctl side
report and the kernel's core notes against each other."""

GPR_NAMES = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
SEG_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]

GPA_HLT = 0x1000
GPA_SPIN = 0x1100
GPA_SPIN_JMP = 0x1103
GPA_FLAGS = 0x6000
FOREIGN_VCPU_ID = 77

# (slot, flags, guest_phys_addr, memory_size); slot 0 holds code and tables.
KVM_MEM_READONLY = 2
MEMSLOTS = [
    (0, 0, 0x0, 0x10000),
    (1, 0, 0x100000, 0x4000),
    (2, KVM_MEM_READONLY, 0x200000, 0x2000),
    (5, 0, 0x10000000, 0x1000),
]
PATTERN_SLOTS = [s for s in MEMSLOTS if s[0] != 0]

# --smm: SMRAM, slot 0 of address space 1 (the VMM's slot id (1 << 16) | 0), at the
# SMBASE of a vCPU after RESET. An SMI saves the vCPU's state at SMBASE + 0xfe00 and
# enters SMBASE + 0x8000 (Intel SDM vol. 3 ch. 32, AMD APM vol. 2 ch. 10), where the
# VMM put: mov byte [cs:0x8100], 1; hlt; jmp back to the hlt.
SMRAM = (1, 0, 0, 0x30000, 0x10000)     # (as_id, slot, flags, guest_phys_addr, memory_size)
SMBASE = 0x30000
SMM_HANDLER = bytes([0x2E, 0xC6, 0x06, 0x00, 0x81, 0x01, 0xF4, 0xEB, 0xFD])
SMM_FLAG = SMBASE + 0x8100


def memslots(smm: bool = False) -> list[tuple[int, int, int, int, int]]:
    """(as_id, slot, flags, guest_phys_addr, memory_size) of every slot the VMM adds."""
    return [(0, *s) for s in MEMSLOTS] + ([SMRAM] if smm else [])


def slot_pattern(slot: int, off: int) -> int:
    return (0x51 << 56) | (slot << 48) | off


def gpr(mode: str, vcpu_id: int, k: int) -> int:
    if mode == "long":
        return ((k + 1) << 40) | (vcpu_id << 20) | (0xC0DE + k)
    return ((k + 1) << 24) | (vcpu_id << 12) | (0x5A + k)


def regs(mode: str, vcpu_id: int, kind: str) -> dict:
    """kvm_regs at the known stop point of a vCPU of this kind. Mode "smm": a
    long-mode vCPU that took an SMI: SMM entry keeps the GPRs, sets RFLAGS to 2
    and IP to 0x8000; it stopped after the handler's hlt."""
    if mode == "smm":
        r = regs("long", vcpu_id, "halted")
        r["rip"], r["rflags"] = 0x8000 + SMM_HANDLER.index(0xF4) + 1, 0x2
        return r
    r = {n: gpr(mode, vcpu_id, k) for k, n in enumerate(GPR_NAMES)}
    if kind in ("spinning", "stuck"):
        r["rbx"] = GPA_FLAGS + 8 * vcpu_id
        r["rip"] = GPA_SPIN_JMP
    elif kind == "halted":
        r["rip"] = (GPA_HLT - 0x1000 if mode == "real" else GPA_HLT) + 1  # after hlt
    else:  # never ran
        r["rip"] = GPA_HLT - 0x1000 if mode == "real" else GPA_HLT
    r["rflags"] = 0x202 if mode == "real" else 0x246
    return r


def _seg(sel, base, limit, type_, s, db, l, g):
    return {"base": base, "limit": limit, "selector": sel, "type": type_, "present": 1,
            "dpl": 0, "db": db, "s": s, "l": l, "g": g}


def sregs(mode: str, xsave: bool = True) -> dict:
    if mode == "smm":
        # SMM entry from long mode: CS = SMBASE >> 4 : SMBASE, the data segments flat
        # at 0, all 4 GiB 16-bit data segments; CR0 without PE EM TS PG; CR4, EFER,
        # IDT 0; GDTR, TR, LDTR, CR2, CR3 untouched.
        d = sregs("long", xsave)
        flat = _seg(0, 0, 0xffffffff, 0x3, 1, 0, 0, 1)
        d.update(cs=_seg(SMBASE >> 4, SMBASE, 0xffffffff, 0x3, 1, 0, 0, 1),
                 ds=flat, es=flat, fs=flat, gs=flat, ss=flat, idt={"base": 0, "limit": 0},
                 cr0=0x80050033 & ~0x8000000D, cr4=0, efer=0)
        return d
    if mode == "real":
        d = {
            "cs": _seg(0x0100, 0x1000, 0xffff, 0xb, 1, 0, 0, 0),
            "ds": _seg(0x0200, 0x2000, 0xffff, 0x3, 1, 0, 0, 0),
            "es": _seg(0x0300, 0x3000, 0xffff, 0x3, 1, 0, 0, 0),
            "fs": _seg(0x0400, 0x4000, 0xffff, 0x3, 1, 0, 0, 0),
            "gs": _seg(0x0500, 0x5000, 0xffff, 0x3, 1, 0, 0, 0),
            "ss": _seg(0x0600, 0x6000, 0xffff, 0x3, 1, 0, 0, 0),
            "tr": _seg(0, 0, 0xffff, 0xb, 0, 0, 0, 0),
            "ldt": _seg(0, 0, 0xffff, 0x2, 0, 0, 0, 0),
            "gdt": {"base": 0x800, "limit": 0x4f}, "idt": {"base": 0, "limit": 0x3ff},
            "cr0": 0x10, "cr2": 0x1234, "cr3": 0, "cr4": 0, "efer": 0,
        }
    elif mode == "pm32":
        d = {
            "cs": _seg(0x08, 0, 0xffffffff, 0xb, 1, 1, 0, 1),
            "ds": _seg(0x10, 0x1000, 0xfffff, 0x3, 1, 1, 0, 0),
            "es": _seg(0x18, 0x2000, 0xffff, 0x3, 1, 0, 0, 0),
            "fs": _seg(0x20, 0x12345000, 0xfff, 0x3, 1, 1, 0, 0),
            "gs": _seg(0x28, 0xabc000, 0xffffffff, 0x3, 1, 1, 0, 1),
            "ss": _seg(0x30, 0x3000, 0xfffff, 0x3, 1, 1, 0, 0),
            "tr": _seg(0x38, 0x5000, 0x67, 0xb, 0, 0, 0, 0),
            "ldt": _seg(0x40, 0x5100, 0xff, 0x2, 0, 0, 0, 0),
            "gdt": {"base": 0x800, "limit": 0x47}, "idt": {"base": 0x900, "limit": 8 * 32 - 1},
            "cr0": 0x31, "cr2": 0xc0ffe000, "cr3": 0x2000, "cr4": 0x210, "efer": 0,
        }
    else:
        d = {
            "cs": _seg(0x08, 0, 0xffffffff, 0xb, 1, 0, 1, 1),
            "ds": _seg(0x10, 0x1000, 0xfffff, 0x3, 1, 1, 0, 0),
            "es": _seg(0x18, 0x2000, 0xffff, 0x3, 1, 0, 0, 0),
            "fs": _seg(0x20, 0x7f0012345000, 0xffffffff, 0x3, 1, 1, 0, 1),
            "gs": _seg(0x28, 0xffff888000001000, 0xffffffff, 0x3, 1, 1, 0, 1),
            "ss": _seg(0x30, 0x3000, 0xfffff, 0x3, 1, 1, 0, 0),
            "tr": _seg(0x38, 0x5000, 0x67, 0xb, 0, 0, 0, 0),
            "ldt": _seg(0x48, 0x5100, 0xff, 0x2, 0, 0, 0, 0),
            "gdt": {"base": 0x800, "limit": 0x57}, "idt": {"base": 0x900, "limit": 16 * 32 - 1},
            "cr0": 0x80050033, "cr2": 0xffffffffdeadb000, "cr3": 0x2000, "cr4": 0x406a0,
            "efer": 0xd01,
        }
        if not xsave:  # CPU models without XSAVE (Nehalem): no CR4.OSXSAVE
            d["cr4"] &= ~0x40000
    d["cr8"] = 0
    return d


REAL_CS_TYPES = {0x3, 0xb}


def debugregs(vcpu_id: int, mode: str = "long") -> dict:
    """SMM entry clears DR7 (to its fixed bit 10)."""
    return {"db": [0x7f0008000000 | (vcpu_id << 16) | (i << 8) for i in range(4)],
            "dr6": 0xffff0ff0, "dr7": 0x400 if mode == "smm" else 0xdddd0455}


XCR0 = 0x3

MSR = {
    "STAR": 0xc0000081, "LSTAR": 0xc0000082, "CSTAR": 0xc0000083, "SFMASK": 0xc0000084,
    "KERNEL_GS_BASE": 0xc0000102, "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175,
    "SYSENTER_EIP": 0x176, "TSC_AUX": 0xc0000103, "PAT": 0x277,
    "EFER": 0xc0000080, "FS_BASE": 0xc0000100, "GS_BASE": 0xc0000101,
    "APIC_BASE": 0x1b, "DEBUGCTL": 0x1d9, "MISC_ENABLE": 0x1a0, "TSC": 0x10,
}


def msrs(mode: str, vcpu_id: int) -> dict[int, int]:
    """MSR index -> value the VMM set (plus those implied by sregs)."""
    s = sregs(mode)
    return {
        MSR["STAR"]: 0x0023001000000000,
        MSR["LSTAR"]: 0xffffffff81000000 + (vcpu_id << 4),
        MSR["CSTAR"]: 0xffffffff81001000,
        MSR["SFMASK"]: 0x47700,
        MSR["KERNEL_GS_BASE"]: 0xffff888000de0000 + (vcpu_id << 12),
        MSR["SYSENTER_CS"]: 0x10,
        MSR["SYSENTER_ESP"]: 0x81008000,
        MSR["SYSENTER_EIP"]: 0x81002000,
        MSR["TSC_AUX"]: 0x100 + vcpu_id,
        MSR["PAT"]: 0x0007010600070106,
        MSR["EFER"]: s["efer"],
        MSR["FS_BASE"]: s["fs"]["base"],
        MSR["GS_BASE"]: s["gs"]["base"],
    }


# Last VM exit of a vCPU stopped at `hlt`, and the acceptable exits of a
# vCPU interrupted while spinning in `jmp .` (kicked out of the guest by the
# coredump's SIGKILL IPI, or by a host timer tick before that).
VMX_EXIT_HLT = 12
# Real mode without unrestricted guest (Bochs Nehalem/Penryn): KVM runs the
# guest in vm86 mode, where `hlt` faults with #GP; KVM emulates it, so the
# last hardware exit is EXCEPTION_NMI (0) with vector 13.
VMX_EXIT_EXCEPTION_NMI = 0
GP_VECTOR = 13
SVM_EXIT_HLT = 0x78
VMX_SPIN_EXITS = {1, 7, 52}  # EXTERNAL_INTERRUPT, INTERRUPT_WINDOW, PREEMPTION_TIMER
SVM_SPIN_EXITS = {0x60, 0x61, 0x64}  # INTR, NMI, VINTR
