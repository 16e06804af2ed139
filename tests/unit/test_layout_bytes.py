"""kvmnote reads cores written byte by byte from the C layouts, not from kvmnote.schema.

Every other unit test builds its input with kvmnote.schema, the same definitions the
reader parses with, so a wrong layout (two fields swapped) reads back as it was written.
Here the layouts come from the C declarations: the kvm_core_* structs from the UAPI
header that kpatch/ creates (its text, parsed here), the KVM UAPI structs of
arch/x86/include/uapi/asm/kvm.h and linux/kvm.h written out below field by field. Each
field gets its own value, placed at its C offset (natural alignment, as on x86-64) with
`struct`; the notes and the ELF file around them are packed by hand too. Then kvmnote
must return each value under its field's name, from the library and from `read --json`.
"""

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

import kvmnote
from kvmnote.cli import main
from test_uapi_layout import header_from_series

# C type -> struct format code.
CTYPES = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q", "__s32": "i", "char": "B"}

# Field lists of the KVM UAPI structs, in declaration order (Linux 6.12
# arch/x86/include/uapi/asm/kvm.h; kvm_mp_state and kvm_lapic_state as in
# linux/kvm.h and asm/kvm.h). "name[N]" is an array; a nested struct is a list.
SEGMENT = [("base", "__u64"), ("limit", "__u32"), ("selector", "__u16"), ("type", "__u8"),
           ("present", "__u8"), ("dpl", "__u8"), ("db", "__u8"), ("s", "__u8"),
           ("l", "__u8"), ("g", "__u8"), ("avl", "__u8"), ("unusable", "__u8"),
           ("padding", "__u8")]
DTABLE = [("base", "__u64"), ("limit", "__u16"), ("padding[3]", "__u16")]
UAPI: dict[str, list[tuple[str, Any]]] = {
    "kvm_regs": [(r, "__u64") for r in "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 "
                 "r13 r14 r15 rip rflags".split()],
    "kvm_sregs2": [(s, SEGMENT) for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
    + [("gdt", DTABLE), ("idt", DTABLE)]
    + [(r, "__u64") for r in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base",
                              "flags")] + [("pdptrs[4]", "__u64")],
    "kvm_debugregs": [("db[4]", "__u64"), ("dr6", "__u64"), ("dr7", "__u64"),
                      ("flags", "__u64"), ("reserved[9]", "__u64")],
    "kvm_vcpu_events": [
        ("exception", [("injected", "__u8"), ("nr", "__u8"), ("has_error_code", "__u8"),
                       ("pending", "__u8"), ("error_code", "__u32")]),
        ("interrupt", [("injected", "__u8"), ("nr", "__u8"), ("soft", "__u8"),
                       ("shadow", "__u8")]),
        ("nmi", [("injected", "__u8"), ("pending", "__u8"), ("masked", "__u8"),
                 ("pad", "__u8")]),
        ("sipi_vector", "__u32"), ("flags", "__u32"),
        ("smi", [("smm", "__u8"), ("pending", "__u8"), ("smm_inside_nmi", "__u8"),
                 ("latched_init", "__u8")]),
        ("triple_fault", [("pending", "__u8")]),
        ("reserved[26]", "__u8"), ("exception_has_payload", "__u8"),
        ("exception_payload", "__u64")],
    "kvm_mp_state": [("mp_state", "__u32")],
    "kvm_xcrs": [("nr_xcrs", "__u32"), ("flags", "__u32")]
    + [(f"xcrs{i}", [("xcr", "__u32"), ("reserved", "__u32"), ("value", "__u64")])
       for i in range(16)] + [("padding[16]", "__u64")],
}
REC = {"vcpu": 1, "regs": 2, "sregs": 3, "debugregs": 4, "events": 5, "mp_state": 6,
       "xcrs": 7, "xsave": 8, "lapic": 9, "msrs": 10, "vmx_exit": 11, "svm_exit": 12,
       "vm": 16, "memslots": 17}


def header_structs() -> dict[str, list[tuple[str, str]]]:
    """The kvm_core_* structs of the series' UAPI header, parsed from its text."""
    out = {}
    for name, body in re.findall(r"struct (kvm_core_\w+) \{(.*?)\};", header_from_series(),
                                 re.S):
        out[name] = re.findall(r"^\s*(__[us]\d+)\s+(\w+);", body, re.M)
        out[name] = [(f, t) for t, f in out[name]]
    return out


C = {**UAPI, **header_structs()}


def flatten(fields: list[tuple[str, Any]], prefix: str = "") -> list[tuple[str, str, int]]:
    """(dotted name, format code, count) of every scalar or array field."""
    out = []
    for name, ctype in fields:
        if isinstance(ctype, list):
            out += flatten(ctype, prefix + name + ".")
            continue
        m = re.fullmatch(r"(\w+)\[(\d+)\]", name)
        out.append((prefix + (m.group(1) if m else name), CTYPES[ctype],
                    int(m.group(2)) if m else 0))
    return out


def pack(fields: list[tuple[str, Any]], seed: int) -> tuple[bytes, dict[str, Any]]:
    """The struct's bytes, each field a distinct value at its natural-alignment offset,
    and {dotted name: value (list for arrays)}."""
    buf, values, off, align = bytearray(), {}, 0, 1
    for i, (name, code, count) in enumerate(flatten(fields)):
        size = struct.calcsize(code)
        align = max(align, size)
        off = (off + size - 1) // size * size
        vals = []
        for j in range(max(count, 1)):
            # distinct per field and element, using every byte of the field
            v = int.from_bytes(bytes((seed + i * 7 + j * 3 + b) & 0xFF or 1
                                     for b in range(size)), "little")
            v = v & 0x7FFFFFFF if code == "i" else v
            buf[len(buf):] = bytes(off + size - len(buf)) if off + size > len(buf) else b""
            struct.pack_into("<" + code, buf, off, v)
            vals.append(v)
            off += size
        values[name] = vals if count else vals[0]
    buf += bytes(-len(buf) % align)
    return bytes(buf), values


def record(rtype: int, payload: bytes) -> bytes:
    return struct.pack("<II", rtype, len(payload)) + payload + bytes(-len(payload) % 8)


def desc(records: list[bytes]) -> bytes:
    body = b"".join(records)
    return struct.pack("<HHHHII", 1, 0, 16, 8, 16 + len(body), len(records)) + body


def note(name: bytes, ntype: int, d: bytes) -> bytes:
    name += b"\0"
    return (struct.pack("<III", len(name), len(d), ntype) + name + bytes(-len(name) % 4)
            + d + bytes(-len(d) % 4))


def elf_core(path: Path, notes: bytes) -> None:
    """ELF64 ET_CORE, EM_X86_64, one PT_NOTE (p_type 4) right after the headers."""
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01", 4, 62, 1, 0, 64, 0, 0,
                       64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(notes), 0, 0)
    path.write_bytes(ehdr + phdr + notes)


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": v} as {"a": {"b": v}}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        *parents, last = k.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A core of one VM (two memslots) and one VMX vCPU, one SVM vCPU; return the values."""
    path = tmp_path_factory.mktemp("layout") / "core"
    want: dict[str, Any] = {}
    vm, want["vm"] = pack(C["kvm_core_vm"], 1)
    vm = struct.pack("<I", 0) + vm[4:]                       # vm_index 0
    want["vm"]["vm_index"] = 0
    slots = [pack(C["kvm_core_memslot"], s) for s in (40, 90)]
    want["memslots"] = [v for _, v in slots]
    vm = vm[:12] + struct.pack("<I", 2) + vm[16:]           # nr_memslots (offset 12)
    want["vm"]["nr_memslots"] = 2
    notes = note(b"KVM", 0x4B564D56, desc([record(16, vm),
                                           record(17, b"".join(b for b, _ in slots))]))
    for i, exit_name in enumerate(("vmx_exit", "svm_exit")):
        w: dict[str, Any] = {}
        recs = []
        for rname, cname, seed in (("vcpu", "kvm_core_vcpu", 3), ("regs", "kvm_regs", 5),
                                   ("sregs", "kvm_sregs2", 11), ("debugregs", "kvm_debugregs", 13),
                                   ("events", "kvm_vcpu_events", 17),
                                   ("mp_state", "kvm_mp_state", 19), ("xcrs", "kvm_xcrs", 23),
                                   (exit_name, f"kvm_core_{exit_name}", 29)):
            raw, w[rname] = pack(C[cname], seed + 50 * i)
            if rname == "vcpu":   # vm_index 0, vcpu_id i, status VALID (offsets 8, 0, 16)
                raw = struct.pack("<III", i, raw[4], 0) + raw[12:16] + struct.pack("<I", 1) \
                    + raw[20:]
                w["vcpu"] = {**w["vcpu"], "vcpu_id": i, "vcpu_idx": raw[4], "vm_index": 0,
                             "status": 1}
            recs.append(record(REC[rname], raw))
        msrs = [(0xC0000080, 0x0123456789ABCDEF + i), (0x10, 0xFEDCBA9876543210)]
        recs.append(record(10, struct.pack("<II", len(msrs), 0) + b"".join(
            struct.pack("<IIQ", idx, 0, val) for idx, val in msrs)))
        w["msrs"] = msrs
        notes += note(b"KVM", 0x4B564D43, desc(recs))
        want[f"vcpu{i}"] = w
    # NT_PRSTATUS: pr_cursig at 12, pr_pid at 32, 27 u64 user_regs_struct at 112 (rip 16th)
    prs = bytearray(336)
    struct.pack_into("<H", prs, 12, 11)
    struct.pack_into("<i", prs, 32, 4242)
    struct.pack_into("<27Q", prs, 112, *(0x1000 * (k + 1) for k in range(27)))
    notes = note(b"CORE", 1, bytes(prs)) + notes
    elf_core(path, notes)
    return path, want


def as_lists(rec: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """`rec` reduced to the keys of `want` (kvm_xcrs' array becomes xcrs0, xcrs1...)."""
    if "xcrs" in rec and isinstance(rec["xcrs"], list):
        rec = {**rec, **{f"xcrs{i}": x for i, x in enumerate(rec.pop("xcrs"))}}
    return {k: as_lists(rec[k], want[k]) if isinstance(want[k], dict)
            else list(rec[k]) if isinstance(rec[k], bytes) else rec[k] for k in want}


def test_records_read_at_their_c_offsets(core: tuple[Path, dict[str, Any]]) -> None:
    path, want = core
    with kvmnote.open_core(path) as c:
        assert c.threads[0].tid == 4242 and c.threads[0].cursig == 11
        assert c.threads[0].regs["rip"] == 0x1000 * 17 and c.threads[0].regs["r15"] == 0x1000
        assert c.vms[0].info == nested(want["vm"])
        assert c.vms[0].memslots == [nested(m) for m in want["memslots"]]
        for i, exit_name in enumerate(("vmx_exit", "svm_exit")):
            v, w = c.vcpus[i], want[f"vcpu{i}"]
            assert v.info == nested(w["vcpu"])
            for name in ("regs", "sregs", "debugregs", "events", "mp_state", "xcrs",
                         exit_name):
                assert as_lists(v.records[name], nested(w[name])) == nested(w[name]), name
            assert [(m["index"], m["data"]) for m in v.records["msrs"]] == w["msrs"]


def test_json_report_at_their_c_offsets(core: tuple[Path, dict[str, Any]],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, want = core
    assert main(["read", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)

    def num(x: Any) -> Any:
        return int(x, 16) if isinstance(x, str) and x.startswith("0x") else x
    slots = [{k: num(v) for k, v in m.items()} for m in doc["vms"][0]["memslots"]]
    assert slots == [{k: v for k, v in m.items() if not k.startswith("reserved")}
                     for m in want["memslots"]]
    for i, (kind, exit_name) in enumerate((("vmx", "vmx_exit"), ("svm", "svm_exit"))):
        v, w = doc["vcpus"][i], want[f"vcpu{i}"]
        assert {k: num(x) for k, x in v["regs"].items()} == w["regs"]
        for r in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            assert num(v["sregs"][r]) == w["sregs"][r], r
        for s in ("cs", "tr", "ldt"):
            for f in ("base", "limit", "selector", "type", "dpl", "db", "l", "g"):
                assert num(v["sregs"][s][f]) == w["sregs"][f"{s}.{f}"], f"{s}.{f}"
        assert num(v["sregs"]["idt"]["base"]) == w["sregs"]["idt.base"]
        assert num(v["events"]["exception_payload"]) == w["events"]["exception_payload"]
        assert v["exit"]["type"] == kind
        for f, x in w[exit_name].items():
            if f != "reserved":
                assert num(v["exit"][f]) == x, f
