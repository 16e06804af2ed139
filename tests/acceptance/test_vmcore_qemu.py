"""`kvmnote vmcore` against the incumbent: QEMU's own dump-guest-memory of the same paused
instant, read by pyelftools and drgn. One L1 boot (our patched kernel under QEMU TCG, nested
SVM) runs Debian's QEMU with a real 6.12 guest twice: paused (QMP stop + dump-guest-memory,
then kill -SEGV) and running (kill -SEGV only).

Run: CI=true .venv/bin/python -m pytest -m acceptance tests/acceptance -s
"""

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qemurun  # noqa: E402
from qemurun import drgn_traces, per_cpu  # noqa: E402
from testlib import need  # noqa: E402

pytestmark = pytest.mark.acceptance
WORK = Path(os.environ.get("KVMNOTE_ACCEPTANCE_DIR", "/tmp/kvmnote-acceptance"))
QEMU_STATE_V1 = 432   # QEMUCPUState without kernel_gs_base (QEMU < 9.0 writes this)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def run() -> dict:
    """The L1 run's files, plus our vmcores of both scenarios."""
    need(os.geteuid() == 0, "must run as root")
    for tool in ("qemu-system-x86_64", "cpio", "gzip", "timeout"):
        need(shutil.which(tool) is not None, f"{tool} not installed")
    need(Path(qemurun.BUSYBOX).exists(), "busybox-static not installed")
    need(Path("/usr/src/linux-source-6.12.tar.xz").exists(),
         "linux-source-6.12 not installed (the kernels are built from it)")
    try:
        import drgn  # noqa: F401
    except ImportError:
        need(False, "drgn not installed (pip install drgn)")
    t0 = time.monotonic()
    host = qemurun.kernel("-c", "l1")
    guest = qemurun.kernel("-n", "--base", "guest")
    TIMINGS["kernels (build or cache)"] = time.monotonic() - t0
    need((guest.parent / "vmlinux").exists(), f"no vmlinux beside {guest}")
    r = qemurun.run(WORK, host, guest)
    TIMINGS["L1 initramfs"] = r["initramfs_s"]
    TIMINGS["L1 run (both scenarios)"] = r["l1_run_s"]
    out = r["out"]
    for name in ("paused", "running"):
        t = time.monotonic()
        vmcore = out / f"{name}.kvmnote-vmcore"
        proc = subprocess.run([sys.executable, "-m", "kvmnote", "vmcore", "--force",
                               str(out / f"{name}.core"), "-o", str(vmcore)],
                              capture_output=True, text=True)
        TIMINGS[f"kvmnote vmcore ({name})"] = time.monotonic() - t
        assert proc.returncode == 0, proc.stderr
        r[name] = vmcore
    r["vmlinux"] = guest.parent / "vmlinux"
    print("\nacceptance timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))
    return r


def notes(path: Path) -> list[tuple[str, int, bytes]]:
    """(owner, type, desc) of every note in the vmcore, raw."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        ph0 = elf.get_segment(0)
        assert ph0["p_type"] == "PT_NOTE", f"{path}: first program header is not PT_NOTE"
        data, out, off = ph0.data(), [], 0
        while off + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name = data[off + 12:off + 12 + namesz].rstrip(b"\0").decode()
            d0 = off + 12 + (namesz + 3) // 4 * 4
            out.append((name, ntype, data[d0:d0 + descsz]))
            off = d0 + (descsz + 3) // 4 * 4
        return out


def loads(path: Path) -> list[tuple[int, int, int]]:
    """(p_paddr, p_filesz, p_offset) of every PT_LOAD."""
    with open(path, "rb") as f:
        return [(s["p_paddr"], s["p_filesz"], s["p_offset"]) for s in ELFFile(f).iter_segments()
                if s["p_type"] == "PT_LOAD"]


def test_notes_in_qemu_order(run: dict) -> None:
    ours = [(n, t) for n, t, _ in notes(run["paused"])]
    ref = [(n, t) for n, t, _ in notes(Path(run["out"] / "paused.qemu-dump"))]
    assert ours == ref == [("CORE", 1)] * 2 + [("QEMU", 0)] * 2 + [("VMCOREINFO", 0)]


def test_prstatus_equals_qemu(run: dict) -> None:
    ours = [d for n, t, d in notes(run["paused"]) if n == "CORE"]
    ref = [d for n, t, d in notes(run["out"] / "paused.qemu-dump") if n == "CORE"]
    assert len(ours) == len(ref) == 2
    for cpu, (a, b) in enumerate(zip(ours, ref)):
        assert len(a) == len(b) == 336
        assert struct.unpack_from("<I", a, 32)[0] == cpu + 1
        regs_a, regs_b = struct.unpack_from("<27Q", a, 112), struct.unpack_from("<27Q", b, 112)
        diff = {i: (hex(x), hex(y)) for i, (x, y) in enumerate(zip(regs_a, regs_b)) if x != y}
        assert diff == {}, f"CPU {cpu}: pr_reg index: (ours, QEMU's) {diff}"
        assert a == b, f"CPU {cpu}: NT_PRSTATUS differs outside pr_reg"


def test_qemu_cpustate_equals_qemu(run: dict) -> None:
    ours = [d for n, t, d in notes(run["paused"]) if n == "QEMU"]
    ref = [d for n, t, d in notes(run["out"] / "paused.qemu-dump") if n == "QEMU"]
    for cpu, (a, b) in enumerate(zip(ours, ref)):
        assert len(a) == 440 and len(b) in (QEMU_STATE_V1, 440)
        assert struct.unpack_from("<II", a) == (1, 440)
        assert struct.unpack_from("<I", b)[0] == 1
        # Legitimately different: `size` (Debian 12's QEMU 7.2 has no kernel_gs_base).
        fa, fb = struct.unpack_from("<106I", a, 8), struct.unpack_from("<106I", b, 8)
        diff = {8 + 4 * i: (hex(x), hex(y)) for i, (x, y) in enumerate(zip(fa, fb)) if x != y}
        assert diff == {}, f"CPU {cpu}: QEMUCPUState offset: (ours, QEMU's) {diff}"
        if len(b) == 440:
            assert a[432:] == b[432:]
        else:  # still a kernel address, read from MSR_KERNEL_GS_BASE
            assert struct.unpack_from("<Q", a, 432)[0] >> 47 in (0, 0x1FFFF)


def test_vmcoreinfo_equals_qemu(run: dict) -> None:
    ours = [d for n, t, d in notes(run["paused"]) if n == "VMCOREINFO"]
    ref = [d for n, t, d in notes(run["out"] / "paused.qemu-dump") if n == "VMCOREINFO"]
    assert ours and ref and ours[0].startswith(b"OSRELEASE=6.12")
    assert b"CRASHTIME=" not in ours[0]
    assert ours[0].rstrip(b"\0") == ref[0].rstrip(b"\0")


def test_guest_ram_identical(run: dict) -> None:
    ours, ref = loads(run["paused"]), loads(run["out"] / "paused.qemu-dump")
    compared = 0
    with open(run["paused"], "rb") as fa, open(run["out"] / "paused.qemu-dump", "rb") as fb:
        for gpa, size, off in ref:
            left, pos = size, gpa
            while left:
                seg = [s for s in ours if s[0] <= pos < s[0] + s[1]]
                assert seg, f"guest-physical {pos:#x} (in QEMU's dump) is not in ours"
                n = min(left, seg[0][0] + seg[0][1] - pos, 1 << 20)
                a = os.pread(fa.fileno(), n, seg[0][2] + pos - seg[0][0])
                b = os.pread(fb.fileno(), n, off + pos - gpa)
                assert a == b, f"guest RAM differs in {pos:#x}..{pos + n:#x}"
                compared += n
                pos, left = pos + n, left - n
    assert compared >= (qemurun.GUEST_MIB - 1) << 20


def test_drgn_traces_equal_qemu(run: dict) -> None:
    ours = drgn_traces(run["paused"], run["vmlinux"])
    ref = drgn_traces(run["out"] / "paused.qemu-dump", run["vmlinux"])
    print("\ndrgn on kvmnote's vmcore (paused):\n" + ours)
    assert ours == ref
    cpus = per_cpu(ours)
    assert len(cpus) == 2
    comms = {k.split()[2] for k in cpus}
    assert "comm=dd" in comms, cpus
    idle = [v for k, v in cpus.items() if "comm=swapper" in k]
    assert idle and any("do_idle" in f for f in idle[0]), cpus


def test_drgn_running_guest(run: dict) -> None:
    text = drgn_traces(run["running"], run["vmlinux"])
    print("\ndrgn on kvmnote's vmcore (running guest):\n" + text)
    cpus = per_cpu(text)
    assert len(cpus) == 2
    for key, frames in cpus.items():
        assert "comm=dd" in key or "comm=swapper" in key, key
        assert frames, f"{key}: no stack trace"
        if "comm=swapper" in key:
            assert any(f in ("do_idle", "cpu_startup_entry") for f in frames), frames


TARBALL_61 = Path("/usr/src/linux-source-6.1.tar.xz")
CRASH_CMDS = "bt -a\nps\nquit\n"   # (`ps dd` would take "dd" for a hex task address)


def crash_output(vmlinux: Path, vmcore: Path) -> str:
    """`crash` (Debian 12: 8.0.2) running bt -a on a vmcore, without its banner."""
    p = subprocess.run(["crash", "-s", "--no_scroll", "--kaslr=auto", str(vmlinux), str(vmcore)],
                       input=CRASH_CMDS, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


@pytest.fixture(scope="module")
def run61() -> dict:
    """A paused 6.1 guest (crash 8.0.2 cannot read 6.12): QEMU's dump and ours."""
    need(shutil.which("crash") is not None, "crash not installed (apt-get install crash)")
    need(TARBALL_61.exists(), "linux-source-6.1 not installed (apt-get install "
         "linux-source-6.1)")
    need(os.geteuid() == 0 and shutil.which("qemu-system-x86_64") is not None,
         "root and qemu-system-x86_64 needed")
    host = qemurun.kernel("-c", "l1")
    guest = qemurun.kernel("-n", "--base", "guest61",
                           env=dict(os.environ, KVMNOTE_LINUX_TARBALL=str(TARBALL_61)))
    r = qemurun.run(WORK / "linux-6.1", host, guest, scenarios=("paused",))
    out = r["out"]
    proc = subprocess.run([sys.executable, "-m", "kvmnote", "vmcore", "--force",
                           str(out / "paused.core"), "-o", str(out / "paused.kvmnote-vmcore")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "vmlinux": guest.parent / "vmlinux"}


def crash_bt(out: str) -> dict[str, list[str]]:
    """crash's `bt -a` output: the "PID: ... COMMAND: ..." line of each CPU -> its frames."""
    traces: dict[str, list[str]] = {}
    key = None
    for line in out.splitlines():
        if line.startswith("PID: "):
            key = " ".join(line.split())
            traces[key] = []
        elif key and line.lstrip().startswith("#"):
            traces[key].append(line.split()[2])   # " #0 [ffff...] do_idle at ffff..."
        elif not line.strip():
            key = None
    return traces


def test_crash_bt_equals_qemu(run61: dict) -> None:
    # crash 8.0.2 opens both, relocates (KASLR) from the QEMU notes' IDT and CR3 and
    # unwinds each CPU from its NT_PRSTATUS. Its task list (`ps`) holds only the active
    # tasks on both files alike: 6.1.192 has the backported flexible pid.numbers[]
    # (b69f0aeb0689), which crash only learnt after 8.0.2.
    ours = crash_output(run61["vmlinux"], run61["out"] / "paused.kvmnote-vmcore")
    ref = crash_output(run61["vmlinux"], run61["out"] / "paused.qemu-dump")
    print("\ncrash on kvmnote's vmcore (6.1 guest):\n" + ours)
    assert ours == ref
    assert "read of stack" not in ours and "invalid size request" not in ours, ours
    traces = crash_bt(ours)
    assert len(traces) == 2, traces
    idle = [v for k, v in traces.items() if '"swapper/' in k]
    busy = [v for k, v in traces.items() if 'COMMAND: "dd"' in k]
    assert idle and "do_idle" in idle[0], traces
    assert busy and "ksys_read" in busy[0], traces
    assert any(line.split()[-1:] == ["dd"] and line.startswith(">") for line in ours.splitlines()), \
        "ps: dd is not an active task"


def test_drgn_traces_equal_qemu_61(run61: dict) -> None:
    """drgn on the 6.1 guest too: same per-CPU traces from ours as from QEMU's dump."""
    ours = drgn_traces(run61["out"] / "paused.kvmnote-vmcore", run61["vmlinux"])
    ref = drgn_traces(run61["out"] / "paused.qemu-dump", run61["vmlinux"])
    print("\ndrgn on kvmnote's vmcore (6.1 guest):\n" + ours)
    assert ours == ref
    cpus = per_cpu(ours)
    assert len(cpus) == 2 and any("comm=dd" in k for k in cpus), cpus
    idle = [v for k, v in cpus.items() if "comm=swapper" in k]
    assert idle and any("do_idle" in f for f in idle[0]), cpus


# --- kvmnote vmcore --format kdump on the same cores ------------------------------------
# crash 8.0.2 and drgn must give the same per-CPU traces from the kdump output as from the
# ELF output of the same core, in every compression.

KDUMP_ALGOS = ("zstd", "lzo", "snappy", "zlib")


def kvmnote_vmcore(core: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmnote", "vmcore", str(core), "-o",
                           str(out), *args], capture_output=True, text=True)


@pytest.mark.parametrize("scenario", ["paused", "running"])
def test_drgn_traces_kdump_equal_elf(run: dict, tmp_path: Path, scenario: str) -> None:
    core = run["out"] / f"{scenario}.core"
    assert kvmnote_vmcore(core, tmp_path / "elf").returncode == 0
    ref = drgn_traces(tmp_path / "elf", run["vmlinux"])
    cpus = per_cpu(ref)
    assert len(cpus) == 2 and all(cpus.values()), ref
    for algo in KDUMP_ALGOS:
        out = tmp_path / f"kdump.{algo}"
        p = kvmnote_vmcore(core, out, "--format", "kdump", "--compress", algo)
        assert p.returncode == 0, p.stderr
        assert drgn_traces(out, run["vmlinux"]) == ref, algo
    print(f"\ndrgn on the kdump output ({scenario}, all compressions):\n{ref}")


def test_612_guest_refused_by_makedumpfile_1_7_2(run: dict, tmp_path: Path) -> None:
    """-d 31 goes through makedumpfile, which must refuse a kernel it does not know."""
    need(shutil.which("makedumpfile") is not None, "makedumpfile not installed")
    out = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    need("1.7.2" in out, "this test knows Debian 12's makedumpfile 1.7.2 (no 6.12 support)")
    p = kvmnote_vmcore(run["out"] / "paused.core", tmp_path / "k", "--format", "kdump",
                       "-d", "31", "--compress", "lzo")
    assert p.returncode == 2 and "does not know this guest's kernel version" in p.stderr
    assert p.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_crash_bt_kdump_equal_elf_61(run61: dict, tmp_path: Path) -> None:
    core, vmlinux = run61["out"] / "paused.core", run61["vmlinux"]
    assert kvmnote_vmcore(core, tmp_path / "elf").returncode == 0
    ref = crash_output(vmlinux, tmp_path / "elf")
    traces = crash_bt(ref)
    assert len(traces) == 2 and all(traces.values()), ref
    outs = {}
    for algo in KDUMP_ALGOS:
        out = tmp_path / f"kdump.{algo}"
        assert kvmnote_vmcore(core, out, "--format", "kdump", "--compress", algo).returncode == 0
        got = crash_output(vmlinux, out)
        assert crash_bt(got) == traces, (algo, got)
        outs[algo] = got
    print(f"\ncrash bt -a on the kdump output (6.1 guest):\n{outs['zstd']}")
    drgn_ref = drgn_traces(tmp_path / "elf", vmlinux)
    assert drgn_traces(tmp_path / "kdump.zstd", vmlinux) == drgn_ref

