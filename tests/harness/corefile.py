"""Minimal ELF core reading for the e2e tests: the note list and process
memory through PT_LOADs, independent of kvmnote's core reader. The KVM
notes themselves are decoded by kvmnote only (one home for the layout);
the tests compare what it reports with values they chose themselves and
with what the VMM's ioctls returned."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Note:
    name: str
    type: int
    desc: bytes


class Core:
    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ValueError("not an ELF64 file")
        self.data = data
        (self.e_type, _, _, _, phoff, _, _, _, phentsize, phnum) = struct.unpack_from(
            "<HHIQQQIHHH", data, 16)
        self.phdrs = []
        for i in range(phnum):
            self.phdrs.append(struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize))

    def notes(self) -> list[Note]:
        out = []
        for p_type, _, off, _, _, filesz, _, _ in self.phdrs:
            if p_type != PT_NOTE:
                continue
            pos, end = off, off + filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                pos += 12
                name = self.data[pos:pos + namesz].rstrip(b"\0").decode("ascii", "replace")
                pos += (namesz + 3) & ~3
                desc = self.data[pos:pos + descsz]
                pos += (descsz + 3) & ~3
                out.append(Note(name, ntype, desc))
        return out

    def note_types(self) -> list[tuple[str, int]]:
        return [(n.name, n.type) for n in self.notes()]

    def read(self, vaddr: int, size: int) -> bytes | None:
        """Process memory at vaddr, None if not (fully) in a PT_LOAD's file part."""
        for p_type, _, off, va, _, filesz, memsz, _ in self.phdrs:
            if p_type == PT_LOAD and va <= vaddr and vaddr + size <= va + memsz:
                if vaddr + size > va + filesz:
                    return None
                return self.data[off + vaddr - va: off + vaddr - va + size]
        return None


# The KVM note types, from the one Python home of the note layout.
from kvmnote.schema import NT_KVM_VCPU, NT_KVM_VM  # noqa: E402,F401


def guest_read(core: Core, memslots: list[dict], gpa: int, size: int,
               as_id: int = 0) -> bytes | None:
    """Guest-physical memory of address space `as_id` (1: SMM) through a memslot map
    and the core's PT_LOADs."""
    for s in memslots:
        if s.get("as_id", 0) == as_id and s["guest_phys_addr"] <= gpa and \
                gpa + size <= s["guest_phys_addr"] + s["memory_size"]:
            return core.read(s["userspace_addr"] + gpa - s["guest_phys_addr"], size)
    return None
