"""`kvmnote` command line: a thin argparse layer over the library."""

import argparse
import importlib.metadata
import json
import os
import signal
import sys

from . import kdump, report, sources, triage, verify, vmcore
from .core import EXCLUDED, open_core
from .errors import KvmnoteError

EPILOG = """examples:
  kvmnote read core.qemu.1234              # VM summary, registers of every vCPU
  kvmnote read --vcpu 2 core.qemu.1234     # only the vCPU with vcpu_id 2
  kvmnote read --all core.qemu.1234.zst    # plus MSRs, LAPIC, XSAVE... (compressed core)
  kvmnote read --json core | jq '.vcpus[].regs.rip'
  kvmnote read --level 1 core              # nested guests: only L1's (the hypervisor's)
  coredumpctl dump 1234 | kvmnote read -  # a core on stdin
  kvmnote read --coredump qemu-system-x86  # the newest stored core of that command

exit status: 0 success; 1 (vmcore only) vmcore written but incomplete: guest RAM
missing from the core, or a vCPU without state; 2 error (bad input or usage; one line
on stderr); 141 stdout closed by its reader (| head), like a filter killed by SIGPIPE
"""

VMCORE_EPILOG = """examples:
  kvmnote vmcore core.qemu.1234 -o guest.vmcore       # then: drgn -c guest.vmcore -s vmlinux
  kvmnote vmcore core.qemu.1234.zst -o guest.vmcore   # systemd-coredump's compressed core
  kvmnote vmcore --cpu-map 0=0,2=1 core -o guest.vmcore
  kvmnote vmcore --allow-partial truncated.core -o guest.vmcore
  kvmnote vmcore --coredump 1234 -o guest.vmcore      # systemd-coredump's core of PID 1234
  kvmnote vmcore --format kdump core.qemu.1234 -o guest.kdump  # makedumpfile's format, zstd
  kvmnote vmcore --format kdump --compress lzo core -o guest.kdump
  kvmnote vmcore --level 2 core -o nested.vmcore      # the guest's own nested guest

Nested virtualization: a vCPU that was running a nested guest (guest mode) goes into the
vmcore with its hypervisor's (L1's) registers and CR3, as the nested VM exit will load
them, so that crash and drgn unwind the guest kernel the VMM ran (said on stderr per
vCPU). --level 2 writes the nested guest's vmcore instead: its memory as L1's EPT / NPT
maps it, the registers of the vCPUs in guest mode (docs/vmcore.md).

Formats: elf (QEMU's dump-guest-memory layout; a sparse file as large as guest RAM) or
kdump (makedumpfile's kdump-compressed format: each non-zero page compressed, the zero
pages stored once as makedumpfile -d 1 does; crash and drgn read it); --dump-level 0 writes
the same pages. Levels that also leave out cache, user or free
pages (makedumpfile -d 2..31) need the guest's mem_map: kvmnote writes its ELF vmcore beside
VMCORE and runs makedumpfile on it, refusing a compression makedumpfile was built without
and a guest kernel newer than makedumpfile knows (docs/vmcore.md).

Guest CPU numbers: KVM's vcpu_id is the VMM's choice (QEMU: the APIC ID), and Linux
numbers CPUs in the order the firmware tables (MADT, MP table) list them, which QEMU emits
in APIC-ID order; so by default vCPUs sorted by vcpu_id become CPU 0, 1, ...  Another VMM
may need --cpu-map VCPU_ID=CPU,...

exit status: 0 success; 1 written but incomplete (guest RAM missing from the core, or a
vCPU without state; only without --allow-partial); 2 error, nothing written
"""


def _one_source(args: argparse.Namespace) -> None:
    """Exactly one of CORE and --coredump."""
    if (args.core is None) == (args.coredump is None):
        raise KvmnoteError("give a CORE file (or - for stdin), or --coredump PID|COMM")


TRIAGE_EPILOG = f"""examples:
  kvmnote triage core.qemu.1234.zst        # VMs, per vCPU mode, RIP, RSP, last exit, status,
                                           # guest kernel release, what is missing and why
  kvmnote triage --coredump qemu-system-x86
  sudo kvmnote triage --install            # from now on, a report for every crashed VMM:
                                           # {triage.REPORTS}/*.txt and .json, and
                                           # journalctl -t kvmnote-triage
"""


def _read(args: argparse.Namespace) -> int:
    """`kvmnote read`: print the KVM state in a core."""
    _one_source(args)
    path, stream, name = sources.opened(args.core, args.coredump)
    with open_core(path, stream=stream, name=name) as core:
        for w in core.warnings:
            print(f"kvmnote: warning: {w}", file=sys.stderr)
        vcpus = core.vcpus
        if args.vcpu is not None:
            vcpus = [v for v in vcpus if v.vcpu_id == args.vcpu]
            if not vcpus:
                raise KvmnoteError(f"{core.path}: no vCPU with vcpu_id {args.vcpu} "
                                   f"(have {sorted({v.vcpu_id for v in core.vcpus})})")
        if args.json:
            _emit(json.dumps(report.to_json(core, vcpus, level=args.level)) + "\n")
        else:
            _emit(report.text(core, vcpus, args.all, args.level))
    return 0


class _StdoutError(KvmnoteError):
    """Writing to stdout failed (ENOSPC, EIO...), other than a closed pipe."""


def _emit(text: str) -> None:
    """Write `text` to stdout and flush; a failure other than EPIPE is a _StdoutError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise _StdoutError(f"cannot write to stdout: {e.strerror}") from None


def _vmcore(args: argparse.Namespace) -> int:
    """`kvmnote vmcore`: write a guest vmcore from a VMM core."""
    info = vmcore.read_vmcoreinfo_file(args.vmcoreinfo) if args.vmcoreinfo else None
    cpu_map = vmcore.parse_cpu_map(args.cpu_map) if args.cpu_map is not None else None
    _one_source(args)
    common = dict(vm_index=args.vm, cpu_map=cpu_map, vmcoreinfo=info,
                  allow_partial=args.allow_partial, force=args.force,
                  progress=vmcore.tty_progress(sys.stderr))
    if args.format == "kdump" and args.level == 2:
        raise KvmnoteError("--level 2 writes the nested guest's vmcore as ELF only: "
                           "use --format elf (then makedumpfile, if need be)")
    if args.format != "kdump" and (args.compress or args.dump_level is not None):
        raise KvmnoteError("--compress and --dump-level need --format kdump (the ELF "
                           "output leaves zero pages out as holes and compresses nothing)")
    with sources.as_file(args.core, args.coredump) as (path, name):
        if args.format == "kdump":
            res = kdump.write_kdump(path, args.output, compression=args.compress or
                                    kdump.DEFAULT_COMPRESSION, dump_level=args.dump_level
                                    if args.dump_level is not None else 1, **common)
        else:
            res = vmcore.write_vmcore(path, args.output, name=name, level=args.level,
                                      **common)
    for n in res.notes:
        print(f"kvmnote: {n}", file=sys.stderr)
    for w in res.warnings:
        print(f"kvmnote: warning: {w}", file=sys.stderr)
    excluded = sum(m.size for m in res.missing if m.reason == vmcore.WHY[EXCLUDED])
    if excluded:    # one line: guest RAM left out on purpose, and how to keep it
        print(f"kvmnote: {args.output}: {excluded} bytes of guest RAM "
              f"{vmcore.EXCLUDED_HINT}", file=sys.stderr)
    missing = [m for m in res.missing if m.reason != vmcore.WHY[EXCLUDED]]
    if missing:
        total = sum(m.size for m in missing)
        print(f"kvmnote: {args.output}: {total} bytes of guest RAM are not in the core, "
              f"written as zeros:", file=sys.stderr)
        for m in missing:
            print(f"kvmnote:   missing {m}", file=sys.stderr)
    return 0 if res.complete or args.allow_partial else 1


def _version() -> str:
    """The installed package's version (pyproject.toml), or 'unknown' from a bare tree."""
    try:
        return importlib.metadata.version("kvmnote")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _triage(args: argparse.Namespace) -> int:
    """`kvmnote triage`: the short report of a core, or the systemd-coredump follower."""
    if args.install:
        path = triage.install()
        _emit(f"kvmnote: installed and started {path}; reports go to {triage.REPORTS} and "
              f"the journal (journalctl -t kvmnote-triage)\n")
        return 0
    if args.follow:
        return triage.follow(args.reports, args.state)
    _one_source(args)
    path, stream, name = sources.opened(args.core, args.coredump)
    with open_core(path, stream=stream, name=name) as core:
        doc = triage.triage(core)
    _emit(json.dumps(doc) + "\n" if args.json else triage.text(doc))
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    p = argparse.ArgumentParser(
        prog="kvmnote", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read KVM vCPU and VM state from the notes in a VMM's core file.")
    p.add_argument("--version", action="version", version=f"kvmnote {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("read", help="show the VMs and vCPUs in a core file", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("core", nargs="?", help="core file (plain, or zstd/lz4/xz compressed); "
                   "- reads it from stdin")
    r.add_argument("--coredump", metavar="PID|COMM", help="the newest core dump that "
                   "systemd-coredump stored for this PID or command (coredumpctl list "
                   "matches it), instead of CORE")
    r.add_argument("--json", action="store_true", help="print kvmnote-read/2 JSON (64-bit values as \"0x...\" strings)")
    r.add_argument("--vcpu", type=int, metavar="N", help="only the vCPU with vcpu_id N")
    r.add_argument("--all", action="store_true",
                   help="also MSRs, debug registers, events, XCRs, XSAVE, LAPIC")
    r.add_argument("--level", type=int, choices=(1, 2), help="a vCPU running a nested "
                   "guest: show only L1's registers (the guest's hypervisor, as the nested "
                   "VM exit will load them) or only L2's (the nested guest); default both")
    r.set_defaults(func=_read)
    v = sub.add_parser("vmcore", help="write the guest's vmcore (for crash, gdb, drgn)",
                       epilog=VMCORE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("core", nargs="?", help="VMM core file (plain, or zstd/lz4/xz "
                   "compressed); - reads it from stdin (copied to a sparse file in $TMPDIR, "
                   "default /var/tmp, while kvmnote runs)")
    v.add_argument("--coredump", metavar="PID|COMM", help="the newest core dump that "
                   "systemd-coredump stored for this PID or command, instead of CORE")
    v.add_argument("-o", "--output", required=True, metavar="VMCORE", help="vmcore to write")
    v.add_argument("--force", action="store_true", help="overwrite an existing VMCORE")
    v.add_argument("--vm", type=int, metavar="N", help="the VM with vm_index N (needed "
                   "when the core has several)")
    v.add_argument("--cpu-map", metavar="ID=CPU,...", help="guest CPU number of each "
                   "vcpu_id (default: vcpu_id order)")
    v.add_argument("--vmcoreinfo", metavar="FILE", help="the guest's VMCOREINFO text, "
                   "instead of finding it in guest RAM")
    v.add_argument("--allow-partial", action="store_true", help="exit 0 even if guest RAM "
                   "is missing (truncated core) or a vCPU has no state (zero registers)")
    v.add_argument("--format", choices=("elf", "kdump"), default="elf", help="elf (default, "
                   "as QEMU's dump-guest-memory) or kdump (makedumpfile's compressed format)")
    v.add_argument("--compress", metavar="ALGO", help="kdump page compression: zstd "
                   "(default), lzo, snappy or zlib")
    v.add_argument("-d", "--dump-level", type=int, metavar="N", help="kdump: makedumpfile's "
                   "dump level: 0 or 1 (default; zero pages stored once), 2..31 through "
                   "makedumpfile")
    v.add_argument("--level", type=int, choices=(1, 2), default=1, help="1 (default): "
                   "the guest the VMM ran; a vCPU that was running a nested guest gives L1's "
                   "state. 2: that nested guest's vmcore, its memory translated through "
                   "L1's EPT / nested page table (refused without one)")
    v.set_defaults(func=_vmcore)
    t = sub.add_parser("triage", help="what each vCPU was doing, in short; automatic "
                       "reports of systemd-coredump's crashes", epilog=TRIAGE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("core", nargs="?", help="core file, or - for stdin")
    t.add_argument("--coredump", metavar="PID|COMM", help="systemd-coredump's newest core "
                   "of this PID or command")
    t.add_argument("--json", action="store_true", help="print kvmnote-triage/1 JSON")
    t.add_argument("--follow", action="store_true", help="follow systemd-coredump's "
                   "journal entries and write a report for each crashed KVM VMM (what "
                   "the kvmnote-triage service runs)")
    t.add_argument("--reports", default=triage.REPORTS, metavar="DIR",
                   help=f"where --follow writes reports (default {triage.REPORTS})")
    t.add_argument("--state", default=triage.STATE, metavar="DIR",
                   help=f"where --follow keeps its journal cursor (default {triage.STATE})")
    t.add_argument("--install", action="store_true", help=f"install, enable and start "
                   f"the {triage.UNIT} systemd unit (as root)")
    t.set_defaults(func=_triage)
    verify.add_parser(sub)
    return p


def _drop_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser().parse_args(argv)
    try:
        if sys.stdout is None:      # started with fd 1 closed (`kvmnote read CORE >&-`)
            raise KvmnoteError("stdout is closed")
        return args.func(args)
    except KvmnoteError as e:
        if isinstance(e, _StdoutError):
            _drop_stdout()
        print(f"kvmnote: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, with the status of a filter
        # killed by SIGPIPE, as the shell reports it.
        _drop_stdout()
        return 128 + signal.SIGPIPE
