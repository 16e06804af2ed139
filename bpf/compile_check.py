#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-only
"""Compile bpf/kvmcoredump.py's BPF C with bcc on a host without kvm tracepoints.

TRACEPOINT_PROBE(kvm, X) needs X's format file at compile time; the host has no
tracefs, so each probe is turned into a plain function taking the tracepoint's struct,
spelled from Linux 6.12's TP_STRUCT__entry (arch/x86/kvm/trace.h; kvm_coredump_vcpu from
kpatch/0007), and loaded as a tracepoint program so the running kernel's verifier checks
it. Needs root, Debian's python3-bpfcc and Linux 6.12 headers (bpf/README.md says how to
merge Debian's):

    BCC_KERNEL_SOURCE=/path/to/headers /usr/bin/python3 bpf/compile_check.py
"""
import importlib.util
import sys

from bcc import BPF

spec = importlib.util.spec_from_file_location(
    "kd", sys.argv[1] if len(sys.argv) > 1 else __file__.replace("compile_check", "kvmcoredump"))
kd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kd)
structs = """
struct tracepoint__kvm__kvm_exit {
    u64 __do_not_use__;
    unsigned int exit_reason; unsigned long guest_rip; u32 isa; u64 info1; u64 info2;
    u32 intr_info; u32 error_code; unsigned int vcpu_id;
};
struct tracepoint__kvm__kvm_nested_vmexit {     /* TRACE_EVENT_KVM_EXIT, as kvm_exit */
    u64 __do_not_use__;
    unsigned int exit_reason; unsigned long guest_rip; u32 isa; u64 info1; u64 info2;
    u32 intr_info; u32 error_code; unsigned int vcpu_id;
};
struct tracepoint__kvm__kvm_coredump_vcpu {
    u64 __do_not_use__;
    unsigned int vcpu_id; u64 rip; u32 status; u32 error;
};
"""
failed = False
for argv in ([], ["-p", "181", "-v", "2"], ["-t", "3"], ["-T", "3,4"]):
    text = kd.bpf_text(kd.parse_args(argv))
    for tp in ("kvm_exit", "kvm_nested_vmexit", "kvm_coredump_vcpu"):
        text = text.replace("TRACEPOINT_PROBE(kvm, %s)" % tp,
                            "int probe_%s(struct tracepoint__kvm__%s *args)" % (tp, tp))
    b = BPF(text=structs + text, cflags=["-Wno-ignored-attributes"])
    for tp in ("kvm_exit", "kvm_nested_vmexit", "kvm_coredump_vcpu"):
        try:
            fn = b.load_func("probe_" + tp, BPF.TRACEPOINT)
            print(argv, tp, "compiled and passed the verifier, fd", fn.fd)
        except Exception as e:
            print(argv, tp, "compiled, but the verifier refused it:", str(e).splitlines()[0])
            failed = True
    b.cleanup()
sys.exit(1 if failed else 0)
