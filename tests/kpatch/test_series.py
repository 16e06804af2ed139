"""The kernel series applies to the pinned Debian source, passes
checkpatch --strict and builds after every patch (bisectable)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testlib import need  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "kpatch" / "build.sh"
TARBALL = Path(os.environ.get("KVMNOTE_LINUX_TARBALL", "/usr/src/linux-source-6.12.tar.xz"))


def patches() -> list[Path]:
    return sorted(p for p in (REPO / "kpatch").glob("0*.patch")
                  if p.name != "0000-cover-letter.patch")


def test_series_checkpatch_and_bisect():
    need(TARBALL.exists(), f"{TARBALL} (apt-get install linux-source-6.12)")
    need(shutil.which("make") is not None and shutil.which("gcc") is not None,
         "a kernel tool chain (tests/install-deps.sh)")
    proc = subprocess.run(["bash", str(BUILD), "--checkpatch", "--bisect"],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checked = [line for line in proc.stdout.splitlines() if line.startswith("checkpatch: ")]
    built = [line for line in proc.stdout.splitlines() if line.startswith("bisect: builds: ")]
    assert len(checked) == len(patches()) and all(line.endswith(": clean") for line in checked)
    assert len(built) == len(patches()), proc.stdout


def test_cover_letter_names_every_patch_count():
    cover = (REPO / "kpatch" / "0000-cover-letter.patch").read_text()
    assert re.search(rf"\[PATCH( v\d+)? 0+/{len(patches())}\]", cover), cover[:400]
