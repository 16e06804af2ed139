"""The Debian 12 root filesystem of L1 machines that run real userspace (bcc, pytest
in native mode, systemd with systemd-coredump and QEMU): rootfs.sh builds it once,
cached by the script's own hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).with_name("rootfs.sh")


def debian_rootfs() -> Path:
    p = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise RuntimeError(f"{SCRIPT} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return Path(p.stdout.split()[-1])
