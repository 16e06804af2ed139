"""Allocation failures in the KVM core-dump code (marker `slow`).

The debug kernel (KASAN + lockdep + fault injection) runs the same 2-vCPU
VMM once per entry of scenarios.FAULT_SPACES: every allocation that the
core-dump snapshot makes (anything with kvm_core_snapshot() on its stack,
through the stack-trace filter of failslab and fail_page_alloc) fails once a budget of them was
granted (failslab counts bytes, fail_page_alloc pages).  Whatever fails, the kernel must not splat, the core must be whole
(guest memory where the VMM put it) and the notes must account for every
VM, vCPU and memslot: present, or counted in the NT_KVM_DROPPED note, or a
vCPU note that says "unreadable: nomem".  Across the sweep every failure
point must have been reached.
"""

from __future__ import annotations

import re

import pytest

from harness import corefile
from harness import expected as X
from harness.boots import get_boot
from harness.checks import ctx, scenario_files
from harness.kvmnote_read import notes as decoded_notes
from harness.scenarios import FAULT_PREAMBLE, FAULT_SPECS

UNKNOWN = 0xFFFFFFFF
NAMES = tuple(s.name for s in FAULT_SPECS)
VMX_NAMES = ("fault0_0", "fault400_1000", "fault600_1000", "fault3000_0", "fault100000_1000")
BACKENDS = [pytest.param("svm", marks=pytest.mark.svm), pytest.param("vmx", marks=pytest.mark.vmx)]


def outcome(boot, name) -> set[str]:
    """Check one scenario's core; return what failed in it."""
    report, core_path = scenario_files(boot, name)
    where, c = f"{boot.backend} {name}", ctx(boot, name)

    # The core is whole: guest memory through the VMM's own memslot map.
    core = corefile.Core(core_path.read_bytes())
    slots = [{"as_id": 0, "slot": sl, "guest_phys_addr": gpa, "memory_size": size,
              "userspace_addr": r["userspace_addr"]}
             for (sl, _, gpa, size), r in zip(X.MEMSLOTS, report["memslots"])]
    for sl, _, gpa, size in X.PATTERN_SLOTS:
        want = b"".join(X.slot_pattern(sl, o).to_bytes(8, "little") for o in range(0, size, 8))
        assert corefile.guest_read(core, slots, gpa, size) == want, \
            f"{where}: guest memory of slot {sl} damaged in the core{c}"

    notes = decoded_notes(core_path)
    dropped = notes.get("dropped") or []
    assert len(dropped) <= 1, f"{where}: {len(dropped)} NT_KVM_DROPPED notes{c}"
    d = dropped[0] if dropped else {"nr_vms": 0, "nr_vcpus": 0, "nr_memslots": 0}
    if dropped:
        assert d["reason"] == 2, f"{where}: dropped for reason {d['reason']}, want NOMEM{c}"
    if UNKNOWN in (d["nr_vms"], d["nr_vcpus"], d["nr_memslots"]):
        assert d["nr_vms"] == d["nr_vcpus"] == d["nr_memslots"] == UNKNOWN, \
            f"{where}: some counts unknown, not all: {d}{c}"
        assert not notes["vms"] and not notes["vcpus"], f"{where}: 'all dropped' and notes{c}"
        return {"all"}
    got = set()
    assert len(notes["vms"]) + d["nr_vms"] == 1, \
        f"{where}: {len(notes['vms'])} VM notes + {d['nr_vms']} dropped, want 1{c}"
    if d["nr_vms"]:
        got.add("vms")
        assert not notes["vcpus"], f"{where}: vCPU notes without their VM{c}"
        return got
    vm = notes["vms"][0]
    assert vm["nr_vcpus"] == 2 == len(notes["vcpus"]) + d["nr_vcpus"], \
        f"{where}: nr_vcpus {vm['nr_vcpus']}, {len(notes['vcpus'])} notes, " \
        f"{d['nr_vcpus']} dropped{c}"
    if d["nr_vcpus"]:
        got.add("vcpus")
    assert vm["nr_memslots"] + d["nr_memslots"] == len(X.MEMSLOTS), \
        f"{where}: {vm['nr_memslots']} memslots + {d['nr_memslots']} dropped{c}"
    if d["nr_memslots"]:
        got.add("memslots")
    for v in notes["vcpus"]:
        if v["status"] == ["unreadable"]:
            assert v["error"] == "nomem", f"{where}: vcpu {v['vcpu_id']} error {v['error']}{c}"
            assert "regs" not in v, f"{where}: unreadable vcpu {v['vcpu_id']} has registers{c}"
            got.add("vcpu_nomem")
        else:
            assert v["status"] == ["valid"], f"{where}: vcpu {v['vcpu_id']} {v['status']}{c}"
            rep = {r["vcpu_id"]: r for r in report["vcpus"]}[v["vcpu_id"]]
            assert v["regs"] == {k: rep["ioctl"]["regs"][k] for k in v["regs"]}, \
                f"{where}: vcpu {v['vcpu_id']} registers differ from KVM_GET_REGS{c}"
    return got or {"valid"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_allocation_failures_in_the_dump(backend):
    # Under Bochs the KASAN kernel and the cores' way out over its serial port are
    # slow: one sweep point per failure point there, and a longer time limit.
    names = NAMES if backend == "svm" else VMX_NAMES
    b = get_boot(backend, "patched-debug", tag="fault", names=names, slow=3,
                 extra_preamble=tuple(FAULT_PREAMBLE))
    assert not b.errors, f"{b.errors}{ctx(b)}"
    rng = (b.file("fault_range.txt") or b"").decode()
    assert re.fullmatch(r"fault range [0-9a-f]{16}-[0-9a-f]{16}: kvm_core_(snapshot|size)\n", rng), \
        f"kvm_core_snapshot() was not found in /proc/kallsyms: {rng!r}{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"
    # (kvmalloc's __GFP_NOWARN keeps some injected failures quiet: at least one speaks.)
    assert "FAULT_INJECTION: forcing a failure" in b.log, f"no failure was injected{ctx(b)}"
    seen = {}
    for name in names:
        seen[name] = outcome(b, name)
    reached = set().union(*seen.values())
    want = {"all", "vms", "memslots", "vcpu_nomem", "valid"}
    assert want <= reached, f"failure points not reached: {want - reached}; per scenario {seen}"
