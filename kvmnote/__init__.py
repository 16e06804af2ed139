"""Read KVM vCPU and VM state from the ELF notes in a crashed VMM's core file."""

from .core import Core, Load, Thread, open_core
from .errors import KvmnoteError
from .notes import Vcpu, Vm

__all__ = ["Core", "KvmnoteError", "Load", "Thread", "Vcpu", "Vm", "open_core"]
