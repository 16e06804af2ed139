"""`--format kdump` on real QEMU cores: crash 8.0.2 and drgn must give the same per-CPU
traces from the kdump output as from the ELF output of the same core.

The cores are the acceptance tier's (tests/acceptance/test_vmcore_qemu.py writes them under
$KVMNOTE_ACCEPTANCE_DIR, default /tmp/kvmnote-acceptance: out/{paused,running}.core with a
6.12 guest, linux-6.1/out/paused.core with a 6.1 guest for crash); `pytest tests` runs that
tier first. Without them these tests skip (fail under CI=true), saying so. Only read there:
every output goes to pytest's tmp_path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests/acceptance"))
from testlib import need  # noqa: E402

WORK = Path(os.environ.get("KVMNOTE_ACCEPTANCE_DIR", "/tmp/kvmnote-acceptance"))


def acceptance():
    """The acceptance module (its readers: drgn_traces, crash_output, crash_bt)."""
    need((WORK / "out/paused.core").exists(), f"no acceptance cores under {WORK} (run "
         f"pytest -m acceptance tests/acceptance first)")
    import test_vmcore_qemu as A
    return A


def vmcore(core: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "kvmnote", "vmcore", str(core), "-o", str(out),
                        *args], capture_output=True, text=True)
    return p


def guest_vmlinux(*args: str, **kw) -> Path:
    import qemurun
    path = qemurun.kernel(*args, **kw).parent / "vmlinux"
    need(path.exists(), f"no {path}")
    return path


@pytest.mark.parametrize("scenario", ["paused", "running"])
def test_drgn_traces_kdump_equal_elf(tmp_path: Path, scenario: str) -> None:
    A = acceptance()
    core = WORK / "out" / f"{scenario}.core"
    vmlinux = guest_vmlinux("-n", "--base", "guest")
    assert vmcore(core, tmp_path / "elf").returncode == 0
    ref = A.drgn_traces(tmp_path / "elf", vmlinux)
    cpus = A.per_cpu(ref)
    assert len(cpus) == 2 and all(cpus.values()), ref
    for algo in ("zstd", "lzo", "snappy", "zlib"):
        out = tmp_path / f"kdump.{algo}"
        p = vmcore(core, out, "--format", "kdump", "--compress", algo)
        assert p.returncode == 0, p.stderr
        assert A.drgn_traces(out, vmlinux) == ref, algo
    print(f"\ndrgn on the kdump output ({scenario}, all compressions):\n{ref}")


def test_612_guest_refused_by_makedumpfile_1_7_2(tmp_path: Path) -> None:
    """-d 31 goes through makedumpfile, which must refuse a kernel it does not know."""
    acceptance()
    out = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    need("1.7.2" in out, "this test knows Debian 12's makedumpfile 1.7.2 (no 6.12 support)")
    p = vmcore(WORK / "out/paused.core", tmp_path / "k", "--format", "kdump", "-d", "31",
               "--compress", "lzo")
    assert p.returncode == 2 and "does not know this guest's kernel version" in p.stderr
    assert p.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_crash_bt_kdump_equal_elf_61(tmp_path: Path) -> None:
    A = acceptance()
    core = WORK / "linux-6.1/out/paused.core"
    need(core.exists(), f"no {core} (the acceptance tier's 6.1 guest)")
    vmlinux = guest_vmlinux("-n", "--base", "guest61", env=dict(
        os.environ, KVMNOTE_LINUX_TARBALL=str(A.TARBALL_61)))
    assert vmcore(core, tmp_path / "elf").returncode == 0
    ref = A.crash_output(vmlinux, tmp_path / "elf")
    traces = A.crash_bt(ref)
    assert len(traces) == 2 and all(traces.values()), ref
    outs = {}
    for algo in ("zstd", "lzo", "snappy", "zlib"):
        out = tmp_path / f"kdump.{algo}"
        assert vmcore(core, out, "--format", "kdump", "--compress", algo).returncode == 0
        got = A.crash_output(vmlinux, out)
        assert A.crash_bt(got) == traces, (algo, got)
        outs[algo] = got
    print(f"\ncrash bt -a on the kdump output (6.1 guest):\n{outs['zstd']}")
    drgn_ref = A.drgn_traces(tmp_path / "elf", vmlinux)
    assert A.drgn_traces(tmp_path / "kdump.zstd", vmlinux) == drgn_ref
