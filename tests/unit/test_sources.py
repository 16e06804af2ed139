"""Cores from stdin (`kvmnote read -`, `kvmnote vmcore -`) and from systemd-coredump
(`--coredump PID|COMM`, with a stand-in coredumpctl on PATH: tests/unit/fakebin)."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import corebuilder as cb
from testlib import need

FAKEBIN = Path(__file__).resolve().parent / "fakebin"
PACKERS = {"plain": ["cat"], "zstd": ["zstd", "-q", "-c"], "lz4": ["lz4", "-q", "-c"],
           "xz": ["xz", "-q", "-c", "-T1"]}


def kvmnote(*argv: str, stdin: object = subprocess.DEVNULL, env: dict | None = None,
            limit_as: int | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m kvmnote ARGV` (with RLIMIT_AS `limit_as`)."""
    def pre() -> None:
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    return subprocess.run([sys.executable, "-m", "kvmnote", *argv], stdin=stdin, text=True,
                          capture_output=True, env=env, timeout=120, preexec_fn=pre)


def piped(cmd: list[str], path: Path, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """`CMD PATH | kvmnote ARGV`; CMD's status must be 0 (it saw its output consumed)."""
    src = subprocess.Popen([*cmd, str(path)], stdout=subprocess.PIPE)
    try:
        p = kvmnote(*argv, stdin=src.stdout, **kw)
    finally:
        assert src.stdout is not None
        src.stdout.close()
        assert src.wait(timeout=60) == 0
    return p


@pytest.mark.parametrize("packer", PACKERS)
def test_read_stdin(tmp_path: Path, packer: str) -> None:
    need(shutil.which(PACKERS[packer][0]) is not None, f"{PACKERS[packer][0]}")
    want = cb.standard_core(tmp_path / "core", nr_vcpus=2)
    p = piped(PACKERS[packer], tmp_path / "core", "read", "--json", "-")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["core"]["path"] == "<stdin>" and doc["core"]["pid"] == 4242
    assert int(doc["vcpus"][1]["regs"]["rip"], 16) == want["vcpus"][1]["regs"]["rip"]


def test_read_stdin_redirected_file(tmp_path: Path) -> None:
    cb.standard_core(tmp_path / "core")
    with open(tmp_path / "core", "rb") as f:
        p = kvmnote("read", "-", stdin=f)
    assert p.returncode == 0 and p.stdout.startswith("core <stdin>: pid 4242 ")


def test_read_stdin_big_core_bounded_memory(tmp_path: Path) -> None:
    """A 384 MiB core through a pipe, under a 256 MiB address-space limit (kvmnote needs
    under 200): only the notes are kept; the rest is drained, so the writer (cat)
    finishes with status 0."""
    cb.standard_core(tmp_path / "core", big=384 << 20)
    assert (tmp_path / "core").stat().st_size > 384 << 20
    p = piped(["cat"], tmp_path / "core", "read", "-", limit_as=256 << 20)
    assert p.returncode == 0 and "vCPU 1 " in p.stdout, p.stderr


def test_read_stdin_errors(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    p = piped(["cat"], tmp_path / "junk", "read", "-")
    assert (p.returncode, p.stderr) == (2, "kvmnote: <stdin>: not an ELF file (nor a "
                                           "zstd/lz4/xz compressed one)\n")
    main_fd, tty = os.openpty()
    try:
        p = kvmnote("read", "-", stdin=tty)
    finally:
        os.close(main_fd)
        os.close(tty)
    assert p.returncode == 2 and p.stderr.startswith("kvmnote: stdin is a terminal")
    p = kvmnote("read", str(tmp_path / "junk"), "--coredump", "1")
    assert p.returncode == 2 and "give a CORE file" in p.stderr


@pytest.mark.parametrize("packer", ["plain", "zstd"])
def test_vmcore_stdin_same_output(tmp_path: Path, packer: str) -> None:
    need(shutil.which(PACKERS[packer][0]) is not None, f"{PACKERS[packer][0]}")
    cb.standard_core(tmp_path / "core", big=64 << 20)
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    assert kvmnote("vmcore", str(tmp_path / "core"), "-o", str(tmp_path / "a")).returncode == 0
    p = piped(PACKERS[packer], tmp_path / "core", "vmcore", "-", "-o", str(tmp_path / "b"),
              env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []         # the copy is gone


def test_vmcore_stdin_error_names_stdin(tmp_path: Path) -> None:
    cb.write_core(tmp_path / "core", cb.prstatus(1), [])
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    p = piped(["cat"], tmp_path / "core", "vmcore", "-", "-o", str(tmp_path / "v"), env=env)
    assert p.returncode == 2 and p.stderr.startswith("kvmnote: <stdin>: no KVM notes")
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "v").exists()


# --- systemd-coredump ------------------------------------------------------------


def fake_env(tmp_path: Path, entries: list[dict]) -> dict[str, str]:
    """Environment with the stand-in coredumpctl first on PATH, serving `entries`."""
    (tmp_path / "dumps.json").write_text(json.dumps(entries))
    return dict(os.environ, PATH=f"{FAKEBIN}:{os.environ['PATH']}",
                FAKE_COREDUMPS=str(tmp_path / "dumps.json"),
                FAKE_COREDUMPCTL_LOG=str(tmp_path / "log"))


def entry(time: int, pid: int, core: Path | None, corefile: str = "present") -> dict:
    return {"time": time, "pid": pid, "comm": "qemu-system-x86", "sig": 11,
            "exe": "/usr/bin/qemu-system-x86_64", "corefile": corefile,
            "file": str(core) if core else None}


def calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(ln) for ln in (tmp_path / "log").read_text().splitlines()]


def two_cores(tmp_path: Path) -> tuple[dict, dict]:
    """An older core (3 vCPUs, pid 100) and a newer one (2 vCPUs, pid 200)."""
    old = cb.standard_core(tmp_path / "old", nr_vcpus=3)
    new = cb.standard_core(tmp_path / "new", nr_vcpus=2)
    return old, new


def test_coredump_newest_match(tmp_path: Path) -> None:
    two_cores(tmp_path)
    env = fake_env(tmp_path, [entry(2000, 200, tmp_path / "new"),
                              entry(1000, 100, tmp_path / "old")])
    p = kvmnote("read", "--json", "--coredump", "qemu-system-x86", env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert len(doc["vcpus"]) == 2
    assert doc["core"]["path"] == "core dump of PID 200 (/usr/bin/qemu-system-x86_64)"
    assert calls(tmp_path) == [["--no-pager", "--json=short", "list", "qemu-system-x86"],
                               ["--no-pager", "dump", "200"]]
    p = kvmnote("read", "--json", "--coredump", "100", env=env)
    assert p.returncode == 0 and len(json.loads(p.stdout)["vcpus"]) == 3


def test_coredump_vmcore(tmp_path: Path) -> None:
    two_cores(tmp_path)
    env = fake_env(tmp_path, [entry(2000, 200, tmp_path / "new")])
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")
    assert kvmnote("vmcore", str(tmp_path / "new"), "-o", str(tmp_path / "a")).returncode == 0
    p = kvmnote("vmcore", "--coredump", "200", "-o", str(tmp_path / "b"), env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_coredump_errors(tmp_path: Path) -> None:
    two_cores(tmp_path)
    env = fake_env(tmp_path, [entry(2000, 200, None, corefile="none"),
                              entry(1000, 100, tmp_path / "old")])
    p = kvmnote("read", "--coredump", "nosuch", env=env)
    assert (p.returncode, p.stderr) == (2, "kvmnote: --coredump nosuch: no core dump "
                                           "matches (coredumpctl: No coredumps found.)\n")
    p = kvmnote("read", "--coredump", "qemu-system-x86", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "newest matching crash (PID 200, /usr/bin/qemu-system-x86_64) has no stored " \
           "core (corefile: none)" in p.stderr
    env["PATH"] = str(tmp_path / "empty")            # no coredumpctl at all
    p = kvmnote("vmcore", "--coredump", "100", "-o", str(tmp_path / "v"), env=env)
    assert (p.returncode, p.stderr) == (2, "kvmnote: --coredump: coredumpctl not found "
                                           "(apt-get install systemd-coredump)\n")
