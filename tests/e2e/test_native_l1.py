"""Native mode proven here: the scenario list runs on the native backend inside the
emulated L1 machine (QEMU TCG, nested SVM), where our patched kernel is the host:
`pytest tests/e2e --native -m native`, exactly what a Vagrant box or a bare-metal
runner does, on a Debian root filesystem. Its JUnit XML comes back and is judged
here: every scenario ran and passed, nothing was skipped.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import REPO
from harness.kernel import kernel
from harness.machines import run_qemu
from harness.rootfs import debian_rootfs
from harness.scenarios import SPECS
from harness.transfer import blank_disk, tar_disk, untar_disk
from harness.vmm import build_vmm
from testlib import need

pytestmark = pytest.mark.svm

RUN_SH = """\
cd /mnt/in/repo || exit 1
export KVMNOTE_VMM=/mnt/in/vmm KVMNOTE_CACHE=/tmp/kvmnote-cache PYTHONDONTWRITEBYTECODE=1
python3 -m pytest -p no:cacheprovider tests/e2e --native -m native -q -rfEX \\
    --junitxml=/mnt/out/native.xml > /mnt/out/pytest.out 2>&1
echo "pytest exit $?"
tar -C /tmp/kvmnote-cache -cf /mnt/out/runs.tar --exclude=core e2e-runs   # logs, reports
"""
SHIPPED = ("kvmnote", "tests/conftest.py", "tests/testlib.py", "tests/harness", "tests/e2e")


@pytest.fixture(scope="module")
def l1():
    need(shutil.which("qemu-system-x86_64") is not None,
         "qemu-system-x86_64 not installed (apt install qemu-system-x86)")
    need(os.geteuid() == 0, "not root (mmdebstrap's root mode)")
    need(shutil.which("mmdebstrap") is not None, "mmdebstrap not installed (apt install mmdebstrap)")
    need(Path("/usr/src/linux-source-6.12.tar.xz").exists(),
         "linux-source-6.12 not installed (apt install linux-source-6.12)")
    kern, rootfs, vmm = kernel("-c", "l1"), debian_rootfs(), build_vmm()
    d = Path(os.environ.get("KVMNOTE_CACHE", Path.home() / ".cache/kvmnote")) / "native-l1"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tar_disk(d / "in.tar", {"run.sh": RUN_SH.encode(), "vmm": vmm,
                            **{f"repo/{p}": REPO / p for p in SHIPPED}})
    blank_disk(d / "out.img", 512 << 20)
    rc, timed_out = run_qemu(d, kern, None, "root=/dev/vda rw rootfstype=ext4 "
                             "init=/sbin/kvmnote-init", 2400, memory=2048,
                             disks=((rootfs, "snapshot"), (d / "in.tar", "ro"),
                                    (d / "out.img", "rw")))
    console = (d / "console.log").read_text(errors="replace")
    assert rc == 0 and not timed_out and "kvmnote-init: done" in console, \
        f"L1 run failed (rc {rc}, timed out {timed_out}):\n{console[-3000:]}"
    out = untar_disk(d / "out.img", d / "out")
    pytest_out = (out / "pytest.out").read_text(errors="replace") \
        if (out / "pytest.out").exists() else "(no pytest.out)"
    print(f"\nnative run inside L1 ({d}):\n{pytest_out[-3000:]}")
    assert (out / "native.xml").exists(), f"no JUnit XML came back\n{pytest_out[-3000:]}"
    return out, pytest_out


def outcomes(xml: Path) -> dict[str, str]:
    """test name -> passed, failed, xfailed, skipped (from pytest's JUnit XML; an
    xfail would be a test marked to fail, which none is)."""
    res = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        kids = {c.tag: c for c in tc}
        if "failure" in kids or "error" in kids:
            res[tc.get("name")] = "failed"
        elif "skipped" in kids:
            res[tc.get("name")] = "xfailed" if kids["skipped"].get("type") == "pytest.xfail" \
                else "skipped"
        else:
            res[tc.get("name")] = "passed"
    return res


def test_native_scenarios_inside_l1(l1):
    out, text = l1
    got = outcomes(out / "native.xml")
    assert got, f"no tests ran natively\n{text[-3000:]}"
    bad = {k: v for k, v in got.items() if v in ("failed", "skipped")}
    assert not bad, f"native tests failed or skipped: {bad}\n{text[-3000:]}"
    for s in SPECS:
        if "native" not in s.backends:
            continue
        name = f"test_scenario[native-{s.name}]"
        assert got.get(name) == "passed", f"{name}: {got.get(name)}, want passed"
    assert got.get("test_boot_clean[native]") == "passed", got
