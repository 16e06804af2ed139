#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-only
#
# kvmcoredump  Watch KVM VM exits per vCPU thread, and VMMs dumping core with
#              the kvmnote kernel series (kvm:kvm_coredump_vcpu).
#              For Linux, uses BCC, eBPF.
#
# USAGE: kvmcoredump [-h] [-p PID [-v VCPU] | -t TID | -T 'TID1,TID2']
#                    [--exit-on-dump] [-j FILE] [interval] [count]
#
# The record it writes (-j, schema kvmcoredump/3) is what `kvmnote verify CORE
# --trace FILE` holds against the notes of the core file: per vCPU thread, the
# last kvm_exit as the tracepoint saw it, and whether it was a nested guest's
# (L2's: kvm:kvm_nested_vmexit followed it). The kvm_exit hot path uses per-CPU
# maps only (as bcc's kvmexit does); lost perf events and map-full drops are
# counted in the record, and a record with either does not verify clean.
#
# Copyright the kvmnote developers. Same licence as the rest of kvmnote.

from __future__ import print_function
import argparse
import json
import os
import signal
import sys
import time

examples = """examples:
    ./kvmcoredump.py                     # all VMMs, until Ctrl-C, then a summary
    ./kvmcoredump.py 5                   # a summary every 5 seconds
    ./kvmcoredump.py 1 10                # every second, 10 times
    ./kvmcoredump.py -p 181              # only the VMM with PID 181
    ./kvmcoredump.py -p 181 -v 0         # only vCPU 0 (vcpu_id) of PID 181
    ./kvmcoredump.py -t 183              # only the vCPU thread 183
    ./kvmcoredump.py -T '183,184'        # only these vCPU threads
    ./kvmcoredump.py --exit-on-dump -j trace.json -p 181
                                         # stop once PID 181's core is written;
                                         # then: kvmnote verify CORE --trace trace.json
"""

# KVM_ISA_VMX / KVM_ISA_SVM (arch/x86/kvm/trace.h)
ISA = {1: "vmx", 2: "svm"}
# A few exit reasons by name, for people; the record keeps the numbers.
SVM_EXITS = {0x60: "INTR", 0x61: "NMI", 0x62: "SMI", 0x63: "INIT",
             0x64: "VINTR", 0x6e: "RDTSC", 0x6f: "RDPMC", 0x72: "CPUID",
             0x78: "HLT", 0x7b: "IOIO", 0x7c: "MSR", 0x7f: "SHUTDOWN",
             0x81: "VMMCALL", 0x400: "NPF"}
SVM_EXITS.update({0x40 + n: "EXCP_%d" % n for n in range(32)})
VMX_EXITS = {0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT",
             7: "INTERRUPT_WINDOW", 10: "CPUID", 12: "HLT", 18: "VMCALL",
             28: "CR_ACCESS", 30: "IO_INSTRUCTION", 31: "MSR_READ",
             32: "MSR_WRITE", 48: "EPT_VIOLATION", 49: "EPT_MISCONFIG",
             52: "PREEMPTION_TIMER"}

# Maps are per-CPU on the hot path: each CPU updates its own copy without
# atomics; user space sums the counts and takes the newest last exit (ts).
# A VM is told apart by its vCPU threads: kvm:kvm_exit carries no VM pointer,
# and the note's tid names the thread that last ran each vCPU.
BPF_TEXT = """
struct vkey_t {
    u32 tgid;
    u32 tid;
    u32 vcpu_id;
    u32 pad;
};

struct rkey_t {
    u32 tgid;
    u32 tid;
    u32 vcpu_id;
    u32 exit_reason;
};

struct last_exit_t {
    u64 ts;
    u64 guest_rip;
    u64 info1;
    u64 info2;
    u32 exit_reason;
    u32 isa;
    u32 intr_info;
    u32 error_code;
};

// The last exit that KVM took while the vCPU ran a nested guest (L2):
// kvm:kvm_nested_vmexit, which fires after kvm_exit for each such exit.
struct l2_exit_t {
    u64 ts;
    u64 guest_rip;
    u32 exit_reason;
    u32 pad;
};

struct dump_t {
    u64 ts;
    u32 tgid;
    u32 tid;
    u32 vcpu_id;
    u32 pad;
};

// Not preallocated: a per-CPU entry costs its size times the number of CPUs, so
// memory follows the threads traced, not the limits; only a key's first insert
// allocates, and a failed one is counted as a drop.
BPF_F_TABLE("percpu_hash", struct vkey_t, struct last_exit_t, last_exit, MAX_VCPUS,
            BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash", struct rkey_t, u64, exit_counts, MAX_REASONS,
            BPF_F_NO_PREALLOC);
// Shared, not per-CPU: the vCPU thread may move to another CPU between kvm_exit
// and kvm_nested_vmexit (KVM handles the exit with preemption enabled). Written
// only on exits from L2, each key by its own vCPU thread.
BPF_HASH(l2_exit, struct vkey_t, struct l2_exit_t, MAX_VCPUS);
BPF_PERCPU_ARRAY(drops, u64, 1);
BPF_HASH(tids, u32, u8, 1024);
BPF_PERF_OUTPUT(dump_events);

static inline void count_drop(void)
{
    int zero = 0;
    u64 *d = drops.lookup(&zero);

    if (d)
        (*d)++;
}

TRACEPOINT_PROBE(kvm, kvm_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct last_exit_t zero = {};
    u64 zero64 = 0;

    if (FILTER)
        return 0;

    struct vkey_t vkey = {.tgid = tgid, .tid = tid, .vcpu_id = args->vcpu_id};
    struct last_exit_t *e = last_exit.lookup_or_try_init(&vkey, &zero);
    if (!e) {
        count_drop();
        return 0;
    }
    e->ts = bpf_ktime_get_ns();
    e->guest_rip = args->guest_rip;
    e->info1 = args->info1;
    e->info2 = args->info2;
    e->exit_reason = args->exit_reason;
    e->isa = args->isa;
    e->intr_info = args->intr_info;
    e->error_code = args->error_code;

    struct rkey_t rkey = {.tgid = tgid, .tid = tid, .vcpu_id = args->vcpu_id,
                          .exit_reason = args->exit_reason};
    u64 *n = exit_counts.lookup_or_try_init(&rkey, &zero64);
    if (n)
        (*n)++;
    else
        count_drop();
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_nested_vmexit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;

    if (FILTER)
        return 0;

    struct vkey_t vkey = {.tgid = tgid, .tid = tid, .vcpu_id = args->vcpu_id};
    struct l2_exit_t x = {.ts = bpf_ktime_get_ns(), .guest_rip = args->guest_rip,
                          .exit_reason = args->exit_reason};
    if (l2_exit.update(&vkey, &x))
        count_drop();
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_coredump_vcpu)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;

    if (DUMP_FILTER)
        return 0;

    struct dump_t d = {.ts = bpf_ktime_get_ns(), .tgid = tgid, .tid = tid,
                       .vcpu_id = args->vcpu_id};
    dump_events.perf_submit(args, &d, sizeof(d));
    return 0;
}
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Trace KVM exits per vCPU thread, and VMMs whose core "
                    "the kvmnote kernel series writes (kvm_coredump_vcpu)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples)
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument("-p", "--pid", type=int,
                           help="trace this PID (VMM) only")
    exclusive.add_argument("-t", "--tid", type=int,
                           help="trace this TID (vCPU thread) only")
    exclusive.add_argument("-T", "--tids", metavar="TIDS",
                           help="trace these comma-separated TIDs only")
    parser.add_argument("-v", "--vcpu", type=int,
                        help="trace this vcpu_id only (with -p)")
    parser.add_argument("--exit-on-dump", action="store_true",
                        help="exit once every VMM that dumped core has "
                             "finished writing it (is a zombie or gone)")
    parser.add_argument("-j", "--json", metavar="FILE",
                        help="write the record, schema kvmcoredump/3, to FILE")
    parser.add_argument("--max-vcpus", type=int, default=4096,
                        help="entries of the per-thread map (default 4096)")
    parser.add_argument("interval", nargs="?", type=positive,
                        help="output interval, in seconds")
    parser.add_argument("count", nargs="?", type=positive,
                        help="number of outputs")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vcpu is not None and args.pid is None:
        parser.error("-v/--vcpu needs -p/--pid")
    if args.tids is not None:
        try:
            args.tids = [int(t) for t in args.tids.split(",")]
        except ValueError:
            parser.error("-T/--tids: comma-separated TIDs, not %r" % args.tids)
    return args


def positive(s):
    try:
        v = float(s) if "." in s else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive: %r" % s)
    return v


def bpf_text(args):
    """The BPF C program with the filters of `args` in place."""
    conds = []
    if args.pid is not None:
        conds.append("tgid != %d" % args.pid)
    if args.tid is not None:
        conds.append("tid != %d" % args.tid)
    if args.tids is not None:
        conds.append("tids.lookup(&tid) == NULL")
    if args.vcpu is not None:
        conds.append("args->vcpu_id != %d" % args.vcpu)
    # The dumping thread is not a vCPU thread: -t/-T do not filter dumps.
    dump = [c for c in conds if not c.startswith("tid")]
    return (BPF_TEXT.replace("DUMP_FILTER", " || ".join(dump) or "0")
            .replace("FILTER", " || ".join(conds) or "0")
            .replace("MAX_VCPUS", str(args.max_vcpus))
            .replace("MAX_REASONS", str(args.max_vcpus * 16)))


def reason_name(isa, reason):
    if isa == "svm":
        return SVM_EXITS.get(reason, "0x%x" % reason)
    if isa == "vmx":
        return VMX_EXITS.get(reason & 0xffff, str(reason & 0xffff))
    return str(reason)


def build_record(last_exits, counts, dumps, lost, drops, duration, stopped_by,
                 comms=None, l2_exits=None):
    """The kvmcoredump/3 record from the maps' contents, as plain values.

    last_exits: ((tgid, tid, vcpu_id), [per-CPU dict of struct last_exit_t]);
    counts: ((tgid, tid, vcpu_id, exit_reason), [per-CPU count]); dumps:
    {tgid: number of kvm_coredump_vcpu events}; lost: perf events lost;
    drops: map updates that failed (map full), summed over CPUs; l2_exits:
    {(tgid, tid, vcpu_id): dict of struct l2_exit_t}. A last exit is L2's
    (guest_mode) if kvm_nested_vmexit reported that exit: at or after its
    time, same guest RIP and reason.
    """
    procs = {}

    def entry(tgid, tid, vcpu_id):
        p = procs.setdefault(tgid, {})
        return p.setdefault((tid, vcpu_id), {
            "tid": tid, "vcpu_id": vcpu_id, "exits": 0, "exit_counts": [],
            "last_exit": None})

    for (tgid, tid, vcpu_id), percpu in last_exits:
        e = max(percpu, key=lambda v: v["ts"])
        if not e["ts"]:
            continue    # inserted, never filled: cannot happen, but never a fake exit
        isa = ISA.get(e["isa"], "unknown")
        x = (l2_exits or {}).get((tgid, tid, vcpu_id))
        l2 = bool(x and x["ts"] >= e["ts"] and x["guest_rip"] == e["guest_rip"]
                  and x["exit_reason"] == e["exit_reason"])
        entry(tgid, tid, vcpu_id)["last_exit"] = {
            "isa": isa, "exit_reason": e["exit_reason"],
            "reason_name": reason_name(isa, e["exit_reason"]),
            "guest_rip": e["guest_rip"], "info1": e["info1"],
            "info2": e["info2"], "intr_info": e["intr_info"],
            "error_code": e["error_code"], "guest_mode": l2, "ts": e["ts"]}
    for (tgid, tid, vcpu_id, reason), percpu in counts:
        v = entry(tgid, tid, vcpu_id)
        n = sum(percpu)
        v["exits"] += n
        v["exit_counts"].append({"exit_reason": reason, "count": n})
    for tgid in dumps:
        procs.setdefault(tgid, {})
    record = {"schema": "kvmcoredump/3", "duration": round(duration, 3),
              "stopped_by": stopped_by, "lost_events": lost,
              "map_full_drops": drops, "processes": []}
    for tgid in sorted(procs):
        vcpus = [procs[tgid][k] for k in sorted(procs[tgid])]
        for v in vcpus:
            isa = v["last_exit"]["isa"] if v["last_exit"] else None
            for c in v["exit_counts"]:
                c["reason_name"] = reason_name(isa, c["exit_reason"])
            v["exit_counts"].sort(key=lambda c: -c["count"])
        record["processes"].append({
            "pid": tgid, "comm": (comms or {}).get(tgid),
            "dumped": dumps.get(tgid, 0) > 0, "dump_events": dumps.get(tgid, 0),
            "vcpus": vcpus})
    return record


def summary(record, previous=None):
    """Table lines: per process and vCPU thread, exits (since `previous`)."""
    before = {}
    for p in (previous or {}).get("processes", []):
        for v in p["vcpus"]:
            before[p["pid"], v["tid"], v["vcpu_id"]] = v["exits"]
    lines = []
    for p in record["processes"]:
        lines.append("PID %d (%s): %d vCPU threads, %s" % (
            p["pid"], p["comm"] or "?", len(p["vcpus"]),
            "dumped core" if p["dumped"] else "no core dump seen"))
        lines.append("  %-7s %-5s %-9s %-20s %-18s %s" % (
            "TID", "VCPU", "EXITS", "LAST-EXIT", "EXIT-RIP", "TOP-REASONS"))
        for v in p["vcpus"]:
            le = v["last_exit"]
            lines.append("  %-7d %-5d %-9d %-20s %-18s %s" % (
                v["tid"], v["vcpu_id"],
                v["exits"] - before.get((p["pid"], v["tid"], v["vcpu_id"]), 0),
                "%s 0x%x %s%s" % (le["isa"], le["exit_reason"], le["reason_name"],
                                  " (L2)" if le["guest_mode"] else "")
                if le else "-",
                "0x%x" % le["guest_rip"] if le else "-",
                " ".join("%s:%d" % (c["reason_name"], c["count"])
                         for c in v["exit_counts"][:4])))
    if record["lost_events"] or record["map_full_drops"]:
        lines.append("WARNING: %d perf events lost, %d map updates dropped "
                     "(map full): this record is incomplete" % (
                         record["lost_events"], record["map_full_drops"]))
    if not record["processes"]:
        lines.append("No KVM exits or core dumps seen.")
    return lines


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


def read_maps(b):
    """The BPF maps as build_record() takes them."""
    fields = ("ts", "guest_rip", "info1", "info2", "exit_reason", "isa",
              "intr_info", "error_code")
    last = [((k.tgid, k.tid, k.vcpu_id),
             [{f: getattr(e, f) for f in fields} for e in v])
            for k, v in b["last_exit"].items()]
    counts = [((k.tgid, k.tid, k.vcpu_id, k.exit_reason), [n for n in v])
              for k, v in b["exit_counts"].items()]
    drops = sum(sum(v) for _, v in b["drops"].items())
    l2 = {(k.tgid, k.tid, k.vcpu_id): {"ts": v.ts, "guest_rip": v.guest_rip,
                                      "exit_reason": v.exit_reason}
          for k, v in b["l2_exit"].items()}
    return last, counts, drops, l2


def main(argv=None):
    args = parse_args(argv)
    text = bpf_text(args)
    if args.ebpf:
        print(text)
        return 0
    from bcc import BPF

    # 6.12's asm/ibt.h uses nocf_check, which clang ignores for BPF.
    b = BPF(text=text, cflags=["-Wno-ignored-attributes"])
    if args.tids is not None:
        for t in args.tids:
            b["tids"][b["tids"].Key(t)] = b["tids"].Leaf(1)
    dumps, comms, lost = {}, {}, [0]

    def on_dump(cpu, data, size):
        d = b["dump_events"].event(data)
        dumps[d.tgid] = dumps.get(d.tgid, 0) + 1
        comms.setdefault(d.tgid, comm_of(d.tgid))
        print("%-8s PID %d TID %d: vCPU %d written into its core" % (
            time.strftime("%H:%M:%S"), d.tgid, d.tid, d.vcpu_id))
        sys.stdout.flush()

    def on_lost(n):
        lost[0] += n

    b["dump_events"].open_perf_buffer(on_dump, page_cnt=64, lost_cb=on_lost)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *a: stop.append("SIGINT"))
    what = ("PID %d" % args.pid if args.pid is not None else
            "TID %d" % args.tid if args.tid is not None else
            "TIDs %s" % args.tids if args.tids is not None else "all VMMs")
    print("Tracing KVM exits and core dumps of %s... Hit Ctrl-C to end." % what)
    sys.stdout.flush()

    def record(stopped_by):
        last, counts, drops, l2 = read_maps(b)
        pids = {k[0] for k, _ in last} | set(dumps)
        for p in pids:
            comms[p] = comm_of(p) or comms.get(p)
        return build_record(last, counts, dumps, lost[0], drops,
                            time.time() - start, stopped_by, comms, l2)

    start = time.time()
    next_out, outputs, prev = start + (args.interval or 0), 0, None
    next_comm, stopped_by = start, None
    while not stopped_by:
        b.perf_buffer_poll(timeout=100)
        if time.time() >= next_comm:    # names, while the processes live
            for k in b["last_exit"].keys():
                if comms.get(k.tgid) is None:
                    comms[k.tgid] = comm_of(k.tgid)
            next_comm += 1
        if stop:
            stopped_by = stop[0]
        elif args.exit_on_dump and dumps and all(finished(p) for p in dumps):
            b.perf_buffer_poll(timeout=0)
            stopped_by = "dump"
        elif args.interval and time.time() >= next_out:
            cur = record("interval")
            print("\n%s" % time.strftime("%H:%M:%S"))
            print("\n".join(summary(cur, prev)))
            sys.stdout.flush()
            prev, outputs, next_out = cur, outputs + 1, next_out + args.interval
            if args.count and outputs >= args.count:
                stopped_by = "count"
    rec = record(stopped_by)
    print()
    print("\n".join(summary(rec)))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
        os.rename(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
