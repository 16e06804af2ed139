"""`kvmnote triage`: what every vCPU of a crashed VMM was doing, as a short report; and
the automatic triage of systemd-coredump's crashes.

The automatic part follows the journal: `kvmnote triage --follow` reads systemd-coredump's
entries (MESSAGE_ID fc2e22bc6ee647b6b90729ab34a250b1) from `journalctl --follow`, and for
each one whose core has KVM notes writes REPORTS/<time>-<pid>-<comm>.txt and .json and one
journal entry (SYSLOG_IDENTIFIER=kvmnote-triage, KVMNOTE_COREDUMP_PID=<pid>). It runs after
systemd-coredump has stored the core and only reads it, so it can neither delay nor alter
it; entries are handled one by one in journal order, so a crash storm gives one report
per crash; the journal cursor of the last handled entry is kept in STATE/cursor, so a
restart goes on where it stopped.
"""

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import decode as D
from . import report, sources, vmcore
from .core import Core, EXCLUDED_FIX, EXCLUDED_WHY, TRUNCATED_WHY, open_core
from .errors import KvmnoteError, NoKvmNotesError

SCHEMA = "kvmnote-triage/1"
COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"     # systemd's SD_MESSAGE_COREDUMP
TRIAGE_MESSAGE_ID = "5c4f2a0e8b1d4b7e9a3c6d2f1e0b7a94"       # kvmnote's own, for journalctl
REPORTS = "/var/lib/kvmnote/reports"
STATE = "/var/lib/kvmnote"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Longest MESSAGE sent: one datagram must fit the socket's buffer (net.core.wmem_default,
# 208 KiB); a report of some 800 vCPUs or more is cut here, whole in its .txt file.
JOURNAL_MESSAGE_MAX = 128 << 10
# Guest RAM searched for VMCOREINFO (Linux allocates it early, in low memory).
VMCOREINFO_SEARCH = 4 << 30
# systemd-coredump's fields copied into the report (not ENVIRON, PROC_MAPS... )
CRASH_FIELDS = ("PID", "UID", "SIGNAL", "COMM", "EXE", "TIMESTAMP", "FILENAME", "TRUNCATED",
                "UNIT")
UNIT = "kvmnote-triage.service"
UNIT_TEXT = """\
[Unit]
Description=kvmnote: triage report of every crashed KVM VMM (systemd-coredump)
Documentation=https://github.com/kvmnote/kvmnote/blob/main/README.md
After=systemd-journald.service

[Service]
# Set KVMNOTE_TRIAGE_VMCORE=1 (systemctl edit {unit}) to write the guest vmcore too.
Environment=KVMNOTE_TRIAGE_VMCORE=0
ExecStart={exec} triage --follow
Restart=always
RestartSec=5
Nice=10
IOSchedulingClass=idle
StateDirectory=kvmnote

[Install]
WantedBy=multi-user.target
"""


def _h(value: int) -> str:
    return f"{value:#x}"


def triage(core: Core, crash: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kvmnote-triage/1 report of an opened core (`crash`: its journal entry)."""
    missing: list[str] = list(core.warnings)
    vms = []
    by_vm: dict[int, list[Any]] = {}
    for v in core.vcpus:
        by_vm.setdefault(v.vm_index, []).append(v)
    for vm in core.vms:
        ram = core.guest_ram(vm)
        if ram["excluded"]:
            missing.append(f"VM {vm.vm_index}: {ram['excluded']} bytes of guest RAM "
                           f"{EXCLUDED_WHY}; {EXCLUDED_FIX}")
        if ram["cut_off"]:
            missing.append(f"VM {vm.vm_index}: {ram['cut_off']} bytes of guest RAM cut off "
                           f"({TRUNCATED_WHY})")
        if ram["unmapped"]:
            missing.append(f"VM {vm.vm_index}: {ram['unmapped']} bytes of guest RAM in no "
                           f"PT_LOAD")
        release = None
        try:
            info = vmcore.find_vmcoreinfo(core, vm, VMCOREINFO_SEARCH) if ram["dumped"] \
                else None
        except KvmnoteError as e:
            info = None
            missing.append(f"VM {vm.vm_index}: guest RAM unreadable: {e}")
        if info is not None:
            first = info.split(b"\n", 1)[0]
            release = first.removeprefix(b"OSRELEASE=").decode(errors="replace")
        else:
            missing.append(f"VM {vm.vm_index}: no VMCOREINFO in guest RAM, so no guest "
                           f"kernel release (not a Linux guest, or its RAM is not in the core)")
        cpus = []
        for v in sorted(by_vm.get(vm.vm_index, []), key=lambda v: v.vcpu_id):
            j = report.vcpu_json(v, report.as_is)
            cpu: dict[str, Any] = {"vcpu_id": v.vcpu_id, "status": j["status"],
                                   "error": j["error"], "tid": j["tid"]}
            if "regs" in j and "sregs" in j:
                mode, cpl = D.cpu_mode(j["sregs"], j["regs"]["rflags"])
                cpu.update(mode=mode, cpl=cpl, rip=_h(j["regs"]["rip"]),
                           rsp=_h(j["regs"]["rsp"]))
            else:
                missing.append(f"VM {vm.vm_index}: vCPU {v.vcpu_id} has no registers "
                               f"(status {','.join(j['status']) or '-'}"
                               f"{', error ' + j['error'] if j['error'] else ''})")
            if j.get("guest_mode"):         # the registers above are the nested guest's
                cpu["guest_mode"] = True
                if "l1" in j:
                    mode, cpl = D.cpu_mode(j["l1"]["sregs"], j["l1"]["regs"]["rflags"])
                    cpu["l1"] = {"mode": mode, "cpl": cpl, "rip": _h(j["l1"]["regs"]["rip"]),
                                 "rsp": _h(j["l1"]["regs"]["rsp"])}
            if "exit" in j:
                e = j["exit"]
                code = e["exit_reason"] if e["type"] == "vmx" else e["exit_code"]
                cpu["exit"] = {"type": e["type"], "reason": e["reason_name"], "code": _h(code)}
            cpus.append(cpu)
        vms.append({"vm_index": vm.vm_index, "vendor": D.vendor(vm.info["vendor"]),
                    "nr_vcpus": vm.info["nr_vcpus"], "guest_kernel": release,
                    "guest_ram": ram, "vcpus": cpus})
    if crash and crash.get("COREDUMP_TRUNCATED") in ("1", "yes", "true"):
        missing.append(f"systemd-coredump cut the core at its size limit ({TRUNCATED_WHY})")
    return {"schema": SCHEMA,
            "core": {"path": core.path, "pid": core.pid, "comm": core.comm,
                     "signal": report.signal(core)},
            "crash": {k.lower(): crash[f"COREDUMP_{k}"] for k in CRASH_FIELDS
                      if crash.get(f"COREDUMP_{k}")} if crash else None,
            "vms": vms, "missing": missing, "vmcore": None}


def text(doc: dict[str, Any]) -> str:
    """The report for people."""
    c = doc["core"]
    out = [f"kvmnote triage: {c['comm']} (pid {c['pid']}) died of signal {c['signal']}; "
           f"core {c['path']}"]
    for vm in doc["vms"]:
        out.append(f"VM {vm['vm_index']} ({vm['vendor']}, {vm['nr_vcpus']} vCPUs), guest "
                   f"kernel {vm['guest_kernel'] or 'unknown'}")
        for cpu in vm["vcpus"]:
            line = f"  vCPU {cpu['vcpu_id']}: "
            if cpu.get("guest_mode"):
                line += "in a nested guest (L2): "
            if "rip" in cpu:
                line += f"{cpu['mode']} CPL {cpu['cpl']}, RIP {cpu['rip']}, RSP {cpu['rsp']}"
            else:
                line += "no registers"
            if "exit" in cpu:
                line += f", last exit {cpu['exit']['reason']} ({cpu['exit']['code']})" \
                    + (" to KVM" if cpu.get("guest_mode") else "")
            if "l1" in cpu:
                a = cpu["l1"]
                line += (f"; its hypervisor (L1) at the nested VM exit: {a['mode']} CPL "
                         f"{a['cpl']}, RIP {a['rip']}, RSP {a['rsp']}")
            line += f", status {' '.join(cpu['status']) or '-'}"
            if cpu["error"]:
                line += f", error {cpu['error']}"
            out.append(line)
    for m in doc["missing"]:
        out.append(f"missing: {m}")
    if doc["vmcore"]:
        out.append(f"guest vmcore: {doc['vmcore']}")
    return "\n".join(out) + "\n"


# --- The journal ------------------------------------------------------------------


def journal_send(fields: dict[str, str], sock_path: str | None = None) -> None:
    """One journal entry, by journald's native protocol (binary-safe values)."""
    msg = b""
    for k, v in fields.items():
        raw = v.encode()
        msg += k.encode() + b"\n" + len(raw).to_bytes(8, "little") + raw + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg, sock_path or os.environ.get("KVMNOTE_JOURNAL_SOCKET", JOURNAL_SOCKET))


def _entries(state: str) -> Iterator[dict[str, Any]]:
    """systemd-coredump's journal entries, from after the saved cursor (or from now)."""
    cursor_file = os.path.join(state, "cursor")
    try:
        with open(cursor_file) as f:
            where = [f"--after-cursor={f.read().strip()}"]
    except FileNotFoundError:
        where = ["--lines=0"]           # first start: crashes from now on
    # --all: PROC_MAPS is longer than the 4096 bytes journalctl prints by default; and
    # only these fields, not the core itself (COREDUMP, with Storage=journal)
    fields = ",".join(["MESSAGE_ID", *(f"COREDUMP_{k}" for k in (*CRASH_FIELDS, "PROC_MAPS"))])
    cmd = ["journalctl", "--follow", "--output=json", "--all", f"--output-fields={fields}",
           "--no-pager", *where, f"MESSAGE_ID={COREDUMP_MESSAGE_ID}"]
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    except FileNotFoundError:
        raise KvmnoteError("journalctl not found (kvmnote triage --follow needs systemd's "
                           "journal)") from None
    assert p.stdout is not None
    for line in p.stdout:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield entry
    p.wait()


def _save_cursor(state: str, cursor: str) -> None:
    tmp = os.path.join(state, "cursor.tmp")
    with open(tmp, "w") as f:
        f.write(cursor)
    os.replace(tmp, os.path.join(state, "cursor"))


def _field(entry: dict[str, Any], key: str) -> str:
    """A journal field as text (journalctl --output=json gives lists for repeated fields
    and byte arrays for binary ones)."""
    v = entry.get(key)
    if isinstance(v, list):
        v = bytes(x for x in v if isinstance(x, int)).decode(errors="replace") \
            if all(isinstance(x, int) for x in v) else v[0]
    return "" if v is None else str(v)


def handle(entry: dict[str, Any], reports: str, with_vmcore: bool) -> str | None:
    """Triage one systemd-coredump entry; return the report's base path, or None when the
    core has no KVM notes (not a VMM)."""
    crash = {k: _field(entry, k) for k in entry if k.startswith("COREDUMP_") and k != "COREDUMP"}
    pid, comm = crash.get("COREDUMP_PID", "0"), crash.get("COREDUMP_COMM", "unknown")
    ts = _field(entry, "__REALTIME_TIMESTAMP") or str(int(time.time() * 1e6))
    base = os.path.join(reports, f"{ts}-{pid}-{''.join(c if c.isalnum() else '_' for c in comm)}")
    filename = crash.get("COREDUMP_FILENAME")
    # systemd-coredump logs the process's /proc/PID/maps: a VMM maps its vCPUs' kvm_run
    vmm = "anon_inode:kvm-vcpu" in crash.get("COREDUMP_PROC_MAPS", "")
    os.makedirs(reports, exist_ok=True)
    tmp: int | None = None          # descriptor of the copy of a core kept in the journal
    try:
        if filename and os.path.exists(filename):
            path, name = filename, None
        else:       # stored in the journal, or not readable here: ask coredumpctl
            try:
                stream = sources.dump({"pid": pid, "exe": crash.get("COREDUMP_EXE")})
                try:
                    tmp = sources.spool(stream)
                finally:
                    if stream.on_close:
                        stream.on_close()
            except KvmnoteError as e:
                if not vmm:
                    return None      # no core to look at, and not a VMM by its maps
                return _write(base, _skeleton(crash, filename, [
                    f"no core stored for this crash ({e}); see Storage= and the size limits "
                    f"in coredump.conf(5)"]))
            path, name = f"/proc/self/fd/{tmp}", stream.name
        try:
            with open_core(path, name=name) as core:
                doc = triage(core, crash)
        except NoKvmNotesError as e:
            if not vmm and "anon_inode:kvm-vcpu" not in str(e):
                return None          # not a KVM VMM: nothing to say
            doc = _skeleton(crash, filename or name, [str(e)])
        if with_vmcore and doc["vms"]:
            out = base + ".vmcore"
            try:
                vmcore.write_vmcore(path, out, allow_partial=True, name=name,
                                    vm_index=doc["vms"][0]["vm_index"])
                doc["vmcore"] = out
            except KvmnoteError as e:
                doc["missing"].append(f"no guest vmcore: {e}")
    finally:
        if tmp is not None:
            os.close(tmp)
    return _write(base, doc)


def _skeleton(crash: dict[str, str], path: str | None, missing: list[str]) -> dict[str, Any]:
    """The report of a VMM crash whose core gives no KVM state."""
    pid = crash.get("COREDUMP_PID", "")
    return {"schema": SCHEMA,
            "core": {"path": path, "pid": int(pid) if pid.isdigit() else None,
                     "comm": crash.get("COREDUMP_COMM"), "signal": None},
            "crash": {k.lower(): crash[f"COREDUMP_{k}"] for k in CRASH_FIELDS
                      if crash.get(f"COREDUMP_{k}")},
            "vms": [], "missing": missing, "vmcore": None}


def _write(base: str, doc: dict[str, Any]) -> str:
    """The report as BASE.txt and BASE.json, and one journal entry; return BASE."""
    pid = str((doc.get("crash") or {}).get("pid") or doc["core"]["pid"])
    body = text(doc)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".txt", "w") as f:
        f.write(body)
    message = body.rstrip("\n")
    if len(message) > JOURNAL_MESSAGE_MAX:     # one datagram; the file has it all
        message = (message[:JOURNAL_MESSAGE_MAX].rsplit("\n", 1)[0]
                   + f"\n... (the whole report: {base}.txt)")
    journal_send({"MESSAGE": message, "MESSAGE_ID": TRIAGE_MESSAGE_ID,
                  "PRIORITY": "3", "SYSLOG_IDENTIFIER": "kvmnote-triage",
                  "KVMNOTE_COREDUMP_PID": pid, "KVMNOTE_REPORT": base + ".txt"})
    return base


def follow(reports: str = REPORTS, state: str = STATE) -> int:
    """Triage systemd-coredump's crashes as they come (the service's main loop)."""
    os.makedirs(state, exist_ok=True)
    with_vmcore = os.environ.get("KVMNOTE_TRIAGE_VMCORE", "0") == "1"
    for entry in _entries(state):
        try:
            base = handle(entry, reports, with_vmcore)
            if base:
                print(f"kvmnote: triage report {base}.txt", file=sys.stderr, flush=True)
        except (KvmnoteError, OSError) as e:     # one bad core must not stop the next ones
            print(f"kvmnote: triage of PID {_field(entry, 'COREDUMP_PID')} failed: {e}",
                  file=sys.stderr, flush=True)
        cursor = _field(entry, "__CURSOR")
        if cursor:
            _save_cursor(state, cursor)
    return 0


def _journal_tail() -> str | None:
    """The cursor of the journal's newest entry (None: no journal, or it is empty)."""
    try:
        p = subprocess.run(["journalctl", "--lines=1", "--output=json",
                            "--output-fields=MESSAGE_ID", "--no-pager", "--quiet"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in p.stdout.splitlines():
        try:
            cursor = json.loads(line).get("__CURSOR")
        except (ValueError, AttributeError):
            continue
        if isinstance(cursor, str) and cursor:
            return cursor
    return None


def install(prefix: str = "/etc/systemd/system", systemctl: bool = True,
            state: str = STATE) -> str:
    """Write the unit (ExecStart: this kvmnote) and enable it; return the unit's path.
    The service starts after the journal's newest entry as of now (saved as its cursor,
    unless one is kept from an earlier install): a VMM that crashes once this returns
    gets its report, however long the service then takes to start reading."""
    # the interpreter as started (a venv's python is a symlink: keep its path)
    exe = os.path.abspath(sys.argv[0]) if os.path.basename(sys.argv[0]) == "kvmnote" \
        else f"{os.path.abspath(sys.executable)} -m kvmnote"
    path = os.path.join(prefix, UNIT)
    try:
        with open(path, "w") as f:
            f.write(UNIT_TEXT.format(exec=exe, unit=UNIT))
    except OSError as e:
        raise KvmnoteError(f"{path}: cannot write: {e.strerror} (run as root)") from None
    if not os.path.exists(os.path.join(state, "cursor")):
        cursor = _journal_tail()
        if cursor:
            try:
                os.makedirs(state, exist_ok=True)
                _save_cursor(state, cursor)
            except OSError as e:
                raise KvmnoteError(f"{state}: cannot write: {e.strerror} (run as root)") \
                    from None
    if systemctl:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise KvmnoteError(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")
    return path
