"""Where a core comes from besides a file: stdin, and systemd-coredump (coredumpctl).

`kvmnote read` parses a piped core as it streams by (headers and notes only, bounded
memory). `kvmnote vmcore` needs random access to guest RAM, so a piped core is first
copied, decompressed and sparse, to an unlinked temporary file in $TMPDIR (default
/var/tmp, which is on disk where /tmp may be RAM).
"""

import contextlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from .core import CHUNK, Stream, _chunks, _magic_kind, _raw_chunks
from .errors import KvmnoteError

STDIN = "-"
STDIN_NAME = "<stdin>"
# corefile states of `coredumpctl list` whose core `coredumpctl dump` can write
DUMPABLE = ("present", "journal", "truncated")


def _drain(f: BinaryIO) -> None:
    """Read `f` to its end, so that the writer of the pipe sees it all consumed: spliced
    into /dev/null without copying, or read into one reused buffer."""
    with contextlib.suppress(OSError, ValueError):
        fd = f.fileno()
        with open(os.devnull, "wb") as null:
            try:
                while os.splice(fd, null.fileno(), 1 << 20):
                    pass
                return
            except OSError:         # not a pipe (or no splice): read
                pass
        buf = bytearray(1 << 20)
        while os.readv(fd, [buf]):
            pass


def stdin_stream() -> Stream:
    """The core on stdin, refused when stdin is a terminal."""
    f = sys.stdin.buffer if sys.stdin is not None else None
    if f is None:
        raise KvmnoteError("stdin is closed; pipe a core into 'kvmnote ... -'")
    if f.isatty():
        raise KvmnoteError("stdin is a terminal; pipe a core into 'kvmnote ... -' "
                           "(coredumpctl dump PID | kvmnote read -)")
    return Stream(f, STDIN_NAME, on_close=lambda: _drain(f))


def _coredumpctl(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start coredumpctl; a missing coredumpctl is a one-line error."""
    try:
        return subprocess.Popen(["coredumpctl", "--no-pager", *args], **kw)
    except FileNotFoundError:
        raise KvmnoteError("--coredump: coredumpctl not found (apt-get install "
                           "systemd-coredump)") from None


def find(match: str) -> dict[str, Any]:
    """The newest entry of `coredumpctl --json=short list MATCH`; one-line errors if
    nothing matches or its core is not stored."""
    p = _coredumpctl(["--json=short", "list", match], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    out, err = p.communicate()
    if p.returncode != 0 or not out.strip():
        why = err.decode(errors="replace").strip().splitlines()
        raise KvmnoteError(f"--coredump {match}: no core dump matches"
                           + (f" (coredumpctl: {why[-1]})" if why else ""))
    try:
        entries = [e for e in json.loads(out) if isinstance(e, dict)]
        newest = max(entries, key=lambda e: e.get("time") or 0)
    except ValueError:
        raise KvmnoteError(f"--coredump {match}: cannot read coredumpctl's JSON "
                           f"output") from None
    if newest.get("corefile") not in DUMPABLE:
        raise KvmnoteError(
            f"--coredump {match}: the newest matching crash (PID {newest.get('pid')}, "
            f"{newest.get('exe')}) has no stored core (corefile: {newest.get('corefile')}); "
            f"see Storage= and the size limits in coredump.conf(5)")
    return newest


def dump(entry: dict[str, Any]) -> Stream:
    """`coredumpctl dump PID` of `entry` as a stream (coredumpctl decompresses); closing
    it stops coredumpctl (kvmnote read needs the notes only)."""
    pid = entry.get("pid")
    p = _coredumpctl(["dump", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None

    def close() -> None:
        p.kill()
        p.communicate()
    name = f"core dump of PID {pid} ({entry.get('exe')})"
    stream = Stream(p.stdout, name, on_close=close)
    if not stream.magic:        # nothing written: say why, in coredumpctl's words
        err = p.communicate()[1].decode(errors="replace").strip().splitlines()
        raise KvmnoteError(f"{name}: coredumpctl dump {pid} wrote nothing"
                           + (f" ({err[-1]})" if err else ""))
    return stream


def _stdin_file() -> str | None:
    """A path to stdin when it is a regular file at its start (`< core`), else None."""
    if sys.stdin is None:
        return None
    fd = sys.stdin.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode) and os.lseek(fd, 0, os.SEEK_CUR) == 0:
        return f"/proc/self/fd/{fd}"
    return None


def opened(core: str, coredump: str | None) -> tuple[str, Stream | None, str | None]:
    """(path, stream, name) for open_core(), of the core `kvmnote read` was given: a
    file, a regular file on stdin, or a pipe (stdin, coredumpctl dump) read as it
    streams by."""
    if coredump is not None:
        stream = dump(find(coredump))
        return stream.name, stream, None
    if core == STDIN:
        path = _stdin_file()
        return (path, None, STDIN_NAME) if path else (STDIN_NAME, stdin_stream(), None)
    return core, None, None


def spool(stream: Stream) -> int:
    """Copy `stream`, decompressed, to a sparse temporary file; return its descriptor
    (the file is unlinked at once, so nothing is left behind even if kvmnote is killed;
    open it as /proc/self/fd/N)."""
    kind = _magic_kind(stream.magic, stream.name)
    chunks = _raw_chunks(stream) if kind is None else _chunks(lambda: stream, kind,
                                                              stream.name)
    tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
    try:
        fd, path = tempfile.mkstemp(prefix="kvmnote-", suffix=".core", dir=tmpdir)
        os.unlink(path)
    except OSError as e:
        raise KvmnoteError(f"cannot create a temporary copy of {stream.name} in {tmpdir}: "
                           f"{e.strerror} (set TMPDIR)") from None
    zero = bytes(CHUNK)
    try:
        size = 0
        for chunk in chunks:
            for i in range(0, len(chunk), CHUNK):
                piece = chunk[i:i + CHUNK]
                if piece != zero[:len(piece)]:     # all-zero pieces stay holes
                    os.pwrite(fd, piece, size)
                size += len(piece)
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        raise KvmnoteError(f"cannot copy {stream.name} to {tmpdir}: {e.strerror} "
                           f"(set TMPDIR to a larger file system)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def as_file(core: str, coredump: str | None) -> Iterator[tuple[str, str | None]]:
    """(file path, name for messages or None) of the core `kvmnote vmcore` was given:
    the file itself, or a temporary copy of stdin or of the coredumpctl dump (unlinked
    from the start, closed when the block ends). A regular file on stdin (< core) is used in place."""
    if coredump is None and core != STDIN:
        yield core, None
        return
    path = _stdin_file() if coredump is None else None
    if path:
        yield path, STDIN_NAME
        return
    stream = dump(find(coredump)) if coredump is not None else stdin_stream()
    try:
        fd = spool(stream)
    finally:
        if stream.on_close is not None:
            stream.on_close()
    try:
        yield f"/proc/self/fd/{fd}", stream.name
    finally:
        os.close(fd)
