"""Kernel/emulator variants (marker `slow`): KVM as modules, SVM shadow
paging (kvm_amd.npt=0), Bochs CPU models without unrestricted guest
(corei7_lynnfield) or without EPT (penryn), and the debug kernel (KASAN +
lockdep). Each boots once and runs a subset of the scenarios with the full
positive checks, plus "no splat"."""

from __future__ import annotations

import pytest

from conftest import get_boot, need_patched, need_vendor
from scenarios import INSMOD
from test_e2e import _no_kvm_notes, check_positive, check_zero_vcpu, ctx

CORE = ("real1", "pm32", "long2", "mixed8")

VARIANTS = [
    pytest.param("svm", dict(variant="patched-modules", modules=True, tag="modules",
                             extra_preamble=(INSMOD,),
                             names=CORE + ("disabled", "unload", "reload")),
                 marks=[pytest.mark.svm, pytest.mark.slow], id="svm-modules"),
    pytest.param("vmx", dict(variant="patched-modules", modules=True, tag="modules",
                             extra_preamble=(INSMOD,), names=CORE + ("unload", "reload")),
                 marks=[pytest.mark.vmx, pytest.mark.slow], id="vmx-modules"),
    pytest.param("svm", dict(variant="patched", cmdline="kvm_amd.npt=0", tag="npt0", names=CORE),
                 marks=[pytest.mark.svm, pytest.mark.slow], id="svm-npt0"),
    pytest.param("vmx", dict(variant="patched", cpu="corei5_lynnfield_750", tag="lynnfield",
                             names=CORE), marks=[pytest.mark.vmx, pytest.mark.slow],
                 id="vmx-lynnfield"),
    pytest.param("vmx", dict(variant="patched", cpu="core2_penryn_t9600", tag="penryn", names=CORE),
                 marks=[pytest.mark.vmx, pytest.mark.slow], id="vmx-penryn"),
    pytest.param("svm", dict(variant="patched-debug", tag="debug",
                             names=("long2", "mixed8", "segv", "stuck", "foreign", "rlimit4k",
                                    "disabled", "many64", "novcpu")),
                 marks=[pytest.mark.svm, pytest.mark.slow], id="svm-debug"),
]


@pytest.mark.parametrize("vendor,cfg", VARIANTS)
def test_variant(vendor, cfg):
    need_vendor(vendor)
    need_patched()
    cfg = dict(cfg)
    variant = cfg.pop("variant")
    names = cfg["names"]
    b = get_boot(vendor, variant, **{**cfg, "names": tuple(names)})
    assert not b.errors, f"{b.errors}{ctx(b)}"
    assert b.splats() == [], f"kernel splats: {b.splats()}{ctx(b)}"
    for n in names:
        if n == "disabled":
            _no_kvm_notes(b, n)
        elif n == "unload":
            lsmod = (b.file("unload", "lsmod.txt") or b"").decode()
            assert "kvm" not in lsmod, f"kvm still loaded before 'unload':\n{lsmod}{ctx(b)}"
            _no_kvm_notes(b, n)
        elif n == "novcpu":
            check_zero_vcpu(b)
        elif n != "rlimit4k":
            check_positive(b, n)
