/* Small KVM test-VMM library for kvmnote's end-to-end tests.
 *
 * Everything a scenario sets in a vCPU is a pure function of (mode, vcpu_id)
 * implemented here AND independently in tests/e2e/expected.py, so a test
 * compares three sources: the values intended here, what KVM's ioctls
 * returned (written by the VMM to a side JSON report), and what the kernel
 * wrote into the core file's KVM notes. */
#ifndef KVMTEST_H
#define KVMTEST_H

#include <stdint.h>
#include <stdio.h>
#include <linux/kvm.h>

enum mode { MODE_REAL, MODE_PM32, MODE_LONG };

/* Guest-physical layout of slot 0 (see expected.py). */
#define GPA_GDT		0x800
#define GPA_IDT		0x900
#define GPA_HLT		0x1000	/* hlt */
#define GPA_SPIN	0x1100	/* mov byte [rbx],1 ; jmp . */
#define GPA_SPIN_JMP	0x1103
#define GPA_HANDLER	0x1200	/* hlt ; jmp back: target of every IDT gate */
#define GPA_PML4	0x2000
#define GPA_FLAGS	0x6000	/* one u64 per vCPU, set to 1 by spinners */

/* --smm: SMRAM, a memslot of address space 1 (KVM_CAP_MULTI_ADDRESS_SPACE),
 * at the SMBASE a vCPU has after RESET; an SMI enters its handler at SMBASE +
 * 0x8000 and KVM saves the interrupted state at SMBASE + 0xfe00 (see expected.py). */
#define SMRAM_GPA	0x30000
#define SMRAM_SIZE	0x10000
#define SMRAM_SLOT	((1u << 16) | 0)	/* as_id 1, slot 0 */
#define SMM_HANDLER	0x8000	/* mov byte [cs:0x8100],1 ; hlt ; jmp back */
#define SMM_FLAG	0x8100

struct slot_def {
	uint32_t slot, flags;
	uint64_t gpa, size;
};
#define NR_SLOTS 4
extern const struct slot_def slot_defs[NR_SLOTS];

/* Pattern of the u64 at byte offset @off of pattern slot @slot. */
static inline uint64_t slot_pattern(uint32_t slot, uint64_t off)
{
	return (0x51ULL << 56) | ((uint64_t)slot << 48) | off;
}

struct vm {
	int kvm, fd;
	int run_size;
	int xsave_size;		/* KVM_CAP_XSAVE2, else sizeof(struct kvm_xsave) */
	int irqchip;		/* KVM_CREATE_IRQCHIP done: LAPIC in the kernel */
	void *mem[NR_SLOTS];
	void *smram;		/* --smm: the as_id 1 slot, else NULL */
};

struct vcpu {
	int fd, id;
	struct vm *vm;
	struct kvm_run *run;
};

void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void vm_create(struct vm *vm, int irqchip);
void vm_setup_memory(struct vm *vm, enum mode mode);
const char *vm_smm_unsupported(struct vm *vm);
void vm_setup_smram(struct vm *vm);
void vcpu_create(struct vm *vm, struct vcpu *v, int id);
void vcpu_setup(struct vm *vm, struct vcpu *v, enum mode mode, int spin);

/* Intended values. */
uint64_t intended_gpr(enum mode mode, int id, int k);
uint64_t intended_rflags(enum mode mode);
void intended_sregs(enum mode mode, struct kvm_sregs2 *s);
void intended_debugregs(int id, struct kvm_debugregs *d);
#define NR_TEST_MSRS 10
extern const uint32_t test_msr_index[NR_TEST_MSRS];
uint64_t intended_msr(int id, uint32_t index);
#define TEST_XCR0 0x3ULL
extern int have_xsave;	/* host CPU (and so KVM) supports XSAVE */

/* State read back with ioctls, and its JSON form. */
#define NR_READ_MSRS 20
struct vcpu_state {
	int ok;
	struct kvm_regs regs;
	struct kvm_sregs2 sregs;
	struct kvm_debugregs dregs;
	struct kvm_xcrs xcrs;
	struct kvm_mp_state mp;
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry e[NR_READ_MSRS];
	} msrs;
	struct kvm_vcpu_events events;
	struct kvm_lapic_state lapic;	/* read when the VM has an irqchip */
	int has_lapic;
	int xsave_size;
	uint8_t *xsave;			/* KVM_GET_XSAVE2 (or KVM_GET_XSAVE) */
	struct kvm_cpuid2 *cpuid;	/* KVM_GET_CPUID2 */
};
void vcpu_read_state(struct vcpu *v, struct vcpu_state *st);
void json_state(FILE *f, const struct vcpu_state *st);
void json_memslots(FILE *f, struct vm *vm);

#endif
