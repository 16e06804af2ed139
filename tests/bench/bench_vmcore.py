"""`kvmnote vmcore` on a multi-GiB synthetic core: throughput against `cp --sparse=always`
of the same bytes (goal: ratio >= 0.8) and peak RSS (goal: < 100 MiB), in one run.

Run: python tests/bench/bench_vmcore.py [GIB]   (prints figures, asserts nothing)
Both tools read the core from the page cache (a warm-up cp runs first), each runs 5 times,
alternating, after a sync; the ratio is given best against best and median against median
(this machine's writeback makes single runs vary by 1.5x). Every 4th page of guest RAM is zero: both
leave those as holes.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import corebuilder as cb  # noqa: E402
from kvmnote import schema as S  # noqa: E402

MIB = 1 << 20
REPEAT = 5
UADDR = 0x7F0000000000


def make_core(path: Path, gib: int) -> int:
    """A one-VM, 2-vCPU core whose one RAM slot is `gib` GiB of data, 1/4 zero pages."""
    size = gib << 30
    vm = {"vm_index": 0, "vendor": 1, "nr_vcpus": 2, "vm_type": 0, "flags": 0, "pid": 1,
          "reserved": 0}
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(
        vm, [cb.memslot(0, 0, size, UADDR)])))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(
        cb.sample_vcpu(i)))) for i in range(2))
    cb.write_core(path, notes, [cb.Load(UADDR, size, size)])
    with open(path, "rb") as f:
        f.seek(64 + 56)
        off = int.from_bytes(f.read(56)[8:16], "little")   # the PT_LOAD's p_offset
    block = bytearray(os.urandom(MIB))
    for page in range(3 * 4096, MIB, 4 * 4096):            # every 4th page is zero
        block[page:page + 4096] = bytes(4096)
    with open(path, "r+b") as f:
        f.seek(off)
        for _ in range(size // MIB):
            f.write(block)
    return size


# kvmnote in a child that prints its own VmHWM at exit: getrusage's ru_maxrss also counts
# the forked Python parent's pages from before exec (a ~27 MiB floor for any child).
KVMNOTE = """
import sys
from kvmnote.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(int(hwm) * 1024)
sys.exit(rc)
"""


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall time, ru_maxrss (bytes) and stdout of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {cmd}")
    return elapsed, usage.ru_maxrss * 1024, out


def main() -> None:
    """Build the core, run cp and kvmnote vmcore, print the figures."""
    gib = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        core, out = Path(d) / "core", Path(d) / "vmcore"
        t = time.perf_counter()
        size = make_core(core, gib)
        print(f"synthetic core: {gib} GiB of guest RAM, written in "
              f"{time.perf_counter() - t:.1f} s")
        cp = ["cp", "--sparse=always", str(core), str(out)]
        kv = [sys.executable, "-c", KVMNOTE, "vmcore", str(core), "-o", str(out)]
        timed(cp)                                   # warm the page cache
        runs: dict[str, list[tuple[float, int, str]]] = {"cp": [], "kv": []}
        for _ in range(REPEAT):                     # alternate; flush dirty pages first
            for name, cmd in (("cp", cp), ("kv", kv)):
                out.unlink(missing_ok=True)
                os.sync()
                runs[name].append(timed(cmd))
        t_cp, rss_cp, _ = min(runs["cp"])
        t_kv, rss_kv, hwm = min(runs["kv"])
        on_disk = out.stat().st_blocks * 512
        print(f"cp --sparse=always: {t_cp:.2f} s, {size / MIB / t_cp:.0f} MiB/s, "
              f"peak RSS {rss_cp / MIB:.1f} MiB")
        print(f"kvmnote vmcore:     {t_kv:.2f} s, {size / MIB / t_kv:.0f} MiB/s, "
              f"peak RSS {rss_kv / MIB:.1f} MiB by getrusage, {int(hwm) / MIB:.1f} MiB "
              f"by its own VmHWM (goal < 100 MiB)")
        med_cp = statistics.median(r[0] for r in runs["cp"])
        med_kv = statistics.median(r[0] for r in runs["kv"])
        print(f"throughput ratio kvmnote/cp: best {t_cp / t_kv:.2f}, median {med_cp / med_kv:.2f} "
              f"(goal >= 0.8; medians cp {med_cp:.2f} s, kvmnote {med_kv:.2f} s)")
        print(f"vmcore: {out.stat().st_size / MIB:.0f} MiB apparent, "
              f"{on_disk / MIB:.0f} MiB on disk (zero pages left as holes)")


if __name__ == "__main__":
    main()
