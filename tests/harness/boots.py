"""One boot per (backend, kernel variant, options), shared by every test of a pytest
session, its failure too; and the prerequisite check of each backend."""

from __future__ import annotations

import pytest

from testlib import need

from . import kernel as K
from . import machines
from .scenarios import BY_NAME, SPECS

_boots: dict = {}
timings: list = []


def need_backend(backend: str):
    if backend == "native":
        why = machines.native_available()
        need(not why, why)
        return
    if backend == "svm":
        need(machines.qemu_available(), "qemu-system-x86_64 not installed (apt install qemu-system-x86)")
    else:
        need(machines.bochs_available(),
             "bochs/isolinux/genisoimage not installed (apt install bochs bochsbios vgabios "
             "isolinux syslinux-common genisoimage)")
    need(machines.BUSYBOX.exists(), "busybox-static not installed")
    need(K.series_present(), "kpatch/0*.patch missing: no patched kernel to test")


def get_boot(backend: str, variant: str = "patched", **kw) -> machines.BootResult:
    """Boot once per key, shared by all tests; failures are cached too."""
    need_backend(backend)
    if backend == "native":
        variant = "running"
    key = (backend, variant, tuple(sorted(kw.items())))
    if key not in _boots:
        names = kw.pop("names", None)
        extra = list(kw.pop("extra_preamble", ()))
        specs = [BY_NAME[n] for n in names] if names else \
            [s for s in SPECS if backend in s.backends]
        try:
            r = machines.boot(backend, variant, [s.scenario for s in specs],
                              preamble=extra, **kw)
            timings.append((f"{backend}/{variant} {kw.get('tag', '')}".strip(), r.elapsed,
                             len(specs)))
            _boots[key] = r
        except machines.HarnessError as e:
            _boots[key] = e
    r = _boots[key]
    if isinstance(r, Exception):
        pytest.fail(f"{backend}/{variant}: {r}")
    return r
