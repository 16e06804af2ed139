"""kvmnote on the path a real crash takes: systemd-coredump and the triage service.

One boot of our patched kernel (L1: QEMU TCG -cpu max, nested SVM; the kernel command
line of harness/cmdline.py, coredump_filter=0x233) on the harness's Debian root
filesystem with systemd as PID 1 and systemd-coredump as core_pattern. Inside, as a
user would: kvmnote installed with pip into a venv, `kvmnote triage --install`. Then:

  on      Debian's QEMU (-accel kvm, -machine dump-guest-core=on) with a Linux guest,
          killed with SIGSEGV
  off     the same with dump-guest-core=off (libvirt's default)
  small   dump-guest-core=on under a coredump.conf drop-in ProcessSizeMax=48M (and
          ExternalSizeMax=48M: systemd-coredump stores up to the larger of the two)
  storm   ten test VMMs (tests/vmm, scenario long2) aborting at once

and for each crash `coredumpctl dump PID | kvmnote read --json -`, `kvmnote read --json
--coredump PID`, `kvmnote vmcore --coredump PID`. Back on the host, from the stored
cores, the reports and the journal that came back: every crash in `coredumpctl list`,
one report per crash on disk and in the journal, its registers those of the stored
core as `kvmnote read` gives them here, the storm's cores checked in full against the
VMMs (harness/checks.py).

    CI=true .venv/bin/python -m pytest tests/acceptance/test_systemd_coredump.py -s
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

from harness import REPO, checks
from harness.kernel import kernel
from harness.kvmnote_read import read as kvmnote_read
from harness.machines import qemu_available, run_qemu
from harness.rootfs import debian_rootfs
from harness.scenarios import BY_NAME
from harness.transfer import blank_disk, tar_disk, untar_disk
from harness.vmm import build_vmm
from testlib import need

sys.path.insert(0, str(Path(__file__).parent))
import qemurun  # noqa: E402  (the L2 guest's initramfs and size)

pytestmark = pytest.mark.acceptance
WORK = Path(os.environ.get("KVMNOTE_ACCEPTANCE_DIR", "/tmp/kvmnote-acceptance")) / "systemd"
CMDLINE = "root=/dev/vda rw rootfstype=ext4 init=/lib/systemd/systemd kvmnote.run"
STORM = 10
STORM_SCENARIO = "long2"
PROCESS_SIZE_MAX = "48M"
QEMU_RUNS = {"on": "on", "off": "off", "small": "on"}    # name: dump-guest-core
TIMINGS: dict[str, float] = {}

RUN_SH = r"""
set -x
O=/mnt/out I=/mnt/in
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "KVMNOTE-SD $(up) $*" > /dev/console; echo "KVMNOTE-SD $(up) $*"; }
mkdir -p $O/read $O/cores $O/reports $O/storm
cat /proc/cmdline > $O/cmdline.txt
cat /proc/sys/kernel/core_pattern > $O/core_pattern.txt
readlink /proc/1/exe > $O/init.txt
systemctl --version | head -1 > $O/systemd-version.txt
log "system up"

# kvmnote as README says: pip into a venv (no network here: the wheel built outside),
# then its one command for the triage integration.
/opt/kvmnote/bin/pip install -q --no-index --no-deps $I/kvmnote-*.whl
export PATH=/opt/kvmnote/bin:$PATH
kvmnote triage --install > $O/install.txt 2>&1; echo $? >> $O/install.txt
systemctl is-active kvmnote-triage.service > $O/triage-active.txt 2>&1
log "kvmnote installed"

nreports() { ls /var/lib/kvmnote/reports/*.json 2>/dev/null | wc -l; }
wait_reports() {  # $1 = how many in all
    for i in $(seq 1200); do [ "$(nreports)" -ge "$1" ] && return 0; sleep 0.5; done
    log "only $(nreports) of $1 reports after 600 s"
}
qemu() {  # $1 = name, $2 = dump-guest-core: the guest up, then kill -SEGV
    for attempt in 1 2 3; do
        rm -f $O/$1.guest.log
        qemu-system-x86_64 -accel kvm -cpu host -machine pc,dump-guest-core=$2 \
            -smp 2,sockets=2,cores=1,threads=1 -m @MIB@ -nodefaults -display none \
            -vga none -no-reboot -serial file:$O/$1.guest.log -device vmcoreinfo \
            -kernel $I/l2/bzImage -initrd $I/l2/initramfs.gz \
            -append "console=ttyS0 panic=-1 qemu_fw_cfg.ioport=12@0x510:0:1:4" \
            2> $O/$1.qemu.err &
        pid=$!
        for i in $(seq 600); do
            grep -q KVMNOTE-GUEST-READY $O/$1.guest.log 2>/dev/null && break
            sleep 0.1
        done
        grep -q KVMNOTE-GUEST-READY $O/$1.guest.log && break
        log "$1: guest not ready after 60 s (attempt $attempt)"
        kill -9 $pid; wait $pid
    done
    cat /proc/$pid/coredump_filter > $O/$1.coredump_filter
    sleep 2
    echo $pid > $O/$1.pid
    kill -SEGV $pid; wait $pid; echo $? > $O/$1.rc
    log "$1: qemu $pid killed with SIGSEGV"
}

qemu on on
wait_reports 1
log "on: report"
qemu off off
wait_reports 2
log "off: report"
mkdir -p /etc/systemd/coredump.conf.d
# systemd-coredump keeps MAX(ProcessSizeMax, ExternalSizeMax) bytes: both, to cut it.
printf '[Coredump]\nProcessSizeMax=@PSM@\nExternalSizeMax=@PSM@\n' \
    > /etc/systemd/coredump.conf.d/kvmnote-test.conf
qemu small on
wait_reports 3
rm /etc/systemd/coredump.conf.d/kvmnote-test.conf
log "small: report"

# The storm: ten VMMs at once, each in its own directory as the harness lays it out.
for i in $(seq @STORM@); do
    mkdir -p $O/storm/$i/@SCN@
    ( cd $O/storm/$i/@SCN@ && timeout 120 $I/vmm @ARGS@ --report report.json > stdout 2>&1;
      echo $? > rc ) &
done
wait
log "storm: all VMMs gone"
wait_reports $((3 + @STORM@))
log "storm: $(nreports) reports"
for i in $(seq @STORM@); do
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' \
        $O/storm/$i/@SCN@/report.json > $O/storm/$i/pid
done

# What the person on call types, for the QEMUs and two of the storm's VMMs (a python
# start is seconds under TCG).
pids="$(cat $O/on.pid $O/off.pid $O/small.pid $O/storm/1/pid $O/storm/@STORM@/pid)"
for pid in $pids; do
    coredumpctl dump $pid 2> $O/read/$pid.dump.err | kvmnote read --json - \
        > $O/read/$pid.stdin.json 2> $O/read/$pid.stdin.err
    echo $? > $O/read/$pid.stdin.rc
    kvmnote read --json --coredump $pid > $O/read/$pid.coredump.json 2> $O/read/$pid.coredump.err
    echo $? > $O/read/$pid.coredump.rc
done
for n in on off small; do
    pid=$(cat $O/$n.pid)
    kvmnote read --coredump $pid > $O/read/$pid.read.txt 2>&1
    kvmnote vmcore --coredump $pid -o /var/tmp/$pid.vmcore > $O/read/$pid.vmcore.out 2>&1
    echo $? > $O/read/$pid.vmcore.rc
    rm -f /var/tmp/$pid.vmcore
done
log "reads done"

coredumpctl --no-pager list > $O/coredumpctl-list.txt 2>&1
coredumpctl --no-pager --json=short list > $O/coredumpctl-list.json 2> $O/coredumpctl-list.err
cp -a /var/lib/systemd/coredump/. $O/cores/
cp -a /var/lib/kvmnote/reports/. $O/reports/
journalctl --no-pager -o json -t kvmnote-triage > $O/triage-journal.json
journalctl --no-pager -o short-iso -t kvmnote-triage > $O/triage-journal.txt
journalctl --no-pager -o json MESSAGE_ID=fc2e22bc6ee647b6b90729ab34a250b1 \
    --output-fields=COREDUMP_PID,COREDUMP_FILENAME,COREDUMP_TRUNCATED,COREDUMP_COMM,MESSAGE \
    > $O/coredump-journal.json
journalctl --no-pager -u kvmnote-triage.service > $O/triage-service.log
journalctl --no-pager -b -o short-monotonic > $O/journal.txt
systemctl --no-pager --failed > $O/failed-units.txt 2>&1
log "collected"
"""


def run_sh(vmm_args: list[str]) -> str:
    return (RUN_SH.replace("@MIB@", str(qemurun.GUEST_MIB)).replace("@PSM@", PROCESS_SIZE_MAX)
            .replace("@STORM@", str(STORM)).replace("@SCN@", STORM_SCENARIO)
            .replace("@ARGS@", " ".join(vmm_args)))


def wheel(dest: Path) -> Path:
    """kvmnote as a wheel of this checkout (built from a copy: no build/ left here), as
    `pip install .` builds it (setuptools from PyPI, or pip's cache)."""
    with tempfile.TemporaryDirectory() as src:
        shutil.copy(REPO / "pyproject.toml", src)
        shutil.copytree(REPO / "kvmnote", Path(src) / "kvmnote",
                        ignore=shutil.ignore_patterns("__pycache__"))
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(dest), src],
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = dest.glob("kvmnote-*.whl")
    return whl


def timed(what, fn):
    t = time.monotonic()
    r = fn()
    TIMINGS[what] = round(time.monotonic() - t, 1)
    return r


@pytest.fixture(scope="module")
def run() -> dict:
    need(qemu_available(), "qemu-system-x86_64 not installed (apt install qemu-system-x86)")
    need(os.geteuid() == 0, "not root (mmdebstrap's root mode and the kernel build cache)")
    need(Path("/usr/src/linux-source-6.12.tar.xz").exists(),
         "linux-source-6.12 not installed (apt install linux-source-6.12)")
    need(shutil.which("mmdebstrap") is not None, "mmdebstrap not installed (apt install mmdebstrap)")
    need(shutil.which("gcc") is not None, "gcc not installed (the test VMM is built static)")
    t0 = time.monotonic()
    host = timed("L1 kernel", lambda: kernel("-c", "l1"))
    guest = timed("guest kernel", lambda: kernel("-n", "--base", "guest"))
    rootfs = timed("rootfs", debian_rootfs)
    vmm = build_vmm()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    whl = timed("wheel", lambda: wheel(WORK / "wheel"))
    args = BY_NAME[STORM_SCENARIO].scenario.args
    tar_disk(WORK / "in.tar", {"run.sh": run_sh(args).encode(), "vmm": vmm, whl.name: whl,
                               "l2/bzImage": guest,
                               "l2/initramfs.gz": qemurun.guest_initramfs(WORK)})
    blank_disk(WORK / "out.img", 2 << 30)
    rc, timed_out = timed("L1 run", lambda: run_qemu(
        WORK, host, None, CMDLINE, 1500, memory=3072,
        disks=((rootfs, "snapshot"), (WORK / "in.tar", "ro"), (WORK / "out.img", "rw"))))
    console = (WORK / "console.log").read_text(errors="replace")
    assert "kvmnote-init: done" in console, \
        f"L1 run failed (rc {rc}, timed out {timed_out}):\n{console[-4000:]}"
    out = untar_disk(WORK / "out.img", WORK / "out")
    (WORK / "out.img").unlink()
    TIMINGS["total"] = round(time.monotonic() - t0, 1)
    print(f"\nsystemd-coredump acceptance in {WORK}: "
          + ", ".join(f"{k} {v} s" for k, v in TIMINGS.items()))
    print("".join(line + "\n" for line in console.splitlines() if "KVMNOTE-SD" in line))
    return {"out": out, "console": console, **load(out)}


def load(out: Path) -> dict:
    """Crashes by name (on, off, small, storm1..): pid, stored core, report, journal."""
    pids = {n: int((out / f"{n}.pid").read_text()) for n in QEMU_RUNS}
    for i in range(1, STORM + 1):
        pids[f"storm{i}"] = int((out / "storm" / str(i) / "pid").read_text())
    reports = [json.loads(p.read_text()) for p in sorted((out / "reports").glob("*.json"))]
    journal = [json.loads(line) for line in
               (out / "triage-journal.json").read_text().splitlines() if line.strip()]
    crashes = {}
    for name, pid in pids.items():
        cores = list((out / "cores").glob(f"core.*.{pid}.*"))
        crashes[name] = {
            "pid": pid,
            "cores": cores,
            "reports": [r for r in reports if r["crash"] and r["crash"]["pid"] == str(pid)],
            "journal": [e for e in journal if e.get("KVMNOTE_COREDUMP_PID") == str(pid)],
        }
    return {"crashes": crashes, "reports": reports, "journal": journal}


def the(crash: dict, what: str):
    assert len(crash[what]) == 1, f"PID {crash['pid']}: {len(crash[what])} {what}, want 1"
    return crash[what][0]


def read_json(path: Path) -> dict:
    from harness.kvmnote_read import normalise
    return normalise(json.loads(path.read_text()))


def assert_report_matches(report: dict, notes: dict) -> None:
    """The triage report's vCPUs are the core's as `kvmnote read --json` gives them."""
    assert report["core"]["pid"] == notes["core"]["pid"], (report["core"], notes["core"])
    got = {(vm["vm_index"], c["vcpu_id"]): c for vm in report["vms"] for c in vm["vcpus"]}
    want = {(v["vm_index"], v["vcpu_id"]): v for v in notes["vcpus"]}
    assert sorted(got) == sorted(want), f"vCPUs: report {sorted(got)}, core {sorted(want)}"
    assert len(report["vms"]) == len(notes["vms"])
    for key, n in want.items():
        c = got[key]
        assert c["status"] == n["status"] and c["tid"] == n["tid"], (key, c, n)
        if n.get("regs"):
            assert (int(c["rip"], 16), int(c["rsp"], 16)) == \
                (n["regs"]["rip"], n["regs"]["rsp"]), (key, c, n["regs"])
        else:
            assert "rip" not in c, (key, c)
        if n.get("exit"):
            code = n["exit"]["exit_reason"] if n["exit"]["type"] == "vmx" \
                else n["exit"]["exit_code"]
            assert int(c["exit"]["code"], 16) == code, (key, c["exit"], n["exit"])


def host_read(core: Path) -> dict:
    r = kvmnote_read(core)
    assert r.rc == 0, f"kvmnote read --json {core} (on the host): rc {r.rc}\n{r.text[-2000:]}"
    return r.data


def test_systemd_coredump_catches_the_cores(run: dict) -> None:
    out = run["out"]
    assert (out / "init.txt").read_text().strip().endswith("/systemd")
    assert (out / "core_pattern.txt").read_text().startswith("|/lib/systemd/systemd-coredump")
    # the harness's host "configured for it": coredump_filter bit 9, inherited by QEMU
    assert "coredump_filter=0x233" in (out / "cmdline.txt").read_text().split()
    for name in QEMU_RUNS:
        assert int((out / f"{name}.coredump_filter").read_text(), 16) == 0x233, name
        assert int((out / f"{name}.rc").read_text()) == 128 + 11, name   # SIGSEGV
    listed = {e["pid"]: e for e in json.loads((out / "coredumpctl-list.json").read_text())}
    print((out / "coredumpctl-list.txt").read_text())
    for name, c in run["crashes"].items():
        assert c["pid"] in listed, f"{name} (PID {c['pid']}) not in coredumpctl list"
        assert listed[c["pid"]]["corefile"] == ("truncated" if name == "small" else "present"), \
            (name, listed[c["pid"]])
        assert the(c, "cores").name.endswith(".zst"), c["cores"]


def test_triage_service_installed_by_one_command(run: dict) -> None:
    out = run["out"]
    assert (out / "install.txt").read_text().splitlines()[-1] == "0", \
        (out / "install.txt").read_text()
    assert (out / "triage-active.txt").read_text().strip() == "active"


def test_one_report_per_crash_on_disk_and_in_the_journal(run: dict) -> None:
    assert len(run["reports"]) == len(run["crashes"]) == 3 + STORM, \
        [r["crash"]["pid"] for r in run["reports"]]
    assert len(run["journal"]) == len(run["crashes"])
    reports = run["out"] / "reports"
    for name, c in run["crashes"].items():
        rep, entry = the(c, "reports"), the(c, "journal")
        txt = reports / Path(entry["KVMNOTE_REPORT"]).name
        assert entry["KVMNOTE_REPORT"].startswith("/var/lib/kvmnote/reports/"), entry
        assert entry["MESSAGE"] + "\n" == txt.read_text(), name
        assert txt.with_suffix(".json").exists()
        assert rep["schema"] == "kvmnote-triage/1" and rep["core"]["signal"] in (6, 11), rep
    print("\n--- a report in the journal (journalctl -t kvmnote-triage -o short-iso):\n"
          + "\n".join(line for line in (run["out"] / "triage-journal.txt").read_text()
                      .splitlines()[:6]))


@pytest.mark.parametrize("name", [*QEMU_RUNS, "storm1", f"storm{STORM}"])
def test_report_registers_are_the_stored_cores(run: dict, name: str) -> None:
    c = run["crashes"][name]
    notes = host_read(the(c, "cores"))
    assert notes["vcpus"], f"{name}: no vCPU notes in the stored core"
    assert_report_matches(the(c, "reports"), notes)
    # what the person on call typed inside, through coredumpctl: the same registers
    rd = run["out"] / "read"
    for how in ("stdin", "coredump"):
        assert (rd / f"{c['pid']}.{how}.rc").read_text().strip() == "0", \
            (rd / f"{c['pid']}.{how}.err").read_text()
        inside = read_json(rd / f"{c['pid']}.{how}.json")
        assert inside["vcpus"] == notes["vcpus"], how
        assert [{k: v for k, v in vm.items() if k != "guest_ram"} for vm in inside["vms"]] \
            == [{k: v for k, v in vm.items() if k != "guest_ram"} for vm in notes["vms"]], how


def test_the_comparison_catches_a_wrong_register(run: dict) -> None:
    """The check above can fail: one RIP off by one in a copy of a report."""
    c = run["crashes"]["on"]
    rep = json.loads(json.dumps(the(c, "reports")))
    cpu = rep["vms"][0]["vcpus"][0]
    cpu["rip"] = hex(int(cpu["rip"], 16) + 1)
    with pytest.raises(AssertionError):
        assert_report_matches(rep, host_read(the(c, "cores")))


def test_guest_ram_in_the_on_core(run: dict) -> None:
    c = run["crashes"]["on"]
    rep = the(c, "reports")
    (vm,) = rep["vms"]
    assert vm["guest_kernel"] and vm["guest_kernel"].startswith("6.12"), vm
    assert not vm["guest_ram"]["excluded"] and not vm["guest_ram"]["cut_off"], vm
    assert len(vm["vcpus"]) == 2 and all("rip" in cpu for cpu in vm["vcpus"])
    rd = run["out"] / "read"
    assert (rd / f"{c['pid']}.vmcore.rc").read_text().strip() == "0", \
        (rd / f"{c['pid']}.vmcore.out").read_text()


def test_dump_guest_core_off_says_guest_ram_was_excluded(run: dict) -> None:
    c = run["crashes"]["off"]
    rep = the(c, "reports")
    (vm,) = rep["vms"]
    assert vm["guest_ram"]["excluded"] >= qemurun.GUEST_MIB << 20, vm["guest_ram"]
    assert all("rip" in cpu for cpu in vm["vcpus"]) and len(vm["vcpus"]) == 2
    said = [m for m in rep["missing"] if "excluded" in m]
    assert said and "dump-guest-core=on" in said[0] and "dumpCore='on'" in said[0], rep["missing"]
    assert not [m for m in rep["missing"] if "cut off" in m or "truncated" in m], rep["missing"]
    rd = run["out"] / "read"
    vmcore = (rd / f"{c['pid']}.vmcore.out").read_text()
    print(f"\nkvmnote vmcore --coredump {c['pid']} (dump-guest-core=off):\n{vmcore}")
    assert "dump-guest-core=on" in vmcore and "excluded" in vmcore, vmcore
    assert "truncated" not in vmcore and "cut off" not in vmcore, vmcore
    summary = (rd / f"{c['pid']}.read.txt").read_text()
    assert "excluded" in summary and "dump-guest-core=on" in summary, summary[:3000]


def test_process_size_max_keeps_every_register(run: dict) -> None:
    c = run["crashes"]["small"]
    entries = [json.loads(line) for line in
               (run["out"] / "coredump-journal.json").read_text().splitlines() if line.strip()]
    (entry,) = [e for e in entries if e.get("COREDUMP_PID") == str(c["pid"])]
    assert entry.get("COREDUMP_TRUNCATED") in ("1", "yes"), entry
    core = the(c, "cores")
    raw = zstandard.ZstdDecompressor().stream_reader(open(core, "rb")).read()
    assert len(raw) == 48 << 20, len(raw)       # cut at ProcessSizeMax
    notes = host_read(core)
    full = host_read(the(run["crashes"]["on"], "cores"))
    assert [v["vcpu_id"] for v in notes["vcpus"]] == [0, 1]
    for v, w in zip(notes["vcpus"], full["vcpus"]):
        assert v["status"] == ["valid"] and v["error"] is None, v
        assert sorted(k for k in v if v[k] is not None) == \
            sorted(k for k in w if w[k] is not None), "records differ from an uncut core"
    rep = the(c, "reports")
    assert_report_matches(rep, notes)
    # the report says the core was cut, from systemd-coredump's COREDUMP_TRUNCATED (how
    # much guest RAM is gone it cannot say without decompressing the core to its end)
    assert any("systemd-coredump" in m and "size limit" in m for m in rep["missing"]), \
        rep["missing"]
    rd = run["out"] / "read"
    vmcore = (rd / f"{c['pid']}.vmcore.out").read_text()
    print(f"\nkvmnote vmcore --coredump {c['pid']} (ProcessSizeMax={PROCESS_SIZE_MAX}):\n"
          f"{vmcore}")
    assert (rd / f"{c['pid']}.vmcore.rc").read_text().strip() == "1", vmcore
    ranges = re.findall(r"0x[0-9a-f]+-0x[0-9a-f]+", vmcore)
    assert ranges and "cut off" in vmcore, vmcore


def storm_boot(out: Path, i: int, core: Path, work: Path) -> SimpleNamespace:
    """Storm VMM i as harness/checks.py takes a machine's run: its files under
    OUT/storm/I/<scenario>/, its core the stored one, decompressed."""
    d = out / "storm" / str(i) / STORM_SCENARIO
    raw = work / str(i) / STORM_SCENARIO / "core"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with open(core, "rb") as src, open(raw, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    files = {f"{STORM_SCENARIO}/{p.name}": p.read_bytes() for p in d.iterdir()}
    return SimpleNamespace(
        backend="svm", vendor="svm", variant="l1", file=lambda s, n=None: files.get(
            s if n is None else f"{s}/{n}"),
        path=lambda s, n: raw.parent / n, context=lambda n=60: f"storm VMM {i} in {d}",
        scenario_log=lambda s: (d / "stdout").read_text(errors="replace"))


def test_crash_storm_ten_reports_ten_intact_cores(run: dict, tmp_path: Path) -> None:
    for i in range(1, STORM + 1):
        c = run["crashes"][f"storm{i}"]
        boot = storm_boot(run["out"], i, the(c, "cores"), tmp_path)
        notes = checks.check_positive(boot, STORM_SCENARIO)     # the whole core, checked
        assert_report_matches(the(c, "reports"), notes)
