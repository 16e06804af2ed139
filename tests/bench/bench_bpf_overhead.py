"""What bpf/kvmcoredump.py costs a VM: port-I/O exit rate with and without the tracer.

Boots the emulated SVM machine of the bcc test (kernel `kpatch/build.sh -c l1`, Debian root
filesystem with python3-bpfcc from tests/bpf/rootfs.sh, QEMU TCG -cpu max) and, inside it,
runs a VMM whose only vCPU loops on `out %al,$0x80` (every iteration a VM exit, IOIO, and a
KVM_EXIT_IO to user space), alternately untraced and under the tracer, in one boot:

    untraced, traced, untraced, traced, ..., untraced      (ROUNDS traced runs)

and prints each rate, each traced rate over the mean of the untraced runs around it (which
cancels the drift of a shared, emulated machine), and the median of those ratios. Asserts nothing
(as the other benchmarks), except that the tracer saw the exits the VMM counted and lost
none. The figure is for nested SVM under TCG, where an exit costs far more than on hardware,
so the tracer's share is smaller here than on a real host: read it as a lower bound of the
overhead's ratio, not a hardware figure.

Run (root; QEMU, mmdebstrap, gcc, linux-source-6.12 as for tests/bpf):

    python tests/bench/bench_bpf_overhead.py [--seconds 10] [--rounds 6]

The machine is booted with the pieces of tests/bpf/test_kvmcoredump.py, imported, not
copied; that harness is being refactored into one package, and this file should then take
its boot helper from there.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[1] / "bpf"))
from testlib import L1_TSC  # noqa: E402
from test_kvmcoredump import QEMU, REPO, build_kernel  # noqa: E402

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
	double secs = argc > 1 ? atof(argv[1]) : 5, t0, t;
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
	t0 = now();
	for (;;) {
		CHECK(ioctl(vcpu, KVM_RUN, 0));
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "pio: exit reason %u\n", run->exit_reason);
			return 1;
		}
		n++;
		if (!(n & 255) && (t = now()) - t0 >= secs)
			break;
	}
	printf("exits %lu seconds %.3f\n", n, t - t0);
	return 0;
}
"""

RUN_SH = """\
set -x
for i in $(seq {rounds}); do
    /mnt/in/pio {seconds} > /mnt/out/untraced.$i
    python3 /mnt/in/kvmcoredump.py -j /mnt/out/trace.$i.json > /mnt/out/tracer.$i.out \\
        2> /mnt/out/tracer.$i.err &
    tracer=$!
    while ! grep -q '^Tracing' /mnt/out/tracer.$i.out; do
        kill -0 $tracer 2>/dev/null || break
        sleep 0.2
    done
    /mnt/in/pio {seconds} > /mnt/out/traced.$i
    kill -INT $tracer
    wait $tracer
    echo "tracer exit $?"
done
/mnt/in/pio {seconds} > /mnt/out/untraced.$(({rounds} + 1))
ls -l /mnt/out
"""


def rate(path: Path) -> tuple[int, float]:
    words = path.read_text().split()
    return int(words[1]), int(words[1]) / float(words[3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    if QEMU is None:
        sys.exit("bench_bpf_overhead: qemu-system-x86_64 not installed")
    kernel = build_kernel()
    rootfs = subprocess.run([str(REPO / "tests" / "bpf" / "rootfs.sh")], check=True,
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    d = Path(tempfile.mkdtemp(prefix="bench-bpf-"))
    (d / "pio.c").write_text(PIO_VMM_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-static", "-o", str(d / "pio"), str(d / "pio.c")],
                   check=True)
    (d / "run.sh").write_text(RUN_SH.format(rounds=a.rounds, seconds=a.seconds))
    with tarfile.open(d / "in.tar", "w") as t:
        t.add(REPO / "bpf" / "kvmcoredump.py", "kvmcoredump.py")
        t.add(d / "pio", "pio")
        t.add(d / "run.sh", "run.sh")
    with open(d / "out.img", "wb") as f:
        f.truncate(64 << 20)
    cmd = ["timeout", "1800", QEMU, "-accel", "tcg", "-cpu", "max",
           "-smp", "2,sockets=2,cores=1,threads=1", "-m", "1024",
           "-nographic", "-no-reboot", "-kernel", kernel,
           "-append", "console=ttyS0 root=/dev/vda rw rootfstype=ext4 "
                      "init=/sbin/kvmnote-init panic=-1 " + L1_TSC,
           "-drive", f"file={rootfs},if=virtio,format=raw,snapshot=on",
           "-drive", f"file={d / 'in.tar'},if=virtio,format=raw,readonly=on",
           "-drive", f"file={d / 'out.img'},if=virtio,format=raw"]
    with open(d / "console.log", "w") as log:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    out = d / "out"
    with tarfile.open(d / "out.img") as t:
        t.extractall(out)
    print(f"bench_bpf_overhead: in {d}; {a.rounds} rounds of {a.seconds} s, port I/O loop "
          f"in nested SVM (QEMU TCG)")
    untraced = [rate(out / f"untraced.{i}")[1] for i in range(1, a.rounds + 2)]
    ratios = []
    for i in range(1, a.rounds + 1):
        n_t, r_t = rate(out / f"traced.{i}")
        rec = json.loads((out / f"trace.{i}.json").read_text())
        seen = sum(v["exits"] for p in rec["processes"] for v in p["vcpus"])
        io = sum(c["count"] for p in rec["processes"] for v in p["vcpus"]
                 for c in v["exit_counts"] if c["reason_name"] == "IOIO")
        ratios.append(r_t / statistics.mean(untraced[i - 1:i + 1]))
        print(f"  untraced {untraced[i - 1]:7.0f}/s  traced {r_t:7.0f}/s  ratio "
              f"{ratios[-1]:.3f}  (tracer saw {seen} exits, {io} IOIO, the VMM counted "
              f"{n_t}; lost {rec['lost_events']}, dropped {rec['map_full_drops']})")
        if io < n_t or rec["lost_events"] or rec["map_full_drops"]:
            print("  WARNING: the tracer missed exits in this round")
    print(f"  untraced {untraced[-1]:7.0f}/s")
    print(f"traced/untraced exit rate: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; untraced runs "
          f"{statistics.mean(untraced):.0f}/s mean, {statistics.pstdev(untraced):.0f} stdev)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
