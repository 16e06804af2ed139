/* kvmnote end-to-end test VMM: sets up a VM in a known state, stops it at a
 * known point, writes what KVM's ioctls report to a side JSON file, then
 * crashes so that the kernel writes a core file.
 *
 *   vmm --report FILE [--mode real|pm32|long] [--halt N] [--spin N] [--idle N]
 *       [--seq] [--crash abort|segv] [--dup] [--foreign] [--stuck]
 *       [--rlimit-core BYTES] [--nonkvm] [--timeout SEC]
 *
 * vCPU ids are 0..halt-1 (run to `hlt`), then spinners (`jmp .`, IF=1), then
 * idle ones (created and set up, never run).  --stuck adds one more spinning
 * vCPU run by a clone(CLONE_VM|CLONE_FILES) child that is not in the thread
 * group, so it keeps vcpu->mutex while the process dumps core.  --foreign
 * receives a vCPU fd (id 77) of a VM made by a forked child over SCM_RIGHTS.
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

static enum mode mode = MODE_LONG;
static struct vm vm;
static struct vcpu vcpus[MAX_VCPUS];
static struct vcpu_state states[MAX_VCPUS];
static int kind[MAX_VCPUS];	/* 0 halt, 1 spin, 2 idle, 3 stuck */
static const char *kind_name[] = { "halted", "spinning", "never_ran", "stuck" };
static int tids[MAX_VCPUS];
static int exit_reason[MAX_VCPUS];
static volatile int halted_count;
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

static int run_to_halt(int i)
{
	struct vcpu *v = &vcpus[i];
	tids[i] = syscall(SYS_gettid);
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN vcpu %d", v->id);
		}
		exit_reason[i] = v->run->exit_reason;
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
	tids[i] = syscall(SYS_gettid);
	for (;;) {
		if (ioctl(vcpus[i].fd, KVM_RUN, 0) < 0 && errno != EINTR)
			die("KVM_RUN spin vcpu %d", vcpus[i].id);
		exit_reason[i] = vcpus[i].run->exit_reason;
		if (exit_reason[i] != KVM_EXIT_INTR) {
			fprintf(stderr, "vmm: spinning vcpu %d exit %d\n", vcpus[i].id, exit_reason[i]);
			return NULL;
		}
	}
}

/* clone() child sharing mm and fds, not in our thread group. */
static int __attribute__((noreturn)) stuck_fn(void *arg)
{
	int i = (int)(long)arg;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
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
		vm_create(&fvm);
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
		read(sv[1], &c, 1);	/* until the parent is gone */
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

int main(int argc, char **argv)
{
	const char *report = NULL, *crash = "abort";
	int nhalt = 1, nspin = 0, nidle = 0, seq = 0, dup_fd = 0, foreign = 0, stuck = 0;
	int nonkvm = 0;
	double timeout = 60;
	long rlimit_core = -1;

	for (int a = 1; a < argc; a++) {
		const char *o = argv[a], *val = a + 1 < argc ? argv[a + 1] : NULL;
#define ARG(name) (!strcmp(o, name) && val && ++a)
		if (ARG("--report")) report = val;
		else if (ARG("--mode")) mode = !strcmp(val, "real") ? MODE_REAL :
					       !strcmp(val, "pm32") ? MODE_PM32 : MODE_LONG;
		else if (ARG("--halt")) nhalt = atoi(val);
		else if (ARG("--spin")) nspin = atoi(val);
		else if (ARG("--idle")) nidle = atoi(val);
		else if (ARG("--crash")) crash = val;
		else if (ARG("--rlimit-core")) rlimit_core = atol(val);
		else if (ARG("--timeout")) timeout = atof(val);
		else if (!strcmp(o, "--seq")) seq = 1;
		else if (!strcmp(o, "--dup")) dup_fd = 1;
		else if (!strcmp(o, "--foreign")) foreign = 1;
		else if (!strcmp(o, "--stuck")) stuck = 1;
		else if (!strcmp(o, "--nonkvm")) nonkvm = 1;
		else { fprintf(stderr, "vmm: bad argument %s\n", o); return 2; }
	}
	if (!report) { fprintf(stderr, "vmm: --report FILE needed\n"); return 2; }
	int n = nhalt + nspin + nidle + stuck;
	if (n > MAX_VCPUS) { fprintf(stderr, "vmm: too many vCPUs\n"); return 2; }
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

	vm_create(&vm);
	vm_setup_memory(&vm, mode);
	for (int i = 0; i < n; i++) {
		kind[i] = i < nhalt ? 0 : i < nhalt + nspin ? 1 : i < nhalt + nspin + nidle ? 2 : 3;
		vcpu_create(&vm, &vcpus[i], i);
		vcpu_setup(&vm, &vcpus[i], mode, kind[i] == 1 || kind[i] == 3);
	}
	int dups[2] = { -1, -1 };
	if (dup_fd && n > 0) {
		dups[0] = dup(vcpus[0].fd);
		dups[1] = dup(vcpus[0].fd);
	}

	/* Small stacks keep the core small. */
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	int want_halt = 0;
	for (int i = 0; i < n; i++) {
		pthread_t t;
		if (kind[i] == 0) {
			want_halt++;
			if (seq) {
				run_to_halt(i);
				halted_count++;
			} else if (pthread_create(&t, &attr, halt_thread, (void *)(long)i))
				die("pthread_create");
		} else if (kind[i] == 1) {
			if (pthread_create(&t, &attr, spin_thread, (void *)(long)i))
				die("pthread_create");
		} else if (kind[i] == 3) {
			void *stk = mmap(NULL, 64 << 10, PROT_READ | PROT_WRITE,
					 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			tids[i] = clone(stuck_fn, (char *)stk + (64 << 10),
					CLONE_VM | CLONE_FILES | SIGCHLD, (void *)(long)i);
			if (tids[i] < 0)
				die("clone");
		}
	}

	/* Wait for the known point: halted vCPUs got KVM_EXIT_HLT, spinners
	 * wrote their flag in guest memory (they are in `jmp .` now). */
	double t0 = now();
	int timed_out = 0;
	for (;;) {
		int ready = halted_count == want_halt;
		for (int i = 0; i < n; i++)
			if ((kind[i] == 1 || kind[i] == 3) &&
			    !*(volatile uint64_t *)((char *)vm.mem[0] + GPA_FLAGS + 8 * i))
				ready = 0;
		if (ready)
			break;
		if (now() - t0 > timeout) {
			timed_out = 1;
			fprintf(stderr, "vmm: timeout waiting for vCPUs\n");
			break;
		}
		usleep(1000);
	}
	if (nspin || stuck)
		usleep(50000);	/* let the spinners spin a little */
	for (int i = 0; i < n; i++)
		if (kind[i] == 2)
			vcpu_read_state(&vcpus[i], &states[i]);

	if (!strcmp(crash, "segv")) {
		for (int i = n - 1; i >= 0; i--)
			if (kind[i] == 0 && !seq) { crash_segv_idx = i; break; }
		if (crash_segv_idx < 0)
			die("--crash segv needs a halted vCPU thread");
	}

	fprintf(f, "{\"pid\": %d, \"mode\": \"%s\", \"crash\": \"%s\", \"timed_out\": %s, "
		"\"wait_seconds\": %.3f, \"nr_vcpus\": %d, \"dup_fds\": [%d, %d], "
		"\"foreign_fd\": %d, \"foreign_pid\": %d, \"foreign_vcpu_id\": %d, "
		"\"crash_tid\": %d, \"xsave\": %s, \"memslots\": ",
		getpid(), mode == MODE_REAL ? "real" : mode == MODE_PM32 ? "pm32" : "long", crash,
		timed_out ? "true" : "false", now() - t0, n, dups[0], dups[1], foreign_fd,
		foreign_pid, FOREIGN_VCPU_ID, crash_segv_idx >= 0 ? tids[crash_segv_idx] : getpid(),
		have_xsave ? "true" : "false");
	json_memslots(f, &vm);
	fprintf(f, ", \"vcpus\": [");
	for (int i = 0; i < n; i++) {
		uint64_t flag = *(volatile uint64_t *)((char *)vm.mem[0] + GPA_FLAGS + 8 * i);
		fprintf(f, "%s\n{\"vcpu_id\": %d, \"kind\": \"%s\", \"tid\": %d, \"fd\": %d, "
			"\"exit_reason\": %d, \"flag\": %llu, \"ioctl\": ", i ? "," : "", vcpus[i].id,
			kind_name[kind[i]], tids[i], vcpus[i].fd, exit_reason[i],
			(unsigned long long)flag);
		if (states[i].ok)
			json_state(f, &states[i]);
		else
			fprintf(f, "null");
		fprintf(f, "}");
	}
	fprintf(f, "]}\n");
	if (fclose(f))
		die("write report");

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
