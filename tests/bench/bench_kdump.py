"""`kvmnote vmcore` on a written 4 GiB guest: the ELF output against `cp --sparse=always`,
the kdump output against Debian's makedumpfile (same dump level and compression, from our
ELF output) and against QEMU's own dump-guest-memory kdump formats; sizes, times, peak RSS.

Run: python tests/bench/bench_kdump.py [GIB] [REAL_CORE]   (prints figures, asserts nothing)

The guest RAM (default 4 GiB, QEMU's pc layout: 3 GiB below 4 GiB, the rest above) is
"mostly written with realistic content", 2 MiB regions chosen at random (seeded):
 - 45% page cache: the bytes of real files under /usr (page-aligned, tails zero-filled);
 - 35% anonymous memory: half random bytes (compressed or encrypted data), half heap-like
   pages (kernel direct-map pointers, small integers and short strings);
 - 20% free (zero) pages.
makedumpfile needs a real kernel in that RAM (it reads init_uts_ns, page tables, ...): with
REAL_CORE (a VMM core written by the patched kernel, e.g. the acceptance tier's
paused.core), the guest's RAM in that core is copied to the start of the image, so the first
MiBs are a real Linux guest (kernel, VMCOREINFO) and the rest is the content above; without
it the makedumpfile comparison is skipped (and said so).

Every command runs once, after a sync, with the core in the page cache; ratios are of runs
in this same process. QEMU 7.2 maps the RAM image as its guest's memory
(memory-backend-file, share=off) and dumps it paused (-S, TCG) over QMP: the time is the
dump-guest-memory command's alone.
"""

import array
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import corebuilder as cb  # noqa: E402
from kvmnote import schema as S  # noqa: E402
from kvmnote.core import open_core  # noqa: E402

MIB, GIB, PAGE = 1 << 20, 1 << 30, 4096
REGION = 2 * MIB
UADDR = 0x7F0000000000
LOW = 3 * GIB          # QEMU pc, >= 3.5 GiB of RAM: 3 GiB below 4 GiB


def file_pages() -> "iter[bytes]":
    """Real files under /usr, page-aligned as in a page cache, 2 MiB at a time, forever."""
    buf = bytearray()
    while True:
        for root in ("/usr/lib", "/usr/share", "/usr/bin"):
            for dirpath, _, names in os.walk(root):
                for name in sorted(names):
                    p = os.path.join(dirpath, name)
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    try:
                        with open(p, "rb") as f:
                            data = f.read(64 * MIB)
                    except OSError:
                        continue
                    buf += data + bytes(-len(data) % PAGE)
                    while len(buf) >= REGION:
                        yield bytes(buf[:REGION])
                        del buf[:REGION]


def heap_region(rng: random.Random) -> bytes:
    """Heap-like memory: 64-bit words that are direct-map pointers, small ints, strings."""
    words = array.array("Q")
    base = 0xFFFF888000000000
    for _ in range(REGION // 8 // 16):
        kind = rng.random()
        if kind < 0.5:
            words.extend(base + rng.randrange(1 << 30) * 8 for _ in range(16))
        elif kind < 0.8:
            words.extend(rng.randrange(1 << rng.choice((8, 16, 32))) for _ in range(16))
        else:
            text = rng.choice((b"/usr/lib/x86_64-linux-gnu/", b"kworker/u8:2", b"eth0",
                               b"GET /index.html HTTP/1.1\r\n", b"systemd-journald"))
            words.frombytes((text * 16)[:128])
    return words.tobytes()


def make_ram(path: Path, size: int, real: Path | None) -> tuple[int, int]:
    """The RAM image; returns (bytes from the real core, seconds)."""
    rng = random.Random(13)
    files = file_pages()
    heaps = [heap_region(rng) for _ in range(16)]
    t = time.perf_counter()
    real_len = 0
    with open(path, "wb") as f:
        f.truncate(size)
        if real:
            with open_core(str(real)) as core:
                for gpa, n, _ in core.guest_ranges(core.vms[0].vm_index):
                    if gpa + n <= LOW:
                        f.seek(gpa)
                        for off in range(0, n, REGION):
                            f.write(core.read_guest_phys(gpa + off, min(REGION, n - off)))
                        real_len = max(real_len, gpa + n)
        start = (real_len + REGION - 1) // REGION * REGION
        for off in range(start, size, REGION):
            kind = rng.random()
            if kind < 0.45:
                data = next(files)
            elif kind < 0.625:
                data = os.urandom(REGION)
            elif kind < 0.8:
                data = heaps[rng.randrange(len(heaps))]
            else:
                continue                      # free memory: zeros (a hole)
            f.seek(off)
            f.write(data)
    return real_len, time.perf_counter() - t


def make_core(core: Path, ram: Path, size: int) -> None:
    """A one-VM, 2-vCPU VMM core whose memory is the RAM image (slots as QEMU's pc)."""
    vm = {"vm_index": 0, "vendor": 1, "nr_vcpus": 2, "vm_type": 0, "flags": 0, "pid": 1,
          "reserved": 0}
    slots = [cb.memslot(0, 0, min(size, LOW), UADDR)]
    if size > LOW:
        slots.append(cb.memslot(1, 1 << 32, size - LOW, UADDR + LOW))
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, slots)))
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(
        cb.sample_vcpu(i)))) for i in range(2))
    cb.write_core(core, notes, [cb.Load(UADDR, size, size)])
    with open(core, "rb") as f:
        f.seek(64 + 56)
        off = int.from_bytes(f.read(56)[8:16], "little")   # the PT_LOAD's p_offset
    with open(ram, "rb") as src, open(core, "r+b") as dst:
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(src.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(src.fileno(), pos, os.SEEK_HOLE)
            except OSError:
                break
            while pos < end:
                pos += os.copy_file_range(src.fileno(), dst.fileno(), end - pos, pos, off + pos)


KVMNOTE = """
import sys
from kvmnote.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(int(hwm) * 1024)
sys.exit(rc)
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall time and stdout of a command, after a sync."""
    os.sync()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-1000:]}")
    return dt, p.stdout


def sizes(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size / MIB:.0f} MiB apparent, {st.st_blocks * 512 / MIB:.0f} MiB on disk"


def disk(path: Path) -> int:
    return path.stat().st_blocks * 512


def kvmnote(core: Path, out: Path, *args: str) -> tuple[float, int]:
    out.unlink(missing_ok=True)
    dt, hwm = timed([sys.executable, "-c", KVMNOTE, "vmcore", str(core), "-o", str(out), *args])
    return dt, int(hwm.split()[-1])


def qemu_dump(ram: Path, size: int, out: Path, fmt: str) -> float | None:
    """QEMU's dump-guest-memory of a paused guest whose RAM is the image; its time."""
    if not shutil.which("qemu-system-x86_64"):
        return None
    out.unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-machine",
           "pc,accel=tcg,memory-backend=ram0", "-m", f"{size // MIB}M", "-object",
           f"memory-backend-file,id=ram0,size={size // MIB}M,mem-path={ram},share=off",
           "-qmp", "stdio"]
    q = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def qmp(obj: dict) -> dict:
        q.stdin.write(json.dumps(obj) + "\n")
        q.stdin.flush()
        while True:
            reply = json.loads(q.stdout.readline())
            if "return" in reply or "error" in reply:
                return reply

    try:
        json.loads(q.stdout.readline())                       # greeting
        qmp({"execute": "qmp_capabilities"})
        os.sync()
        t = time.perf_counter()
        r = qmp({"execute": "dump-guest-memory", "arguments": {
            "paging": False, "protocol": f"file:{out}", "format": fmt}})
        dt = time.perf_counter() - t
        if "error" in r:
            print(f"QEMU {fmt}: {r['error']}")
            return None
        qmp({"execute": "quit"})
        return dt
    finally:
        q.kill()
        q.wait()


def main() -> None:
    gib = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    real = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    size = gib * GIB
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        d = Path(d)
        ram, core, elf = d / "ram.img", d / "core", d / "guest.elf"
        real_len, t = make_ram(ram, size, real)
        make_core(core, ram, size)
        print(f"guest: {gib} GiB, {disk(ram) / size:.0%} of it non-zero regions, "
              f"{real_len / MIB:.0f} MiB from the real core {real}; built in {t:.0f} s")
        subprocess.run(["cat", str(core)], stdout=subprocess.DEVNULL, check=True)  # cache it
        (d / "cp").unlink(missing_ok=True)
        t_cp, _ = timed(["cp", "--sparse=always", str(core), str(d / "cp")])
        (d / "cp").unlink()
        t_elf, hwm = kvmnote(core, elf)
        print(f"ELF: kvmnote {t_elf:.1f} s (peak RSS {hwm / MIB:.0f} MiB), cp --sparse=always "
              f"{t_cp:.1f} s: ratio (cp time / kvmnote time) {t_cp / t_elf:.2f}; {sizes(elf)}")
        ours = {}
        for algo in ("zstd", "lzo", "zlib", "snappy"):
            out = d / f"kdump.{algo}"
            dt, hwm = kvmnote(core, out, "--format", "kdump", "--compress", algo)
            ours[algo] = (dt, disk(out))
            print(f"kdump -d 1 {algo:6}: kvmnote {dt:.1f} s ({size / MIB / dt:.0f} MiB/s of "
                  f"guest RAM), peak RSS {hwm / MIB:.0f} MiB, {sizes(out)}")
            if algo != "zstd":
                out.unlink()
        if real and shutil.which("makedumpfile"):
            for algo, flag in (("lzo", "-l"), ("zlib", "-c")):
                out = d / f"makedumpfile.{algo}"
                out.unlink(missing_ok=True)
                dt, _ = timed(["makedumpfile", flag, "-d", "1", str(elf), str(out)])
                t_k, s_k = ours[algo]
                print(f"makedumpfile {flag} -d 1 ({algo}) from our ELF: {dt:.1f} s, "
                      f"{sizes(out)}; kvmnote from the core is {dt / t_k:.2f}x as fast, "
                      f"its output {s_k / disk(out):.3f}x the size")
                out.unlink()
        else:
            print("makedumpfile: not compared (needs REAL_CORE: a real guest kernel in RAM)")
        elf.unlink()
        for algo in ("zlib", "lzo", "snappy"):
            out = d / f"qemu.{algo}"
            dt = qemu_dump(ram, size, out, f"kdump-{algo}")
            if dt is None:
                continue
            mine = d / "kdump.d0"
            t_k, _ = kvmnote(core, mine, "--format", "kdump", "--compress", algo, "-d", "0")
            print(f"QEMU dump-guest-memory kdump-{algo}: {dt:.1f} s, {sizes(out)}; kvmnote "
                  f"-d 0 (zero pages kept, as QEMU) {t_k:.1f} s, {sizes(mine)}: "
                  f"{dt / t_k:.2f}x as fast, {disk(mine) / disk(out):.3f}x the size")
            out.unlink()
            mine.unlink()


if __name__ == "__main__":
    main()
