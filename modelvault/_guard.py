"""The guard every public call passes: one thread at a time per vault, and errors ours.

Used by the front (``Vault``) and by the pieces that read on their own later, such as a
lazy mapping's reads: anything with a ``_connection`` (a ``Connection``) and a ``path``.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from . import _schema
from ._chunks import zstandard
from ._errors import CorruptVaultError, IntegrityError, TooLargeError, VaultError

F = TypeVar("F", bound=Callable[..., Any])


def api(method: F) -> F:
    """One thread at a time per vault, and sqlite3/zstd errors turned into ours."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with translated(self.path), self._connection.lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def translated(path: object) -> Iterator[None]:
    """sqlite3/zstd errors (and the like) raised inside turned into ours, naming ``path``:
    for a piece working on a file other than its caller's vault (export's new copy)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _schema.translate(exc, path) from exc
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{path}: {exc}") from exc
    except UnicodeDecodeError as exc:  # text SQLite stored is not UTF-8: a damaged file
        raise CorruptVaultError(f"{path}: vault file is damaged ({exc})") from exc
    except MemoryError as exc:  # never a bare MemoryError, whatever asked for too much
        if isinstance(exc, VaultError):
            raise
        raise TooLargeError(f"{path}: out of memory ({exc or 'no detail'})") from exc


def snapshot(method: F) -> F:
    """Run a read-only method inside one read transaction."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._connection.read():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
