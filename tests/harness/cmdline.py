"""The kernel command line of every L1 machine (the kernel under test), in one place."""

# Under a loaded host the L1 kernel's PIT-based TSC calibration fails now and then
# ("tsc: Marking TSC unstable due to could not calculate TSC khz"); KVM then has
# tsc_khz = 0, kvm_guest_time_update() keeps re-raising KVM_REQ_CLOCK_UPDATE and
# KVM_RUN never enters the guest. A fixed TSC frequency avoids the calibration.
L1_TSC = "tsc_early_khz=2000000"

# The host "configured for it" (kernel series v2): coredump_filter bit 9 (0x200,
# KVM guest CPU state) on top of the default 0x33, inherited by every process, so
# that kvm.coredump_notes=1 (only processes with bit 9) writes notes for the VMMs.
# Kernels without v2 mask the unknown bit silently.
COREDUMP_FILTER = "coredump_filter=0x233"

L1_CMDLINE = f"console=ttyS0 panic=-1 {L1_TSC} {COREDUMP_FILTER}"
