"""Decoding of flags, exit reasons and CPU mode (expected values from the manuals)."""

from kvmnote import decode as D


def test_exit_names() -> None:
    assert D.vmx_exit_reason(12) == "HLT"
    assert D.vmx_exit_reason(1) == "EXTERNAL_INTERRUPT"
    assert D.vmx_exit_reason(30) == "IO_INSTRUCTION"
    assert D.vmx_exit_reason(48) == "EPT_VIOLATION"
    assert D.vmx_exit_reason(0x80000021) == "INVALID_STATE (entry failure)"
    assert D.svm_exit_code(0x78) == "HLT"
    assert D.svm_exit_code(0x60) == "INTR"
    assert D.svm_exit_code(0x7B) == "IOIO"
    assert D.svm_exit_code(0x400) == "NPF"
    assert D.svm_exit_code(0x40 + 14) == "EXCP_14 (#PF)"
    assert D.svm_exit_code(0x13) == "WRITE_CR3"
    assert D.svm_exit_code(0x27) == "READ_DR7"
    assert D.svm_exit_code((1 << 64) - 1) == "INVALID"


def test_flags() -> None:
    assert D.rflags(0x3246) == ["PF", "ZF", "IF", "IOPL=3"]
    assert D.bits(0x80000011, D.CR0) == ["PE", "ET", "PG"]
    assert D.bits(0xD01, D.EFER) == ["SCE", "LME", "LMA", "NXE"]
    assert D.status(0b11001) == ["valid", "guest_mode", "never_ran"]
    assert D.error(0) is None and D.error(1) == "busy" and D.error(9) == "unknown(9)"


def seg(l: int = 0, db: int = 0, dpl: int = 0) -> dict[str, int]:
    return {"l": l, "db": db, "dpl": dpl}


def test_cpu_mode() -> None:
    def mode(cr0: int, efer: int, cs: dict[str, int], ss_dpl: int = 0,
             rflags: int = 2) -> tuple[str, int]:
        return D.cpu_mode({"cr0": cr0, "efer": efer, "cs": cs, "ss": seg(dpl=ss_dpl)}, rflags)
    assert mode(0x10, 0, seg()) == ("real", 0)
    assert mode(0x11, 0, seg(), rflags=1 << 17) == ("virtual-8086", 3)
    assert mode(0x11, 0, seg(db=1), 3) == ("protected 32-bit", 3)
    assert mode(0x11, 0, seg()) == ("protected 16-bit", 0)
    assert mode(0x80000011, 0x500, seg(db=1), 3) == ("compatibility 32-bit", 3)
    assert mode(0x80000011, 0x500, seg(l=1)) == ("long 64-bit", 0)


def test_lapic_summary() -> None:
    page = bytearray(1024)
    page[0x20:0x24] = (3 << 24).to_bytes(4, "little")
    page[0x200 + 0x10 * 2:0x204 + 0x10 * 2] = (1 << 1 | 1 << 31).to_bytes(4, "little")
    s = D.lapic(bytes(page), x2apic=False)
    assert s["id"] == 3 and s["irr"] == [65, 95] and s["isr"] == []
    assert D.lapic(bytes(page), x2apic=True)["id"] == 3 << 24
