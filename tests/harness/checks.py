"""The checks every backend's cores go through: the KVM notes (read by `kvmnote read
--json`) against (1) what the VMM was told to set (expected.py, independent of the C
code), (2) what KVM's ioctls returned in the VMM (its side report) and (3) the core's
own NT_PRPSINFO/NT_PRSTATUS. Records the checks do not know (newer note formats)
are ignored, never an error."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kvmnote import decode as D
from kvmnote import schema as S
from kvmnote.vmcore import write_vmcore
from testlib import need

from . import corefile
from . import expected as X
from .kvmnote_read import notes as decoded_notes
from .kvmnote_read import read as kvmnote_read
from .scenarios import BY_NAME, SIGNAL

EXIT_STATUS = {"abort": 134, "segv": 139, "external": 139}
IGNORED = {"reserved", "reserved2", "pad", "padding"}


def ctx(boot, scenario=None) -> str:
    s = f"\n{boot.context()}"
    if scenario:
        s += f"\n--- scenario {scenario} ---\n{boot.scenario_log(scenario)}"
        out = boot.file(scenario, "stdout")
        if out:
            s += f"\n--- vmm output ---\n{out.decode(errors='replace')[-2000:]}"
    return s


def process_ids(core: corefile.Core) -> tuple[int | None, list[int]]:
    """(NT_PRPSINFO pr_pid, [NT_PRSTATUS pr_pid of each thread]), as the core says."""
    notes = core.notes()
    ps = [n.desc for n in notes if n.name == "CORE" and n.type == S.NT_PRPSINFO]
    pid = int.from_bytes(ps[0][24:28], "little", signed=True) if ps else None
    tids = [int.from_bytes(n.desc[32:36], "little", signed=True) for n in notes
            if n.name == "CORE" and n.type == S.NT_PRSTATUS]
    return pid, tids


def scenario_files(boot, name):
    """(report dict, core path) of a scenario that ran as intended."""
    spec = BY_NAME[name]
    c = ctx(boot, name)
    rc = boot.file(name, "rc")
    assert rc is not None, f"{name}: no rc came back{c}"
    assert int(rc) == EXIT_STATUS[spec.crash], \
        f"{name}: vmm exit status {int(rc)}, want {EXIT_STATUS[spec.crash]}{c}"
    rep = boot.file(name, "report.json")
    assert rep is not None, f"{name}: no side report{c}"
    report = json.loads(rep)
    assert not report.get("timed_out"), f"{name}: vCPUs never reached the stop point{c}"
    for v in report.get("vcpus", []):
        if v["kind"] == "halted":
            assert v["exit_reason"] == 5, \
                f"{name}: vcpu {v['vcpu_id']} exit {v['exit_reason']}, want KVM_EXIT_HLT{c}"
        if v["kind"] in ("spinning", "stuck"):
            assert v["flag"] == 1, f"{name}: vcpu {v['vcpu_id']} never spun{c}"
    core = boot.path(name, "core")
    assert core.exists(), f"{name}: no core file came back{c}"
    if spec.notes != "truncated":
        si = [n for n in corefile.Core(core.read_bytes()).notes()
              if n.name == "CORE" and n.type == S.NT_SIGINFO]
        signo = int.from_bytes(si[0].desc[:4], "little") if si else None
        assert signo == SIGNAL[spec.crash], f"{name}: core signal {signo}{c}"
    return report, core


def check_sregs(got, mode, where, xsave=True):
    want = X.sregs(mode, xsave)
    for seg in X.SEG_NAMES:
        for k, v in want[seg].items():
            if mode in ("real", "smm") and (seg, k) == ("cs", "type"):
                # real-mode CS attributes carry no meaning: the VMX VM exit
                # (Bochs) stores CS as a data segment (type 3), as SMM entry sets it.
                assert got[seg][k] in X.REAL_CS_TYPES, f"{where}: cs.type {got[seg][k]}"
                continue
            assert got[seg][k] == v, f"{where}: {seg}.{k} = {got[seg][k]:#x}, want {v:#x}"
    for k in ("gdt", "idt"):
        assert (got[k]["base"], got[k]["limit"]) == (want[k]["base"], want[k]["limit"]), \
            f"{where}: {k} {got[k]} want {want[k]}"
    for k in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        assert got[k] == want[k], f"{where}: {k} = {got[k]:#x}, want {want[k]:#x}"


def check_ioctl_matches_intent(boot, name):
    """The VMM's own state is what it meant to set (independent of the series)."""
    spec = BY_NAME[name]
    report, _ = scenario_files(boot, name)
    for v in report["vcpus"]:
        if v["ioctl"] is None:
            continue
        vid, st = v["vcpu_id"], v["ioctl"]
        mode = spec.mode_of(vid)
        where = f"{boot.backend} {name} vcpu {vid} (ioctl)"
        assert st["regs"] == X.regs(mode, vid, v["kind"]), where
        check_sregs(st["sregs"], mode, where, report.get("xsave", True))
        assert st["debugregs"]["db"] == X.debugregs(vid, mode)["db"], where
        assert st["debugregs"]["dr7"] == X.debugregs(vid, mode)["dr7"], where
        if report.get("xsave", True):
            assert {"xcr": 0, "value": X.XCR0} in st["xcrs"], where
        got = {m["index"]: m["value"] for m in st["msrs"]}
        for idx, val in X.msrs(mode, vid).items():
            assert got.get(idx) == val, f"{where}: MSR {idx:#x} = {got.get(idx)!r}, want {val:#x}"


def exit_ok(vendor, kind, ex, mode="long"):
    """(ok, why) of a last-exit record for a vCPU of this kind, on this vendor."""
    if vendor == "vmx":
        if ex["type"] != "vmx":
            return False, f"exit record {ex['type']}, want vmx"
        reason = ex["exit_reason"] & 0xffff
        if kind == "halted" and mode == "real" and reason == X.VMX_EXIT_EXCEPTION_NMI:
            return (ex["exit_intr_info"] & 0x800007ff) == (0x80000300 | X.GP_VECTOR), \
                f"real mode: EXCEPTION_NMI with intr_info {ex['exit_intr_info']:#x}, want #GP"
        if kind == "halted":
            return reason == X.VMX_EXIT_HLT, f"exit_reason {ex['exit_reason']:#x}, want 12 (HLT)"
        return reason in X.VMX_SPIN_EXITS, \
            f"exit_reason {ex['exit_reason']:#x}, want one of {X.VMX_SPIN_EXITS}"
    if ex["type"] != "svm":
        return False, f"exit record {ex['type']}, want svm"
    if kind == "halted":
        return ex["exit_code"] == X.SVM_EXIT_HLT, f"exit_code {ex['exit_code']:#x}, want 0x78 (HLT)"
    return ex["exit_code"] in X.SVM_SPIN_EXITS, \
        f"exit_code {ex['exit_code']:#x}, want one of {[hex(c) for c in X.SVM_SPIN_EXITS]}"


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in IGNORED}
    return d


def check_extra_records(n, st, where):
    """vcpu_events, XSAVE, LAPIC (and CPUID when the note has it) against the VMM's own
    KVM_GET_VCPU_EVENTS, KVM_GET_XSAVE2, KVM_GET_LAPIC and KVM_GET_CPUID2."""
    events = _strip(S.parse(S.kvm_vcpu_events, bytes.fromhex(st["events_hex"])))
    assert "events" in n, f"{where}: no vcpu_events record"
    got = _strip(n["events"])
    for k, v in events.items():
        assert got.get(k) == v, f"{where}: events.{k} = {got.get(k)}, KVM_GET_VCPU_EVENTS {v}"
    xsave = bytes.fromhex(st["xsave_hex"])
    assert "xsave" in n, f"{where}: no XSAVE record"
    want = D.xsave(xsave)
    for k in ("xstate_bv", "xcomp_bv", "mxcsr", "fcw", "fsw"):
        assert n["xsave"][k] == want[k], \
            f"{where}: xsave.{k} = {n['xsave'][k]:#x}, KVM_GET_XSAVE2 {want[k]:#x}"
    if st.get("lapic_hex"):
        assert "lapic" in n, f"{where}: in-kernel LAPIC but no LAPIC record"
        assert n["lapic"]["regs_hex"] == st["lapic_hex"], f"{where}: LAPIC != KVM_GET_LAPIC"
    if isinstance(n.get("cpuid"), (list, dict)):
        entries = n["cpuid"] if isinstance(n["cpuid"], list) else n["cpuid"].get("entries", [])
        key = ("function", "index", "eax", "ebx", "ecx", "edx")
        got_c = sorted(tuple(e[k] for k in key) for e in entries)
        want_c = sorted(tuple(e[k] for k in key) for e in st["cpuid"])
        assert got_c == want_c, f"{where}: CPUID record != KVM_GET_CPUID2"


def _vm_of(vm_note, report):
    """Index of the report's VM whose memslots the VM note maps."""
    addrs = {s["userspace_addr"] for s in vm_note["memslots"]}
    for k, rvm in enumerate(report.get("vms") or [{"memslots": report["memslots"]}]):
        if {s["userspace_addr"] for s in rvm["memslots"]} == addrs:
            return k
    raise AssertionError(f"VM note {vm_note['vm_index']}: memslots match none of the VMM's VMs")


def check_positive(boot, name):
    spec = BY_NAME[name]
    vendor = boot.vendor
    report, core_path = scenario_files(boot, name)
    notes = decoded_notes(core_path)
    where0 = f"{boot.backend} {name}"
    c = ctx(boot, name)
    core = corefile.Core(core_path.read_bytes())

    # The process, as the core's own notes name it (the VMM's pid namespace).
    pid, tids = process_ids(core)
    assert pid == report["pid"], f"{where0}: NT_PRPSINFO pid {pid}, the VMM says {report['pid']}"

    assert len(notes["vms"]) == spec.vms, f"{where0}: {len(notes['vms'])} VM notes{c}"
    seen = set()
    for vm in notes["vms"]:
        k = _vm_of(vm, report)
        assert k not in seen, f"{where0}: two VM notes for the VMM's VM {k}"
        seen.add(k)
        w = f"{where0} VM {k}"
        assert vm["vendor"] == vendor, f"{w}: VM vendor {vm['vendor']}, the CPU has {vendor}"
        assert vm["nr_vcpus"] == len(spec.kinds), f"{w}: nr_vcpus {vm['nr_vcpus']}"
        assert vm["pid"] == report["pid"], f"{w}: VM pid {vm['pid']} want {report['pid']}"
        rslots = (report.get("vms") or [{"memslots": report["memslots"]}])[k]["memslots"]
        intent = X.memslots(bool(spec.smm))
        told = [(s["as_id"], s["slot"], s["flags"], s["guest_phys_addr"], s["memory_size"])
                for s in rslots]
        assert told == intent, f"{w}: the VMM reports memslots {told}, want {intent}"
        got_slots = sorted((s["as_id"], s["slot"], s["flags"], s["guest_phys_addr"],
                            s["memory_size"], s["userspace_addr"]) for s in vm["memslots"])
        want_slots = sorted((*x, r["userspace_addr"]) for x, r in zip(intent, rslots))
        assert got_slots == want_slots, f"{w}: memslots\n got {got_slots}\nwant {want_slots}"
        assert vm["nr_memslots"] == len(intent)
        for sl, _, gpa, size in X.PATTERN_SLOTS:
            data = corefile.guest_read(core, vm["memslots"], gpa, size)
            assert data is not None, f"{w}: slot {sl} (GPA {gpa:#x}) not in the core"
            want = b"".join(X.slot_pattern(sl, o).to_bytes(8, "little") for o in range(0, size, 8))
            assert data == want, f"{w}: slot {sl} memory differs from the pattern"
        assert corefile.guest_read(core, vm["memslots"], X.GPA_HLT, 1) == b"\xf4"
        if spec.smm:
            check_smram(core, vm["memslots"], w)
        vcpus = [v for v in notes["vcpus"] if v["vm_index"] == vm["vm_index"]]
        rep = {v["vcpu_id"]: v for v in report["vcpus"] if v.get("vm", 0) == k}
        check_vcpus(boot, spec, vm, vcpus, rep, core, tids, w, report.get("xsave", True))
    return notes


# The AMD64 SMM state-save map (AMD APM vol. 2, table 10-2), which KVM writes for a
# vCPU with long mode in its CPUID: offsets from SMBASE, 8 bytes each.
SMRAM_SAVE = {"efer": (0xFED0, 8), "smbase": (0xFF00, 4), "cr3": (0xFF50, 8),
              "rip": (0xFF78, 8)}


def check_smram(core, memslots, where):
    """SMRAM as address space 1 maps it: the handler the VMM put there, the flag the
    handler set (so the vCPU ran it from address space 1), the state KVM saved on the
    SMI (vCPU 0 took it before its first instruction: at GPA_HLT, in long mode).
    Address space 0 has no memory there."""
    smram = [s for s in memslots if s["as_id"] == 1]
    base = X.SMBASE

    def rd(off, n):
        return corefile.guest_read(core, smram, base + off, n, as_id=1)
    assert rd(0x8000, len(X.SMM_HANDLER)) == X.SMM_HANDLER, \
        f"{where}: SMRAM (as_id 1) at {base + 0x8000:#x} is not the SMM handler"
    assert rd(X.SMM_FLAG - base, 1) == b"\x01", f"{where}: the SMM handler never ran"
    saved = {k: int.from_bytes(rd(off, n) or b"", "little") for k, (off, n) in SMRAM_SAVE.items()}
    want = {"efer": X.sregs("long")["efer"], "smbase": base, "cr3": X.sregs("long")["cr3"],
            "rip": X.GPA_HLT}
    assert saved == want, \
        f"{where}: SMM state-save area {saved}, want {want}"
    assert corefile.guest_read(core, memslots, X.SMM_FLAG, 1) is None, \
        f"{where}: SMRAM readable through address space 0"


def check_vmcore_leaves_out_smram(core_path, where):
    """`kvmnote vmcore` writes address space 0 only and says what it left out."""
    with tempfile.TemporaryDirectory() as d:
        res = write_vmcore(str(core_path), str(Path(d) / "vmcore"))
    ram = sorted(res.ram)
    want = sorted((gpa, size) for _, _, gpa, size in X.MEMSLOTS)
    assert ram == want, f"{where}: vmcore RAM {ram}, want the as_id 0 slots {want}"
    text = "\n".join(res.warnings)
    assert "address space 1" in text and "in SMM" in text, \
        f"{where}: vmcore warnings do not mention SMRAM and the vCPU in SMM: {res.warnings}"


def check_vcpus(boot, spec, vm, vcpus, rep, core, tids, where0, xsave=True):
    # Each vCPU once (dup'ed fds, closed fds, foreign fds not written)
    ids = [v["vcpu_id"] for v in vcpus]
    assert sorted(ids) == list(range(len(spec.kinds))), f"{where0}: vcpu ids {ids}"
    byid = {v["vcpu_id"]: v for v in vcpus}
    for vid, kind in enumerate(spec.kinds):
        n, r = byid[vid], rep[vid]
        mode = spec.mode_of(vid)
        where = f"{where0} vcpu {vid} ({kind}{', in SMM' if mode == 'smm' else ''})"
        assert n["vendor"] == boot.vendor, f"{where}: vendor {n['vendor']}"
        assert n["vcpu_idx"] == vid, f"{where}: vcpu_idx {n['vcpu_idx']}"
        status = set(n["status"])
        if kind == "stuck":
            assert "unreadable" in status and "valid" not in status and n["error"] == "busy", \
                f"{where}: status {n['status']} error {n['error']}, want unreadable/busy"
            assert not n.get("regs"), f"{where}: registers written for a busy vCPU"
            continue
        want_status = {"valid", "never_ran"} if kind == "never_ran" else {"valid"}
        assert status == want_status, f"{where}: status {n['status']}, want {sorted(want_status)}"
        assert n["error"] is None, f"{where}: error {n['error']}"
        if kind != "never_ran":
            assert n["tid"] == r["tid"], f"{where}: tid {n['tid']}, want {r['tid']}"
            assert n["tid"] in tids, f"{where}: tid {n['tid']} is no thread of the core {tids}"
        # 1. intended values
        for k, v in X.regs(mode, vid, kind).items():
            assert n["regs"][k] == v, f"{where}: {k} = {n['regs'][k]:#x}, want {v:#x}"
        check_sregs(n["sregs"], mode, where, xsave)
        dregs = X.debugregs(vid, mode)
        assert n["debugregs"]["db"] == dregs["db"], f"{where}: db {n['debugregs']}"
        assert n["debugregs"]["dr7"] == dregs["dr7"], f"{where}: dr7 {n['debugregs']}"
        if spec.smm:
            smi = n["events"]["smi"]
            assert (smi["smm"], smi["pending"]) == (int(mode == "smm"), 0) and \
                n["events"]["flags"] & S.KVM_VCPUEVENT_VALID_SMM, \
                f"{where}: vcpu_events smi {smi}, flags {n['events']['flags']:#x}"
        got_msrs = {m["index"]: m["value"] for m in n["msrs"]}
        for idx, val in X.msrs(mode, vid).items():
            assert got_msrs.get(idx) == val, \
                f"{where}: MSR {idx:#x} = {got_msrs.get(idx)!r}, want {val:#x}"
        assert got_msrs.get(X.MSR["APIC_BASE"]) == n["sregs"]["apic_base"], where
        # 2. what KVM's ioctls returned in the VMM
        st = r["ioctl"]
        if st is not None:
            assert n["regs"] == st["regs"], f"{where}: regs differ from KVM_GET_REGS"
            for k, v in st["sregs"].items():
                assert n["sregs"][k] == v, f"{where}: sregs.{k} {n['sregs'][k]} != ioctl {v}"
            for k in ("db", "dr6", "dr7"):
                assert n["debugregs"][k] == st["debugregs"][k], f"{where}: debugregs.{k}"
            assert n["mp_state"] == st["mp_state"], f"{where}: mp_state"
            if st["xcrs"]:
                assert {"xcr": 0, "value": X.XCR0} in [{"xcr": x["xcr"], "value": x["value"]}
                                                      for x in n["xcrs"]], f"{where}: xcrs"
            for m in st["msrs"]:
                if m["index"] in got_msrs:
                    assert got_msrs[m["index"]] == m["value"], \
                        f"{where}: MSR {m['index']:#x} {got_msrs[m['index']]:#x} != ioctl {m['value']:#x}"
            missing = [hex(m["index"]) for m in st["msrs"] if m["index"] not in got_msrs]
            assert not missing, f"{where}: MSRs readable by ioctl missing from the note: {missing}"
            check_extra_records(n, st, where)
        # 3. the last VM exit, as the detected vendor writes it
        if kind != "never_ran":
            assert n.get("exit"), f"{where}: no last-exit record"
            ok, why = exit_ok(boot.vendor, kind, n["exit"], mode)
            assert ok, f"{where}: {why}"
        if kind in ("spinning", "stuck"):
            flag = corefile.guest_read(core, vm["memslots"], X.GPA_FLAGS + 8 * vid, 8)
            assert flag == (1).to_bytes(8, "little"), f"{where}: spinner flag {flag}"


def no_kvm_notes(boot, name):
    """The core has no KVM note, and kvmnote says so in one line with a non-zero exit."""
    _, core = scenario_files(boot, name)
    types = corefile.Core(core.read_bytes()).note_types()
    assert not [t for t in types if t[0] == "KVM"], f"{boot.backend} {name}: KVM notes: {types}"
    r = kvmnote_read(core)
    assert r.rc != 0, "kvmnote read exited 0 on a core without KVM notes"
    assert "no kvm notes" in r.text.lower(), f"kvmnote message: {r.text[-500:]}"


def check_zero_vcpu(b):
    report, core = scenario_files(b, "novcpu")
    types = corefile.Core(core.read_bytes()).note_types()
    assert types.count(("KVM", S.NT_KVM_VM)) == 1, \
        f"a VM with no vCPUs (only its VM fd open) must get one NT_KVM_VM note; notes: {types}"
    notes = decoded_notes(core)
    assert len(notes["vms"]) == 1 and notes["vms"][0]["nr_vcpus"] == 0, notes["vms"]
    assert notes["vcpus"] == [], notes["vcpus"]
    assert len(notes["vms"][0]["memslots"]) == len(X.MEMSLOTS)


def check_scenario(boot, name):
    """Whatever the scenario's spec says its core must hold."""
    spec = BY_NAME[name]
    if name == "novcpu":
        check_zero_vcpu(boot)
    elif spec.notes == "none":
        no_kvm_notes(boot, name)
    elif spec.notes == "kvm":
        check_positive(boot, name)
        if spec.smm:
            check_vmcore_leaves_out_smram(boot.path(name, "core"), f"{boot.backend} {name}")
    else:  # truncated: ran and dumped (test_small_rlimit_core looks at the core)
        scenario_files(boot, name)
    if name == "policy_always":
        param = (boot.file(name, "param.txt") or b"").strip()
        assert param == b"2", f"kvm.coredump_notes read {param!r} after `echo 2`"
