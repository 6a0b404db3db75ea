"""A remote as a whole: its descriptor, the locks that keep push and gc apart, delete
and gc; and ``Local``, the vault a push or a pull works on, as its pieces.

A remote is a folder of objects in a store obstore reaches (``s3://``, ``gs://``,
``az://``, ``file://``, ``memory://``): a ``Store``, its ``Log`` and its
``PackObjects``. Nothing there is ever overwritten, and there is no lock server: a
push and a remote gc keep each other out with lock objects that expire.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import _json, _trust
from .._catalog import Catalog
from .._connection import Connection
from .._errors import IntegrityError, NotFoundError, RemoteError
from .._packs import PackStore
from .._reports import PruneReport, RemoteGcReport, RemoteVersion
from ._log import Log, State
from ._objects import PackObjects
from ._retention import chunks, garbage, prune
from ._store import Store, dumps

FORMAT = 1  # of the remote's layout: docs/remote.md
DESCRIPTOR = "modelvault-remote.json"
LOCK_LIFE = 3600.0  # seconds a push or gc lock counts, unless its holder lets go first
GRACE = 3600.0  # remote gc never deletes an object younger than this
# A version's manifest (versions/<uuid>.json): the columns of its rows it holds.
VERSION_FIELDS = ("uuid", "created_at", "kind", "layout", "size", "added_bytes", "digest",
                  "description", "metadata", "key_id", "signature")
PART_FIELDS = ("part", "kind", "name", "dtype", "shape", "fortran_order", "itemsize",
               "size")


@dataclass(frozen=True)
class Local:
    """The vault a push sends from or a pull brings into, as the pieces they work on."""

    path: Path
    connection: Connection
    catalog: Catalog
    packs: PackStore
    progress: bool | None  # show progress bars (None: on a terminal, for long work)
    require: str | None  # "trusted": pull only what a trusted key signed

    @classmethod
    def open(cls, path: Path, *, progress: bool | None = None) -> Local:
        """A vault file of our own, made if missing (a clone's, a pull's bundle)."""
        connection = Connection(path, readonly=False, create=True, timeout=60.0)
        return cls(path, connection, Catalog(connection), PackStore(connection), progress,
                   _trust.required(None))


class Remote:
    """A modelvault remote at ``url``."""

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 single_writer: bool = False) -> None:
        self.store = Store(url, endpoint_url=endpoint_url)
        self.url = self.store.url
        self.single_writer = single_writer
        self.log = Log(self.store)
        self.packs = PackObjects(self.store)
        self._probed = False

    def check_descriptor(self, *, create: bool) -> None:
        data = self.store.get(DESCRIPTOR, "descriptor")
        if data is None:
            if not create:
                raise NotFoundError(f"{self.url}: no modelvault remote here (push to it first)")
            self.store.put(DESCRIPTOR, dumps({"format": "modelvault-remote",
                                              "version": FORMAT, "hash": "blake3"}),
                           create=True)
            data = self.store.get(DESCRIPTOR, "descriptor")
        try:
            found = _json.loads(data or b"")
        except ValueError:
            found = None
        if not isinstance(found, dict) or found.get("format") != "modelvault-remote":
            raise RemoteError(f"{self.url}: {DESCRIPTOR} is not a modelvault remote's")
        if found.get("version") != FORMAT:
            raise RemoteError(f"{self.url}: remote format {found.get('version')}; this "
                              f"modelvault reads format {FORMAT}: upgrade modelvault")

    def versions(self) -> list[RemoteVersion]:
        """Every version on the remote, by model and number (no weights read)."""
        self.check_descriptor(create=False)
        state = self.log.state()
        return sorted((state.record(u) for u in state.versions),
                      key=lambda r: (r.name, r.version))

    def manifest(self, uuid: str) -> dict[str, Any]:
        key = f"versions/{uuid}.json"
        data = self.store.get(key, "manifest")
        if data is None:
            raise IntegrityError(f"{self.url}/{key} is missing: the log names it")
        try:
            return _json.loads(data)
        except ValueError as exc:
            raise IntegrityError(f"{self.url}/{key}: unreadable ({exc})") from exc

    # -- writing ----------------------------------------------------------------------

    def probe(self) -> None:
        """Refuse an endpoint that ignores create-only writes (rclone's serve s3 does):
        two pushers there would overwrite each other's log entries."""
        if self._probed or self.single_writer:
            return
        key = f"probe/{secrets.token_hex(8)}"
        first = self.store.put(key, b"1", create=True)
        second = self.store.put(key, b"2", create=True)
        self.store.delete(key)
        if not (first and not second):
            raise RemoteError(
                f"{self.url}: this endpoint ignores conditional writes (If-None-Match), so "
                "two writers could overwrite each other's log entries; if only one process "
                "ever writes to it, pass single_writer=True (--single-writer)")
        self._probed = True

    def lock(self, kind: str) -> str:
        """Create a lock object ``locks/<kind>-<random>.json`` (kind "push" or "gc");
        RemoteError if a lock that keeps this one out is held: a gc keeps pushes and
        other gcs out, a push keeps gcs out. Each side creates its own, then looks for
        the others', so of two starting together at least one sees the other."""
        key = f"locks/{kind}-{secrets.token_hex(8)}.json"
        self.renew(key)
        try:
            self.others(key, ("locks/gc-",) if kind == "push" else ("locks/gc-",
                                                                     "locks/push-"))
        except RemoteError:
            self.store.delete(key)
            raise
        return key

    def others(self, mine: str, kinds: tuple[str, ...]) -> None:
        """RemoteError if an unexpired lock of ``kinds`` other than ``mine`` is held."""
        held = [m["path"] for m in self.store.list("locks/")
                if m["path"] != mine and m["path"].startswith(kinds)
                and not self._expired(m["path"])]
        if held:
            what = "a remote gc is running" if "/gc-" in held[0] else "a push is in progress"
            raise RemoteError(f"{self.url}: {what} ({held[0]}); try again when it is done")

    def renew(self, key: str) -> None:
        """Write (or push back the expiry of) the lock ``key``, held by this process."""
        self.store.put(key, dumps({"expires": time.time() + LOCK_LIFE,
                                   "by": socket.gethostname()}))

    def _expired(self, key: str) -> bool:
        try:
            data = self.store.get(key, "lock")
            return data is None or _json.loads(data)["expires"] < time.time()
        except (ValueError, KeyError, TypeError, IntegrityError):
            return True

    # -- gc ----------------------------------------------------------------------------

    def delete(self, ref: str) -> RemoteVersion:
        """Delete a version on the remote (its bytes go at the next remote gc)."""
        self.check_descriptor(create=False)
        self.probe()
        found: list[RemoteVersion] = []

        def make(state: State) -> list[dict[str, Any]]:
            uuid = state.resolve(ref)
            found[:] = [state.record(uuid)]
            return [{"op": "delete", "uuid": uuid}]

        self.log.commit(make)
        return found[0]

    def prune(self, name: str | None = None, *, keep_last: int | None = None,
              keep_aliased: bool = True, keep_tagged: bool = False,
              keep_since: datetime | str | None = None, dry_run: bool = False) -> PruneReport:
        """Delete the versions on the remote (of model ``name``, or of every model) that
        no rule keeps, in one log entry: the rules and the report of ``Vault.prune``,
        whose ``deleted`` then holds RemoteVersion records and ``freed_bytes`` the bytes
        a remote ``gc`` frees after it, once its grace period has passed. A dry run
        writes nothing.

        >>> _ = vault.push("memory://prune-doc")
        >>> Remote("memory://prune-doc").prune(keep_last=1).deleted
        ()
        """
        return prune(self, name, keep_last=keep_last, keep_aliased=keep_aliased,
                     keep_tagged=keep_tagged, keep_since=keep_since, dry_run=dry_run)

    def gc(self, grace: float = GRACE) -> RemoteGcReport:
        """Delete pack objects no version on the remote uses, and manifests of deleted
        versions, that are older than ``grace`` seconds; a push in flight stops it."""
        self.check_descriptor(create=False)
        self.probe()
        lock = self.lock("gc")
        try:
            state = self.log.state()
            doomed = garbage(self.packs, chunks(self, state.versions), time.time() - grace)
            # Last look before deleting: a push whose lock had expired may be back.
            self.renew(lock)
            self.others(lock, ("locks/push-", "locks/gc-"))
            for key in doomed:
                self.store.delete(key)
            return RemoteGcReport(len(doomed), sum(doomed.values()))
        finally:
            self.store.delete(lock)
