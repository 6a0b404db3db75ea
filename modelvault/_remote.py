"""Remotes: versions pushed to and pulled from object storage, only the missing chunks.

A remote is a folder of objects in a store obstore reaches (``s3://``, ``gs://``,
``az://``, ``file://``, ``memory://``). Nothing there is ever overwritten: chunks travel
in content-named pack objects with an index each, versions as manifests named by their
id, and every change (version added, alias moved, tag set, version deleted) as the next
entry of a log, created only if absent. Two pushers racing for one entry: one wins, the
other reads it and takes the next. No lock server, no server of our own.

docs/remote.md is the layout and protocol. This module owns the store, the log and
its replay, push, pull and remote gc; a pull goes through the copier (a bundle vault
merged in), so numbers, labels and checks are merge's.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _chunks, _copier, _json, _pins, _schema, _trust
from ._catalog import Contents, check_number, now, parse_time
from ._errors import (
    IntegrityError,
    LockTimeout,
    NotFoundError,
    RemoteError,
    UntrustedError,
    VaultError,
)
from ._packs import ChunkRow
from ._progress import progress
from ._records import MergeReport, PushReport, RemoteGcReport, RemoteVersion
from ._refs import Ref, check_alias, check_name, parse_ref

if TYPE_CHECKING:
    from ._vault import Vault

FORMAT = 1  # of the remote's layout: docs/remote.md
DESCRIPTOR = "modelvault-remote.json"
PACK_OBJECT = 64 * 1024 * 1024  # a pack object's bytes, about
CHECKPOINT_EVERY = 100  # log entries between checkpoints of the replayed state
LOCK_LIFE = 3600.0  # seconds a push or gc lock counts, unless its holder lets go first
GRACE = 3600.0  # remote gc never deletes an object younger than this
INDEX_ROWS = 100_000  # chunks in one pack object at most: its index stays far below its cap

# What one read of a remote object may bring into memory, by kind (docs/remote.md, "Size
# limits"): far above what writers make, far below what would exhaust a machine; a
# 6 GiB log entry must not. The caller may raise one (MODELVAULT_REMOTE_MAX_<KIND>, in
# bytes), never the remote.
LIMITS = {"descriptor": 64 << 10, "lock": 64 << 10, "log": 16 << 20, "index": 64 << 20,
          "manifest": 256 << 20, "checkpoint": 256 << 20, "pack": 256 << 20}


def limit(kind: str) -> int:
    """The size cap on a remote object of ``kind`` (a key of LIMITS), in bytes."""
    name = f"MODELVAULT_REMOTE_MAX_{kind.upper()}"
    value = os.environ.get(name, "")
    if not value:
        return LIMITS[kind]
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name}={value!r}: a number of bytes")
    return int(value)

_VERSION_FIELDS = ("uuid", "created_at", "kind", "layout", "size", "added_bytes", "digest",
                   "description", "metadata", "key_id", "signature")
_PART_FIELDS = ("part", "kind", "name", "dtype", "shape", "fortran_order", "itemsize",
                "size")
_CHUNK_FIELDS = ("hash", "size", "codec", "itemsize", "base", "blob", "start", "length")


_SCHEMES = ("s3://", "gs://", "az://", "abfs://", "file://", "memory://", "http://",
            "https://")


def store_url(url: object) -> str | None:
    """``url`` with its scheme in lower case (``S3://b`` is ``s3://b``), or None if it
    is not one of the schemes a remote can have."""
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    found = f"{scheme.lower()}{sep}"
    return f"{found}{rest}" if sep and found in _SCHEMES else None


def check_remote(name: str, url: str) -> None:
    """ValueError unless ``name`` can name a remote and ``url`` is a store URL."""
    if not (isinstance(name, str) and 0 < len(name) <= 64
            and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)):
        raise ValueError(f"remote name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    if store_url(url) is None:
        raise ValueError(f"remote URL {url!r}: expected one of {', '.join(_SCHEMES)}")
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError("a remote URL must not hold credentials: they come from the "
                         "environment, never the vault file")


# -- remotes a vault file names -----------------------------------------------------------

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
        with _locked(home / f".{_CONFIRMED}.lock"):
            rows = [row for row in _confirmed() if row[:2] != [where, name]]
            if url is not None:
                rows.append([where, name, url])
            partial = home / f".{_CONFIRMED}.{secrets.token_hex(4)}"
            partial.write_bytes(_dumps({"confirmed": rows}))
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


# -- the store ----------------------------------------------------------------------------


_NO_AWS_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY (or run where an instance role gives them)")


def _aws_credentials() -> bool:
    """Whether the environment names AWS credentials (or says to go without)."""
    return any(os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    ) or os.environ.get("AWS_SKIP_SIGNATURE", "").lower() == "true"


def _no_bucket(exc: BaseException) -> bool:
    """Whether ``exc`` says the bucket (S3, GCS) or container (Azure) does not exist."""
    text = str(exc)
    return any(code in text for code in ("<Code>NoSuchBucket</Code>", "ContainerNotFound",
                                         "The specified bucket does not exist"))


def _absent(exc: BaseException) -> bool:
    """Whether ``exc`` says an object is missing (and not its whole bucket)."""
    from obstore.exceptions import NotFoundError as Missing

    return isinstance(exc, (Missing, FileNotFoundError)) and not _no_bucket(exc)


def _first_line(exc: BaseException) -> str:
    """What went wrong, in one line: obstore's first line (its debug dump follows), and
    the code and message of a server's XML error."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300].rstrip(": ") if text else type(exc).__name__
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    if code:
        first += f" ({code[1]}{f': {message[1]}' if message else ''})"
    return first


_MEMORY: dict[str, Any] = {}  # memory:// stores by URL: shared within a process (tests)


class Store:
    """One folder of an object store, through obstore: keys are relative to it."""

    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        try:
            import obstore
            from obstore.store import from_url
        except ImportError:
            raise ImportError("remotes need obstore: pip install 'modelvault[remote]'"
                              ) from None

        found = store_url(url)
        if found is None:
            raise RemoteError(f"{url}: not a remote URL; use one of {', '.join(_SCHEMES)}")
        self.url = found.rstrip("/")
        self._obstore = obstore
        self._folder: Path | None = None  # file:// only
        options: dict[str, Any] = {}
        client: dict[str, Any] = {}
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        if self.url.startswith("s3://") and endpoint:
            options["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                client["allow_http"] = True
        if self.url.startswith("s3://") and not _aws_credentials() and os.environ.get(
                "AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            raise RemoteError(f"{self.url}: {_NO_AWS_CREDENTIALS}")
        if self.url.startswith(("az://", "abfs://")) and os.environ.get(
                "AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true"):
            client["allow_http"] = True  # Azurite, at AZURITE_BLOB_STORAGE_URL
        if self.url.startswith("memory://"):  # one store per name, in this process
            from obstore.store import MemoryStore

            self._store = _MEMORY.setdefault(self.url, MemoryStore())
        elif self.url.startswith("file://"):
            # Made on the first write (a read of a mistyped path creates nothing).
            self._folder = Path(self.url[len("file://"):])
            self._store = None
        else:
            try:
                self._store = from_url(self.url, client_options=client or None, **options)
            except Exception as exc:  # obstore's errors for a URL it cannot use
                raise RemoteError(f"{self.url}: not a store URL obstore can open "
                                  f"({_first_line(exc)})") from exc

    def _reach(self, *, write: bool = False) -> Any:
        """The obstore store; None for a file:// folder that does not exist (yet)."""
        if self._store is None and self._folder is not None:
            folder = self._folder
            if not folder.is_dir():
                if not write:
                    return None
                # Only the remote's own folder is made: a mistyped path must not
                # silently become a new remote.
                if not folder.parent.is_dir():
                    raise RemoteError(f"{self.url}: no folder {folder.parent}; a file:// "
                                      "remote's folder is made only inside one that exists")
                folder.mkdir(exist_ok=True)
            from obstore.store import LocalStore

            self._store = LocalStore(folder)
        return self._store

    def _regular(self, key: str) -> None:
        """IntegrityError naming ``key`` if, in a file:// folder, it is there but not a
        regular file (or a link to one): a named pipe would block a read forever, a
        device never end. Checked before obstore opens it, by path as obstore does."""
        if self._folder is None:
            return
        try:
            mode = os.stat(self._folder / key).st_mode
        except OSError:
            return  # missing (obstore says so) or unreachable (obstore's error names it)
        if not stat.S_ISREG(mode):
            raise IntegrityError(f"{self.url}/{key}: not a regular file (a named pipe, "
                                 "a device or a folder); a remote holds only files")

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """obstore's errors as ours, in one line naming the object: a remote that refuses
        us (no bucket, no credentials, permissions, network) is a RemoteError, never a
        raw obstore exception (some of which are built-in OSErrors) or a server's XML."""
        from obstore.exceptions import BaseError

        try:
            yield
        except (BaseError, OSError) as exc:
            text = str(exc)
            if _no_bucket(exc):
                bucket = self.url.split("://", 1)[1].split("/", 1)[0]
                raise RemoteError(f"{self.url}: there is no bucket {bucket!r}") from exc
            if "/latest/api/token" in text or "/latest/meta-data" in text:
                # Credentials came from nowhere, so the client asked the EC2 instance
                # metadata service last, and that refused (we are not on EC2).
                raise RemoteError(f"{self.url}: {_NO_AWS_CREDENTIALS}") from exc
            raise RemoteError(f"{self.url}/{key}: {_first_line(exc)}") from exc

    def get(self, key: str, kind: str) -> bytes | None:
        """An object's bytes; None if there is none. IntegrityError, before it is read,
        if it holds more than an object of ``kind`` may (``limit``)."""
        store = self._reach()
        if store is None:
            return None
        cap = limit(kind)
        self._regular(key)
        with self._errors(key):
            try:
                found = self._obstore.get(store, key)
                data = bytearray()
                if found.meta["size"] <= cap:  # the size as listed; then read with a bound
                    for piece in found.stream():
                        data += piece
                        if len(data) > cap:
                            break
            except Exception as exc:
                if _absent(exc):
                    return None
                raise
        if found.meta["size"] > cap or len(data) > cap:
            raise IntegrityError(
                f"{self.url}/{key}: {max(found.meta['size'], len(data))} bytes, more than "
                f"the {cap} a remote's {kind} object may hold (MODELVAULT_REMOTE_MAX_"
                f"{kind.upper()} raises that)")
        return bytes(data)

    def ranges(self, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
        """The byte ranges [start, end) of an object; FileNotFoundError if it is missing."""
        store = self._reach()
        got = None
        if store is not None:
            self._regular(key)
            with self._errors(key):
                try:
                    got = self._obstore.get_ranges(store, key, starts=[s for s, _ in spans],
                                                   ends=[e for _, e in spans])
                except Exception as exc:
                    if not _absent(exc):
                        raise
        if got is None:
            raise FileNotFoundError(f"{self.url}/{key}")
        return [bytes(b) for b in got]

    def put(self, key: str, data: bytes | list[bytes], *, create: bool = False) -> bool:
        """Write an object (``data``: its bytes, or its pieces in order); with ``create``,
        only if absent (False if it was there)."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        store = self._reach(write=True)
        with self._errors(key):
            try:
                self._obstore.put(store, key, data, mode="create" if create else "overwrite")
            except (AlreadyExistsError, PreconditionError):
                return False
        return True

    def list(self, prefix: str, after: str | None = None) -> list[dict[str, Any]]:
        """Objects under ``prefix`` (keys after ``after``, if given), by key."""
        store = self._reach()
        if store is None:
            return []
        found: list[dict[str, Any]] = []
        with self._errors(prefix):
            for batch in self._obstore.list(store, prefix=prefix, offset=after):
                found.extend(batch)
        found.sort(key=lambda meta: meta["path"])
        return found

    def delete(self, key: str) -> None:
        from obstore.exceptions import NotFoundError as Missing

        store = self._reach()
        if store is None:
            return
        with self._errors(key):
            try:
                self._obstore.delete(store, key)
            except (Missing, FileNotFoundError):
                pass  # gone already


# -- the log and what it says ----------------------------------------------------------


def _passes(check: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """``check`` (which raises on a bad value) as a yes/no question."""

    def passes(value: Any) -> bool:
        try:
            check(value)
        except (ValueError, TypeError, IntegrityError):
            return False
        return True

    return passes


_HASH = re.compile(r"[0-9a-f]{64}")  # a chunk's or pack object's name: hex BLAKE3
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# What each field of an event may hold (docs/remote.md, "The log"): a value from the
# remote reaches SQLite, a vault's aliases and tags, and object keys, only through these.
_FIELDS: dict[str, Callable[[Any], bool]] = {
    "uuid": lambda v: isinstance(v, str) and _UUID.fullmatch(v) is not None,
    "model": _passes(check_name),
    "alias": _passes(check_alias),
    "number": _passes(lambda v: check_number(v, "number")),
    "created_at": _passes(parse_time),
    "kind": lambda v: isinstance(v, str),
    "size": lambda v: type(v) is int and 0 <= v < 2**63,
    "key": lambda v: isinstance(v, str) and v != "",
    "value": lambda v: isinstance(v, str),
    "digest": lambda v: isinstance(v, str) and _HASH.fullmatch(v) is not None,
}
_EVENTS = {"add": ("model", "uuid", "number", "created_at", "kind", "size"),
           "alias": ("model", "alias"), "tag": ("uuid", "key"), "delete": ("uuid",)}


def _well_formed(event: Any) -> bool:
    """Whether ``event`` is one this format defines: an op, the fields it needs, and
    every field it has of its type and range (null only where it means "remove")."""
    return (isinstance(event, dict) and event.get("op") in _EVENTS
            and all(event.get(f) is not None for f in _EVENTS[event["op"]])
            and all(value is None or _FIELDS[f](value) for f, value in event.items()
                    if f in _FIELDS))


@dataclass
class State:
    """The remote as its log tells it, up to entry ``seq``."""

    seq: int = 0
    last: dict[str, int] = field(default_factory=dict)  # model: last number given out
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # uuid: entry
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # model: alias: uuid
    deleted: set[str] = field(default_factory=set)  # uuids deleted there

    @classmethod
    def restore(cls, saved: Any) -> State:
        """The state a checkpoint holds (``dump``); ValueError (or KeyError, TypeError)
        unless it is one replaying well-formed events could give."""
        state = cls(saved["seq"], dict(saved["last"]), dict(saved["versions"]),
                    {m: dict(a) for m, a in saved["aliases"].items()}, set(saved["deleted"]))
        if not (type(state.seq) is int and 0 <= state.seq < 2**62
                and all(_FIELDS["model"](m) and _FIELDS["number"](n)
                        for m, n in state.last.items())
                and all(isinstance(e, dict) and _well_formed({**e, "op": "add", "uuid": u})
                        and e["number"] <= state.last.get(e["model"], 0)
                        and isinstance(e.get("tags"), dict)
                        and all(_FIELDS["key"](k) and _FIELDS["value"](v)
                                for k, v in e["tags"].items())
                        for u, e in state.versions.items())
                and all(_FIELDS["alias"](a) and state.versions.get(u, {}).get("model") == m
                        for m, aliases in state.aliases.items() for a, u in aliases.items())
                and all(_FIELDS["uuid"](u) for u in state.deleted)):
            raise ValueError("not a state the log could give")
        return state

    def apply(self, events: Iterable[dict[str, Any]]) -> None:
        """Replay one entry's events. An event naming what is not there does nothing,
        so every reader replays a log to the same state."""
        for event in events:
            if not _well_formed(event):
                continue  # not an event this format defines: every reader skips it alike
            op = event["op"]
            uuid = event.get("uuid")
            if op == "add" and uuid not in self.versions:
                model = event["model"]
                number = max(event["number"], self.last.get(model, 0) + 1)  # else taken
                if not _FIELDS["number"](number):
                    continue  # the model has given out every number
                self.last[model] = number
                self.deleted.discard(uuid)
                self.versions[uuid] = {"model": model, "number": number, "tags": {},
                                       **{k: event.get(k) for k in ("created_at", "kind",
                                                                   "size", "digest")}}
            elif op == "alias" and (uuid is None or uuid in self.versions):
                aliases = self.aliases.setdefault(event["model"], {})
                if uuid is None:
                    aliases.pop(event["alias"], None)
                elif self.versions[uuid]["model"] == event["model"]:
                    aliases[event["alias"]] = uuid
            elif op == "tag" and uuid in self.versions:
                tags = self.versions[uuid]["tags"]
                if event.get("value") is None:
                    tags.pop(event["key"], None)
                else:
                    tags[event["key"]] = event["value"]
            elif op == "delete" and uuid in self.versions:
                self.deleted.add(uuid)
                model = self.versions.pop(uuid)["model"]
                for alias, target in list(self.aliases.get(model, {}).items()):
                    if target == uuid:
                        del self.aliases[model][alias]

    def resolve(self, text: str) -> str:
        """The uuid of the version ``text`` (name, name:N, name@alias) names."""
        ref = parse_ref(text)
        mine = {u: v for u, v in self.versions.items() if v["model"] == ref.name}
        if not mine:
            raise NotFoundError(f"no model {ref.name!r} on the remote")
        if ref.alias is not None:
            if ref.alias not in self.aliases.get(ref.name, {}):
                raise NotFoundError(f"no alias {ref.name}@{ref.alias} on the remote")
            return self.aliases[ref.name][ref.alias]
        if ref.version is None:
            return max(mine, key=lambda u: mine[u]["number"])
        for uuid, entry in mine.items():
            if entry["number"] == ref.version:
                return uuid
        raise NotFoundError(f"no version {ref.name}:{ref.version} on the remote")

    def record(self, uuid: str) -> RemoteVersion:
        entry = self.versions[uuid]
        aliases = tuple(sorted(a for a, u in self.aliases.get(entry["model"], {}).items()
                               if u == uuid))
        return RemoteVersion(entry["model"], entry["number"], uuid, entry["created_at"],
                             entry["kind"], entry["size"], aliases, dict(entry["tags"]))

    def dump(self) -> dict[str, Any]:
        return {"seq": self.seq, "last": self.last, "versions": self.versions,
                "aliases": self.aliases, "deleted": sorted(self.deleted)}


def _cache_dir(url: str) -> Path | None:
    """Where this machine keeps the pack indexes of the remote at ``url`` (None for
    memory:// remotes, which live no longer than the process)."""
    if url.startswith("memory://"):
        return None
    if os.environ.get("MODELVAULT_HOME"):
        base = Path(os.environ["MODELVAULT_HOME"]) / "cache"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelvault"
    import hashlib

    return base / "remotes" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _read_cached(cache: Path | None, name: str) -> bytes | None:
    try:
        return None if cache is None else (cache / name).read_bytes()
    except OSError:
        return None


def _write_cached(cache: Path | None, name: str, data: bytes) -> None:
    """Keep ``data`` as ``name`` in the cache; a cache that cannot be written is skipped."""
    if cache is None or not data:
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{name}.{secrets.token_hex(4)}"
        partial.write_bytes(data)
        os.replace(partial, cache / name)
    except OSError:
        pass


def _read_index(name: str, data: bytes, size: int) -> list[dict[str, Any]] | None:
    """The chunks (a dict of _CHUNK_FIELDS, "pack" and "span" each) the index ``data``
    of the pack object ``name``, listed with ``size`` bytes, gives; None unless it is
    well-formed (docs/remote.md) and matches that object: its ``pack`` is ``name``, its
    blobs lie back to back from byte 0 to ``size``, and every chunk lies in its blob."""
    try:
        idx = _json.loads(data)
        blobs, rows = idx["blobs"], idx["chunks"]
        if not (idx["pack"] == name and _HASH.fullmatch(name) and size <= limit("pack")
                and isinstance(blobs, list) and isinstance(rows, list)):
            return None
        at = 0
        for blob in blobs:
            offset, stop, codec, content = blob
            if not (offset == at and type(stop) is int and at <= stop
                    <= at + 2 * _chunks.MAX_PACK and isinstance(codec, str)
                    and type(content) is int and 0 <= content <= _chunks.MAX_PACK):
                return None
            at = stop
        if at != size:
            return None
        entries = []
        for row in rows:
            entry = dict(zip(_CHUNK_FIELDS, row, strict=True))
            _chunks.check_row(entry["size"], entry["codec"], entry["itemsize"], 0,
                              entry["start"], entry["length"])
            blob = entry["blob"]
            if not (isinstance(entry["hash"], str) and _HASH.fullmatch(entry["hash"])
                    and (entry["base"] is None or (isinstance(entry["base"], str)
                                                   and _HASH.fullmatch(entry["base"])))
                    and type(blob) is int and 0 <= blob < len(blobs)
                    and entry["start"] + entry["length"] <= blobs[blob][3]):
                return None
            entries.append({**entry, "pack": name, "span": blobs[blob]})
        return entries
    except (ValueError, KeyError, TypeError, IntegrityError):
        return None


def _log_key(seq: int) -> str:
    return f"log/{seq:012d}.json"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class Remote:
    """A modelvault remote at ``url``."""

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 single_writer: bool = False) -> None:
        self.store = Store(url, endpoint_url=endpoint_url)
        self.url = self.store.url
        self.single_writer = single_writer
        self._state = State()
        self._index: dict[str, dict[str, Any]] = {}  # chunk hash: where it is
        self._indexed: set[str] = set()  # pack indexes read into _index
        self.packs_of: dict[str, set[str]] = {}  # pack object name: its chunk hashes
        self.orphans: list[str] = []  # pack indexes whose .pack is missing
        self.bases_of: dict[str, set[str]] = {}  # chunk hash: its delta bases, every copy
        self.distrusted: dict[str, str] = {}  # pack object: what a pull found wrong in it
        self._checked: dict[str, set[str]] = {}  # pack object: its chunks checked here
        self._cache = _cache_dir(self.url)
        self._probed = False

    # -- reading ----------------------------------------------------------------------

    def _check_descriptor(self, *, create: bool) -> None:
        data = self.store.get(DESCRIPTOR, "descriptor")
        if data is None:
            if not create:
                raise NotFoundError(f"{self.url}: no modelvault remote here (push to it first)")
            self.store.put(DESCRIPTOR, _dumps({"format": "modelvault-remote",
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

    def state(self) -> State:
        """Replay the log from the last checkpoint (or the state read before)."""
        state = self._state
        if state.seq == 0:
            points = self.store.list("checkpoints/")
            if points:
                try:
                    data = self.store.get(points[-1]["path"], "checkpoint")
                    state = State.restore(_json.loads(data or b""))
                except (ValueError, KeyError, TypeError, IntegrityError):
                    state = State()  # a damaged checkpoint: the log alone decides
        keys = []
        for meta in self.store.list("log/", after=_log_key(state.seq)):
            name = meta["path"].rsplit("/", 1)[1].split(".")[0]
            if not name.isdigit() or int(name) != state.seq + 1 + len(keys):
                break  # a gap: entries are created in order, so it is one being made
            keys.append(meta["path"])
        # Fetched side by side (obstore lets go of the GIL), applied in order.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(keys) or 1)) as pool:
            entries = list(pool.map(lambda key: self.store.get(key, "log"), keys))
        for key, data in zip(keys, entries, strict=True):
            try:
                events = _json.loads(data or b"")["events"]
                if not isinstance(events, list):
                    raise TypeError("events is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                raise IntegrityError(f"{self.url}/{key}: unreadable log entry ({exc}); the "
                                     "remote's history cannot be read past it") from exc
            state.apply(events)
            state.seq += 1
        self._state = state
        return state

    def versions(self) -> list[RemoteVersion]:
        """Every version on the remote, by model and number (no weights read)."""
        self._check_descriptor(create=False)
        state = self.state()
        return sorted((state.record(u) for u in state.versions),
                      key=lambda r: (r.name, r.version))

    def index(self) -> dict[str, dict[str, Any]]:
        """Every chunk on the remote by hash: a pack object holding it, its blob and place.

        Only pack objects whose ``.pack`` and ``.idx`` are both listed count (a push
        writes the pack first; a gc deletes the index first), and of those only where
        the index is well-formed and matches its ``.pack`` as listed (``_read_index``):
        a push must not skip a chunk an index claims in a pack object that is not there,
        or every pull would fail and no push would mend it. Pack indexes never change
        once written (their names are their content's hash), so they are kept in a
        cache folder on this machine: a push or pull lists the pack objects and fetches
        only the indexes it has not seen, or whose listed size is not the one kept (one
        rewritten there counts as it is now). ``self.packs_of`` gives every pack
        object's chunk hashes. A pack object a pull found bad (``distrust``) does not
        count.
        """
        cache = self._cache
        listed = {m["path"]: m["size"] for m in self.store.list("packs/")}
        pairs = sorted(k for k in listed if k.endswith(".idx") and f"{k[:-4]}.pack" in listed)
        self.orphans = sorted(k for k in listed if k.endswith(".idx") and k not in pairs)
        for key in pairs:
            name = key.rsplit("/", 1)[1]
            if key in self._indexed or name[:-4] in self.distrusted:
                continue
            data = _read_cached(cache, name)
            if data is None or len(data) != listed[key]:  # new here, or changed there
                try:
                    data = self.store.get(key, "index")
                except IntegrityError:
                    data = b""  # too large to be a writer's: it does not count
                if data is None:
                    continue  # a remote gc deleted it after the listing: not there
                _write_cached(cache, name, data)
            entries = _read_index(name[:-4], data, listed[f"{key[:-4]}.pack"])
            if entries is None:
                continue  # as if absent: a push sends its chunks again, gc deletes it
            for entry in entries:
                self._index.setdefault(entry["hash"], entry)
                if entry["base"]:
                    self.bases_of.setdefault(entry["hash"], set()).add(entry["base"])
            self.packs_of[name[:-4]] = {entry["hash"] for entry in entries}
            self._indexed.add(key)
        if not self._indexed <= set(pairs):  # a gc deleted some: rebuild (from the cache)
            self._forget()
            return self.index()
        if cache is not None and cache.is_dir():  # of pack objects a remote gc deleted
            names = {key.rsplit("/", 1)[1][:-4] for key in pairs}
            for stale in os.listdir(cache):
                if stale.endswith((".idx", ".ok")) and stale.rsplit(".", 1)[0] not in names:
                    (cache / stale).unlink(missing_ok=True)
        return self._index

    def _forget(self) -> None:
        """Drop the chunk index read so far: the next ``index`` reads it again."""
        self._index, self._indexed, self.packs_of, self.bases_of = {}, set(), {}, {}

    def distrust(self, pack: str, why: str) -> None:
        """Take the pack object ``pack`` as absent from now on (a pull found that it
        does not hold what its index says, ``why``): its chunks come from other copies."""
        self.distrusted[pack] = why
        self._forget()

    def checked(self) -> set[str]:
        """The chunks this machine has checked in a pack object that holds them (it
        pushed them there, pulled them from it, or compared them with its own): a push
        need not read those again. Pack objects never change, so this is kept in the
        cache folder beside their indexes, as ``<h>.ok`` (the chunks' hashes)."""
        found: set[str] = set()
        for name, hashes in self.packs_of.items():
            found |= self._checked_in(name) & hashes
        return found

    def mark_checked(self, pack: str, hashes: Iterable[str]) -> None:
        """Remember that the chunks ``hashes`` of the pack object ``pack`` were checked."""
        hashes, known = set(hashes), self._checked_in(pack)
        if not known.issuperset(hashes):
            known.update(hashes)
            _write_cached(self._cache, f"{pack}.ok", "\n".join(sorted(known)).encode())

    def _checked_in(self, pack: str) -> set[str]:
        if pack not in self._checked:
            data = _read_cached(self._cache, f"{pack}.ok") or b""
            self._checked[pack] = set(data.decode("ascii", "replace").split())
        return self._checked[pack]

    def lost(self, chunk: str) -> str:
        """Why ``chunk`` is in no pack object: one whose index names it but whose
        ``.pack`` is missing, or that a pull found bad, if there is one."""
        whys = {key: "is missing" for key in self.orphans}
        whys.update({f"packs/{name}.idx": why for name, why in self.distrusted.items()})
        for key, why in whys.items():
            try:
                data = self.store.get(key, "index") or b""
            except IntegrityError:
                continue  # too big to be one of ours
            if chunk.encode() in data:
                return f"{self.url}/{key[:-4]}.pack {why} (its index names chunk {chunk})"
        return f"{self.url}: chunk {chunk} is in no pack object"

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

    def _probe(self) -> None:
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

    def commit(self, make: Callable[[State], list[dict[str, Any]]]) -> tuple[State, int]:
        """Append the events ``make`` gives for the current state as the next log entry,
        reading and trying again when another writer took that entry first. Returns the
        state after it and the entry's number (0 if ``make`` gave no events)."""
        while True:
            state = self.state()
            events = make(state)
            if not events:
                return state, 0

            entry = _dumps({"at": now(), "by": f"{os.environ.get('USER', '?')}@"
                            f"{socket.gethostname()}", "events": events})
            if len(entry) > limit("log"):  # readers would refuse it
                raise RemoteError(f"{self.url}: this log entry would be {len(entry)} bytes, "
                                  f"more than the {limit('log')} readers take; push fewer "
                                  "versions at once")
            seq = state.seq + 1
            if self.store.put(_log_key(seq), entry, create=True):
                state.apply(events)
                state.seq = seq
                point = _dumps(state.dump()) if seq % CHECKPOINT_EVERY == 0 else b""
                if point and len(point) <= limit("checkpoint"):  # else readers ignore it
                    self.store.put(f"checkpoints/{seq:012d}.json", point, create=True)
                return state, seq

    def _lock(self, kind: str) -> str:
        """Create a lock object ``locks/<kind>-<random>.json`` (kind "push" or "gc");
        RemoteError if a lock that keeps this one out is held: a gc keeps pushes and
        other gcs out, a push keeps gcs out. Each side creates its own, then looks for
        the others', so of two starting together at least one sees the other."""
        key = f"locks/{kind}-{secrets.token_hex(8)}.json"
        self.renew(key)
        try:
            self._others(key, ("locks/gc-",) if kind == "push" else ("locks/gc-",
                                                                      "locks/push-"))
        except RemoteError:
            self.store.delete(key)
            raise
        return key

    def _others(self, mine: str, kinds: tuple[str, ...]) -> None:
        """RemoteError if an unexpired lock of ``kinds`` other than ``mine`` is held."""
        held = [m["path"] for m in self.store.list("locks/")
                if m["path"] != mine and m["path"].startswith(kinds)
                and not self._expired(m["path"])]
        if held:
            what = "a remote gc is running" if "/gc-" in held[0] else "a push is in progress"
            raise RemoteError(f"{self.url}: {what} ({held[0]}); try again when it is done")

    def renew(self, key: str) -> None:
        """Write (or push back the expiry of) the lock ``key``, held by this process."""
        self.store.put(key, _dumps({"expires": time.time() + LOCK_LIFE,
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
        self._check_descriptor(create=False)
        self._probe()
        found: list[RemoteVersion] = []

        def make(state: State) -> list[dict[str, Any]]:
            uuid = state.resolve(ref)
            found[:] = [state.record(uuid)]
            return [{"op": "delete", "uuid": uuid}]

        self.commit(make)
        return found[0]

    def gc(self, grace: float = GRACE) -> RemoteGcReport:
        """Delete pack objects no version on the remote uses, and manifests of deleted
        versions, that are older than ``grace`` seconds; a push in flight stops it."""
        self._check_descriptor(create=False)
        self._probe()
        lock = self._lock("gc")
        try:
            state = self.state()
            self.index()
            live: set[str] = set()
            for uuid in state.versions:
                for hashes in self.manifest(uuid)["chunks"]:
                    live.update(hashes)
            todo = list(live)
            while todo:  # and their delta bases, those of every copy of a chunk
                for base in self.bases_of.get(todo.pop(), ()):
                    if base not in live:
                        live.add(base)
                        todo.append(base)
            used = {pack for pack, hashes in self.packs_of.items() if hashes & live}
            cutoff = time.time() - grace
            listed = {m["path"]: m for m in self.store.list("packs/")}
            doomed: list[str] = []
            for key in sorted(listed):  # a pack object with its index, judged as a pair
                name, kind = key.rsplit("/", 1)[1].rsplit(".", 1)
                if kind != "pack" or name in used:
                    continue
                pair = [m for m in (listed.get(key), listed.get(f"packs/{name}.idx")) if m]
                if max(m["last_modified"].timestamp() for m in pair) <= cutoff:
                    doomed += [f"packs/{name}.idx", key]  # the index first: never a
                    # listed index without its pack
            doomed += [key for key in listed if key.endswith(".idx")
                       and f"{key[:-4]}.pack" not in listed
                       and listed[key]["last_modified"].timestamp() <= cutoff]
            doomed += [m["path"] for m in self.store.list("versions/")
                       if m["path"].rsplit("/", 1)[1][:-5] not in state.versions
                       and m["last_modified"].timestamp() <= cutoff]
            sizes = {m["path"]: m["size"] for m in self.store.list("versions/")}
            sizes.update({k: m["size"] for k, m in listed.items()})
            # Last look before deleting: a push whose lock had expired may be back.
            self.renew(lock)
            self._others(lock, ("locks/push-", "locks/gc-"))
            for key in doomed:
                self.store.delete(key)
            return RemoteGcReport(len([k for k in doomed if k in sizes]),
                                  sum(sizes.get(k, 0) for k in doomed))
        finally:
            self.store.delete(lock)


# -- push ---------------------------------------------------------------------------------


def _manifest(db: Any, row: Any, hashes: list[list[str]], lineage: bool) -> dict[str, Any]:
    """A version's rows, as the remote keeps them (docs/remote.md)."""
    columns = ", ".join(f"v.{f}" for f in _VERSION_FIELDS)
    values = db.execute(f"SELECT {columns}, e.json FROM versions v LEFT JOIN environments e "
                        "ON e.id = v.environment_id WHERE v.id = ?", (row.id,)).fetchone()
    parts = [dict(zip(_PART_FIELDS, r, strict=True)) for r in db.execute(
        f"SELECT {', '.join(_PART_FIELDS)} FROM parts WHERE version_id = ? ORDER BY part",
        (row.id,))]
    found = db.execute("SELECT parent, source FROM lineage WHERE version_id = ?",
                       (row.id,)).fetchone() if lineage else None
    return {"format": FORMAT, "model": row.name,
            "version": dict(zip(_VERSION_FIELDS, values[:-1], strict=True)),
            "environment": values[-1], "parts": parts, "chunks": hashes,
            "lineage": None if found is None else {"parent": found[0], "source": found[1]}}


def push(vault: Vault, remote: Remote, refs: Sequence[Ref] | None) -> PushReport:
    remote._check_descriptor(create=True)
    remote._probe()
    lock = remote._lock("push")

    def renew() -> None:
        # Pushed an hour on; and a gc that started meanwhile (this lock had expired)
        # stops this push before it can rely on chunks that gc may delete.
        remote.renew(lock)
        remote._others(lock, ("locks/gc-",))

    try:
        return _push(vault, remote, refs, renew)
    finally:
        remote.store.delete(lock)


def _push(vault: Vault, remote: Remote, refs: Sequence[Ref] | None,
          renew: Callable[[], None]) -> PushReport:
    connection, catalog = vault._connection, vault._catalog
    state = remote.state()
    with connection.lock, connection.read() as db:
        rows = ([catalog.resolve(r) for r in refs] if refs is not None
                else catalog.rows())
        rows = list({r.id: r for r in rows}.values())
        # A version deleted on the remote goes back only if named: someone removed it.
        new = [r for r in rows if r.uuid not in state.versions
               and (refs is not None or r.uuid not in state.deleted)]
        lineage = connection.format >= 5
        manifests, chunk_ids = {}, set()
        for row in new:
            contents = catalog.contents(row)
            catalog.check(row, contents)
            manifests[row.uuid] = _dumps(_manifest(db, row, [[c.hash for c in chunks]
                                                             for chunks in contents.chunks],
                                                   lineage))
            chunk_ids.update(c.id for chunks in contents.chunks for c in chunks)
            size = len(manifests[row.uuid])
            if size > limit("manifest"):  # readers would refuse it: send nothing
                raise RemoteError(f"{row.where}: its manifest would be {size} bytes, more "
                                  f"than the {limit('manifest')} readers take")
        # Labels go along for the versions sent, and for those named: a vault that is
        # behind must not move back the remote's aliases of versions it did not push.
        labels = {r.uuid: r.name for r in (rows if refs is not None else new)}
        aliases = {(name, a): uuid for uuid, name in labels.items()
                   for (a,) in db.execute(
                       "SELECT a.alias FROM aliases a JOIN versions v ON v.id = a.version_id "
                       "WHERE v.uuid = ?", (uuid,))}
        tags = {uuid: dict(db.execute("SELECT t.key, t.value FROM tags t JOIN versions v "
                                      "ON v.id = t.version_id WHERE v.uuid = ?", (uuid,)))
                for uuid in labels}
        # The chunks and their delta bases, by id, pinned so that no gc here takes them
        # while they upload (after this read, which may end before the upload does).
        # Those of the versions sent are skipped only where a copy on the remote is
        # known good; those of the versions there already, where one is listed: a
        # pack object lost or found bad since is sent again, so a push mends it.
        closure = _with_bases(db, chunk_ids)
        there = _with_bases(db, {i for (i,) in _in_batches(
            db, "SELECT DISTINCT chunk_id FROM part_chunks WHERE version_id IN ({})",
            [r.id for r in rows if r.uuid in state.versions])}) - closure
        pin = _pins.Pin(connection.lock_file, closure | there)
    sent = _Sent()
    try:
        # Until a fresh listing of the remote shows every chunk: one more pass finds
        # what a remote gc took meanwhile (it can, if this push's lock expired).
        for _ in range(3):
            renew()
            more = _upload(vault, remote, closure, there, renew)
            sent.chunks += more.chunks
            sent.bytes += more.bytes
            if not more.chunks:
                break
        else:
            raise RemoteError(f"{remote.url}: chunks kept disappearing while this push ran "
                              "(a remote gc?); nothing was added: push again")
    finally:
        pin.release()
    for uuid, manifest in manifests.items():
        key = f"versions/{uuid}.json"
        # One there already is ours only if it is the same bytes (an earlier run of this
        # push); another's would give pullers other contents under this version's entry.
        if not remote.store.put(key, manifest, create=True) and remote.store.get(
                key, "manifest") != manifest:
            raise RemoteError(f"{remote.url}/{key} exists and is not this version's "
                              "manifest: someone else wrote it (delete it there if so); "
                              "nothing was added")
    renew()

    def make(state: State) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        last = dict(state.last)
        for row in sorted(new, key=lambda r: (r.name, r.version)):
            if row.uuid in state.versions:
                continue  # another pusher brought it meanwhile
            # Its number here, unless the remote gave it out: then the next one there.
            number = row.version if row.version > last.get(row.name, 0) else (
                last.get(row.name, 0) + 1)
            last[row.name] = number
            events.append({"op": "add", "model": row.name, "uuid": row.uuid,
                           "number": number, "created_at": row.created_at,
                           "kind": row.kind, "size": row.size, "digest": row.digest})
        known = {e["uuid"] for e in events} | set(state.versions)
        for (name, alias), uuid in sorted(aliases.items()):
            if uuid in known and state.aliases.get(name, {}).get(alias) != uuid:
                events.append({"op": "alias", "model": name, "alias": alias, "uuid": uuid})
        for uuid, mine in sorted(tags.items()):
            theirs = state.versions.get(uuid, {}).get("tags", {})
            for key, value in sorted(mine.items()):
                if uuid in known and theirs.get(key) != value:
                    events.append({"op": "tag", "uuid": uuid, "key": key, "value": value})
        return events

    state, _ = remote.commit(make)
    added = tuple(state.record(r.uuid) for r in new if r.uuid in state.versions)
    return PushReport(added, sent.chunks, sent.bytes)


def _in_batches(db: Any, sql: str, values: Iterable[Any]) -> list[Any]:
    """The rows ``sql`` gives for ``values`` (its ``{}``: their placeholders), 500 at a
    time: SQLite takes only so many variables in one statement."""
    ordered, rows = sorted(values), []
    for first in range(0, len(ordered), 500):
        some = ordered[first:first + 500]
        rows += db.execute(sql.format(",".join("?" * len(some))), some).fetchall()
    return rows


def _with_bases(db: Any, ids: set[int]) -> set[int]:
    found, todo = set(ids), set(ids)
    while todo:
        todo = {b for (b,) in _in_batches(db, "SELECT base_id FROM chunks WHERE id IN ({}) "
                                          "AND base_id IS NOT NULL", todo)} - found
        found |= todo
    return found


@dataclass
class _Sent:
    chunks: int = 0
    bytes: int = 0


def _upload(vault: Vault, remote: Remote, ids: set[int], there: set[int],
            renew: Callable[[], None]) -> _Sent:
    """Upload, in pack objects, the chunks among ``ids`` the remote lacks or has in no
    copy known good (``_compare``), and those among ``there`` it does not list;
    ``renew`` after each (the push's lock)."""
    connection = vault._connection
    sent = _Sent()
    index = remote.index()
    with connection.lock, connection.read() as db:
        rows = _push_rows(db, ids)
        listed = [r for r in _push_rows(db, there) if r[1] not in index]
    known = remote.checked()
    good = known | _compare(vault, remote, index,
                            [r for r in rows if r[1] in index and r[1] not in known])
    missing = sorted([r for r in rows if r[1] not in good] + listed,
                     key=lambda r: (r[6], r[7]))
    if not missing:
        return sent
    total = sum(r[8] for r in missing)
    with progress(total, f"push to {remote.url}", vault.progress) as advance:
        writer = _PackWriter(remote, sent, advance, renew)
        try:
            _gather(vault, writer, missing)
            writer.flush()
        finally:
            writer.shutdown()
    return sent


def _push_rows(db: Any, ids: Iterable[int]) -> list[tuple[Any, ...]]:
    """Rows of the chunks ``ids`` as a push needs them: id, hash, size, codec, itemsize,
    its delta base's hash, pack_id, start, length."""
    return _in_batches(db, "SELECT c.id, c.hash, c.size, c.codec, c.itemsize, b.hash, "
                       "c.pack_id, c.start, c.length FROM chunks c LEFT JOIN chunks b ON "
                       "b.id = c.base_id WHERE c.id IN ({})", ids)


def _compare(vault: Vault, remote: Remote, index: dict[str, Any], rows: list[Any]
             ) -> set[str]:
    """The chunks among ``rows`` whose copy on the remote, where ``index`` places it, is
    this vault's: the same size, codecs, delta base and stored bytes (so it decodes to
    its hash as ours does). Read with one ranged get per pack object, of the blobs
    holding them; remembered (``Remote.mark_checked``). A copy that differs, or cannot
    be read, is not known good: the push sends ours (pack objects named by anyone's
    bytes may hold anything)."""
    mine = {}
    for group, (codec, size, data), _ in _local_packs(vault, rows):
        content = _content(vault, group, codec, size, data)
        for r in group:
            stored = _chunks.blake3.blake3(content[r[7]:r[7] + r[8]]).digest()
            mine[r[1]] = (r[2], r[3], r[4], r[5], stored)
    good: set[str] = set()
    for name, blobs in _by_object(index, mine):
        try:
            datas = remote.store.ranges(f"packs/{name}.pack", _spans(index, blobs))
        except (FileNotFoundError, IntegrityError):
            continue  # gone, or not a file: no copy there
        same = set()
        for (_, hashes), data in zip(sorted(blobs.items()), datas, strict=True):
            span = index[hashes[0]]["span"]
            content = _chunks.pack_content(span[2], span[3], data)
            for h in hashes if not isinstance(content, str) else ():
                e = index[h]
                stored = _chunks.blake3.blake3(content[e["start"]:e["start"] + e["length"]])
                if (e["size"], e["codec"], e["itemsize"], e["base"],
                        stored.digest()) == mine[h]:
                    same.add(h)
        remote.mark_checked(name, same)
        good |= same
    return good


def _by_object(index: dict[str, Any], hashes: Iterable[str]
               ) -> list[tuple[str, dict[int, list[str]]]]:
    """The pack objects ``index`` places ``hashes`` in, each with its blobs holding them
    and theirs, by name."""
    found: dict[str, dict[int, list[str]]] = {}
    for h in hashes:
        e = index[h]
        found.setdefault(e["pack"], {}).setdefault(e["blob"], []).append(h)
    return sorted(found.items())


def _spans(index: dict[str, Any], blobs: dict[int, list[str]]) -> list[tuple[int, int]]:
    """The byte ranges of a pack object's ``blobs`` (``_by_object``), in blob order."""
    spans = [index[blobs[b][0]]["span"] for b in sorted(blobs)]
    return [(start, end) for start, end, *_ in spans]


def _local_packs(vault: Vault, rows: list[Any]) -> Iterator[tuple[list[Any], Any, bool]]:
    """This vault's packs holding the chunk rows ``rows``: (the rows in it, (codec,
    size, data), whether they are all of its chunks), pack by pack. Each group's rows
    are read again with their pack, in one read: a gc here may have moved the chunks
    (they are pinned, so they are somewhere) since they were listed."""
    connection = vault._connection
    for _, listed in _by_pack(sorted(rows, key=lambda r: (r[6], r[7]))):
        ids = [r[0] for r in listed]
        with connection.lock, connection.read() as db:
            fresh = sorted(_push_rows(db, ids), key=lambda r: (r[6], r[7]))
            if len(fresh) != len(ids):
                raise IntegrityError(f"{vault.path}: {len(ids) - len(fresh)} chunk(s) to "
                                     "push are missing; run verify()")
            packs = []
            for pack_id, group in _by_pack(fresh):
                found = db.execute("SELECT codec, size, data FROM packs WHERE id = ?",
                                   (pack_id,)).fetchone()
                if found is None:
                    raise IntegrityError(f"{vault.path}: pack {pack_id} is missing; run "
                                         "verify()")
                whole = db.execute("SELECT count(*) FROM chunks WHERE pack_id = ?",
                                   (pack_id,)).fetchone()[0] == len(group)
                packs.append((group, found, whole))
        yield from packs


def _content(vault: Vault, group: list[Any], codec: str, size: int, data: bytes) -> bytes:
    """What the chunks ``group`` point into, of this vault's pack (codec, size, data)."""
    content = _chunks.pack_content(codec, size, data)
    if isinstance(content, str):
        raise IntegrityError(f"{vault.path}: pack {group[0][6]}: {content}")
    return content


def _gather(vault: Vault, writer: _PackWriter, missing: list[Any]) -> None:
    """Hand ``writer`` the chunk rows ``missing``, pack by pack of this vault: a pack
    whose chunks all go, as it is; of another, those chunks packed anew."""
    for group, (codec, size, data), whole in _local_packs(vault, missing):
        if whole:
            writer.add(codec, size, bytes(data), [(r, r[7]) for r in group])
            continue
        content = _content(vault, group, codec, size, data)
        pieces = [content[r[7]:r[7] + r[8]] for r in group]
        if codec == "raw":
            writer.add("raw", sum(map(len, pieces)), b"".join(pieces), _placed(group, pieces))
        else:  # a solid pack's chunks, compressed together again
            new_codec, packed = _chunks.solid(pieces)
            writer.add(new_codec, sum(map(len, pieces)), packed, _placed(group, pieces))


def _placed(group: list[Any], pieces: list[bytes]) -> list[tuple[Any, int]]:
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece)
    return list(zip(group, starts, strict=True))


def _by_pack(rows: list[Any]) -> Iterator[tuple[int, list[Any]]]:
    group: list[Any] = []
    for row in rows:
        if group and group[-1][6] != row[6]:
            yield group[0][6], group
            group = []
        group.append(row)
    if group:
        yield group[0][6], group


class _PackWriter:
    """Blobs (vault packs) gathered into pack objects of about PACK_OBJECT bytes, each
    uploaded with its index once full, on a thread of its own: the next object is read
    from the vault while the last one uploads (obstore lets go of the GIL)."""

    def __init__(self, remote: Remote, sent: _Sent, advance: Callable[[int], Any],
                 renew: Callable[[], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._renew = renew
        self._remote = remote
        self._sent = sent
        self._advance = advance
        self._blobs: list[bytes] = []
        self._spans: list[list[Any]] = []
        self._chunks: list[list[Any]] = []
        self._bytes = 0
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="modelvault-push")
        self._uploading: Any = None

    def add(self, codec: str, size: int, data: bytes, placed: list[tuple[Any, int]]) -> None:
        blob = len(self._blobs)
        self._spans.append([self._bytes, self._bytes + len(data), codec, size])
        self._blobs.append(data)
        self._bytes += len(data)
        for row, start in placed:
            self._chunks.append([row[1], row[2], row[3], row[4], row[5], blob, start, row[8]])
        self._advance(sum(row[8] for row, _ in placed))
        if self._bytes >= PACK_OBJECT or len(self._chunks) >= INDEX_ROWS:
            self._send()

    def _send(self) -> None:
        if not self._blobs:
            return
        data = self._blobs  # uploaded piece by piece, never joined into one copy
        # Named by its bytes and what its index says of them: equal bytes can hold other
        # chunks (the same XOR delta between two other pairs of versions).
        described = _dumps({"blobs": self._spans, "chunks": self._chunks})
        hasher = _chunks.blake3.blake3()
        for blob in data:
            hasher.update(blob)
        hasher.update(described)
        name = hasher.hexdigest()
        index = _dumps({"pack": name, "blobs": self._spans, "chunks": self._chunks})
        self._wait()
        self._uploading = self._uploader.submit(self._upload, name, data, index,
                                                [row[0] for row in self._chunks])
        self._sent.chunks += len(self._chunks)
        self._sent.bytes += self._bytes
        self._blobs, self._spans, self._chunks, self._bytes = [], [], [], 0

    def _upload(self, name: str, data: list[bytes], index: bytes, hashes: list[str]
                ) -> None:
        # Data first, then its index: an index never names bytes that are not there.
        self._remote.store.put(f"packs/{name}.pack", data)
        self._remote.store.put(f"packs/{name}.idx", index)
        self._remote.mark_checked(name, hashes)  # our own bytes: no need to read them
        self._renew()

    def _wait(self) -> None:
        if self._uploading is not None:
            uploading, self._uploading = self._uploading, None
            uploading.result()

    def flush(self) -> None:
        """Send what is gathered and wait for every upload (raising what one raised)."""
        self._send()
        self._wait()

    def shutdown(self) -> None:
        self._uploader.shutdown(wait=True)


# -- pull ---------------------------------------------------------------------------------


class _BadPack(IntegrityError):
    """A pack object that does not hold what its index says (``why``): a pull takes it
    as absent and tries again, with other copies of its chunks."""

    def __init__(self, pack: str, why: str, chunk: str | None = None) -> None:
        super().__init__(f"packs/{pack}.pack {why}", chunk=chunk)
        self.pack = pack
        self.why = why


def pull(vault: Vault, remote: Remote, refs: Sequence[str] | None) -> MergeReport:
    remote._check_descriptor(create=False)
    state = remote.state()
    wanted = ([state.resolve(r) for r in refs] if refs is not None
              else list(state.versions))
    with vault._connection.lock, vault._connection.read() as db:
        here = {u for (u,) in db.execute("SELECT uuid FROM versions")}
    todo = sorted({u for u in wanted if u not in here},
                  key=lambda u: (state.versions[u]["model"], state.versions[u]["number"]))
    # Bundles an interrupted pull left, for versions no longer wanted, after a day.
    for old in vault.path.parent.glob(f".{glob.escape(vault.path.name)}.pull-*"):
        if old.name.split(".pull-", 1)[1].split("-journal")[0] not in todo:
            try:
                if old.stat().st_mtime < time.time() - 86400:
                    old.unlink()
            except OSError:
                pass
    added: list[Any] = []
    renumbered: list[Any] = []
    conflicts: list[str] = []
    for uuid in todo:  # one at a time: an interrupted pull keeps what it merged
        try:
            report = _pull_from_good_copies(vault, remote, state, uuid)
        except UntrustedError as exc:  # require="trusted": the others still come
            conflicts.append(f"not pulled: {exc}")
            continue
        added += report.added
        renumbered += report.renumbered
        conflicts += report.conflicts
    # Labels of versions already here: aliases and tags the remote has and we lack.
    for uuid in wanted:
        if uuid in here:
            conflicts += _labels(vault, state, uuid)
    return MergeReport(tuple(added), tuple(renumbered), tuple(conflicts))


def _labels(vault: Vault, state: State, uuid: str) -> list[str]:
    entry = state.versions[uuid]
    record = state.record(uuid)
    conflicts = []
    with vault._connection.read():
        (mine,) = vault._catalog.records("WHERE v.uuid = ?", (uuid,))
    for alias in record.aliases:
        try:
            current = vault._catalog.resolve(Ref(entry["model"], alias=alias)).uuid
        except NotFoundError:
            current = None
        if current is None:
            vault.alias(mine, alias)
        elif current != uuid:
            conflicts.append(f"{entry['model']}@{alias}: another version here than on "
                             "the remote (kept this one)")
    new = {k: v for k, v in record.tags.items() if k not in mine.tags}
    if new:
        vault.tag(mine, **new)
    conflicts += [f"{mine.name}:{mine.version} tag {k}: {mine.tags[k]!r} here, {v!r} on "
                  "the remote" for k, v in record.tags.items()
                  if k in mine.tags and mine.tags[k] != v]
    return conflicts


def _pull_from_good_copies(vault: Vault, remote: Remote, state: State, uuid: str
                           ) -> MergeReport:
    """Pull the version ``uuid``; where a pack object proves bad, again without it: its
    chunks from other copies (a push that found it bad sent its own), or an
    IntegrityError naming it if there are none."""
    while True:
        try:
            return _pull_one(vault, remote, state, uuid)
        except _BadPack as exc:  # never the same twice: it leaves the index
            remote.distrust(exc.pack, exc.why)


def _pull_one(vault: Vault, remote: Remote, state: State, uuid: str) -> MergeReport:
    from ._vault import Vault as _Vault

    manifest = remote.manifest(uuid)
    key = f"{remote.url}/versions/{uuid}.json"
    try:
        _check_manifest(manifest, state.versions[uuid])
        if manifest["version"]["uuid"] != uuid:
            raise ValueError("it names another version")
        hashes = manifest["chunks"]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{key}: not this version's manifest ({exc}); nothing was "
                             "pulled") from exc
    if vault.require == "trusted":  # before a byte is fetched
        status = _signature_status(manifest, state.versions[uuid])
        if status != "trusted":
            raise UntrustedError(f"{state.versions[uuid]['model']}:"
                                 f"{state.versions[uuid]['number']} on the remote is {status}"
                                 ", and this vault takes only versions a trusted key signed "
                                 "(require='trusted')")
    index = remote.index()
    connection = vault._connection
    wanted = {h for part in hashes for h in part}
    with connection.lock, connection.read():
        here = vault._packs.rows(sorted(wanted))
        # The delta bases of the chunks to fetch (from the remote's index), but for those
        # this vault has: a chunk here needs nothing from the remote.
        todo = [h for h in wanted if h not in here]
        while todo:
            bases = {b for b in ((index.get(h) or {}).get("base") for h in todo)
                     if isinstance(b, str) and b not in wanted}
            wanted |= bases
            here.update(vault._packs.rows(sorted(bases)))
            todo = [b for b in bases if b not in here]
        pin = _pins.Pin(connection.lock_file, [r.id for r in here.values()])  # till merged
    try:
        missing = sorted(wanted - set(here))
        lost = [h for h in missing if h not in index]
        if lost:
            raise IntegrityError(f"{remote.lost(lost[0])}: {key} needs it; nothing was "
                                 "pulled", chunk=lost[0])
        # The version is gathered in a vault of its own beside this one, committed pack
        # object by pack object: a pull that was interrupted, run again, fetches only
        # what this file lacks. It goes once the version is merged, or found bad.
        bundle = _bundle_path(vault.path, uuid)
        with _only_puller(bundle):  # two pulls of one version into one vault take turns
            with connection.lock, connection.read() as db:
                if db.execute("SELECT 1 FROM versions WHERE uuid = ?", (uuid,)).fetchone():
                    return MergeReport((), (), ())  # the other one brought it
            entry = state.versions[uuid]
            if bundle.exists():  # an earlier pull's: go on from it if it is a whole vault
                try:
                    conn, damage = _schema.open_file(bundle, create=False)
                    conn.close()
                except LockTimeout:
                    raise
                except VaultError as exc:
                    damage = str(exc)
                if damage is not None:  # a file cut short opens, read-only: no use here
                    _remove(bundle)
            try:
                with _Vault(bundle, progress=False) as into:
                    # Scratch: its journal keeps it whole through a kill; an OS crash may
                    # cost it, never the vault.
                    into._connection.db.execute("PRAGMA synchronous = OFF")
                    with progress(sum(index[h]["size"] for h in missing),
                                  f"pull {entry['model']}:{entry['number']}",
                                  vault.progress) as advance:
                        fetched = _fetch(into, remote, missing, index, advance)
                    by_hash = _rows(into, remote, state, uuid, manifest, here, index)
                try:
                    report = _copier.copy_from(vault._connection, vault._catalog,
                                               vault._packs, bundle, None, check=True,
                                               action="pull", by_hash=by_hash)
                except IntegrityError as exc:
                    where = (index.get(exc.chunk or "") or {}).get("pack")
                    if where is None:
                        raise
                    raise _BadPack(where, f"does not hold what its index says (chunk "
                                   f"{exc.chunk} fails its check)", exc.chunk) from exc
                for name, hashes in fetched.items():  # checked by the merge: known good
                    remote.mark_checked(name, hashes)
            except (LockTimeout, RemoteError):
                raise  # the file is fine: the next pull goes on from it
            except VaultError:
                _remove(bundle)  # bad or unreadable: the next pull starts that version afresh
                raise
            _remove(bundle)
            return report
    finally:
        pin.release()


@contextmanager
def _only_puller(bundle: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``BUNDLE-lock``. The lock file is removed with the
    bundle; a puller that waited on a removed one finds the version merged and does
    nothing."""
    path = Path(f"{bundle}-lock")
    with _locked(path):
        try:
            yield
        finally:
            if not bundle.exists():  # done with: a puller waiting on it finds its version in
                path.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
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


def _bundle_path(vault: Path, uuid: str) -> Path:
    return vault.with_name(f".{vault.name}.pull-{uuid}")


def _remove(bundle: Path) -> None:
    for leftover in (bundle, Path(f"{bundle}-journal")):
        leftover.unlink(missing_ok=True)


def _scalar(value: Any) -> bool:
    """Whether ``value`` fits a column as is: text, null, or an integer SQLite holds."""
    return value is None or isinstance(value, str) or (
        type(value) is int and -2**63 <= value < 2**63)


def _check_manifest(manifest: Any, entry: dict[str, Any]) -> None:
    """ValueError unless ``manifest`` has the shape docs/remote.md gives, for the log's
    ``entry``: every value a row's column could hold, before any reaches SQLite, and the
    version the entry added (its digest binds the parts and chunks; entries written
    before the digest was in them give the rest only)."""
    if not isinstance(manifest, dict) or manifest.get("model") != entry["model"]:
        raise ValueError("it names another model")
    version, parts, chunks = manifest["version"], manifest["parts"], manifest["chunks"]
    if not (isinstance(version, dict) and all(_scalar(version.get(f)) for f in _VERSION_FIELDS)
            and isinstance(parts, list) and isinstance(chunks, list)
            and len(parts) == len(chunks)
            and all(isinstance(p, dict) and all(_scalar(p.get(f)) for f in _PART_FIELDS)
                    for p in parts)
            and all(isinstance(c, list) and all(isinstance(h, str) for h in c) for c in chunks)
            and _scalar(manifest.get("environment"))
            and (manifest.get("lineage") is None or (
                isinstance(manifest["lineage"], dict)
                and all(_scalar(manifest["lineage"].get(f)) for f in ("parent", "source"))))
            and all(isinstance(k, str) and isinstance(v, str)
                    for k, v in entry["tags"].items())):
        raise ValueError("a field of the wrong type")
    differ = [f for f in ("created_at", "kind", "size", "digest")
              if entry.get(f) is not None and version.get(f) != entry[f]]
    if differ:
        raise ValueError(f"its {', '.join(differ)} not the log's for this version")


def _fetch(into: Vault, remote: Remote, missing: list[str], index: dict[str, Any],
           advance: Callable[[int], Any]) -> dict[str, list[str]]:
    """Fetch into ``into`` the chunks ``missing`` that it lacks, from the blobs that hold
    them: one ranged get and one commit per pack object. Returns the chunks fetched,
    by pack object."""
    with into._connection.read():
        have = set(into._packs.rows(missing))
    advance(sum(index[h]["size"] for h in have))
    objects = _by_object(index, [h for h in missing if h not in have])

    def get(name: str, blobs: dict[int, list[str]]) -> list[bytes]:
        try:
            return remote.store.ranges(f"packs/{name}.pack", _spans(index, blobs))
        except FileNotFoundError as exc:
            raise _BadPack(name, "is missing") from exc
        except IntegrityError as exc:  # not a file
            raise _BadPack(name, f"cannot be read ({exc})") from exc

    from concurrent.futures import ThreadPoolExecutor

    # The next pack object is fetched while this one is written (obstore lets go of
    # the GIL): at most two in memory.
    with ThreadPoolExecutor(1, thread_name_prefix="modelvault-pull") as fetcher:
        coming = fetcher.submit(get, *objects[0]) if objects else None
        for i, (name, blobs) in enumerate(objects):
            datas = coming.result()
            coming = fetcher.submit(get, *objects[i + 1]) if i + 1 < len(objects) else None
            chosen = sorted(blobs)
            spans = [index[blobs[b][0]]["span"] for b in chosen]
            with into._connection.write() as db:
                for blob, span, data in zip(chosen, spans, datas, strict=True):
                    if len(data) != span[1] - span[0]:
                        raise _BadPack(name, f"does not hold blob {blob} its index gives")
                    pack = db.execute("INSERT INTO packs (codec, size, data) VALUES "
                                      "(?, ?, ?)", (span[2], span[3], data)).lastrowid
                    for h in blobs[blob]:
                        e = index[h]
                        db.execute("INSERT INTO chunks (hash, size, codec, itemsize, base_id, "
                                   "pack_id, start, length) VALUES (?, ?, ?, ?, NULL, ?, ?, "
                                   "?)", (h, e["size"], e["codec"], e["itemsize"], pack,
                                          e["start"], e["length"]))
                        advance(e["size"])
    return {name: [h for hashes in blobs.values() for h in hashes] for name, blobs in objects}


def _rows(into: Vault, remote: Remote, state: State, uuid: str, manifest: dict[str, Any],
          here: dict[str, ChunkRow], index: dict[str, Any]) -> _copier.ByHash:
    """Write the version ``uuid``'s rows into ``into`` (which holds the chunks fetched),
    in place of an earlier run's, all but its chunk lists, and link the chunks fetched
    to their delta bases there; then check its digest and signature. Returns what the
    merge takes by hash: the chunk lists, as the manifest gives them, and the delta
    bases of chunks fetched that this vault has (``here``) and ``into`` lacks."""
    entry = state.versions[uuid]
    version = manifest["version"]
    bases = {}
    with into._connection.write() as db:
        # An earlier run's rows go (a model's take its version's along): the version is
        # written as the remote has it now.
        db.execute("DELETE FROM models")
        ids = dict(db.execute("SELECT hash, id FROM chunks"))
        for h, chunk_id in ids.items():
            if h in here:
                continue  # the merge takes ours
            base = (index.get(h) or {}).get("base")
            if base and base not in ids and base not in here:
                raise IntegrityError(f"{remote.url}: chunk {h}'s delta base {base} is "
                                     "in no pack object; nothing was pulled", chunk=h)
            if base and base not in ids:
                bases[h] = base
            db.execute("UPDATE chunks SET base_id = ? WHERE id = ?", (ids.get(base), chunk_id))
        model_id = db.execute(
            "INSERT INTO models (name, created_at, last_version) VALUES (?, ?, ?)",
            (entry["model"], version["created_at"], state.last[entry["model"]])).lastrowid
        env = manifest.get("environment")
        env_id = into._catalog.environment_id(env) if env is not None else None
        columns = ", ".join(_VERSION_FIELDS)
        version_id = db.execute(
            f"INSERT INTO versions ({columns}, model_id, version, environment_id) VALUES "
            f"({','.join('?' * len(_VERSION_FIELDS))}, ?, ?, ?)",
            [*(version[f] for f in _VERSION_FIELDS), model_id, entry["number"], env_id]
        ).lastrowid
        if manifest.get("lineage") is not None:
            db.execute("INSERT INTO lineage (version_id, parent, source) VALUES (?, ?, ?)",
                       (version_id, manifest["lineage"]["parent"],
                        manifest["lineage"]["source"]))
        db.executemany(
            f"INSERT INTO parts (version_id, {', '.join(_PART_FIELDS)}) VALUES "
            f"(?, {','.join('?' * len(_PART_FIELDS))})",
            [(version_id, *(p[f] for f in _PART_FIELDS)) for p in manifest["parts"]])
        db.executemany("INSERT INTO tags (version_id, key, value) VALUES (?, ?, ?)",
                       [(version_id, k, v) for k, v in entry["tags"].items()])
        db.executemany(
            "INSERT INTO aliases (model_id, alias, version_id) VALUES (?, ?, ?)",
            [(model_id, a, version_id)
             for a, u in state.aliases.get(entry["model"], {}).items() if u == uuid])
        # The version as the manifest gives it must be the one signed and digested.
        row = into._catalog.resolve(Ref(entry["model"], version=entry["number"]))
        chunks = {**into._packs.rows(list(ids)), **here}
        contents = Contents(into._catalog.contents(row).parts,
                            [[chunks[h] for h in part] for part in manifest["chunks"]])
        try:
            into._catalog.check(row, contents)
            if _trust.signature_status(row.manifest, row.key_id, row.signature,
                                       _trust.trusted()) == "invalid":
                raise row.error("signature does not match: the manifest was changed after "
                                "the version was signed")
        except IntegrityError as exc:
            raise IntegrityError(f"{remote.url}/versions/{uuid}.json: {exc}; nothing was "
                                 "pulled") from exc
    return _copier.ByHash({uuid: manifest["chunks"]}, bases)


def _signature_status(manifest: dict[str, Any], entry: dict[str, Any]) -> str:
    """A manifest's signature status, as the version's rows would give it once pulled."""
    try:
        version, lineage = manifest["version"], manifest.get("lineage")
        signed = _trust.Manifest(
            version["uuid"], entry["model"], version["kind"], version["digest"],
            version["created_at"], version["description"], version["metadata"],
            manifest.get("environment"),  # type: ignore[arg-type]
            None if lineage is None else _trust.lineage_text(lineage["parent"],
                                                             lineage["source"]))
        return _trust.signature_status(signed, version["key_id"], version["signature"])
    except (KeyError, TypeError):
        return "invalid"


def clone(url: str, path: Path, refs: Sequence[str] | None, **options: Any) -> Path:
    """A new vault at ``path`` holding the remote's versions (or ``refs``)."""
    from . import _atomic
    from ._vault import Vault

    if path.exists():
        raise FileExistsError(f"{path} exists; clone makes a new vault")
    remote = Remote(url, **options)
    partial = _atomic.scratch_path(path, ".partial")
    try:
        with Vault(partial) as vault:
            pull(vault, remote, refs)
        _atomic.fsync(partial)
        os.replace(partial, path)
    finally:
        for leftover in (partial, Path(f"{partial}-journal")):
            if leftover.exists():
                leftover.unlink()
    return path
