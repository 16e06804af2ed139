"""`kvmnote` command line: a thin argparse layer over the library."""

import argparse
import json
import sys

from . import report
from .core import open_core
from .errors import KvmnoteError

EPILOG = """examples:
  kvmnote read core.qemu.1234              # VM summary, registers of every vCPU
  kvmnote read --vcpu 2 core.qemu.1234     # only the vCPU with vcpu_id 2
  kvmnote read --all core.qemu.1234.zst    # plus MSRs, LAPIC, XSAVE... (compressed core)
  kvmnote read --json core | jq '.vcpus[].regs.rip'

exit status: 0 success, 2 error (bad input or usage; one line on stderr)
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
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KvmnoteError as e:
        print(f"kvmnote: {e}", file=sys.stderr)
        return 2
