"""The schema's layout matches the C structs, and records round-trip."""

import pytest

from kvmnote import schema as S

# Sizes from asm/kvm_coredump.h and the KVM UAPI (the brief's contract).
SIZES = {"kvm_core_header": 16, "kvm_core_record": 8, "kvm_core_vcpu": 32,
         "kvm_core_vmx_exit": 80, "kvm_core_svm_exit": 56, "kvm_core_vm": 32,
         "kvm_core_memslot": 40, "kvm_regs": 144, "kvm_sregs2": 320, "kvm_segment": 24,
         "kvm_dtable": 16, "kvm_debugregs": 128, "kvm_vcpu_events": 64, "kvm_xcrs": 392,
         "kvm_msr_entry": 16, "kvm_lapic_state": 1024, "kvm_mp_state": 4}


@pytest.mark.parametrize("name,size", SIZES.items())
def test_struct_sizes(name: str, size: int) -> None:
    assert S.layout()[name]["size"] == size


def test_field_offsets() -> None:
    lay = S.layout()
    assert lay["kvm_core_vmx_exit"]["fields"]["pending_dbg_exceptions"] == 64
    assert lay["kvm_core_vmx_exit"]["fields"]["guest_physical_address"] == 24
    assert lay["kvm_core_svm_exit"]["fields"]["int_state"] == 48
    assert lay["kvm_core_memslot"]["fields"]["guest_phys_addr"] == 16
    assert lay["kvm_core_vcpu"]["fields"]["tid"] == 24
    assert lay["kvm_sregs2"]["fields"]["cr0"] == 8 * 24 + 2 * 16
    assert lay["kvm_sregs2"]["fields"]["ss.dpl"] == 5 * 24 + 16
    assert lay["kvm_sregs2"]["fields"]["pdptrs"] == 288
    assert lay["kvm_vcpu_events"]["fields"]["exception_has_payload"] == 55
    assert lay["kvm_vcpu_events"]["fields"]["exception_payload"] == 56
    assert lay["kvm_vcpu_events"]["fields"]["smi.latched_init"] == 27
    assert lay["kvm_xcrs"]["fields"]["padding"] == 8 + 16 * 16
    assert lay["kvm_regs"]["fields"]["rflags"] == 136


def test_desc_framing() -> None:
    desc = S.build_desc([(S.KVM_CORE_REC_MP_STATE, b"\3\0\0\0"), (99, b"x")])
    assert len(desc) == 16 + (8 + 8) + (8 + 8)
    hdr = S.parse(S.kvm_core_header, desc)
    assert (hdr["major"], hdr["minor"], hdr["size"], hdr["nr_records"]) == (1, 1, 48, 2)
    assert desc[16:24] == (6).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert desc[28:32] == bytes(4)  # padding to 8


def test_build_note_padding() -> None:
    note = S.build_note(b"KVM", 2, b"abcde")
    assert note[:12] == (4).to_bytes(4, "little") + (5).to_bytes(4, "little") + \
        (2).to_bytes(4, "little")
    assert note[12:16] == b"KVM\0" and note[16:21] == b"abcde" and len(note) == 24
