"""The static test VMM, built by tests/vmm/Makefile (its one build recipe)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import REPO

VMM_DIR = REPO / "tests" / "vmm"


def build_vmm() -> Path:
    """tests/vmm/vmm, made if out of date; $KVMNOTE_VMM names a prebuilt one (used
    inside machines without a compiler)."""
    if os.environ.get("KVMNOTE_VMM"):
        return Path(os.environ["KVMNOTE_VMM"])
    p = subprocess.run(["make", "-s", "-C", str(VMM_DIR)], capture_output=True, text=True,
                       timeout=300)
    if p.returncode:
        raise RuntimeError(f"building the test VMM failed:\n{p.stdout}{p.stderr}")
    return VMM_DIR / "vmm"
