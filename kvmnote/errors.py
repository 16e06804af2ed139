"""The one exception class kvmnote raises for bad input, and its kinds."""


class KvmnoteError(Exception):
    """Bad or unsupported input; the message is one line, fit for a user."""


class NotElfError(KvmnoteError):
    """The file is not an ELF file (nor a compressed one)."""


class NotCoreError(KvmnoteError):
    """The file is ELF but not ET_CORE, or not an x86-64 little-endian core."""


class TruncatedError(KvmnoteError):
    """Data the headers promise lies beyond the end of the file."""


class CorruptCoreError(KvmnoteError):
    """An ELF header, program header or memslot holds an impossible size or offset."""


class CompressedError(KvmnoteError):
    """The compressed stream is corrupt or ends early."""


class CorruptNoteError(KvmnoteError):
    """A note or record breaks the framing or size rules."""


class VersionError(KvmnoteError):
    """A KVM note has a major version this reader does not know."""


class NoKvmNotesError(KvmnoteError):
    """The core has no KVM notes."""


class MissingDataError(KvmnoteError):
    """Requested memory is not in the core (unmapped, or cut off the file)."""
