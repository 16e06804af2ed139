"""The one wrapper of `kvmnote read --json` for every tier: runs the CLI as a user
would, accepts the schemas kvmnote-read/1 and /2 (/2 writes every 64-bit field as
a lowercase hex string "0x..."), and gives the tests ints either way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import REPO

SCHEMAS = ("kvmnote-read/1", "kvmnote-read/2")
HEX = re.compile(r"0x[0-9a-f]+")


def normalise(obj: Any) -> Any:
    """Strings that are lowercase hex numbers ("0x1f") become ints, recursively."""
    if isinstance(obj, dict):
        return {k: normalise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalise(v) for v in obj]
    if isinstance(obj, str) and HEX.fullmatch(obj):
        return int(obj, 16)
    return obj


@dataclass
class Read:
    rc: int
    data: dict | None     # the normalised document when rc == 0
    text: str             # stderr + stdout


_cache: dict = {}


def read(core: Path, *args: str) -> Read:
    """`python -m kvmnote read --json [ARGS] CORE` with this checkout's kvmnote (once per
    unchanged file: several tests look at each core)."""
    st = Path(core).stat()
    key = (str(core), st.st_size, st.st_mtime_ns, args, SCHEMAS)
    if key not in _cache:
        _cache[key] = _read(core, *args)
    return _cache[key]


def _read(core: Path, *args: str) -> Read:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, "-m", "kvmnote", "read", "--json", *args, str(core)],
                       capture_output=True, text=True, env=env, timeout=300)
    data = None
    if p.returncode == 0:
        data = normalise(json.loads(p.stdout))
        if data.get("schema") not in SCHEMAS:
            raise AssertionError(f"kvmnote read --json {core}: schema {data.get('schema')!r}, "
                                 f"want one of {SCHEMAS}")
    return Read(p.returncode, data, p.stderr + p.stdout)


def notes(core: Path) -> dict:
    """The normalised document; AssertionError with kvmnote's message when it fails."""
    r = read(core)
    assert r.rc == 0, f"kvmnote read --json {core} failed (rc {r.rc}):\n{r.text[-3000:]}"
    return r.data
