"""Remotes by name: the names this user confirmed for a vault file on this machine.

A vault's remotes table travels inside the file, so a name there is whatever whoever
made the file chose. ``confirm`` keeps ``[vault path, name, url]`` in ``remotes.json``
beside the user's keys (read, changed and replaced under a lock), and ``named`` gives a
name's URL only if it is there (docs/remote.md, "Remotes by name").
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _json, _trust
from .._errors import NotFoundError, RemoteError
from ._store import SCHEMES, dumps, store_url

if TYPE_CHECKING:
    from .._connection import Connection


def check_remote(name: str, url: str) -> None:
    """ValueError unless ``name`` can name a remote and ``url`` is a store URL."""
    if not (isinstance(name, str) and 0 < len(name) <= 64
            and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)):
        raise ValueError(f"remote name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    if store_url(url) is None:
        raise ValueError(f"remote URL {url!r}: expected one of {', '.join(SCHEMES)}")
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError("a remote URL must not hold credentials: they come from the "
                         "environment, never the vault file")


def listed(connection: Connection) -> dict[str, str]:
    """The remotes table of the vault: URL by name (none before format 6)."""
    with connection.read():
        if connection.format < 6:
            return {}
        return dict(connection.db.execute("SELECT name, url FROM remotes ORDER BY name"))


def add(connection: Connection, vault: Path, name: str, url: str) -> None:
    """Store ``name`` = ``url`` in the vault's remotes table and confirm it as this user's."""
    check_remote(name, url)
    with connection.write() as db:
        db.execute("INSERT OR REPLACE INTO remotes (name, url) VALUES (?, ?)", (name, url))
    confirm(vault, name, url)


def remove(connection: Connection, vault: Path, name: str) -> None:
    """Drop the remote ``name`` from the vault's table and from this user's confirmed ones."""
    with connection.write() as db:
        if not db.execute("DELETE FROM remotes WHERE name = ?", (name,)).rowcount:
            raise NotFoundError(f"no remote named {name!r} in {vault.name}")
    confirm(vault, name, None)


def url_of(connection: Connection, vault: Path, url: str) -> str:
    """``url`` itself, or the URL of the vault's remote named ``url`` if this user added
    it there (``named``); NotFoundError for a name the vault does not have."""
    if "://" in url:
        return url
    found = listed(connection).get(url)
    if found is None:
        raise NotFoundError(f"{url!r} is neither a URL (s3://, gs://, az://, file://) nor "
                            f"a remote {vault.name} remembers (add_remote)")
    return named(vault, url, found)


# A vault's remotes table travels inside the file: a name in it is what whoever made the
# file chose. A name is used only if this user added it to this vault file on this
# machine (add_remote), which this file beside the user's keys remembers.
_CONFIRMED = "remotes.json"  # {"confirmed": [[vault path, name, url], ...]}


def _confirmed() -> list[list[str]]:
    """The remotes this user added on this machine: [vault path, name, url] each; none
    from a file that is missing or damaged (so a name is refused, never wrongly used)."""
    try:
        rows = _json.loads((_trust.home() / _CONFIRMED).read_bytes())["confirmed"]
        return [row for row in rows if isinstance(row, list) and len(row) == 3
                and all(isinstance(v, str) for v in row)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def confirm(vault: Path, name: str, url: str | None) -> None:
    """Remember that this user added the remote ``name`` = ``url`` to the vault file at
    ``vault`` on this machine (``url`` None: removed it)."""
    where = str(Path(vault).resolve())
    home = _trust.home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        # Read, changed and replaced under one lock: two `remote add`s at once keep both.
        with locked(home / f".{_CONFIRMED}.lock"):
            rows = [row for row in _confirmed() if row[:2] != [where, name]]
            if url is not None:
                rows.append([where, name, url])
            partial = home / f".{_CONFIRMED}.{secrets.token_hex(4)}"
            partial.write_bytes(dumps({"confirmed": rows}))
            os.replace(partial, home / _CONFIRMED)
    except OSError as exc:
        raise RemoteError(f"cannot record the remote {name!r} in {home}: {exc}") from exc


def named(vault: Path, name: str, url: str) -> str:
    """``url``, the vault file's remote ``name``, if this user added it there on this
    machine; RemoteError otherwise, saying how to confirm it."""
    if [str(Path(vault).resolve()), name, url] in _confirmed():
        return url
    import shlex

    raise RemoteError(f"{vault.name} names {url} as its remote {name!r}, but you did not "
                      f"add it to this file on this machine (whoever made the file chose "
                      f"it); if it is yours, run: modelvault remote add "
                      f"{shlex.join([str(vault), name, url])} (or give the URL itself)")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the file ``path`` (made if missing); none where there
    is no fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
