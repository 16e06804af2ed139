"""Boot a test kernel in an emulator, run test VMM scenarios, bring files back.

One boot runs a list of scenarios (see scenarios.py); each scenario runs the
static test VMM once, which writes a side report and dumps core. After all
scenarios the guest init sends every file under /out back over the serial
console as bzip2|base64 between markers, with its sha256, and reboots.

  SVM: qemu-system-x86_64 -accel tcg -cpu max (AMD SVM, nested KVM works)
  VMX: Bochs 2.7 (VMX with EPT), booted from an isolinux CD image, serial
       over a TCP socket this module listens on.

Everything runs under a timeout; the console log is kept next to the files.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testlib import L1_TSC  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VMM_DIR = REPO / "tests" / "vmm"
CACHE = Path(os.environ.get("KVMNOTE_CACHE", Path.home() / ".cache" / "kvmnote"))
RUNS = Path(os.environ.get("KVMNOTE_E2E_RUNS", CACHE / "e2e-runs"))
BUSYBOX = Path("/bin/busybox")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")

# Per-boot timeouts: a base plus a per-scenario allowance, never unbounded.
BOOT_TIMEOUT = {"svm": (60, 10), "vmx": (120, 25)}


class HarnessError(Exception):
    """The emulator run did not produce what the test needs."""


# --------------------------------------------------------------------------
# Kernels


def patched_series_present() -> bool:
    return any(p.name != "0000-cover-letter.patch" for p in (REPO / "kpatch").glob("0*.patch"))


def get_kernel(variant: str = "patched") -> Path:
    """bzImage path for variant 'patched', 'unpatched', 'patched-modules',
    'patched-debug' ... (built by kpatch/build.sh, cached by its inputs)."""
    patched = not variant.startswith("unpatched")
    config = variant.split("-", 1)[1] if "-" in variant else "base"
    cmd = [str(REPO / "kpatch" / "build.sh")] + ([] if patched else ["-n"]) + ["-c", config]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"kernel build timed out: {cmd}") from e
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == config and Path(parts[1]).is_file():
            return Path(parts[1])
    raise HarnessError(f"{' '.join(cmd)} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")


# --------------------------------------------------------------------------
# Initramfs (newc cpio written here: no root, no fakeroot, exact modes)


class Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name, data: bytes, mode=0o755):
        if os.path.dirname(name.strip("/")):
            self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor):
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def gz(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self.buf.getvalue(), compresslevel=6, mtime=0)


COREPIPE = b"""#!/bin/sh
# core_pattern pipe helper: |/bin/corepipe DEST
cat > "$1"
"""


def build_vmm() -> Path:
    out = subprocess.run(["make", "-s", "-C", str(VMM_DIR)], capture_output=True, text=True,
                         timeout=300)
    if out.returncode:
        raise HarnessError(f"building the test VMM failed:\n{out.stdout}{out.stderr}")
    return VMM_DIR / "vmm"


def base_initramfs(modules_root: Path | None = None) -> Path:
    """busybox + vmm (+ modules), cached by content hash."""
    vmm = build_vmm()
    h = hashlib.sha256()
    for p in (BUSYBOX, vmm):
        h.update(p.read_bytes())
    h.update(COREPIPE)
    mods = []
    if modules_root:
        mods = sorted(p for p in modules_root.rglob("*") if p.is_file())
        for p in mods:
            h.update(str(p.relative_to(modules_root)).encode())
            h.update(p.read_bytes())
    out = CACHE / "initramfs" / f"base-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    c = Cpio()
    for d in ("bin", "sbin", "proc", "sys", "dev", "out", "tmp", "mnt", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", BUSYBOX.read_bytes())
    c.symlink("bin/sh", "busybox")
    c.file("bin/vmm", vmm.read_bytes())
    c.file("bin/corepipe", COREPIPE)
    for p in mods:
        c.file("lib/modules/" + p.name, p.read_bytes(), 0o644)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.gz())
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------
# The guest's /init


@dataclass
class Scenario:
    name: str
    args: list[str]                 # test VMM arguments
    pattern: str = "file"           # core_pattern: "file" or "pipe"
    pre: list[str] = field(default_factory=list)    # shell lines before
    post: list[str] = field(default_factory=list)   # shell lines after
    timeout: int = 60               # seconds, inside the guest


def init_script(scenarios: list[Scenario], preamble: list[str]) -> str:
    L = [
        "#!/bin/sh",
        "/bin/busybox --install -s /bin",
        "export PATH=/bin:/sbin",
        "mount -t proc proc /proc",
        "mount -t sysfs sys /sys",
        "mount -t devtmpfs dev /dev 2>/dev/null",
        "mount -t tmpfs -o size=400m tmp /out",
        "echo 0 > /proc/sys/kernel/core_uses_pid",
        "ulimit -c unlimited",
        'echo "===KVMNOTE-INIT $(cut -d" " -f1 /proc/uptime)"',
        *preamble,
        "ls -l /dev/kvm > /out/devkvm.txt 2>&1",
    ]
    for s in scenarios:
        d = f"/out/{s.name}"
        pat = f"|/bin/corepipe {d}/core" if s.pattern == "pipe" else f"{d}/core"
        argv = " ".join(shlex.quote(a) for a in s.args)
        L += [
            f'echo "===SCN-BEGIN {s.name} $(cut -d" " -f1 /proc/uptime)"',
            f"mkdir -p {d}",
            *s.pre,
            f"echo '{pat}' > /proc/sys/kernel/core_pattern",
            f"timeout {s.timeout} /bin/vmm {argv} --report {d}/report.json > {d}/stdout 2>&1",
            f"echo $? > {d}/rc",
            *s.post,
            f'echo "===SCN-END {s.name} rc=$(cat {d}/rc) $(cut -d" " -f1 /proc/uptime)"',
        ]
    L += [
        "sleep 0.2",
        "cat /sys/kernel/tracing/trace > /out/trace.txt 2>/dev/null",
        "dmesg > /out/dmesg.txt",
        "dmesg -n 1",
        "cd /out",
        "for f in $(find . -type f | sort); do",
        '  echo "===FILE $f $(sha256sum < $f | cut -d" " -f1) $(wc -c < $f)"',
        "  bzip2 -c $f | base64",
        '  echo "===EOF"',
        "done",
        'echo "===KVMNOTE-DONE $(cut -d" " -f1 /proc/uptime)"',
        "sleep 1",
        "reboot -f",
    ]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------
# Console log parsing

SPLAT_RE = re.compile(
    r"(WARNING: |BUG: |BUG at|kernel BUG|Oops|general protection fault|Kernel panic|"
    r"KASAN|UBSAN|possible circular locking|possible recursive locking|"
    r"inconsistent lock state|suspicious RCU usage|blocked for more than|"
    r"detected stalls|Unable to handle|sleeping function called from invalid context|"
    r"lockdep is turned off|DEBUG_LOCKS_WARN_ON)")
# Bochs 2.7 crashes in its ALSA sound plugin here ("buffer overflow detected"):
# the bochsrc selects the dummy sound driver.
# Bochs' CPUID topology makes the unpatched 6.12 kernel warn on every boot.
KNOWN_SPLATS = [re.compile(r"WARNING: .* at arch/x86/kernel/cpu/topology_common\.c:57")]


def find_splats(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if SPLAT_RE.search(line) and not any(k.search(line) for k in KNOWN_SPLATS):
            out.append(line.strip())
    return out


@dataclass
class BootResult:
    vendor: str
    variant: str
    workdir: Path
    log: str
    files: dict[str, bytes]
    elapsed: float
    rc: int | None
    timed_out: bool
    errors: list[str]

    def tail(self, n=60) -> str:
        lines = self.log.splitlines()
        return "\n".join(lines[-n:])

    def context(self, n=60) -> str:
        return (f"--- {self.vendor}/{self.variant} guest console (last {n} lines of "
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


def parse_console(log: str) -> tuple[dict[str, bytes], list[str]]:
    files, errors = {}, []
    cur, chunks = None, []
    for raw in log.splitlines():
        line = raw.strip("\r\n \x00")
        if line.startswith("===FILE "):
            parts = line.split()
            cur, chunks = parts[1:4], []
            continue
        if cur is None:
            continue
        if line == "===EOF":
            name, sha, size = cur
            name = name[2:] if name.startswith("./") else name
            try:
                data = bz2.decompress(base64.b64decode("".join(chunks)))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name}: cannot decode: {e}")
                data = None
            if data is not None:
                if hashlib.sha256(data).hexdigest() != sha or len(data) != int(size):
                    errors.append(f"{name}: sha256/size mismatch after transfer")
                else:
                    files[name] = data
            cur = None
        elif re.fullmatch(r"[A-Za-z0-9+/=]+", line):
            chunks.append(line)
        # anything else (a stray kernel message) is ignored; sha256 decides
    return files, errors


# --------------------------------------------------------------------------
# Emulators


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


def bochs_available() -> bool:
    return (shutil.which("bochs") is not None and ISOLINUX_BIN.exists() and LDLINUX_C32.exists()
            and (shutil.which("genisoimage") or shutil.which("xorriso")) is not None
            and Path("/usr/share/bochs/BIOS-bochs-latest").exists())


def _run_qemu(work: Path, kernel: Path, initrd: Path, cmdline: str, timeout: float,
              cpu: str) -> tuple[int | None, bool]:
    log = open(work / "console.log", "wb")
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", cpu,
           "-smp", "2,sockets=2,cores=1,threads=1", "-m", "512", "-nographic",
           "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 {L1_TSC} {cmdline}".strip()]
    (work / "cmd.txt").write_text(shlex.join(cmd) + "\n")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        return p.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        return None, True
    finally:
        log.close()


# Emulated instructions per emulated second (the recipe's 50M measured best:
# 10M: 69 s, 50M: 38 s, 200M: 64 s for the same 8-scenario run). The serial
# line runs at 115200 baud in emulated time and carries the cores: the bulk
# of a Bochs run.
BOCHS_IPS = int(os.environ.get("KVMNOTE_BOCHS_IPS", "50000000"))

BOCHSRC = """\
cpu: model={model}, count=1, ips={ips}, reset_on_triple_fault=0, ignore_bad_msrs=1
clock: sync=none
memory: guest=512, host=512
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


def _run_bochs(work: Path, kernel: Path, initrd: Path, cmdline: str, timeout: float,
               model: str) -> tuple[int | None, bool]:
    iso_dir = work / "iso"
    (iso_dir / "isolinux").mkdir(parents=True, exist_ok=True)
    shutil.copy(ISOLINUX_BIN, iso_dir / "isolinux" / "isolinux.bin")
    shutil.copy(LDLINUX_C32, iso_dir / "isolinux" / "ldlinux.c32")
    shutil.copy(kernel, iso_dir / "bzimage")
    shutil.copy(initrd, iso_dir / "initrd.gz")
    args = ("console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 panic=-1 reboot=t "
            + cmdline).strip()
    (iso_dir / "isolinux" / "isolinux.cfg").write_text(
        f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /bzimage\n"
        f"  APPEND initrd=/initrd.gz {args}\n")
    iso = work / "boot.iso"
    if shutil.which("genisoimage"):
        mk = ["genisoimage", "-quiet", "-o", str(iso), "-b", "isolinux/isolinux.bin",
              "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
              "-boot-info-table", "-R", "-J", str(iso_dir)]
    else:
        mk = ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-b",
              "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
              "-boot-load-size", "4", "-boot-info-table", "-R", "-J", str(iso_dir)]
    subprocess.run(mk, check=True, capture_output=True, timeout=60)

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    (work / "bochsrc").write_text(BOCHSRC.format(model=model, port=port, ips=BOCHS_IPS))
    (work / "bochs.rc").write_text("c\n")
    log = open(work / "console.log", "wb")
    done = threading.Event()

    def pump():
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

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    cmd = ["bochs", "-q", "-f", str(work / "bochsrc"), "-rc", str(work / "bochs.rc")]
    (work / "cmd.txt").write_text(shlex.join(cmd) + "\n")
    p = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL,
                         stdout=open(work / "bochs.out", "wb"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    timed_out = False
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        rc, timed_out = None, True
    done.set()
    t.join(5)
    srv.close()
    log.close()
    return rc, timed_out


def boot(vendor: str, variant: str, scenarios: list[Scenario], *, cmdline: str = "",
         preamble: list[str] | None = None, cpu: str | None = None,
         modules: bool = False, tag: str = "") -> BootResult:
    kernel = get_kernel(variant)
    mods = None
    if modules:
        found = list(kernel.parent.glob("lib/modules/*/kernel"))
        if not found:
            raise HarnessError(f"no modules under {kernel.parent}")
        mods = found[0]
    base = base_initramfs(mods)
    init = init_script(scenarios, preamble or [])
    c = Cpio()
    c.file("init", init.encode())
    name = f"{vendor}-{variant}{'-' + tag if tag else ''}"
    work = RUNS / f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "init").write_text(init)
    initrd = work / "initrd.gz"
    initrd.write_bytes(base.read_bytes() + c.gz())
    base_t, per = BOOT_TIMEOUT[vendor]
    timeout = base_t + per * len(scenarios)
    t0 = time.monotonic()
    if vendor == "svm":
        rc, timed_out = _run_qemu(work, kernel, initrd, cmdline, timeout, cpu or "max")
    else:
        rc, timed_out = _run_bochs(work, kernel, initrd, cmdline, timeout,
                                   cpu or "corei7_haswell_4770")
    elapsed = time.monotonic() - t0
    log = (work / "console.log").read_bytes().decode("utf-8", "replace")
    files, errors = parse_console(log)
    for k, v in files.items():
        p = work / "out" / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(v)
    if "could not calculate TSC khz" in log + (files.get("dmesg.txt") or b"").decode("utf-8", "replace"):
        errors.append("the guest kernel could not calibrate its TSC: KVM cannot run vCPUs")
    if "===KVMNOTE-DONE" not in log:
        errors.append("guest did not finish (no ===KVMNOTE-DONE marker)"
                      + (f"; killed after {timeout}s timeout" if timed_out else ""))
    (work / "elapsed.txt").write_text(f"{elapsed:.2f}\n")
    return BootResult(vendor, variant, work, log, files, elapsed, rc, timed_out, errors)
