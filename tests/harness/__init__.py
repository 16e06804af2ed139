"""One way to get a kernel, the test VMM and a root filesystem into a machine, run the
scenarios there, and bring the files back; used by every tier (e2e, acceptance, bpf).

    kernel.py       kernels from kpatch/build.sh (cached by content)
    vmm.py          the static test VMM (tests/vmm/Makefile)
    cpio.py         initramfs writer (newc, no root needed)
    rootfs.sh/.py   the Debian root filesystem (python3, bcc, pytest, systemd, QEMU) for L1
    transfer.py     files out over the serial console; files in and out on tar disks
    kvmnote_read.py the one `kvmnote read --json` wrapper (schemas /1 and /2)
    cmdline.py      the L1 kernel command line
    machines.py     backends: QEMU TCG (AMD SVM), Bochs (Intel VMX), native /dev/kvm
    scenarios.py    the scenario list and its expectations; expected.py the VMM's values
    checks.py       the checks every backend's cores go through
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
