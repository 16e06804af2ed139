"""What bpf/kvmcoredump.py costs a VM: port-I/O exit rate with and without its BPF program.

Boots the emulated SVM machine of the bcc test (kernel `kpatch/build.sh -c l1`, Debian root
filesystem with python3-bpfcc from tests/harness/rootfs.sh, QEMU TCG -cpu max). Inside, a VMM
whose only vCPU loops on `out %al,$0x80` (each iteration a VM exit, IOIO, and a KVM_EXIT_IO
to user space) runs for the whole measurement and logs its exit count every 50 ms, while a
helper loads the tool's own BPF program (kvmcoredump.bpf_text(), the same C and maps) and an
empty program on the same tracepoint once, and attaches them in turn, in windows of WIDTH
seconds:

    untraced, tool, untraced, empty, untraced, tool, ...      (WINDOWS windows)

Each window's exit rate is divided by the mean of the untraced windows on either side, which
cancels the drift of a shared, emulated machine; the medians of those ratios are the figures
(with quartiles, and the mean with its standard error). The empty program is the floor any
kvm_exit tracer pays (the tracepoint builds its record for BPF); the tool's start-up (bcc
compiling the C) is in neither. At the end the helper reads the tool's maps: they must hold
the exits of its windows and no drops.

Asserts nothing, as the other benchmarks. The figure is for nested SVM under TCG, where an
exit costs far more than on hardware; it says how the program compares with an emulated exit,
not what it costs on a real host.

Run (root; QEMU, mmdebstrap, gcc, linux-source-6.12 as for tests/bpf):

    python tests/bench/bench_bpf_overhead.py [--windows 320] [--width 1]

The machine is booted with the harness (tests/harness), as tests/bpf boots it.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
from harness import REPO  # noqa: E402
from harness.kernel import kernel  # noqa: E402
from harness.machines import qemu_available, run_qemu  # noqa: E402
from harness.rootfs import debian_rootfs  # noqa: E402
from harness.transfer import blank_disk, tar_disk, untar_disk  # noqa: E402

# The VMM: one real-mode vCPU at 0 running `out %al,$0x80; jmp .-2` (e6 80 eb fc);
# counts KVM_EXIT_IO for SECONDS, then prints "exits N seconds S".
PIO_VMM_C = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

#define CHECK(x) do { if ((x) < 0) { perror(#x); exit(2); } } while (0)

int main(int argc, char **argv)
{
	static const unsigned char code[] = { 0xe6, 0x80, 0xeb, 0xfc };
	double secs = argc > 1 ? atof(argv[1]) : 5, sample = argc > 2 ? atof(argv[2]) : 0.05;
	double t0, t, next;
	unsigned long n = 0;
	int kvm, vm, vcpu, size;
	struct kvm_run *run;
	struct kvm_sregs sregs;
	struct kvm_regs regs = { .rip = 0, .rflags = 2 };
	unsigned char *mem;

	CHECK(kvm = open("/dev/kvm", O_RDWR));
	CHECK(vm = ioctl(kvm, KVM_CREATE_VM, 0));
	mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	memcpy(mem, code, sizeof(code));
	struct kvm_userspace_memory_region r = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = 0x1000,
		.userspace_addr = (unsigned long)mem };
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r));
	CHECK(vcpu = ioctl(vm, KVM_CREATE_VCPU, 0));
	CHECK(size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0));
	run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs));
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs));
	CHECK(ioctl(vcpu, KVM_SET_REGS, &regs));
	next = t0 = now();
	for (;;) {
		CHECK(ioctl(vcpu, KVM_RUN, 0));
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "pio: exit reason %u\n", run->exit_reason);
			return 1;
		}
		if (!(++n & 63) && (t = now()) >= next) {
			printf("%.6f %lu\n", t, n);
			next += sample;
			if (t - t0 >= secs)
				break;
		}
	}
	return 0;
}
"""

# Loads the tool's BPF program and an empty one on the same tracepoint once, then attaches
# them in turn: windows none, tool, none, empty, ...; logs "T STATE" at each window's start.
TOGGLE_PY = """\
import importlib.util, sys, time
from bcc import BPF
spec = importlib.util.spec_from_file_location("kd", "/mnt/in/kvmcoredump.py")
kd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kd)
windows, width = int(sys.argv[1]), float(sys.argv[2])
TP, FN = "kvm:kvm_exit", "tracepoint__kvm__kvm_exit"
tool = BPF(text=kd.bpf_text(kd.parse_args([])), cflags=["-Wno-ignored-attributes"])
empty = BPF(text="TRACEPOINT_PROBE(kvm, kvm_exit) { return 0; }")
for b in (tool, empty):
    b.detach_tracepoint(TP)
print("ready", flush=True)
time.sleep(2)
for i in range(windows):
    b = {1: tool, 3: empty}.get(i % 4)    # a BPF object is falsy (len: its tables)
    if b is not None:
        b.attach_tracepoint(tp=TP, fn_name=FN)
    print("%.6f %d" % (time.monotonic(), 0 if b is None else i % 4), flush=True)
    time.sleep(width)
    if b is not None:
        b.detach_tracepoint(TP)
print("%.6f end" % time.monotonic(), flush=True)
last, counts, drops, _ = kd.read_maps(tool)
print("maps: exits %d drops %d" % (sum(sum(v) for _, v in counts), drops), flush=True)
"""

RUN_SH = """\
set -x
python3 /mnt/in/toggle.py {windows} {width} > /mnt/out/toggle.log 2> /mnt/out/toggle.err &
toggle=$!
while ! grep -q '^ready' /mnt/out/toggle.log; do
    kill -0 $toggle 2>/dev/null || break
    sleep 0.1
done
/mnt/in/pio {seconds} > /mnt/out/pio.log
wait $toggle
echo "toggle exit $?"
"""


def window_rates(samples: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Exits per second between the first and last sample inside [start, end)."""
    inside = [(t, n) for t, n in samples if start <= t < end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < (end - start) / 2:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=320)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--report", metavar="DIR", help="only print the figures of an earlier "
                    "run's directory (printed by that run)")
    a = ap.parse_args()
    if a.report:
        return report(Path(a.report))
    if not qemu_available():
        sys.exit("bench_bpf_overhead: qemu-system-x86_64 not installed")
    bzimage = kernel("-c", "l1")
    rootfs = debian_rootfs()
    d = Path(tempfile.mkdtemp(prefix="bench-bpf-"))
    (d / "pio.c").write_text(PIO_VMM_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-static", "-o", str(d / "pio"), str(d / "pio.c")],
                   check=True)
    tar_disk(d / "in.tar", {
        "pio": d / "pio", "toggle.py": TOGGLE_PY.encode(),
        "run.sh": RUN_SH.format(windows=a.windows, width=a.width,
                                seconds=a.windows * a.width + 4).encode(),
        "kvmcoredump.py": REPO / "bpf" / "kvmcoredump.py"})
    blank_disk(d / "out.img", 64 << 20)
    rc, timed_out = run_qemu(d, bzimage, None,
                             "root=/dev/vda rw rootfstype=ext4 init=/sbin/kvmnote-init", 1800,
                             memory=1024, disks=((rootfs, "snapshot"), (d / "in.tar", "ro"),
                                                 (d / "out.img", "rw")))
    if rc != 0 or timed_out:
        sys.exit(f"bench_bpf_overhead: qemu exit {rc}{' (timed out)' if timed_out else ''}; "
                 f"see {d / 'console.log'}")
    untar_disk(d / "out.img", d / "out")
    return report(d)


def report(d: Path) -> int:
    """Print the figures of the run in `d`."""
    out = d / "out"
    samples = [(float(t), int(n)) for t, n in
               (line.split() for line in (out / "pio.log").read_text().splitlines())]
    log = (out / "toggle.log").read_text().splitlines()
    marks = [line.split() for line in log if line[:1].isdigit()]
    rates = [(int(m[1]), window_rates(samples, float(m[0]), float(nxt[0])))
             for m, nxt in zip(marks, marks[1:])]
    ratios: dict[int, list[float]] = {1: [], 3: []}
    for i, (state, r) in enumerate(rates):
        around = [x for _, x in rates[max(i - 1, 0):i + 2:2] if x and i > 0]
        if state and r and len(around) == 2:
            ratios[state].append(r / statistics.mean(around))
    untraced = [r for t, r in rates if not t and r]
    width = float(marks[1][0]) - float(marks[0][0])
    print(f"bench_bpf_overhead: in {d}; port I/O loop in nested SVM (QEMU TCG), "
          f"{len(marks) - 1} windows of {width:.1f} s")
    print(f"  untraced windows: {statistics.mean(untraced):.0f} exits/s mean, "
          f"{statistics.pstdev(untraced):.0f} stdev; {log[-1]}")
    for state, what in ((3, "empty program on kvm_exit"), (1, "kvmcoredump's program")):
        r = ratios[state]
        if len(r) < 2:
            continue
        q = statistics.quantiles(r, n=4)
        print(f"exit rate, {what} / untraced: median {statistics.median(r):.3f} "
              f"(quartiles {q[0]:.3f} {q[2]:.3f}; mean {statistics.mean(r):.3f} "
              f"+- {statistics.stdev(r) / len(r) ** 0.5:.3f} standard error; "
              f"{len(r)} windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
