"""`kvmnote verify CORE --trace FILE`: hold a core's KVM notes against a kvmcoredump trace.

The trace (schema kvmcoredump/3, written by bpf/kvmcoredump.py -j; /2 is read too) is what
the kernel's `kvm:kvm_exit` tracepoint showed while the VMM ran: per process, per (vCPU
thread, vcpu_id), the number of exits and the last exit's reason, info1/info2, intr_info,
error_code and guest RIP, and (/3) whether it was a nested guest's exit (`kvm:kvm_nested_vmexit`
followed it). That is evidence independent of the notes, which KVM writes from the VMCS/VMCB
and its register cache at dump time. The rules (bpf/README.md lists them with their tests):

  clean     the record lost no perf events and dropped no map update (a map was full);
  process   the core was written by the traced process; --pid names the traced process
            and must still be the core's pid;
  dumped    the trace saw this process dump core (kvm:kvm_coredump_vcpu, used only for
            timing: the trace ran until the dump, so its last exits are the last ones);
  ran       a vCPU ran (its note lacks never_ran) iff exits were traced for it on the
            thread its note names (`tid`); never_ran means no exits on any thread; exits
            traced for a vcpu_id/thread that is not in the core are a mismatch (so a core
            with no vCPUs never verifies against a trace with exits);
  exit      for a vCPU with state (valid): the last traced exit's isa, reason, info1, info2,
            intr_info and error_code equal what the tracepoint derives from the note's exit
            record (SVM: exit_code low 32 bits, exit_info_1, exit_info_2, exit_int_info,
            exit_int_info_err if valid; VMX: exit_reason, exit_qualification,
            idt_vectoring_info, exit_intr_info, exit_intr_error_code if delivered);
  rip       the note's RIP is the exit's guest RIP, or past the exiting instruction when
            KVM or the completion of user space's I/O skipped it (RIP_AFTER_EXIT below);
  level     (/3) a vCPU whose note says guest mode exited last from its nested guest (L2),
            one without from L1; both the note's REGS and exit record are then the
            level's. With nested_run_pending (the VM entry to L2 not done yet) the note has
            no exit record: the last exit must be L1's, exit and RIP are not compared;
  no-state  a protected or unreadable vCPU has no state in its note: only `ran` applies.

Anything missing from the trace is an error (exit 2), never a pass; every mismatch is
reported (exit 1).
"""

import argparse
import json
from dataclasses import dataclass
from typing import Any

from . import schema as S
from .core import Core, open_core
from .errors import KvmnoteError

SCHEMA = "kvmcoredump/3"
SCHEMAS = ("kvmcoredump/2", SCHEMA)     # /2: no guest_mode, the level rule is not applied
MAX_INSN_LEN = 15           # x86 architectural maximum
INFO_VALID_ERR = 0x80000800  # valid (bit 31) + error code valid/delivered (bit 11), both ISAs

# RIP_AFTER_EXIT: exits after which the note's RIP may be past the exiting instruction (KVM
# skipped it before returning to user space, e.g. HLT, or user space completed the I/O or
# MMIO and KVM_RUN skipped it). SVM: fixed encodings, without redundant prefixes (a guest
# padding such an instruction with prefixes is reported); IOIO's exit_info_2 is the next
# RIP. VMX: the note's instruction_len. MMIO (SVM NPF, VMX EPT violation/misconfig): the
# emulated instruction is 1..15 bytes, and neither the trace nor the note says which.
SVM_INSN_LEN = {0x6e: 2, 0x6f: 2, 0x72: 2, 0x76: 2, 0x78: 1, 0x7c: 2, 0x81: 3, 0x87: 3,
                0x89: 2, 0x8a: 3, 0x8b: 3, 0x8d: 3}   # RDTSC RDPMC CPUID INVD HLT MSR
#                 VMMCALL RDTSCP WBINVD MONITOR MWAIT XSETBV
SVM_EXIT_IOIO, SVM_EXIT_NPF = 0x7b, 0x400
VMX_INSN_EXITS = {10, 12, 13, 15, 16, 18, 30, 31, 32, 36, 39, 51, 54, 55}  # CPUID HLT INVD
#                 RDPMC RDTSC VMCALL IO MSR_READ MSR_WRITE MWAIT MONITOR RDTSCP WBINVD XSETBV
VMX_MMIO_EXITS = {48, 49}   # EPT_VIOLATION, EPT_MISCONFIG
LAST_EXIT_KEYS = ("exit_reason", "info1", "info2", "intr_info", "error_code", "guest_rip")


@dataclass
class Traced:
    """One (thread, vcpu_id) of the traced process."""

    tid: int
    vcpu_id: int
    exits: int
    last_exit: dict[str, Any] | None


def _get(d: Any, key: str, where: str, kind: type | tuple[type, ...] = int) -> Any:
    """d[key], which must exist and be of `kind` (bool is not an int here)."""
    if not isinstance(d, dict) or key not in d:
        raise KvmnoteError(f"{where}: no '{key}'")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise KvmnoteError(f"{where}: '{key}' is {v!r}")
    return v


def load_trace(path: str) -> dict[str, Any]:
    """The kvmcoredump/2 or /3 record in `path`."""
    try:
        with open(path) as f:
            trace = json.load(f)
    except (OSError, ValueError) as e:
        raise KvmnoteError(f"{path}: {e}") from None
    if not isinstance(trace, dict) or trace.get("schema") not in SCHEMAS:
        raise KvmnoteError(f"{path}: not a {SCHEMA} record (bpf/kvmcoredump.py -j)")
    return trace


def _traced(proc: dict[str, Any], where: str, l2_traced: bool) -> list[Traced]:
    out = []
    for i, e in enumerate(_get(proc, "vcpus", where, list)):
        w = f"{where}: vcpus[{i}]"
        t = Traced(_get(e, "tid", w), _get(e, "vcpu_id", w), _get(e, "exits", w),
                   _get(e, "last_exit", w, (dict, type(None))))
        if (t.exits > 0) != (t.last_exit is not None):
            raise KvmnoteError(f"{w}: {t.exits} exits but last_exit {t.last_exit!r}")
        if t.last_exit is not None:
            _get(t.last_exit, "isa", f"{w}: last_exit", str)
            for k in LAST_EXIT_KEYS:
                _get(t.last_exit, k, f"{w}: last_exit")
            if l2_traced:
                _get(t.last_exit, "guest_mode", f"{w}: last_exit", bool)
        out.append(t)
    return out


def expected_exit(vendor: int, rec: dict[str, Any]) -> dict[str, int]:
    """What kvm_exit's fields are for the exit in the note's record (arch get_exit_info)."""
    if vendor == S.KVM_CORE_VENDOR_SVM:
        intr = rec["exit_int_info"]
        return {"exit_reason": rec["exit_code"] & 0xFFFFFFFF, "info1": rec["exit_info_1"],
                "info2": rec["exit_info_2"], "intr_info": intr,
                "error_code": rec["exit_int_info_err"]
                if intr & INFO_VALID_ERR == INFO_VALID_ERR else 0}
    failed = rec["exit_reason"] & (1 << 31)   # VM-entry failure: the rest is not read
    intr = 0 if failed else rec["exit_intr_info"]
    return {"exit_reason": rec["exit_reason"], "info1": rec["exit_qualification"],
            "info2": 0 if failed else rec["idt_vectoring_info"], "intr_info": intr,
            "error_code": rec["exit_intr_error_code"]
            if intr & INFO_VALID_ERR == INFO_VALID_ERR else 0}


def rip_allowed(vendor: int, rec: dict[str, Any], le: dict[str, Any]) -> tuple[set[int], str]:
    """RIPs the note may hold after the traced last exit `le`, and the rule's name."""
    rip, reason = le["guest_rip"], le["exit_reason"]
    if vendor == S.KVM_CORE_VENDOR_SVM:
        if reason == SVM_EXIT_IOIO:
            return {rip, le["info2"]}, "IOIO: exit RIP, or exit_info_2 (next RIP)"
        if reason in SVM_INSN_LEN:
            return {rip, rip + SVM_INSN_LEN[reason]}, \
                f"exit RIP, or +{SVM_INSN_LEN[reason]} (instruction skipped)"
        mmio = reason == SVM_EXIT_NPF
    else:
        if reason & 0xFFFF in VMX_INSN_EXITS:
            return {rip, rip + rec["instruction_len"]}, \
                f"exit RIP, or +instruction_len {rec['instruction_len']}"
        mmio = reason & 0xFFFF in VMX_MMIO_EXITS
    if mmio:
        return set(range(rip, rip + MAX_INSN_LEN + 1)), "MMIO: exit RIP, or up to +15"
    return {rip}, "exit RIP (no instruction to skip)"


def _names(status: int) -> str:
    return ",".join(n for b, n in S.STATUS_NAMES.items() if status & b) or "-"


def compare(core: Core, trace: dict[str, Any], pid: int | None = None,
            where: str = "trace") -> tuple[list[str], list[str]]:
    """(one line per vCPU, one line per mismatch) for `core` against `trace`."""
    lines: list[str] = []
    bad: list[str] = []
    lost, drops = _get(trace, "lost_events", where), _get(trace, "map_full_drops", where)
    if lost or drops:
        bad.append(f"trace: {lost} perf events lost and {drops} map updates dropped (map "
                   f"full): an incomplete trace cannot verify clean")
    procs = {}
    for i, p in enumerate(_get(trace, "processes", where, list)):
        procs[_get(p, "pid", f"{where}: processes[{i}]")] = (i, p)
    if core.pid is None:
        raise KvmnoteError(f"{core.path}: no process id in the core (NT_PRPSINFO)")
    if pid is not None and pid != core.pid:
        bad.append(f"process: --pid {pid}, but the core was written by pid {core.pid}")
    want = core.pid if pid is None else pid
    if want not in procs:
        bad.append(f"process: pid {want} is not in the trace (traced: {sorted(procs)})")
        return lines, bad
    i, proc = procs[want]
    w = f"{where}: processes[{i}]"
    traced = _traced(proc, w, trace["schema"] != "kvmcoredump/2")
    if core.vcpus and not _get(proc, "dumped", w, bool):
        bad.append(f"dumped: the trace did not see pid {want} dump core; it may have ended "
                   f"before the vCPUs' last exits")
    claimed: set[int] = set()
    no_state = []
    for v in core.vcpus:
        st, tid = v.info["status"], v.info["tid"]
        name = f"vcpu {v.vcpu_id} (VM {v.vm_index}, thread {tid})"
        mine = [j for j, t in enumerate(traced) if (t.vcpu_id, t.tid) == (v.vcpu_id, tid)]
        claimed.update(mine)
        t = traced[mine[0]] if mine else None
        exits = t.exits if t else 0
        head = f"vcpu {v.vcpu_id:<3} VM {v.vm_index} thread {tid:<7} {_names(st):<16} " \
               f"exits {exits:<7}"
        if len(mine) > 1:
            bad.append(f"{name}: {len(mine)} trace entries for this thread and vcpu_id")
        if st & S.KVM_CORE_VCPU_NEVER_RAN:
            if exits:
                bad.append(f"ran: {name}: the note says never ran, but {exits} exits traced")
            lines.append(head + "never ran")
            continue
        if not st & S.KVM_CORE_VCPU_VALID:
            no_state.append(v)
            lines.append(head + "no state in the note: exit and RIP not compared")
            continue
        if not t or not t.last_exit:
            bad.append(f"ran: {name}: ran (the note lacks never_ran), but no kvm_exit "
                       f"traced on thread {tid}")
            lines.append(head)
            continue
        lines.append(head + _check_exit(v, t.last_exit, name, bad))
    for j, t in enumerate(traced):
        if j in claimed or not t.exits:
            continue
        if any(v.vcpu_id == t.vcpu_id for v in no_state):
            continue   # its own rule: a protected/unreadable vCPU may have run on any thread
        same = ", ".join("VM %d thread %d %s" % (v.vm_index, v.info["tid"],
                                                  _names(v.info["status"]))
                         for v in core.vcpus if v.vcpu_id == t.vcpu_id)
        bad.append(f"ran: vcpu {t.vcpu_id} (thread {t.tid}): {t.exits} exits traced, but "
                   f"the core has no vCPU {t.vcpu_id} last run by thread {t.tid}" +
                   (f" (the core's vCPU {t.vcpu_id}: {same})" if same else ""))
    if not core.vcpus and not any(t.exits for t in traced):
        bad.append(f"ran: the core has no vCPU notes and the trace no exits for pid {want}: "
                   f"nothing to verify")
    return lines, bad


def _check_exit(v: Any, le: dict[str, Any], name: str, bad: list[str]) -> str:
    """Compare the last traced exit with the note's exit record and RIP; describe it."""
    vendor = v.info["vendor"]
    isa = S.VENDOR_NAMES.get(vendor, f"vendor {vendor}")
    if le["isa"] != isa:
        bad.append(f"exit: {name}: the note is {isa}, the traced exit {le['isa']}")
        return ""
    in_l2 = bool(v.info["status"] & S.KVM_CORE_VCPU_GUEST_MODE)
    traced_l2 = le.get("guest_mode")          # None: a /2 trace, which does not say
    level = "" if traced_l2 is None else f" from L{2 if traced_l2 else 1}"
    nested = v.records.get("nested")
    if nested and nested["flags"] & S.KVM_STATE_NESTED_RUN_PENDING:
        if traced_l2:
            bad.append(f"level: {name}: nested_run_pending (L2 not entered since L1's VM "
                       f"entry), but the last kvm_exit was L2's")
        return f"last exit {isa} 0x{le['exit_reason']:x}{level} at 0x{le['guest_rip']:x}; " \
               f"nested_run_pending: no exit record, exit and RIP not compared"
    if traced_l2 is not None and traced_l2 != in_l2:
        bad.append(f"level: {name}: the note says {'guest mode (L2)' if in_l2 else 'L1'}, "
                   f"the last kvm_exit was L{2 if traced_l2 else 1}'s")
    rec = v.records.get(f"{isa}_exit")
    regs = v.records.get("regs")
    if rec is None or regs is None:
        bad.append(f"exit: {name}: valid, but the note has no {'regs' if rec else isa + '_exit'}"
                   f" record")
        return ""
    for k, want in expected_exit(vendor, rec).items():
        if le[k] != want:
            bad.append(f"exit: {name}: {k}: note 0x{want:x}, last kvm_exit 0x{le[k]:x}")
    allowed, rule = rip_allowed(vendor, rec, le)
    if regs["rip"] not in allowed:
        bad.append(f"rip: {name}: note 0x{regs['rip']:x}, last kvm_exit at "
                   f"0x{le['guest_rip']:x} (reason 0x{le['exit_reason']:x}); allowed: {rule}")
    return f"last exit {isa} 0x{le['exit_reason']:x}{level if in_l2 or traced_l2 else ''} " \
           f"at 0x{le['guest_rip']:x}, note RIP 0x{regs['rip']:x}"


def _run(args: argparse.Namespace) -> int:
    """`kvmnote verify`."""
    trace = load_trace(args.trace)
    with open_core(args.core) as core:
        lines, bad = compare(core, trace, args.pid, args.trace)
        n = len(core.vcpus)
    print(f"core {args.core} (pid {core.pid}, {n} vCPUs) against trace {args.trace}")
    for line in lines:
        print("  " + line)
    for line in bad:
        print("MISMATCH " + line)
    print("verify: " + (f"{len(bad)} mismatches" if bad else "OK"))
    return 1 if bad else 0


EPILOG = """examples:
  kvmcoredump -p 1234 --exit-on-dump -j trace.json    # bpf/kvmcoredump.py, as root
  kvmnote verify core.1234 --trace trace.json
  kvmnote verify --pid 1234 core.1234.zst --trace trace.json

exit status: 0 the notes agree with the trace; 1 a mismatch (each on a MISMATCH line);
2 error (an input cannot be read, or the trace lacks a field)
"""


def add_parser(sub: Any) -> None:
    """Register `verify` with the CLI's subparsers."""
    p = sub.add_parser("verify", help="check a core's notes against a kvmcoredump trace",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("core", help="VMM core file (plain, or zstd/lz4/xz compressed)")
    p.add_argument("--trace", required=True, metavar="FILE",
                   help="bpf/kvmcoredump.py's JSON record (-j FILE)")
    p.add_argument("--pid", type=int, help="the traced process to compare (default: the "
                   "core's pid; must be the core's pid)")
    p.set_defaults(func=_run)
