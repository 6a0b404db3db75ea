"""The Vault: one SQLite file holding many models and their versions."""

from __future__ import annotations

import functools
import itertools
import json
import os
import pickle
import sqlite3
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import zstandard

from . import _chunks, _environment, _schema, _serialize, _trust
from ._errors import (
    CorruptVaultError,
    IntegrityError,
    NotFoundError,
    UntrustedError,
    VaultError,
)
from ._records import ModelInfo, ModelVersion, Problem, VaultStats
from ._refs import Ref, check_alias, check_name, parse_ref
from ._serialize import Part

F = TypeVar("F", bound=Callable[..., Any])

# Chunks are hashed, looked up and encoded this many at a time: enough work per
# batch to keep both cores busy, little enough memory held in flight (~4 MiB raw).
_BATCH = 64
_WORKERS = min(4, os.cpu_count() or 1)
# Connections inherited across fork(), never closed in the child (see Vault._db).
_INHERITED: list[sqlite3.Connection] = []
# Saves and loads larger than this show a progress bar when stderr is a terminal.
_PROGRESS_MIN = 64 * 1024 * 1024

_VERSION_COLUMNS = """
    v.id, v.uuid, m.name, v.version, v.created_at, v.kind, v.layout, v.size, v.added_bytes,
    v.digest, v.description, v.metadata, v.environment, v.key_id, v.signature
"""
_SELECT_VERSIONS = f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN models m ON m.id = v.model_id"


def _api(method: F) -> F:
    """One thread at a time per Vault, and sqlite3/zstd errors turned into ours."""

    @functools.wraps(method)
    def wrapper(self: Vault, *args: Any, **kwargs: Any) -> Any:
        try:
            # One connection serves every thread: a save interleaved with another
            # thread's commit would commit half a version.
            with self._lock:
                return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _schema.translate(exc, self.path) from exc
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.path}: {exc}") from exc
        except UnicodeDecodeError as exc:  # text SQLite stored is not UTF-8: a damaged file
            raise CorruptVaultError(f"{self.path}: vault file is damaged ({exc})") from exc

    return wrapper  # type: ignore[return-value]


def _snapshot(method: F) -> F:
    """Run a read-only method inside one read transaction (see Vault._read)."""

    @functools.wraps(method)
    def wrapper(self: Vault, *args: Any, **kwargs: Any) -> Any:
        with self._read():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"{text!r} is not a modelvault timestamp") from exc


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays turn up in metrics all the time (auc=np.float32(0.91)).
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON")


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping of str to JSON values")
    try:
        # A round trip leaves plain JSON types, so what is signed is what is stored.
        value = json.loads(json.dumps(dict(metadata), default=_json_default, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"metadata is not valid JSON: {exc}") from exc
    return json.dumps(value, sort_keys=True)


def _tag_items(tags: Mapping[str, Any] | None) -> list[tuple[str, str | None]]:
    items = []
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tag keys are non-empty strings, not {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"tag {key!r}: values are strings (or numbers, stored as text)")
        items.append((key, None if value is None else str(value)))
    return items


def _digest(kind: str, layout: Any, parts: Sequence[dict[str, Any]]) -> str:
    """The version's content hash: BLAKE3 over its layout, part descriptors and chunk names."""
    return _chunks.chunk_hash(_trust.canonical_json(
        {"kind": kind, "layout": layout, "parts": list(parts)}))


def _manifest(row: sqlite3.Row | dict[str, Any]) -> dict[str, Any]:
    """What a version's signature covers. The chunk list is covered through the digest."""
    return {"id": row["uuid"], "name": row["name"], "version": row["version"],
            "kind": row["kind"], "digest": row["digest"], "created_at": row["created_at"],
            "description": row["description"], "metadata": _column_json(row, "metadata"),
            "environment": _column_json(row, "environment")}


def _column_json(row: sqlite3.Row | dict[str, Any], column: str) -> Any:
    try:
        return json.loads(row[column])
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"{row['name']}:{row['version']}: {column} is not valid JSON",
                             model=row["name"], version=row["version"]) from exc


def _signature(row: sqlite3.Row, keys: dict[str, bytes]) -> str:
    """'trusted', 'invalid' (a trusted key's signature fails), 'untrusted' or 'unsigned'."""
    if not row["key_id"] or not row["signature"]:
        return "unsigned"
    try:
        ok = _trust.signature_ok(_manifest(row), row["key_id"], row["signature"], keys)
    except (TypeError, ValueError):  # a damaged column (bytes where text belongs)
        ok = False
    return {True: "trusted", False: "invalid", None: "untrusted"}[ok]


class Vault:
    """A model store in one SQLite file.

    >>> import numpy as np, modelvault
    >>> with modelvault.open(tmp_path / "models.vault") as vault:
    ...     mv = vault.save("iris/weights", {"w": np.ones(3)}, metadata={"acc": 0.9})
    ...     vault.load("iris/weights")["w"].tolist()
    [1.0, 1.0, 1.0]

    Args:
        path: the vault file; created if missing (unless ``readonly`` or not ``create``).
        readonly: open without the right to write; every write raises ReadOnlyError.
        create: create the file if it is missing; if False, NotAVaultError instead.
        timeout: seconds to wait for another process's write lock before LockTimeout.
        progress: show progress bars on long saves and loads; default when stderr is a terminal.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 create: bool = True, timeout: float = 60.0,
                 progress: bool | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._timeout = timeout
        self._progress_shown = progress
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = _schema.connect(
            self.path, readonly=readonly, create=create, timeout=timeout)
        self._conn.row_factory = sqlite3.Row
        self._pool: ThreadPoolExecutor | None = None

    # -- plumbing ---------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise VaultError(f"{self.path}: vault is closed")
        if os.getpid() != self._pid:
            # A connection must not cross fork(): the child opens its own. The inherited
            # one is kept referenced forever, since closing it in the child would roll
            # back and delete the parent's journal.
            _INHERITED.append(self._conn)
            self._pid = os.getpid()
            self._pool = None
            self._conn = _schema.connect(self.path, readonly=self.readonly, create=False,
                                         timeout=self._timeout)
            self._conn.row_factory = sqlite3.Row
        return self._conn

    def _threads(self) -> ThreadPoolExecutor:
        # zstd and blake3 release the GIL, so threads use both cores.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_WORKERS,
                                            thread_name_prefix="modelvault")
        return self._pool

    def _map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``function`` over ``items`` on the thread pool, results in order."""
        return self._submit(function, items)()

    def _submit(self, function: Callable[[Any], Any],
                items: Iterable[Any]) -> Callable[[], list[Any]]:
        """Start ``function`` over ``items`` on the thread pool; call the result to wait.

        Each call is ~20 us of work, less than a pool task's own overhead, so the items
        go out in one group per thread rather than one task each.
        """
        items = list(items)
        pool = self._threads()
        step = max(1, -(-len(items) // _WORKERS))
        futures = [pool.submit(lambda g: [function(x) for x in g], items[i:i + step])
                   for i in range(0, len(items), step)]
        return lambda: [result for future in futures for result in future.result()]

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the lock up front, so it never deadlocks."""
        with self._transaction("BEGIN IMMEDIATE") as db:
            yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one snapshot, so another process's gc cannot pull chunks
        out from under a load between its queries."""
        with self._transaction("BEGIN") as db:
            yield db

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        db = self._db
        if db.in_transaction:  # nested inside another of ours
            yield db
            return
        db.execute(begin)
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (disk full), and a failed COMMIT
            # (lock timeout) leaves the transaction open: end it either way, and let the
            # original error through rather than one from ROLLBACK.
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    @contextmanager
    def _progress(self, total: int, desc: str) -> Iterator[Callable[[int], Any]]:
        """Yield a function that advances a progress bar by n bytes (a no-op when hidden)."""
        show = self._progress_shown if self._progress_shown is not None else (
            total >= _PROGRESS_MIN and sys.stderr.isatty())
        if not show:
            yield lambda n: None
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
            yield bar.update

    def close(self) -> None:
        """Close the file. The vault is again exactly one file on disk."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            if self._conn is not None:
                if os.getpid() == self._pid:
                    self._conn.close()
                else:  # inherited across fork(): see _db
                    _INHERITED.append(self._conn)
                self._conn = None

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vault {str(self.path)!r}>"

    # -- saving -----------------------------------------------------------------

    @_api
    def save(self, name: str, obj: Any, *, metadata: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None, aliases: Sequence[str] = (),
             description: str = "") -> ModelVersion:
        """Save ``obj`` as the next version of model ``name``.

        numpy arrays and scalars, and dicts/lists/tuples of them, are stored natively
        (no pickle); anything else goes through cloudpickle. Metadata is immutable once saved;
        tags and aliases can change later.

        >>> mv = vault.save("demo", {"weights": np.zeros(4)}, metadata={"auc": 0.91})
        >>> mv.ref, mv.metadata
        ('demo:2', {'auc': 0.91})
        """
        check_name(name)
        kind, layout, parts = _serialize.serialize(obj)
        return self._store(name, kind, layout, parts, metadata=metadata, tags=tags,
                           aliases=aliases, description=description)

    @_api
    def save_files(self, name: str,
                   path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                   metadata: Mapping[str, Any] | None = None,
                   tags: Mapping[str, Any] | None = None, aliases: Sequence[str] = (),
                   description: str = "") -> ModelVersion:
        """Save a file, a folder's files, or several of either as the next version of ``name``.

        For what frameworks write themselves: ONNX, safetensors, save_pretrained folders.
        ``extract`` writes them back out under the same relative paths.
        """
        check_name(name)
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        parts = _serialize.files_parts(paths)
        return self._store(name, "files", {"files": [p.name for p in parts]}, parts,
                           metadata=metadata, tags=tags, aliases=aliases,
                           description=description)

    def _store(self, name: str, kind: str, layout: Any, parts: list[Part], *,
               metadata: Mapping[str, Any] | None, tags: Mapping[str, Any] | None,
               aliases: Sequence[str], description: str) -> ModelVersion:
        if isinstance(aliases, str):
            aliases = [aliases]
        aliases = [check_alias(a) for a in aliases]
        tag_items = [(k, v) for k, v in _tag_items(tags) if v is not None]
        if not isinstance(description, str):
            raise TypeError("description must be a string")
        metadata_json = _metadata_json(metadata)
        imports = _trust.pickle_imports(bytes(parts[0].data)) if kind == "pickle" else []
        environment = json.dumps(_environment.capture(imports), sort_keys=True)
        key = _trust.own_key()
        with self._progress(sum(p.size for p in parts), f"save {name}") as advance, \
                self._write() as db:
            row = db.execute("SELECT id, last_version FROM models WHERE name = ?",
                             (name,)).fetchone()
            created_at = _now()
            if row is None:
                model_id = db.execute(
                    "INSERT INTO models (name, created_at) VALUES (?, ?)",
                    (name, created_at)).lastrowid
                number = 1
            else:
                model_id, number = row["id"], row["last_version"] + 1
            known: dict[str, int] = {}
            added = 0
            descriptors = []
            chunk_lists = []
            for part in parts:
                hashes, part_added = self._put_chunks(db, part, known, advance)
                added += part_added
                chunk_lists.append([known[h] for h in hashes])
                descriptors.append(_descriptor(_part_columns(part), hashes))
            version = {
                "uuid": str(uuid.uuid4()), "name": name, "version": number, "kind": kind,
                "digest": _digest(kind, layout, descriptors), "created_at": created_at,
                "metadata": metadata_json, "description": description,
                "environment": environment,
            }
            signature = _trust.sign(key, _manifest(version))
            # Chunks went in first; the version row and its parts make the version
            # visible, and all of it commits together.
            version_id = db.execute(
                "INSERT INTO versions (uuid, model_id, version, created_at, kind, layout, "
                "size, added_bytes, digest, description, metadata, environment, key_id, "
                "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version["uuid"], model_id, number, created_at, kind,
                 json.dumps(layout), sum(p.size for p in parts), added, version["digest"],
                 description, metadata_json, environment, _trust.key_id(key),
                 signature)).lastrowid
            db.executemany(
                "INSERT INTO parts (version_id, part, kind, name, dtype, shape, "
                "fortran_order, itemsize, size) VALUES (:version_id, :part, :kind, :name, "
                ":dtype, :shape, :fortran_order, :itemsize, :size)",
                [{**_part_columns(p), "version_id": version_id, "part": i}
                 for i, p in enumerate(parts)])
            db.executemany(
                "INSERT INTO part_chunks (version_id, part, seq, chunk_id) VALUES (?, ?, ?, ?)",
                [(version_id, i, seq, c) for i, ids in enumerate(chunk_lists)
                 for seq, c in enumerate(ids)])
            db.executemany("INSERT INTO tags (version_id, key, value) VALUES (?, ?, ?)",
                           [(version_id, k, v) for k, v in tag_items])
            db.executemany(
                "INSERT OR REPLACE INTO aliases (model_id, alias, version_id) VALUES (?, ?, ?)",
                [(model_id, a, version_id) for a in aliases])
            db.execute("UPDATE models SET last_version = ? WHERE id = ?", (number, model_id))
        return self._get(Ref(name, version=number))

    def _put_chunks(self, db: sqlite3.Connection, part: Part, known: dict[str, int],
                    advance: Callable[[int], Any]) -> tuple[list[str], int]:
        """Store the chunks of ``part`` the vault lacks; returns (chunk hashes, bytes added).

        ``known`` maps every chunk hash met so far in this save to its row id. A file
        part's size is set to the bytes actually read.
        """
        numeric = part.kind in ("array", "buffer")
        level = _chunks.ARRAY_LEVEL if numeric else _chunks.STREAM_LEVEL
        itemsize = part.itemsize if numeric else 1
        hashes: list[str] = []
        added = size = 0
        for pieces in _batches(part):
            # Hashed and encoded from the same bytes: a file changing under us cannot
            # store bytes under another content's hash.
            batch = self._map(_chunks.chunk_hash, pieces)
            hashes.extend(batch)
            size += sum(len(p) for p in pieces)
            advance(sum(len(p) for p in pieces))
            unknown = sorted(set(batch) - known.keys())
            if not unknown:
                continue
            known.update(self._chunk_ids(db, unknown))
            new = {h: p for h, p in zip(batch, pieces, strict=True) if h not in known}
            encoded = self._map(lambda p: _chunks.encode(p, itemsize, level), new.values())
            rows = [(h, len(new[h]), codec, isz, data)
                    for h, (codec, isz, data) in zip(new, encoded, strict=True)]
            db.executemany(
                "INSERT INTO chunks (hash, size, codec, itemsize, data) VALUES (?, ?, ?, ?, ?)",
                rows)
            added += sum(len(r[4]) for r in rows)
            known.update(self._chunk_ids(db, list(new)))
        part.size = size
        return hashes, added

    @staticmethod
    def _chunk_ids(db: sqlite3.Connection, hashes: list[str]) -> dict[str, int]:
        if not hashes:
            return {}
        marks = ",".join("?" * len(hashes))
        return dict(db.execute(f"SELECT hash, id FROM chunks WHERE hash IN ({marks})", hashes))

    # -- reading ----------------------------------------------------------------

    @_api
    @_snapshot
    def get(self, ref: str | ModelVersion) -> ModelVersion:
        """The version ``ref`` names (``name``, ``name:N`` or ``name@alias``); reads no model bytes.

        >>> vault.get("demo").version
        1
        """
        return self._get(_as_ref(ref))

    def _get(self, ref: Ref) -> ModelVersion:
        return self._records([self._resolve(ref)])[0]

    def _resolve(self, ref: Ref) -> sqlite3.Row:
        db = self._db
        model = db.execute("SELECT id FROM models WHERE name = ?", (ref.name,)).fetchone()
        if model is None:
            names = [r[0] for r in db.execute(
                "SELECT name FROM models m WHERE EXISTS (SELECT 1 FROM versions v "
                "WHERE v.model_id = m.id) ORDER BY name LIMIT 11")]
            known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise NotFoundError(f"no model named {ref.name!r} in {self.path} "
                                f"(models: {known or 'none'})")
        if ref.alias is not None:
            row = db.execute(
                f"{_SELECT_VERSIONS} JOIN aliases a ON a.version_id = v.id "
                "WHERE a.model_id = ? AND a.alias = ?", (model["id"], ref.alias)).fetchone()
            if row is None:
                aliases = [r[0] for r in db.execute(
                    "SELECT alias FROM aliases WHERE model_id = ? ORDER BY alias",
                    (model["id"],))]
                raise NotFoundError(f"model {ref.name!r} has no alias {ref.alias!r} "
                                    f"(aliases: {', '.join(aliases) or 'none'})")
            return row
        if ref.version is not None:
            row = db.execute(f"{_SELECT_VERSIONS} WHERE v.model_id = ? AND v.version = ?",
                             (model["id"], ref.version)).fetchone()
        else:
            # "Latest" is a query, never a stored pointer that could go stale.
            row = db.execute(f"{_SELECT_VERSIONS} WHERE v.model_id = ? "
                             "ORDER BY v.version DESC LIMIT 1", (model["id"],)).fetchone()
        if row is None:
            numbers = [str(r[0]) for r in db.execute(
                "SELECT version FROM versions WHERE model_id = ? ORDER BY version",
                (model["id"],))]
            what = f"version {ref.version}" if ref.version is not None else "versions"
            raise NotFoundError(f"model {ref.name!r} has no {what} "
                                f"(versions: {', '.join(numbers) or 'none'})")
        return row

    def _records(self, rows: list[sqlite3.Row]) -> list[ModelVersion]:
        if not rows:
            return []
        db = self._db
        ids = [r["id"] for r in rows]
        tags: dict[str, dict[str, str]] = {i: {} for i in ids}
        aliases: dict[str, list[str]] = {i: [] for i in ids}
        # Chunked so that a model with thousands of versions stays under SQLite's variable limit.
        for start in range(0, len(ids), 500):
            some = ids[start:start + 500]
            marks = ",".join("?" * len(some))
            for vid, key, value in db.execute(
                    f"SELECT version_id, key, value FROM tags WHERE version_id IN ({marks}) "
                    "ORDER BY key", some):
                tags[vid][key] = value
            for vid, alias in db.execute(
                    f"SELECT version_id, alias FROM aliases WHERE version_id IN ({marks}) "
                    "ORDER BY alias", some):
                aliases[vid].append(alias)
        keys = _trust.trusted_keys()
        return [ModelVersion(
            name=r["name"], version=r["version"], id=r["uuid"], digest=r["digest"],
            created_at=_parse_time(r["created_at"]), size=r["size"], added_bytes=r["added_bytes"],
            kind=r["kind"], metadata=_column_json(r, "metadata"), tags=tags[r["id"]],
            aliases=tuple(aliases[r["id"]]), description=r["description"],
            environment=_column_json(r, "environment"), signature=_signature(r, keys))
            for r in rows]

    @_api
    @_snapshot
    def models(self) -> list[ModelInfo]:
        """Every model with its number of versions and latest version, by name.

        >>> [(m.name, m.versions) for m in vault.models()]
        [('demo', 1)]
        """
        rows = self._db.execute(
            "SELECT m.name, count(*), max(v.version), max(v.created_at) FROM models m "
            "JOIN versions v ON v.model_id = m.id GROUP BY m.id ORDER BY m.name").fetchall()
        return [ModelInfo(name, count, latest, _parse_time(updated))
                for name, count, latest, updated in rows]

    @_api
    @_snapshot
    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of model ``name``, oldest first.

        >>> [v.version for v in vault.versions("demo")]
        [1]
        """
        check_name(name)
        rows = self._db.execute(f"{_SELECT_VERSIONS} WHERE m.name = ? ORDER BY v.version",
                                (name,)).fetchall()
        if not rows:
            self._resolve(Ref(name))  # raises NotFoundError naming what exists
        return self._records(rows)

    @_api
    @_snapshot
    def load(self, ref: str | ModelVersion, *, trust: bool = False) -> Any:
        """Load the model ``ref`` names, checking every chunk's hash.

        A pickled model loads only if a trusted key signed it, or with ``trust=True``;
        otherwise UntrustedError lists what the pickle would import. Arrays never need trust.
        A files version loads as a dict of path to bytes (see ``extract``).

        >>> vault.load("demo")
        [1, 2, 3]
        """
        row = self._resolve(_as_ref(ref))
        self._check_signature(row, trust)
        parts = self._read_parts(row)
        return _rebuild(row, parts)

    def _check_signature(self, row: sqlite3.Row, trust: bool) -> None:
        """Refuse pickles no trusted key signed, and any version whose signature fails."""
        if trust:
            return
        where = f"{row['name']}:{row['version']}"
        status = _signature(row, _trust.trusted_keys())
        if row["kind"] == "pickle" and status != "trusted":
            stream = self._read_parts(row, only_first=True)[0][1]
            imports = _trust.pickle_imports(stream.tobytes())
            why = ("its signature does not match: it was changed after it was saved"
                   if status == "invalid" else "no key this machine trusts signed it")
            raise UntrustedError(
                f"{where} is a pickle and {why}; unpickling runs code from "
                f"{', '.join(imports) or 'Python builtins only'}. If you trust where this "
                "vault came from, load with trust=True (CLI: --trust), or trust the saver's "
                "key with `modelvault trust KEYFILE`.", imports=imports)
        if status == "invalid":
            raise IntegrityError(f"{where}: its signature does not match: the version was "
                                 "changed after it was saved (load with trust=True to read "
                                 "it anyway)", model=row["name"], version=row["version"])

    @_api
    @_snapshot
    def extract(self, ref: str | ModelVersion, out_dir: str | os.PathLike[str], *,
                trust: bool = False) -> list[Path]:
        """Write a files version's files below ``out_dir``; returns the paths written.

        Like ``load``, refuses a version whose signature fails unless ``trust=True``.
        """
        row = self._resolve(_as_ref(ref))
        if row["kind"] != "files":
            raise ValueError(f"{row['name']}:{row['version']} holds a Python object, not "
                             "files; use load()")
        self._check_signature(row, trust)
        parts, lists = self._checked_chunk_lists(row)
        targets = [Path(out_dir).joinpath(*_serialize.safe_relative_path(p["name"]).parts)
                   for p in parts]
        with self._progress(sum(p["size"] for p in parts),
                            f"extract {row['name']}:{row['version']}") as advance:
            for part, chunks, target in zip(parts, lists, targets, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                # Written batch by batch (a checkpoint need not fit in memory) to a side
                # file, renamed only once every chunk checked out: no half-written model.
                fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                                               dir=target.parent)
                try:
                    with os.fdopen(fd, "wb") as f:
                        self._read_part(part, chunks, row, advance, sink=f)
                    os.replace(partial, target)
                finally:
                    if os.path.exists(partial):
                        os.unlink(partial)
        return targets

    def _chunk_lists(self, row: sqlite3.Row) -> tuple[list[sqlite3.Row], list[list[Any]]]:
        """A version's parts and, per part, its chunks as (id, hash, size, codec, itemsize) rows.

        A chunk the vault lacks comes back with hash None.
        """
        db = self._db
        parts = db.execute("SELECT * FROM parts WHERE version_id = ? ORDER BY part",
                           (row["id"],)).fetchall()
        lists: list[list[Any]] = [[] for _ in parts]
        for chunk in db.execute(
                "SELECT pc.part, pc.chunk_id, c.hash, c.size, c.codec, c.itemsize "
                "FROM part_chunks pc LEFT JOIN chunks c ON c.id = pc.chunk_id "
                "WHERE pc.version_id = ? ORDER BY pc.part, pc.seq", (row["id"],)):
            if type(chunk[0]) is not int or not 0 <= chunk[0] < len(parts):
                raise IntegrityError(
                    f"{row['name']}:{row['version']}: chunk list names part {chunk[0]}, "
                    "which is missing", model=row["name"], version=row["version"])
            if chunk[2] is not None:
                try:
                    _chunks.check_row(chunk[3], chunk[4], chunk[5])
                except IntegrityError as exc:
                    raise IntegrityError(f"{row['name']}:{row['version']}: chunk {chunk[2]}: "
                                         f"{exc}", model=row["name"], version=row["version"],
                                         chunk=chunk[2]) from exc
            lists[chunk[0]].append(tuple(chunk)[1:])
        return parts, lists

    def _checked_chunk_lists(self, row: sqlite3.Row
                             ) -> tuple[list[sqlite3.Row], list[list[Any]]]:
        """``_chunk_lists`` after ``_check_lists``: what every read of a version starts with."""
        parts, lists = self._chunk_lists(row)
        self._check_lists(row, parts, lists)
        return parts, lists

    def _check_lists(self, row: sqlite3.Row, parts: list[sqlite3.Row],
                     lists: list[list[Any]]) -> None:
        """IntegrityError unless every chunk exists, each part's chunks add up to its
        size, and the parts and chunk hashes give the version's digest."""
        where = f"{row['name']}:{row['version']}"
        for part, chunks in zip(parts, lists, strict=True):
            for chunk_id, chunk_hash, *_ in chunks:
                if chunk_hash is None:
                    raise IntegrityError(f"{where}: chunk #{chunk_id} is missing from the vault",
                                         model=row["name"], version=row["version"],
                                         chunk=str(chunk_id))
            if sum(c[2] for c in chunks) != part["size"]:
                raise IntegrityError(f"{where}: part {part['part']}'s chunks do not add up "
                                     f"to its {part['size']} bytes",
                                     model=row["name"], version=row["version"])
        try:
            descriptors = [_descriptor(p, [c[1] for c in lists[i]])
                           for i, p in enumerate(parts)]
            digest = _digest(row["kind"], json.loads(row["layout"]), descriptors)
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{where}: unreadable parts: {exc}", model=row["name"],
                                 version=row["version"]) from exc
        if digest != row["digest"]:
            raise IntegrityError(f"{where}: its parts or chunk list do not match its digest "
                                 "(the file was edited or damaged)",
                                 model=row["name"], version=row["version"])

    def _read_parts(self, row: sqlite3.Row, *, only_first: bool = False
                    ) -> list[tuple[sqlite3.Row, np.ndarray]]:
        """Every part of a version as (part row, uint8 buffer), each chunk's hash checked."""
        parts, lists = self._checked_chunk_lists(row)
        if only_first:
            parts, lists = parts[:1], lists[:1]
        with self._progress(sum(p["size"] for p in parts),
                            f"load {row['name']}:{row['version']}") as advance:
            return [(p, self._read_part(p, chunks, row, advance))
                    for p, chunks in zip(parts, lists, strict=True)]

    def _read_part(self, part: sqlite3.Row, chunks: list[Any], row: sqlite3.Row,
                   advance: Callable[[int], Any], sink: BinaryIO | None = None) -> np.ndarray:
        """A part's bytes as a uint8 array, every chunk hash-checked.

        ``chunks`` come from ``_checked_chunk_lists``. With a ``sink``, each batch is
        written there instead of kept, and the array returned holds only the last batch.
        """
        out = np.empty(part["size"] if sink is None else 0, dtype=np.uint8)
        view = memoryview(out)
        offset = 0
        pending: tuple[memoryview, Callable[[], list[Any]]] | None = None

        def finish(batch_view: memoryview, results: Callable[[], list[Any]]) -> None:
            for error in results():
                if error is not None:
                    raise IntegrityError(
                        f"{row['name']}:{row['version']}: chunk {error[0]} {error[1]}",
                        model=row["name"], version=row["version"], chunk=error[0])
            advance(len(batch_view))
            if sink is not None:
                sink.write(batch_view)

        for start in range(0, len(chunks), _BATCH):
            batch = chunks[start:start + _BATCH]
            batch_size = sum(c[2] for c in batch)
            if sink is not None:
                out = np.empty(batch_size, dtype=np.uint8)
                view, offset = memoryview(out), 0
            batch_view = view[offset:offset + batch_size]
            ids = sorted({c[0] for c in batch})
            data = dict(self._db.execute(
                f"SELECT id, data FROM chunks WHERE id IN ({','.join('?' * len(ids))})", ids))
            jobs = []
            for chunk_id, chunk_hash, chunk_size, codec, itemsize in batch:
                jobs.append((view[offset:offset + chunk_size],
                             (chunk_hash, codec, itemsize, data[chunk_id])))
                offset += chunk_size
            # Decode this batch on the pool while the next one is read from SQLite.
            started = (batch_view, self._submit(_decode_checked, jobs))
            if pending is not None:
                finish(*pending)
            pending = started
        if pending is not None:
            finish(*pending)
        return out

    # -- changing names ---------------------------------------------------------

    @_api
    def alias(self, ref: str | ModelVersion, alias: str) -> ModelVersion:
        """Point ``alias`` at the version ``ref`` names, moving it if it points elsewhere.

        >>> vault.alias("demo:1", "production").aliases
        ('production',)
        """
        check_alias(alias)
        with self._write() as db:
            row = self._resolve(_as_ref(ref))
            db.execute("INSERT OR REPLACE INTO aliases (model_id, alias, version_id) "
                       "SELECT model_id, ?, id FROM versions WHERE id = ?", (alias, row["id"]))
        return self._get(Ref(row["name"], version=row["version"]))

    @_api
    def unalias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from model ``name``; NotFoundError if it does not exist."""
        with self._write():
            self._resolve(Ref(check_name(name), alias=check_alias(alias)))
            self._db.execute(
                "DELETE FROM aliases WHERE alias = ? AND model_id = "
                "(SELECT id FROM models WHERE name = ?)", (alias, name))

    @_api
    def tag(self, ref: str | ModelVersion, tags: Mapping[str, Any] | None = None,
            /, **more: Any) -> ModelVersion:
        """Set tags on a version; a value of None removes that tag.

        >>> vault.tag("demo:1", stage="prod").tags
        {'stage': 'prod'}
        """
        items = _tag_items({**(tags or {}), **more})
        with self._write() as db:
            row = self._resolve(_as_ref(ref))
            for key, value in items:
                if value is None:
                    db.execute("DELETE FROM tags WHERE version_id = ? AND key = ?",
                               (row["id"], key))
                else:
                    db.execute("INSERT OR REPLACE INTO tags (version_id, key, value) "
                               "VALUES (?, ?, ?)", (row["id"], key, value))
        return self._get(Ref(row["name"], version=row["version"]))

    @_api
    def delete(self, ref: str | ModelVersion) -> int:
        """Delete one version (``name:N``, ``name@alias``) or a whole model (``name``).

        Returns the number of versions deleted. Their chunks stay until ``gc()``.
        Numbers of deleted versions are not given out again while the model exists.
        """
        target = _as_ref(ref)
        with self._write() as db:
            if target.version is None and target.alias is None:
                model = db.execute("SELECT id FROM models WHERE name = ?",
                                   (target.name,)).fetchone()
                if model is None:
                    self._resolve(target)  # raises NotFoundError naming the models there are
                model_id = model[0]
                count = db.execute("SELECT count(*) FROM versions WHERE model_id = ?",
                                   (model_id,)).fetchone()[0]
                db.execute("DELETE FROM models WHERE id = ?", (model_id,))
                return int(count)
            row = self._resolve(target)
            db.execute("DELETE FROM versions WHERE id = ?", (row["id"],))
            return 1

    # -- housekeeping -----------------------------------------------------------

    @_api
    def gc(self) -> int:
        """Drop chunks no version uses and give their space back; returns bytes freed."""
        with self._write() as db:
            before = self._file_bytes()
            db.execute("DELETE FROM chunks WHERE NOT EXISTS "
                       "(SELECT 1 FROM part_chunks pc WHERE pc.chunk_id = chunks.id)")
            # The file is created with auto_vacuum=INCREMENTAL: this hands free pages back
            # to the file system without VACUUM's full copy of the database. Each step of
            # the pragma frees one page, and Python's sqlite3 steps a statement that has no
            # result columns only once (fetchall() does not help): run it once per free page.
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            for _ in range(free):
                db.execute("PRAGMA incremental_vacuum")
            after = self._file_bytes()
        return before - after

    def _file_bytes(self) -> int:
        db = self._db
        # Read through SQLite, never os.stat-then-open: opening the file ourselves
        # would drop SQLite's POSIX locks, which are per process, not per descriptor.
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages * db.execute("PRAGMA page_size").fetchone()[0])

    @_api
    @_snapshot
    def verify(self) -> list[Problem]:
        """Re-read and re-hash every chunk any version uses; returns the problems ([] = healthy).

        >>> vault.verify()
        []
        """
        db = self._db
        problems: list[Problem] = []
        result = [r[0] for r in db.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            problems.extend(Problem(f"SQLite quick_check: {line}") for line in result)
        for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check"):
            problems.append(Problem(f"{table} row {rowid} points at a missing {parent} row"))
        for name, last, highest in db.execute(
                "SELECT m.name, m.last_version, max(v.version) FROM models m "
                "JOIN versions v ON v.model_id = m.id GROUP BY m.id "
                "HAVING m.last_version < max(v.version)"):
            problems.append(Problem(f"last_version {last} is below version {highest}: the "
                                    "next save would fail", name, highest))
        keys = _trust.trusted_keys()
        users: dict[int, tuple[str, int]] = {}
        for row in db.execute(f"{_SELECT_VERSIONS} ORDER BY m.name, v.version").fetchall():
            name, number = row["name"], row["version"]
            try:
                parts, lists = self._chunk_lists(row)
                for chunks in lists:
                    for chunk in chunks:
                        users.setdefault(chunk[0], (name, number))
                self._check_lists(row, parts, lists)
                if _signature(row, keys) == "invalid":
                    raise IntegrityError("signature does not match: the version was changed "
                                         "after it was saved")
            except IntegrityError as exc:
                problems.append(Problem(str(exc), name, number, exc.chunk))
        cursor = db.execute("SELECT id, hash, size, codec, itemsize, data FROM chunks c WHERE "
                            "EXISTS (SELECT 1 FROM part_chunks pc WHERE pc.chunk_id = c.id)")
        while batch := cursor.fetchmany(_BATCH):
            jobs = []
            for r in batch:
                try:
                    _chunks.check_row(r[2], r[3], r[4], r[5])
                except IntegrityError as exc:
                    name, number = users.get(r[0], (None, None))
                    problems.append(Problem(str(exc), name, number, r[1]))
                    continue
                jobs.append((memoryview(np.empty(r[2], dtype=np.uint8)), (r[1], *r[3:])))
            owners = {r[1]: r[0] for r in batch}
            for error in self._map(_decode_checked, jobs):
                if error is not None:
                    name, number = users.get(owners[error[0]], (None, None))
                    problems.append(Problem(error[1], name, number, error[0]))
        return problems

    @_api
    @_snapshot
    def stats(self) -> VaultStats:
        """Sizes of the vault: raw, after dedup, after compression, and the file itself."""
        db = self._db
        models, versions, raw = db.execute(
            "SELECT count(DISTINCT model_id), count(*), coalesce(sum(size), 0) "
            "FROM versions").fetchone()
        chunks, unique, stored = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(length(data)), 0) "
            "FROM chunks").fetchone()
        return VaultStats(models=models, versions=versions, chunks=chunks, raw_bytes=raw,
                          unique_bytes=unique, stored_bytes=stored,
                          file_bytes=self._file_bytes())


def _as_ref(ref: str | ModelVersion) -> Ref:
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)


def _batches(part: Part) -> Iterator[list[bytes | memoryview]]:
    """A part's chunk pieces, ``_BATCH`` at a time: fixed-size for numbers, by content
    otherwise, and for files read from disk as they go."""
    if part.path is not None:
        with open(part.path, "rb") as f:
            pieces = _chunks.content_pieces(f)
            while batch := list(itertools.islice(pieces, _BATCH)):
                yield batch
        return
    assert part.data is not None
    if part.kind in ("array", "buffer"):
        cuts = _chunks.fixed_cuts(part.size, part.itemsize)
    else:
        cuts = _chunks.content_cuts(part.data)
    for start in range(0, len(cuts), _BATCH):
        yield [part.data[o:o + n] for o, n in cuts[start:start + _BATCH]]


def _part_columns(part: Part) -> dict[str, Any]:
    """A part's row in the parts table (without its keys)."""
    return {"kind": part.kind, "name": part.name, "dtype": part.dtype,
            "shape": None if part.shape is None else json.dumps(part.shape),
            "fortran_order": int(part.fortran_order), "itemsize": part.itemsize,
            "size": part.size}


def _descriptor(part: Mapping[str, Any] | sqlite3.Row, hashes: list[str]) -> dict[str, Any]:
    """What the digest covers of one part: its parts row and its chunks' hashes."""
    return {"kind": part["kind"], "name": part["name"], "dtype": part["dtype"],
            "shape": None if part["shape"] is None else json.loads(part["shape"]),
            "fortran_order": part["fortran_order"], "itemsize": part["itemsize"],
            "size": part["size"], "chunks": hashes}


def _decode_checked(job: tuple[memoryview, Any]) -> tuple[str, str] | None:
    """Decode one chunk into its slot and check its hash; (hash, problem) or None."""
    out, (expected, codec, itemsize, data) = job
    try:
        if not isinstance(data, bytes):
            raise IntegrityError(f"data is {type(data).__name__}, not a blob")
        _chunks.decode_into(out, codec, itemsize, data)
    except IntegrityError as exc:
        return expected, str(exc)
    if _chunks.chunk_hash(out) != expected:
        return expected, "hash mismatch: stored bytes are damaged"
    return None


def _rebuild(row: sqlite3.Row, parts: list[tuple[sqlite3.Row, np.ndarray]]) -> Any:
    where = f"{row['name']}:{row['version']}"
    try:
        layout = json.loads(row["layout"])
        if row["kind"] == "arrays":
            arrays = [_serialize.array_from_part(buf, p["dtype"], json.loads(p["shape"]),
                                                 bool(p["fortran_order"])) for p, buf in parts]
            return _serialize.rebuild_native(layout, arrays)
        if row["kind"] == "pickle":
            return _unpickle(row, parts)
        if row["kind"] == "files":
            return {p["name"]: buf.tobytes() for p, buf in parts}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise IntegrityError(f"{where}: cannot rebuild: {exc}", model=row["name"],
                             version=row["version"]) from exc
    raise IntegrityError(f"{where}: unknown kind {row['kind']!r}", model=row["name"],
                         version=row["version"])


def _unpickle(row: sqlite3.Row, parts: list[tuple[sqlite3.Row, np.ndarray]]) -> Any:
    stream, buffers = parts[0][1], [buf for _, buf in parts[1:]]
    try:
        return pickle.loads(stream, buffers=buffers)
    except Exception as exc:
        # Usually a missing or incompatible package; say what the model was saved with.
        env = json.loads(row["environment"])
        saved_with = ", ".join([f"python {env.get('python', '?')}"] + [
            f"{name} {version}" for name, version in env.get("packages", {}).items()])
        raise VaultError(f"{row['name']}:{row['version']}: unpickling failed with "
                         f"{type(exc).__name__}: {exc} (saved with {saved_with})") from exc
