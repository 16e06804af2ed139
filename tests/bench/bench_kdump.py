"""`kvmnote vmcore` on a written guest of >= 4 GiB: the ELF output against
`cp --sparse=always`, the kdump output against Debian's makedumpfile (same dump level and
compression, from our ELF output) and against QEMU's own dump-guest-memory kdump formats;
sizes, times, peak RSS. Prints figures, asserts nothing.

    python tests/bench/tcg_guest.py DIR 4.5 && python tests/bench/bench_kdump.py DIR
    python tests/bench/bench_kdump.py --synthetic [GIB]

DIR (tcg_guest.py): a real Linux guest booted under QEMU TCG, its RAM written with real
files, random data and an awk heap, dumped by QEMU (its kdump formats timed there) and
wrapped as a VMM core. makedumpfile needs such a real kernel: it takes the RAM it filters
from the guest kernel's own memory map.

--synthetic: no kernel, so no makedumpfile; guest RAM (QEMU's pc layout: 3 GiB below 4 GiB,
the rest above) in 2 MiB regions chosen at random (seeded): 45% real files from /usr
(page-aligned, as a page cache), 17.5% random bytes, 17.5% heap-like words (direct-map
pointers, small integers, strings), 20% zero; QEMU 7.2 then maps the same image as its
paused guest's memory (memory-backend-file) and dumps it.

Every command runs once, after a sync, with its input in the page cache; the ratios are of
runs in this one process (this machine is shared: absolute times vary).
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


def make_ram(path: Path, size: int) -> float:
    """The synthetic RAM image; returns the seconds it took."""
    rng = random.Random(13)
    files = file_pages()
    heaps = [heap_region(rng) for _ in range(16)]
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, REGION):
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
    return time.perf_counter() - t


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


def timed(cmd: list[str]) -> tuple[float, str, str]:
    """Wall time, stdout and stderr of a command, after a sync."""
    os.sync()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-1000:]}")
    return dt, p.stdout, p.stderr


def sizes(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size / MIB:.0f} MiB apparent, {st.st_blocks * 512 / MIB:.0f} MiB on disk"


def disk(path: Path) -> int:
    return path.stat().st_blocks * 512


def kvmnote(core: Path, out: Path, *args: str) -> tuple[float, int]:
    out.unlink(missing_ok=True)
    dt, hwm, _ = timed([sys.executable, "-c", KVMNOTE, "vmcore", str(core), "-o", str(out),
                        *args])
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


def compare(d: Path, core: Path, size: int, makedumpfile: bool) -> dict:
    """ELF against cp, kdump in each compression, makedumpfile; returns our kdump figures."""
    elf = d / "guest.elf"
    subprocess.run(["cat", str(core)], stdout=subprocess.DEVNULL, check=True)  # cache it
    (d / "cp").unlink(missing_ok=True)
    t_cp, _, _ = timed(["cp", "--sparse=always", str(core), str(d / "cp")])
    (d / "cp").unlink()
    t_elf, hwm = kvmnote(core, elf)
    print(f"ELF: kvmnote {t_elf:.1f} s (peak RSS {hwm / MIB:.0f} MiB), cp --sparse=always "
          f"{t_cp:.1f} s: ratio (cp time / kvmnote time) {t_cp / t_elf:.2f}; {sizes(elf)}")
    ours = {}
    for algo in ("zstd", "lzo", "snappy", "zlib"):
        out = d / f"kdump.{algo}"
        dt, hwm = kvmnote(core, out, "--format", "kdump", "--compress", algo)
        ours[algo] = (dt, disk(out), out.stat().st_size)
        print(f"kdump -d 1 {algo:6}: kvmnote {dt:.1f} s ({size / MIB / dt:.0f} MiB/s of "
              f"guest RAM), peak RSS {hwm / MIB:.0f} MiB, {sizes(out)}")
        out.unlink()
    if makedumpfile and shutil.which("makedumpfile"):
        for algo, flag in (("lzo", "-l"), ("zlib", "-c")):
            out = d / f"makedumpfile.{algo}"
            out.unlink(missing_ok=True)
            dt, _, _ = timed(["makedumpfile", flag, "-d", "1", str(elf), str(out)])
            t_k, s_k, a_k = ours[algo]
            print(f"makedumpfile {flag} -d 1 ({algo}) from our ELF: {dt:.1f} s, {sizes(out)}; "
                  f"kvmnote from the core: {dt / t_k:.2f}x as fast (makedumpfile time / "
                  f"ours), {t_elf + dt:.1f} s for kvmnote ELF + makedumpfile; our size "
                  f"{s_k / disk(out):.3f}x on disk, {a_k / out.stat().st_size:.3f}x apparent")
            out.unlink()
        out = d / "makedumpfile.31"
        out.unlink(missing_ok=True)
        dt, said, err = timed(["makedumpfile", "-l", "-d", "31", str(elf), str(out)])
        print(f"makedumpfile -l -d 31 from our ELF: {dt:.1f} s, {sizes(out)}"
              + (" (it warns: kernel version not supported)" if "not supported" in said + err
                 else ""))
        out.unlink()
    else:
        print("makedumpfile: not compared (it needs a real guest kernel: use tcg_guest.py)")
    elf.unlink()
    return ours


def main() -> None:
    if sys.argv[1:2] == ["--synthetic"]:
        synthetic(int(sys.argv[2]) if len(sys.argv) > 2 else 4)
        return
    d = Path(sys.argv[1])
    times = json.loads((d / "times.json").read_text())
    core = d / "core"
    with open(core, "rb") as f:       # guest RAM = the VMM core's PT_LOADs
        from elftools.elf.elffile import ELFFile
        size = sum(s["p_filesz"] for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")
    print(f"guest: real Linux under QEMU TCG, {size / GIB:.2f} GiB of RAM (tcg_guest.py, "
          f"boot and fill {times.get('boot and fill (host wall)', 0):.0f} s)")
    compare(d, core, size, True)
    for fmt in ("kdump-zlib", "kdump-lzo", "kdump-snappy"):
        ref = d / f"qemu.{fmt}"
        if fmt not in times or not ref.exists():
            print(f"QEMU {fmt}: not available in this QEMU")
            continue
        algo = fmt.split("-")[1]
        mine = d / "kdump.d0"
        t_k, _ = kvmnote(core, mine, "--format", "kdump", "--compress", algo, "-d", "0")
        print(f"QEMU dump-guest-memory {fmt} (paused guest, flattened): {times[fmt]:.1f} s, "
              f"{sizes(ref)}; kvmnote -d 0 (zero pages kept, as QEMU) from the core "
              f"{t_k:.1f} s, {sizes(mine)}: {times[fmt] / t_k:.2f}x as fast, "
              f"{disk(mine) / disk(ref):.3f}x the size")
        mine.unlink()


def synthetic(gib: int) -> None:
    size = gib * GIB
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        d = Path(d)
        ram, core = d / "ram.img", d / "core"
        t = make_ram(ram, size)
        make_core(core, ram, size)
        print(f"guest: synthetic, {gib} GiB, {disk(ram) / size:.0%} of it non-zero regions; "
              f"built in {t:.0f} s")
        compare(d, core, size, False)
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
