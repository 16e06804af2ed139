"""How fast a guest writes its memory inside our emulated machine: the L2 guest of the
acceptance tier (Debian's QEMU -accel kvm inside the patched kernel under QEMU TCG, nested
SVM) copies real files into its tmpfs, timed by the guest's own clock.

Run: python tests/bench/nested_write_speed.py [MIB]   (root; prints figures, asserts nothing)

This is the measurement behind bench_kdump.py's choice of guest: filling a >= 4 GiB guest
with real content this way would take (4096 / MiB-per-second) seconds of emulation, on top
of an L1 big enough to hold it.
"""

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "acceptance"))
import qemurun  # noqa: E402

WRITE = """#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /w; mount -t tmpfs -o size=90% w /w
t0=$(cut -d' ' -f1 /proc/uptime)
n=0
while [ $n -lt @MIB@ ]; do cat /bin/busybox > /w/f$n; n=$((n + 1)); done
t1=$(cut -d' ' -f1 /proc/uptime)
echo "KVMNOTE-WRITE $t0 $t1 $(du -sm /w | cut -f1)" > /dev/ttyS0
echo "KVMNOTE-GUEST-READY vmcoreinfo=x" > /dev/ttyS0
while :; do sleep 1000; done
"""


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    # busybox is about 2 MiB: `mib` / 2 copies of it, about `mib` MiB of page cache.
    qemurun.GUEST_INIT = WRITE.replace("@MIB@", str(mib // 2))
    qemurun.GUEST_MIB = mib + 256
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        t = time.monotonic()
        r = qemurun.run(Path(d), qemurun.kernel("-c", "l1"),
                        qemurun.kernel("-n", "--base", "guest"), scenarios=("running",))
        wall = time.monotonic() - t
        log = (r["out"] / "running.guest.log").read_text(errors="replace")
    m = re.search(r"KVMNOTE-WRITE (\S+) (\S+) (\d+)", log)
    if not m:
        raise SystemExit("no KVMNOTE-WRITE line in the guest's log:\n" + log[-2000:])
    t0, t1, written = float(m[1]), float(m[2]), int(m[3])
    rate = written / (t1 - t0)
    print(f"L2 wrote {written} MiB of file copies into its tmpfs in {t1 - t0:.1f} s "
          f"(guest clock): {rate:.0f} MiB/s; whole L1 run {wall:.0f} s host wall time")
    print(f"=> filling a 4 GiB guest this way: about {4096 / rate / 60:.1f} minutes of "
          f"emulation, each time the benchmark runs")


if __name__ == "__main__":
    main()
