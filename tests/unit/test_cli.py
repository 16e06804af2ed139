"""`kvmnote read`: output and every error path (exit 2, one line, no traceback)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import corebuilder as cb
from testlib import need
from kvmnote import schema as S
from kvmnote.cli import main

NO_KVM = ("kvmnote: {}: no KVM notes: was this core written by a kernel with the kvmnote "
          "patches, and was the process a KVM VMM?\n")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main() on argv: (exit status, stdout, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


HEX = re.compile(r"^0x[0-9a-f]+$")


def ints(doc: object) -> object:
    """A kvmnote-read/2 document with its "0x..." strings as ints, as consumers read it."""
    if isinstance(doc, dict):
        return {k: ints(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [ints(v) for v in doc]
    return int(doc, 16) if isinstance(doc, str) and HEX.match(doc) else doc


def fails(capsys: pytest.CaptureFixture[str], path: Path, *opts: str) -> str:
    """Run `read` on `path`, assert a one-line kvmnote error, return it."""
    rc, out, err = run(capsys, "read", *opts, str(path))
    assert rc == 2 and out == ""
    assert err.startswith("kvmnote: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_json_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = cb.standard_core(tmp_path / "core", vendor=S.KVM_CORE_VENDOR_SVM, nr_vcpus=2)
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    assert rc == 0
    doc = ints(json.loads(out))
    assert doc["schema"] == "kvmnote-read/2"
    assert doc["core"] == {"path": str(tmp_path / "core"), "pid": 4242,
                           "comm": "qemu-system-x86", "signal": 6}
    vm = doc["vms"][0]
    assert vm == {**{k: v for k, v in want["vm"].items() if k != "reserved"},
                  "vendor": "svm", "flags_names": [],
                  "memslots": [{k: v for k, v in m.items() if not k.startswith("reserved")}
                               for m in want["slots"]],
                  "unknown_records": [],
                  "guest_ram": {"size": 2 << 20, "dumped": 2 << 20, "excluded": 0,
                                "unmapped": 0, "cut_off": 0}}
    v, w = doc["vcpus"][1], want["vcpus"][1]
    assert v["vcpu_id"] == 1 and v["tid"] == 5001 and v["vendor"] == "svm"
    assert v["status"] == ["valid"] and v["error"] is None
    assert v["regs"] == w["regs"]
    assert v["sregs"]["cs"] == w["sregs"]["cs"] and v["sregs"]["cr3"] == w["sregs"]["cr3"]
    assert v["sregs"]["gdt"] == w["sregs"]["gdt"] and v["sregs"]["pdptrs"] == [1, 2, 3, 4]
    assert v["debugregs"] == w["debugregs"]
    assert v["events"]["exception"] == w["events"]["exception"]
    assert v["events"]["exception_payload"] == w["events"]["exception_payload"]
    assert v["mp_state"] == 3
    assert v["xcrs"] == [{"xcr": 0, "value": 7}]
    assert v["xsave"] == {"size": 4160, "xstate_bv": 7, "xcomp_bv": 1 << 63 | 7,
                          "mxcsr": 0x1F80, "fcw": 0x37F, "fsw": 0x20}
    assert v["lapic"]["id"] == 1 and v["lapic"]["tpr"] == 0x20 and v["lapic"]["svr"] == 0x1FF
    assert v["lapic"]["isr"] == [48] and v["lapic"]["irr"] == [255]
    assert v["lapic"]["regs_hex"] == w["lapic"].hex()
    assert v["msrs"] == [{"index": 0xC0000080, "name": "IA32_EFER", "value": 0xD01},
                         {"index": 0x10, "name": "IA32_TSC", "value": 123456789 * 2},
                         {"index": 0x12345678, "name": None, "value": 42}]
    assert v["exit"] == {"type": "svm", **{k: x for k, x in w["svm_exit"].items()},
                         "reason_name": "HLT"}
    assert v["unknown_records"] == []


def test_text_and_vcpu_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb.standard_core(tmp_path / "core", nr_vcpus=3)
    rc, out, _ = run(capsys, "read", "--all", "--vcpu", "2", str(tmp_path / "core"))
    assert rc == 0
    assert "vCPU 2 " in out and "vCPU 1 " not in out
    assert "RIP 0xffffffff81000003" in out and "mode long 64-bit, CPL 0" in out
    assert "HLT (0xc)" in out and "IA32_EFER" in out and "[SCE LME LMA NXE]" in out
    assert "LOG_DIRTY_PAGES" in out and "mp_state HALTED" in out
    err = fails(capsys, tmp_path / "core", "--vcpu", "7")
    assert "no vCPU with vcpu_id 7" in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no such file" in fails(capsys, tmp_path / "nope")


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "directory" in fails(capsys, tmp_path)


def test_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert "not a regular file" in fails(capsys, tmp_path / "fifo")


def test_not_elf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_bytes(b"hello world, not a core" * 10)
    assert "not an ELF file" in fails(capsys, tmp_path / "f")
    (tmp_path / "e").write_bytes(b"")
    assert "not an ELF file" in fails(capsys, tmp_path / "e")


def test_not_core(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb.write_core(tmp_path / "exe", b"", [], e_type=2)
    assert "not a core" in fails(capsys, tmp_path / "exe")


def test_truncated_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb.standard_core(tmp_path / "core")
    os.truncate(tmp_path / "core", 2000)
    assert "truncated" in fails(capsys, tmp_path / "core")
    os.truncate(tmp_path / "core", 40)
    assert "truncated" in fails(capsys, tmp_path / "core")


def test_no_kvm_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb.write_core(tmp_path / "core", cb.prstatus(1) + cb.prpsinfo(1, "bash"), [])
    assert fails(capsys, tmp_path / "core") == NO_KVM.format(tmp_path / "core")


def test_no_kvm_notes_but_vcpu_fds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A VMM's core from a kernel without the series: its NT_FILE maps vCPU fds' kvm_run."""
    files = [(0x400000, 0x401000, 0, "/usr/bin/qemu-system-x86_64"),
             (0x7F0000000000, 0x7F0000003000, 0, "anon_inode:kvm-vcpu:0"),
             (0x7F0000010000, 0x7F0000013000, 0, "anon_inode:kvm-vcpu:1")]
    cb.write_core(tmp_path / "core", cb.prstatus(1) + cb.nt_file(4096, files), [])
    err = fails(capsys, tmp_path / "core")
    assert err.startswith(f"kvmnote: {tmp_path / 'core'}: no KVM notes, yet the process had "
                          f"KVM vCPUs (2 anon_inode:kvm-vcpu mappings in NT_FILE)")
    assert "lacks the kvmnote series" in err and "kvm.coredump_notes=0" in err
    assert "coredump_filter" in err and "0x200" in err


def test_future_major(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    desc = S.build_desc(cb.vm_records({"vm_index": 0}, []), major=3, minor=1)
    cb.write_core(tmp_path / "core", cb.kvm_note(S.NT_KVM_VM, desc), [])
    assert ("note format version 3.1 is newer than this kvmnote understands (major 1); "
            "upgrade kvmnote") in fails(capsys, tmp_path / "core")


def test_corrupt_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    desc = bytearray(S.build_desc(cb.vcpu_records(cb.sample_vcpu(0))))
    desc[12:16] = (99).to_bytes(4, "little")  # nr_records
    cb.write_core(tmp_path / "core", cb.kvm_note(S.NT_KVM_VCPU, bytes(desc)), [])
    err = fails(capsys, tmp_path / "core")
    assert "PT_NOTE" in err and "note at offset 0" in err and "record" in err


def test_note_framing_past_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    note = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records({"vm_index": 0}, [])))
    note = note[:4] + (10**6).to_bytes(4, "little") + note[8:]
    cb.write_core(tmp_path / "core", note, [])
    assert "runs past the segment end" in fails(capsys, tmp_path / "core")


@pytest.mark.parametrize("tool", ["zstd", "lz4", "xz"])
def test_compressed_truncated_and_corrupt(tmp_path: Path, tool: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    need(shutil.which(tool) is not None, f"{tool} (apt-get install zstd lz4 xz-utils)")
    want = cb.standard_core(tmp_path / "core")
    packed = subprocess.run([tool, "-q", "-c", str(tmp_path / "core")], check=True,
                            capture_output=True).stdout
    (tmp_path / "ok").write_bytes(packed)
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "ok"))
    assert rc == 0 and ints(json.loads(out))["vcpus"][0]["regs"] == want["vcpus"][0]["regs"]
    (tmp_path / "cut").write_bytes(packed[:len(packed) // 3])
    err = fails(capsys, tmp_path / "cut")
    assert "truncated" in err or "ends early" in err
    (tmp_path / "bad").write_bytes(packed[:12] + bytes(range(256)) * 8)
    fails(capsys, tmp_path / "bad")


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and re.fullmatch(r"kvmnote \d+\.\d+\.\d+\n", out)
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "1 (vmcore only) vmcore written but incomplete" in out
    assert "2 error" in out and "141" in out


def test_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "read")[0] == 2
    assert run(capsys)[0] == 2


def test_python_m(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"junk")
    p = subprocess.run([sys.executable, "-m", "kvmnote", "read", str(tmp_path / "f")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("kvmnote: ") and "Traceback" not in p.stderr


def _kvmnote(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmnote", *argv], text=True,
                          stderr=subprocess.PIPE, timeout=60, **kw)  # type: ignore[call-overload]


def test_stdout_reader_gone_is_quiet(tmp_path: Path) -> None:
    """`kvmnote read CORE | head -n0`: no traceback, the status of a filter killed by
    SIGPIPE (141), as `cat` gets."""
    cb.standard_core(tmp_path / "core", nr_vcpus=4)
    r, w = os.pipe()
    os.close(r)                      # the reader has gone before kvmnote writes
    try:
        p = _kvmnote("read", "--all", str(tmp_path / "core"), stdout=w)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")


def test_stdout_full_is_one_line(tmp_path: Path) -> None:
    cb.standard_core(tmp_path / "core")
    with open("/dev/full", "w") as full:
        p = _kvmnote("read", str(tmp_path / "core"), stdout=full)
    assert p.returncode == 2
    assert p.stderr == "kvmnote: cannot write to stdout: No space left on device\n"


def test_stdout_closed_is_one_line(tmp_path: Path) -> None:
    cb.standard_core(tmp_path / "core")
    p = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "kvmnote",
                        "read", str(tmp_path / "core")], text=True, capture_output=True,
                       timeout=60)
    assert (p.returncode, p.stderr) == (2, "kvmnote: stdout is closed\n")


def _dup_core(path: Path) -> list[dict]:
    """A core whose VM note and vCPU 1's note appear twice (the second copies differ)."""
    vm = {"vm_index": 0, "vendor": 1, "nr_vcpus": 2, "vm_type": 0, "flags": 0, "pid": 7}
    slots = [cb.memslot(0, 0, 4096, 0x10000)]
    vcpus = [cb.sample_vcpu(0), cb.sample_vcpu(1)]
    other = cb.sample_vcpu(1)
    other["regs"]["rip"] = 0x1234
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, slots)))
    notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(dict(vm, pid=8), slots)))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
                      for v in (*vcpus, other))
    cb.write_core(path, notes, [cb.Load(0x10000, 4096, 4096, b"ram")])
    return vcpus


def test_duplicate_notes_first_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vcpus = _dup_core(tmp_path / "core")
    rc, out, err = run(capsys, "read", "--json", str(tmp_path / "core"))
    assert rc == 0
    doc = ints(json.loads(out))
    assert [vm["pid"] for vm in doc["vms"]] == [7]
    assert [v["vcpu_id"] for v in doc["vcpus"]] == [0, 1]
    assert doc["vcpus"][1]["regs"]["rip"] == vcpus[1]["regs"]["rip"]
    assert err.count("kvmnote: warning: ") == 2
    assert "second VM note with vm_index 0" in err and "second vCPU note for vcpu_id 1" in err
    assert doc["warnings"] == [ln.removeprefix("kvmnote: warning: ")
                               for ln in err.splitlines()]


def test_corrupt_nt_file_is_a_warning(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = bytearray(cb.nt_file(4096, [(0x400000, 0x401000, 0, "/usr/bin/qemu")]))
    bad[12 + 8:12 + 16] = (1 << 40).to_bytes(8, "little")      # count
    notes = bytes(bad) + cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(
        cb.sample_vcpu(0))))
    cb.write_core(tmp_path / "core", notes, [])
    rc, out, err = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 0 and "vCPU 0 " in out
    assert err.startswith("kvmnote: warning: ") and err.count("\n") == 1
    assert "NT_FILE count 1099511627776 exceeds the note (note ignored)" in err


# The 64-bit fields, by JSON path, as the C headers declare them (__u64 in
# asm/kvm_coredump.h and asm/kvm.h), written out here rather than taken from
# kvmnote.schema. "[]" is a list element; lapic.icr is two 32-bit registers joined.
SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt")
U64_VCPU = {
    *(f"regs.{r}" for r in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 "
                            "rip rflags").split()),
    *(f"sregs.{s}.base" for s in SEGS),
    *(f"sregs.{r}" for r in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base",
                             "flags")),
    "sregs.pdptrs[]", "debugregs.db[]", "debugregs.dr6", "debugregs.dr7", "debugregs.flags",
    "events.exception_payload", "xcrs[].value", "xsave.xstate_bv", "xsave.xcomp_bv",
    "lapic.icr", "msrs[].value"}
U64_EXIT = {"vmx": {"exit_qualification", "guest_linear_address", "guest_physical_address",
                    "pending_dbg_exceptions"},
            "svm": {"exit_code", "exit_info_1", "exit_info_2", "int_state"}}
U64_VM = {"memslots[].guest_phys_addr", "memslots[].memory_size", "memslots[].userspace_addr"}


def leaves(doc: object, path: str = "") -> dict[str, set[type]]:
    """JSON path -> the types of the integer-like values found there."""
    out: dict[str, set[type]] = {}

    def walk(v: object, p: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{p}.{k}" if p else k)
        elif isinstance(v, list):
            for x in v:
                walk(x, p + "[]")
        elif isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) \
                and HEX.match(v):
            out.setdefault(p, set()).add(type(v))
    walk(doc, path)
    return out


@pytest.mark.parametrize("vendor", [S.KVM_CORE_VENDOR_VMX, S.KVM_CORE_VENDOR_SVM])
def test_json_64bit_fields_are_hex_strings(tmp_path: Path, vendor: int,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cb.standard_core(tmp_path / "core", vendor=vendor)
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    doc = json.loads(out)
    vendor_name = "vmx" if vendor == S.KVM_CORE_VENDOR_VMX else "svm"
    want = U64_VCPU | {f"exit.{f}" for f in U64_EXIT[vendor_name]}
    for v in doc["vcpus"]:
        found = leaves(v)
        assert {p for p, t in found.items() if t == {str}} == want
        assert {p for p, t in found.items() if t != {int}} == want   # the rest: numbers
    found = leaves(doc["vms"][0])
    assert {p for p, t in found.items() if t == {str}} == U64_VM
    assert {p for p, t in found.items() if t != {int}} == U64_VM


def test_json_survives_jq(tmp_path: Path) -> None:
    """jq 1.6 (Debian 12) keeps 64-bit values: cr2 0xffffffffdeadb000 comes out whole."""
    need(shutil.which("jq") is not None, "jq (apt-get install jq)")
    path = tmp_path / "core"
    cb.standard_core(path)
    data = path.read_bytes()
    old = (0xDEAD000 + 1).to_bytes(8, "little")   # vCPU 0's cr2 (then exception_payload)
    path.write_bytes(data.replace(old, (0xFFFFFFFFDEADB000).to_bytes(8, "little"), 1))
    p = subprocess.run(f"{sys.executable} -m kvmnote read --json {path} | "
                       f"jq -r '.vcpus[0].sregs.cr2'", shell=True, capture_output=True,
                       text=True, check=True)
    assert p.stdout == "0xffffffffdeadb000\n"


def test_unknown_vm_record_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = cb.vm_records({"vm_index": 0, "vendor": 1}, []) + [(300, b"new" * 4)]
    cb.write_core(tmp_path / "core", cb.kvm_note(S.NT_KVM_VM, S.build_desc(recs, minor=2)), [])
    rc, out, _ = run(capsys, "read", str(tmp_path / "core"))
    assert rc == 0 and "unknown records: type 300 (12 bytes)" in out
    rc, out, _ = run(capsys, "read", "--json", str(tmp_path / "core"))
    assert json.loads(out)["vms"][0]["unknown_records"] == [{"type": 300, "size": 12}]
