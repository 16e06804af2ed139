#!/usr/bin/python3
# @lint-avoid-python-3-compatibility-imports
#
# kvmcoredump  Watch KVM VM exits per vCPU and the vCPUs KVM writes into a
#              crashed VMM's core file (kvm:kvm_coredump_vcpu).
#              For Linux, uses BCC, eBPF. Needs the kvmnote kernel series.
#
# USAGE: kvmcoredump [-h] [-p PID] [-d SECONDS] [--exit-on-dump] [-j FILE]
#
# The record it writes (-j) is what bpf/verify.py compares with the notes of
# the core file (kvmnote read --json): an observer independent of the notes.
#
# Copyright the kvmnote developers. Licensed under the Apache License 2.0.

from __future__ import print_function
from bcc import BPF
import argparse
import json
import os
import signal
import sys
import time

examples = """examples:
    ./kvmcoredump.py                    # trace all VMMs until Ctrl-C
    ./kvmcoredump.py -p 181             # only the VMM with PID 181
    ./kvmcoredump.py -d 10              # trace for 10 seconds
    ./kvmcoredump.py --exit-on-dump     # stop once a traced VMM's core is written
    ./kvmcoredump.py -j trace.json      # also write a JSON record (for verify.py)
"""
parser = argparse.ArgumentParser(
    description="Trace KVM VM exits per vCPU and the vCPUs written into "
                "VMM core dumps (kvm:kvm_coredump_vcpu)",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=examples)
parser.add_argument("-p", "--pid", type=int,
                    help="trace this process (VMM) only")
parser.add_argument("-d", "--duration", type=float,
                    help="total duration of trace, seconds")
parser.add_argument("--exit-on-dump", action="store_true",
                    help="exit once every VMM that dumped core has finished "
                         "writing it (is a zombie or gone)")
parser.add_argument("-j", "--json", metavar="FILE",
                    help="write the record, schema kvmcoredump/1, to FILE")
parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
args = parser.parse_args()

# Per (process, vCPU): the last kvm_exit as the tracepoint saw it, the count
# of exits per reason, and the kvm_coredump_vcpu event.
bpf_text = """
struct vkey_t {
    u32 tgid;
    u32 vcpu_id;
};

struct last_exit_t {
    u64 guest_rip;
    u64 info1;
    u64 info2;
    u64 ts;
    u32 exit_reason;
    u32 isa;
    u32 intr_info;
    u32 error_code;
    u32 tid;
    u32 pad;
    char comm[16];      // TASK_COMM_LEN
};

struct rkey_t {
    u32 tgid;
    u32 vcpu_id;
    u32 isa;
    u32 exit_reason;
};

struct dump_t {
    u64 rip;
    u64 ts;
    u32 tgid;
    u32 tid;
    u32 vcpu_id;
    u32 status;
    u32 error;
    u32 pad;
};

BPF_HASH(last_exit, struct vkey_t, struct last_exit_t, 4096);
BPF_HASH(exit_counts, struct rkey_t, u64, 16384);
BPF_HASH(dumps, struct vkey_t, struct dump_t, 4096);
BPF_HASH(dump_counts, struct vkey_t, u64, 4096);
BPF_PERF_OUTPUT(dump_events);

TRACEPOINT_PROBE(kvm, kvm_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;

    if (FILTER_PID)
        return 0;

    struct vkey_t key = {.tgid = tgid, .vcpu_id = args->vcpu_id};
    struct last_exit_t e = {};
    e.guest_rip = args->guest_rip;
    e.info1 = args->info1;
    e.info2 = args->info2;
    e.ts = bpf_ktime_get_ns();
    e.exit_reason = args->exit_reason;
    e.isa = args->isa;
    e.intr_info = args->intr_info;
    e.error_code = args->error_code;
    e.tid = (u32)id;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    last_exit.update(&key, &e);

    struct rkey_t rkey = {.tgid = tgid, .vcpu_id = args->vcpu_id,
                          .isa = args->isa, .exit_reason = args->exit_reason};
    exit_counts.increment(rkey);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_coredump_vcpu)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;

    if (FILTER_PID)
        return 0;

    struct vkey_t key = {.tgid = tgid, .vcpu_id = args->vcpu_id};
    struct dump_t d = {};
    d.rip = args->rip;
    d.ts = bpf_ktime_get_ns();
    d.tgid = tgid;
    d.tid = (u32)id;
    d.vcpu_id = args->vcpu_id;
    d.status = args->status;
    d.error = args->error;
    dumps.update(&key, &d);
    dump_counts.increment(key);
    dump_events.perf_submit(args, &d, sizeof(d));
    return 0;
}
"""

if args.pid:
    bpf_text = bpf_text.replace("FILTER_PID", "tgid != %d" % args.pid)
else:
    bpf_text = bpf_text.replace("FILTER_PID", "0")
if args.ebpf:
    print(bpf_text)
    sys.exit(0)

# KVM_ISA_VMX / KVM_ISA_SVM (arch/x86/kvm/trace.h)
ISA = {1: "vmx", 2: "svm"}
# A few exit reasons by name, for people; the record keeps the numbers.
SVM_EXITS = {0x60: "INTR", 0x61: "NMI", 0x62: "SMI", 0x63: "INIT",
             0x64: "VINTR", 0x6e: "RDPMC", 0x6f: "RDTSC", 0x72: "CPUID",
             0x78: "HLT", 0x7b: "IOIO", 0x7c: "MSR", 0x7f: "SHUTDOWN",
             0x81: "VMMCALL", 0x400: "NPF"}
SVM_EXITS.update({0x40 + n: "EXCP_%d" % n for n in range(32)})
VMX_EXITS = {0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT",
             7: "INTERRUPT_WINDOW", 10: "CPUID", 12: "HLT", 18: "VMCALL",
             28: "CR_ACCESS", 30: "IO_INSTRUCTION", 31: "MSR_READ",
             32: "MSR_WRITE", 48: "EPT_VIOLATION", 49: "EPT_MISCONFIG",
             52: "PREEMPTION_TIMER"}
STATUS_BITS = ["valid", "protected", "unreadable", "guest_mode", "never_ran"]
ERRORS = {0: None, 1: "busy", 2: "nomem", 3: "disabled"}


def reason_name(isa, reason):
    if ISA.get(isa) == "svm":
        return SVM_EXITS.get(reason, "0x%x" % reason)
    if ISA.get(isa) == "vmx":
        return VMX_EXITS.get(reason & 0xffff, str(reason & 0xffff))
    return str(reason)


def status_names(status):
    return [n for i, n in enumerate(STATUS_BITS) if status & (1 << i)]


def comm_of(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def finished(pid):
    """The process is gone or a zombie: its core file is complete."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# 6.12's asm/ibt.h uses nocf_check, which clang ignores for BPF: say nothing.
b = BPF(text=bpf_text, cflags=["-Wno-ignored-attributes"])
comms = {}
dumped = {}          # tgid -> time of its first coredump event


def print_dump_event(cpu, data, size):
    d = b["dump_events"].event(data)
    if d.tgid not in dumped:
        dumped[d.tgid] = time.time()
    comms.setdefault(d.tgid, comm_of(d.tgid))
    print("%-8s %-7d %-7d %-5d %-18s %-6s %-24s %s" % (
        time.strftime("%H:%M:%S"), d.tgid, d.tid, d.vcpu_id, "0x%x" % d.rip,
        "0x%x" % d.status, ",".join(status_names(d.status)) or "-",
        ERRORS.get(d.error, d.error) or "-"))
    sys.stdout.flush()


b["dump_events"].open_perf_buffer(print_dump_event, page_cnt=16)

stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append("SIGTERM"))
signal.signal(signal.SIGINT, lambda *a: stop.append("SIGINT"))

print("Tracing KVM exits and core-dumped vCPUs%s... Hit Ctrl-C to end." %
      (" of PID %d" % args.pid if args.pid else ""))
print("%-8s %-7s %-7s %-5s %-18s %-6s %-24s %s" % (
    "TIME", "PID", "TID", "VCPU", "RIP", "STATUS", "", "ERROR"))
sys.stdout.flush()

start = time.time()
while not stop:
    b.perf_buffer_poll(timeout=100)
    if args.duration and time.time() - start >= args.duration:
        break
    if args.exit_on_dump and dumped and all(finished(p) for p in dumped):
        b.perf_buffer_poll(timeout=0)
        break

# Build the record from the maps.
procs = {}


def vcpu_entry(tgid, vcpu_id):
    p = procs.setdefault(tgid, {"pid": tgid, "comm": None, "vcpus": {}})
    return p["vcpus"].setdefault(vcpu_id, {
        "vcpu_id": vcpu_id, "exits": 0, "exit_counts": [],
        "last_exit": None, "coredump": None})


for k, e in b["last_exit"].items():
    v = vcpu_entry(k.tgid, k.vcpu_id)
    # the vCPU thread's name, in case the process is gone by now
    comms.setdefault(k.tgid, e.comm.decode("utf-8", "replace"))
    v["last_exit"] = {
        "isa": ISA.get(e.isa, "unknown"), "exit_reason": e.exit_reason,
        "reason_name": reason_name(e.isa, e.exit_reason),
        "info1": e.info1, "info2": e.info2, "intr_info": e.intr_info,
        "error_code": e.error_code, "guest_rip": e.guest_rip, "tid": e.tid}
for k, n in b["exit_counts"].items():
    v = vcpu_entry(k.tgid, k.vcpu_id)
    v["exits"] += n.value
    v["exit_counts"].append({
        "isa": ISA.get(k.isa, "unknown"), "exit_reason": k.exit_reason,
        "reason_name": reason_name(k.isa, k.exit_reason), "count": n.value})
dump_counts = {(k.tgid, k.vcpu_id): n.value
               for k, n in b["dump_counts"].items()}
for k, d in b["dumps"].items():
    v = vcpu_entry(k.tgid, k.vcpu_id)
    v["coredump"] = {"rip": d.rip, "status": d.status,
                     "status_names": status_names(d.status),
                     "error": d.error, "tid": d.tid,
                     "events": dump_counts.get((k.tgid, k.vcpu_id), 0)}

record = {"schema": "kvmcoredump/1", "duration": round(time.time() - start, 3),
          "stopped_by": stop[0] if stop else (
              "dump" if args.exit_on_dump and dumped else "duration"),
          "processes": []}
for tgid in sorted(procs):
    p = procs[tgid]
    p["comm"] = comm_of(tgid) or comms.get(tgid)
    p["dumped"] = tgid in dumped
    p["vcpus"] = [p["vcpus"][i] for i in sorted(p["vcpus"])]
    for v in p["vcpus"]:
        v["exit_counts"].sort(key=lambda c: -c["count"])
    record["processes"].append(p)

print()
for p in record["processes"]:
    print("PID %d (%s): %d vCPUs, %d exits, %s" % (
        p["pid"], p["comm"] or "?", len(p["vcpus"]),
        sum(v["exits"] for v in p["vcpus"]),
        "dumped core" if p["dumped"] else "no core dump seen"))
    print("  %-5s %-8s %-16s %-18s %-18s %-8s %s" % (
        "VCPU", "EXITS", "LAST-EXIT", "EXIT-RIP", "DUMP-RIP", "STATUS",
        "TOP-REASONS"))
    for v in p["vcpus"]:
        le, cd = v["last_exit"], v["coredump"]
        print("  %-5d %-8d %-16s %-18s %-18s %-8s %s" % (
            v["vcpu_id"], v["exits"],
            "%s 0x%x %s" % (le["isa"], le["exit_reason"], le["reason_name"])
            if le else "-",
            "0x%x" % le["guest_rip"] if le else "-",
            "0x%x" % cd["rip"] if cd else "-",
            "0x%x" % cd["status"] if cd else "-",
            " ".join("%s:%d" % (c["reason_name"], c["count"])
                     for c in v["exit_counts"][:4])))
if not record["processes"]:
    print("No KVM exits or core-dumped vCPUs seen.")

if args.json:
    with open(args.json + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.rename(args.json + ".tmp", args.json)
