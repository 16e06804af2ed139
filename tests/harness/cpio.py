"""Initramfs images: newc cpio written here (no root, no fakeroot, exact modes),
gzip-compressed; concatenated archives are one initramfs to the kernel."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


class Cpio:
    def __init__(self, out: io.RawIOBase | None = None):
        self.out = out if out is not None else io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        name = name.strip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self.ino += 1
        self.out.write(hdr.encode() + nb + b"\0" * (-(110 + len(nb)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755):
        if os.path.dirname(name.strip("/")):
            self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str):
        if os.path.dirname(name.strip("/")):
            self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int):
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def copy(self, src: Path | str, dest: str | None = None):
        """A host file (symlinks followed) or a directory tree (symlinks kept)."""
        src = Path(src)
        dest = (dest or str(src)).strip("/")
        if src.is_dir() and not src.is_symlink():
            self.dir(dest)
            for p in sorted(src.rglob("*")):
                d = f"{dest}/{p.relative_to(src)}"
                if p.is_symlink():
                    self.symlink(d, os.readlink(p))
                elif p.is_dir():
                    self.dir(d)
                else:
                    self.file(d, p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        else:
            self.file(dest, src.read_bytes(), stat.S_IMODE(src.stat().st_mode))

    def busybox(self):
        """/bin/busybox with a link for every applet, /dev/console and /dev/null."""
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "mnt", "etc"):
            self.dir(d)
        self.chardev("dev/console", 5, 1)
        self.chardev("dev/null", 1, 3)
        self.file("bin/busybox", BUSYBOX.read_bytes())
        for applet in subprocess.run([str(BUSYBOX), "--list"], capture_output=True,
                                     text=True, check=True).stdout.split():
            self.symlink(f"bin/{applet}", "busybox")

    def program(self, exe: str, dest: str | None = None):
        """A dynamically linked program with the libraries ldd names."""
        self.copy(exe, dest)
        ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if lib.startswith("/"):
                self.copy(lib)
        for lib in ("lib", "lib64"):  # merged-/usr layout of Debian
            if any(n.startswith(f"usr/{lib}/") for n in self.seen):
                self.symlink(lib, f"usr/{lib}")

    def close(self):
        self._entry("TRAILER!!!", 0)

    def gz(self) -> bytes:
        """The archive (made in memory) gzip-compressed."""
        self.close()
        return gzip.compress(self.out.getvalue(), compresslevel=6, mtime=0)


def write_gz(path: Path, fill) -> Path:
    """Stream a gzip'ed cpio to `path`: fill(cpio) adds the entries."""
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        c = Cpio(f)
        fill(c)
        c.close()
    tmp.rename(path)
    return path
