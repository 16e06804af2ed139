"""Parse one KVM note descriptor (header + records) into a Vm or a Vcpu."""

from dataclasses import dataclass, field
from typing import Any

from . import schema as S
from .errors import CorruptNoteError, VersionError


@dataclass
class Vm:
    """One NT_KVM_VM note: kvm_core_vm fields, memslots, and its vCPUs."""

    info: dict[str, Any]
    memslots: list[dict[str, Any]]
    version: tuple[int, int]
    unknown_records: list[tuple[int, int]] = field(default_factory=list)
    vcpus: list["Vcpu"] = field(default_factory=list)

    @property
    def vm_index(self) -> int:
        """This dump's number for the VM."""
        return self.info["vm_index"]


@dataclass
class Vcpu:
    """One NT_KVM_VCPU note: kvm_core_vcpu fields and the state records by name."""

    info: dict[str, Any]
    records: dict[str, Any]
    version: tuple[int, int]
    unknown_records: list[tuple[int, int]] = field(default_factory=list)

    @property
    def vcpu_id(self) -> int:
        """The KVM_CREATE_VCPU argument."""
        return self.info["vcpu_id"]

    @property
    def vm_index(self) -> int:
        """vm_index of the VM this vCPU belongs to."""
        return self.info["vm_index"]


@dataclass
class Dropped:
    """The NT_KVM_DROPPED note (1.1): VMs, vCPUs and memslots the kernel left out."""

    info: dict[str, Any]
    version: tuple[int, int]


def _records(desc: bytes, where: str) -> tuple[dict[str, Any], list[tuple[int, int, bytes]]]:
    """Check the header and framing; return the header and (type, offset, payload)s."""
    hsize = S.size(S.kvm_core_header)
    if len(desc) < hsize:
        raise CorruptNoteError(f"{where}: descriptor is {len(desc)} bytes, "
                               f"shorter than kvm_core_header ({hsize})")
    hdr = S.parse(S.kvm_core_header, desc)
    if hdr["major"] != S.KVM_CORE_VERSION_MAJOR:
        raise VersionError(f"{where}: note format version {hdr['major']}.{hdr['minor']} "
                           f"is newer than this kvmnote understands "
                           f"(major {S.KVM_CORE_VERSION_MAJOR}); upgrade kvmnote")
    rhsize = S.size(S.kvm_core_record)
    if hdr["header_size"] < hsize or hdr["record_header_size"] < rhsize:
        raise CorruptNoteError(f"{where}: header_size {hdr['header_size']} or "
                               f"record_header_size {hdr['record_header_size']} too small")
    if hdr["size"] != len(desc):
        raise CorruptNoteError(f"{where}: header size {hdr['size']} disagrees with "
                               f"the note's descsz {len(desc)}")
    size, off, end = hdr["size"], S.align(hdr["header_size"], 8), hdr["header_size"]
    out = []
    for i in range(hdr["nr_records"]):
        if off + hdr["record_header_size"] > size:
            raise CorruptNoteError(f"{where}: record {i} at offset {off} runs past the "
                                   f"descriptor end ({size}); nr_records "
                                   f"{hdr['nr_records']} disagrees with the bytes")
        rec = S.parse(S.kvm_core_record, desc[off:])
        start = off + hdr["record_header_size"]
        end = start + rec["size"]
        if end > size:
            raise CorruptNoteError(f"{where}: record {i} (type {rec['type']}) at offset "
                                   f"{off}: payload of {rec['size']} bytes runs past the "
                                   f"descriptor end ({size})")
        out.append((rec["type"], off, desc[start:end]))
        off = S.align(end, 8)
    if size > max(off, end):
        raise CorruptNoteError(f"{where}: {size - max(off, end)} bytes after the last "
                               f"record; nr_records {hdr['nr_records']} disagrees with "
                               f"the descriptor size {size}")
    return hdr, out


# Records that are a header with a count and that many entries.
_ARRAYS = {S.KVM_CORE_REC_MSRS: ("nmsrs", S.kvm_msr_entry),
           S.KVM_CORE_REC_CPUID: ("nent", S.kvm_cpuid_entry2)}


def _decode(rtype: int, payload: bytes, what: str) -> Any:
    """Decode the payload of a known record type (prefix rule applied)."""
    struct = S.RECORDS[rtype][1]
    if rtype == S.KVM_CORE_REC_MEMSLOTS:  # an array: count = size / 40
        esize = S.size(struct)
        if len(payload) % esize:
            raise CorruptNoteError(f"{what}: {len(payload)} bytes is not a whole "
                                   f"number of kvm_core_memslot ({esize})")
        return [S.parse(struct, payload[i:i + esize]) for i in range(0, len(payload), esize)]
    if len(payload) < S.size(struct):
        raise CorruptNoteError(f"{what}: payload is {len(payload)} bytes, shorter "
                               f"than its struct ({S.size(struct)})")
    if rtype == S.KVM_CORE_REC_NESTED:
        return _nested(payload, what)
    if rtype == S.KVM_CORE_REC_XSAVE:
        return bytes(payload)
    if rtype == S.KVM_CORE_REC_LAPIC:
        return bytes(payload[:S.KVM_APIC_REG_SIZE])
    if rtype in _ARRAYS:
        count_field, entry = _ARRAYS[rtype]
        count = S.parse(struct, payload)[count_field]
        esize, hsize = S.size(entry), S.size(struct)
        need = hsize + count * esize
        if len(payload) < need:
            raise CorruptNoteError(f"{what}: {count_field} {count} needs {need} bytes, "
                                   f"payload has {len(payload)}")
        return [S.parse(entry, payload[hsize + i * esize:]) for i in range(count)]
    return S.parse(struct, payload)


def _nested(payload: bytes, what: str) -> dict[str, Any]:
    """struct kvm_nested_state: its header, the vendor header by `format` ("vmx" or
    "svm"), and "data" (header.size - 128 bytes: vmcs12 [shadow_vmcs12] or vmcb12)."""
    st = S.parse(S.kvm_nested_state, payload)
    hsize = S.size(S.kvm_nested_state)
    if not hsize <= st["size"] <= len(payload):
        raise CorruptNoteError(f"{what}: kvm_nested_state.size {st['size']} is outside "
                               f"[{hsize}, {len(payload)}] (the payload)")
    fmt = S.NESTED_FORMATS.get(st["format"])
    hdr = st.pop("hdr")
    if fmt is not None:
        st[fmt] = S.parse(S.kvm_vmx_nested_state_hdr if fmt == "vmx"
                          else S.kvm_svm_nested_state_hdr, hdr)
    st["data"] = bytes(payload[hsize:st["size"]])
    return st


def parse_desc(ntype: int, desc: bytes, where: str) -> Vm | Vcpu | Dropped:
    """Parse an NT_KVM_VM, NT_KVM_VCPU or NT_KVM_DROPPED descriptor; `where`
    names it in errors."""
    hdr, recs = _records(desc, where)
    first, known = {S.NT_KVM_VM: (S.KVM_CORE_REC_VM, S.VM_RECORDS),
                    S.NT_KVM_DROPPED: (S.KVM_CORE_REC_DROPPED, S.DROPPED_RECORDS),
                    }.get(ntype, (S.KVM_CORE_REC_VCPU, S.VCPU_RECORDS))
    if not recs or recs[0][0] != first:
        raise CorruptNoteError(f"{where}: first record is not "
                               f"{S.RECORDS[first][0].upper()} (type {first})")
    records: dict[str, Any] = {}
    unknown = []
    for rtype, off, payload in recs:
        if rtype not in known:
            unknown.append((rtype, len(payload)))
            continue
        name = S.RECORDS[rtype][0]
        what = f"{where}: record {name.upper()} at offset {off}"
        if name in records:
            raise CorruptNoteError(f"{what}: duplicate record")
        records[name] = _decode(rtype, payload, what)
    version = (hdr["major"], hdr["minor"])
    if ntype == S.NT_KVM_DROPPED:
        return Dropped(records["dropped"], version)
    if ntype == S.NT_KVM_VM:
        vm = records["vm"]
        slots = records.get("memslots", [])
        if len(slots) != vm["nr_memslots"]:
            raise CorruptNoteError(f"{where}: nr_memslots {vm['nr_memslots']} but the "
                                   f"MEMSLOTS record holds {len(slots)}")
        return Vm(vm, slots, version, unknown)
    info = records.pop("vcpu")
    return Vcpu(info, records, version, unknown)
