/* kvmnote end-to-end test VMM: sets up VMs in a known state, stops them at a
 * known point, writes what KVM's ioctls report to a side JSON file, then
 * crashes so that the kernel writes a core file.
 *
 *   vmm --report FILE [--mode real|pm32|long] [--halt N] [--spin N] [--idle N]
 *       [--seq] [--crash abort|segv|external|none] [--dup] [--foreign] [--stuck]
 *       [--nstuck N]
 *       [--rlimit-core BYTES] [--nonkvm] [--timeout SEC] [--close-vcpu-fd ID]
 *       [--pidns] [--coredump-filter HEX] [--irqchip] [--twovms] [--smm]
 *
 * vCPU ids are 0..halt-1 (run to `hlt`), then spinners (`jmp .`, IF=1), then
 * idle ones (created and set up, never run).  --stuck adds one more spinning
 * vCPU run by a clone(CLONE_VM|CLONE_FILES) child that is not in the thread
 * group, so it keeps vcpu->mutex while the process dumps core; --nstuck N adds
 * N of them (--stuck is --nstuck 1; with --halt 0 every vCPU is busy).  They
 * run SCHED_IDLE: they hold their vCPUs without taking CPU time from the dump
 * (tests/bench/bench_hook.py times dumps with 256 of them).  --foreign
 * receives a vCPU fd (id 77) of a VM made by a forked child over SCM_RIGHTS.
 * --close-vcpu-fd ID: that (halted) vCPU's fd is closed and its kvm_run
 * unmapped before the crash.  --pidns: the VMM runs as pid 2 of a new pid
 * namespace, below a small init that waits for it.  --coredump-filter: written
 * to /proc/self/coredump_filter first.  --irqchip: KVM_CREATE_IRQCHIP (LAPIC in
 * the kernel; then `hlt` does not exit to us, so only spinning and idle vCPUs).
 * --twovms: a second VM with the same vCPUs.  --crash external: another process
 * sends SIGSEGV while the vCPU threads are where they are.  --crash none: no
 * crash; with the report written the VMM waits, its vCPUs where they are, until
 * killed (it runs inside a guest whose own VMM is the one crashed: the nested
 * acceptance test).  --smm: SMRAM as a
 * memslot of address space 1, and an SMI (KVM_SMI) for vCPU 0 of each VM before
 * it first runs, so it stops at the `hlt` of its SMM handler; when KVM cannot
 * (KVM_CAP_MULTI_ADDRESS_SPACE < 2 or no KVM_CAP_X86_SMM), the report says why
 * ("smm_unsupported") and the VMM exits 3 without crashing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvmtest.h"

#define MAX_VCPUS 256
#define FOREIGN_VCPU_ID 77

#define MAX_VMS 2

static enum mode mode = MODE_LONG;
static struct vm vms[MAX_VMS];
static struct vcpu vcpus[MAX_VMS * MAX_VCPUS];	/* index i: VM i / n, vcpu_id i % n */
static struct vcpu_state states[MAX_VMS * MAX_VCPUS];
static int kind[MAX_VMS * MAX_VCPUS];	/* 0 halt, 1 spin, 2 idle, 3 stuck */
static const char *kind_name[] = { "halted", "spinning", "never_ran", "stuck" };
/* Written by the vCPU threads: tids[] and exit_reason[] with atomic stores,
 * states[] before halted_count is raised under `lock`; the main thread reads
 * them under `lock` or with atomic loads. */
static int tids[MAX_VMS * MAX_VCPUS];
static int exit_reason[MAX_VMS * MAX_VCPUS];
static int halted_count;
static int crash_segv_idx = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int go_crash;
static volatile uintptr_t crash_addr = 8;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void set_tid(int i)
{
	__atomic_store_n(&tids[i], (int)syscall(SYS_gettid), __ATOMIC_RELEASE);
}

static int run_to_halt(int i)
{
	struct vcpu *v = &vcpus[i];
	set_tid(i);
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN vcpu %d", v->id);
		}
		__atomic_store_n(&exit_reason[i], (int)v->run->exit_reason, __ATOMIC_RELEASE);
		if (v->run->exit_reason == KVM_EXIT_HLT) {
			vcpu_read_state(v, &states[i]);
			return 0;
		}
		if (v->run->exit_reason == KVM_EXIT_INTR)
			continue;
		fprintf(stderr, "vmm: vcpu %d unexpected exit %u\n", v->id, v->run->exit_reason);
		vcpu_read_state(v, &states[i]);
		return -1;
	}
}

static void *halt_thread(void *arg)
{
	int i = (int)(long)arg;
	run_to_halt(i);
	pthread_mutex_lock(&lock);
	halted_count++;
	pthread_cond_broadcast(&cond);
	while (!go_crash)
		pthread_cond_wait(&cond, &lock);
	pthread_mutex_unlock(&lock);
	if (i == crash_segv_idx)
		*(volatile int *)(uintptr_t)crash_addr = 1; /* SIGSEGV in a vCPU thread */
	for (;;)
		pause();
	return NULL;
}

static void *spin_thread(void *arg)
{
	int i = (int)(long)arg;
	set_tid(i);
	for (;;) {
		if (ioctl(vcpus[i].fd, KVM_RUN, 0) < 0 && errno != EINTR)
			die("KVM_RUN spin vcpu %d", vcpus[i].id);
		int r = vcpus[i].run->exit_reason;
		__atomic_store_n(&exit_reason[i], r, __ATOMIC_RELEASE);
		if (r != KVM_EXIT_INTR) {
			fprintf(stderr, "vmm: spinning vcpu %d exit %d\n", vcpus[i].id, r);
			return NULL;
		}
	}
}

/* clone() child sharing mm and fds, not in our thread group. */
static int __attribute__((noreturn)) stuck_fn(void *arg)
{
	int i = (int)(long)arg;
	struct sched_param idle = { 0 };
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	sched_setscheduler(0, SCHED_IDLE, &idle);
	for (;;)
		ioctl(vcpus[i].fd, KVM_RUN, 0);
}

static int foreign_fd = -1;
static pid_t foreign_pid;

static void get_foreign_vcpu(void)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		die("socketpair");
	foreign_pid = fork();
	if (foreign_pid < 0)
		die("fork");
	if (foreign_pid == 0) {
		struct vm fvm;
		struct vcpu fv;
		close(sv[0]);
		vm_create(&fvm, 0);
		vcpu_create(&fvm, &fv, FOREIGN_VCPU_ID);
		char c = 'v';
		struct iovec iov = { &c, 1 };
		union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
				      .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
		struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fv.fd, sizeof(int));
		if (sendmsg(sv[1], &msg, 0) != 1)
			die("sendmsg");
		/* Until the parent is gone: EOF; anything else is a bug here. */
		if (read(sv[1], &c, 1) != 0)
			die("foreign child: read");
		_exit(0);
	}
	close(sv[1]);
	char c;
	struct iovec iov = { &c, 1 };
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
	if (recvmsg(sv[0], &msg, 0) != 1)
		die("recvmsg");
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
	if (!cm || cm->cmsg_type != SCM_RIGHTS)
		die("no SCM_RIGHTS");
	memcpy(&foreign_fd, CMSG_DATA(cm), sizeof(int));
	/* sv[0] stays open: the child exits when we do. */
}


/* An integer option: the whole string, in [lo, hi], else a usage error. */
static long num(const char *opt, const char *val, long lo, long hi, int base)
{
	char *end;
	errno = 0;
	long v = strtol(val, &end, base);
	if (errno || end == val || *end || v < lo || v > hi) {
		fprintf(stderr, "vmm: %s %s: want an integer in [%ld, %ld]\n", opt, val, lo, hi);
		exit(2);
	}
	return v;
}

/* --pidns: this process stays outside, its child is the namespace's init
 * (pid 1), which forks the VMM (pid 2) and waits for it; each passes the
 * VMM's fate up as an exit status (128 + signal, as the shell shows it). */
static void enter_pid_namespace(void)
{
	if (unshare(CLONE_NEWPID) < 0)
		die("unshare(CLONE_NEWPID)");
	for (int level = 0; level < 2; level++) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0)
			continue;	/* the child goes on: ns init, then the VMM */
		int st;
		if (waitpid(pid, &st, 0) < 0)
			die("waitpid");
		_exit(WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st));
	}
	if (getpid() != 2) {
		fprintf(stderr, "vmm: in the new pid namespace as pid %d, want 2\n", getpid());
		exit(2);
	}
}

static void write_coredump_filter(const char *hex)
{
	FILE *f = fopen("/proc/self/coredump_filter", "w");
	if (!f || fprintf(f, "%s\n", hex) < 0 || fclose(f))
		die("write /proc/self/coredump_filter");
}

/* --crash external: a process forked before any guest memory exists (a fork
 * later would write-protect the VMM's memory and so fault the running vCPUs
 * out of the guest, changing their last exit) waits for a byte on a pipe,
 * then sends SIGSEGV. */
static int killer_fd = -1;

static void start_killer(void)
{
	int p[2];
	if (pipe(p) < 0)
		die("pipe");
	pid_t target = getpid(), pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		char c;
		close(p[1]);
		if (read(p[0], &c, 1) == 1) {
			usleep(20000);
			kill(target, SIGSEGV);
		}
		_exit(0);
	}
	close(p[0]);
	killer_fd = p[1];
}

static int is_spinner(int i)
{
	return kind[i] == 1 || kind[i] == 3;
}

static uint64_t spin_flag(int i, int n)
{
	return __atomic_load_n((uint64_t *)((char *)vms[i / n].mem[0] + GPA_FLAGS + 8 * (i % n)),
			       __ATOMIC_ACQUIRE);
}

int main(int argc, char **argv)
{
	const char *report = NULL, *crash = "abort", *filter = NULL;
	int nhalt = 1, nspin = 0, nidle = 0, seq = 0, dup_fd = 0, foreign = 0, stuck = 0;
	int nonkvm = 0, pidns = 0, irqchip = 0, nvms = 1, close_id = -1, smm = 0;
	double timeout = 60;
	long rlimit_core = -1;

	for (int a = 1; a < argc; a++) {
		const char *o = argv[a], *val = a + 1 < argc ? argv[a + 1] : NULL;
#define ARG(name) (!strcmp(o, name) && val && ++a)
		if (ARG("--report")) report = val;
		else if (ARG("--mode")) {
			if (!strcmp(val, "real")) mode = MODE_REAL;
			else if (!strcmp(val, "pm32")) mode = MODE_PM32;
			else if (!strcmp(val, "long")) mode = MODE_LONG;
			else { fprintf(stderr, "vmm: --mode %s: want real, pm32 or long\n", val); return 2; }
		}
		else if (ARG("--halt")) nhalt = num(o, val, 0, MAX_VCPUS, 10);
		else if (ARG("--spin")) nspin = num(o, val, 0, MAX_VCPUS, 10);
		else if (ARG("--idle")) nidle = num(o, val, 0, MAX_VCPUS, 10);
		else if (ARG("--nstuck")) stuck = num(o, val, 0, MAX_VCPUS, 10);
		else if (ARG("--crash")) {
			crash = val;
			if (strcmp(val, "abort") && strcmp(val, "segv") && strcmp(val, "external") &&
			    strcmp(val, "none")) {
				fprintf(stderr, "vmm: --crash %s: want abort, segv, external or none\n",
					val);
				return 2;
			}
		}
		else if (ARG("--rlimit-core")) rlimit_core = num(o, val, 0, 1L << 40, 10);
		else if (ARG("--timeout")) timeout = num(o, val, 1, 3600, 10);
		else if (ARG("--close-vcpu-fd")) close_id = num(o, val, 0, MAX_VCPUS - 1, 10);
		else if (ARG("--coredump-filter")) { num(o, val, 0, 0xffffffffL, 16); filter = val; }
		else if (!strcmp(o, "--seq")) seq = 1;
		else if (!strcmp(o, "--dup")) dup_fd = 1;
		else if (!strcmp(o, "--foreign")) foreign = 1;
		else if (!strcmp(o, "--stuck")) stuck = 1;
		else if (!strcmp(o, "--nonkvm")) nonkvm = 1;
		else if (!strcmp(o, "--pidns")) pidns = 1;
		else if (!strcmp(o, "--irqchip")) irqchip = 1;
		else if (!strcmp(o, "--twovms")) nvms = 2;
		else if (!strcmp(o, "--smm")) smm = 1;
		else { fprintf(stderr, "vmm: bad argument %s\n", o); return 2; }
	}
	if (!report) { fprintf(stderr, "vmm: --report FILE needed\n"); return 2; }
	int n = nhalt + nspin + nidle + stuck;
	if (n > MAX_VCPUS) { fprintf(stderr, "vmm: too many vCPUs\n"); return 2; }
	if (close_id >= nhalt) {
		fprintf(stderr, "vmm: --close-vcpu-fd %d: not a halted vCPU\n", close_id);
		return 2;
	}
	if (irqchip && nhalt) {
		fprintf(stderr, "vmm: --irqchip: `hlt` stays in the kernel; use --spin/--idle\n");
		return 2;
	}
	if (smm && !nhalt) {
		fprintf(stderr, "vmm: --smm: vCPU 0 must be a halted one (--halt 1 or more)\n");
		return 2;
	}
	if (!strcmp(crash, "segv") && (seq || !nhalt)) {
		fprintf(stderr, "vmm: --crash segv needs a halted vCPU thread (not --seq)\n");
		return 2;
	}
	if (pidns)
		enter_pid_namespace();
	if (filter)
		write_coredump_filter(filter);
	if (!strcmp(crash, "external"))
		start_killer();
	if (rlimit_core >= 0) {
		struct rlimit rl = { rlimit_core, rlimit_core };
		if (setrlimit(RLIMIT_CORE, &rl) < 0)
			die("setrlimit");
	}
	FILE *f = fopen(report, "w");
	if (!f)
		die("fopen %s", report);

	if (nonkvm) {
		fprintf(f, "{\"pid\": %d, \"nonkvm\": true}\n", getpid());
		fclose(f);
		abort();
	}

	if (foreign)
		get_foreign_vcpu();

	int total = n * nvms;
	for (int k = 0; k < nvms; k++) {
		vm_create(&vms[k], irqchip);
		vm_setup_memory(&vms[k], mode);
		const char *why = smm ? vm_smm_unsupported(&vms[k]) : NULL;
		if (why) {
			fprintf(f, "{\"pid\": %d, \"smm_unsupported\": \"%s\"}\n", getpid(), why);
			fprintf(stderr, "vmm: --smm: %s\n", why);
			return fclose(f) ? 97 : 3;
		}
		if (smm)
			vm_setup_smram(&vms[k]);
	}
	for (int i = 0; i < total; i++) {
		int id = i % n;
		kind[i] = id < nhalt ? 0 : id < nhalt + nspin ? 1 : id < nhalt + nspin + nidle ? 2 : 3;
		vcpu_create(&vms[i / n], &vcpus[i], id);
		vcpu_setup(&vms[i / n], &vcpus[i], mode, is_spinner(i));
		if (smm && id == 0 && ioctl(vcpus[i].fd, KVM_SMI, 0) < 0)
			die("KVM_SMI vcpu 0 of VM %d", i / n);
	}
	int dups[2] = { -1, -1 };
	if (dup_fd && n > 0) {
		dups[0] = dup(vcpus[0].fd);
		dups[1] = dup(vcpus[0].fd);
		if (dups[0] < 0 || dups[1] < 0)
			die("dup");
	}

	/* Small stacks keep the core small. */
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	int want_halt = 0;
	for (int i = 0; i < total; i++) {
		pthread_t t;
		if (kind[i] == 0) {
			want_halt++;
			if (seq) {
				run_to_halt(i);
				pthread_mutex_lock(&lock);
				halted_count++;
				pthread_mutex_unlock(&lock);
			} else if (pthread_create(&t, &attr, halt_thread, (void *)(long)i))
				die("pthread_create");
		} else if (kind[i] == 1) {
			if (pthread_create(&t, &attr, spin_thread, (void *)(long)i))
				die("pthread_create");
		} else if (kind[i] == 3) {
			void *stk = mmap(NULL, 64 << 10, PROT_READ | PROT_WRITE,
					 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (stk == MAP_FAILED)
				die("mmap stack");
			int tid = clone(stuck_fn, (char *)stk + (64 << 10),
					CLONE_VM | CLONE_FILES | SIGCHLD, (void *)(long)i);
			if (tid < 0)
				die("clone");
			__atomic_store_n(&tids[i], tid, __ATOMIC_RELEASE);
		}
	}

	/* Wait for the known point: halted vCPUs got KVM_EXIT_HLT, spinners
	 * wrote their flag in guest memory (they are in `jmp .` now). */
	double t0 = now();
	int timed_out = 0;
	pthread_mutex_lock(&lock);
	for (;;) {
		int ready = halted_count == want_halt;
		for (int i = 0; i < total; i++)
			if (is_spinner(i) && !spin_flag(i, n))
				ready = 0;
		if (ready)
			break;
		if (now() - t0 > timeout) {
			timed_out = 1;
			fprintf(stderr, "vmm: timeout waiting for vCPUs\n");
			break;
		}
		pthread_mutex_unlock(&lock);
		usleep(1000);
		pthread_mutex_lock(&lock);
	}
	pthread_mutex_unlock(&lock);
	if (nspin || stuck)
		usleep(50000);	/* let the spinners spin a little */
	for (int i = 0; i < total; i++)
		if (kind[i] == 2)
			vcpu_read_state(&vcpus[i], &states[i]);

	if (!strcmp(crash, "segv")) {
		for (int i = n - 1; i >= 0; i--)
			if (kind[i] == 0) { crash_segv_idx = i; break; }
	}

	pthread_mutex_lock(&lock);	/* states[] of the halted vCPUs, published */
	fprintf(f, "{\"pid\": %d, \"mode\": \"%s\", \"crash\": \"%s\", \"timed_out\": %s, "
		"\"wait_seconds\": %.3f, \"nr_vcpus\": %d, \"nr_vms\": %d, \"dup_fds\": [%d, %d], "
		"\"foreign_fd\": %d, \"foreign_pid\": %d, \"foreign_vcpu_id\": %d, "
		"\"crash_tid\": %d, \"xsave\": %s, \"irqchip\": %s, \"closed_vcpu\": %d, "
		"\"smm\": %s, \"memslots\": ",
		getpid(), mode == MODE_REAL ? "real" : mode == MODE_PM32 ? "pm32" : "long", crash,
		timed_out ? "true" : "false", now() - t0, n, nvms, dups[0], dups[1], foreign_fd,
		foreign_pid, FOREIGN_VCPU_ID,
		crash_segv_idx >= 0 ? __atomic_load_n(&tids[crash_segv_idx], __ATOMIC_ACQUIRE) : getpid(),
		have_xsave ? "true" : "false", irqchip ? "true" : "false", close_id,
		smm ? "true" : "false");
	json_memslots(f, &vms[0]);
	fprintf(f, ", \"vms\": [");
	for (int k = 0; k < nvms; k++) {
		fprintf(f, "%s{\"memslots\": ", k ? ", " : "");
		json_memslots(f, &vms[k]);
		fprintf(f, "}");
	}
	fprintf(f, "], \"vcpus\": [");
	for (int i = 0; i < total; i++) {
		fprintf(f, "%s\n{\"vcpu_id\": %d, \"vm\": %d, \"kind\": \"%s\", \"tid\": %d, "
			"\"fd\": %d, \"exit_reason\": %d, \"flag\": %llu, \"ioctl\": ", i ? "," : "",
			vcpus[i].id, i / n, kind_name[kind[i]],
			__atomic_load_n(&tids[i], __ATOMIC_ACQUIRE), vcpus[i].fd,
			__atomic_load_n(&exit_reason[i], __ATOMIC_ACQUIRE),
			(unsigned long long)spin_flag(i, n));
		if (states[i].ok)
			json_state(f, &states[i]);
		else
			fprintf(f, "null");
		fprintf(f, "}");
	}
	pthread_mutex_unlock(&lock);
	fprintf(f, "]}\n");
	if (fclose(f))
		die("write report");

	if (close_id >= 0) {
		if (munmap(vcpus[close_id].run, vms[0].run_size) || close(vcpus[close_id].fd))
			die("closing vcpu %d", close_id);
	}
	if (killer_fd >= 0) {
		/* Another process sends the fatal signal; we wait where we are. */
		if (write(killer_fd, "k", 1) != 1)
			die("write to the killer");
		for (;;)
			pause();
	}
	if (!strcmp(crash, "none"))
		for (;;)
			pause();
	if (crash_segv_idx >= 0) {
		pthread_mutex_lock(&lock);
		go_crash = 1;
		pthread_cond_broadcast(&cond);
		pthread_mutex_unlock(&lock);
		for (;;)
			pause();
	}
	abort();
}
