"""What `kvmnote read` shows: the kvmnote-read/2 JSON document and its text form."""

from collections.abc import Callable
from typing import Any

from construct import Array, Construct, FormatField, Int64ul, Pointer, Renamed, Struct

from . import decode as D
from . import nested as N
from . import schema as S
from .core import EXCLUDED_FIX, EXCLUDED_WHY, TRUNCATED_WHY, Core
from .notes import Vcpu, Vm

SCHEMA = "kvmnote-read/2"
OMIT = frozenset({"reserved", "reserved2", "padding", "pad"})


def _clean(obj: Any) -> Any:
    """Drop reserved/padding fields, recursively."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in OMIT}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def hex64(con: Construct, value: Any) -> Any:
    """`value`, parsed with `con`, with every field `con` declares as a 64-bit integer
    written as a "0x..." string (JSON numbers lose precision above 2^53 in jq 1.6 and
    JavaScript); keys that `con` does not declare are kept as they are."""
    if isinstance(con, (Renamed, Pointer)):
        return hex64(con.subcon, value)
    if isinstance(con, Struct) and isinstance(value, dict):
        subs = {sub.name: sub for sub in con.subcons}
        return {k: hex64(subs[k], v) if k in subs else v for k, v in value.items()}
    if isinstance(con, Array) and isinstance(value, list):
        return [hex64(con.subcon, v) for v in value]
    if isinstance(con, FormatField) and con.length == 8 and isinstance(value, int):
        return f"{value:#x}"
    return value


Typed = Callable[[Construct, Any], Any]


def as_is(con: Construct, value: Any) -> Any:
    """`value` unchanged (the text report formats integers itself)."""
    return value


def vm_json(vm: Vm, h: Typed = hex64) -> dict[str, Any]:
    """A VM as kvmnote-read/2 JSON."""
    return {**_clean(h(S.kvm_core_vm, vm.info)), "vendor": D.vendor(vm.info["vendor"]),
            "flags_names": D.bits(vm.info["flags"], S.VM_FLAG_NAMES),
            "memslots": _clean([h(S.kvm_core_memslot, m) for m in vm.memslots]),
            "unknown_records": [{"type": t, "size": s} for t, s in vm.unknown_records]}


# What L1_REGS / L1_SREGS2 hold (docs/note-format.md).
L1_SOURCE = "as the nested VM exit that ends guest mode will load them"
L2_EXIT = "the nested guest's last exit to KVM, which L1 may never see"


def _levels(vcpu: Vcpu, level: int | None) -> tuple[int, bool]:
    """(level whose registers go in "regs"/"sregs", whether an "l1" object follows)."""
    if not N.guest_mode(vcpu):
        return 1, False
    return (level or 2), level is None


def nested_json(nested: dict[str, Any], h: Typed = hex64) -> dict[str, Any]:
    """The NESTED record (struct kvm_nested_state) as JSON: header, flags, L1's last
    exit from vmcs12 / vmcb12, and how L1 maps its nested guest's memory."""
    fmt = S.NESTED_FORMATS.get(nested["format"], f"unknown_{nested['format']}")
    out: dict[str, Any] = {
        "format": fmt, "flags": nested["flags"],
        "flags_names": D.bits(nested["flags"], S.NESTED_FLAG_NAMES),
        "nested_run_pending": bool(nested["flags"] & S.KVM_STATE_NESTED_RUN_PENDING),
        "size": nested["size"], "data_hex": nested["data"].hex()}
    if "vmx" in nested:
        hdr = nested["vmx"]
        out["vmx"] = {**_clean(h(S.kvm_vmx_nested_state_hdr, hdr)),
                      "smm_flags_names": D.bits(hdr["smm"]["flags"],
                                                S.NESTED_SMM_FLAG_NAMES)}
        out["shadow_vmcs12"] = len(nested["data"]) >= 2 * S.KVM_STATE_NESTED_VMX_VMCS_SIZE
    if "svm" in nested:
        out["svm"] = h(S.kvm_svm_nested_state_hdr, nested["svm"])
    v = N.vmcs12(nested)
    if v is not None:
        out["vmcs12"] = h(S.vmcs12, v)
        out["l1_last_exit"] = {
            "source": "vmcs12", "exit_reason": v["vm_exit_reason"],
            "reason_name": D.vmx_exit_reason(v["vm_exit_reason"]),
            "exit_qualification": h(Int64ul, v["exit_qualification"]),
            "guest_physical_address": h(Int64ul, v["guest_physical_address"])}
    c = N.vmcb12(nested)
    if c is not None:
        ctl, save = c
        out["vmcb12"] = {"control": h(S.vmcb_control, ctl), "save_l1": h(S.vmcb_save, save)}
        out["l1_last_exit"] = {
            "source": "vmcb12", "exit_code": h(Int64ul, ctl["exit_code"]),
            "reason_name": D.svm_exit_code(ctl["exit_code"]),
            "exit_info_1": h(Int64ul, ctl["exit_info_1"]),
            "exit_info_2": h(Int64ul, ctl["exit_info_2"])}
    p = N.paging(nested)
    if p is not None:
        out["nested_paging"] = {**p, "root": h(Int64ul, p["root"])}
    return out


def vcpu_json(vcpu: Vcpu, h: Typed = hex64, level: int | None = None) -> dict[str, Any]:
    """A vCPU as kvmnote-read/2 JSON; `level` 1 or 2 picks which level's registers a
    vCPU in guest mode shows (default: both, L2's in "regs", L1's in "l1")."""
    r = vcpu.records
    out: dict[str, Any] = {**_clean(h(S.kvm_core_vcpu, vcpu.info)),
                           "vendor": D.vendor(vcpu.info["vendor"]),
                           "status": D.status(vcpu.info["status"]),
                           "error": D.error(vcpu.info["error"])}
    shown, both = _levels(vcpu, level)
    if N.guest_mode(vcpu) or "nested" in r or level is not None:
        out["guest_mode"] = N.guest_mode(vcpu)
        out["level"] = level or shown
    regs, sregs = N.state(vcpu, level or shown)
    for name, con, val in (("regs", S.kvm_regs, regs), ("sregs", S.kvm_sregs2, sregs)):
        if val is not None:
            out[name] = _clean(h(con, val))
    if both:
        l1regs, l1sregs = N.state(vcpu, 1)
        if l1regs is not None and l1sregs is not None:
            out["l1"] = {"regs": _clean(h(S.kvm_regs, l1regs)),
                         "sregs": _clean(h(S.kvm_sregs2, l1sregs)), "source": L1_SOURCE}
    for name, con in (("debugregs", S.kvm_debugregs), ("events", S.kvm_vcpu_events)):
        if name in r:
            out[name] = _clean(h(con, r[name]))
    if "mp_state" in r:
        out["mp_state"] = r["mp_state"]["mp_state"]
    if "xcrs" in r:
        out["xcrs"] = [h(S.kvm_xcr, {"xcr": x["xcr"], "value": x["value"]})
                       for x in r["xcrs"]["xcrs"][:r["xcrs"]["nr_xcrs"]]]
    if "xsave" in r:
        out["xsave"] = h(S.xsave_prefix, D.xsave(r["xsave"]))
    if "lapic" in r:
        x2apic = bool(r.get("sregs", {}).get("apic_base", 0) >> 10 & 1)
        lapic = D.lapic(r["lapic"], x2apic)
        # ICR is two 32-bit registers that D.lapic joins into one 64-bit value
        lapic["icr"] = h(S.kvm_msr_entry.data, lapic["icr"])
        out["lapic"] = {**lapic, "regs_hex": r["lapic"].hex()}
    if "msrs" in r:
        out["msrs"] = [{"index": m["index"], "name": D.MSR_NAMES.get(m["index"]),
                        "value": h(S.kvm_msr_entry.data, m["data"])} for m in r["msrs"]]
    if "cpuid" in r:
        out["cpuid"] = _clean([h(S.kvm_cpuid_entry2, e) for e in r["cpuid"]])
    if "tsc" in r:
        out["tsc"] = _clean(h(S.kvm_core_tsc, r["tsc"]))
    if "vmx_exit" in r:
        out["exit"] = {"type": "vmx", **_clean(h(S.kvm_core_vmx_exit, r["vmx_exit"])),
                       "reason_name": D.vmx_exit_reason(r["vmx_exit"]["exit_reason"])}
    elif "svm_exit" in r:
        out["exit"] = {"type": "svm", **_clean(h(S.kvm_core_svm_exit, r["svm_exit"])),
                       "reason_name": D.svm_exit_code(r["svm_exit"]["exit_code"])}
    if "exit" in out and N.guest_mode(vcpu):
        out["exit"].update(level=2, meaning=L2_EXIT)
    if "nested" in r:
        out["nested"] = nested_json(r["nested"], h)
    out["unknown_records"] = [{"type": t, "size": s} for t, s in vcpu.unknown_records]
    return out


def signal(core: Core) -> int | None:
    """The signal that killed the process (NT_SIGINFO, else NT_PRSTATUS)."""
    if core.signal is not None:
        return core.signal
    return next((t.cursig for t in core.threads if t.cursig), None)


def to_json(core: Core, vcpus: list[Vcpu], h: Typed = hex64,
            level: int | None = None) -> dict[str, Any]:
    """The whole kvmnote-read/2 document for `core`, listing `vcpus` (with h=as_is:
    every integer as a Python int, for the text report); `level` as in vcpu_json."""
    return {"schema": SCHEMA,
            "core": {"path": core.path, "pid": core.pid, "comm": core.comm,
                     "signal": signal(core)},
            "vms": [{**vm_json(vm, h), "guest_ram": core.guest_ram(vm)} for vm in core.vms],
            "vcpus": [vcpu_json(v, h, level) for v in vcpus],
            "dropped": [_clean(d.info) for d in core.dropped],
            "warnings": core.warnings}


def _flags(value: int, names: dict[int, str]) -> str:
    """`value` in hex with its decoded bit names."""
    return f"{value:#x} [{' '.join(D.bits(value, names))}]"


def text(core: Core, vcpus: list[Vcpu], full: bool, level: int | None = None) -> str:
    """Human-readable report of the VMs and `vcpus` (`level` as in vcpu_json)."""
    doc = to_json(core, vcpus, as_is, level)
    c = doc["core"]
    out = [f"core {c['path']}: pid {c['pid']} comm {c['comm']} signal {c['signal']}"]
    for vm in doc["vms"]:
        out.append(f"\nVM {vm['vm_index']}: vendor {vm['vendor']}, {vm['nr_vcpus']} vCPUs, "
                   f"vm_type {vm['vm_type']}, flags {_flags(vm['flags'], S.VM_FLAG_NAMES)}, "
                   f"pid {vm['pid']}")
        out.append(_ram_text(vm["guest_ram"]))
        if vm["unknown_records"]:
            out.append("  unknown records: " + ", ".join(
                f"type {u['type']} ({u['size']} bytes)" for u in vm["unknown_records"]))
        out.append(f"  {'slot':>5} {'as':>2} {'flags':<24} {'GPA range':<35} "
                   f"{'size':>12}  userspace addr")
        for m in vm["memslots"]:
            end = m["guest_phys_addr"] + m["memory_size"]
            out.append(f"  {m['slot']:>5} {m['as_id']:>2} "
                       f"{','.join(D.bits(m['flags'], D.MEMSLOT_FLAGS)) or '-':<24} "
                       f"{m['guest_phys_addr']:#018x}-{end:#018x} {m['memory_size']:>12}  "
                       f"{m['userspace_addr']:#x}")
    for d in doc["dropped"]:
        out.append("\nthe kernel left out, for lack of memory: " + ", ".join(
            f"{'all' if d[k] == S.KVM_CORE_DROPPED_UNKNOWN else d[k]} {what}"
            for k, what in (("nr_vms", "VMs"), ("nr_vcpus", "vCPUs"),
                            ("nr_memslots", "memslots")) if d[k]))
    for v, raw in zip(doc["vcpus"], vcpus):
        out += _vcpu_text(v, raw, full)
    return "\n".join(out) + "\n"


def _size(n: int) -> str:
    """A byte count for people."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _ram_text(g: dict[str, Any]) -> str:
    """The summary line of a VM's guest RAM: how much the core holds, and why not all."""
    line = f"  guest RAM: {_size(g['dumped'])} of {_size(g['size'])} in the core"
    gaps = []
    if g["excluded"]:
        gaps.append(f"{_size(g['excluded'])} {EXCLUDED_WHY}; {EXCLUDED_FIX}")
    if g["cut_off"]:
        gaps.append(f"{_size(g['cut_off'])} cut off ({TRUNCATED_WHY})")
    if g["unmapped"]:
        gaps.append(f"{_size(g['unmapped'])} in no PT_LOAD")
    if gaps:
        line += "; " + "; ".join(gaps) + "; the vCPU registers are all there"
    return line


def _vcpu_text(v: dict[str, Any], raw: Vcpu, full: bool) -> list[str]:
    """Text lines for one vCPU."""
    out = [f"\nvCPU {v['vcpu_id']} (idx {v['vcpu_idx']}, VM {v['vm_index']}, "
           f"{v['vendor']}): status {' '.join(v['status']) or '-'}"
           + (f", error {v['error']}" if v["error"] else "") + f", tid {v['tid']}"]
    gm = v.get("guest_mode", False)
    if gm:
        out.append("  guest mode: running a nested guest (L2); L1 is the guest's own "
                   "hypervisor")
    if v.get("level") == 2 and not gm:
        out.append("  not in guest mode: no nested guest (L2) registers")
    elif gm and v["level"] == 1 and "regs" not in v:
        out.append("  L1 registers: not in this core (note format before 1.2)")
    if gm and "regs" in v:
        out.append(f"  L{v['level']} " + ("(nested guest) registers:" if v["level"] == 2
                                          else f"(hypervisor) registers, {L1_SOURCE}:"))
    out += _regs_text(v.get("regs"), v.get("sregs"), "    " if gm else "  ")
    if "l1" in v:
        out.append(f"  L1 (hypervisor) registers, {L1_SOURCE}:")
        out += _regs_text(v["l1"]["regs"], v["l1"]["sregs"], "    ")
    if "exit" in v:
        e = v["exit"]
        code = e["exit_reason"] if e["type"] == "vmx" else e["exit_code"]
        detail = (f"qualification {e['exit_qualification']:#x}" if e["type"] == "vmx"
                  else f"info1 {e['exit_info_1']:#x} info2 {e['exit_info_2']:#x}")
        what = f"L2's last exit to KVM ({e['type']}; L1 may never see it)" \
            if e.get("level") == 2 else f"last exit ({e['type']})"
        out.append(f"  {what}: {e['reason_name']} ({code:#x}), {detail}")
    if "nested" in v:
        out += _nested_text(v["nested"])
    if v["unknown_records"]:
        out.append("  unknown records: " + ", ".join(
            f"type {u['type']} ({u['size']} bytes)" for u in v["unknown_records"]))
    if full:
        out += _full_text(v)
    return out


def _regs_text(regs: dict[str, Any] | None, sregs: dict[str, Any] | None,
               ind: str) -> list[str]:
    """Lines of a kvm_regs and kvm_sregs2, each line indented by `ind`."""
    out = []
    if regs:
        out.append(f"{ind}RIP {regs['rip']:#018x}  RSP {regs['rsp']:#018x}  RFLAGS "
                   f"{regs['rflags']:#x} [{' '.join(D.rflags(regs['rflags']))}]")
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
                 *(f"r{i}" for i in range(8, 16))]
        for i in range(0, len(names), 4):
            out.append(ind + "  ".join(f"{n.upper():>3} {regs[n]:#018x}"
                                       for n in names[i:i + 4]))
    if sregs:
        mode, cpl = D.cpu_mode(sregs, regs["rflags"] if regs else 0)
        out.append(f"{ind}mode {mode}, CPL {cpl}")
        out.append(f"{ind}CR0 {_flags(sregs['cr0'], D.CR0)}  CR2 {sregs['cr2']:#x}  "
                   f"CR3 {sregs['cr3']:#x}  CR8 {sregs['cr8']:#x}")
        out.append(f"{ind}CR4 {_flags(sregs['cr4'], D.CR4)}  "
                   f"EFER {_flags(sregs['efer'], D.EFER)}")
        for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            seg = sregs[s]
            out.append(f"{ind}{s.upper():<3} sel {seg['selector']:#06x} "
                       f"base {seg['base']:#018x} limit {seg['limit']:#010x} "
                       f"{D.segment_attrs(seg)}")
        out.append(f"{ind}GDT base {sregs['gdt']['base']:#018x} "
                   f"limit {sregs['gdt']['limit']:#x}  "
                   f"IDT base {sregs['idt']['base']:#018x} limit {sregs['idt']['limit']:#x}")
    return out


def _gpa(addr: int) -> str:
    """A guest-physical address of the nested state; -1 (INVALID_GPA) is "none"."""
    return "none" if addr == (1 << 64) - 1 else f"{addr:#x}"


def _nested_text(n: dict[str, Any]) -> list[str]:
    """Lines of the NESTED record."""
    head = f"  nested state ({n['format']}): flags {n['flags']:#x} " \
           f"[{' '.join(n['flags_names'])}]"
    if "vmx" in n:
        x = n["vmx"]
        head += (f", vmxon {_gpa(x['vmxon_pa'])}, vmcs12 {_gpa(x['vmcs12_pa'])}"
                 + (f", SMM [{' '.join(x['smm_flags_names'])}]" if x["smm_flags_names"] else "")
                 + (", shadow vmcs12" if n["shadow_vmcs12"] else ""))
    if "svm" in n:
        head += f", vmcb12 {n['svm']['vmcb_pa']:#x}"
    out = [head]
    if n["nested_run_pending"]:
        out.append("    nested_run_pending: L1's VMLAUNCH/VMRESUME/VMRUN is not complete "
                   "(L2 has not run an instruction yet)")
    e = n.get("l1_last_exit")
    if e and e["source"] == "vmcs12":
        out.append(f"    L1's last exit seen (vmcs12): {e['reason_name']} "
                   f"({e['exit_reason']:#x}), qualification {e['exit_qualification']:#x}, "
                   f"GPA {e['guest_physical_address']:#x}")
    elif e:
        out.append(f"    L1's last exit seen (vmcb12): {e['reason_name']} "
                   f"({e['exit_code']:#x}), info1 {e['exit_info_1']:#x} "
                   f"info2 {e['exit_info_2']:#x}")
    p = n.get("nested_paging")
    if p:
        what = {"ept": "EPT, EPTP", "npt": "nested paging (NPT), nCR3"}[p["type"]]
        out.append(f"    {what} {p['root']:#x} ({p['levels']}-level)" if p["enabled"]
                   else f"    {p['type'].upper()} off: L1 uses shadow paging for L2")
    return out


def _full_text(v: dict[str, Any]) -> list[str]:
    """The --all extras: debug regs, events, mp_state, XCRs, XSAVE, LAPIC, MSRs."""
    out = []
    if "debugregs" in v:
        d = v["debugregs"]
        out.append("  DR0-3 " + " ".join(f"{x:#x}" for x in d["db"])
                   + f"  DR6 {d['dr6']:#x}  DR7 {d['dr7']:#x}")
    if "events" in v:
        out.append("  events " + "; ".join(
            f"{k} " + " ".join(f"{kk}={vv}" for kk, vv in val.items())
            if isinstance(val, dict) else f"{k}={val}" for k, val in v["events"].items()))
    if "mp_state" in v:
        out.append(f"  mp_state {D.mp_state(v['mp_state'])} ({v['mp_state']})")
    if "xcrs" in v:
        out.append("  XCRs " + " ".join(f"XCR{x['xcr']}={x['value']:#x}" for x in v["xcrs"]))
    if "xsave" in v:
        x = v["xsave"]
        out.append(f"  XSAVE {x['size']} bytes, XSTATE_BV {x['xstate_bv']:#x}, XCOMP_BV "
                   f"{x['xcomp_bv']:#x}, MXCSR {x['mxcsr']:#x}, FCW {x['fcw']:#x}, "
                   f"FSW {x['fsw']:#x}")
    if "lapic" in v:
        a = v["lapic"]
        out.append(f"  LAPIC id {a['id']} version {a['version']:#x} TPR {a['tpr']:#x} "
                   f"SVR {a['svr']:#x} LVT timer {a['lvt_timer']:#x} ISR {a['isr']} "
                   f"IRR {a['irr']}")
    for m in v.get("msrs", []):
        out.append(f"  MSR {m['index']:#010x} {m['name'] or '?':<22} {m['value']:#x}")
    return out
