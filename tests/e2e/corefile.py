"""Minimal ELF core reading for the e2e tests: note list, process memory,
and an independent decoder of the KVM notes (include/uapi/.../kvm_coredump.h)
used to cross-check `kvmnote read --json` and to run before it exists."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Note:
    name: str
    type: int
    desc: bytes


class Core:
    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ValueError("not an ELF64 file")
        self.data = data
        (self.e_type, _, _, _, phoff, _, _, _, phentsize, phnum) = struct.unpack_from(
            "<HHIQQQIHHH", data, 16)
        self.phdrs = []
        for i in range(phnum):
            self.phdrs.append(struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize))

    def notes(self) -> list[Note]:
        out = []
        for p_type, _, off, _, _, filesz, _, _ in self.phdrs:
            if p_type != PT_NOTE:
                continue
            pos, end = off, off + filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                pos += 12
                name = self.data[pos:pos + namesz].rstrip(b"\0").decode("ascii", "replace")
                pos += (namesz + 3) & ~3
                desc = self.data[pos:pos + descsz]
                pos += (descsz + 3) & ~3
                out.append(Note(name, ntype, desc))
        return out

    def note_types(self) -> list[tuple[str, int]]:
        return [(n.name, n.type) for n in self.notes()]

    def read(self, vaddr: int, size: int) -> bytes | None:
        """Process memory at vaddr, None if not (fully) in a PT_LOAD's file part."""
        for p_type, _, off, va, _, filesz, memsz, _ in self.phdrs:
            if p_type == PT_LOAD and va <= vaddr and vaddr + size <= va + memsz:
                if vaddr + size > va + filesz:
                    return None
                return self.data[off + vaddr - va: off + vaddr - va + size]
        return None


# ---------------------------------------------------------------- KVM notes

NT_KVM_VCPU, NT_KVM_VM = 0x4b564d43, 0x4b564d56  # "KVMC", "KVMV"
STATUS_BITS = ["valid", "protected", "unreadable", "guest_mode", "never_ran"]
ERRORS = {0: None, 1: "busy", 2: "nomem", 3: "disabled"}
VENDORS = {0: "unknown", 1: "vmx", 2: "svm"}
GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags"]
SEGF = ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
        "unusable"]


def _records(desc: bytes):
    major, minor, hsize, rhsize, size, nrec = struct.unpack_from("<HHHHII", desc, 0)
    if major != 1:
        raise ValueError(f"unknown KVM note major version {major}")
    pos = hsize
    for _ in range(nrec):
        rtype, rsize = struct.unpack_from("<II", desc, pos)
        yield rtype, desc[pos + rhsize: pos + rhsize + rsize]
        pos += rhsize + ((rsize + 7) & ~7)


def _seg(b, off):
    v = struct.unpack_from("<QIH9B", b, off)
    return dict(zip(SEGF, v))


def _sregs2(b):
    d = {}
    for i, n in enumerate(["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]):
        d[n] = _seg(b, 24 * i)
    off = 24 * 8
    for n in ("gdt", "idt"):
        base, limit = struct.unpack_from("<QH", b, off)
        d[n] = {"base": base, "limit": limit}
        off += 16
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base", "flags"):
        d[n] = struct.unpack_from("<Q", b, off)[0]
        off += 8
    d["pdptrs"] = list(struct.unpack_from("<4Q", b, off))
    return d


VMX_EXIT_F = ["exit_reason", "flags", "exit_qualification", "guest_linear_address",
              "guest_physical_address", "exit_intr_info", "exit_intr_error_code",
              "idt_vectoring_info", "idt_vectoring_error_code", "instruction_len",
              "instruction_info", "interruptibility_info", "activity_state",
              "pending_dbg_exceptions", "vm_instruction_error"]
SVM_EXIT_F = ["exit_code", "exit_info_1", "exit_info_2", "exit_int_info", "exit_int_info_err",
              "int_ctl", "event_inj", "event_inj_err", "reserved", "int_state"]


def decode_kvm_notes(core: Core) -> dict:
    """The subset of the `kvmnote read --json` schema the tests assert on."""
    vms, vcpus = [], []
    for n in core.notes():
        if n.name != "KVM":
            continue
        if n.type == NT_KVM_VM:
            vm = {}
            for rtype, b in _records(n.desc):
                if rtype == 16:
                    f = struct.unpack_from("<IIIIIIiI", b)
                    vm.update(vm_index=f[0], vendor=VENDORS.get(f[1]), nr_vcpus=f[2],
                              nr_memslots=f[3], vm_type=f[4], flags=f[5], pid=f[6])
                elif rtype == 17:
                    vm["memslots"] = [dict(zip(
                        ["as_id", "slot", "flags", "guest_phys_addr", "memory_size",
                         "userspace_addr"],
                        (lambda t: (t[0], t[2], t[3], t[5], t[6], t[7]))(
                            struct.unpack_from("<HHIIIQQQ", b, o))))
                        for o in range(0, len(b) - 39, 40)]
            vms.append(vm)
        elif n.type == NT_KVM_VCPU:
            v = {}
            for rtype, b in _records(n.desc):
                if rtype == 1:
                    f = struct.unpack_from("<IIIIIIiI", b)
                    v.update(vcpu_id=f[0], vcpu_idx=f[1], vm_index=f[2],
                             vendor=VENDORS.get(f[3]),
                             status=[s for i, s in enumerate(STATUS_BITS) if f[4] >> i & 1],
                             error=ERRORS.get(f[5], f[5]), tid=f[6])
                elif rtype == 2:
                    v["regs"] = dict(zip(GPRS, struct.unpack_from("<18Q", b)))
                elif rtype == 3:
                    v["sregs"] = _sregs2(b)
                elif rtype == 4:
                    t = struct.unpack_from("<6QQ", b)
                    v["debugregs"] = {"db": list(t[:4]), "dr6": t[4], "dr7": t[5],
                                      "flags": t[6]}
                elif rtype == 6:
                    v["mp_state"] = struct.unpack_from("<I", b)[0]
                elif rtype == 7:
                    nr, _ = struct.unpack_from("<II", b)
                    v["xcrs"] = [{"xcr": struct.unpack_from("<I", b, 8 + 16 * i)[0],
                                  "value": struct.unpack_from("<Q", b, 16 + 16 * i)[0]}
                                 for i in range(nr)]
                elif rtype == 10:
                    nr = struct.unpack_from("<I", b)[0]
                    v["msrs"] = [{"index": struct.unpack_from("<I", b, 8 + 16 * i)[0],
                                  "value": struct.unpack_from("<Q", b, 16 + 16 * i)[0]}
                                 for i in range(nr)]
                elif rtype == 11:
                    t = struct.unpack_from("<IIQQQIIIIIIIIQII", b)
                    v["exit"] = {"type": "vmx", **dict(zip(VMX_EXIT_F, t))}
                elif rtype == 12:
                    t = struct.unpack_from("<QQQIIIIIIQ", b)
                    v["exit"] = {"type": "svm", **dict(zip(SVM_EXIT_F, t))}
            vcpus.append(v)
    return {"schema": "kvmnote-read/1", "vms": vms, "vcpus": vcpus}


def guest_read(core: Core, memslots: list[dict], gpa: int, size: int) -> bytes | None:
    """Guest-physical memory through a memslot map and the core's PT_LOADs."""
    for s in memslots:
        if s.get("as_id", 0) == 0 and s["guest_phys_addr"] <= gpa and \
                gpa + size <= s["guest_phys_addr"] + s["memory_size"]:
            return core.read(s["userspace_addr"] + gpa - s["guest_phys_addr"], size)
    return None
