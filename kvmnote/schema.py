"""The KVM core-note layout (asm/kvm_coredump.h and the KVM UAPI), defined once.

Structs carry the C names and field names; the same definitions parse notes,
build them (tests make synthetic cores with them) and export `layout()`.
"""

from functools import cache
from typing import Any

from construct import (Array, Bytes, Construct, Int8ul, Int16ul, Int32sl, Int32ul,
                       Int64ul, Pointer, Struct, this)

# ELF note owner name and note types.
KVM_CORE_NOTE_NAME = b"KVM"
NT_KVM_VCPU = 0x4B564D43  # "KVMC"
NT_KVM_VM = 0x4B564D56  # "KVMV"
NT_KVM_DROPPED = 0x4B564D44  # "KVMD" (1.1)

KVM_CORE_VERSION_MAJOR = 1
KVM_CORE_VERSION_MINOR = 2

# Record types.
KVM_CORE_REC_VCPU = 1
KVM_CORE_REC_REGS = 2
KVM_CORE_REC_SREGS2 = 3
KVM_CORE_REC_DEBUGREGS = 4
KVM_CORE_REC_EVENTS = 5
KVM_CORE_REC_MP_STATE = 6
KVM_CORE_REC_XCRS = 7
KVM_CORE_REC_XSAVE = 8
KVM_CORE_REC_LAPIC = 9
KVM_CORE_REC_MSRS = 10
KVM_CORE_REC_VMX_EXIT = 11
KVM_CORE_REC_SVM_EXIT = 12
KVM_CORE_REC_CPUID = 13  # 1.1
KVM_CORE_REC_TSC = 14  # 1.1
# 1.2, a vCPU in guest mode: its hypervisor's (L1's) registers as the nested VM exit
# that ends guest mode will load them (the records above are then the nested guest's).
KVM_CORE_REC_L1_REGS = 15
KVM_CORE_REC_L1_SREGS2 = 32
# 1.2, a vCPU whose guest uses nested virtualization: KVM_GET_NESTED_STATE's buffer.
KVM_CORE_REC_NESTED = 33
KVM_CORE_REC_VM = 16
KVM_CORE_REC_MEMSLOTS = 17
KVM_CORE_REC_DROPPED = 18  # 1.1
KVM_CORE_DROPPED_UNKNOWN = 0xFFFFFFFF  # 1.1: all left out, number unknown

# Hardware virtualization extension of the host.
KVM_CORE_VENDOR_UNKNOWN = 0
KVM_CORE_VENDOR_VMX = 1
KVM_CORE_VENDOR_SVM = 2
VENDOR_NAMES = {KVM_CORE_VENDOR_VMX: "vmx", KVM_CORE_VENDOR_SVM: "svm"}

# struct kvm_core_vcpu.status bits.
KVM_CORE_VCPU_VALID = 1 << 0
KVM_CORE_VCPU_PROTECTED = 1 << 1
KVM_CORE_VCPU_UNREADABLE = 1 << 2
KVM_CORE_VCPU_GUEST_MODE = 1 << 3
KVM_CORE_VCPU_NEVER_RAN = 1 << 4
KVM_CORE_VCPU_PARTIAL = 1 << 5  # 1.1
STATUS_NAMES = {KVM_CORE_VCPU_VALID: "valid", KVM_CORE_VCPU_PROTECTED: "protected",
                KVM_CORE_VCPU_UNREADABLE: "unreadable",
                KVM_CORE_VCPU_GUEST_MODE: "guest_mode",
                KVM_CORE_VCPU_NEVER_RAN: "never_ran", KVM_CORE_VCPU_PARTIAL: "partial"}

# struct kvm_core_vcpu.error codes.
KVM_CORE_ERR_NONE = 0
KVM_CORE_ERR_BUSY = 1
KVM_CORE_ERR_NOMEM = 2
KVM_CORE_ERR_DISABLED = 3
KVM_CORE_ERR_GETTER = 4  # 1.1
ERROR_NAMES = {KVM_CORE_ERR_BUSY: "busy", KVM_CORE_ERR_NOMEM: "nomem",
               KVM_CORE_ERR_DISABLED: "disabled", KVM_CORE_ERR_GETTER: "getter_failed"}

KVM_CORE_VMX_GPA_VALID = 1 << 0
KVM_CORE_VM_PROTECTED = 1 << 0
KVM_CORE_VM_DEAD = 1 << 1  # 1.1
VM_FLAG_NAMES = {0: "protected", 1: "dead"}  # bit number -> name (decode.bits)

# Minimum size of the KVM_GET_XSAVE2 buffer (a struct kvm_xsave).
KVM_XSAVE_MIN_SIZE = 4096
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16

# Standard core-note types (owner "CORE"/"LINUX") that kvmnote reads.
NT_PRSTATUS = 1
NT_PRPSINFO = 3
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45

# --- KVM core-dump structs ------------------------------------------------

kvm_core_header = Struct(
    "major" / Int16ul, "minor" / Int16ul, "header_size" / Int16ul,
    "record_header_size" / Int16ul, "size" / Int32ul, "nr_records" / Int32ul)

kvm_core_record = Struct("type" / Int32ul, "size" / Int32ul)

kvm_core_vcpu = Struct(
    "vcpu_id" / Int32ul, "vcpu_idx" / Int32ul, "vm_index" / Int32ul, "vendor" / Int32ul,
    "status" / Int32ul, "error" / Int32ul, "tid" / Int32sl, "reserved" / Int32ul)

kvm_core_vmx_exit = Struct(
    "exit_reason" / Int32ul, "flags" / Int32ul, "exit_qualification" / Int64ul,
    "guest_linear_address" / Int64ul, "guest_physical_address" / Int64ul,
    "exit_intr_info" / Int32ul, "exit_intr_error_code" / Int32ul,
    "idt_vectoring_info" / Int32ul, "idt_vectoring_error_code" / Int32ul,
    "instruction_len" / Int32ul, "instruction_info" / Int32ul,
    "interruptibility_info" / Int32ul, "activity_state" / Int32ul,
    "pending_dbg_exceptions" / Int64ul, "vm_instruction_error" / Int32ul,
    "reserved" / Int32ul)

kvm_core_svm_exit = Struct(
    "exit_code" / Int64ul, "exit_info_1" / Int64ul, "exit_info_2" / Int64ul,
    "exit_int_info" / Int32ul, "exit_int_info_err" / Int32ul, "int_ctl" / Int32ul,
    "event_inj" / Int32ul, "event_inj_err" / Int32ul, "reserved" / Int32ul,
    "int_state" / Int64ul)

kvm_core_vm = Struct(
    "vm_index" / Int32ul, "vendor" / Int32ul, "nr_vcpus" / Int32ul,
    "nr_memslots" / Int32ul, "vm_type" / Int32ul, "flags" / Int32ul,
    "pid" / Int32sl, "reserved" / Int32ul)

kvm_core_tsc = Struct(
    "guest_tsc" / Int64ul, "host_tsc" / Int64ul, "tsc_offset" / Int64ul,
    "tsc_scaling_ratio" / Int64ul, "kvmclock_ns" / Int64ul, "host_realtime_ns" / Int64ul,
    "tsc_khz" / Int32ul, "tsc_scaling_frac_bits" / Int32ul)

kvm_core_dropped = Struct(
    "nr_vms" / Int32ul, "nr_vcpus" / Int32ul, "nr_memslots" / Int32ul, "reason" / Int32ul)

kvm_core_memslot = Struct(
    "as_id" / Int16ul, "reserved" / Int16ul, "slot" / Int32ul, "flags" / Int32ul,
    "reserved2" / Int32ul, "guest_phys_addr" / Int64ul, "memory_size" / Int64ul,
    "userspace_addr" / Int64ul)

# --- KVM UAPI structs (arch/x86/include/uapi/asm/kvm.h, linux/kvm.h) ---------

kvm_regs = Struct(*(name / Int64ul for name in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
    "r11", "r12", "r13", "r14", "r15", "rip", "rflags")))

kvm_segment = Struct(
    "base" / Int64ul, "limit" / Int32ul, "selector" / Int16ul, "type" / Int8ul,
    "present" / Int8ul, "dpl" / Int8ul, "db" / Int8ul, "s" / Int8ul, "l" / Int8ul,
    "g" / Int8ul, "avl" / Int8ul, "unusable" / Int8ul, "padding" / Int8ul)

kvm_dtable = Struct("base" / Int64ul, "limit" / Int16ul, "padding" / Array(3, Int16ul))

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

kvm_sregs2 = Struct(
    *(name / kvm_segment for name in SEGMENTS),
    "gdt" / kvm_dtable, "idt" / kvm_dtable,
    *(name / Int64ul for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                   "apic_base", "flags")),
    "pdptrs" / Array(4, Int64ul))

kvm_debugregs = Struct(
    "db" / Array(4, Int64ul), "dr6" / Int64ul, "dr7" / Int64ul, "flags" / Int64ul,
    "reserved" / Array(9, Int64ul))

kvm_vcpu_events = Struct(
    "exception" / Struct("injected" / Int8ul, "nr" / Int8ul, "has_error_code" / Int8ul,
                         "pending" / Int8ul, "error_code" / Int32ul),
    "interrupt" / Struct("injected" / Int8ul, "nr" / Int8ul, "soft" / Int8ul,
                         "shadow" / Int8ul),
    "nmi" / Struct("injected" / Int8ul, "pending" / Int8ul, "masked" / Int8ul,
                   "pad" / Int8ul),
    "sipi_vector" / Int32ul, "flags" / Int32ul,
    "smi" / Struct("smm" / Int8ul, "pending" / Int8ul, "smm_inside_nmi" / Int8ul,
                   "latched_init" / Int8ul),
    "triple_fault" / Struct("pending" / Int8ul),
    "reserved" / Bytes(26), "exception_has_payload" / Int8ul,
    "exception_payload" / Int64ul)
KVM_VCPUEVENT_VALID_SMM = 0x8  # kvm_vcpu_events.flags: the smi fields are valid

kvm_mp_state = Struct("mp_state" / Int32ul)

kvm_xcr = Struct("xcr" / Int32ul, "reserved" / Int32ul, "value" / Int64ul)

kvm_xcrs = Struct(
    "nr_xcrs" / Int32ul, "flags" / Int32ul, "xcrs" / Array(KVM_MAX_XCRS, kvm_xcr),
    "padding" / Array(16, Int64ul))

kvm_lapic_state = Struct("regs" / Bytes(KVM_APIC_REG_SIZE))

kvm_msr_entry = Struct("index" / Int32ul, "reserved" / Int32ul, "data" / Int64ul)

# Fixed part of struct kvm_msrs; `nmsrs` kvm_msr_entry follow.
kvm_msrs_header = Struct("nmsrs" / Int32ul, "pad" / Int32ul)
kvm_msrs = Struct("nmsrs" / Int32ul, "pad" / Int32ul,
                  "entries" / Array(this.nmsrs, kvm_msr_entry))

kvm_cpuid_entry2 = Struct(
    "function" / Int32ul, "index" / Int32ul, "flags" / Int32ul, "eax" / Int32ul,
    "ebx" / Int32ul, "ecx" / Int32ul, "edx" / Int32ul, "padding" / Array(3, Int32ul))
# Fixed part of struct kvm_cpuid2; `nent` kvm_cpuid_entry2 follow.
kvm_cpuid2_header = Struct("nent" / Int32ul, "padding" / Int32ul)

# struct kvm_nested_state (KVM_GET_NESTED_STATE): 128-byte header, then `size` - 128
# bytes of data: VMX vmcs12 [, shadow_vmcs12]; SVM vmcb12 (control area, then the save
# area, where KVM puts L1's vmcb01 save area).
kvm_nested_state = Struct("flags" / Int16ul, "format" / Int16ul, "size" / Int32ul,
                          "hdr" / Bytes(120))
kvm_vmx_nested_state_hdr = Struct(
    "vmxon_pa" / Int64ul, "vmcs12_pa" / Int64ul, "smm" / Struct("flags" / Int16ul),
    "pad" / Int16ul, "flags" / Int32ul, "preemption_timer_deadline" / Int64ul)
kvm_svm_nested_state_hdr = Struct("vmcb_pa" / Int64ul)
KVM_STATE_NESTED_FORMAT_VMX = 0
KVM_STATE_NESTED_FORMAT_SVM = 1
KVM_STATE_NESTED_GUEST_MODE = 0x1
KVM_STATE_NESTED_RUN_PENDING = 0x2
KVM_STATE_NESTED_EVMCS = 0x4
KVM_STATE_NESTED_MTF_PENDING = 0x8
KVM_STATE_NESTED_GIF_SET = 0x100
KVM_STATE_NESTED_SMM_GUEST_MODE = 0x1
KVM_STATE_NESTED_SMM_VMXON = 0x2
KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE = 0x1
KVM_STATE_NESTED_VMX_VMCS_SIZE = 0x1000
KVM_STATE_NESTED_SVM_VMCB_SIZE = 0x1000
NESTED_FORMATS = {KVM_STATE_NESTED_FORMAT_VMX: "vmx", KVM_STATE_NESTED_FORMAT_SVM: "svm"}
NESTED_FLAG_NAMES = {0: "guest_mode", 1: "nested_run_pending", 2: "evmcs",
                     3: "mtf_pending", 8: "gif_set"}   # bit number -> name (decode.bits)
NESTED_SMM_FLAG_NAMES = {0: "guest_mode", 1: "vmxon"}

# The fields kvmnote reads from the nested state's data: KVM's struct vmcs12
# (arch/x86/kvm/vmx/vmcs12.h, its CHECK_OFFSET lines) and the VMCB's control area
# (arch/x86/include/asm/svm.h, the AMD APM).  Kernel-internal layouts, not UAPI: views
# by offset into the 4096-byte vmcs12 / vmcb12.
vmcs12 = Struct(*(name / Pointer(off, con) for name, off, con in (
    ("revision_id", 0, Int32ul), ("launch_state", 8, Int32ul),
    ("ept_pointer", 120, Int64ul), ("guest_physical_address", 168, Int64ul),
    ("vmcs_link_pointer", 176, Int64ul), ("exit_qualification", 408, Int64ul),
    ("guest_linear_address", 416, Int64ul), ("guest_cr0", 424, Int64ul),
    ("guest_cr3", 432, Int64ul), ("guest_cr4", 440, Int64ul), ("guest_rsp", 536, Int64ul),
    ("guest_rip", 544, Int64ul), ("guest_rflags", 552, Int64ul),
    ("host_cr0", 584, Int64ul), ("host_cr3", 592, Int64ul), ("host_cr4", 600, Int64ul),
    ("host_rsp", 664, Int64ul), ("host_rip", 672, Int64ul),
    ("pin_based_vm_exec_control", 744, Int32ul), ("cpu_based_vm_exec_control", 748, Int32ul),
    ("secondary_vm_exec_control", 804, Int32ul), ("vm_instruction_error", 808, Int32ul),
    ("vm_exit_reason", 812, Int32ul), ("vm_exit_intr_info", 816, Int32ul),
    ("idt_vectoring_info_field", 824, Int32ul), ("virtual_processor_id", 960, Int16ul))))
CPU_BASED_ACTIVATE_SECONDARY_CONTROLS = 1 << 31
SECONDARY_EXEC_ENABLE_EPT = 1 << 1
VMX_EPTP_PWL_MASK, VMX_EPTP_PWL_SHIFT = 0x38, 3   # page-walk length - 1, bits 5:3

vmcb_control = Struct(*(name / Pointer(off, con) for name, off, con in (
    ("intercepts", 0x00, Array(5, Int32ul)), ("tsc_offset", 0x50, Int64ul),
    ("asid", 0x58, Int32ul), ("int_ctl", 0x60, Int32ul), ("int_state", 0x68, Int32ul),
    ("exit_code", 0x70, Int64ul), ("exit_info_1", 0x78, Int64ul),
    ("exit_info_2", 0x80, Int64ul), ("exit_int_info", 0x88, Int32ul),
    ("exit_int_info_err", 0x8C, Int32ul), ("nested_ctl", 0x90, Int64ul),
    ("event_inj", 0xA8, Int32ul), ("event_inj_err", 0xAC, Int32ul),
    ("nested_cr3", 0xB0, Int64ul), ("next_rip", 0xC8, Int64ul))))
VMCB_SAVE_AREA_OFFSET = 0x400
# struct vmcb_save_area fields, at their offsets in the 4096-byte vmcb12 (0x400 + ...).
vmcb_save = Struct(*(name / Pointer(VMCB_SAVE_AREA_OFFSET + off, Int64ul) for name, off in (
    ("efer", 0xD0), ("cr4", 0x148), ("cr3", 0x150), ("cr0", 0x158), ("rflags", 0x170),
    ("rip", 0x178), ("rsp", 0x1D8), ("rax", 0x1F8))))
SVM_NESTED_CTL_NP_ENABLE = 1 << 0

# First bytes of the XSAVE area that kvmnote decodes (legacy region + header).
xsave_prefix = Struct(
    "fcw" / Int16ul, "fsw" / Int16ul, "ftw" / Int8ul, "reserved" / Int8ul,
    "fop" / Int16ul, "fip" / Int64ul, "fdp" / Int64ul, "mxcsr" / Int32ul,
    "mxcsr_mask" / Int32ul, "legacy" / Bytes(480), "xstate_bv" / Int64ul,
    "xcomp_bv" / Int64ul)

# --- Standard x86-64 core notes (include/uapi/linux/elfcore.h) ------------

USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
             "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
             "fs_base", "gs_base", "ds", "es", "fs", "gs")

user_regs_struct = Struct(*(name / Int64ul for name in USER_REGS))

elf_prstatus = Struct(
    "si_signo" / Int32sl, "si_code" / Int32sl, "si_errno" / Int32sl,
    "pr_cursig" / Int16ul, "pad0" / Int16ul, "pr_sigpend" / Int64ul,
    "pr_sighold" / Int64ul, "pr_pid" / Int32sl, "pr_ppid" / Int32sl,
    "pr_pgrp" / Int32sl, "pr_sid" / Int32sl, "pr_utime" / Bytes(16),
    "pr_stime" / Bytes(16), "pr_cutime" / Bytes(16), "pr_cstime" / Bytes(16),
    "pr_reg" / user_regs_struct, "pr_fpvalid" / Int32sl, "pad1" / Int32ul)

elf_prpsinfo = Struct(
    "pr_state" / Int8ul, "pr_sname" / Int8ul, "pr_zomb" / Int8ul, "pr_nice" / Int8ul,
    "pad0" / Int32ul, "pr_flag" / Int64ul, "pr_uid" / Int32ul, "pr_gid" / Int32ul,
    "pr_pid" / Int32sl, "pr_ppid" / Int32sl, "pr_pgrp" / Int32sl, "pr_sid" / Int32sl,
    "pr_fname" / Bytes(16), "pr_psargs" / Bytes(80))

siginfo = Struct("si_signo" / Int32sl, "si_errno" / Int32sl, "si_code" / Int32sl)

nt_file_header = Struct("count" / Int64ul, "page_size" / Int64ul)
nt_file_entry = Struct("start" / Int64ul, "end" / Int64ul, "file_ofs" / Int64ul)

# --- QEMU's guest-dump CPU note (target/i386/arch_dump.c) -----------------

# Owner "QEMU", n_type 0; version 1 plus kernel_gs_base (440 bytes; QEMU
# before 9.0 wrote 432, without it).
QEMU_NOTE_NAME = b"QEMU"
QEMUCPUSTATE_VERSION = 1
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")

QEMUCPUSegment = Struct(
    "selector" / Int32ul, "limit" / Int32ul, "flags" / Int32ul, "pad" / Int32ul,
    "base" / Int64ul)

QEMUCPUState = Struct(
    "version" / Int32ul, "size" / Int32ul,
    *(name / Int64ul for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15", "rip", "rflags")),
    *(name / QEMUCPUSegment for name in QEMU_SEGMENTS),
    "cr" / Array(5, Int64ul), "kernel_gs_base" / Int64ul)

# QEMU's SegmentCache.flags: the descriptor's high dword bits (target/i386/cpu.h).
DESC_TYPE_SHIFT, DESC_S_SHIFT, DESC_DPL_SHIFT, DESC_P_SHIFT = 8, 12, 13, 15
DESC_AVL_SHIFT, DESC_L_SHIFT, DESC_B_SHIFT, DESC_G_SHIFT = 20, 21, 22, 23

# The Linux kernel's VMCOREINFO ELF note (kernel/vmcore_info.c): owner
# "VMCOREINFO", n_type 0, text "KEY=VALUE\n" lines starting with OSRELEASE=.
VMCOREINFO_NOTE_NAME = b"VMCOREINFO"

MSR_KERNEL_GS_BASE = 0xC0000102

# ELF64 headers, for building synthetic cores and vmcores (reading uses
# pyelftools).
Elf64_Ehdr = Struct(
    "e_ident" / Bytes(16), "e_type" / Int16ul, "e_machine" / Int16ul,
    "e_version" / Int32ul, "e_entry" / Int64ul, "e_phoff" / Int64ul, "e_shoff" / Int64ul,
    "e_flags" / Int32ul, "e_ehsize" / Int16ul, "e_phentsize" / Int16ul,
    "e_phnum" / Int16ul, "e_shentsize" / Int16ul, "e_shnum" / Int16ul,
    "e_shstrndx" / Int16ul)
Elf64_Phdr = Struct(
    "p_type" / Int32ul, "p_flags" / Int32ul, "p_offset" / Int64ul, "p_vaddr" / Int64ul,
    "p_paddr" / Int64ul, "p_filesz" / Int64ul, "p_memsz" / Int64ul, "p_align" / Int64ul)

# --- Records -------------------------------------------------------------

# Record type -> (JSON/attribute name, payload struct).  The struct is the
# minimum payload; a longer payload (newer minor) is read by its prefix.
RECORDS: dict[int, tuple[str, Construct]] = {
    KVM_CORE_REC_VCPU: ("vcpu", kvm_core_vcpu),
    KVM_CORE_REC_REGS: ("regs", kvm_regs),
    KVM_CORE_REC_SREGS2: ("sregs", kvm_sregs2),
    KVM_CORE_REC_DEBUGREGS: ("debugregs", kvm_debugregs),
    KVM_CORE_REC_EVENTS: ("events", kvm_vcpu_events),
    KVM_CORE_REC_MP_STATE: ("mp_state", kvm_mp_state),
    KVM_CORE_REC_XCRS: ("xcrs", kvm_xcrs),
    KVM_CORE_REC_XSAVE: ("xsave", Bytes(KVM_XSAVE_MIN_SIZE)),
    KVM_CORE_REC_LAPIC: ("lapic", kvm_lapic_state),
    KVM_CORE_REC_MSRS: ("msrs", kvm_msrs_header),
    KVM_CORE_REC_VMX_EXIT: ("vmx_exit", kvm_core_vmx_exit),
    KVM_CORE_REC_SVM_EXIT: ("svm_exit", kvm_core_svm_exit),
    KVM_CORE_REC_CPUID: ("cpuid", kvm_cpuid2_header),
    KVM_CORE_REC_TSC: ("tsc", kvm_core_tsc),
    KVM_CORE_REC_L1_REGS: ("l1_regs", kvm_regs),
    KVM_CORE_REC_L1_SREGS2: ("l1_sregs", kvm_sregs2),
    KVM_CORE_REC_NESTED: ("nested", kvm_nested_state),
    KVM_CORE_REC_VM: ("vm", kvm_core_vm),
    KVM_CORE_REC_MEMSLOTS: ("memslots", kvm_core_memslot),
    KVM_CORE_REC_DROPPED: ("dropped", kvm_core_dropped),
}
VCPU_RECORDS = frozenset(range(KVM_CORE_REC_VCPU, KVM_CORE_REC_TSC + 1)) | {
    KVM_CORE_REC_L1_REGS, KVM_CORE_REC_L1_SREGS2, KVM_CORE_REC_NESTED}
VM_RECORDS = frozenset({KVM_CORE_REC_VM, KVM_CORE_REC_MEMSLOTS})
DROPPED_RECORDS = frozenset({KVM_CORE_REC_DROPPED})

STRUCTS: dict[str, Construct] = {
    "kvm_core_header": kvm_core_header, "kvm_core_record": kvm_core_record,
    "kvm_core_vcpu": kvm_core_vcpu, "kvm_core_vmx_exit": kvm_core_vmx_exit,
    "kvm_core_svm_exit": kvm_core_svm_exit, "kvm_core_vm": kvm_core_vm,
    "kvm_core_memslot": kvm_core_memslot, "kvm_regs": kvm_regs,
    "kvm_sregs2": kvm_sregs2, "kvm_segment": kvm_segment, "kvm_dtable": kvm_dtable,
    "kvm_debugregs": kvm_debugregs, "kvm_vcpu_events": kvm_vcpu_events,
    "kvm_xcrs": kvm_xcrs, "kvm_xcr": kvm_xcr, "kvm_msr_entry": kvm_msr_entry,
    "kvm_msrs": kvm_msrs_header, "kvm_lapic_state": kvm_lapic_state,
    "kvm_mp_state": kvm_mp_state, "kvm_core_tsc": kvm_core_tsc,
    "kvm_core_dropped": kvm_core_dropped, "kvm_cpuid_entry2": kvm_cpuid_entry2,
    "kvm_cpuid2": kvm_cpuid2_header, "kvm_nested_state": kvm_nested_state,
    "kvm_vmx_nested_state_hdr": kvm_vmx_nested_state_hdr,
    "kvm_svm_nested_state_hdr": kvm_svm_nested_state_hdr,
}


def _fields(struct: Construct, base: int, prefix: str, out: dict[str, int]) -> None:
    """Add the offset of every (nested) field of `struct` to `out`."""
    offset = base
    for sub in struct.subcons:
        out[prefix + sub.name] = offset
        inner = getattr(sub, "subcon", None)
        if isinstance(inner, Struct):
            _fields(inner, offset, prefix + sub.name + ".", out)
        offset += sub.sizeof()


def layout() -> dict[str, dict[str, Any]]:
    """Size and field offsets of every struct, by C name (nested fields dotted)."""
    result = {}
    for name, struct in STRUCTS.items():
        fields: dict[str, int] = {}
        _fields(struct, 0, "", fields)
        result[name] = {"size": struct.sizeof(), "fields": fields}
    return result


def plain(obj: Any) -> Any:
    """A parsed construct value as plain dicts and lists (no `_io` keys)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


@cache
def _compiled(struct: Construct) -> tuple[Construct, int]:
    """The compiled (fast) parser of a fixed-size struct, and its size."""
    return struct.compile(), struct.sizeof()


def size(struct: Construct) -> int:
    """sizeof(struct), cached."""
    return _compiled(struct)[1]


def parse(struct: Construct, data: bytes) -> dict[str, Any]:
    """Parse the prefix of `data` that `struct` covers, as plain dicts."""
    fast, size = _compiled(struct)
    return plain(fast.parse(data[:size]))


def zeroed(struct: Construct) -> dict[str, Any]:
    """A dict for `struct` with every field zero (to fill in and build)."""
    return parse(struct, bytes(struct.sizeof()))


def align(n: int, to: int) -> int:
    """Round `n` up to a multiple of `to`."""
    return (n + to - 1) // to * to


def build_record(rtype: int, payload: bytes) -> bytes:
    """A record: kvm_core_record header, payload, zero pad to 8 bytes."""
    raw = kvm_core_record.build({"type": rtype, "size": len(payload)}) + payload
    return raw + bytes(align(len(raw), 8) - len(raw))


def build_desc(records: list[tuple[int, bytes]], major: int = KVM_CORE_VERSION_MAJOR,
               minor: int = KVM_CORE_VERSION_MINOR) -> bytes:
    """A note descriptor: kvm_core_header then the (type, payload) records."""
    body = b"".join(build_record(t, p) for t, p in records)
    size = kvm_core_header.sizeof() + len(body)
    return kvm_core_header.build({
        "major": major, "minor": minor, "header_size": kvm_core_header.sizeof(),
        "record_header_size": kvm_core_record.sizeof(), "size": size,
        "nr_records": len(records)}) + body


def build_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """An ELF note: Elf64_Nhdr, NUL-terminated name and desc, each padded to 4."""
    namez = name + b"\0"
    raw = Struct("namesz" / Int32ul, "descsz" / Int32ul, "type" / Int32ul).build(
        {"namesz": len(namez), "descsz": len(desc), "type": ntype})
    raw += namez + bytes(align(len(namez), 4) - len(namez))
    return raw + desc + bytes(align(len(desc), 4) - len(desc))
