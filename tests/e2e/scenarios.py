"""The scenario list: one list, run on both vendors, batched into one boot
per (vendor, kernel variant). Each entry: a harness.Scenario (how to run the
test VMM in the guest) and what the VMM was told to build (the expectation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import Scenario

CPARAM = "/sys/module/kvm/parameters/coredump_notes"


@dataclass
class Spec:
    scenario: Scenario
    mode: str = "long"
    kinds: list[str] = field(default_factory=list)   # per vCPU id 0..n-1
    notes: str = "kvm"      # "kvm": KVM notes expected; "none": none; "truncated"
    foreign: bool = False
    crash: str = "abort"
    rlimit: int | None = None

    @property
    def name(self):
        return self.scenario.name


def _s(name, args, **kw):
    pattern = kw.pop("pattern", "file")
    pre = kw.pop("pre", [])
    post = kw.pop("post", [])
    timeout = kw.pop("timeout", 120)
    return Spec(Scenario(name, args + ["--timeout", "60"], pattern=pattern, pre=pre, post=post,
                         timeout=timeout), **kw)


H, S, I, K = "halted", "spinning", "never_ran", "stuck"

SPECS = [
    _s("real1", ["--mode", "real", "--halt", "1"], mode="real", kinds=[H]),
    _s("pm32", ["--mode", "pm32", "--halt", "1"], mode="pm32", kinds=[H]),
    _s("long1", ["--halt", "1"], kinds=[H]),
    _s("long2", ["--halt", "2", "--dup"], kinds=[H, H]),
    _s("mixed8", ["--halt", "4", "--spin", "2", "--idle", "2"], kinds=[H] * 4 + [S] * 2 + [I] * 2),
    _s("segv", ["--halt", "2", "--crash", "segv"], kinds=[H, H], crash="segv"),
    _s("novcpu", ["--halt", "0"], kinds=[]),
    _s("foreign", ["--halt", "1", "--foreign"], kinds=[H], foreign=True),
    _s("stuck", ["--halt", "1", "--stuck"], kinds=[H, K]),
    _s("pipe", ["--halt", "2", "--dup"], kinds=[H, H], pattern="pipe"),
    _s("disabled", ["--halt", "1"], kinds=[H], notes="none",
       pre=[f"echo N > {CPARAM}"], post=[f"echo Y > {CPARAM}"]),
    _s("rlimit4k", ["--halt", "2", "--rlimit-core", "4096"], kinds=[H, H], notes="truncated",
       rlimit=4096),
    _s("rlimit64k", ["--halt", "2", "--rlimit-core", "65536"], kinds=[H, H], notes="truncated",
       rlimit=65536),
    _s("many64", ["--halt", "64", "--seq"], kinds=[H] * 64, timeout=300),
    _s("nonkvm", ["--nonkvm"], notes="none"),
]

# KVM as modules: load them; later, unload them (the core-dump provider must
# unregister cleanly: a process dumping core afterwards gets no KVM notes and
# no oops) and load them again (it must register again).
INSMOD = ("for m in irqbypass kvm kvm-amd kvm-intel; do [ -f /lib/modules/$m.ko ] && "
          "insmod /lib/modules/$m.ko; done; lsmod")
RMMOD = "rmmod kvm_amd 2>/dev/null; rmmod kvm_intel 2>/dev/null; rmmod kvm"
MODULE_SPECS = [
    _s("unload", ["--nonkvm"], notes="none", pre=[RMMOD, "lsmod > /out/unload/lsmod.txt"]),
    _s("reload", ["--halt", "1"], kinds=[H], pre=[INSMOD]),
]
# Fault injection (debug kernel): every allocation made by the KVM core-dump
# code (arch/x86/kvm/coredump.c, found through the stack-trace filter) fails
# once the first SPACE bytes of them were granted.  The sweep reaches each
# failure point: the dump's bookkeeping, the VM list, the note table, a VM's
# memslots, a vCPU's note.
FAULT_DIRS = "/sys/kernel/debug/failslab /sys/kernel/debug/fail_page_alloc"
FAULT_PREAMBLE = [
    "mount -t debugfs none /sys/kernel/debug",
    # Only kvm_core_snapshot(): every allocation of the snapshot has it on its stack,
    # the write pass does not (its page-cache allocations would only make the core
    # file's writes fail, as a full disk does).
    # (v1 called it kvm_core_size(): the test must be able to fail on v1.)
    "sym=$(grep -E ' [tT] kvm_core_(snapshot|size)$' /proc/kallsyms | head -1)",
    "lo=$(echo \"$sym\" | cut -d' ' -f1)",
    "end=$(sort /proc/kallsyms | awk -v l=$lo '$1 > l {print $1; exit}')",
    "echo \"fault range $lo-$end: ${sym##* }\" > /out/fault_range.txt",
    f"for d in {FAULT_DIRS}; do echo 0x$lo > $d/require-start; echo 0x$end > $d/require-end;"
    " echo 32 > $d/stacktrace-depth; echo N > $d/ignore-gfp-wait; echo -1 > $d/times;"
    " echo 1 > $d/verbose; echo 0 > $d/probability; done",
    "echo 0 > /sys/kernel/debug/fail_page_alloc/min-order",
    "echo N > /sys/kernel/debug/fail_page_alloc/ignore-gfp-highmem",
]
# failslab counts its space in bytes, fail_page_alloc in pages: (slab, pages).
FAULT_SPACES = ((0, 0), (100, 1000), (400, 1000), (1000, 1000), (3000, 1000),
                (100000, 0), (100000, 2), (100000, 1000))


def _fault(slab, pages):
    arm = (f"echo {slab} > /sys/kernel/debug/failslab/space; "
           f"echo {pages} > /sys/kernel/debug/fail_page_alloc/space; "
           f"for d in {FAULT_DIRS}; do echo 100 > $d/probability; done")
    disarm = f"for d in {FAULT_DIRS}; do echo 0 > $d/probability; done"
    return _s(f"fault{slab}_{pages}", ["--halt", "2", "--dup"], kinds=[H, H], notes="fault",
              pre=[arm], post=[disarm])


FAULT_SPECS = [_fault(*n) for n in FAULT_SPACES]
BY_NAME = {s.name: s for s in SPECS + MODULE_SPECS + FAULT_SPECS}

# On the unpatched kernel: enough to show "no KVM notes" and to get the
# reference note list of a non-KVM process.
UNPATCHED = ["real1", "pm32", "long2", "mixed8", "nonkvm"]
UNPATCHED_KVM = UNPATCHED[:4]

BASE_PREAMBLE = [
    "cat /sys/module/kvm/parameters/coredump_notes > /out/coredump_notes.txt 2>&1",
]
# Traces kvm:kvm_coredump_vcpu events, in a boot of its own so that the
# expected event list is exact.
TRACE_PREAMBLE = [
    "mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null",
    "echo 1 > /sys/kernel/tracing/events/kvm/kvm_coredump_vcpu/enable",
]
TRACE_NAMES = ("long2", "mixed8", "stuck")
