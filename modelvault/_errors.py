"""The exceptions modelvault raises.

Every error the library raises on purpose derives from ``VaultError``; no raw
``sqlite3`` or ``zstandard`` exception escapes the public API::

    VaultError
     +-- NotFoundError        (also a KeyError)   unknown model, version or alias
     +-- NotAVaultError                           the file is not a modelvault file
     +-- FormatVersionError                       written by a newer modelvault
     +-- CorruptVaultError                        SQLite reports the file damaged
     +-- IntegrityError                           stored bytes do not match their hash
     +-- UntrustedError                           loading would run an unsigned pickle
     +-- LockTimeout          (also a TimeoutError) another process held the lock too long
     +-- ReadOnlyError                            a write on a vault opened read-only
     +-- DiskFullError        (also an OSError)   the disk or a quota is full
     +-- TooLargeError        (also a MemoryError) a version would expand past the cap
     +-- RemoteError                              a remote (or an MLflow registry) cannot be used
     +-- UnpicklableError     (also a TypeError)  save() cannot pickle the model

Plainly bad arguments (an invalid name, a non-serialisable array) raise
``ValueError`` or ``TypeError`` as Python users expect.

Warnings (``UserWarning`` subclasses)::

    EnvironmentWarning      a version loaded under other package versions than saved with
    DamagedVaultWarning     the file is cut short: opened read-only, for salvage
"""

from __future__ import annotations


class VaultError(Exception):
    """Base class of every error modelvault raises on purpose."""


class NotFoundError(VaultError, KeyError):
    """A model, version or alias that does not exist was asked for."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class NotAVaultError(VaultError):
    """The file is not a modelvault file (another SQLite database, or not SQLite)."""


class FormatVersionError(VaultError):
    """The vault was written in a format newer than this modelvault understands."""


class CorruptVaultError(VaultError):
    """SQLite itself reports the file as damaged or truncated."""


class IntegrityError(VaultError):
    """Stored bytes do not match the hash that names them.

    Attributes name what was being read, so a user knows which version is damaged.
    """

    def __init__(self, message: str, *, model: str | None = None,
                 version: int | None = None, chunk: str | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.version = version
        self.chunk = chunk


class UntrustedError(VaultError):
    """Loading this version would unpickle data no trusted key signed.

    ``imports`` lists the ``module.qualname`` globals the pickle would import,
    found by reading its opcodes without executing anything.
    """

    def __init__(self, message: str, *, imports: list[str] | None = None) -> None:
        super().__init__(message)
        self.imports = imports or []


class LockTimeout(VaultError, TimeoutError):
    """Another process held the vault's write lock longer than the timeout."""


class RemoteError(VaultError):
    """A remote cannot be used as asked: it ignores create-only writes, a push or gc
    holds it, or it is not a modelvault remote (or of a newer remote format); or an
    MLflow registry being imported failed to answer (its error is the cause)."""


class ReadOnlyError(VaultError):
    """A write was attempted on a vault that can only be read."""


class UnpicklableError(VaultError, TypeError):
    """``save`` cannot pickle the model: something in it is of a type pickle refuses
    (a lock, an open file, a connection).

    ``path`` is where that object sits in the model, as ``.client._lock`` or
    ``['cache'][0]``, when a short search of its attributes and items found it; else None.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class DiskFullError(VaultError, OSError):
    """A write could not be made: the disk is full, or a quota or file-size limit was hit.

    The write is rolled back as a whole; the vault holds what it held before.
    """


class TooLargeError(VaultError, MemoryError):
    """Reading a version would take more memory than its file can honestly account for
    (see ``modelvault._limits``), or more than the machine has."""


class EnvironmentWarning(UserWarning):
    """A version is loaded under other package versions than it was saved with: for a
    package it imports, another major.minor (or none installed), or another Python
    minor version. A pickled model may then behave differently."""


class DamagedVaultWarning(UserWarning):
    """The vault file is damaged as a whole (cut short: a failed copy or download), so it
    was opened read-only: every write raises CorruptVaultError. The versions whose bytes
    are all there still load; ``export(..., skip_damaged=True)`` copies them to a new
    vault."""
