"""The guard every public call passes: one thread at a time per vault, and errors ours.

Used by the front (``Vault``) and by the pieces that read on their own later, such as a
lazy mapping's reads: anything with a ``_connection`` (a ``Connection``) and a ``path``.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from . import _schema
from ._chunks import zstandard
from ._errors import CorruptVaultError, IntegrityError, TooLargeError, VaultError

F = TypeVar("F", bound=Callable[..., Any])


def api(method: F) -> F:
    """One thread at a time per vault, and sqlite3/zstd errors turned into ours."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._connection.lock:
                return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _schema.translate(exc, self.path) from exc
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.path}: {exc}") from exc
        except UnicodeDecodeError as exc:  # text SQLite stored is not UTF-8: a damaged file
            raise CorruptVaultError(f"{self.path}: vault file is damaged ({exc})") from exc
        except MemoryError as exc:  # never a bare MemoryError, whatever asked for too much
            if isinstance(exc, VaultError):
                raise
            raise TooLargeError(f"{self.path}: out of memory ({exc or 'no detail'})") from exc

    return wrapper  # type: ignore[return-value]


def snapshot(method: F) -> F:
    """Run a read-only method inside one read transaction."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._connection.read():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
