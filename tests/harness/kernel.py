"""Kernels from kpatch/build.sh, cached under ~/.cache/kvmnote by their inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import REPO

BUILD = REPO / "kpatch" / "build.sh"
COVER = REPO / "kpatch" / "0000-cover-letter.patch"


class KernelError(Exception):
    """kpatch/build.sh did not give us the kernel."""


def series_present() -> bool:
    return any(p.name != COVER.name for p in (REPO / "kpatch").glob("0*.patch"))


def kernel(*args: str, env: dict[str, str] | None = None) -> Path:
    """The bzImage `kpatch/build.sh ARGS` makes; a cached one is found by --print,
    without queueing for build.sh's lock behind other builds."""
    cmd = [str(BUILD), *args]
    try:
        p = subprocess.run(cmd + ["--print"], capture_output=True, text=True, env=env,
                           timeout=60)
        path = Path(p.stdout.split()[-1]) if p.returncode == 0 and p.stdout.split() else None
        if path and path.exists():
            return path
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    except subprocess.TimeoutExpired as e:
        raise KernelError(f"{' '.join(cmd)} timed out") from e
    lines = p.stdout.split()
    if p.returncode or not lines or not Path(lines[-1]).is_file():
        raise KernelError(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return Path(lines[-1])


def selftest() -> Path:
    """The series' KVM selftest (x86_64/coredump_test), static, from `build.sh --selftest`."""
    return kernel("--selftest")


def variant(name: str) -> Path:
    """Named variants: 'patched', 'unpatched', 'patched-modules', 'patched-debug', ...
    (patched-CONFIG: build.sh -c CONFIG; unpatched: build.sh -n)."""
    config = name.split("-", 1)[1] if "-" in name else "base"
    return kernel(*([] if name.startswith("patched") else ["-n"]), "-c", config)


def modules_dir(bzimage: Path) -> Path | None:
    found = sorted(bzimage.parent.glob("lib/modules/*/kernel"))
    return found[0] if found else None
