"""The series' own KVM selftest (tools/testing/selftests/kvm/x86_64/coredump_test.c,
patches 0010 and 0014, the latter with nested guests), built statically by `kpatch/build.sh --selftest` and run as root inside
both emulated machines, as the KVM maintainers would run it: every case must report
`ok`, none skipped (exit 4 = KSFT_SKIP fails here), and the kernel must not splat.
"""

from __future__ import annotations

import re

import pytest

from harness import machines
from harness.boots import need_backend
from harness.kernel import KernelError, selftest

# Its cases (the selftest's `cases[]`): each must be reported, by name.
CASES = ("state", "never_ran", "closed_vcpu_fd", "busy_vcpu", "vcpus_created_during_dump",
         "vm_fd_over_scm_rights", "many_memslots", "coredump_notes_0",
         "coredump_filter_bit_clear", "coredump_notes_2",
         # patch 0014: the VMM's guest is a hypervisor (nested VMX or SVM)
         "nested_l2", "nested_l1", "nested_run_pending")


@pytest.mark.e2e
@pytest.mark.parametrize("backend", [pytest.param("svm", marks=pytest.mark.svm),
                                     pytest.param("vmx", marks=pytest.mark.vmx)])
def test_kvm_selftest(backend):
    need_backend(backend)
    try:
        binary = selftest().read_bytes()
    except KernelError as e:
        pytest.fail(str(e))
    scn = machines.Scenario("selftest", [], command="/bin/coredump_test",
                            pre=["mkdir -p /tmp"], timeout=600)
    r = machines.boot(backend, "patched", [scn], tag="selftest",
                      extra_files={"bin/coredump_test": binary}, slow=1 + 4 * (backend == "vmx"))
    assert not r.errors, f"{r.errors}\n{r.tail()}"
    out = (r.file("selftest", "stdout") or b"").decode("utf-8", "replace")
    rc = (r.file("selftest", "rc") or b"").decode().strip()
    results = {name: status for status, name in re.findall(r"^(ok|not ok) \d+ (\S+)", out, re.M)}
    assert set(results) == set(CASES), f"cases reported: {sorted(results)}\n{out}"
    failed = [n for n, status in results.items() if status != "ok"]
    assert not failed, f"failed: {failed}\n{out}"
    assert rc == "0", f"exit {rc} (4 = KSFT_SKIP)\n{out}"
    assert not r.splats(), r.splats()
