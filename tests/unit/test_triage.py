"""`kvmnote triage`: the short report, and the systemd-coredump follower with stand-in
journalctl and coredumpctl (tests/unit/fakebin) and a test socket as the journal."""

import hashlib
import json
import os
import shlex
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import zstandard

import corebuilder as cb
from kvmnote import schema as S, triage
from kvmnote.cli import main
from kvmnote.errors import KvmnoteError
from test_vmcore import INFO, dontdump_core, info_note, make_core, vcpu

FAKEBIN = Path(__file__).resolve().parent / "fakebin"
FIELDS = ("--output-fields=MESSAGE_ID,COREDUMP_PID,COREDUMP_UID,COREDUMP_SIGNAL,COREDUMP_COMM,"
          "COREDUMP_EXE,COREDUMP_TIMESTAMP,COREDUMP_FILENAME,COREDUMP_TRUNCATED,COREDUMP_UNIT,"
          "COREDUMP_PROC_MAPS")


def test_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v0, v1 = vcpu(0), vcpu(1, status=S.KVM_CORE_VCPU_UNREADABLE)
    make_core(tmp_path / "core", vcpus=[v0, v1], ram={0x9000: info_note(INFO)})
    assert main(["triage", "--json", str(tmp_path / "core")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "kvmnote-triage/1"
    (vm,) = doc["vms"]
    assert vm["guest_kernel"] == "6.12.0-test"
    c0, c1 = vm["vcpus"]
    assert c0 == {"vcpu_id": 0, "status": ["valid"], "error": None, "tid": 5000,
                  "mode": "long 64-bit", "cpl": 0, "rip": f"{v0['regs']['rip']:#x}",
                  "rsp": f"{v0['regs']['rsp']:#x}",
                  "exit": {"type": "vmx", "reason": "HLT", "code": "0xc"}}
    assert c1["status"] == ["unreadable"] and c1["error"] == "busy" and "rip" not in c1
    assert doc["missing"] == ["VM 0: vCPU 1 has no registers (status unreadable, error busy)"]
    assert main(["triage", str(tmp_path / "core")]) == 0
    out = capsys.readouterr().out
    assert "guest kernel 6.12.0-test" in out
    assert f"vCPU 0: long 64-bit CPL 0, RIP {v0['regs']['rip']:#x}, RSP " \
           f"{v0['regs']['rsp']:#x}, last exit HLT (0xc), status valid" in out


def test_report_dontdump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dontdump_core(tmp_path / "core")
    assert main(["triage", "--json", str(tmp_path / "core")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vms"][0]["guest_kernel"] is None
    assert any("excluded from the core by the VMM" in m and "dump-guest-core=on" in m
               for m in doc["missing"])
    assert all("rip" in c for c in doc["vms"][0]["vcpus"])


class Journal:
    """A datagram socket standing in for journald's, read by a thread."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.entries: list[dict[str, str]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                self.entries.append(self._parse(self.sock.recv(1 << 20)))
            except socket.timeout:
                pass

    @staticmethod
    def _parse(msg: bytes) -> dict[str, str]:
        """journald's native protocol, binary form only (what kvmnote sends)."""
        out, pos = {}, 0
        while pos < len(msg):
            nl = msg.index(b"\n", pos)
            key = msg[pos:nl].decode()
            n = int.from_bytes(msg[nl + 1:nl + 9], "little")
            out[key] = msg[nl + 9:nl + 9 + n].decode()
            assert msg[nl + 9 + n:nl + 10 + n] == b"\n"
            pos = nl + 10 + n
        return out

    def close(self) -> list[dict[str, str]]:
        self.stop = True
        self.thread.join()
        self.sock.close()
        return self.entries


def coredump_entry(i: int, pid: int, filename: Path | None) -> dict[str, Any]:
    """systemd-coredump's journal entry as `journalctl --output=json` prints it."""
    e = {"__CURSOR": f"s=abc;i={i}", "__REALTIME_TIMESTAMP": str(1700000000000000 + i),
         "MESSAGE_ID": triage.COREDUMP_MESSAGE_ID, "COREDUMP_PID": str(pid),
         "COREDUMP_COMM": "qemu-system-x86", "COREDUMP_EXE": "/usr/bin/qemu-system-x86_64",
         "COREDUMP_SIGNAL": "11", "COREDUMP_ENVIRON": "SECRET=1",
         "MESSAGE": f"Process {pid} (qemu-system-x86) of user 0 dumped core."}
    if filename:
        e["COREDUMP_FILENAME"] = str(filename)
    return e


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_crash_storm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten VMMs crash at once (nine cores on disk, zstd-compressed as systemd-coredump
    stores them, one in the journal), and a process that is no VMM: ten reports, ten
    journal entries, the cores untouched; a restart resumes after the saved cursor."""
    entries, cores, journal_core = [], {}, None
    for i in range(10):
        make_core(tmp_path / "raw", vcpus=[vcpu(0), vcpu(i % 3 + 1)],
                  ram={0x9000: info_note(INFO)})
        path = tmp_path / f"core.qemu.{1000 + i}.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "raw").read_bytes()))
        if i == 7:                   # Storage=journal: only coredumpctl dump has it
            journal_core = tmp_path / "journal-core"
            (tmp_path / "raw").rename(journal_core)
            entries.append(coredump_entry(i, 1000 + i, None))
            continue
        cores[path] = sha(path)
        entries.append(coredump_entry(i, 1000 + i, path))
    cb.write_core(tmp_path / "bash.core", cb.prstatus(1) + cb.prpsinfo(1, "bash"), [])
    entries.insert(3, coredump_entry(99, 99, tmp_path / "bash.core"))
    (tmp_path / "journal.json").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (tmp_path / "dumps.json").write_text(json.dumps([
        {"time": 1, "pid": 1007, "comm": "qemu-system-x86", "exe": "/usr/bin/qemu-system-x86_64",
         "sig": 11, "corefile": "journal", "file": str(journal_core)}]))
    monkeypatch.setenv("PATH", f"{FAKEBIN}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_JOURNAL", str(tmp_path / "journal.json"))
    monkeypatch.setenv("FAKE_JOURNALCTL_LOG", str(tmp_path / "journalctl.log"))
    monkeypatch.setenv("FAKE_COREDUMPS", str(tmp_path / "dumps.json"))
    monkeypatch.setenv("FAKE_COREDUMPCTL_LOG", str(tmp_path / "coredumpctl.log"))
    monkeypatch.setenv("KVMNOTE_JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    journal = Journal(tmp_path / "journal.sock")
    try:
        assert triage.follow(str(tmp_path / "reports"), str(tmp_path / "state")) == 0
    finally:
        sent = journal.close()
    reports = sorted((tmp_path / "reports").iterdir())
    assert len(reports) == 20                               # .json and .txt, ten crashes
    docs = [json.loads(p.read_text()) for p in reports if p.suffix == ".json"]
    assert sorted(d["crash"]["pid"] for d in docs) == [str(1000 + i) for i in range(10)]
    for d in docs:
        i = int(d["crash"]["pid"]) - 1000
        assert [c["vcpu_id"] for c in d["vms"][0]["vcpus"]] == [0, i % 3 + 1]
        assert d["vms"][0]["guest_kernel"] == "6.12.0-test"
        assert "environ" not in d["crash"]
    assert sorted(e["KVMNOTE_COREDUMP_PID"] for e in sent) == [str(1000 + i) for i in range(10)]
    for e in sent:
        assert e["SYSLOG_IDENTIFIER"] == "kvmnote-triage"
        assert e["MESSAGE"] + "\n" == Path(e["KVMNOTE_REPORT"]).read_text()
    assert {p: sha(p) for p in cores} == cores                # cores untouched
    assert (tmp_path / "state" / "cursor").read_text() == "s=abc;i=9"
    log = [json.loads(ln) for ln in (tmp_path / "journalctl.log").read_text().splitlines()]
    assert log == [["--follow", "--output=json", "--all", FIELDS, "--no-pager", "--lines=0",
                    f"MESSAGE_ID={triage.COREDUMP_MESSAGE_ID}"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("kvmnote-")]  # no copies
    # a restart goes on after the last entry handled: nothing new, nothing redone
    triage.follow(str(tmp_path / "reports"), str(tmp_path / "state"))
    assert len(list((tmp_path / "reports").iterdir())) == 20
    log = [json.loads(ln) for ln in (tmp_path / "journalctl.log").read_text().splitlines()]
    assert log[1][5] == "--after-cursor=s=abc;i=9"


def test_optional_vmcore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_core(tmp_path / "core", ram={0x9000: info_note(INFO)})
    entry = coredump_entry(1, 4242, tmp_path / "core")
    monkeypatch.setenv("KVMNOTE_JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    journal = Journal(tmp_path / "journal.sock")
    try:
        base = triage.handle(entry, str(tmp_path / "r"), with_vmcore=True)
    finally:
        assert len(journal.close()) == 1
    assert base is not None
    doc = json.loads(Path(base + ".json").read_text())
    assert doc["vmcore"] == base + ".vmcore" and Path(base + ".vmcore").stat().st_size > 0


def fake_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 entries: list[dict[str, Any]]) -> Path:
    """The fake journalctl on PATH, its journal holding `entries`."""
    journal = tmp_path / "journal.json"
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    monkeypatch.setenv("PATH", f"{FAKEBIN}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_JOURNAL", str(journal))
    monkeypatch.setenv("FAKE_JOURNALCTL_LOG", str(tmp_path / "journalctl.log"))
    return journal


def test_install_writes_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_journal(tmp_path, monkeypatch, [])
    path = triage.install(str(tmp_path), systemctl=False, state=str(tmp_path / "state"))
    text = Path(path).read_text()
    assert Path(path).name == "kvmnote-triage.service"
    exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_line.endswith(" triage --follow")
    assert "Environment=KVMNOTE_TRIAGE_VMCORE=0" in text and "WantedBy=multi-user.target" in text
    # what the unit runs is this kvmnote: it answers --version
    p = subprocess.run([*shlex.split(exec_line.removeprefix("ExecStart="))[:-2], "--version"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("kvmnote ")


def test_install_cannot_write_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(KvmnoteError, match="cannot write: No such file or directory"):
        triage.install(str(tmp_path / "nonexistent"), systemctl=False,
                       state=str(tmp_path / "state"))


def test_install_starts_at_the_journal_tail(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A VMM that crashes right after `kvmnote triage --install`, before the service has
    started reading the journal, still gets its report (seen under systemd: a first start
    reading "from now on" misses it); a crash from before the install gets none."""
    for i in (1, 2):
        make_core(tmp_path / f"core{i}", ram={0x9000: info_note(INFO)})
    before = coredump_entry(1, 4241, tmp_path / "core1")
    journal = fake_journal(tmp_path, monkeypatch, [before])
    triage.install(str(tmp_path), systemctl=False, state=str(tmp_path / "state"))
    assert (tmp_path / "state" / "cursor").read_text() == before["__CURSOR"]
    after = coredump_entry(2, 4242, tmp_path / "core2")
    with open(journal, "a") as f:
        f.write(json.dumps(after) + "\n")
    monkeypatch.setenv("KVMNOTE_JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    sink = Journal(tmp_path / "journal.sock")
    try:
        triage.follow(str(tmp_path / "reports"), str(tmp_path / "state"))
    finally:
        sent = sink.close()
    assert [e["KVMNOTE_COREDUMP_PID"] for e in sent] == ["4242"]
    docs = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json")]
    assert [d["crash"]["pid"] for d in docs] == ["4242"]
    # an earlier install's cursor is kept: a reinstall resumes, skipping nothing
    triage.install(str(tmp_path), systemctl=False, state=str(tmp_path / "state"))
    assert (tmp_path / "state" / "cursor").read_text() == after["__CURSOR"]


def test_vmm_without_stored_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage=none: no core to read; the VMM is known by the vCPU mappings in the maps
    systemd-coredump logs, and the report says the core is missing and why."""
    (tmp_path / "dumps.json").write_text("[]")
    monkeypatch.setenv("PATH", f"{FAKEBIN}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_COREDUMPS", str(tmp_path / "dumps.json"))
    monkeypatch.setenv("FAKE_COREDUMPCTL_LOG", str(tmp_path / "coredumpctl.log"))
    monkeypatch.setenv("KVMNOTE_JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    vmm = coredump_entry(1, 4242, None)
    vmm["COREDUMP_PROC_MAPS"] = ("7f0000000000-7f0000003000 rw-s 00000000 00:0e 1234 "
                                 "anon_inode:kvm-vcpu:0\n")
    other = coredump_entry(2, 77, None)
    journal = Journal(tmp_path / "journal.sock")
    try:
        base = triage.handle(vmm, str(tmp_path / "r"), with_vmcore=False)
        assert triage.handle(other, str(tmp_path / "r"), with_vmcore=False) is None
    finally:
        sent = journal.close()
    assert base is not None and len(sent) == 1 and sent[0]["KVMNOTE_COREDUMP_PID"] == "4242"
    doc = json.loads(Path(base + ".json").read_text())
    assert doc["vms"] == [] and doc["crash"]["pid"] == "4242"
    assert doc["missing"] == ["no core stored for this crash (core dump of PID 4242 "
                              "(/usr/bin/qemu-system-x86_64): coredumpctl dump 4242 wrote "
                              "nothing (No coredumps found.)); see Storage= and the size "
                              "limits in coredump.conf(5)"]


def test_huge_report_fits_one_journal_entry(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A report longer than one journal datagram holds (here: 64 vCPUs against a 4 KiB
    limit): the journal gets one entry, cut, pointing at the file; the file has it all."""
    monkeypatch.setattr(triage, "JOURNAL_MESSAGE_MAX", 4096)
    make_core(tmp_path / "core", vcpus=[vcpu(i) for i in range(64)])
    monkeypatch.setenv("KVMNOTE_JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    journal = Journal(tmp_path / "journal.sock")
    try:
        base = triage.handle(coredump_entry(1, 4242, tmp_path / "core"), str(tmp_path / "r"),
                             with_vmcore=False)
    finally:
        sent = journal.close()
    whole = Path(f"{base}.txt").read_text()
    assert whole.count("\n  vCPU ") == 64 and len(whole) > 4096
    (entry,) = sent
    assert entry["MESSAGE"].endswith(f"... (the whole report: {base}.txt)")
    assert whole.startswith(entry["MESSAGE"].rsplit("\n", 1)[0])
