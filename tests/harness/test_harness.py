"""The harness's own parts, without a machine: the kvmnote-read wrapper's schema
/2 normalisation, the cpio writer, the serial file transfer, the v2 switch and the
test VMM's argument checks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import REPO, kvmnote_read
from harness.cpio import Cpio
from harness.machines import HarnessError, _chs, find_splats
from harness.transfer import SEND_FILES_SH, parse_console, tar_disk
from harness.vmm import build_vmm
from testlib import need

EXAMPLE = REPO / "examples" / "svm-vmm.core.zst"


def as_schema2(obj):
    """What kvmnote-read/2 will write: every integer as a lowercase hex string."""
    if isinstance(obj, dict):
        return {k: ("kvmnote-read/2" if k == "schema" else as_schema2(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_schema2(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and obj >= 0:
        return hex(obj)
    return obj


def test_read_example():
    r = kvmnote_read.read(EXAMPLE)
    assert r.rc == 0, r.text
    assert r.data["schema"] == "kvmnote-read/2" and len(r.data["vcpus"]) == 2
    assert isinstance(r.data["vcpus"][0]["regs"]["rip"], int)   # normalised from "0x..."


def test_schema2_normalises_to_schema1_values():
    doc = kvmnote_read.read(EXAMPLE).data
    two = json.loads(json.dumps(as_schema2(doc)))
    assert two["vcpus"][0]["regs"]["rip"].startswith("0x")
    back = kvmnote_read.normalise(two)
    assert {**back, "schema": doc["schema"]} == doc


def test_normalise_leaves_other_strings():
    assert kvmnote_read.normalise({"a": "0xABC", "b": "0x", "c": "hlt", "d": "0x1f",
                                   "e": ["0x10"]}) == \
        {"a": "0xABC", "b": "0x", "c": "hlt", "d": 31, "e": [16]}


def test_read_rejects_unknown_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(kvmnote_read, "SCHEMAS", ("kvmnote-read/9",))
    with pytest.raises(AssertionError, match="schema"):
        kvmnote_read.read(EXAMPLE)


def test_cpio_extracts_with_gnu_cpio(tmp_path):
    need(shutil.which("cpio") is not None, "cpio not installed")
    c = Cpio()
    c.file("a/b/c.txt", b"hello", 0o640)
    c.symlink("a/link", "b/c.txt")
    c.dir("empty/dir")
    c.close()
    subprocess.run(["cpio", "-i", "-d", "--quiet"], input=c.out.getvalue(), cwd=tmp_path,
                   check=True)
    assert (tmp_path / "a/b/c.txt").read_bytes() == b"hello"
    assert (tmp_path / "a/b/c.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a/link").read_bytes() == b"hello"
    assert (tmp_path / "empty/dir").is_dir()


def test_serial_transfer_round_trip(tmp_path):
    for tool in ("bzip2", "base64", "sha256sum"):
        need(shutil.which(tool) is not None, f"{tool} not installed")
    src = tmp_path / "out"
    (src / "s1").mkdir(parents=True)
    files = {"s1/core": bytes(range(256)) * 300, "rc": b"134\n", "s1/empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    log = subprocess.run(["sh", "-c", SEND_FILES_SH + f"\nsend_files {src}"],
                         capture_output=True, text=True, check=True).stdout
    got, errors = parse_console("noise\n" + log.replace("===EOF", "[ 1.0] kmsg\n===EOF", 1))
    assert errors == [] and got == files
    lines = log.splitlines()
    bad = "\n".join(lines[:1] + ["A" + lines[1][1:]] + lines[2:])  # one corrupted line
    got, errors = parse_console(bad)
    assert len(errors) == 1 and len(got) == len(files) - 1


def test_splats_ignore_transferred_files():
    """A file's base64 may spell "Oops" (a CI run failed on one): only the base64
    lines inside a file's markers are exempt, a kernel message among them is not."""
    data = "ZvzVkg+5300jic50/b/2Sl1Xr8UG10HTcM8Oops1H7uBH5vJ6N4ykfGy8X6ntKf78F59NPY7T0J6"
    oops = "[   12.5] Oops: general protection fault, probably for non-canonical address"
    log = "\n".join(["boot", "===FILE ./s1/core 00 4", data, oops, data, "===EOF", data,
                     "WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:1 f+0x1/0x2"])
    assert find_splats(log) == [oops, data, "WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:1 f+0x1/0x2"]


@pytest.mark.parametrize("args,msg", [
    (["--mode", "bogus"], "--mode bogus"), (["--halt", "-3"], "--halt -3"),
    (["--halt", "2x"], "--halt 2x"), (["--crash", "oops"], "--crash oops"),
    (["--coredump-filter", "zz"], "--coredump-filter zz"),
    (["--close-vcpu-fd", "3", "--halt", "2"], "not a halted vCPU"),
    (["--irqchip", "--halt", "1"], "--irqchip"),
    (["--nstuck", "257"], "--nstuck 257"), (["--halt", "1", "--nstuck", "256"], "too many"),
    (["--smm", "--halt", "0", "--spin", "1"], "--smm"),
])
def test_vmm_rejects_bad_arguments(tmp_path, args, msg):
    """Bad arguments: one line on stderr, exit 2, nothing run."""
    need(shutil.which("gcc") is not None and shutil.which("make") is not None,
         "gcc/make not installed (the test VMM is built static)")
    p = subprocess.run([str(build_vmm()), "--report", str(tmp_path / "r.json"), *args],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert msg in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "r.json").exists()


def test_bochs_disk_geometry(tmp_path):
    """Bochs sizes an ATA disk by its geometry: it must cover the image exactly."""
    for size in (1789919232, 256 << 20, 1 << 20):     # the rootfs seen here, out.img, in.tar
        img = tmp_path / "d.img"
        img.write_bytes(b"")
        with open(img, "r+b") as f:
            f.truncate(size)
        c, h, s = _chs(img)
        assert c * h * s * 512 == size and h <= 16 and s <= 63 and c <= 65535
    with open(img, "r+b") as f:
        f.truncate(512 * 65537 * 3)     # 3 * a prime: no geometry of at most 16 x 63
    with pytest.raises(HarnessError):
        _chs(img)


def test_tar_disk_whole_mib(tmp_path):
    disk = tar_disk(tmp_path / "in.tar", {"a": b"x" * 3000})
    assert disk.stat().st_size == 1 << 20
    import tarfile
    with tarfile.open(disk) as t:
        assert t.getnames() == ["a"] and t.extractfile("a").read() == b"x" * 3000
