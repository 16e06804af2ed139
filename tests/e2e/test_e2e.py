"""kvmnote end-to-end tests: the scenario list (harness/scenarios.py) on every machine
backend that can run it: a patched kernel in QEMU TCG (AMD SVM) and in Bochs (Intel
VMX), and with --native this machine's own kernel. The KVM notes in the cores must
match what the VMM set and what KVM's ioctls returned (harness/checks.py).

    python3 -m pytest tests/e2e -m "e2e and svm and not slow"   # QEMU only
    python3 -m pytest tests/e2e -m "e2e and vmx and not slow"   # Bochs only
    python3 -m pytest tests/e2e --native -m native              # this kernel
"""

from __future__ import annotations

import re

import pytest

from harness import corefile
from harness import expected as X
from harness.boots import get_boot
from harness.checks import (check_ioctl_matches_intent, check_scenario, ctx, no_kvm_notes,
                            scenario_files)
from harness.kvmnote_read import notes
from harness.scenarios import (BY_NAME, SPECS, TRACE_NAMES, TRACE_PREAMBLE, UNPATCHED,
                               UNPATCHED_KVM)

BACKENDS = {"svm": pytest.mark.svm, "vmx": pytest.mark.vmx, "native": pytest.mark.native}
EMULATED = [pytest.param(b, marks=BACKENDS[b], id=b) for b in ("svm", "vmx")]
ALL = EMULATED + [pytest.param("native", marks=pytest.mark.native, id="native")]


def scenario_params(names=None):
    """(backend, name) for every scenario on every backend that can run it."""
    out = []
    for s in SPECS:
        if names is not None and s.name not in names:
            continue
        for b in s.backends:
            out.append(pytest.param(b, s.name, marks=[BACKENDS[b]], id=f"{b}-{s.name}"))
    return out


def unpatched(backend):
    return get_boot(backend, "unpatched", names=tuple(UNPATCHED))


# ------------------------------------------------------------- the boots


@pytest.mark.parametrize("backend", ALL)
def test_boot_clean(backend):
    """The kernel runs every scenario, survives and logs no splat."""
    b = get_boot(backend)
    assert not b.errors, f"{b.errors}{ctx(b)}"
    assert b.file("devkvm.txt") and b"/dev/kvm" in b.file("devkvm.txt"), f"no /dev/kvm{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"
    for s in SPECS:
        if backend in s.backends:
            assert b.file(s.name, "rc") is not None, f"{s.name} did not run{ctx(b, s.name)}"


@pytest.mark.parametrize("backend", EMULATED)
def test_unpatched_boot_clean(backend):
    b = unpatched(backend)
    assert not b.errors, f"{b.errors}{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"


# ------------------------------------------------------- every scenario


@pytest.mark.parametrize("backend,name", scenario_params())
def test_scenario(backend, name):
    """The scenario's core holds what its spec says (notes equal intent and ioctls;
    or no KVM notes), the last exit as the detected vendor writes it."""
    check_scenario(get_boot(backend), name)


@pytest.mark.parametrize("backend,name", scenario_params([s.name for s in SPECS if s.kinds]))
def test_ioctl_matches_intent(backend, name):
    """The VMM's own ioctls return what it meant to set (the tests' premise)."""
    check_ioctl_matches_intent(get_boot(backend), name)


@pytest.mark.parametrize("backend", EMULATED)
@pytest.mark.parametrize("name", UNPATCHED_KVM)
def test_unpatched_ioctl_matches_intent(backend, name):
    check_ioctl_matches_intent(unpatched(backend), name)


@pytest.mark.parametrize("backend", EMULATED)
@pytest.mark.parametrize("name", UNPATCHED_KVM)
def test_unpatched_no_kvm_notes(backend, name):
    no_kvm_notes(unpatched(backend), name)


# ------------------------------------------------------- particular checks


@pytest.mark.parametrize("backend", ALL)
def test_pipe_core_pattern_same_notes(backend):
    """`|helper` core_pattern: the same notes as a core written to a file."""
    b = get_boot(backend)
    _, pipe_core = scenario_files(b, "pipe")
    _, file_core = scenario_files(b, "long2")
    tp = corefile.Core(pipe_core.read_bytes()).note_types()
    tf = corefile.Core(file_core.read_bytes()).note_types()
    assert tp == tf, f"note lists differ:\n pipe {tp}\n file {tf}"
    assert ("KVM", corefile.NT_KVM_VM) in tp and tp.count(("KVM", corefile.NT_KVM_VCPU)) == 2, tp


@pytest.mark.parametrize("backend", ALL)
def test_stuck_vcpu_dump_is_prompt(backend):
    """A vCPU whose mutex another process holds is reported busy, quickly."""
    b = get_boot(backend)
    m = re.search(r"===SCN-BEGIN stuck ([\d.]+).*?===SCN-END stuck rc=\d+ ([\d.]+)", b.log, re.S)
    assert m, f"stuck scenario markers missing{ctx(b, 'stuck')}"
    took = float(m.group(2)) - float(m.group(1))
    assert took < 10, f"stuck scenario took {took:.1f} s{ctx(b, 'stuck')}"


@pytest.mark.parametrize("backend", EMULATED)
def test_tracepoint(backend):
    """kvm:kvm_coredump_vcpu fires once per vCPU written, with its RIP and status."""
    b = get_boot(backend, "patched", names=TRACE_NAMES, extra_preamble=tuple(TRACE_PREAMBLE),
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
            if kind == "stuck":
                want.append((vid, 0, 0x4, 1))
            else:
                st = 0x11 if kind == "never_ran" else 0x1
                want.append((vid, X.regs(BY_NAME[n].mode, vid, kind)["rip"], st, 0))
    assert sorted(ev) == sorted(want), f"trace events\n got {ev}\nwant {want}\n{trace[-1500:]}"


@pytest.mark.parametrize("backend", ALL)
def test_coredump_notes_param_default(backend):
    """kvm.coredump_notes defaults to on: Y (v1) or 1 (v2: processes with filter bit 9)."""
    b = get_boot(backend)
    assert (b.file("coredump_notes.txt") or b"").strip() in (b"Y", b"1"), \
        f"coredump_notes parameter: {b.file('coredump_notes.txt')}"


@pytest.mark.parametrize("backend", EMULATED)
def test_nonkvm_process_notes_unchanged(backend):
    """A process without KVM fds: the same note list as on the unpatched kernel."""
    p, u = get_boot(backend), unpatched(backend)
    _, pc = scenario_files(p, "nonkvm")
    _, uc = scenario_files(u, "nonkvm")
    tp = corefile.Core(pc.read_bytes()).note_types()
    tu = corefile.Core(uc.read_bytes()).note_types()
    assert tp == tu, f"patched {tp}\nunpatched {tu}"


@pytest.mark.parametrize("backend", EMULATED)
def test_kvm_core_only_adds_kvm_notes(backend):
    """Same VMM on both kernels: the patched core's non-KVM notes are unchanged."""
    p, u = get_boot(backend), unpatched(backend)
    _, pc = scenario_files(p, "long2")
    _, uc = scenario_files(u, "long2")
    tp = [t for t in corefile.Core(pc.read_bytes()).note_types() if t[0] != "KVM"]
    tu = corefile.Core(uc.read_bytes()).note_types()
    assert tp == tu, f"patched (without KVM) {tp}\nunpatched {tu}"


@pytest.mark.parametrize("backend", ALL)
def test_foreign_vcpu_not_written(backend):
    b = get_boot(backend)
    report, core = scenario_files(b, "foreign")
    assert report["foreign_fd"] >= 0, "the VMM did not receive the foreign vCPU fd"
    n = notes(core)
    assert [v["vcpu_id"] for v in n["vcpus"]] == [0], n["vcpus"]
    assert len(n["vms"]) == 1 and n["vms"][0]["pid"] == report["pid"], n["vms"]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name", ["rlimit4k", "rlimit64k"])
def test_small_rlimit_core(backend, name):
    """RLIMIT_CORE below the core size: a truncated core, the kernel carries on."""
    b = get_boot(backend)
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
    later = [s.name for s in SPECS[SPECS.index(spec) + 1:] if backend in s.backends]
    assert all(b.file(n, "rc") is not None for n in later), "the kernel stopped after it"
