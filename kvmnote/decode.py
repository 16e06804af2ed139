"""Names for x86 register bits, VM exit reasons, MSRs and other numbers."""

from typing import Any

from . import schema as S

RFLAGS = {0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF",
          11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID"}
CR0 = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
       29: "NW", 30: "CD", 31: "PG"}
CR4 = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
       8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
       14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP",
       21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS", 25: "UINTR", 28: "LAM_SUP"}
EFER = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR",
        15: "TCE", 21: "AUTOIBRS"}
MEMSLOT_FLAGS = {0: "LOG_DIRTY_PAGES", 1: "READONLY", 2: "GUEST_MEMFD"}

MP_STATES = ["RUNNABLE", "UNINITIALIZED", "INIT_RECEIVED", "HALTED", "SIPI_RECEIVED",
             "STOPPED", "CHECK_STOP", "OPERATING", "LOAD", "AP_RESET_HOLD", "SUSPENDED"]

# Intel SDM vol. 3, appendix C: basic VM-exit reasons.
VMX_EXIT_REASONS = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 3: "INIT_SIGNAL",
    4: "SIPI", 5: "IO_SMI", 6: "OTHER_SMI", 7: "INTERRUPT_WINDOW", 8: "NMI_WINDOW",
    9: "TASK_SWITCH", 10: "CPUID", 11: "GETSEC", 12: "HLT", 13: "INVD", 14: "INVLPG",
    15: "RDPMC", 16: "RDTSC", 17: "RSM", 18: "VMCALL", 19: "VMCLEAR", 20: "VMLAUNCH",
    21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD", 24: "VMRESUME", 25: "VMWRITE",
    26: "VMOFF", 27: "VMON", 28: "CR_ACCESS", 29: "DR_ACCESS", 30: "IO_INSTRUCTION",
    31: "MSR_READ", 32: "MSR_WRITE", 33: "INVALID_STATE", 34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION", 37: "MONITOR_TRAP_FLAG", 39: "MONITOR_INSTRUCTION",
    40: "PAUSE_INSTRUCTION", 41: "MCE_DURING_VMENTRY", 43: "TPR_BELOW_THRESHOLD",
    44: "APIC_ACCESS", 45: "EOI_INDUCED", 46: "GDTR_IDTR", 47: "LDTR_TR",
    48: "EPT_VIOLATION", 49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP",
    52: "PREEMPTION_TIMER", 53: "INVVPID", 54: "WBINVD", 55: "XSETBV", 56: "APIC_WRITE",
    57: "RDRAND", 58: "INVPCID", 59: "VMFUNC", 60: "ENCLS", 61: "RDSEED", 62: "PML_FULL",
    63: "XSAVES", 64: "XRSTORS", 65: "PCONFIG", 66: "SPP", 67: "UMWAIT", 68: "TPAUSE",
    69: "LOADIWKEY", 70: "ENCLV", 72: "ENQCMD_PASID", 73: "ENQCMDS_PASID",
    74: "BUS_LOCK", 75: "NOTIFY", 76: "SEAMCALL", 77: "TDCALL"}

# AMD APM vol. 2, appendix C: SVM intercept exit codes (besides the ranges below).
SVM_EXIT_CODES = {
    0x60: "INTR", 0x61: "NMI", 0x62: "SMI", 0x63: "INIT", 0x64: "VINTR",
    0x65: "CR0_SEL_WRITE", 0x66: "IDTR_READ", 0x67: "GDTR_READ", 0x68: "LDTR_READ",
    0x69: "TR_READ", 0x6A: "IDTR_WRITE", 0x6B: "GDTR_WRITE", 0x6C: "LDTR_WRITE",
    0x6D: "TR_WRITE", 0x6E: "RDTSC", 0x6F: "RDPMC", 0x70: "PUSHF", 0x71: "POPF",
    0x72: "CPUID", 0x73: "RSM", 0x74: "IRET", 0x75: "SWINT", 0x76: "INVD", 0x77: "PAUSE",
    0x78: "HLT", 0x79: "INVLPG", 0x7A: "INVLPGA", 0x7B: "IOIO", 0x7C: "MSR",
    0x7D: "TASK_SWITCH", 0x7E: "FERR_FREEZE", 0x7F: "SHUTDOWN", 0x80: "VMRUN",
    0x81: "VMMCALL", 0x82: "VMLOAD", 0x83: "VMSAVE", 0x84: "STGI", 0x85: "CLGI",
    0x86: "SKINIT", 0x87: "RDTSCP", 0x88: "ICEBP", 0x89: "WBINVD", 0x8A: "MONITOR",
    0x8B: "MWAIT", 0x8C: "MWAIT_COND", 0x8D: "XSETBV", 0x8E: "RDPRU",
    0x8F: "EFER_WRITE_TRAP", 0xA0: "INVLPGB", 0xA1: "INVLPGB_ILLEGAL", 0xA2: "INVPCID",
    0xA3: "MCOMMIT", 0xA5: "TLBSYNC", 0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI",
    0x402: "AVIC_UNACCELERATED_ACCESS", 0x403: "VMGEXIT",
    (1 << 64) - 1: "INVALID", (1 << 64) - 2: "BUSY"}
EXCEPTIONS = ["DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "09", "TS", "NP",
              "SS", "GP", "PF", "15", "MF", "AC", "MC", "XM", "VE", "CP"]

MSR_NAMES = {
    0x10: "IA32_TSC", 0x11: "KVM_WALL_CLOCK", 0x12: "KVM_SYSTEM_TIME",
    0x1B: "IA32_APIC_BASE", 0x3A: "IA32_FEATURE_CONTROL", 0x3B: "IA32_TSC_ADJUST",
    0x48: "IA32_SPEC_CTRL", 0x8B: "IA32_BIOS_SIGN_ID", 0xE1: "IA32_UMWAIT_CONTROL",
    0xFE: "IA32_MTRRCAP", 0x10A: "IA32_ARCH_CAPABILITIES", 0x174: "IA32_SYSENTER_CS",
    0x175: "IA32_SYSENTER_ESP", 0x176: "IA32_SYSENTER_EIP", 0x179: "IA32_MCG_CAP",
    0x17A: "IA32_MCG_STATUS", 0x1A0: "IA32_MISC_ENABLE", 0x1D9: "IA32_DEBUGCTL",
    0x277: "IA32_PAT", 0x2FF: "IA32_MTRR_DEF_TYPE", 0x6A0: "IA32_U_CET",
    0x6A2: "IA32_S_CET", 0x6E0: "IA32_TSC_DEADLINE", 0xD90: "IA32_BNDCFGS",
    0xDA0: "IA32_XSS", 0xC0000080: "IA32_EFER", 0xC0000081: "STAR", 0xC0000082: "LSTAR",
    0xC0000083: "CSTAR", 0xC0000084: "SYSCALL_MASK", 0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE", 0xC0000102: "KERNEL_GS_BASE", 0xC0000103: "TSC_AUX",
    0xC0000104: "AMD64_TSC_RATIO", 0xC0010117: "VM_HSAVE_PA",
    0x4B564D00: "KVM_WALL_CLOCK_NEW", 0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN", 0x4B564D03: "KVM_STEAL_TIME",
    0x4B564D04: "KVM_PV_EOI_EN", 0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT", 0x4B564D07: "KVM_ASYNC_PF_ACK"}


def bits(value: int, names: dict[int, str]) -> list[str]:
    """Names of the set bits of `value` that have a name."""
    return [name for bit, name in sorted(names.items()) if value >> bit & 1]


def rflags(value: int) -> list[str]:
    """Decoded RFLAGS: flag names plus IOPL=n."""
    return bits(value, RFLAGS) + [f"IOPL={value >> 12 & 3}"]


def vendor(value: int) -> str:
    """'vmx', 'svm' or 'unknown'."""
    return S.VENDOR_NAMES.get(value, "unknown")


def status(value: int) -> list[str]:
    """Names of the KVM_CORE_VCPU_* bits set (unknown bits as 'bitN')."""
    return [S.STATUS_NAMES.get(1 << b, f"bit{b}") for b in range(32) if value >> b & 1]


def error(value: int) -> str | None:
    """None, 'busy', 'nomem', 'disabled' or 'unknown(N)'."""
    return None if value == S.KVM_CORE_ERR_NONE else S.ERROR_NAMES.get(value, f"unknown({value})")


def mp_state(value: int) -> str:
    """KVM_MP_STATE_* name."""
    return MP_STATES[value] if value < len(MP_STATES) else f"unknown({value})"


def vmx_exit_reason(value: int) -> str:
    """Name of a VMX exit reason (basic reason, plus 'entry failure' bit 31)."""
    name = VMX_EXIT_REASONS.get(value & 0xFFFF, f"UNKNOWN_{value & 0xFFFF}")
    return name + " (entry failure)" if value >> 31 & 1 else name


def svm_exit_code(value: int) -> str:
    """Name of an SVM exit code."""
    if value < 0x40:
        return f"{('READ', 'WRITE')[value >> 4 & 1]}_{('CR', 'DR')[value >> 5]}{value & 15}"
    if value < 0x60:
        n = value - 0x40
        return f"EXCP_{n}" + (f" (#{EXCEPTIONS[n]})" if n < len(EXCEPTIONS) else "")
    if 0x90 <= value < 0xA0:
        return f"CR{value - 0x90}_WRITE_TRAP"
    return SVM_EXIT_CODES.get(value, f"UNKNOWN_{value:#x}")


def cpu_mode(sregs: dict[str, Any], rflags_value: int) -> tuple[str, int]:
    """(CPU mode, CPL) from control registers, EFER, CS and SS."""
    cs, ss = sregs["cs"], sregs["ss"]
    if not sregs["cr0"] & 1:
        return "real", 0
    if rflags_value >> 17 & 1:
        return "virtual-8086", 3
    if sregs["efer"] >> 10 & 1:
        mode = "long 64-bit" if cs["l"] else f"compatibility {32 if cs['db'] else 16}-bit"
    else:
        mode = f"protected {32 if cs['db'] else 16}-bit"
    return mode, ss["dpl"]


def segment_attrs(seg: dict[str, Any]) -> str:
    """Segment attributes as 'type=11 S DPL=0 P L G' style text."""
    flags = [f"type={seg['type']}"] + [n for n in ("s", "p", "avl", "l", "db", "g")
                                        if seg["present" if n == "p" else n]]
    flags.insert(2 if seg["s"] else 1, f"DPL={seg['dpl']}")
    if seg["unusable"]:
        flags.append("unusable")
    return " ".join(f.upper() if "=" not in f else f for f in flags)


def lapic(regs: bytes, x2apic: bool) -> dict[str, Any]:
    """Summary of a kvm_lapic_state APIC page: ID, version, TPR, SVR, timer, ISR/IRR."""
    def reg(off: int) -> int:
        return int.from_bytes(regs[off:off + 4], "little")

    def vectors(base: int) -> list[int]:
        words = [reg(base + i * 16) for i in range(8)]
        return [i * 32 + b for i, w in enumerate(words) if w for b in range(32) if w >> b & 1]
    return {"id": reg(0x20) if x2apic else reg(0x20) >> 24, "version": reg(0x30),
            "tpr": reg(0x80), "ldr": reg(0xD0), "svr": reg(0xF0), "esr": reg(0x280),
            "icr": reg(0x300) | reg(0x310) << 32, "lvt_timer": reg(0x320),
            "timer_initial_count": reg(0x380), "timer_current_count": reg(0x390),
            "timer_divide": reg(0x3E0), "isr": vectors(0x100), "tmr": vectors(0x180),
            "irr": vectors(0x200)}


def xsave(buf: bytes) -> dict[str, int]:
    """Summary of an XSAVE buffer: size, XSTATE_BV, XCOMP_BV, MXCSR, FCW, FSW."""
    x = S.parse(S.xsave_prefix, buf)
    return {"size": len(buf), "xstate_bv": x["xstate_bv"], "xcomp_bv": x["xcomp_bv"],
            "mxcsr": x["mxcsr"], "fcw": x["fcw"], "fsw": x["fsw"]}
