"""What every tier shares: tests/ on sys.path (for `harness` and `testlib`, whichever
subset of paths pytest is given), the markers, and the native backend switch.

Native mode (`--native`) runs the scenario list on this machine's own /dev/kvm, for a
box whose running kernel has the series (a Vagrant box, a bare-metal runner, the
emulated L1 machine of tests/e2e/test_native_l1.py). Without --native those tests are
deselected, not skipped: a machine without the patched kernel never counts them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MARKERS = {
    "e2e": "end-to-end: the scenario list on a machine backend",
    "svm": "AMD SVM: QEMU TCG -cpu max",
    "vmx": "Intel VMX: Bochs 2.7",
    "native": "this machine's own /dev/kvm (needs --native and the patched running kernel)",
    "slow": "extra kernel variants (modules, debug, npt=0, other CPU models)",
    "acceptance": "real QEMU + Linux guest inside the patched kernel under QEMU TCG",
    "bpf": "bcc tracer (bpf/kvmcoredump.py) run inside the emulated L1 machine",
}


def pytest_addoption(parser):
    parser.addoption("--native", action="store_true",
                     help="run the native-backend tests on this machine's /dev/kvm")


def pytest_configure(config):
    for m, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{m}: {doc}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--native"):
        return
    native = [i for i in items if i.get_closest_marker("native")]
    if native:
        config.hook.pytest_deselected(items=native)
        items[:] = [i for i in items if not i.get_closest_marker("native")]
