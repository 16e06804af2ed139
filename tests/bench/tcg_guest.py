"""A real, written Linux guest of several GiB, cheaply: the acceptance tier's guest kernel
booted directly under QEMU TCG (not nested: the nested guest writes memory far slower, see
nested_write_speed.py), its RAM filled with real files and random data, then dumped by
QEMU (ELF, and each kdump format QEMU was built with) and wrapped as a VMM core with KVM
notes, the input `kvmnote vmcore` takes.

    python tests/bench/tcg_guest.py OUTDIR [GIB]    # writes OUTDIR/core, prints timings

The guest (GIB of RAM, default 4.5): its initramfs holds 1.75 GiB of real files from /usr
(unpacked into the rootfs: page cache), /init writes 1 GiB of /dev/urandom into a tmpfs
(shmem) and a busybox awk builds a heap of strings (anonymous memory), then the guest idles.
The vCPU notes of the VMM core are the unit tests' sample values but for CR3, QEMU's (the
benchmarks read memory, not registers); guest RAM, the kernel and its VMCOREINFO are real.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "acceptance"))
sys.path.insert(0, str(HERE.parent / "unit"))
import corebuilder as cb  # noqa: E402
import qemurun  # noqa: E402
from elftools.elf.elffile import ELFFile  # noqa: E402
from kvmnote import schema as S  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
UADDR = 0x7F0000000000
FILES_BYTES = 1792 * MIB     # QEMU loads an initrd below 2 GiB

INIT = """#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /w; mount -t tmpfs -o size=2g w /w
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/urandom of=/w/random bs=1M count=1024 2>/dev/null
awk 'BEGIN { for (i = 0; i < 400000; i++) h[i] = "task " i " /usr/lib/x86_64-linux-gnu/lib" i ".so.6 state=S"; print "heap built"; while (1) system("sleep 1000") }' > /dev/ttyS0 &
sleep 20
t1=$(cut -d' ' -f1 /proc/uptime)
echo "KVMNOTE-FILLED $t0 $t1" > /dev/ttyS0
while :; do sleep 1000; done
"""


def initramfs(work: Path) -> Path:
    """busybox + /init, then (a second, concatenated cpio) ~2 GiB of real files."""
    tree = work / "root"
    shutil.rmtree(tree, ignore_errors=True)
    qemurun._busybox_tree(tree, INIT)
    out = work / "initramfs.cpio"
    listing, total = [], 0
    for dirpath, _, names in os.walk("/usr/lib"):
        for name in sorted(names):
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p) and total < FILES_BYTES:
                listing.append(p.lstrip("/"))
                total += os.path.getsize(p)
    with open(out, "wb") as f:
        for cwd, names in ((tree, None), (Path("/"), listing)):
            find = None if names else subprocess.Popen(["find", "."], cwd=cwd,
                                                       stdout=subprocess.PIPE)
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=cwd,
                                    stdin=find.stdout if find else subprocess.PIPE, stdout=f)
            if names:
                cpio.communicate("\n".join(names).encode() + b"\n")
            if cpio.wait() or (find and find.wait()):
                raise SystemExit("cpio failed")
    print(f"initramfs: {out.stat().st_size / MIB:.0f} MiB ({total / MIB:.0f} MiB of files "
          f"from /usr/lib)")
    return out


class Qmp:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.p = proc
        json.loads(proc.stdout.readline())
        self("qmp_capabilities")

    def __call__(self, cmd: str, **args) -> dict:
        self.p.stdin.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.p.stdin.flush()
        while True:
            r = json.loads(self.p.stdout.readline())
            if "return" in r or "error" in r:
                return r


def run_guest(work: Path, kernel: Path, rd: Path, mib: int) -> dict[str, float]:
    """Boot, fill, stop, dump (ELF and QEMU's kdump formats); the dumps' times."""
    log = work / "guest.log"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", str(mib),
           "-machine", "pc", "-nodefaults", "-display", "none", "-vga", "none",
           "-serial", f"file:{log}", "-kernel", str(kernel), "-initrd", str(rd),
           "-append", "console=ttyS0 panic=-1 rdinit=/init", "-qmp", "stdio"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    times: dict[str, float] = {}
    try:
        qmp = Qmp(p)
        t = time.monotonic()
        while "KVMNOTE-FILLED" not in log.read_text(errors="replace"):
            if time.monotonic() - t > 1800 or p.poll() is not None:
                raise SystemExit("guest did not fill its memory:\n"
                                 + log.read_text(errors="replace")[-3000:])
            time.sleep(2)
        times["boot and fill (host wall)"] = time.monotonic() - t
        qmp("stop")
        for fmt in ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy"):
            out = work / f"qemu.{fmt}"
            os.sync()
            t = time.monotonic()
            r = qmp("dump-guest-memory", paging=False, protocol=f"file:{out}", format=fmt)
            if "error" in r:
                print(f"QEMU {fmt}: {r['error']['desc']}")
                out.unlink(missing_ok=True)
                continue
            times[fmt] = time.monotonic() - t
        qmp("quit")
    finally:
        p.kill()
        p.wait()
    print(f"guest: {log.read_text(errors='replace').splitlines()[-1]}")
    return times


def qemu_cr3(elf: ELFFile) -> list[int]:
    """Each CPU's CR3 from the QEMU notes (QEMUCPUState: cr[3] at offset 416)."""
    out = []
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            for note in seg.iter_notes():
                if note["n_name"] == "QEMU":
                    out.append(int.from_bytes(note["n_descdata"][416:424], "little"))
    return out


def vmm_core(elf: Path, core: Path) -> int:
    """QEMU's ELF dump as the core of a VMM whose guest RAM is at UADDR + gpa; the vCPUs
    get the guest's real CR3 (readers such as libkdumpfile may walk page tables from it)."""
    with open(elf, "rb") as f:
        e = ELFFile(f)
        loads = [(s["p_paddr"], s["p_filesz"], s["p_offset"]) for s in e.iter_segments()
                 if s["p_type"] == "PT_LOAD" and s["p_filesz"]]
        cr3 = qemu_cr3(e)
    vm = {"vm_index": 0, "vendor": 1, "nr_vcpus": 2, "vm_type": 0, "flags": 0, "pid": 1,
          "reserved": 0}
    slots = [cb.memslot(i, gpa, size, UADDR + gpa) for i, (gpa, size, _) in enumerate(loads)]
    notes = cb.kvm_note(S.NT_KVM_VM, S.build_desc(cb.vm_records(vm, slots)))
    vcpus = [cb.sample_vcpu(i) for i in range(2)]
    for v, value in zip(vcpus, cr3):
        v["sregs"]["cr3"] = value
    notes += b"".join(cb.kvm_note(S.NT_KVM_VCPU, S.build_desc(cb.vcpu_records(v)))
                      for v in vcpus)
    cb.write_core(core, notes, [cb.Load(UADDR + gpa, size, size) for gpa, size, _ in loads])
    with open(core, "rb") as f:
        offs = [s["p_offset"] for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
    with open(elf, "rb") as src, open(core, "r+b") as dst:
        for (gpa, size, soff), doff in zip(loads, offs):
            pos = 0
            while pos < size:
                try:
                    pos = os.lseek(src.fileno(), soff + pos, os.SEEK_DATA) - soff
                except OSError:
                    break
                if pos >= size:
                    break
                end = min(size, os.lseek(src.fileno(), soff + pos, os.SEEK_HOLE) - soff)
                while pos < end:
                    pos += os.copy_file_range(src.fileno(), dst.fileno(), end - pos,
                                              soff + pos, doff + pos)
    return sum(size for _, size, _ in loads)


def main() -> None:
    work = Path(sys.argv[1])
    gib = float(sys.argv[2]) if len(sys.argv) > 2 else 4.5
    work.mkdir(parents=True, exist_ok=True)
    kernel = qemurun.kernel("-n", "--base", "guest")
    rd = initramfs(work)
    times = run_guest(work, kernel, rd, int(gib * 1024))
    rd.unlink()
    ram = vmm_core(work / "qemu.elf", work / "core")
    (work / "qemu.elf").unlink()
    (work / "vmlinux").unlink(missing_ok=True)
    (work / "vmlinux").symlink_to(kernel.parent / "vmlinux")
    (work / "times.json").write_text(json.dumps(times))
    print(f"VMM core: {work / 'core'}, {ram / GIB:.2f} GiB of guest RAM; QEMU times: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
