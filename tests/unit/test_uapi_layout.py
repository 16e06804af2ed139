"""The construct schema agrees with the kernel series' UAPI headers.

The headers (linux/kvm_coredump.h, asm/kvm_coredump.h and the NT_KVM_* lines
of linux/elf.h) are taken from the patches that add and change them (kpatch/*.patch,
applied in order), compiled
into a small C program that prints sizeof/offsetof of every struct and field
the schema knows and the value of every KVM_CORE_*/NT_KVM_* constant; the
test compares those numbers with kvmnote.schema. Either side changing alone
makes it fail. struct kvm_nested_state and the KVM_STATE_NESTED_* constants come from
linux/kvm.h (the installed UAPI headers, which asm/kvm_coredump.h includes).

Note format 1.2 (nested virtualization, issue 11) landed in kvmnote.schema before
the series' headers in kpatch/: while the series still says minor 1, the 1.2 names
(NEW_IN_1_2) may be missing from it; once it says 2, all of them must be there and agree.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kvmnote import schema
from testlib import need

REPO = Path(__file__).resolve().parents[2]
HEADERS = {"linux/kvm_coredump.h": "include/uapi/linux/kvm_coredump.h",
           "asm/kvm_coredump.h": "arch/x86/include/uapi/asm/kvm_coredump.h"}
ELF_H = "include/uapi/linux/elf.h"
NEW_IN_1_2 = {"KVM_CORE_VERSION_MINOR", "KVM_CORE_REC_L1_REGS", "KVM_CORE_REC_L1_SREGS2",
              "KVM_CORE_REC_NESTED"}


def _series() -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted((REPO / "kpatch").glob("0*.patch"))]


@functools.cache
def _headers_after_series() -> dict[str, str]:
    """The text of each UAPI header as the whole series leaves it: every patch that
    touches one applied in order (git apply, limited to the headers) to an empty tree."""
    need(shutil.which("git") is not None, "git (apt-get install git)")
    with tempfile.TemporaryDirectory(prefix="kvmnote-uapi-") as d:
        for patch in sorted((REPO / "kpatch").glob("0*.patch")):
            text = patch.read_text()
            if any(f"+++ b/{h}" in text for h in HEADERS.values()):
                subprocess.run(["git", "apply", *(f"--include={h}" for h in HEADERS.values()),
                                str(patch)], cwd=d, check=True)
        out = {}
        for h in HEADERS.values():
            f = Path(d) / h
            assert f.exists(), f"no patch in kpatch/ creates {h}"
            out[h] = f.read_text()
        return out


def created_by_series(path: str) -> str:
    """Return the text of a header as the series creates and then changes it."""
    return _headers_after_series()[path]


def elf_note_types_from_series() -> str:
    """The #define NT_KVM_* lines the series adds to linux/elf.h."""
    out = []
    for lines in _series():
        in_elf = False
        for line in lines:
            if line.startswith("+++ b/"):
                in_elf = line == f"+++ b/{ELF_H}"
            elif in_elf and line.startswith("+#define NT_KVM_"):
                out.append(line[1:])
    assert out, f"no patch in kpatch/ adds NT_KVM_* to {ELF_H}"
    return "\n".join(out) + "\n"


def header_from_series() -> str:
    """Every line of the series' UAPI that defines the note layout."""
    return "".join(created_by_series(p) for p in HEADERS.values()) + \
        elf_note_types_from_series()


def constants() -> dict[str, int]:
    return {k: v for k, v in vars(schema).items()
            if isinstance(v, int) and not isinstance(v, bool)
            and k.startswith(("KVM_CORE_", "NT_KVM_", "KVM_STATE_"))}


def series_minor() -> int:
    """KVM_CORE_VERSION_MINOR as the series' header defines it."""
    import re
    return int(re.search(r"#define\s+KVM_CORE_VERSION_MINOR\s+(\d+)",
                         header_from_series()).group(1))


def pending() -> set[str]:
    """Schema names the series may not define (yet): the 1.2 ones, while it is 1.1."""
    return NEW_IN_1_2 if series_minor() < 2 else set()


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    need(shutil.which("cc") is not None, "a C compiler (apt-get install build-essential)")
    d = tmp_path_factory.mktemp("uapi")
    for inc, path in HEADERS.items():
        (d / inc).parent.mkdir(exist_ok=True)
        (d / inc).write_text(created_by_series(path))
    (d / "kvm_note_types.h").write_text(elf_note_types_from_series())
    out = ["#include <stddef.h>", "#include <stdio.h>", "#include <asm/kvm_coredump.h>",
           '#include "kvm_note_types.h"', "int main(void) {"]
    for struct, info in schema.layout().items():
        out.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for field, off in info["fields"].items():
            out.append(f'printf("{struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    for name in constants():
        out += [f"#ifdef {name}",
                f'printf("{name} %llu\\n", (unsigned long long)({name}));', "#endif"]
    out.append("return 0; }")
    (d / "layout.c").write_text("\n".join(out) + "\n")
    subprocess.run(["cc", "-I", str(d), "-o", str(d / "layout"), str(d / "layout.c")],
                   check=True)
    text = subprocess.run([str(d / "layout")], check=True, capture_output=True,
                          text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def test_struct_sizes_and_offsets_match(c_layout):
    mismatches = []
    for struct, info in schema.layout().items():
        if c_layout[struct] != info["size"]:
            mismatches.append(f"sizeof {struct}: C {c_layout[struct]} schema {info['size']}")
        for field, off in info["fields"].items():
            if c_layout[f"{struct}.{field}"] != off:
                mismatches.append(f"{struct}.{field}: C {c_layout[f'{struct}.{field}']} "
                                  f"schema {off}")
    assert not mismatches, "\n".join(mismatches)


def test_constants_match(c_layout):
    mismatches = [f"{k}: C {c_layout.get(k, 'undefined')} schema {v}"
                  for k, v in constants().items()
                  if c_layout.get(k) != v and k not in pending()]
    assert not mismatches, "\n".join(mismatches)


def test_every_header_constant_is_in_the_schema():
    import re
    defined = set(re.findall(r"^#define\s+((?:KVM_CORE|NT_KVM)_\w+)\s", header_from_series(),
                             re.M))
    defined -= {"KVM_CORE_NOTE_NAME"}  # a string, schema.KVM_CORE_NOTE_NAME is bytes
    assert defined - set(constants()) == set()
    assert schema.KVM_CORE_NOTE_NAME.decode() == re.search(
        r'#define\s+KVM_CORE_NOTE_NAME\s+"(\w+)"', header_from_series()).group(1)
