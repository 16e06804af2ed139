"""Fixtures of kvmnote's end-to-end tests: one emulator boot per
(vendor, kernel variant), shared by every test of the session.

Markers: e2e (all of these), svm (QEMU TCG, AMD SVM), vmx (Bochs, Intel VMX),
slow (extra kernel variants). Select with e.g. `-m "e2e and svm"`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from testlib import need  # noqa: E402,F401 (test_e2e imports it from here)
from scenarios import BASE_PREAMBLE, BY_NAME, SPECS  # noqa: E402


def pytest_configure(config):
    for m, doc in (("e2e", "end-to-end: boots a test kernel in an emulator"),
                   ("svm", "AMD SVM path: QEMU TCG -cpu max"),
                   ("vmx", "Intel VMX path: Bochs 2.7"),
                   ("slow", "extra kernel variants (modules, debug, npt=0, other CPU models)")):
        config.addinivalue_line("markers", f"{m}: {doc}")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def need_vendor(vendor: str):
    if vendor == "svm":
        need(harness.qemu_available(), "qemu-system-x86_64 not installed (apt install qemu-system-x86)")
    else:
        need(harness.bochs_available(),
             "bochs/isolinux/genisoimage not installed (apt install bochs bochsbios vgabios "
             "isolinux syslinux-common genisoimage)")
    need(Path(harness.BUSYBOX).exists(), "busybox-static not installed")
    need(shutil.which("gcc") is not None, "gcc not installed (the test VMM is built static)")


def need_patched():
    need(harness.patched_series_present(),
         "kpatch/0*.patch not present yet: no patched kernel to test (git merge main)")


_boots: dict = {}
_timings: list = []


def get_boot(vendor: str, variant: str = "patched", **kw) -> harness.BootResult:
    """Boot once per key, shared by all tests; failures are cached too."""
    key = (vendor, variant, tuple(sorted(kw.items())))
    if key not in _boots:
        names = kw.pop("names", None)
        extra = list(kw.pop("extra_preamble", ()))
        specs = [BY_NAME[n] for n in names] if names else SPECS
        try:
            r = harness.boot(vendor, variant, [s.scenario for s in specs],
                             preamble=extra + BASE_PREAMBLE, **kw)
            _timings.append((f"{vendor}/{variant} {kw.get('tag', '')}".strip(), r.elapsed,
                             len(specs)))
            _boots[key] = r
        except harness.HarnessError as e:
            _boots[key] = e
    r = _boots[key]
    if isinstance(r, Exception):
        pytest.fail(f"{vendor}/{variant}: {r}")
    return r


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.write_sep("-", "kvmnote e2e boots (wall time per boot)")
        for name, t, n in _timings:
            terminalreporter.write_line(f"{name:40s} {t:7.1f} s  ({n} scenarios)")


# ------------------------------------------------------------ kvmnote


def kvmnote_cmd() -> list[str] | None:
    if (harness.REPO / "kvmnote" / "__init__.py").exists() or \
            (harness.REPO / "kvmnote" / "__main__.py").exists():
        return [sys.executable, "-m", "kvmnote"]
    if shutil.which("kvmnote"):
        return ["kvmnote"]
    return None


def kvmnote_read(core_path: Path):
    """(returncode, parsed JSON or None, stderr+stdout text) of
    `kvmnote read --json CORE`; None when kvmnote is not available."""
    cmd = kvmnote_cmd()
    if cmd is None:
        return None
    env = dict(os.environ, PYTHONPATH=str(harness.REPO) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd + ["read", "--json", str(core_path)], capture_output=True,
                       text=True, env=env, timeout=120)
    data = None
    if p.returncode == 0:
        data = json.loads(p.stdout)
    return p.returncode, data, p.stderr + p.stdout


def _normalise(obj):
    """kvmnote-read/2 writes 64-bit fields as "0x..." strings: back to ints."""
    if isinstance(obj, dict):
        return {k: _normalise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalise(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("0x") and all(c in "0123456789abcdef" for c in obj[2:]):
        return int(obj, 16)
    return obj


def decoded_notes(core_path: Path) -> tuple[dict, str]:
    """KVM notes as the kvmnote-read/1 JSON, from `kvmnote read --json`."""
    r = kvmnote_read(core_path)
    if r is None:
        need(False, "the kvmnote package (pip install -e .)")
    rc, data, text = r
    assert rc == 0, f"kvmnote read --json {core_path} failed (rc {rc}):\n{text[-3000:]}"
    assert data.get("schema") in ("kvmnote-read/1", "kvmnote-read/2"), data.get("schema")
    data = _normalise(data)
    return data, "kvmnote"
