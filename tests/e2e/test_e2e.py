"""kvmnote end-to-end tests (issue #4): a patched kernel in QEMU TCG (AMD SVM)
and in Bochs (Intel VMX) runs the test VMM scenarios of scenarios.py; the
KVM notes in the cores must match what the VMM set and what KVM's ioctls
returned.

    python3 -m pytest tests/e2e -m "e2e and svm"      # QEMU only (~1 min)
    python3 -m pytest tests/e2e -m "e2e and vmx"      # Bochs only (~3 min)
    python3 -m pytest tests/e2e -m "e2e and not slow" # both vendors
"""

from __future__ import annotations

import json
import re

import pytest

import corefile
import expected as X
from conftest import decoded_notes, get_boot, kvmnote_read, need, need_patched, need_vendor
from scenarios import BY_NAME, SPECS, TRACE_NAMES, TRACE_PREAMBLE, UNPATCHED, UNPATCHED_KVM

VENDORS = [pytest.param("svm", marks=pytest.mark.svm, id="svm"),
           pytest.param("vmx", marks=pytest.mark.vmx, id="vmx")]
ABORT_RC = {"abort": 134, "segv": 139}


def patched(vendor):
    need_vendor(vendor)
    need_patched()
    return get_boot(vendor, "patched")


def unpatched(vendor):
    need_vendor(vendor)
    return get_boot(vendor, "unpatched", names=tuple(UNPATCHED))


def ctx(boot, scenario=None):
    s = f"\n{boot.context()}"
    if scenario:
        s += f"\n--- scenario {scenario} ---\n{boot.scenario_log(scenario)}"
        out = boot.file(scenario, "stdout")
        if out:
            s += f"\n--- vmm output ---\n{out.decode(errors='replace')[-2000:]}"
    return s


def scenario_files(boot, name):
    """(report dict, core path) of a scenario that ran as intended."""
    spec = BY_NAME[name]
    rc = boot.file(name, "rc")
    assert rc is not None, f"{name}: no rc came back{ctx(boot, name)}"
    assert int(rc) == ABORT_RC[spec.crash], \
        f"{name}: vmm exit status {int(rc)}, want {ABORT_RC[spec.crash]}{ctx(boot, name)}"
    rep = boot.file(name, "report.json")
    assert rep is not None, f"{name}: no side report{ctx(boot, name)}"
    report = json.loads(rep)
    assert not report.get("timed_out"), f"{name}: vCPUs never reached the stop point{ctx(boot, name)}"
    for v in report.get("vcpus", []):
        if v["kind"] == "halted":
            assert v["exit_reason"] == 5, \
                f"{name}: vcpu {v['vcpu_id']} exit {v['exit_reason']}, want KVM_EXIT_HLT{ctx(boot, name)}"
        if v["kind"] in ("spinning", "stuck"):
            assert v["flag"] == 1, f"{name}: vcpu {v['vcpu_id']} never spun{ctx(boot, name)}"
    core = boot.path(name, "core")
    assert core.exists(), f"{name}: no core file came back{ctx(boot, name)}"
    if spec.notes != "truncated":
        si = [n for n in corefile.Core(core.read_bytes()).notes()
              if n.name == "CORE" and n.type == 0x53494749]  # NT_SIGINFO
        signo = int.from_bytes(si[0].desc[:4], "little") if si else None
        assert signo == {"abort": 6, "segv": 11}[spec.crash], f"{name}: core signal {signo}"
    return report, core


# ------------------------------------------------------------- the boots


@pytest.mark.parametrize("vendor", VENDORS)
def test_boot_clean(vendor):
    """The patched kernel boots, runs every scenario, survives and logs no splat."""
    b = patched(vendor)
    assert not b.errors, f"{b.errors}{ctx(b)}"
    assert b.file("devkvm.txt") and b"/dev/kvm" in b.file("devkvm.txt"), f"no /dev/kvm{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b, None)}"
    for s in SPECS:
        assert b.file(s.name, "rc") is not None, f"{s.name} did not run{ctx(b, s.name)}"


@pytest.mark.parametrize("vendor", VENDORS)
def test_unpatched_boot_clean(vendor):
    b = unpatched(vendor)
    assert not b.errors, f"{b.errors}{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"


# ---------------------------------------- intended == ioctl (any kernel)


def check_ioctl_matches_intent(boot, name):
    spec = BY_NAME[name]
    report, _ = scenario_files(boot, name)
    for v in report["vcpus"]:
        if v["ioctl"] is None:
            continue
        vid, st = v["vcpu_id"], v["ioctl"]
        where = f"{boot.vendor} {name} vcpu {vid} (ioctl)"
        assert st["regs"] == X.regs(spec.mode, vid, v["kind"]), where
        _check_sregs(st["sregs"], spec.mode, where, report.get("xsave", True))
        assert st["debugregs"]["db"] == X.debugregs(vid)["db"], where
        assert st["debugregs"]["dr7"] == X.debugregs(vid)["dr7"], where
        if report.get("xsave", True):
            assert {"xcr": 0, "value": X.XCR0} in st["xcrs"], where
        got = {m["index"]: m["value"] for m in st["msrs"]}
        for idx, val in X.msrs(spec.mode, vid).items():
            assert got.get(idx) == val, f"{where}: MSR {idx:#x} = {got.get(idx)!r}, want {val:#x}"


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("name", UNPATCHED_KVM)
def test_unpatched_ioctl_matches_intent(vendor, name):
    """The VMM's own state is right (independent of the series)."""
    check_ioctl_matches_intent(unpatched(vendor), name)


# -------------------------------------------------- positive: note contents


def _check_sregs(got, mode, where, xsave=True):
    want = X.sregs(mode, xsave)
    for seg in X.SEG_NAMES:
        for k, v in want[seg].items():
            if mode == "real" and (seg, k) == ("cs", "type"):
                # real-mode CS attributes carry no meaning: the VMX VM exit
                # (Bochs) stores CS as a data segment (type 3).
                assert got[seg][k] in X.REAL_CS_TYPES, f"{where}: cs.type {got[seg][k]}"
                continue
            assert got[seg][k] == v, f"{where}: {seg}.{k} = {got[seg][k]:#x}, want {v:#x}"
    for k in ("gdt", "idt"):
        assert (got[k]["base"], got[k]["limit"]) == (want[k]["base"], want[k]["limit"]), \
            f"{where}: {k} {got[k]} want {want[k]}"
    for k in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        assert got[k] == want[k], f"{where}: {k} = {got[k]:#x}, want {want[k]:#x}"


def _exit_ok(vendor, kind, ex, mode="long"):
    if vendor == "vmx":
        assert ex["type"] == "vmx"
        reason = ex["exit_reason"] & 0xffff
        if kind == "halted" and mode == "real" and reason == X.VMX_EXIT_EXCEPTION_NMI:
            return (ex["exit_intr_info"] & 0x800007ff) == (0x80000300 | X.GP_VECTOR), \
                f"real mode: EXCEPTION_NMI with intr_info {ex['exit_intr_info']:#x}, want #GP"
        if kind == "halted":
            return reason == X.VMX_EXIT_HLT, f"exit_reason {ex['exit_reason']:#x}, want 12 (HLT)"
        return reason in X.VMX_SPIN_EXITS, f"exit_reason {ex['exit_reason']:#x}, want one of {X.VMX_SPIN_EXITS}"
    assert ex["type"] == "svm"
    if kind == "halted":
        return ex["exit_code"] == X.SVM_EXIT_HLT, f"exit_code {ex['exit_code']:#x}, want 0x78 (HLT)"
    return ex["exit_code"] in X.SVM_SPIN_EXITS, \
        f"exit_code {ex['exit_code']:#x}, want one of {[hex(c) for c in X.SVM_SPIN_EXITS]}"


def check_positive(boot, name, spec=None):
    spec = spec or BY_NAME[name]
    vendor = boot.vendor
    report, core_path = scenario_files(boot, name)
    notes, source = decoded_notes(core_path)
    where0 = f"{vendor} {name} [{source}]"
    c = ctx(boot, name)

    # The VM
    assert len(notes["vms"]) == 1, f"{where0}: {len(notes['vms'])} VM notes, want 1{c}"
    vm = notes["vms"][0]
    assert vm["vendor"] == vendor, f"{where0}: VM vendor {vm['vendor']}"
    assert vm["nr_vcpus"] == len(spec.kinds), f"{where0}: nr_vcpus {vm['nr_vcpus']}"
    assert vm["pid"] == report["pid"], f"{where0}: VM pid {vm['pid']} want {report['pid']}"
    got_slots = sorted((s["as_id"], s["slot"], s["flags"], s["guest_phys_addr"], s["memory_size"],
                        s["userspace_addr"]) for s in vm["memslots"])
    want_slots = sorted((0, sl, fl, gpa, size, r["userspace_addr"])
                        for (sl, fl, gpa, size), r in zip(X.MEMSLOTS, report["memslots"]))
    assert got_slots == want_slots, f"{where0}: memslots\n got {got_slots}\nwant {want_slots}"
    assert vm["nr_memslots"] == len(X.MEMSLOTS)

    # Guest memory through the memslot map
    core = corefile.Core(core_path.read_bytes())
    for sl, _, gpa, size in X.PATTERN_SLOTS:
        data = corefile.guest_read(core, vm["memslots"], gpa, size)
        assert data is not None, f"{where0}: slot {sl} (GPA {gpa:#x}) not in the core"
        want = b"".join(X.slot_pattern(sl, o).to_bytes(8, "little") for o in range(0, size, 8))
        assert data == want, f"{where0}: slot {sl} memory differs from the pattern"
    assert corefile.guest_read(core, vm["memslots"], X.GPA_HLT, 1) == b"\xf4"

    # The vCPUs: each once (dup'ed fds, foreign fds not written)
    ids = [v["vcpu_id"] for v in notes["vcpus"]]
    assert sorted(ids) == list(range(len(spec.kinds))), f"{where0}: vcpu ids {ids}"
    byid = {v["vcpu_id"]: v for v in notes["vcpus"]}
    rep = {v["vcpu_id"]: v for v in report["vcpus"]}
    for vid, kind in enumerate(spec.kinds):
        n, r = byid[vid], rep[vid]
        where = f"{where0} vcpu {vid} ({kind})"
        assert n["vendor"] == vendor and n["vm_index"] == vm["vm_index"], where
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
        # 1. intended values
        want_regs = X.regs(spec.mode, vid, kind)
        for k, v in want_regs.items():
            assert n["regs"][k] == v, f"{where}: {k} = {n['regs'][k]:#x}, want {v:#x}"
        _check_sregs(n["sregs"], spec.mode, where, report.get("xsave", True))
        assert n["debugregs"]["db"] == X.debugregs(vid)["db"], f"{where}: db {n['debugregs']}"
        assert n["debugregs"]["dr7"] == X.debugregs(vid)["dr7"], f"{where}: dr7 {n['debugregs']}"
        if report.get("xsave", True):
            assert {"xcr": 0, "value": X.XCR0} in [{"xcr": x["xcr"], "value": x["value"]}
                                                  for x in n["xcrs"]], f"{where}: xcrs {n['xcrs']}"
        got_msrs = {m["index"]: m["value"] for m in n["msrs"]}
        for idx, val in X.msrs(spec.mode, vid).items():
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
            for m in st["msrs"]:
                if m["index"] in got_msrs:
                    assert got_msrs[m["index"]] == m["value"], \
                        f"{where}: MSR {m['index']:#x} {got_msrs[m['index']]:#x} != ioctl {m['value']:#x}"
            missing = [hex(m["index"]) for m in st["msrs"] if m["index"] not in got_msrs]
            assert not missing, f"{where}: MSRs readable by ioctl missing from the note: {missing}"
        # 3. the last VM exit
        if kind != "never_ran":
            assert n.get("exit"), f"{where}: no last-exit record"
            ok, why = _exit_ok(vendor, kind, n["exit"], spec.mode)
            assert ok, f"{where}: {why}"
        if kind in ("spinning", "stuck"):
            flag = corefile.guest_read(core, vm["memslots"], X.GPA_FLAGS + 8 * vid, 8)
            assert flag == (1).to_bytes(8, "little"), f"{where}: spinner flag {flag}"
    return notes


POSITIVE = [s.name for s in SPECS if s.notes == "kvm" and s.kinds]  # novcpu: test_zero_vcpu_vm


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("name", POSITIVE)
def test_notes(vendor, name):
    """Every vCPU/VM field in the core equals the intended and the ioctl value."""
    check_positive(patched(vendor), name)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("name", [s.name for s in SPECS if s.kinds])
def test_ioctl_matches_intent(vendor, name):
    check_ioctl_matches_intent(patched(vendor), name)


@pytest.mark.parametrize("vendor", VENDORS)
def test_pipe_core_pattern_same_notes(vendor):
    """`|helper` core_pattern: the same notes as a core written to a file."""
    b = patched(vendor)
    _, pipe_core = scenario_files(b, "pipe")
    _, file_core = scenario_files(b, "long2")
    tp = corefile.Core(pipe_core.read_bytes()).note_types()
    tf = corefile.Core(file_core.read_bytes()).note_types()
    assert tp == tf, f"note lists differ:\n pipe {tp}\n file {tf}"
    assert ("KVM", corefile.NT_KVM_VM) in tp and tp.count(("KVM", corefile.NT_KVM_VCPU)) == 2, tp


@pytest.mark.parametrize("vendor", VENDORS)
def test_stuck_vcpu_dump_is_prompt(vendor):
    """A vCPU whose mutex another process holds is reported busy, quickly."""
    b = patched(vendor)
    m = re.search(r"===SCN-BEGIN stuck ([\d.]+).*?===SCN-END stuck rc=\d+ ([\d.]+)", b.log, re.S)
    assert m, f"stuck scenario markers missing{ctx(b, 'stuck')}"
    took = float(m.group(2)) - float(m.group(1))
    assert took < 10, f"stuck scenario took {took:.1f} s of guest time{ctx(b, 'stuck')}"


@pytest.mark.parametrize("vendor", VENDORS)
def test_tracepoint(vendor):
    """kvm:kvm_coredump_vcpu fires once per vCPU written, with its RIP and status."""
    need_vendor(vendor)
    need_patched()
    b = get_boot(vendor, "patched", names=TRACE_NAMES, extra_preamble=tuple(TRACE_PREAMBLE),
                 tag="trace")
    assert not b.errors, f"{b.errors}{ctx(b)}"
    for n in TRACE_NAMES:
        scenario_files(b, n)
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"
    trace = (b.file("trace.txt") or b"").decode(errors="replace")
    ev = [tuple(int(x, 0) for x in m.groups()) for m in re.finditer(
        r"kvm_coredump_vcpu: vcpu (\d+) rip (0x[0-9a-f]+) status (0x[0-9a-f]+) error (\d+)", trace)]
    want = []
    for n in TRACE_NAMES:
        for vid, kind in enumerate(BY_NAME[n].kinds):
            mode = BY_NAME[n].mode
            if kind == "stuck":
                want.append((vid, 0, 0x4, 1))
            else:
                st = 0x11 if kind == "never_ran" else 0x1
                want.append((vid, X.regs(mode, vid, kind)["rip"], st, 0))
    assert sorted(ev) == sorted(want), f"trace events\n got {ev}\nwant {want}\n{trace[-1500:]}"


# ------------------------------------------------------- negative / fault


def _no_kvm_notes(boot, name):
    _, core = scenario_files(boot, name)
    types = corefile.Core(core.read_bytes()).note_types()
    assert not [t for t in types if t[0] == "KVM"], f"{boot.vendor} {name}: KVM notes: {types}"
    r = kvmnote_read(core)
    need(r is not None, "kvmnote package not merged yet: cannot check its 'no KVM notes' error")
    rc, _, text = r
    assert rc != 0, "kvmnote read exited 0 on a core without KVM notes"
    assert "no kvm notes" in text.lower(), f"kvmnote message: {text[-500:]}"


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("name", UNPATCHED_KVM)
def test_unpatched_no_kvm_notes(vendor, name):
    _no_kvm_notes(unpatched(vendor), name)


@pytest.mark.parametrize("vendor", VENDORS)
def test_disabled_param_no_kvm_notes(vendor):
    b = patched(vendor)
    assert (b.file("coredump_notes.txt") or b"").strip() == b"Y", \
        f"coredump_notes parameter: {b.file('coredump_notes.txt')}"
    _no_kvm_notes(b, "disabled")


@pytest.mark.parametrize("vendor", VENDORS)
def test_nonkvm_process_notes_unchanged(vendor):
    """A process without KVM fds: the same note list as on the unpatched kernel."""
    p, u = patched(vendor), unpatched(vendor)
    _, pc = scenario_files(p, "nonkvm")
    _, uc = scenario_files(u, "nonkvm")
    tp = corefile.Core(pc.read_bytes()).note_types()
    tu = corefile.Core(uc.read_bytes()).note_types()
    assert tp == tu, f"patched {tp}\nunpatched {tu}"


@pytest.mark.parametrize("vendor", VENDORS)
def test_kvm_core_only_adds_kvm_notes(vendor):
    """Same VMM on both kernels: the patched core's non-KVM notes are unchanged."""
    p, u = patched(vendor), unpatched(vendor)
    _, pc = scenario_files(p, "long2")
    _, uc = scenario_files(u, "long2")
    tp = [t for t in corefile.Core(pc.read_bytes()).note_types() if t[0] != "KVM"]
    tu = corefile.Core(uc.read_bytes()).note_types()
    assert tp == tu, f"patched (without KVM) {tp}\nunpatched {tu}"


@pytest.mark.parametrize("vendor", VENDORS)
def test_zero_vcpu_vm(vendor):
    check_zero_vcpu(patched(vendor))


def check_zero_vcpu(b):
    report, core = scenario_files(b, "novcpu")
    types = corefile.Core(core.read_bytes()).note_types()
    assert types.count(("KVM", corefile.NT_KVM_VM)) == 1, \
        f"a VM with no vCPUs (only its VM fd open) must get one NT_KVM_VM note; notes: {types}"
    notes, src = decoded_notes(core)
    assert len(notes["vms"]) == 1 and notes["vms"][0]["nr_vcpus"] == 0, notes["vms"]
    assert notes["vcpus"] == [], notes["vcpus"]
    assert len(notes["vms"][0]["memslots"]) == len(X.MEMSLOTS)


@pytest.mark.parametrize("vendor", VENDORS)
def test_foreign_vcpu_not_written(vendor):
    b = patched(vendor)
    report, core = scenario_files(b, "foreign")
    assert report["foreign_fd"] >= 0, "the VMM did not receive the foreign vCPU fd"
    notes, _ = decoded_notes(core)
    assert [v["vcpu_id"] for v in notes["vcpus"]] == [0], notes["vcpus"]
    assert len(notes["vms"]) == 1 and notes["vms"][0]["pid"] == report["pid"], notes["vms"]


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("name", ["rlimit4k", "rlimit64k"])
def test_small_rlimit_core(vendor, name):
    """RLIMIT_CORE below the core size: a truncated core, the kernel carries on."""
    b = patched(vendor)
    spec = BY_NAME[name]
    rc = b.file(name, "rc")
    assert rc is not None and int(rc) == 134, f"{name}: rc {rc}{ctx(b, name)}"
    core = b.file(name, "core") or b""
    full = b.file("long2", "core") or b""
    assert 0 < len(core) < len(full), \
        f"{name}: core {len(core)} bytes, the same VMM's full core {len(full)}: not truncated"
    # RLIMIT_CORE bounds the bytes written, not the file size: skipped
    # (sparse) pages do not count, so a file core may extend past the limit
    # (the unpatched kernel does the same under Bochs). Pages with data were
    # certainly written.
    data_pages = sum(1 for o in range(0, len(core), 4096) if any(core[o:o + 4096]))
    assert min(data_pages * 4096, len(core)) <= spec.rlimit, \
        f"{name}: {data_pages} pages with data > RLIMIT_CORE {spec.rlimit}"
    assert not b.errors and b.splats() == [], f"{b.errors} {b.splats()}{ctx(b)}"
    later = [s.name for s in SPECS[SPECS.index(spec) + 1:]]
    assert all(b.file(n, "rc") is not None for n in later), "the kernel stopped after it"
