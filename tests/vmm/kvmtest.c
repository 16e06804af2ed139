/* Small KVM test-VMM library: see kvmtest.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvmtest.h"

/* MSR numbers (asm/msr-index.h is not a UAPI header). */
#define MSR_EFER		0xc0000080
#define MSR_STAR		0xc0000081
#define MSR_LSTAR		0xc0000082
#define MSR_CSTAR		0xc0000083
#define MSR_SYSCALL_MASK	0xc0000084
#define MSR_FS_BASE		0xc0000100
#define MSR_GS_BASE		0xc0000101
#define MSR_KERNEL_GS_BASE	0xc0000102
#define MSR_TSC_AUX		0xc0000103
#define MSR_IA32_SYSENTER_CS	0x174
#define MSR_IA32_SYSENTER_ESP	0x175
#define MSR_IA32_SYSENTER_EIP	0x176
#define MSR_IA32_CR_PAT		0x277
#define MSR_IA32_APICBASE	0x1b
#define MSR_IA32_DEBUGCTLMSR	0x1d9
#define MSR_IA32_MISC_ENABLE	0x1a0

/* Slot 0 holds code and tables; the others carry slot_pattern(); slot 2
 * is read-only; there are holes between them. */
const struct slot_def slot_defs[NR_SLOTS] = {
	{ 0, 0,			0x0,		0x10000 },
	{ 1, 0,			0x100000,	0x4000 },
	{ 2, KVM_MEM_READONLY,	0x200000,	0x2000 },
	{ 5, 0,			0x10000000,	0x1000 },
};

void die(const char *fmt, ...)
{
	va_list ap;
	int e = errno;

	va_start(ap, fmt);
	fprintf(stderr, "vmm: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, " (errno %d: %s)\n", e, strerror(e));
	va_end(ap);
	_exit(97);
}

int have_xsave = 1;

static struct {
	struct kvm_cpuid2 h;
	struct kvm_cpuid_entry2 e[256];
} cpuid;

void vm_create(struct vm *vm, int irqchip)
{
	memset(vm, 0, sizeof(*vm));
	vm->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm < 0)
		die("open /dev/kvm");
	vm->fd = ioctl(vm->kvm, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		die("KVM_CREATE_VM");
	vm->run_size = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vm->run_size <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	vm->xsave_size = ioctl(vm->fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (vm->xsave_size < (int)sizeof(struct kvm_xsave))
		vm->xsave_size = sizeof(struct kvm_xsave);
	if (irqchip) {
		if (ioctl(vm->fd, KVM_CREATE_IRQCHIP, 0) < 0)
			die("KVM_CREATE_IRQCHIP");
		vm->irqchip = 1;
	}
	if (!cpuid.h.nent) {
		cpuid.h.nent = 256;
		if (ioctl(vm->kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0)
			die("KVM_GET_SUPPORTED_CPUID");
		/* Older CPU models (Bochs' Nehalem) have no XSAVE: then no
		 * CR4.OSXSAVE and no XCR0 (reported in the side report). */
		for (unsigned i = 0; i < cpuid.h.nent; i++)
			if (cpuid.e[i].function == 1)
				have_xsave = !!(cpuid.e[i].ecx & (1u << 26));
	}
}

static void put_desc(uint8_t *gdt, const struct kvm_segment *s)
{
	uint64_t lim = s->g ? s->limit >> 12 : s->limit;
	uint64_t d = (lim & 0xffff) | ((s->base & 0xffffff) << 16) |
		((uint64_t)s->type << 40) | ((uint64_t)s->s << 44) |
		((uint64_t)s->dpl << 45) | ((uint64_t)s->present << 47) |
		(((lim >> 16) & 0xf) << 48) | ((uint64_t)s->avl << 52) |
		((uint64_t)s->l << 53) | ((uint64_t)s->db << 54) |
		((uint64_t)s->g << 55) | (((s->base >> 24) & 0xff) << 56);

	memcpy(gdt + (s->selector & ~7), &d, 8);
	if (!s->s) {	/* system descriptor: 16 bytes in long mode */
		uint64_t hi = s->base >> 32;
		memcpy(gdt + (s->selector & ~7) + 8, &hi, 8);
	}
}

void vm_setup_memory(struct vm *vm, enum mode mode)
{
	for (int i = 0; i < NR_SLOTS; i++) {
		const struct slot_def *d = &slot_defs[i];
		uint8_t *m = mmap(NULL, d->size, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (m == MAP_FAILED)
			die("mmap slot %u", d->slot);
		vm->mem[i] = m;
		if (i > 0)
			for (uint64_t o = 0; o < d->size; o += 8)
				*(uint64_t *)(m + o) = slot_pattern(d->slot, o);
		struct kvm_userspace_memory_region r = {
			.slot = d->slot, .flags = d->flags,
			.guest_phys_addr = d->gpa, .memory_size = d->size,
			.userspace_addr = (uint64_t)(uintptr_t)m,
		};
		if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
			die("KVM_SET_USER_MEMORY_REGION slot %u", d->slot);
	}

	uint8_t *m = vm->mem[0];
	static const uint8_t spin[] = { 0xc6, 0x03, 0x01, 0xeb, 0xfe };
	static const uint8_t handler[] = { 0xf4, 0xeb, 0xfd };
	m[GPA_HLT] = 0xf4;
	m[GPA_HLT + 1] = 0xeb;	/* jmp back to the hlt, if ever resumed */
	m[GPA_HLT + 2] = 0xfd;
	memcpy(m + GPA_SPIN, spin, sizeof(spin));
	memcpy(m + GPA_HANDLER, handler, sizeof(handler));

	/* GDT with the descriptors the segment registers hold. */
	struct kvm_sregs2 s;
	intended_sregs(mode, &s);
	if (mode != MODE_REAL) {
		struct kvm_segment *segs[] = { &s.cs, &s.ds, &s.es, &s.fs, &s.gs,
					       &s.ss, &s.tr, &s.ldt };
		for (unsigned i = 0; i < sizeof(segs) / sizeof(segs[0]); i++)
			put_desc(m + GPA_GDT, segs[i]);
	}
	/* IDT: every vector goes to the hlt handler. */
	for (int v = 0; v < 32; v++) {
		uint64_t lo = (GPA_HANDLER & 0xffff) | (0x08ULL << 16) |
			(0x8eULL << 40) | ((uint64_t)(GPA_HANDLER >> 16) << 48);
		if (mode == MODE_LONG) {
			uint64_t hi = 0;
			memcpy(m + GPA_IDT + 16 * v, &lo, 8);
			memcpy(m + GPA_IDT + 16 * v + 8, &hi, 8);
		} else if (mode == MODE_PM32) {
			memcpy(m + GPA_IDT + 8 * v, &lo, 8);
		}
	}
	/* Identity map of the first 8 MiB with 2 MiB pages. */
	uint64_t *pml4 = (uint64_t *)(m + GPA_PML4);
	uint64_t *pdpt = (uint64_t *)(m + GPA_PML4 + 0x1000);
	uint64_t *pd = (uint64_t *)(m + GPA_PML4 + 0x2000);
	pml4[0] = (GPA_PML4 + 0x1000) | 3;
	pdpt[0] = (GPA_PML4 + 0x2000) | 3;
	for (int i = 0; i < 4; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83;
}

/* NULL when KVM can put this VM's vCPUs into SMM, else why not. */
const char *vm_smm_unsupported(struct vm *vm)
{
	if (ioctl(vm->fd, KVM_CHECK_EXTENSION, KVM_CAP_MULTI_ADDRESS_SPACE) < 2)
		return "KVM_CAP_MULTI_ADDRESS_SPACE < 2: no SMM address space (CONFIG_KVM_SMM=n?)";
	if (ioctl(vm->fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM) < 1)
		return "KVM_CAP_X86_SMM = 0: this vendor module cannot run SMM "
		       "(VMX without unrestricted guest nor emulate_invalid_guest_state)";
	return NULL;
}

/* SMRAM in address space 1: its handler, which marks that it ran. */
void vm_setup_smram(struct vm *vm)
{
	static const uint8_t handler[] = {
		0x2e, 0xc6, 0x06, SMM_FLAG & 0xff, SMM_FLAG >> 8, 0x01,	/* mov byte [cs:FLAG],1 */
		0xf4, 0xeb, 0xfd,					/* hlt ; jmp back */
	};
	uint8_t *m = mmap(NULL, SMRAM_SIZE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		die("mmap SMRAM");
	memcpy(m + SMM_HANDLER, handler, sizeof(handler));
	struct kvm_userspace_memory_region r = {
		.slot = SMRAM_SLOT, .guest_phys_addr = SMRAM_GPA, .memory_size = SMRAM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)m,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION SMRAM (as_id 1)");
	vm->smram = m;
}

void vcpu_create(struct vm *vm, struct vcpu *v, int id)
{
	v->id = id;
	v->vm = vm;
	v->fd = ioctl(vm->fd, KVM_CREATE_VCPU, id);
	if (v->fd < 0)
		die("KVM_CREATE_VCPU %d", id);
	v->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run %d", id);
}

uint64_t intended_gpr(enum mode mode, int id, int k)
{
	if (mode == MODE_LONG)
		return ((uint64_t)(k + 1) << 40) | ((uint64_t)id << 20) | (0xC0DE + k);
	return ((uint64_t)(k + 1) << 24) | ((uint64_t)id << 12) | (0x5A + k);
}

uint64_t intended_rflags(enum mode mode)
{
	/* IF stays set everywhere: Bochs hangs nested guests with IF=0. */
	return mode == MODE_REAL ? 0x202 : 0x246;
}

static struct kvm_segment seg(uint16_t sel, uint64_t base, uint32_t limit, uint8_t type,
			      uint8_t s, uint8_t db, uint8_t l, uint8_t g)
{
	struct kvm_segment r = {
		.base = base, .limit = limit, .selector = sel, .type = type,
		.present = 1, .dpl = 0, .db = db, .s = s, .l = l, .g = g,
	};
	return r;
}

void intended_sregs(enum mode mode, struct kvm_sregs2 *s)
{
	memset(s, 0, sizeof(*s));
	switch (mode) {
	case MODE_REAL:
		s->cs = seg(0x0100, 0x1000, 0xffff, 0xb, 1, 0, 0, 0);
		s->ds = seg(0x0200, 0x2000, 0xffff, 0x3, 1, 0, 0, 0);
		s->es = seg(0x0300, 0x3000, 0xffff, 0x3, 1, 0, 0, 0);
		s->fs = seg(0x0400, 0x4000, 0xffff, 0x3, 1, 0, 0, 0);
		s->gs = seg(0x0500, 0x5000, 0xffff, 0x3, 1, 0, 0, 0);
		s->ss = seg(0x0600, 0x6000, 0xffff, 0x3, 1, 0, 0, 0);
		s->tr = seg(0, 0, 0xffff, 0xb, 0, 0, 0, 0);
		s->ldt = seg(0, 0, 0xffff, 0x2, 0, 0, 0, 0);
		s->gdt.base = GPA_GDT; s->gdt.limit = 0x4f;
		s->idt.base = 0; s->idt.limit = 0x3ff;
		s->cr0 = 0x10;
		s->cr2 = 0x1234;
		break;
	case MODE_PM32:
		s->cs = seg(0x08, 0, 0xffffffff, 0xb, 1, 1, 0, 1);
		s->ds = seg(0x10, 0x1000, 0xfffff, 0x3, 1, 1, 0, 0);
		s->es = seg(0x18, 0x2000, 0xffff, 0x3, 1, 0, 0, 0);
		s->fs = seg(0x20, 0x12345000, 0xfff, 0x3, 1, 1, 0, 0);
		s->gs = seg(0x28, 0xabc000, 0xffffffff, 0x3, 1, 1, 0, 1);
		s->ss = seg(0x30, 0x3000, 0xfffff, 0x3, 1, 1, 0, 0);
		s->tr = seg(0x38, 0x5000, 0x67, 0xb, 0, 0, 0, 0);
		s->ldt = seg(0x40, 0x5100, 0xff, 0x2, 0, 0, 0, 0);
		s->gdt.base = GPA_GDT; s->gdt.limit = 0x47;
		s->idt.base = GPA_IDT; s->idt.limit = 8 * 32 - 1;
		s->cr0 = 0x31;			/* PE ET NE */
		s->cr2 = 0xc0ffe000;
		s->cr3 = GPA_PML4;
		s->cr4 = 0x210;			/* PSE OSFXSR */
		break;
	case MODE_LONG:
		s->cs = seg(0x08, 0, 0xffffffff, 0xb, 1, 0, 1, 1);
		s->ds = seg(0x10, 0x1000, 0xfffff, 0x3, 1, 1, 0, 0);
		s->es = seg(0x18, 0x2000, 0xffff, 0x3, 1, 0, 0, 0);
		s->fs = seg(0x20, 0x7f0012345000ULL, 0xffffffff, 0x3, 1, 1, 0, 1);
		s->gs = seg(0x28, 0xffff888000001000ULL, 0xffffffff, 0x3, 1, 1, 0, 1);
		s->ss = seg(0x30, 0x3000, 0xfffff, 0x3, 1, 1, 0, 0);
		s->tr = seg(0x38, 0x5000, 0x67, 0xb, 0, 0, 0, 0);
		s->ldt = seg(0x48, 0x5100, 0xff, 0x2, 0, 0, 0, 0);
		s->gdt.base = GPA_GDT; s->gdt.limit = 0x57;
		s->idt.base = GPA_IDT; s->idt.limit = 16 * 32 - 1;
		s->cr0 = 0x80050033;		/* PG AM WP NE ET MP PE */
		s->cr2 = 0xffffffffdeadb000ULL;
		s->cr3 = GPA_PML4;
		s->cr4 = 0x406a0;		/* OSXSAVE OSXMMEXCPT OSFXSR PGE PAE */
		if (!have_xsave)
			s->cr4 &= ~0x40000ULL;
		s->efer = 0xd01;		/* NXE LMA LME SCE */
		break;
	}
}

void intended_debugregs(int id, struct kvm_debugregs *d)
{
	memset(d, 0, sizeof(*d));
	for (int i = 0; i < 4; i++)	/* data-write watchpoints nothing touches */
		d->db[i] = 0x7f0008000000ULL | ((uint64_t)id << 16) | ((uint64_t)i << 8);
	d->dr6 = 0xffff0ff0;
	d->dr7 = 0xdddd0455;
}

const uint32_t test_msr_index[NR_TEST_MSRS] = {
	MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE,
	MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
	MSR_TSC_AUX, MSR_IA32_CR_PAT,
};

uint64_t intended_msr(int id, uint32_t index)
{
	switch (index) {
	case MSR_STAR:			return 0x0023001000000000ULL;
	case MSR_LSTAR:			return 0xffffffff81000000ULL + ((uint64_t)id << 4);
	case MSR_CSTAR:			return 0xffffffff81001000ULL;
	case MSR_SYSCALL_MASK:		return 0x47700;
	case MSR_KERNEL_GS_BASE:	return 0xffff888000de0000ULL + ((uint64_t)id << 12);
	case MSR_IA32_SYSENTER_CS:	return 0x10;
	/* 32-bit: SVM keeps only the low half for a non-Intel guest CPUID. */
	case MSR_IA32_SYSENTER_ESP:	return 0x81008000;
	case MSR_IA32_SYSENTER_EIP:	return 0x81002000;
	case MSR_TSC_AUX:		return 0x100 + id;
	case MSR_IA32_CR_PAT:		return 0x0007010600070106ULL;
	}
	return 0;
}

void vcpu_setup(struct vm *vm, struct vcpu *v, enum mode mode, int spin)
{
	int id = v->id;

	/* The APIC ID in CPUID leaf 1/0xb does not matter without an irqchip. */
	if (ioctl(v->fd, KVM_SET_CPUID2, &cpuid) < 0)
		die("KVM_SET_CPUID2");

	struct kvm_sregs2 cur, s;
	if (ioctl(v->fd, KVM_GET_SREGS2, &cur) < 0)
		die("KVM_GET_SREGS2");
	intended_sregs(mode, &s);
	s.apic_base = cur.apic_base;
	s.flags = 0;
	if (ioctl(v->fd, KVM_SET_SREGS2, &s) < 0)
		die("KVM_SET_SREGS2 vcpu %d", id);

	struct kvm_regs r;
	__u64 *g = &r.rax;	/* rax rbx rcx rdx rsi rdi rsp rbp r8..r15 */
	memset(&r, 0, sizeof(r));
	for (int k = 0; k < 16; k++)
		g[k] = intended_gpr(mode, id, k);
	if (spin) {
		r.rbx = GPA_FLAGS + 8 * id;
		r.rip = GPA_SPIN;
	} else {
		r.rip = mode == MODE_REAL ? GPA_HLT - 0x1000 : GPA_HLT;
	}
	r.rflags = intended_rflags(mode);
	if (ioctl(v->fd, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS");

	struct {
		struct kvm_msrs h;
		struct kvm_msr_entry e[NR_TEST_MSRS];
	} msrs;
	memset(&msrs, 0, sizeof(msrs));
	msrs.h.nmsrs = NR_TEST_MSRS;
	for (int i = 0; i < NR_TEST_MSRS; i++) {
		msrs.e[i].index = test_msr_index[i];
		msrs.e[i].data = intended_msr(id, test_msr_index[i]);
	}
	int n = ioctl(v->fd, KVM_SET_MSRS, &msrs);
	if (n != NR_TEST_MSRS)
		die("KVM_SET_MSRS set %d of %d (first failing 0x%x)", n, NR_TEST_MSRS,
		    n >= 0 && n < NR_TEST_MSRS ? test_msr_index[n] : 0);

	struct kvm_debugregs d;
	intended_debugregs(id, &d);
	if (ioctl(v->fd, KVM_SET_DEBUGREGS, &d) < 0)
		die("KVM_SET_DEBUGREGS");

	if (!have_xsave)
		return;
	struct kvm_xcrs x;
	memset(&x, 0, sizeof(x));
	x.nr_xcrs = 1;
	x.xcrs[0].xcr = 0;
	x.xcrs[0].value = TEST_XCR0;
	if (ioctl(v->fd, KVM_SET_XCRS, &x) < 0)
		die("KVM_SET_XCRS");
}

/* MSRs read back into the side report: the test ones and a few more. */
static const uint32_t read_msr_index[] = {
	MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE,
	MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
	MSR_TSC_AUX, MSR_IA32_CR_PAT, MSR_EFER, MSR_FS_BASE, MSR_GS_BASE,
	MSR_IA32_APICBASE, MSR_IA32_DEBUGCTLMSR, MSR_IA32_MISC_ENABLE,
};

void vcpu_read_state(struct vcpu *v, struct vcpu_state *st)
{
	memset(st, 0, sizeof(*st));
	if (ioctl(v->fd, KVM_GET_REGS, &st->regs) < 0)
		die("KVM_GET_REGS");
	if (ioctl(v->fd, KVM_GET_SREGS2, &st->sregs) < 0)
		die("KVM_GET_SREGS2");
	if (ioctl(v->fd, KVM_GET_DEBUGREGS, &st->dregs) < 0)
		die("KVM_GET_DEBUGREGS");
	if (have_xsave && ioctl(v->fd, KVM_GET_XCRS, &st->xcrs) < 0)
		die("KVM_GET_XCRS");
	if (ioctl(v->fd, KVM_GET_MP_STATE, &st->mp) < 0)
		die("KVM_GET_MP_STATE");
	/* One MSR at a time: an unsupported one must not hide the rest. */
	int n = 0;
	for (unsigned i = 0; i < sizeof(read_msr_index) / sizeof(read_msr_index[0]); i++) {
		struct {
			struct kvm_msrs h;
			struct kvm_msr_entry e;
		} one = { .h.nmsrs = 1, .e.index = read_msr_index[i] };
		if (ioctl(v->fd, KVM_GET_MSRS, &one) == 1)
			st->msrs.e[n++] = one.e;
	}
	st->msrs.hdr.nmsrs = n;
	if (ioctl(v->fd, KVM_GET_VCPU_EVENTS, &st->events) < 0)
		die("KVM_GET_VCPU_EVENTS");
	if (v->vm->irqchip) {
		if (ioctl(v->fd, KVM_GET_LAPIC, &st->lapic) < 0)
			die("KVM_GET_LAPIC");
		st->has_lapic = 1;
	}
	st->xsave_size = v->vm->xsave_size;
	st->xsave = calloc(1, st->xsave_size);
	st->cpuid = calloc(1, sizeof(*st->cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	if (!st->xsave || !st->cpuid)
		die("calloc");
	if (ioctl(v->fd, st->xsave_size > (int)sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 :
		  KVM_GET_XSAVE, st->xsave) < 0)
		die("KVM_GET_XSAVE2");
	st->cpuid->nent = 256;
	if (ioctl(v->fd, KVM_GET_CPUID2, st->cpuid) < 0)
		die("KVM_GET_CPUID2");
	st->ok = 1;
}

static void json_hex(FILE *f, const char *name, const void *p, size_t n)
{
	fprintf(f, ", \"%s\": \"", name);
	for (size_t i = 0; i < n; i++)
		fprintf(f, "%02x", ((const uint8_t *)p)[i]);
	fprintf(f, "\"");
}

static void json_seg(FILE *f, const char *name, const struct kvm_segment *s)
{
	fprintf(f, "\"%s\": {\"base\": %llu, \"limit\": %u, \"selector\": %u, \"type\": %u, "
		"\"present\": %u, \"dpl\": %u, \"db\": %u, \"s\": %u, \"l\": %u, \"g\": %u, "
		"\"avl\": %u, \"unusable\": %u}, ", name, (unsigned long long)s->base, s->limit,
		s->selector, s->type, s->present, s->dpl, s->db, s->s, s->l, s->g, s->avl,
		s->unusable);
}

void json_state(FILE *f, const struct vcpu_state *st)
{
	const struct kvm_regs *r = &st->regs;
	const struct kvm_sregs2 *s = &st->sregs;
	static const char *gpr[] = { "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
		"r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags" };
	const __u64 *g = &r->rax;

	fprintf(f, "{\"regs\": {");
	for (int k = 0; k < 18; k++)
		fprintf(f, "%s\"%s\": %llu", k ? ", " : "", gpr[k], (unsigned long long)g[k]);
	fprintf(f, "}, \"sregs\": {");
	json_seg(f, "cs", &s->cs); json_seg(f, "ds", &s->ds); json_seg(f, "es", &s->es);
	json_seg(f, "fs", &s->fs); json_seg(f, "gs", &s->gs); json_seg(f, "ss", &s->ss);
	json_seg(f, "tr", &s->tr); json_seg(f, "ldt", &s->ldt);
	fprintf(f, "\"gdt\": {\"base\": %llu, \"limit\": %u}, \"idt\": {\"base\": %llu, \"limit\": %u}, ",
		(unsigned long long)s->gdt.base, s->gdt.limit,
		(unsigned long long)s->idt.base, s->idt.limit);
	fprintf(f, "\"cr0\": %llu, \"cr2\": %llu, \"cr3\": %llu, \"cr4\": %llu, \"cr8\": %llu, "
		"\"efer\": %llu, \"apic_base\": %llu, \"flags\": %llu, \"pdptrs\": [%llu, %llu, %llu, %llu]}",
		(unsigned long long)s->cr0, (unsigned long long)s->cr2, (unsigned long long)s->cr3,
		(unsigned long long)s->cr4, (unsigned long long)s->cr8, (unsigned long long)s->efer,
		(unsigned long long)s->apic_base, (unsigned long long)s->flags,
		(unsigned long long)s->pdptrs[0], (unsigned long long)s->pdptrs[1],
		(unsigned long long)s->pdptrs[2], (unsigned long long)s->pdptrs[3]);
	fprintf(f, ", \"debugregs\": {\"db\": [%llu, %llu, %llu, %llu], \"dr6\": %llu, \"dr7\": %llu, \"flags\": %llu}",
		(unsigned long long)st->dregs.db[0], (unsigned long long)st->dregs.db[1],
		(unsigned long long)st->dregs.db[2], (unsigned long long)st->dregs.db[3],
		(unsigned long long)st->dregs.dr6, (unsigned long long)st->dregs.dr7, (unsigned long long)st->dregs.flags);
	fprintf(f, ", \"xcrs\": [");
	for (unsigned i = 0; i < st->xcrs.nr_xcrs && i < KVM_MAX_XCRS; i++)
		fprintf(f, "%s{\"xcr\": %u, \"value\": %llu}", i ? ", " : "", st->xcrs.xcrs[i].xcr,
			(unsigned long long)st->xcrs.xcrs[i].value);
	fprintf(f, "], \"mp_state\": %u, \"msrs\": [", st->mp.mp_state);
	for (unsigned i = 0; i < st->msrs.hdr.nmsrs; i++)
		fprintf(f, "%s{\"index\": %u, \"value\": %llu}", i ? ", " : "", st->msrs.e[i].index,
			(unsigned long long)st->msrs.e[i].data);
	fprintf(f, "]");
	/* Raw structs, decoded by the tests with kvmnote.schema (the layout's one home). */
	json_hex(f, "events_hex", &st->events, sizeof(st->events));
	json_hex(f, "xsave_hex", st->xsave, st->xsave_size);
	if (st->has_lapic)
		json_hex(f, "lapic_hex", st->lapic.regs, sizeof(st->lapic.regs));
	else
		fprintf(f, ", \"lapic_hex\": null");
	fprintf(f, ", \"cpuid\": [");
	for (unsigned i = 0; i < st->cpuid->nent; i++) {
		const struct kvm_cpuid_entry2 *e = &st->cpuid->entries[i];
		fprintf(f, "%s{\"function\": %u, \"index\": %u, \"flags\": %u, \"eax\": %u, "
			"\"ebx\": %u, \"ecx\": %u, \"edx\": %u}", i ? ", " : "", e->function,
			e->index, e->flags, e->eax, e->ebx, e->ecx, e->edx);
	}
	fprintf(f, "]}");
}

void json_memslots(FILE *f, struct vm *vm)
{
	fprintf(f, "[");
	for (int i = 0; i < NR_SLOTS; i++)
		fprintf(f, "%s{\"as_id\": 0, \"slot\": %u, \"flags\": %u, \"guest_phys_addr\": %llu, "
			"\"memory_size\": %llu, \"userspace_addr\": %llu}", i ? ", " : "",
			slot_defs[i].slot, slot_defs[i].flags, (unsigned long long)slot_defs[i].gpa,
			(unsigned long long)slot_defs[i].size,
			(unsigned long long)(uintptr_t)vm->mem[i]);
	if (vm->smram)
		fprintf(f, ", {\"as_id\": %u, \"slot\": %u, \"flags\": 0, \"guest_phys_addr\": %u, "
			"\"memory_size\": %u, \"userspace_addr\": %llu}", SMRAM_SLOT >> 16,
			SMRAM_SLOT & 0xffff, SMRAM_GPA, SMRAM_SIZE,
			(unsigned long long)(uintptr_t)vm->smram);
	fprintf(f, "]");
}
