"""Build synthetic VMM core files from kvmnote.schema, for the tests and the bench."""

import os
from dataclasses import dataclass
from typing import Any

from kvmnote import schema as S

PT_LOAD, PT_NOTE, ET_CORE, EM_X86_64 = 1, 4, 4, 62
PAGE = 4096


@dataclass
class Load:
    """A PT_LOAD to write: `data` at its start, the rest of filesz a file hole."""

    vaddr: int
    filesz: int
    memsz: int
    data: bytes = b""


def record(rtype: int, values: dict[str, Any]) -> tuple[int, bytes]:
    """(type, payload) of a fixed-size record, `values` over a zeroed struct."""
    struct = S.RECORDS[rtype][1]
    return rtype, struct.build(merge(S.zeroed(struct), values))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, recursively for nested dicts."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) else v
    return out


def sample_vcpu(vcpu_id: int, vendor: int = S.KVM_CORE_VENDOR_VMX, vm_index: int = 0,
                tid: int = 1000) -> dict[str, Any]:
    """Distinct, recognisable input values for every vCPU record."""
    k = vcpu_id + 1
    seg = {"base": 0x1000 * k, "limit": 0xFFFFF, "selector": 0x10, "type": 11,
           "present": 1, "dpl": 0, "db": 0, "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0}
    xsave = bytearray(4096 + 64)
    xsave[0:2] = (0x37F).to_bytes(2, "little")      # fcw
    xsave[2:4] = (0x0020).to_bytes(2, "little")     # fsw
    xsave[24:28] = (0x1F80).to_bytes(4, "little")   # mxcsr
    xsave[512:520] = (0x7).to_bytes(8, "little")    # xstate_bv
    xsave[520:528] = (1 << 63 | 7).to_bytes(8, "little")  # xcomp_bv
    lapic = bytearray(1024)
    lapic[0x20:0x24] = (vcpu_id << 24).to_bytes(4, "little")
    lapic[0x30:0x34] = (0x50014).to_bytes(4, "little")
    lapic[0x80:0x84] = (0x20).to_bytes(4, "little")
    lapic[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")
    lapic[0x100 + 0x10 * 1:0x104 + 0x10 * 1] = (1 << 16).to_bytes(4, "little")  # ISR 48
    lapic[0x200 + 0x10 * 7:0x204 + 0x10 * 7] = (1 << 31).to_bytes(4, "little")  # IRR 255
    v: dict[str, Any] = {
        "vcpu": {"vcpu_id": vcpu_id, "vcpu_idx": vcpu_id, "vm_index": vm_index,
                 "vendor": vendor, "status": S.KVM_CORE_VCPU_VALID, "error": 0, "tid": tid},
        "regs": {sc.name: (k << 32) + i for i, sc in enumerate(S.kvm_regs.subcons)}
        | {"rip": 0xFFFFFFFF81000000 + k, "rflags": 0x246},
        "sregs": {**{s: dict(seg, selector=0x8 * (i + 1)) for i, s in enumerate(S.SEGMENTS)},
                  "gdt": {"base": 0xFFFF0000 + k, "limit": 0x7F},
                  "idt": {"base": 0xFFFE0000 + k, "limit": 0xFFF},
                  "cr0": 0x80050033, "cr2": 0xDEAD000 + k, "cr3": 0x1000000 * k,
                  "cr4": 0x3606F0, "cr8": 1, "efer": 0xD01, "apic_base": 0xFEE00900,
                  "flags": 0, "pdptrs": [1, 2, 3, 4]},
        "debugregs": {"db": [k, 2 * k, 3 * k, 4 * k], "dr6": 0xFFFF0FF0, "dr7": 0x400,
                      "flags": 0},
        "events": {"exception": {"injected": 1, "nr": 14, "has_error_code": 1,
                                 "pending": 0, "error_code": 2},
                   "interrupt": {"injected": 0, "nr": 0x30, "soft": 0, "shadow": 1},
                   "nmi": {"injected": 0, "pending": 1, "masked": 1},
                   "sipi_vector": 0, "flags": 0xF,
                   "smi": {"smm": 0, "pending": 0, "smm_inside_nmi": 0, "latched_init": 1},
                   "triple_fault": {"pending": 0}, "exception_has_payload": 1,
                   "exception_payload": 0xDEAD000 + k},
        "mp_state": {"mp_state": 3},
        "xcrs": {"nr_xcrs": 1, "flags": 0,
                 "xcrs": [{"xcr": 0, "reserved": 0, "value": 7}] +
                         [{"xcr": 0, "reserved": 0, "value": 0}] * 15},
        "xsave": bytes(xsave),
        "lapic": bytes(lapic),
        "msrs": [(0xC0000080, 0xD01), (0x10, 123456789 * k), (0x12345678, 42)],
    }
    if vendor == S.KVM_CORE_VENDOR_SVM:
        v["svm_exit"] = {"exit_code": 0x78, "exit_info_1": 1, "exit_info_2": 2,
                         "exit_int_info": 3, "exit_int_info_err": 4, "int_ctl": 5,
                         "event_inj": 6, "event_inj_err": 7, "int_state": 1}
    else:
        v["vmx_exit"] = {"exit_reason": 12, "flags": 1, "exit_qualification": 0x55,
                         "guest_linear_address": 0x7000 + k,
                         "guest_physical_address": 0x8000 + k, "exit_intr_info": 0x80000b0e,
                         "exit_intr_error_code": 2, "idt_vectoring_info": 3,
                         "idt_vectoring_error_code": 4, "instruction_len": 1,
                         "instruction_info": 5, "interruptibility_info": 0,
                         "activity_state": 1, "pending_dbg_exceptions": 0,
                         "vm_instruction_error": 0}
    return v


def vcpu_records(v: dict[str, Any]) -> list[tuple[int, bytes]]:
    """Records of a vCPU note from sample_vcpu()-style values, in kernel order."""
    recs = [record(S.KVM_CORE_REC_VCPU, v["vcpu"])]
    if not v["vcpu"]["status"] & S.KVM_CORE_VCPU_VALID:
        return recs
    for rtype in (S.KVM_CORE_REC_REGS, S.KVM_CORE_REC_SREGS2, S.KVM_CORE_REC_DEBUGREGS,
                  S.KVM_CORE_REC_EVENTS, S.KVM_CORE_REC_MP_STATE, S.KVM_CORE_REC_XCRS):
        name = S.RECORDS[rtype][0]
        if name in v:
            recs.append(record(rtype, v[name]))
    if "xsave" in v:
        recs.append((S.KVM_CORE_REC_XSAVE, v["xsave"]))
    if "lapic" in v:
        recs.append((S.KVM_CORE_REC_LAPIC, v["lapic"]))
    if "msrs" in v:
        recs.append((S.KVM_CORE_REC_MSRS, S.kvm_msrs.build({
            "nmsrs": len(v["msrs"]), "pad": 0,
            "entries": [{"index": i, "reserved": 0, "data": d} for i, d in v["msrs"]]})))
    for rtype in (S.KVM_CORE_REC_L1_REGS, S.KVM_CORE_REC_L1_SREGS2):
        name = S.RECORDS[rtype][0]
        if name in v:
            recs.append(record(rtype, v[name]))
    if "nested" in v:
        recs.append((S.KVM_CORE_REC_NESTED, v["nested"]))
    if "vmx_exit" in v:
        recs.append(record(S.KVM_CORE_REC_VMX_EXIT, v["vmx_exit"]))
    if "svm_exit" in v:
        recs.append(record(S.KVM_CORE_REC_SVM_EXIT, v["svm_exit"]))
    return recs


def view_page(con: Any, values: dict[str, Any], size: int = PAGE) -> bytes:
    """A `size`-byte page, zero but for the `values` of an offset view (S.vmcs12,
    S.vmcb_control, S.vmcb_save)."""
    import io
    buf = io.BytesIO(bytes(size))
    con.build_stream(merge(S.plain(con.parse(bytes(size))), values), buf)
    return buf.getvalue()[:size]


def nested_state(fmt: int, flags: int, hdr: dict[str, Any], data: bytes = b"") -> bytes:
    """A NESTED record's payload: struct kvm_nested_state, header.size bytes."""
    vendor = S.kvm_vmx_nested_state_hdr if fmt == S.KVM_STATE_NESTED_FORMAT_VMX \
        else S.kvm_svm_nested_state_hdr
    raw = vendor.build(merge(S.zeroed(vendor), hdr)).ljust(120, b"\0")
    size = S.size(S.kvm_nested_state) + len(data)
    return S.kvm_nested_state.build({"flags": flags, "format": fmt, "size": size,
                                     "hdr": raw}) + data


def nested_vcpu(vcpu_id: int, vendor: int, *, guest_mode: bool = True,
                run_pending: bool = False, paging_root: int | None = 0x7000,
                **kw: Any) -> dict[str, Any]:
    """sample_vcpu() of a vCPU whose guest runs a nested guest: in guest mode, REGS /
    SREGS2 are L2's (RIP 0x2000 + vcpu_id, CR3 0x3000) and L1_REGS / L1_SREGS2 L1's
    (RIP 0xffffffff81e00000 + vcpu_id, RSP 0xffffc90000008000, CR3 0x5000000); NESTED
    holds vmcs12 (VMX: exit reason 48, EPT on with EPTP `paging_root` | 4-level WB) or
    vmcb12 (SVM: exit code 0x400 NPF, NP on with nCR3 `paging_root`). `paging_root` None:
    L1 uses shadow paging (EPT / NP off)."""
    v = sample_vcpu(vcpu_id, vendor, **kw)
    k = vcpu_id
    l1_regs = dict(v["regs"], rip=0xFFFFFFFF81E00000 + k, rsp=0xFFFFC90000008000 + 0x100 * k,
                   rflags=0x2, rax=0xA1A1 + k)
    l1_sregs = dict(v["sregs"], cr3=0x5000000, cr4=0x3506F0, flags=0,
                               pdptrs=[0, 0, 0, 0])
    flags = (S.KVM_STATE_NESTED_GUEST_MODE if guest_mode else 0) | \
        (S.KVM_STATE_NESTED_RUN_PENDING if run_pending else 0)
    if vendor == S.KVM_CORE_VENDOR_SVM:
        flags |= S.KVM_STATE_NESTED_GIF_SET
        data = b""
        if guest_mode:
            ctl = {"exit_code": 0x400, "exit_info_1": 0x6, "exit_info_2": 0x1234000,
                   "nested_ctl": 0 if paging_root is None else S.SVM_NESTED_CTL_NP_ENABLE,
                   "nested_cr3": paging_root or 0, "asid": 1}
            save = {"cr3": l1_sregs["cr3"], "cr4": l1_sregs["cr4"], "efer": l1_sregs["efer"],
                    "rip": l1_regs["rip"],
                    "rsp": l1_regs["rsp"], "rax": l1_regs["rax"], "rflags": 0x2}
            data = bytes(a | b for a, b in zip(view_page(S.vmcb_control, ctl),
                                               view_page(S.vmcb_save, save)))
        v["nested"] = nested_state(S.KVM_STATE_NESTED_FORMAT_SVM, flags,
                                   {"vmcb_pa": 0x6000}, data)
    else:
        ept = paging_root is not None
        vmcs = {"revision_id": 0x11E57ED0, "launch_state": 1,
                "ept_pointer": (paging_root or 0) | 3 << 3 | 6,
                "cpu_based_vm_exec_control": S.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS,
                "secondary_vm_exec_control": S.SECONDARY_EXEC_ENABLE_EPT if ept else 0,
                "vm_exit_reason": 48, "exit_qualification": 0x181,
                "guest_physical_address": 0x1234000, "host_rip": l1_regs["rip"],
                "host_rsp": l1_regs["rsp"], "host_cr3": l1_sregs["cr3"],
                "guest_rip": 0x2000 + k, "guest_cr3": 0x3000, "vmcs_link_pointer": 2**64 - 1}
        v["nested"] = nested_state(S.KVM_STATE_NESTED_FORMAT_VMX, flags,
                                   {"vmxon_pa": 0x4000, "vmcs12_pa": 0x6000},
                                   view_page(S.vmcs12, vmcs))
    if guest_mode:
        v["vcpu"]["status"] |= S.KVM_CORE_VCPU_GUEST_MODE
        v["regs"] = dict(v["regs"], rip=0x2000 + k, rsp=0x2F00 + k, rflags=0x202)
        v["sregs"] = dict(v["sregs"], cr3=0x3000)
        v["l1_regs"], v["l1_sregs"] = l1_regs, l1_sregs
    return v


def memslot(slot: int, gpa: int, size: int, uaddr: int, as_id: int = 0,
            flags: int = 0) -> dict[str, int]:
    """kvm_core_memslot values."""
    return {"as_id": as_id, "reserved": 0, "slot": slot, "flags": flags, "reserved2": 0,
            "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": uaddr}


def vm_records(vm: dict[str, int], slots: list[dict[str, int]]) -> list[tuple[int, bytes]]:
    """Records of a VM note: VM then MEMSLOTS."""
    vm = dict(vm, nr_memslots=len(slots))
    return [record(S.KVM_CORE_REC_VM, vm),
            (S.KVM_CORE_REC_MEMSLOTS, b"".join(S.kvm_core_memslot.build(m) for m in slots))]


def kvm_note(ntype: int, desc: bytes) -> bytes:
    """An ELF note owned by "KVM"."""
    return S.build_note(S.KVM_CORE_NOTE_NAME, ntype, desc)


def prstatus(tid: int, signo: int = 11, regs: dict[str, int] | None = None) -> bytes:
    """A CORE/NT_PRSTATUS note."""
    st = S.zeroed(S.elf_prstatus)
    st.update(si_signo=signo, pr_cursig=signo, pr_pid=tid)
    st["pr_reg"].update(regs or {})
    return S.build_note(b"CORE", S.NT_PRSTATUS, S.elf_prstatus.build(st))


def prpsinfo(pid: int, comm: str) -> bytes:
    """A CORE/NT_PRPSINFO note."""
    ps = S.zeroed(S.elf_prpsinfo)
    ps.update(pr_pid=pid, pr_fname=comm.encode().ljust(16, b"\0"),
              pr_psargs=comm.encode().ljust(80, b"\0"))
    return S.build_note(b"CORE", S.NT_PRPSINFO, S.elf_prpsinfo.build(ps))


def siginfo(signo: int) -> bytes:
    """A CORE/NT_SIGINFO note (128-byte siginfo_t)."""
    raw = S.siginfo.build({"si_signo": signo, "si_errno": 0, "si_code": 0})
    return S.build_note(b"CORE", S.NT_SIGINFO, raw.ljust(128, b"\0"))


def write_core(path: str | os.PathLike[str], notes: bytes, loads: list[Load],
               e_type: int = ET_CORE) -> None:
    """Write an ELF64 core: Ehdr, PT_NOTE then PT_LOADs, notes, page-aligned data."""
    phnum = 1 + len(loads)
    noff = 64 + 56 * phnum
    off = S.align(noff + len(notes), PAGE)
    phdrs = [S.Elf64_Phdr.build({"p_type": PT_NOTE, "p_flags": 0, "p_offset": noff,
                                 "p_vaddr": 0, "p_paddr": 0, "p_filesz": len(notes),
                                 "p_memsz": 0, "p_align": 0})]
    placed = []
    for ld in loads:
        phdrs.append(S.Elf64_Phdr.build({"p_type": PT_LOAD, "p_flags": 6, "p_offset": off,
                                         "p_vaddr": ld.vaddr, "p_paddr": 0,
                                         "p_filesz": ld.filesz, "p_memsz": ld.memsz,
                                         "p_align": PAGE}))
        placed.append((off, ld.data))
        off = S.align(off + ld.filesz, PAGE)
    ehdr = S.Elf64_Ehdr.build({
        "e_ident": b"\x7fELF\x02\x01\x01".ljust(16, b"\0"), "e_type": e_type,
        "e_machine": EM_X86_64, "e_version": 1, "e_entry": 0, "e_phoff": 64, "e_shoff": 0,
        "e_flags": 0, "e_ehsize": 64, "e_phentsize": 56, "e_phnum": phnum,
        "e_shentsize": 64, "e_shnum": 0, "e_shstrndx": 0})
    with open(path, "wb") as f:
        f.write(ehdr + b"".join(phdrs) + notes)
        for pos, data in placed:
            f.seek(pos)
            f.write(data)
        f.truncate(off)


def standard_core(path: str | os.PathLike[str], vendor: int = S.KVM_CORE_VENDOR_VMX,
                  nr_vcpus: int = 2, big: int = 0) -> dict[str, Any]:
    """A one-VM core with `nr_vcpus` full vCPUs and RAM; return what went in."""
    ram = bytes(range(256)) * 16                      # 4 KiB pattern at guest 0
    uaddr = 0x7F0000000000
    slots = [memslot(0, 0, 1 << 20, uaddr, flags=1),
             memslot(1, 0x100000000, max(big, 1 << 20), uaddr + (1 << 30), flags=2)]
    vm = {"vm_index": 0, "vendor": vendor, "nr_vcpus": nr_vcpus, "vm_type": 0, "flags": 0,
          "pid": 4242, "reserved": 0}
    vcpus = [sample_vcpu(i, vendor, tid=5000 + i) for i in range(nr_vcpus)]
    notes = prstatus(4242) + prpsinfo(4242, "qemu-system-x86") + siginfo(6)
    notes += b"".join(prstatus(5000 + i) for i in range(nr_vcpus))
    notes += kvm_note(S.NT_KVM_VM, S.build_desc(vm_records(vm, slots)))
    notes += b"".join(kvm_note(S.NT_KVM_VCPU, S.build_desc(vcpu_records(v))) for v in vcpus)
    loads = [Load(uaddr, 1 << 20, 1 << 20, ram),
             Load(uaddr + (1 << 30), max(big, 1 << 20), max(big, 1 << 20), b"\xaa" * 16)]
    write_core(path, notes, loads)
    return {"vm": dict(vm, nr_memslots=2), "slots": slots, "vcpus": vcpus, "ram": ram,
            "uaddr": uaddr}


def nt_file(page_size: int, entries: list[tuple[int, int, int, str]]) -> bytes:
    """A CORE/NT_FILE note from (start, end, file_ofs in pages, path)."""
    raw = S.nt_file_header.build({"count": len(entries), "page_size": page_size})
    raw += b"".join(S.nt_file_entry.build({"start": s, "end": e, "file_ofs": o})
                    for s, e, o, _ in entries)
    raw += b"".join(p.encode() + b"\0" for *_, p in entries)
    return S.build_note(b"CORE", S.NT_FILE, raw)
