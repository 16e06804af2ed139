"""Machine backends, and one boot that runs a list of scenarios on one of them.

  svm     QEMU TCG -cpu max: AMD SVM, nested KVM works (initramfs, serial)
  vmx     Bochs 2.7 (VMX with EPT), booted from an isolinux CD image, serial over
          a TCP socket this module listens on
  native  the running kernel's own /dev/kvm (a Vagrant box, a bare-metal runner,
          or the emulated L1 machine itself): the scenarios run as a shell script

A boot runs every scenario once (the test VMM writes its side report and dumps
core), then the files under the output directory come back: from the initramfs
machines over the serial console, natively by being there. Everything runs
under a timeout; the console log is kept next to the files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import kernel as K
from .cmdline import L1_CMDLINE
from .cpio import BUSYBOX, Cpio
from .transfer import SEND_FILES_SH, parse_console
from .vmm import build_vmm

CACHE = Path(os.environ.get("KVMNOTE_CACHE", Path.home() / ".cache" / "kvmnote"))
RUNS = Path(os.environ.get("KVMNOTE_E2E_RUNS", CACHE / "e2e-runs"))
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
CPARAM = Path("/sys/module/kvm/parameters/coredump_notes")

# Per-boot timeouts: a base plus a per-scenario allowance, never unbounded.
BOOT_TIMEOUT = {"svm": (60, 10), "vmx": (120, 25), "native": (60, 10)}


class HarnessError(Exception):
    """The machine did not produce what the test needs."""


# --------------------------------------------------------------------------
# What the machine runs


@dataclass
class Scenario:
    name: str
    args: list[str]                 # test VMM arguments
    pattern: str = "file"           # core_pattern: "file" or "pipe"
    pre: list[str] = field(default_factory=list)    # shell lines before
    post: list[str] = field(default_factory=list)   # shell lines after
    timeout: int = 60               # seconds, inside the machine
    command: str | None = None      # instead of the test VMM (e.g. a KVM selftest);
                                    # its output goes to OUT/NAME/stdout, its status to rc


def corepipe(out: str) -> str:
    """core_pattern pipe helper `|corepipe NAME`: the core to OUT/NAME/core (the pattern
    holds only the name: core_pattern is cut at 127 characters)."""
    return f'#!/bin/sh\ncat > "{out}/$1/core"\n'


def scenario_lines(scenarios: list[Scenario], out: str, vmm: str, pipe: str) -> list[str]:
    """Shell lines that run each scenario, its files under OUT/NAME/; PIPE is the
    corepipe() helper for OUT."""
    L = ["ulimit -c unlimited", "echo 0 > /proc/sys/kernel/core_uses_pid",
         f"cat {CPARAM} > {out}/coredump_notes.txt 2>&1",
         f"ls -l /dev/kvm > {out}/devkvm.txt 2>&1"]
    for s in scenarios:
        d = f"{out}/{s.name}"
        pat = f"|{pipe} {s.name}" if s.pattern == "pipe" else f"{d}/core"
        if len(pat) > 127:
            raise HarnessError(f"core_pattern {pat!r} is longer than the kernel's 127 bytes")
        argv = " ".join(shlex.quote(a) for a in s.args)
        L += [
            f'echo "===SCN-BEGIN {s.name} $(cut -d" " -f1 /proc/uptime)"',
            f"mkdir -p {d}",
            *(line.replace("@OUT@", out) for line in s.pre),
            f"echo '{pat}' > /proc/sys/kernel/core_pattern",
            f"timeout {s.timeout} {s.command.replace('@OUT@', out)} > {d}/stdout 2>&1"
            if s.command else
            f"timeout {s.timeout} {vmm} {argv} --report {d}/report.json > {d}/stdout 2>&1",
            f"echo $? > {d}/rc",
            *(line.replace("@OUT@", out) for line in s.post),
            f'echo "===SCN-END {s.name} rc=$(cat {d}/rc) $(cut -d" " -f1 /proc/uptime)"',
        ]
    return L


def initramfs_init(scenarios: list[Scenario], preamble: list[str]) -> str:
    """/init of an initramfs machine: run the scenarios, send /out back, reboot."""
    L = [
        "#!/bin/sh",
        "export PATH=/bin:/sbin",
        "mount -t proc proc /proc",
        "mount -t sysfs sys /sys",
        "mount -t devtmpfs dev /dev 2>/dev/null",
        "mkdir -p /out && mount -t tmpfs -o size=400m tmp /out",
        'echo "===KVMNOTE-INIT $(cut -d" " -f1 /proc/uptime)"',
        *preamble,
        *scenario_lines(scenarios, "/out", "/bin/vmm", "/bin/corepipe"),
        "sleep 0.2",
        "cat /sys/kernel/tracing/trace > /out/trace.txt 2>/dev/null",
        "dmesg > /out/dmesg.txt",
        "dmesg -n 1",
        SEND_FILES_SH,
        "send_files /out",
        'echo "===KVMNOTE-DONE $(cut -d" " -f1 /proc/uptime)"',
        # reboot -f drops what the serial port has not sent yet (seen under Bochs on a
        # loaded host: the tail of a core and the DONE marker lost): wait until the
        # UART's transmit count stops moving.
        "tx() { grep -o 'tx:[0-9]*' /proc/tty/driver/serial 2>/dev/null | head -1; }",
        'prev=x; cur=$(tx); while [ "$cur" != "$prev" ]; do prev=$cur; sleep 0.5; cur=$(tx); done',
        "sleep 0.5",
        "reboot -f",
    ]
    return "\n".join(L) + "\n"


def base_initramfs(modules_root: Path | None = None) -> Path:
    """busybox + vmm (+ KVM's modules), cached by content."""
    import hashlib
    vmm = build_vmm()
    h = hashlib.sha256(BUSYBOX.read_bytes() + vmm.read_bytes() + corepipe("/out").encode())
    mods = sorted(p for p in modules_root.rglob("*") if p.is_file()) if modules_root else []
    for p in mods:
        h.update(str(p.relative_to(modules_root)).encode() + p.read_bytes())
    out = CACHE / "initramfs" / f"base-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    c = Cpio()
    c.busybox()
    c.dir("lib/modules")
    c.file("bin/vmm", vmm.read_bytes())
    c.file("bin/corepipe", corepipe("/out").encode())
    for p in mods:
        c.file("lib/modules/" + p.name, p.read_bytes(), 0o644)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.gz())
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------
# Console log


SPLAT_RE = re.compile(
    r"(WARNING: |BUG: |BUG at|kernel BUG|Oops|general protection fault|Kernel panic|"
    r"KASAN|UBSAN|possible circular locking|possible recursive locking|"
    r"inconsistent lock state|suspicious RCU usage|blocked for more than|"
    r"detected stalls|Unable to handle|sleeping function called from invalid context|"
    r"lockdep is turned off|DEBUG_LOCKS_WARN_ON)")
# Bochs' CPUID topology makes the unpatched 6.12 kernel warn on every boot.
KNOWN_SPLATS = [re.compile(r"WARNING: .* at arch/x86/kernel/cpu/topology_common\.c:57")]
BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]+")


def find_splats(text: str) -> list[str]:
    """Kernel warnings in a console log.  The base64 lines of files sent over the
    console (send_files()) are data: "Oops" may well be one of their substrings."""
    out, in_file = [], False
    for line in text.splitlines():
        s = line.strip("\r\n \x00")
        if s.startswith("===FILE "):
            in_file = True
        elif s == "===EOF":
            in_file = False
        elif in_file and BASE64_LINE.fullmatch(s):
            continue
        if SPLAT_RE.search(line) and not any(k.search(line) for k in KNOWN_SPLATS):
            out.append(line.strip())
    return out


@dataclass
class BootResult:
    backend: str        # svm, vmx, native
    vendor: str         # svm or vmx: the virtualization extension KVM ran on
    variant: str
    workdir: Path
    log: str
    files: dict[str, bytes]
    elapsed: float
    rc: int | None
    timed_out: bool
    errors: list[str]

    def tail(self, n=60) -> str:
        return "\n".join(self.log.splitlines()[-n:])

    def context(self, n=60) -> str:
        return (f"--- {self.backend}/{self.variant} console (last {n} lines of "
                f"{self.workdir / 'console.log'}) ---\n{self.tail(n)}")

    def file(self, scenario, name=None) -> bytes | None:
        """A file that came back: file("dmesg.txt") or file(scenario, "core")."""
        return self.files.get(scenario if name is None else f"{scenario}/{name}")

    def path(self, scenario, name) -> Path:
        return self.workdir / "out" / scenario / name

    def scenario_log(self, name) -> str:
        m = re.search(rf"===SCN-BEGIN {re.escape(name)} .*?(?:===SCN-END {re.escape(name)} [^\n]*)",
                      self.log, re.S)
        return m.group(0) if m else ""

    def splats(self) -> list[str]:
        return find_splats(self.log + "\n" + (self.files.get("dmesg.txt") or b"").decode(
            "utf-8", "replace"))


# --------------------------------------------------------------------------
# Backends


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


def bochs_available() -> bool:
    return (shutil.which("bochs") is not None and ISOLINUX_BIN.exists() and LDLINUX_C32.exists()
            and (shutil.which("genisoimage") or shutil.which("xorriso")) is not None
            and Path("/usr/share/bochs/BIOS-bochs-latest").exists())


def native_vendor() -> str | None:
    """svm or vmx when this kernel's /dev/kvm runs on them, else None."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return "vmx" if "vmx" in flags else "svm" if "svm" in flags else None


def native_available() -> str:
    """'' when the native backend can run here, else why not."""
    if os.geteuid() != 0:
        return "native mode needs root (core_pattern, coredump_notes)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    if not CPARAM.exists():
        return f"the running kernel ({os.uname().release}) has no kvm.coredump_notes: not patched"
    if native_vendor() is None:
        return "the CPU has neither vmx nor svm"
    return ""


def run_qemu(work: Path, kernel: Path, initrd: Path | None, cmdline: str, timeout: float, *,
             cpu: str = "max", memory: int = 512, disks: tuple = ()) -> tuple[int | None, bool]:
    """QEMU TCG, two sockets; console to WORK/console.log. disks: (path, "ro"|"rw"|"snapshot")."""
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", cpu,
           "-smp", "2,sockets=2,cores=1,threads=1", "-m", str(memory), "-nographic",
           "-no-reboot", "-kernel", str(kernel), "-append", f"{L1_CMDLINE} {cmdline}".strip()]
    if initrd:
        cmd += ["-initrd", str(initrd)]
    for path, how in disks:
        opt = {"ro": ",readonly=on", "snapshot": ",snapshot=on", "rw": ""}[how]
        cmd += ["-drive", f"file={path},if=virtio,format=raw{opt}"]
    (work / "cmd.txt").write_text(shlex.join(cmd) + "\n")
    with open(work / "console.log", "wb") as log:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            return None, True


# Emulated instructions per emulated second (the recipe's 50M measured best:
# 10M: 69 s, 50M: 38 s, 200M: 64 s for the same 8-scenario run). The serial
# line runs at 115200 baud in emulated time and carries the cores: the bulk
# of a Bochs run.
BOCHS_IPS = int(os.environ.get("KVMNOTE_BOCHS_IPS", "50000000"))

# Bochs 2.7 crashes in its ALSA sound plugin here ("buffer overflow detected"):
# the dummy sound driver.
BOCHSRC = """\
cpu: model={model}, count=1, ips={ips}, reset_on_triple_fault=0, ignore_bad_msrs=1
clock: sync=none
memory: guest={memory}, host={memory}
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path=boot.iso, status=inserted
boot: cdrom
panic: action=fatal
error: action=report
log: bochs.log
mouse: enabled=0
display_library: rfb, options="timeout=0"
sound: driver=dummy
speaker: enabled=0
com1: enabled=1, mode=socket-client, dev=localhost:{port}
"""


def _serial_pump(srv: socket.socket, log, done: threading.Event):
    srv.settimeout(1.0)
    conn = None
    while not done.is_set() and conn is None:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
    if conn is None:
        return
    conn.settimeout(1.0)
    while True:
        try:
            b = conn.recv(65536)
        except socket.timeout:
            if done.is_set():
                break
            continue
        except OSError:
            break
        if not b:
            break
        log.write(b)
        log.flush()
    conn.close()


# Disks after the boot CD (ata0-master), as the Linux ATA driver names them: sda, sdb, ...
BOCHS_DISK_SLOTS = ("ata0-slave", "ata1-master", "ata1-slave")


def _chs(path: Path) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) whose product is exactly the image's
    sectors: Bochs sizes a flat ATA disk by its geometry."""
    sectors, rest = divmod(path.stat().st_size, 512)
    for h in range(16, 0, -1):
        for s in range(63, 0, -1):
            if not rest and sectors % (h * s) == 0 and sectors // (h * s) <= 65535:
                return sectors // (h * s), h, s
    raise HarnessError(f"{path}: {path.stat().st_size} bytes: no ATA geometry fits exactly")


def _bochs_disks(work: Path, disks: tuple) -> str:
    """bochsrc lines of raw disks (path, "ro"|"rw"|"snapshot"): "rw" written in place,
    the others through a redo log in WORK that Bochs drops at exit ("volatile")."""
    if len(disks) > len(BOCHS_DISK_SLOTS):
        raise HarnessError(f"Bochs: at most {len(BOCHS_DISK_SLOTS)} disks")
    lines = ["ata1: enabled=1, ioaddr1=0x170, ioaddr2=0x370, irq=15"]
    for slot, (path, how) in zip(BOCHS_DISK_SLOTS, disks):
        c, h, s = _chs(Path(path))
        mode = "flat" if how == "rw" else f"volatile, journal={work / slot}.redolog"
        lines.append(f"{slot}: type=disk, path={path}, mode={mode}, "
                     f"cylinders={c}, heads={h}, spt={s}")
    return "\n".join(lines) + "\n"


# Bochs boots from a CD, not from a disk root: this initramfs mounts the first disk
# (sda) as the root and names the disks as under QEMU (vda, vdb, ...: devtmpfs
# symlinks, which the root's own devtmpfs mount shares), then runs its init=.
DISK_ROOT_INIT = """\
#!/bin/sh
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
i=0
while [ ! -b /dev/sd@LAST@ ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
for d in a b c d; do [ -b /dev/sd$d ] && ln -s sd$d /dev/vd$d; done
init=$(tr ' ' '\\n' < /proc/cmdline | sed -n 's/^init=//p')
mkdir -p /newroot
mount -t ext4 /dev/sda /newroot || { echo "disk-root: cannot mount /dev/sda"; reboot -f; }
umount /proc
exec switch_root /newroot "${init:-/sbin/init}"
"""


def run_disk_root(backend: str, work: Path, kernel: Path, cmdline: str, timeout: float, *,
                  memory: int = 512, disks: tuple = ()) -> tuple[int | None, bool]:
    """A machine whose root filesystem is the first of `disks` (path, "ro"|"rw"|
    "snapshot"), the others its /dev/vdb, /dev/vdc: QEMU's virtio disks (svm), or
    Bochs' ATA disks (vmx) behind DISK_ROOT_INIT."""
    if backend == "svm":
        return run_qemu(work, kernel, None, cmdline, timeout, memory=memory, disks=disks)
    c = Cpio()
    c.busybox()
    c.file("init", DISK_ROOT_INIT.replace("@LAST@", "abcd"[len(disks) - 1]).encode())
    initrd = work / "disk-root.gz"
    initrd.write_bytes(c.gz())
    return run_bochs(work, kernel, initrd, cmdline, timeout, memory=memory, disks=disks)


def run_bochs(work: Path, kernel: Path, initrd: Path, cmdline: str, timeout: float, *,
              cpu: str = "corei7_haswell_4770", memory: int = 512,
              disks: tuple = ()) -> tuple[int | None, bool]:
    iso_dir = work / "iso"
    (iso_dir / "isolinux").mkdir(parents=True, exist_ok=True)
    shutil.copy(ISOLINUX_BIN, iso_dir / "isolinux" / "isolinux.bin")
    shutil.copy(LDLINUX_C32, iso_dir / "isolinux" / "ldlinux.c32")
    shutil.copy(kernel, iso_dir / "bzimage")
    shutil.copy(initrd, iso_dir / "initrd.gz")
    args = (f"{L1_CMDLINE} console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 reboot=t "
            + cmdline).strip()
    (iso_dir / "isolinux" / "isolinux.cfg").write_text(
        f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /bzimage\n"
        f"  APPEND initrd=/initrd.gz {args}\n")
    iso = work / "boot.iso"
    mkisofs = ["genisoimage"] if shutil.which("genisoimage") else ["xorriso", "-as", "mkisofs"]
    subprocess.run(mkisofs + ["-quiet", "-o", str(iso), "-b", "isolinux/isolinux.bin",
                              "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
                              "-boot-info-table", "-R", "-J", str(iso_dir)],
                   check=True, capture_output=True, timeout=60)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    (work / "bochsrc").write_text(BOCHSRC.format(model=cpu, port=srv.getsockname()[1],
                                                 ips=BOCHS_IPS, memory=memory)
                                  + _bochs_disks(work, disks))
    (work / "bochs.rc").write_text("c\n")
    done = threading.Event()
    with open(work / "console.log", "wb") as log, open(work / "bochs.out", "wb") as bout:
        t = threading.Thread(target=_serial_pump, args=(srv, log, done), daemon=True)
        t.start()
        cmd = ["bochs", "-q", "-f", str(work / "bochsrc"), "-rc", str(work / "bochs.rc")]
        (work / "cmd.txt").write_text(shlex.join(cmd) + "\n")
        p = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=bout,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rc, timed_out = None, True
        done.set()
        t.join(5)
        srv.close()
    return rc, timed_out


def run_native(work: Path, scenarios: list[Scenario], preamble: list[str],
               timeout: float) -> tuple[int | None, bool]:
    """The scenarios as a shell script on this kernel; WORK/out holds their files."""
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    (work / "corepipe").write_text(corepipe(str(out)))
    (work / "corepipe").chmod(0o755)
    mark = f"KVMNOTE-NATIVE-{work.name}"
    script = "\n".join([
        "#!/bin/sh", f"echo {mark} > /dev/kmsg", *preamble,
        *scenario_lines(scenarios, str(out), str(build_vmm()), str(work / "corepipe")),
        f"dmesg | sed -n '/{mark}/,$p' > {out}/dmesg.txt", ""])
    (work / "init").write_text(script)
    saved = {p: p.read_text() for p in (Path("/proc/sys/kernel/core_pattern"),
                                        Path("/proc/sys/kernel/core_uses_pid"), CPARAM)
             if p.exists()}
    try:
        with open(work / "console.log", "wb") as log:
            p = subprocess.run(["sh", str(work / "init")], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        return p.returncode, False
    except subprocess.TimeoutExpired:
        return None, True
    finally:
        for path, text in saved.items():
            path.write_text(text)


def boot(backend: str, variant: str, scenarios: list[Scenario], *, cmdline: str = "",
         preamble: list[str] | None = None, cpu: str | None = None,
         modules: bool = False, tag: str = "",
         extra_files: dict[str, bytes] | None = None, slow: float = 1) -> BootResult:
    """Run `scenarios` once on `backend` (svm, vmx: kernel `variant`; native: this one).
    extra_files (path -> content, executable) go into the initramfs machines, e.g. a
    selftest binary for a Scenario(command=...); natively the command names host paths."""
    kern = None
    if backend != "native":
        try:
            kern = K.variant(variant)
        except K.KernelError as e:
            raise HarnessError(str(e)) from e
    name = f"{backend}-{variant}{'-' + tag if tag else ''}"
    work = RUNS / f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    base_t, per = BOOT_TIMEOUT[backend]
    timeout = (base_t + per * len(scenarios)) * slow    # slow: e.g. a KASAN kernel
    t0 = time.monotonic()
    if backend == "native":
        vendor = native_vendor()
        rc, timed_out = run_native(work, scenarios, preamble or [], timeout)
        log = (work / "console.log").read_bytes().decode("utf-8", "replace")
        files = {str(p.relative_to(work / "out")): p.read_bytes()
                 for p in sorted((work / "out").rglob("*")) if p.is_file()}
        errors = [] if rc == 0 else [f"scenario script exit {rc}"
                                     + (f"; killed after {timeout}s" if timed_out else "")]
    else:
        vendor = backend
        mods = K.modules_dir(kern) if modules else None
        if modules and mods is None:
            raise HarnessError(f"no modules under {kern.parent}")
        init = initramfs_init(scenarios, preamble or [])
        (work / "init").write_text(init)
        c = Cpio()
        c.file("init", init.encode())
        for path, data in (extra_files or {}).items():
            c.file(path, data)
        initrd = work / "initrd.gz"
        initrd.write_bytes(base_initramfs(mods).read_bytes() + c.gz())
        if backend == "svm":
            rc, timed_out = run_qemu(work, kern, initrd, cmdline, timeout, cpu=cpu or "max")
        else:
            rc, timed_out = run_bochs(work, kern, initrd, cmdline, timeout,
                                      cpu=cpu or "corei7_haswell_4770")
        log = (work / "console.log").read_bytes().decode("utf-8", "replace")
        files, errors = parse_console(log)
        for k, v in files.items():
            p = work / "out" / k
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(v)
        if "===KVMNOTE-DONE" not in log:
            errors.append("machine did not finish (no ===KVMNOTE-DONE marker)"
                          + (f"; killed after {timeout}s timeout" if timed_out else ""))
    elapsed = time.monotonic() - t0
    if "could not calculate TSC khz" in log + (files.get("dmesg.txt") or b"").decode(
            "utf-8", "replace"):
        errors.append("the kernel could not calibrate its TSC: KVM cannot run vCPUs")
    (work / "elapsed.txt").write_text(f"{elapsed:.2f}\n")
    return BootResult(backend, vendor, variant, work, log, files, elapsed, rc, timed_out, errors)
