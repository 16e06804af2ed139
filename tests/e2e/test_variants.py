"""Kernel/emulator variants (marker `slow`): KVM as modules, SVM shadow
paging (kvm_amd.npt=0), Bochs CPU models without unrestricted guest
(corei7_lynnfield) or without EPT (penryn), and the debug kernel (KASAN +
lockdep). Each boots once and runs a subset of the scenarios with the full
checks, plus "no splat"."""

from __future__ import annotations

import pytest

from harness.boots import get_boot
from harness.checks import check_scenario, ctx, no_kvm_notes
from harness.scenarios import INSMOD

CORE = ("real1", "pm32", "long2", "mixed8")
SLOW = pytest.mark.slow

VARIANTS = [
    pytest.param("svm", dict(variant="patched-modules", modules=True, tag="modules",
                             extra_preamble=(INSMOD,),
                             names=CORE + ("disabled", "unload", "reload")),
                 marks=[pytest.mark.svm, SLOW], id="svm-modules"),
    pytest.param("vmx", dict(variant="patched-modules", modules=True, tag="modules",
                             extra_preamble=(INSMOD,), names=CORE + ("unload", "reload")),
                 marks=[pytest.mark.vmx, SLOW], id="vmx-modules"),
    pytest.param("svm", dict(variant="patched", cmdline="kvm_amd.npt=0", tag="npt0", names=CORE),
                 marks=[pytest.mark.svm, SLOW], id="svm-npt0"),
    pytest.param("vmx", dict(variant="patched", cpu="corei5_lynnfield_750", tag="lynnfield",
                             names=CORE), marks=[pytest.mark.vmx, SLOW], id="vmx-lynnfield"),
    pytest.param("vmx", dict(variant="patched", cpu="core2_penryn_t9600", tag="penryn", names=CORE),
                 marks=[pytest.mark.vmx, SLOW], id="vmx-penryn"),
    pytest.param("svm", dict(variant="patched-debug", tag="debug",
                             names=("long2", "mixed8", "segv", "stuck", "foreign", "rlimit4k",
                                    "disabled", "many64", "novcpu")),
                 marks=[pytest.mark.svm, SLOW], id="svm-debug"),
]


@pytest.mark.parametrize("backend,cfg", VARIANTS)
def test_variant(backend, cfg):
    cfg = dict(cfg)
    variant = cfg.pop("variant")
    names = cfg["names"]
    b = get_boot(backend, variant, **{**cfg, "names": tuple(names)})
    assert not b.errors, f"{b.errors}{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"
    for n in names:
        if n == "unload":
            lsmod = (b.file("unload", "lsmod.txt") or b"").decode()
            assert "kvm" not in lsmod, f"kvm still loaded before 'unload':\n{lsmod}{ctx(b)}"
            no_kvm_notes(b, n)
        else:
            check_scenario(b, n)
