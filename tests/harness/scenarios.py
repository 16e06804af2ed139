"""The scenario list, defined once with its expectations and run on every backend
that can run it (one boot per backend and kernel variant). Adding a scenario is
one entry in SPECS: how the test VMM runs (its arguments, the shell lines around
it) and what the core must then hold; tests/README.md explains the fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from .machines import CPARAM, Scenario


@dataclass
class Spec:
    scenario: Scenario
    mode: str = "long"
    kinds: list[str] = field(default_factory=list)   # per vcpu_id 0..n-1, in each VM
    notes: str = "kvm"      # "kvm": KVM notes expected; "none": none; "truncated"
    crash: str = "abort"    # abort (SIGABRT), segv (a vCPU thread), external (kill -SEGV)
    rlimit: int | None = None
    vms: int = 1            # VMs in the process
    smm: tuple[int, ...] = ()   # vcpu_ids that took an SMI (--smm: SMRAM in address space 1)
    backends: tuple[str, ...] = ("svm", "vmx", "native")

    @property
    def name(self):
        return self.scenario.name

    def mode_of(self, vcpu_id: int) -> str:
        """The mode whose state this vCPU stopped in (expected.py's "smm" for SMM)."""
        return "smm" if vcpu_id in self.smm else self.mode


def _s(name, args, **kw):
    sc = {k: kw.pop(k) for k in ("pattern", "pre", "post") if k in kw}
    timeout = kw.pop("timeout", 120)
    return Spec(Scenario(name, args + ["--timeout", "60"], timeout=timeout, **sc), **kw)


H, S, I, K = "halted", "spinning", "never_ran", "stuck"
SIGNAL = {"abort": 6, "segv": 11, "external": 11}

SPECS = [
    _s("real1", ["--mode", "real", "--halt", "1"], mode="real", kinds=[H]),
    _s("pm32", ["--mode", "pm32", "--halt", "1"], mode="pm32", kinds=[H]),
    _s("long1", ["--halt", "1"], kinds=[H]),
    _s("long2", ["--halt", "2", "--dup"], kinds=[H, H]),
    _s("mixed8", ["--halt", "4", "--spin", "2", "--idle", "2"], kinds=[H] * 4 + [S] * 2 + [I] * 2),
    _s("segv", ["--halt", "2", "--crash", "segv"], kinds=[H, H], crash="segv"),
    _s("novcpu", ["--halt", "0"], kinds=[]),
    _s("foreign", ["--halt", "1", "--foreign"], kinds=[H]),
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
    # What v1's test VMM never exercised: an in-kernel LAPIC (then `hlt` stays in
    # the kernel: spinning and idle vCPUs), two VMs in one process, a fatal signal
    # sent by another process while vCPU threads are in KVM_RUN.
    _s("irqchip", ["--halt", "0", "--spin", "1", "--idle", "2", "--irqchip"], kinds=[S, I, I]),
    _s("twovms", ["--halt", "1", "--spin", "1", "--twovms"], kinds=[H, S], vms=2),
    _s("extsignal", ["--halt", "1", "--spin", "2", "--crash", "external"], kinds=[H, S, S],
       crash="external"),
    # A memslot in address space 1 (SMRAM) and vCPU 0 inside SMM, at its handler's hlt;
    # vCPU 1 outside SMM. Needs KVM_CAP_MULTI_ADDRESS_SPACE > 1 (CONFIG_KVM_SMM).
    _s("smm", ["--halt", "2", "--smm"], kinds=[H, H], smm=(0,)),
    # Kernel series v2 (issue 8).
    _s("closedfd", ["--halt", "2", "--close-vcpu-fd", "1"], kinds=[H, H]),
    _s("pidns", ["--halt", "2", "--pidns"], kinds=[H, H]),
    _s("policy_off", ["--halt", "1", "--coredump-filter", "0x33"], kinds=[H], notes="none"),
    _s("policy_always", ["--halt", "1", "--coredump-filter", "0x33"], kinds=[H],
       pre=[f"echo 2 > {CPARAM}", f"cat {CPARAM} > @OUT@/policy_always/param.txt"],
       post=[f"echo 1 > {CPARAM}"]),
]

# KVM as modules: load them; later, unload them (the core-dump provider must
# unregister cleanly: a process dumping core afterwards gets no KVM notes and
# no oops) and load them again (it must register again). Initramfs machines only.
INSMOD = ("for m in irqbypass kvm kvm-amd kvm-intel; do [ -f /lib/modules/$m.ko ] && "
          "insmod /lib/modules/$m.ko; done; lsmod")
RMMOD = "rmmod kvm_amd 2>/dev/null; rmmod kvm_intel 2>/dev/null; rmmod kvm"
MODULE_SPECS = [
    _s("unload", ["--nonkvm"], notes="none", pre=[RMMOD, "lsmod > @OUT@/unload/lsmod.txt"],
       backends=("svm", "vmx")),
    _s("reload", ["--halt", "1"], kinds=[H], pre=[INSMOD], backends=("svm", "vmx")),
]
# Fault injection (debug kernel, emulated machines): every allocation that the
# KVM core-dump snapshot makes fails once a budget of them was granted. The
# sweep reaches each failure point: the dump's bookkeeping, the VM list, the
# note table, a VM's memslots, a vCPU's note (tests/e2e/test_faultinject.py).
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
# (600, 1000): the slab objects before the VM note (the dump, its VM list, its note
# array: about 480 bytes) fit, the VM note's memslots (a 256-byte object) do not;
# the vCPU notes of a guest with VMX or SVM in its CPUID (its nested state: over
# 8 KiB) come from the page allocator.  Seen: 500-700 drop the memslots, 400 the
# VM, 800 nothing.
# (3000, 0): a vCPU note in a kmalloc slab (VMX's smaller XSAVE) fails, and so does
# kvmalloc's vmalloc fallback.
FAULT_SPACES = ((0, 0), (100, 1000), (400, 1000), (600, 1000), (3000, 1000), (3000, 0),
                (100000, 0), (100000, 2), (100000, 1000))


def _fault(slab, pages):
    arm = (f"echo {slab} > /sys/kernel/debug/failslab/space; "
           f"echo {pages} > /sys/kernel/debug/fail_page_alloc/space; "
           f"for d in {FAULT_DIRS}; do echo 100 > $d/probability; done")
    disarm = f"for d in {FAULT_DIRS}; do echo 0 > $d/probability; done"
    return _s(f"fault{slab}_{pages}", ["--halt", "2", "--dup"], kinds=[H, H], notes="fault",
              pre=[arm], post=[disarm], backends=("svm", "vmx"))


FAULT_SPECS = [_fault(*n) for n in FAULT_SPACES]
BY_NAME = {s.name: s for s in SPECS + MODULE_SPECS + FAULT_SPECS}
POSITIVE = [s.name for s in SPECS if s.notes == "kvm" and s.kinds]  # novcpu: its own test
NEGATIVE = [s.name for s in SPECS if s.notes == "none"]

# On the unpatched kernel: enough to show "no KVM notes" and to get the
# reference note list of a non-KVM process.
UNPATCHED = ["real1", "pm32", "long2", "mixed8", "nonkvm"]
UNPATCHED_KVM = UNPATCHED[:4]

# Traces kvm:kvm_coredump_vcpu events, in a boot of its own so that the
# expected event list is exact.
TRACE_PREAMBLE = [
    "mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null",
    "echo 1 > /sys/kernel/tracing/events/kvm/kvm_coredump_vcpu/enable",
]
TRACE_NAMES = ("long2", "mixed8", "stuck")
