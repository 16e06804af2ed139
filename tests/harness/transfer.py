"""Files into and out of a machine: over the serial console (initramfs machines
without disks: Bochs, QEMU) and on raw tar disks (virtio-blk, Debian root)."""

from __future__ import annotations

import base64
import bz2
import hashlib
import io
import re
import tarfile
from pathlib import Path

# Guest shell: every file under $1 as bzip2|base64 between markers, with its sha256.
SEND_FILES_SH = r"""
send_files() {
    cd "$1" || return
    for f in $(find . -type f | sort); do
        echo "===FILE $f $(sha256sum < "$f" | cut -d' ' -f1) $(wc -c < "$f")"
        bzip2 -c "$f" | base64
        echo "===EOF"
    done
}
"""


def parse_console(log: str) -> tuple[dict[str, bytes], list[str]]:
    """The files send_files() printed: {relative path: data}, and what went wrong."""
    files, errors = {}, []
    cur, chunks = None, []
    for raw in log.splitlines():
        line = raw.strip("\r\n \x00")
        if line.startswith("===FILE "):
            cur, chunks = line.split()[1:4], []
            continue
        if cur is None:
            continue
        if line == "===EOF":
            name, sha, size = cur
            name = name[2:] if name.startswith("./") else name
            try:
                data = bz2.decompress(base64.b64decode("".join(chunks)))
            except Exception as e:  # noqa: BLE001 (any corruption: reported, not raised)
                errors.append(f"{name}: cannot decode: {e}")
            else:
                if hashlib.sha256(data).hexdigest() != sha or len(data) != int(size):
                    errors.append(f"{name}: sha256/size mismatch after transfer")
                else:
                    files[name] = data
            cur = None
        elif re.fullmatch(r"[A-Za-z0-9+/=]+", line):
            chunks.append(line)
        # anything else (a stray kernel message) is ignored; sha256 decides
    return files, errors


def tar_disk(path: Path, members: dict[str, Path | bytes]) -> Path:
    """A raw disk that is a tar archive of `members` (name -> file, dir or bytes);
    the guest reads it with `tar -xf /dev/vdX`. Zero-padded to whole MiB (zero blocks
    end a tar), a size Bochs' ATA disk geometry can describe exactly."""
    with tarfile.open(path, "w") as t:
        for name, src in members.items():
            if isinstance(src, bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(src), 0o755
                t.addfile(info, io.BytesIO(src))
            else:
                t.add(src, name, filter=lambda i: None if "__pycache__" in i.name else i)
    with open(path, "r+b") as f:
        f.truncate(-(-f.seek(0, io.SEEK_END) // (1 << 20)) << 20)
    return path


def blank_disk(path: Path, size: int) -> Path:
    """A sparse raw disk the guest writes its `tar -cf /dev/vdX` to."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def untar_disk(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as t:
        t.extractall(dest, filter="data")
    return dest
