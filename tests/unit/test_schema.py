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
    assert (hdr["major"], hdr["minor"], hdr["size"], hdr["nr_records"]) == (1, 2, 48, 2)
    assert desc[16:24] == (6).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert desc[28:32] == bytes(4)  # padding to 8


def test_build_note_padding() -> None:
    note = S.build_note(b"KVM", 2, b"abcde")
    assert note[:12] == (4).to_bytes(4, "little") + (5).to_bytes(4, "little") + \
        (2).to_bytes(4, "little")
    assert note[12:16] == b"KVM\0" and note[16:21] == b"abcde" and len(note) == 24


def test_nested_layouts() -> None:
    """struct kvm_nested_state (linux/kvm.h) and the vmcs12 / VMCB control-area offsets
    (arch/x86/kvm/vmx/vmcs12.h CHECK_OFFSET, arch/x86/include/asm/svm.h)."""
    lay = S.layout()
    assert lay["kvm_nested_state"]["size"] == 128
    assert lay["kvm_vmx_nested_state_hdr"]["size"] == 32
    assert lay["kvm_vmx_nested_state_hdr"]["fields"]["preemption_timer_deadline"] == 24
    assert lay["kvm_svm_nested_state_hdr"]["size"] == 8
    page = bytearray(4096)
    for off, width, value in ((120, 8, 0x1111), (432, 8, 0x2222), (672, 8, 0x3333),
                              (804, 4, 0x44), (812, 4, 0x55), (748, 4, 0x66)):
        page[off:off + width] = value.to_bytes(width, "little")
    v = S.vmcs12.parse(bytes(page))
    assert (v.ept_pointer, v.guest_cr3, v.host_rip, v.secondary_vm_exec_control,
            v.vm_exit_reason, v.cpu_based_vm_exec_control) == (
                0x1111, 0x2222, 0x3333, 0x44, 0x55, 0x66)
    page = bytearray(4096)
    for off, value in ((0x70, 0x400), (0x90, 1), (0xB0, 0x7000)):
        page[off:off + 8] = value.to_bytes(8, "little")
    c = S.vmcb_control.parse(bytes(page))
    assert (c.exit_code, c.nested_ctl, c.nested_cr3) == (0x400, 1, 0x7000)
