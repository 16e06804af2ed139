#!/usr/bin/env python3
"""Compare what kvmcoredump.py traced with the KVM notes of a core file.

    bpf/verify.py [--pid PID] [--kvmnote CMD] TRACE.json CORE

TRACE.json is kvmcoredump.py's record (-j); CORE is read with
`kvmnote read --json`. Per vCPU of the core, checks that:
  - the tracer saw exactly one kvm:kvm_coredump_vcpu event, and none for a
    vCPU that is not in the core;
  - the note's regs.rip equals the tracepoint's rip (0 when the note has
    no registers);
  - the note's status bits and error equal the tracepoint's;
  - the note's last VM exit (SVM exit_code / VMX basic exit reason) equals
    the last kvm:kvm_exit the tracer saw for that vCPU; for a vCPU the note
    calls never_ran, that the tracer saw no kvm_exit at all;
  - the core was written by the traced process (unless --pid is given).
Prints one line per vCPU and one per mismatch; exits 0 when all agree, 1 on
any mismatch, 2 when an input cannot be read. Needs no bcc.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

STATUS_BITS = ["valid", "protected", "unreadable", "guest_mode", "never_ran"]
ERRORS = {None: 0, "busy": 1, "nomem": 2, "disabled": 3}


def kvmnote_json(cmd, core):
    """`kvmnote read --json CORE`, with the repository importable."""
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repo, "kvmnote")):
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(cmd + ["read", "--json", core], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if p.returncode != 0:
        sys.exit("verify: kvmnote read failed (%d): %s" % (p.returncode, p.stderr.strip()))
    return json.loads(p.stdout)


def pick_process(trace, pid):
    procs = trace.get("processes", [])
    if pid is not None:
        procs = [p for p in procs if p["pid"] == pid]
    elif len(procs) > 1:
        procs = [p for p in procs if p.get("dumped")]
    if len(procs) != 1:
        sys.exit("verify: %d traced processes match (pid %s); use --pid" % (len(procs), pid))
    return procs[0]


def note_status_bits(names):
    return sum(1 << STATUS_BITS.index(n) for n in names)


def note_exit_reason(vcpu):
    """(isa, reason) of the note's last VM exit, or None."""
    ex = vcpu.get("exit")
    if not ex:
        return None
    if ex["type"] == "svm":
        return "svm", ex["exit_code"] & 0xffffffff
    if ex["type"] == "vmx":
        return "vmx", ex["exit_reason"] & 0xffff
    return None


def traced_exit_reason(tv):
    le = tv.get("last_exit")
    if not le:
        return None
    if le["isa"] == "vmx":
        return "vmx", le["exit_reason"] & 0xffff
    return le["isa"], le["exit_reason"] & 0xffffffff


def compare(notes, proc):
    """Return (report lines, mismatch lines)."""
    lines, bad = [], []
    traced = {v["vcpu_id"]: v for v in proc["vcpus"]}
    ids = [v["vcpu_id"] for v in notes["vcpus"]]
    if len(set(ids)) != len(ids):
        bad.append("core: duplicate vcpu_ids %s (several VMs?): cannot match by id" % ids)
    for nv in notes["vcpus"]:
        i = nv["vcpu_id"]
        tv = traced.get(i, {})
        cd = tv.get("coredump")
        if not cd:
            bad.append("vcpu %d: in the core, but no kvm_coredump_vcpu event traced" % i)
            continue
        if cd.get("events", 1) != 1:
            bad.append("vcpu %d: %d kvm_coredump_vcpu events traced, expected 1" % (i, cd["events"]))
        regs = nv.get("regs")
        note_rip = regs["rip"] if regs else 0
        if note_rip != cd["rip"]:
            bad.append("vcpu %d: rip: note 0x%x, tracepoint 0x%x" % (i, note_rip, cd["rip"]))
        nbits = note_status_bits(nv["status"])
        if nbits != cd["status"]:
            bad.append("vcpu %d: status: note 0x%x %s, tracepoint 0x%x" % (
                i, nbits, nv["status"], cd["status"]))
        nerr = ERRORS.get(nv.get("error"), nv.get("error"))
        if nerr != cd["error"]:
            bad.append("vcpu %d: error: note %s, tracepoint %s" % (i, nv.get("error"), cd["error"]))
        ne, te = note_exit_reason(nv), traced_exit_reason(tv)
        if "never_ran" in nv["status"]:
            # The note's exit record is then a VMCB/VMCS never exited from:
            # the check is that the tracer saw no exit either.
            if tv.get("exits", 0):
                bad.append("vcpu %d: the note says never ran, but %d kvm_exits traced"
                           % (i, tv["exits"]))
            ne = None
        elif ne != te:
            bad.append("vcpu %d: last exit: note %s, last kvm_exit traced %s" % (
                i, "%s 0x%x" % ne if ne else "none", "%s 0x%x" % te if te else "none"))
        lines.append("vcpu %-3d rip 0x%-16x status 0x%-3x last exit %-10s exits traced %d" % (
            i, note_rip, nbits, "%s 0x%x" % ne if ne else "-", tv.get("exits", 0)))
    for i in sorted(set(traced) - set(ids)):
        if traced[i].get("coredump"):
            bad.append("vcpu %d: kvm_coredump_vcpu traced, but not in the core" % i)
    return lines, bad


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Compare kvmcoredump.py's record with kvmnote read --json CORE")
    ap.add_argument("trace", help="kvmcoredump.py -j output")
    ap.add_argument("core", help="the VMM's core file")
    ap.add_argument("--pid", type=int, help="traced process to compare (default: "
                    "the core's pid, else the only one that dumped)")
    ap.add_argument("--kvmnote", default="%s -m kvmnote" % shlex.quote(sys.executable),
                    help="command running kvmnote (default: %(default)s)")
    a = ap.parse_args(argv)
    try:
        with open(a.trace) as f:
            trace = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit("verify: %s: %s" % (a.trace, e))
    if trace.get("schema") != "kvmcoredump/1":
        sys.exit("verify: %s: not a kvmcoredump/1 record" % a.trace)
    notes = kvmnote_json(shlex.split(a.kvmnote), a.core)
    pid = a.pid
    if pid is None and notes["core"].get("pid") in [p["pid"] for p in trace["processes"]]:
        pid = notes["core"]["pid"]
    proc = pick_process(trace, pid)
    lines, bad = compare(notes, proc)
    core_pid = notes["core"].get("pid")
    if a.pid is None and core_pid is not None and core_pid != proc["pid"]:
        bad.insert(0, "core: written by pid %d, which was not traced (trace has pid %d)"
                   % (core_pid, proc["pid"]))
    print("core %s (pid %s) vs trace of pid %d: %d vCPUs in the core" % (
        a.core, notes["core"].get("pid"), proc["pid"], len(notes["vcpus"])))
    for line in lines:
        print("  " + line)
    for line in bad:
        print("MISMATCH " + line)
    print("verify: %s" % ("OK" if not bad else "%d mismatches" % len(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
