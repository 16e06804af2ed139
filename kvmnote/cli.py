"""`kvmnote` command line: a thin argparse layer over the library."""

import argparse
import json
import sys

from . import kdump, report, vmcore
from .core import open_core
from .errors import KvmnoteError

EPILOG = """examples:
  kvmnote read core.qemu.1234              # VM summary, registers of every vCPU
  kvmnote read --vcpu 2 core.qemu.1234     # only the vCPU with vcpu_id 2
  kvmnote read --all core.qemu.1234.zst    # plus MSRs, LAPIC, XSAVE... (compressed core)
  kvmnote read --json core | jq '.vcpus[].regs.rip'

exit status: 0 success, 2 error (bad input or usage; one line on stderr)
"""

VMCORE_EPILOG = """examples:
  kvmnote vmcore core.qemu.1234 -o guest.vmcore       # then: drgn -c guest.vmcore -s vmlinux
  kvmnote vmcore core.qemu.1234.zst -o guest.vmcore   # systemd-coredump's compressed core
  kvmnote vmcore --cpu-map 0=0,2=1 core -o guest.vmcore
  kvmnote vmcore --allow-partial truncated.core -o guest.vmcore
  kvmnote vmcore --format kdump core.qemu.1234 -o guest.kdump  # makedumpfile's format, zstd
  kvmnote vmcore --format kdump --compress lzo core -o guest.kdump

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


def _read(args: argparse.Namespace) -> int:
    """`kvmnote read`: print the KVM state in a core."""
    with open_core(args.core) as core:
        vcpus = core.vcpus
        if args.vcpu is not None:
            vcpus = [v for v in vcpus if v.vcpu_id == args.vcpu]
            if not vcpus:
                raise KvmnoteError(f"{args.core}: no vCPU with vcpu_id {args.vcpu} "
                                   f"(have {sorted({v.vcpu_id for v in core.vcpus})})")
        if args.json:
            sys.stdout.write(json.dumps(report.to_json(core, vcpus)) + "\n")
        else:
            sys.stdout.write(report.text(core, vcpus, args.all))
    return 0


def _vmcore(args: argparse.Namespace) -> int:
    """`kvmnote vmcore`: write a guest vmcore from a VMM core."""
    info = vmcore.read_vmcoreinfo_file(args.vmcoreinfo) if args.vmcoreinfo else None
    cpu_map = vmcore.parse_cpu_map(args.cpu_map) if args.cpu_map is not None else None
    common = dict(vm_index=args.vm, cpu_map=cpu_map, vmcoreinfo=info,
                  allow_partial=args.allow_partial, force=args.force,
                  progress=vmcore.tty_progress(sys.stderr))
    if args.format == "kdump":
        res = kdump.write_kdump(args.core, args.output, compression=args.compress or
                                kdump.DEFAULT_COMPRESSION, dump_level=args.dump_level
                                if args.dump_level is not None else 1, **common)
    elif args.compress or args.dump_level is not None:
        raise KvmnoteError("--compress and --dump-level need --format kdump (the ELF "
                           "output leaves zero pages out as holes and compresses nothing)")
    else:
        res = vmcore.write_vmcore(args.core, args.output, **common)
    for w in res.warnings:
        print(f"kvmnote: warning: {w}", file=sys.stderr)
    if res.missing:
        total = sum(m.size for m in res.missing)
        print(f"kvmnote: {args.output}: {total} bytes of guest RAM are not in the core, "
              f"written as zeros:", file=sys.stderr)
        for m in res.missing:
            print(f"kvmnote:   missing {m}", file=sys.stderr)
    return 0 if res.complete or args.allow_partial else 1


def parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    p = argparse.ArgumentParser(
        prog="kvmnote", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read KVM vCPU and VM state from the notes in a VMM's core file.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("read", help="show the VMs and vCPUs in a core file", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("core", help="core file (plain, or zstd/lz4/xz compressed)")
    r.add_argument("--json", action="store_true", help="print kvmnote-read/1 JSON")
    r.add_argument("--vcpu", type=int, metavar="N", help="only the vCPU with vcpu_id N")
    r.add_argument("--all", action="store_true",
                   help="also MSRs, debug registers, events, XCRs, XSAVE, LAPIC")
    r.set_defaults(func=_read)
    v = sub.add_parser("vmcore", help="write the guest's vmcore (for crash, gdb, drgn)",
                       epilog=VMCORE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("core", help="VMM core file (plain, or zstd/lz4/xz compressed)")
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
    v.set_defaults(func=_vmcore)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KvmnoteError as e:
        print(f"kvmnote: {e}", file=sys.stderr)
        return 2
