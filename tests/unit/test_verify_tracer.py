"""bpf/kvmcoredump.py without bcc: options, the BPF text, and the record it builds.

The BPF programs themselves need a kernel with kvm:kvm_exit firing (the emulated L1 of
tests/bpf); here the Python around them is tested: the filters that end up in the C text,
that the kvm_exit hot path touches only per-CPU maps, and that build_record() turns per-CPU
map contents into a kvmcoredump/3 record that `kvmnote verify` accepts for the example core
and rejects when events were lost or dropped. The map contents are written from what the
example's VMM did (see test_verify.py's docstring): vCPU 0 on thread 49, vCPU 1 on thread
51, each ending with SVM HLT (0x78) at guest RIP 0x1000, vCPU 0 after four NPFs.
"""

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from kvmnote.cli import main

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kvmcoredump", REPO / "bpf" / "kvmcoredump.py")
assert spec and spec.loader
kd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kd)

SVM_ISA = 2      # KVM_ISA_SVM


def cpu(ts: int, reason: int, rip: int, info1: int = 0, info2: int = 0) -> dict[str, int]:
    """One CPU's slot of the per-CPU last_exit map (struct last_exit_t)."""
    return {"ts": ts, "guest_rip": rip, "info1": info1, "info2": info2,
            "exit_reason": reason, "isa": SVM_ISA if ts else 0, "intr_info": 0,
            "error_code": 0}


EMPTY = cpu(0, 0, 0)
# The example VMM (pid 46) on a 2-CPU host: vCPU 0 ran on both CPUs, its HLT (newest
# ts) on CPU 1; vCPU 1 only on CPU 0.
LAST = [((46, 49, 0), [cpu(100, 0x400, 0x1000, 0x4, 0x1000), cpu(250, 0x78, 0x1000)]),
        ((46, 51, 1), [cpu(300, 0x78, 0x1000), EMPTY])]
COUNTS = [((46, 49, 0, 0x400), [3, 1]), ((46, 49, 0, 0x60), [0, 1]),
          ((46, 49, 0, 0x78), [0, 1]), ((46, 51, 1, 0x78), [1, 0])]


def build(**kw: Any) -> dict[str, Any]:
    args = dict(last_exits=LAST, counts=COUNTS, dumps={46: 2}, lost=0, drops=0,
                duration=1.25, stopped_by="dump", comms={46: "vmm"})
    args.update(kw)
    return kd.build_record(**args)


def verify(tmp_path: Path, record: dict[str, Any],
           capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    (tmp_path / "trace.json").write_text(json.dumps(record))
    rc = main(["verify", str(REPO / "examples" / "svm-vmm.core.zst"),
               "--trace", str(tmp_path / "trace.json")])
    return rc, capsys.readouterr().out


def test_record_from_per_cpu_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = build()
    assert (rec["schema"], rec["lost_events"], rec["map_full_drops"]) == ("kvmcoredump/3", 0, 0)
    [p] = rec["processes"]
    assert (p["pid"], p["comm"], p["dumped"], p["dump_events"]) == (46, "vmm", True, 2)
    v0, v1 = p["vcpus"]
    assert (v0["tid"], v0["vcpu_id"], v0["exits"]) == (49, 0, 6)     # 3+1 NPF, INTR, HLT
    assert (v1["tid"], v1["vcpu_id"], v1["exits"]) == (51, 1, 1)
    assert v0["exit_counts"][0] == {"exit_reason": 0x400, "count": 4, "reason_name": "NPF"}
    assert v0["last_exit"]["exit_reason"] == 0x78 and v0["last_exit"]["ts"] == 250
    assert not v0["last_exit"]["guest_mode"] and not v1["last_exit"]["guest_mode"]
    rc, out = verify(tmp_path, rec, capsys)
    assert rc == 0, out


@pytest.mark.parametrize("key", ["lost", "drops"])
def test_losses_reach_the_record_and_fail_verify(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    rec = build(**{key: 3})
    assert rec["lost_events" if key == "lost" else "map_full_drops"] == 3
    rc, out = verify(tmp_path, rec, capsys)
    assert rc == 1 and "MISMATCH trace: " in out
    assert any("this record is incomplete" in line for line in kd.summary(rec))


@pytest.mark.parametrize("l2,guest_mode", [
    ({"ts": 260, "guest_rip": 0x1000, "exit_reason": 0x78}, True),    # after the HLT exit
    ({"ts": 250, "guest_rip": 0x1000, "exit_reason": 0x78}, True),    # the same instant
    ({"ts": 240, "guest_rip": 0x1000, "exit_reason": 0x78}, False),   # an earlier exit's
    ({"ts": 260, "guest_rip": 0x1003, "exit_reason": 0x78}, False),   # another RIP's
    ({"ts": 260, "guest_rip": 0x1000, "exit_reason": 0x7B}, False),   # another reason's
])
def test_last_exit_is_l2s_when_kvm_nested_vmexit_reported_it(l2: dict[str, int],
                                                             guest_mode: bool) -> None:
    """kvm_nested_vmexit follows kvm_exit for each exit from a nested guest: the last exit
    (vCPU 0's HLT at ts 250) is L2's only if the l2_exit map holds that very exit."""
    rec = build(l2_exits={(46, 49, 0): l2})
    v0, v1 = rec["processes"][0]["vcpus"]
    assert (v0["last_exit"]["guest_mode"], v1["last_exit"]["guest_mode"]) == (guest_mode, False)
    assert ("(L2)" in kd.summary(rec)[2]) == guest_mode


def test_nested_vmexit_probe_records_the_exit(capsys: pytest.CaptureFixture[str]) -> None:
    """Its filter is kvm_exit's, its map shared (the thread may change CPUs between the two
    tracepoints), a failed update counted."""
    text = kd.bpf_text(kd.parse_args(["-p", "181"]))
    body = probe(text, "kvm_nested_vmexit")
    assert "    if (tgid != 181)\n        return 0;" in body
    assert re.search(r"BPF_HASH\(l2_exit, struct vkey_t, struct l2_exit_t,", text)
    assert "l2_exit.update(&vkey, &x)" in body and "count_drop();" in body


def test_vms_in_one_process_are_told_apart_by_thread() -> None:
    # Two VMs in pid 46, each with a vCPU 0, run by threads 60 and 61.
    rec = build(last_exits=[((46, 60, 0), [cpu(5, 0x78, 0x1000)]),
                            ((46, 61, 0), [cpu(6, 0x7b, 0x2000, 0xf80210, 0x2002)])],
                counts=[((46, 60, 0, 0x78), [1]), ((46, 61, 0, 0x7b), [7])])
    v = rec["processes"][0]["vcpus"]
    assert [(e["tid"], e["vcpu_id"], e["exits"], e["last_exit"]["exit_reason"]) for e in v] \
        == [(60, 0, 1, 0x78), (61, 0, 7, 0x7b)]


def test_never_filled_slot_is_no_exit() -> None:
    rec = build(last_exits=[((46, 49, 0), [EMPTY, EMPTY])], counts=[], dumps={46: 1})
    assert rec["processes"][0]["vcpus"] == []     # no exit, no entry: never a fake one


def test_dump_seen_without_exits_keeps_the_process() -> None:
    rec = build(last_exits=[], counts=[], dumps={77: 1})
    assert [(p["pid"], p["dumped"], p["vcpus"]) for p in rec["processes"]] == [(77, True, [])]


def test_interval_summary_shows_exits_since_the_previous() -> None:
    prev = build(counts=[((46, 49, 0, 0x78), [2]), ((46, 51, 1, 0x78), [1])])
    cur = build(counts=[((46, 49, 0, 0x78), [5]), ((46, 51, 1, 0x78), [1])])
    rows = [line.split() for line in kd.summary(cur, prev) if line.startswith("  4") or
            line.startswith("  5")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("49", "0", "3"), ("51", "1", "0")]


def probe(text: str, name: str) -> str:
    m = re.search(r"TRACEPOINT_PROBE\(kvm, %s\)\n\{\n(.*?)\n\}\n" % name, text, re.S)
    assert m, name
    return m.group(1)


@pytest.mark.parametrize("argv,exit_filter,dump_filter", [
    ([], "0", "0"),
    (["-p", "181"], "tgid != 181", "tgid != 181"),
    (["-p", "181", "-v", "2"], "tgid != 181 || args->vcpu_id != 2",
     "tgid != 181 || args->vcpu_id != 2"),
    (["-t", "183"], "tid != 183", "0"),
    (["-T", "183,184"], "tids.lookup(&tid) == NULL", "0"),
    (["-p", "181", "5", "3"], "tgid != 181", "tgid != 181")])
def test_filters_in_the_bpf_text(argv: list[str], exit_filter: str, dump_filter: str) -> None:
    text = kd.bpf_text(kd.parse_args(argv))
    assert "FILTER" not in text and "MAX_" not in text
    assert "    if (%s)\n        return 0;" % exit_filter in probe(text, "kvm_exit")
    assert "    if (%s)\n        return 0;" % dump_filter in probe(text, "kvm_coredump_vcpu")


def test_hot_path_touches_only_per_cpu_maps() -> None:
    text = kd.bpf_text(kd.parse_args(["-p", "1"]))
    body = probe(text, "kvm_exit")
    used = set(re.findall(r"(\w+)\.(?:lookup|lookup_or_try_init|update|increment|insert)\(",
                          body))
    if "count_drop()" in body:
        used |= set(re.findall(r"(\w+)\.lookup\(",
                               text[text.index("count_drop(void)"):text.index("TRACEPOINT")]))
    kinds = {name: kind for kind, name in re.findall(r"BPF_(\w+)\((\w+),", text)}
    kinds |= {name: kind.upper() for kind, name in
              re.findall(r'BPF_F_TABLE\("(\w+)", [^,]+, [^,]+, (\w+),', text)}
    assert used == {"last_exit", "exit_counts", "drops"}
    assert all(kinds[m].startswith("PERCPU_") for m in used), kinds
    assert "bpf_get_current_comm" not in body and "perf_submit" not in body
    # each insert that can fail (map full) is counted
    assert body.count("lookup_or_try_init(") == body.count("count_drop();") == 2


def test_args() -> None:
    a = kd.parse_args(["-T", "3,4", "2.5", "4"])
    assert (a.tids, a.interval, a.count) == ([3, 4], 2.5, 4)


@pytest.mark.parametrize("argv", [["-v", "1"], ["-p", "1", "-t", "2"], ["-T", "3,x"], ["0"],
                                  ["1", "-2"], ["x"]])
def test_bad_args_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        kd.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
