"""`kvmnote verify`: the rules of kvmnote/verify.py, each with a trace that must fail.

The traces are written by hand from what the example cores' test VMM did, not from the
verifier. How the passing traces were derived:

- `kvmnote read --all examples/svm-vmm.core.zst` (and `read --json` for the exit record):
  pid 46; vCPU 0 on thread 49 and vCPU 1 on thread 51, both `valid`, RIP 0x1001, last exit
  SVM HLT (exit_code 0x78), exit_info_1/2 0, exit_int_info 0 (no event in flight).
- examples/svm-vmm.report.json, the VMM's own account: both vCPUs "halted", KVM_RUN returned
  KVM_EXIT_HLT (5) on threads 49 and 51. tests/vmm/kvmtest.[ch] put `hlt` at GPA_HLT 0x1000
  and start RIP there. So the last kvm_exit per vCPU was HLT at guest RIP 0x1000, info1 0,
  info2 0, intr_info 0, error_code 0, on that vCPU's thread; KVM then skipped the 1-byte
  `hlt` before returning KVM_EXIT_HLT, hence RIP 0x1001 in the note (and in the report).
  Exit counts are those bpf/kvmcoredump_example.txt shows for halted vCPUs (NPF x4, INTR,
  HLT / NPF, HLT); the verifier does not compare them.
- examples/vmx-vmm.core.zst / .report.json: the same VMM under VMX: pid 39, threads 42 and
  44, basic exit reason 12 (HLT), exit qualification 0, IDT-vectoring info 0, exit
  interruption info 0, instruction_len 1.

Rules that the example cores cannot show (never_ran, protected, unreadable, no vCPUs,
port I/O and MMIO exits, event delivery) use synthetic cores from corebuilder, with the
exit record and RIP set by hand as KVM would leave them (comments at each).
"""

import copy
import json
from pathlib import Path
from typing import Any

import pytest

import corebuilder as cb
from kvmnote import schema as S
from kvmnote.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def last_exit(isa: str, reason: int, rip: int, info1: int = 0, info2: int = 0,
              intr_info: int = 0, error_code: int = 0, guest_mode: bool = False
              ) -> dict[str, Any]:
    return {"isa": isa, "exit_reason": reason, "guest_rip": rip, "info1": info1,
            "info2": info2, "intr_info": intr_info, "error_code": error_code,
            "guest_mode": guest_mode, "ts": 1}


def record(pid: int, vcpus: list[dict[str, Any]], dumped: bool = True) -> dict[str, Any]:
    return {"schema": "kvmcoredump/3", "duration": 1.5, "stopped_by": "dump",
            "lost_events": 0, "map_full_drops": 0,
            "processes": [{"pid": pid, "comm": "vmm", "dumped": dumped, "vcpus": vcpus}]}


SVM_HLT, VMX_HLT = 0x78, 12
# What the tracer saw for the example cores (derivation in the module docstring).
SVM_TRACE = record(46, [
    {"tid": 49, "vcpu_id": 0, "exits": 6, "last_exit": last_exit("svm", SVM_HLT, 0x1000)},
    {"tid": 51, "vcpu_id": 1, "exits": 2, "last_exit": last_exit("svm", SVM_HLT, 0x1000)}])
VMX_TRACE = record(39, [
    {"tid": 42, "vcpu_id": 0, "exits": 5, "last_exit": last_exit("vmx", VMX_HLT, 0x1000)},
    {"tid": 44, "vcpu_id": 1, "exits": 3, "last_exit": last_exit("vmx", VMX_HLT, 0x1000)}])
EXAMPLE = {"svm": (EXAMPLES / "svm-vmm.core.zst", SVM_TRACE),
           "vmx": (EXAMPLES / "vmx-vmm.core.zst", VMX_TRACE)}


def verify(capsys: pytest.CaptureFixture[str], tmp_path: Path, core: Path,
           trace: dict[str, Any], *opts: str) -> tuple[int, str, str]:
    """`kvmnote verify CORE --trace T`: (exit status, stdout, stderr)."""
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    rc = main(["verify", str(core), "--trace", str(path), *opts])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def mismatches(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("MISMATCH ")]


def rejects(capsys: pytest.CaptureFixture[str], tmp_path: Path, core: Path,
            trace: dict[str, Any], rule: str, *opts: str) -> list[str]:
    """Assert exit 1 with a mismatch of `rule`; return the mismatch lines."""
    rc, out, err = verify(capsys, tmp_path, core, trace, *opts)
    bad = mismatches(out)
    assert rc == 1 and err == "" and out.rstrip().endswith(f"verify: {len(bad)} mismatches")
    assert any(line.startswith(f"MISMATCH {rule}: ") for line in bad), out
    return bad


# --- traces that must pass ----------------------------------------------------------------

@pytest.mark.parametrize("isa", ["svm", "vmx"])
def test_example_core_verifies_against_what_its_vmm_did(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, isa: str) -> None:
    core, trace = EXAMPLE[isa]
    rc, out, err = verify(capsys, tmp_path, core, trace)
    assert (rc, err, mismatches(out)) == (0, "", [])
    assert out.rstrip().endswith("verify: OK")
    assert f"last exit {isa} 0x{SVM_HLT if isa == 'svm' else VMX_HLT:x} at 0x1000, " \
           f"note RIP 0x1001" in out


@pytest.mark.parametrize("isa", ["svm", "vmx"])
def test_pid_option_naming_the_core_pid_passes(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, isa: str) -> None:
    core, trace = EXAMPLE[isa]
    trace = copy.deepcopy(trace)
    other = copy.deepcopy(trace["processes"][0])
    other["pid"] += 1000          # another traced VMM in the same record
    trace["processes"].append(other)
    pid = str(trace["processes"][0]["pid"])
    assert verify(capsys, tmp_path, core, trace, "--pid", pid)[0] == 0


# --- rule "clean": lost events and map-full drops -----------------------------------------

@pytest.mark.parametrize("key", ["lost_events", "map_full_drops"])
def test_trace_with_losses_cannot_verify_clean(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str) -> None:
    core, trace = EXAMPLE["svm"]
    trace = dict(trace, **{key: 1})
    rejects(capsys, tmp_path, core, trace, "trace")


# --- rule "process" ----------------------------------------------------------------------

def test_core_of_an_untraced_process_fails(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    core, _ = EXAMPLE["svm"]
    rejects(capsys, tmp_path, core, VMX_TRACE, "process")   # pid 39 traced, core pid 46


def test_pid_option_does_not_disable_the_pid_check(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    # --pid picks traced pid 39, whose vCPUs look exactly like the core's, but the core
    # was written by pid 46.
    core, trace = EXAMPLE["svm"]
    trace = copy.deepcopy(trace)
    other = copy.deepcopy(trace["processes"][0])
    other["pid"] = 39
    trace["processes"].append(other)
    rejects(capsys, tmp_path, core, trace, "process", "--pid", "39")


# --- rule "dumped" -----------------------------------------------------------------------

def test_trace_that_did_not_see_the_dump_fails(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    core, trace = EXAMPLE["vmx"]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["dumped"] = False
    rejects(capsys, tmp_path, core, trace, "dumped")


# --- rule "ran": the vCPU set and threads -------------------------------------------------

@pytest.mark.parametrize("isa", ["svm", "vmx"])
def test_vcpu_that_ran_but_was_not_traced_fails(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, isa: str) -> None:
    core, trace = EXAMPLE[isa]
    trace = copy.deepcopy(trace)
    del trace["processes"][0]["vcpus"][1]
    bad = rejects(capsys, tmp_path, core, trace, "ran")
    assert "vcpu 1 " in bad[0]


def test_vcpu_traced_on_another_thread_fails(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    core, trace = EXAMPLE["svm"]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["vcpus"][1]["tid"] = 50      # the note says thread 51
    bad = rejects(capsys, tmp_path, core, trace, "ran")
    assert len(bad) == 2      # vCPU 1 not traced on 51; exits on 50 not in the core


def test_traced_vcpu_missing_from_the_core_fails(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    core, trace = EXAMPLE["vmx"]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["vcpus"].append(
        {"tid": 45, "vcpu_id": 2, "exits": 1, "last_exit": last_exit("vmx", VMX_HLT, 0x1000)})
    bad = rejects(capsys, tmp_path, core, trace, "ran")
    assert "vcpu 2 (thread 45)" in bad[0]


# --- synthetic cores, for statuses and exits the examples do not have ----------------------

PID = 4242


def vcpu(vcpu_id: int, vendor: int, status: int = S.KVM_CORE_VCPU_VALID,
         tid: int | None = None, rip: int = 0x1000, exit: dict[str, int] | None = None,
         error: int = 0) -> dict[str, Any]:
    v = cb.sample_vcpu(vcpu_id, vendor, tid=5000 + vcpu_id if tid is None else tid)
    v["vcpu"].update(status=status, error=error)
    v["regs"]["rip"] = rip
    if exit is not None:
        v["svm_exit" if vendor == S.KVM_CORE_VENDOR_SVM else "vmx_exit"] = exit
    return v


def synthetic_core(path: Path, vendor: int, vcpus: list[dict[str, Any]]) -> Path:
    vm = {"vm_index": 0, "vendor": vendor, "nr_vcpus": len(vcpus), "vm_type": 0,
          "flags": 0, "pid": PID, "reserved": 0}
    notes = cb.prstatus(PID) + cb.prpsinfo(PID, "vmm") + cb.siginfo(6)
    notes += cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, [])))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
                      for v in vcpus)
    cb.write_core(path, notes, [])
    return path


SVM, VMX = S.KVM_CORE_VENDOR_SVM, S.KVM_CORE_VENDOR_VMX
HLT_SVM_EXIT = {"exit_code": SVM_HLT, "exit_info_1": 0, "exit_info_2": 0, "exit_int_info": 0,
                "exit_int_info_err": 0}


def hlt_entry(vcpu_id: int, exits: int = 3) -> dict[str, Any]:
    return {"tid": 5000 + vcpu_id, "vcpu_id": vcpu_id, "exits": exits,
            "last_exit": last_exit("svm", SVM_HLT, 0x1000)}


def test_never_ran_vcpu_with_exits_fails(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    # vCPU 1 was created and never run: KVM says never_ran and knows no thread (tid 0).
    core = synthetic_core(tmp_path / "core", SVM, [
        vcpu(0, SVM, rip=0x1001, exit=HLT_SVM_EXIT),
        vcpu(1, SVM, S.KVM_CORE_VCPU_VALID | S.KVM_CORE_VCPU_NEVER_RAN, tid=0)])
    good = record(PID, [hlt_entry(0)])
    assert verify(capsys, tmp_path, core, good)[0] == 0
    bad = record(PID, [hlt_entry(0), hlt_entry(1, exits=1)])
    assert "vcpu 1 " in rejects(capsys, tmp_path, core, bad, "ran")[0]


@pytest.mark.parametrize("status,error", [
    (S.KVM_CORE_VCPU_PROTECTED, 0),
    (S.KVM_CORE_VCPU_UNREADABLE, S.KVM_CORE_ERR_BUSY)])
def test_vcpu_without_state_that_ran_verifies(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, status: int, error: int) -> None:
    # A protected (SEV-ES) or unreadable (vcpu->mutex held) vCPU that ran: its note has only
    # the VCPU record, so no exit record and no RIP, while the trace saw its exits.
    core = synthetic_core(tmp_path / "core", SVM, [
        vcpu(0, SVM, rip=0x1001, exit=HLT_SVM_EXIT), vcpu(1, SVM, status, error=error)])
    rc, out, _ = verify(capsys, tmp_path, core, record(PID, [hlt_entry(0), hlt_entry(1)]))
    assert (rc, mismatches(out)) == (0, [])
    assert "exit and RIP not compared" in out


def test_protected_vcpu_marked_never_ran_with_exits_fails(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status = S.KVM_CORE_VCPU_PROTECTED | S.KVM_CORE_VCPU_NEVER_RAN
    core = synthetic_core(tmp_path / "core", SVM, [vcpu(0, SVM, status, tid=0)])
    rejects(capsys, tmp_path, core, record(PID, [hlt_entry(0)]), "ran")


def test_core_without_vcpus_does_not_verify(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    core = synthetic_core(tmp_path / "core", SVM, [])
    rejects(capsys, tmp_path, core, record(PID, [hlt_entry(0)]), "ran")
    rejects(capsys, tmp_path, core, record(PID, [], dumped=False), "ran")


# --- rule "exit": every field of the last exit ---------------------------------------------

@pytest.mark.parametrize("isa", ["svm", "vmx"])
@pytest.mark.parametrize("field,value", [
    ("exit_reason", 0x60), ("info1", 1), ("info2", 0x1002), ("intr_info", 0x80000020),
    ("error_code", 13)])
def test_each_exit_field_is_compared(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     isa: str, field: str, value: int) -> None:
    core, trace = EXAMPLE[isa]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["vcpus"][0]["last_exit"][field] = value
    bad = rejects(capsys, tmp_path, core, trace, "exit")
    assert any(f": {field}: " in line and "vcpu 0 " in line for line in bad), bad


def test_every_mismatch_is_reported(capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    core, trace = EXAMPLE["svm"]
    trace = copy.deepcopy(trace)
    for v in trace["processes"][0]["vcpus"]:
        v["last_exit"].update(info1=7, info2=8)
    assert len(rejects(capsys, tmp_path, core, trace, "exit")) == 4


def test_exit_of_the_other_vendor_fails(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    core, trace = EXAMPLE["vmx"]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["vcpus"][0]["last_exit"]["isa"] = "svm"
    rejects(capsys, tmp_path, core, trace, "exit")


def test_svm_error_code_only_when_exit_int_info_says_so(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # An NPF taken while delivering #PF (vector 14, type exception 3<<8, error code valid
    # bit 11, valid bit 31): kvm_exit reports exit_int_info_err. For the INTR exit after it,
    # exit_int_info is 0 and KVM reports error_code 0 even though the VMCB field keeps 6.
    npf = {"exit_code": 0x400, "exit_info_1": 0x6, "exit_info_2": 0x10000000,
           "exit_int_info": 0x80000B0E, "exit_int_info_err": 6}
    intr = {"exit_code": 0x60, "exit_info_1": 0, "exit_info_2": 0, "exit_int_info": 0,
            "exit_int_info_err": 6}
    core = synthetic_core(tmp_path / "core", SVM, [vcpu(0, SVM, rip=0x2000, exit=npf),
                                                   vcpu(1, SVM, rip=0x3000, exit=intr)])
    trace = record(PID, [
        {"tid": 5000, "vcpu_id": 0, "exits": 1, "last_exit": last_exit(
            "svm", 0x400, 0x2000, 0x6, 0x10000000, 0x80000B0E, 6)},
        {"tid": 5001, "vcpu_id": 1, "exits": 1, "last_exit": last_exit("svm", 0x60, 0x3000)}])
    assert verify(capsys, tmp_path, core, trace)[0] == 0
    trace["processes"][0]["vcpus"][1]["last_exit"]["error_code"] = 6
    rejects(capsys, tmp_path, core, trace, "exit")


def test_vmx_failed_vmentry_has_no_event_fields(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    # VM-entry failure (bit 31, basic reason 33 invalid guest state): KVM's get_exit_info
    # reports info2, intr_info and error_code as 0 whatever the VMCS fields hold.
    ex = {"exit_reason": 0x80000021, "exit_qualification": 0, "idt_vectoring_info": 0x55,
          "exit_intr_info": 0x80000B0D, "exit_intr_error_code": 3}
    core = synthetic_core(tmp_path / "core", VMX, [vcpu(0, VMX, rip=0x4000, exit=ex)])
    entry = {"tid": 5000, "vcpu_id": 0, "exits": 1,
             "last_exit": last_exit("vmx", 0x80000021, 0x4000)}
    assert verify(capsys, tmp_path, core, record(PID, [entry]))[0] == 0
    entry["last_exit"]["intr_info"] = 0x80000B0D
    rejects(capsys, tmp_path, core, record(PID, [entry]), "exit")


# --- rule "rip": what KVM and user space may change after the exit -------------------------

@pytest.mark.parametrize("isa", ["svm", "vmx"])
@pytest.mark.parametrize("exit_rip", [0xFFF, 0x1002])
def test_hlt_rip_other_than_skipping_the_hlt_fails(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, isa: str, exit_rip: int) -> None:
    core, trace = EXAMPLE[isa]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["vcpus"][1]["last_exit"]["guest_rip"] = exit_rip
    bad = rejects(capsys, tmp_path, core, trace, "rip")
    assert "vcpu 1 " in bad[0]


IOIO = {"exit_code": 0x7B, "exit_info_1": 0x00F80210, "exit_info_2": 0x1002,
        "exit_int_info": 0, "exit_int_info_err": 0}   # `out %al,$0xf8` (e6 f8) at 0x1000


@pytest.mark.parametrize("note_rip,ok", [(0x1000, True), (0x1002, True), (0x1001, False),
                                         (0x1003, False)])
def test_svm_port_io_rip_is_exit_rip_or_next_rip(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path, note_rip: int,
                                                 ok: bool) -> None:
    # The VMM got KVM_EXIT_IO: RIP stays at the `out` until KVM_RUN completes the I/O, then
    # moves to exit_info_2 (the next RIP, 0x1002).
    core = synthetic_core(tmp_path / "core", SVM, [vcpu(0, SVM, rip=note_rip, exit=IOIO)])
    trace = record(PID, [{"tid": 5000, "vcpu_id": 0, "exits": 9, "last_exit": last_exit(
        "svm", 0x7B, 0x1000, 0x00F80210, 0x1002)}])
    if ok:
        assert verify(capsys, tmp_path, core, trace)[0] == 0
    else:
        rejects(capsys, tmp_path, core, trace, "rip")


@pytest.mark.parametrize("note_rip,ok", [(0x1000, True), (0x1003, True), (0x1002, False)])
def test_vmx_io_rip_uses_instruction_len(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         note_rip: int, ok: bool) -> None:
    # `out %ax,$0xf8` (66 e7 f8) at 0x1000: exit qualification port 0xf8, immediate operand
    # (bit 6), 2 bytes (size - 1 = 1); instruction_len 3.
    ex = {"exit_reason": 30, "exit_qualification": 0x00F80041, "idt_vectoring_info": 0,
          "exit_intr_info": 0, "exit_intr_error_code": 0, "instruction_len": 3}
    core = synthetic_core(tmp_path / "core", VMX, [vcpu(0, VMX, rip=note_rip, exit=ex)])
    trace = record(PID, [{"tid": 5000, "vcpu_id": 0, "exits": 9, "last_exit": last_exit(
        "vmx", 30, 0x1000, 0x00F80041)}])
    if ok:
        assert verify(capsys, tmp_path, core, trace)[0] == 0
    else:
        rejects(capsys, tmp_path, core, trace, "rip")


@pytest.mark.parametrize("note_rip,ok", [(0x1000, True), (0x1006, True), (0x100F, True),
                                         (0x1010, False), (0xFFF, False)])
def test_mmio_rip_within_one_instruction(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        note_rip: int, ok: bool) -> None:
    # NPF on an MMIO page (no memslot at 0x20000000): KVM emulates the instruction, user
    # space completes KVM_EXIT_MMIO, RIP moves past an instruction of 1..15 bytes.
    npf = {"exit_code": 0x400, "exit_info_1": 0x7, "exit_info_2": 0x20000000,
           "exit_int_info": 0, "exit_int_info_err": 0}
    core = synthetic_core(tmp_path / "core", SVM, [vcpu(0, SVM, rip=note_rip, exit=npf)])
    trace = record(PID, [{"tid": 5000, "vcpu_id": 0, "exits": 2, "last_exit": last_exit(
        "svm", 0x400, 0x1000, 0x7, 0x20000000)}])
    if ok:
        assert verify(capsys, tmp_path, core, trace)[0] == 0
    else:
        rejects(capsys, tmp_path, core, trace, "rip")


def test_interrupt_exit_leaves_rip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # A spinner (`jmp .` at 0x1103) kicked out by an interrupt (SVM INTR 0x60): nothing to skip.
    intr = {"exit_code": 0x60, "exit_info_1": 0, "exit_info_2": 0, "exit_int_info": 0,
            "exit_int_info_err": 0}
    core = synthetic_core(tmp_path / "core", SVM, [vcpu(0, SVM, rip=0x1105, exit=intr)])
    trace = record(PID, [{"tid": 5000, "vcpu_id": 0, "exits": 8,
                          "last_exit": last_exit("svm", 0x60, 0x1103)}])
    rejects(capsys, tmp_path, core, trace, "rip")


# --- missing or malformed trace fields never pass ------------------------------------------

def _drop(trace: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    trace = copy.deepcopy(trace)
    d = trace
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]
    return trace


@pytest.mark.parametrize("path", [
    ("schema",), ("lost_events",), ("map_full_drops",), ("processes",),
    ("processes", 0, "pid"), ("processes", 0, "dumped"), ("processes", 0, "vcpus"),
    ("processes", 0, "vcpus", 0, "tid"), ("processes", 0, "vcpus", 0, "vcpu_id"),
    ("processes", 0, "vcpus", 0, "exits"), ("processes", 0, "vcpus", 0, "last_exit"),
    *[("processes", 0, "vcpus", 0, "last_exit", k) for k in
      ("isa", "exit_reason", "guest_rip", "info1", "info2", "intr_info", "error_code",
       "guest_mode")]])
def test_missing_key_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 path: tuple[Any, ...]) -> None:
    core, trace = EXAMPLE["svm"]
    rc, out, err = verify(capsys, tmp_path, core, _drop(trace, path))
    assert rc == 2 and out == "" and err.startswith("kvmnote: ") and err.count("\n") == 1
    want = "not a kvmcoredump/3 record" if path == ("schema",) else f"no '{path[-1]}'"
    assert want in err, err


@pytest.mark.parametrize("bad", ["null", "true", '"1"'])
def test_wrong_type_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                bad: str) -> None:
    core, trace = EXAMPLE["svm"]
    trace = copy.deepcopy(trace)
    trace["lost_events"] = json.loads(bad)
    assert verify(capsys, tmp_path, core, trace)[0] == 2


def test_exits_without_last_exit_is_an_error(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    core, trace = EXAMPLE["svm"]
    trace = copy.deepcopy(trace)
    trace["processes"][0]["vcpus"][0]["last_exit"] = None
    assert verify(capsys, tmp_path, core, trace)[0] == 2


def test_unreadable_trace_file_is_one_line(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    core, _ = EXAMPLE["svm"]
    (tmp_path / "t").write_text("{not json")
    for path in (tmp_path / "t", tmp_path / "absent"):
        rc = main(["verify", str(core), "--trace", str(path)])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.startswith("kvmnote: ") and err.count("\n") == 1


# --- a real traced crash -------------------------------------------------------------------

TESTDATA = EXAMPLES.parent / "bpf" / "testdata"


def test_real_trace_of_a_real_crash_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    # bpf/testdata: bpf/kvmcoredump.py's record of a test VMM crashing in the emulated SVM
    # machine, and that VMM's core. The VMM's own report says which thread ran which vCPU
    # and how each stopped; the verifier must agree with the tracer on every vCPU.
    vmm = json.loads((TESTDATA / "svm-traced.vmm.json").read_text())
    trace = str(TESTDATA / "svm-traced.trace.json")
    rc = main(["verify", str(TESTDATA / "svm-traced.core.zst"), "--trace", trace])
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip().endswith("verify: OK"), out
    for v in vmm["vcpus"]:
        line = next(x for x in out.splitlines() if x.startswith(f"  vcpu {v['vcpu_id']} "))
        assert f"thread {v['tid']} " in line
        assert {"halted": "last exit svm 0x78 at 0x1000, note RIP 0x1001",
                "spinning": "last exit svm 0x60 at 0x1103, note RIP 0x1103",
                "never_ran": "never ran"}[v["kind"]] in line, line
    rc = main(["verify", str(TESTDATA / "svm-untraced.core.zst"), "--trace", trace])
    assert rc == 1 and "MISMATCH process: " in capsys.readouterr().out


# --- rule "level": nested guests (kvmcoredump/3) -------------------------------------------

def nested(vendor: int, run_pending: bool = False, guest_mode: bool = True) -> dict[str, Any]:
    """vCPU 0 of a guest that runs a nested guest, on thread 5000. In guest mode its REGS
    and exit record are L2's: halted at 0x2000 (HLT, skipped: RIP 0x2001), as KVM leaves
    them after an L2 HLT that L1 does not intercept. With nested_run_pending KVM writes no
    exit record (series v3): the VMCB/VMCS has not run L2 since L1's VM entry."""
    v = cb.nested_vcpu(0, vendor, guest_mode=guest_mode, run_pending=run_pending, tid=5000)
    v["regs"]["rip"] = 0x2001
    if vendor == SVM:
        v["svm_exit"] = HLT_SVM_EXIT
    else:
        v["vmx_exit"] = dict(v["vmx_exit"], exit_reason=VMX_HLT, exit_qualification=0,
                             idt_vectoring_info=0, exit_intr_info=0, instruction_len=1)
    if run_pending:
        v.pop("svm_exit" if vendor == SVM else "vmx_exit")
    return v


def l2_trace(isa: str, guest_mode: bool, reason: int | None = None, rip: int = 0x2000,
             schema: str = "kvmcoredump/3") -> dict[str, Any]:
    hlt = SVM_HLT if isa == "svm" else VMX_HLT
    le = last_exit(isa, hlt if reason is None else reason, rip, guest_mode=guest_mode)
    if schema == "kvmcoredump/2":
        del le["guest_mode"]
    return dict(record(PID, [{"tid": 5000, "vcpu_id": 0, "exits": 9, "last_exit": le}]),
                schema=schema)


@pytest.mark.parametrize("isa", ["svm", "vmx"])
def test_vcpu_in_l2_verifies_against_an_l2_exit(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path, isa: str) -> None:
    vendor = SVM if isa == "svm" else VMX
    core = synthetic_core(tmp_path / "core", vendor, [nested(vendor)])
    rc, out, _ = verify(capsys, tmp_path, core, l2_trace(isa, True))
    assert (rc, mismatches(out)) == (0, [])
    hlt = SVM_HLT if isa == "svm" else VMX_HLT
    assert f"last exit {isa} 0x{hlt:x} from L2 at 0x2000, note RIP 0x2001" in out
    # the same exit, but the trace saw it from L1: the note's guest mode is not borne out
    bad = rejects(capsys, tmp_path, core, l2_trace(isa, False), "level")
    assert "the note says guest mode (L2), the last kvm_exit was L1's" in bad[0]


def test_vcpu_in_l1_fails_against_an_l2_exit(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    core = synthetic_core(tmp_path / "core", SVM, [nested(SVM, guest_mode=False)])
    assert verify(capsys, tmp_path, core, l2_trace("svm", False))[0] == 0
    bad = rejects(capsys, tmp_path, core, l2_trace("svm", True), "level")
    assert "the note says L1, the last kvm_exit was L2's" in bad[0]


@pytest.mark.parametrize("isa,vmentry", [("svm", 0x80), ("vmx", 24)])   # VMRUN, VMRESUME
def test_nested_run_pending_has_no_exit_to_compare(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, isa: str,
                                                   vmentry: int) -> None:
    """L1's VM entry was emulated, L2 not entered yet: the last exit is L1's (its VMRUN /
    VMRESUME, at an L1 RIP), the note's REGS are L2's and it has no exit record."""
    vendor = SVM if isa == "svm" else VMX
    core = synthetic_core(tmp_path / "core", vendor, [nested(vendor, run_pending=True)])
    rc, out, _ = verify(capsys, tmp_path, core, l2_trace(isa, False, vmentry, 0x401D20))
    assert (rc, mismatches(out)) == (0, [])
    assert "nested_run_pending: no exit record, exit and RIP not compared" in out
    bad = rejects(capsys, tmp_path, core, l2_trace(isa, True), "level")
    assert "nested_run_pending (L2 not entered since L1's VM entry), but the last " \
        "kvm_exit was L2's" in bad[0]


def test_a_v2_trace_does_not_say_the_level(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    """kvmcoredump/2 (before the nested work) has no guest_mode: the level rule is not
    applied, the others are."""
    core = synthetic_core(tmp_path / "core", SVM, [nested(SVM)])
    rc, out, _ = verify(capsys, tmp_path, core, l2_trace("svm", False, schema="kvmcoredump/2"))
    assert (rc, mismatches(out)) == (0, []) and "from L" not in out
    rejects(capsys, tmp_path, core, l2_trace("svm", False, rip=0x2100,
                                             schema="kvmcoredump/2"), "rip")
