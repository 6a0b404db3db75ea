"""Pins: the chunks a lazy mapping will read, kept from gc in any process.

A lazy mapping (``load(..., lazy=True)``) reads its entries later, maybe after another
process deleted the version and ran gc. So that gc cannot pull the bytes away, the
mapping pins the ids of the chunks it may read, and gc keeps every pinned chunk.

A pin is a shared POSIX record lock on byte ``1 + chunk id`` of the file ``VAULT-lock``
beside the vault. The kernel drops a process's locks when it exits, even by kill -9,
so a pin can never outlive its reader; nothing is written into the vault, so readers
need no write access and the format is unchanged. docs/format.md ("Lazy readers' pins")
is the protocol for other writers:

- A reader pins while it holds SQLite's read lock, in the read that found the chunks.
- gc checks pins only once it holds SQLite's EXCLUSIVE lock (``BEGIN EXCLUSIVE``). A
  reader that found the chunks then pinned them before gc could take that lock; a
  reader that looks after it waits for gc's commit and finds what is left.
- gc tests a byte by taking an exclusive lock on it without waiting, and lets go at once.

POSIX record locks belong to a process, not a file descriptor: a second lock on a byte
the process holds merges with the first, one unlock drops both, and closing *any*
descriptor of the file drops all of them. Hence one descriptor per lock file per
process, and reference counts per chunk id.

The lock file is removed by the last process to let go of its pins (it takes the whole
file exclusively first, so no other process holds a pin in it). A reader that opened
the file just before that checks, once its pins are taken, that the path still names
the file it locked, and starts again if not.

Where ``fcntl`` is missing (Windows) nothing is pinned: a lazy mapping then raises
NotFoundError for an entry whose chunks another process's gc collected.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


@dataclass
class _LockFile:
    fd: int
    writable: bool
    counts: Counter[int] = field(default_factory=Counter)


_guard = threading.Lock()
_files: dict[str, _LockFile] = {}  # by the lock file's real path


def _reset_after_fork() -> None:
    # A child inherits the descriptors but none of the locks: its pins start empty.
    # Closing its copies drops no lock of the parent's (record locks are per process).
    global _guard
    _guard = threading.Lock()
    for entry in _files.values():
        try:
            os.close(entry.fd)
        except OSError:
            pass
    _files.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def lock_path(vault: Path) -> str:
    """The lock file of the vault at ``vault`` (resolved now: the working folder or a
    symbolic link may change later)."""
    return os.path.realpath(vault) + "-lock"


class Pin:
    """Chunk ids pinned for one reader in the lock file ``path`` (``lock_path``);
    ``release()`` lets go (once; again is a no-op)."""

    def __init__(self, path: str, ids: Iterable[int]) -> None:
        self._path = path
        self._ids = sorted(set(ids))
        self._held = False
        self._pid = os.getpid()  # a forked child inherits the object, not the locks
        if fcntl is None or not self._ids:
            return
        with _guard:
            self._held = _pin(self._path, self._ids)

    def release(self) -> None:
        if not self._held or os.getpid() != self._pid:
            return
        self._held = False
        with _guard:
            entry = _files[self._path]
            freed = []
            for chunk in self._ids:
                entry.counts[chunk] -= 1
                if not entry.counts[chunk]:
                    del entry.counts[chunk]
                    freed.append(chunk)
            _lock(entry.fd, fcntl.LOCK_UN, freed)
            if not entry.counts:
                _close(self._path, entry)


def _pin(path: str, ids: list[int]) -> bool:
    entry = _files.get(path)
    if entry is None:
        while True:
            try:
                fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
            except OSError:  # a read-only folder: pin only if a writer made the file
                try:
                    fd, writable = os.open(path, os.O_RDONLY), False
                except OSError:
                    # Nothing to lock in: a gc by a user who may write here would not
                    # see this reader (docs/format.md says so).
                    return False
            _lock(fd, fcntl.LOCK_SH, ids)
            try:
                same = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its last holder removed it under us: start again
        entry = _files[path] = _LockFile(fd, writable)
        entry.counts.update(ids)
        return True
    _lock(entry.fd, fcntl.LOCK_SH, [chunk for chunk in ids if not entry.counts[chunk]])
    entry.counts.update(ids)
    return True


def _lock(fd: int, how: int, ids: list[int]) -> None:
    """Lock (or unlock) the bytes of the sorted ``ids``, one call per run of adjacent
    ids: a version's chunks mostly have adjacent ids."""
    first = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            fcntl.lockf(fd, how, i - first, 1 + ids[first])
            first = i


def _close(path: str, entry: _LockFile) -> None:
    """Close a lock file this process holds no pin in, removing it if no process does."""
    del _files[path]
    try:
        if entry.writable:
            fcntl.lockf(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file
            if os.path.samestat(os.stat(path), os.fstat(entry.fd)):
                os.unlink(path)
    except OSError:
        pass  # another process holds pins in it (or removed it): it stays theirs
    finally:
        os.close(entry.fd)


def held(path: str, ids: Iterable[int]) -> set[int]:
    """The chunk ids among ``ids`` that a reader in any process has pinned in the lock
    file ``path``. Call only while holding the vault's EXCLUSIVE lock (see above).
    """
    ids = set(ids)
    if fcntl is None or not ids:
        return set()
    with _guard:
        entry = _files.get(path)
        if entry is not None:
            ours = ids & set(entry.counts)
            # Testing a byte we hold ourselves would replace our lock with the test's.
            return ours | _held_elsewhere(entry.fd, entry.writable, ids - ours, whole=False)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return set()  # readers make the file before they pin: none has
        except OSError:
            return ids  # cannot test: keep them all
        try:
            return _held_elsewhere(fd, True, ids, whole=True)
        finally:
            os.close(fd)  # this process holds no lock in it: closing drops nothing


def _held_elsewhere(fd: int, writable: bool, ids: set[int], *, whole: bool) -> set[int]:
    """The ids whose byte another process holds a lock on."""
    if not writable:
        return ids  # an exclusive test lock needs a writable descriptor
    if whole and _free(fd, 0, 0):  # nobody pins anything: one test for all
        return set()
    return {chunk for chunk in ids if not _free(fd, 1, 1 + chunk)}


def _free(fd: int, length: int, start: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
    return True
