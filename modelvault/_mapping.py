"""The mapping ``load(..., lazy=True)`` returns: a version's entries by flat name, each
read and decoded when first used, its chunks pinned (``_pins``) until it is closed."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ._errors import VaultError


class LazyVersion(Mapping):
    """The entries of a version by flat name, each read and decoded when first used.

    No gc in any process removes the chunks it may still read until it is closed:
    by ``close()``, at the end of a ``with`` block, with its vault, or when it is
    garbage-collected. Reading an entry after that raises VaultError; its names stay.
    """

    def __init__(self, where: str, names: list[str], fetch: Callable[[str], Any],
                 lock: Any, release: Callable[[], Any]) -> None:
        self._where = where
        self._entries = dict.fromkeys(names)
        self._fetch = fetch
        self._lock = lock  # the vault's: one thread reads an entry, the others wait for it
        self._loaded: dict[str, Any] = {}
        self._release = weakref.finalize(self, release)  # once, whichever comes first

    def close(self) -> None:
        """Let go of its pins and of the entries it decoded (again: nothing)."""
        with self._lock:
            self._release()
            self._loaded.clear()

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def __enter__(self) -> LazyVersion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Any:
        with self._lock:
            if self.closed:
                raise VaultError(f"{self._where}: this lazy mapping is closed (by close(), "
                                 "a with block or its vault's close)")
            if name not in self._loaded:
                if name not in self._entries:
                    raise KeyError(name)
                self._loaded[name] = self._fetch(name)
            return self._loaded[name]

    def __contains__(self, name: object) -> bool:  # without decoding it
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._loaded)} loaded"
        return f"<lazy {self._where}: {len(self._entries)} entries, {state}>"
