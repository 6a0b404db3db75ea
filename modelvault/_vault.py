"""The Vault: one SQLite file holding many models and their versions."""

from __future__ import annotations

import functools
import itertools
import json
import os
import pickle
import sqlite3
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import _chunks, _environment, _schema, _serialize, _trust
from ._chunks import np, zstandard
from ._errors import (
    CorruptVaultError,
    IntegrityError,
    NotFoundError,
    UntrustedError,
    VaultError,
)
from ._records import Columns, MergeReport, ModelInfo, ModelVersion, Problem, VaultStats
from ._refs import Ref, check_alias, check_name, parse_ref
from ._serialize import Part

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

F = TypeVar("F", bound=Callable[..., Any])

# Chunks are hashed, looked up and encoded at most this many, and this many raw
# bytes, at a time: enough work per batch to keep both cores busy, little memory in
# flight (two batches while one is encoded and the one before is written).
_BATCH = 64
_BATCH_BYTES = 16 * 1024 * 1024
# A delta chunk is at most this many XORs away from a chunk stored whole, so a load
# never decodes more than DELTA_DEPTH + 1 chunks per chunk; the next version in a
# long fine-tune series starts a new chain. Readers refuse chains beyond _MAX_CHAIN.
DELTA_DEPTH = 4
_MAX_CHAIN = 16
# A delta at most this fraction of the raw chunk is kept without also trying the chunk
# alone (XOR against a parent with a few changed rows: nearly all zeros).
_DELTA_SURE = 1 / 16
# Columns of a chunk row, in the order of the tuples the reading code passes around.
_CHUNK_COLUMNS = ("c.id, c.hash, c.size, c.codec, c.itemsize, c.base_id, c.pack_id, c.start, "
                  "c.length")
# Chunks a version uses, and the delta bases of those, transitively (UNION stops at cycles).
_LIVE_CHUNKS = """WITH RECURSIVE live(id) AS (
    SELECT chunk_id FROM part_chunks
    UNION SELECT c.base_id FROM chunks c JOIN live ON c.id = live.id WHERE c.base_id NOT NULL)"""
# Metadata and descriptions are for numbers and notes: far below what readers accept
# of a text column (_schema.MAX_VALUE), so whatever we write, we read back.
_MAX_TEXT = 16 * 1024 * 1024
_WORKERS = min(4, os.cpu_count() or 1)
# Connections inherited across fork(), never closed in the child (see Vault._db).
_INHERITED: list[sqlite3.Connection] = []
# Saves and loads larger than this show a progress bar when stderr is a terminal.
_PROGRESS_MIN = 64 * 1024 * 1024

_VERSION_COLUMNS = """
    v.id, v.uuid, m.name, v.version, v.created_at, v.kind, v.layout, v.size, v.added_bytes,
    v.digest, v.description, v.metadata, e.json AS environment, v.key_id, v.signature
"""
_SELECT_VERSIONS = (f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN models m ON m.id = "
                    "v.model_id LEFT JOIN environments e ON e.id = v.environment_id")
# What a ModelVersion is made of, in the order _records takes them.
_RECORD_COLUMNS = ("v.id, v.model_id, v.version, v.uuid, v.digest, v.created_at, v.size, "
                   "v.added_bytes, v.kind, v.description, v.metadata, v.environment_id, "
                   "v.key_id, v.signature")


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
    # fromisoformat is 50x faster than strptime (listing 10,000 versions parses 10,000);
    # the shape check keeps it as strict as the format _now writes.
    if isinstance(text, str) and len(text) == 27 and text[10] == "T" and text[26] == "Z":
        try:
            return datetime.fromisoformat(text[:26] + "+00:00")
        except ValueError:
            pass
    raise IntegrityError(f"{text!r} is not a modelvault timestamp")


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
    text = json.dumps(value, sort_keys=True)
    if len(text) > _MAX_TEXT:
        raise ValueError(f"metadata is {len(text):,} characters of JSON; the limit is "
                         f"{_MAX_TEXT:,} (store large things as a model of their own)")
    return text


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
    return _trust.manifest(row["uuid"], row["name"], row["kind"], row["digest"],
                           row["created_at"], row["description"],
                           _column_json(row, "metadata"), _column_json(row, "environment"))


def _column_json(row: sqlite3.Row | dict[str, Any], column: str) -> Any:
    try:
        return json.loads(row[column])
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"{row['name']}:{row['version']}: {column} is not valid JSON",
                             model=row["name"], version=row["version"]) from exc


def _signature(row: sqlite3.Row, keys: dict[str, bytes]) -> str:
    """'trusted', 'invalid' (a trusted key's signature fails), 'untrusted' or 'unsigned'."""
    try:
        manifest = _manifest(row)
    except IntegrityError:
        manifest = None
    return _trust.signature_status(manifest, row["key_id"], row["signature"], keys)


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
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=_WORKERS,
                                            thread_name_prefix="modelvault")
        return self._pool

    def _map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``function`` over ``items`` on the thread pool, results in order."""
        return self._submit(function, items)()

    def _submit(self, function: Callable[[Any], Any], items: Iterable[Any], *,
                grouped: bool = True) -> Callable[[], list[Any]]:
        """Start ``function`` over ``items`` on the thread pool; call the result to wait.

        A call on a small chunk is ~20 us of work, less than a pool task's own overhead,
        so items go out in one group per thread rather than one task each, unless not
        ``grouped``.
        """
        items = list(items)
        pool = self._threads()
        step = max(1, -(-len(items) // _WORKERS)) if grouped else 1
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
             description: str = "", parent: str | ModelVersion | bool | None = None
             ) -> ModelVersion:
        """Save ``obj`` as the next version of model ``name``.

        numpy arrays and scalars, and dicts/lists/tuples of them, are stored natively
        (no pickle); anything else goes through cloudpickle. Metadata is immutable once saved;
        tags and aliases can change later.

        An array that changed since the ``parent`` version (by default the model's latest;
        any ref, such as a base model saved under another name; or False for none) is
        stored as its XOR with the parent's array of the same name, shape and dtype
        wherever that is smaller: a full fine-tune then takes about half the space.

        >>> mv = vault.save("demo", {"weights": np.zeros(4)}, metadata={"auc": 0.91})
        >>> mv.ref, mv.metadata
        ('demo:2', {'auc': 0.91})
        """
        check_name(name)
        kind, layout, parts = _serialize.serialize(obj)
        return self._store(name, kind, layout, parts, metadata=metadata, tags=tags,
                           aliases=aliases, description=description, parent=parent)

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
                           description=description, parent=False)

    def _store(self, name: str, kind: str, layout: Any, parts: list[Part], *,
               metadata: Mapping[str, Any] | None, tags: Mapping[str, Any] | None,
               aliases: Sequence[str], description: str,
               parent: str | ModelVersion | bool | None) -> ModelVersion:
        if isinstance(aliases, str):
            aliases = [aliases]
        aliases = [check_alias(a) for a in aliases]
        tag_items = [(k, v) for k, v in _tag_items(tags) if v is not None]
        if not isinstance(description, str):
            raise TypeError("description must be a string")
        if len(description) > _MAX_TEXT:
            raise ValueError(f"description is {len(description):,} characters; the limit is "
                             f"{_MAX_TEXT:,}")
        metadata_json = _metadata_json(metadata)
        # What the pickle imports decides which package versions the environment records.
        imports = _trust.own_pickle_imports(
            parts[0].data.obj if isinstance(parts[0].data.obj, bytes)
            else bytes(parts[0].data), [p.data for p in parts[1:]]) if kind == "pickle" else []
        # The first capture in a process reads every installed package's metadata (~0.3 s
        # with many installed): done beside the chunking.
        environment = _Background(
            lambda: json.dumps(_environment.capture(imports), sort_keys=True))
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
                model_id = row["id"]
                try:
                    number = _check_number(row["last_version"], "last_version", lowest=0) + 1
                except ValueError as exc:
                    raise CorruptVaultError(f"{self.path}: model {name!r}: {exc}: the file is "
                                            "damaged") from exc
            bases = self._delta_bases(name, kind, layout, parts, parent)
            hash_lists, known, added = self._put_chunks(db, parts, bases, advance)
            chunk_lists = [[known[h] for h in hashes] for hashes in hash_lists]
            descriptors = [_descriptor(_part_columns(part), hashes)
                           for part, hashes in zip(parts, hash_lists, strict=True)]
            version = {
                "uuid": str(uuid.uuid4()), "name": name, "version": number, "kind": kind,
                "digest": _digest(kind, layout, descriptors), "created_at": created_at,
                "metadata": metadata_json, "description": description,
                "environment": environment.result(),
            }
            signature = _trust.sign(key, _manifest(version))
            # Chunks went in first; the version row and its parts make the version
            # visible, and all of it commits together.
            version_id = db.execute(
                "INSERT INTO versions (uuid, model_id, version, created_at, kind, layout, "
                "size, added_bytes, digest, description, metadata, environment_id, key_id, "
                "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version["uuid"], model_id, number, created_at, kind,
                 json.dumps(layout), sum(p.size for p in parts), added, version["digest"],
                 description, metadata_json, self._environment_id(db, version["environment"]),
                 _trust.key_id(key),
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
            # Read before the commit: once it is in, another process may delete it.
            return self._get(Ref(name, version=number))

    @staticmethod
    def _environment_id(db: sqlite3.Connection, text: str) -> int:
        """The environments row holding ``text``, added if new. Versions saved on one
        machine share one row: listing 10,000 versions reads it once, not 10,000 times."""
        # A scan, not an index: there are as many rows as machines and package sets.
        row = db.execute("SELECT id FROM environments WHERE json = ?", (text,)).fetchone()
        if row is not None:
            return int(row[0])
        return int(db.execute("INSERT INTO environments (json) VALUES (?)", (text,)).lastrowid)

    def _delta_bases(self, name: str, kind: str, layout: Any, parts: list[Part],
                     parent: str | ModelVersion | bool | None) -> list[list[Any] | None]:
        """Per part, the parent's chunk rows that new chunks may be XORed against.

        A part's parent is the parent version's part at the same place in the layout
        (the same dict key, say) with the same dtype and shape; None where there is none.
        """
        none: list[list[Any] | None] = [None] * len(parts)
        if parent is False or kind == "files":
            return none
        if parent is None or parent is True:
            try:
                row = self._resolve(Ref(name))
            except NotFoundError:  # the model's first version
                return none
        else:
            row = self._resolve(_as_ref(parent))
        try:
            old_parts, lists = self._chunk_lists(row)
            old_keys = _part_keys(row["kind"], json.loads(row["layout"]), len(old_parts))
        except (IntegrityError, ValueError, TypeError):
            return none  # a damaged parent only costs the deltas
        by_key = {key: (p, chunks) for key, p, chunks in zip(old_keys, old_parts, lists,
                                                                  strict=True)
                  if key is not None}
        bases: list[list[Any] | None] = []
        for key, part in zip(_part_keys(kind, layout, len(parts)), parts, strict=True):
            old = by_key.get(key) if key is not None else None
            same = old is not None and part.kind in ("array", "buffer") and all(
                old[0][column] == value for column, value in _part_columns(part).items()
                if column != "name")
            bases.append(old[1] if same else None)
        return bases

    def _put_chunks(self, db: sqlite3.Connection, parts: list[Part],
                    bases: list[list[Any] | None], advance: Callable[[int], Any]
                    ) -> tuple[list[list[str]], dict[str, int], int]:
        """Store the chunks of ``parts`` the vault lacks.

        Returns each part's chunk hashes, every chunk's row id by hash, and the bytes
        added. ``bases`` are each part's parent chunk rows, by position. A file part's
        size is set to the bytes actually read. While one batch is encoded on the pool,
        the one before (of this part or the one before it) is written to SQLite.
        """
        known: dict[str, int] = {}
        pending: set[str] = set()  # encoded or being encoded, not yet written
        hash_lists: list[list[str]] = []
        added = 0
        writing: tuple[bool, list[Any], Callable[[], list[Any]]] | None = None

        def write(numeric: bool, new: list[Any], results: Callable[[], list[Any]]) -> int:
            if numeric:
                stored = self._write_packs(db, [
                    (h, len(piece), codec, isz, base[0] if used else None, data)
                    for (h, piece, base), (codec, isz, data, used)
                    in zip(new, results(), strict=True)])
            else:
                stored = self._write_solid(db, _solid_groups(new), results())
            known.update(self._chunk_ids(db, [h for h, _, _ in new]))
            pending.difference_update(h for h, _, _ in new)
            return stored

        for part, part_bases in zip(parts, bases, strict=True):
            numeric = part.kind in ("array", "buffer")
            hashes: list[str] = []
            hash_lists.append(hashes)
            size = 0
            for pieces in _batches(part):
                # Hashed and encoded from the same bytes: a file changing under us cannot
                # store bytes under another content's hash.
                batch = self._map(_chunks.chunk_hash, pieces)
                first = len(hashes)
                hashes.extend(batch)
                size += sum(len(p) for p in pieces)
                advance(sum(len(p) for p in pieces))
                unknown = sorted(set(batch) - known.keys() - pending)
                if unknown:
                    known.update(self._chunk_ids(db, unknown))
                new: list[Any] = []  # (hash, piece, parent chunk row or None)
                for seq, (h, piece) in enumerate(zip(batch, pieces, strict=True), first):
                    if h in known or h in pending:
                        continue
                    pending.add(h)
                    base = (part_bases[seq] if part_bases is not None and seq < len(part_bases)
                            else None)
                    new.append((h, piece, base if base is not None and base[2] == len(piece)
                                else None))
                if not new:
                    continue
                if numeric:
                    parents = self._parent_bytes([b for _, _, b in new if b is not None])
                    encoding = (True, new, self._submit(_encode_job, [
                        (piece, part.itemsize, parents.get(b[0]) if b is not None else None)
                        for _, piece, b in new]))
                else:
                    # One task per pack: each is milliseconds of zstd, and whole packs
                    # share out between the cores more evenly than groups of them.
                    encoding = (False, new, self._submit(_chunks.solid, [
                        [piece for _, piece, _ in group] for group in _solid_groups(new)],
                        grouped=False))
                if writing is not None:
                    added += write(*writing)
                writing = encoding
            part.size = size
        if writing is not None:
            added += write(*writing)
        return hash_lists, known, added

    def _parent_bytes(self, rows: list[Any]) -> dict[int, np.ndarray]:
        """Raw bytes of the parent chunks that may serve as delta bases, by chunk id.

        Left out: chunks already DELTA_DEPTH deltas deep, and any that fail to decode
        (a damaged parent costs only the delta, never the save).
        """
        if not rows:
            return {}
        # Once per chunk: a parent that repeats a piece (tied or tiled weights) names the
        # same chunk many times, and two tasks decoding a delta into one buffer at once
        # would interleave their XORs and leave it wrong.
        rows = list({r[0]: r for r in rows}.values())
        jobs = self._jobs(rows)
        usable = [(r[0], job) for r, job in zip(rows, jobs, strict=True)
                  if _chain_length(job) < DELTA_DEPTH]
        outs = {cid: np.empty(job[1], dtype=np.uint8) for cid, job in usable}
        errors = self._map(_decode_checked, [(memoryview(outs[cid]), job)
                                             for cid, job in usable])
        return {cid: outs[cid] for (cid, job), error in zip(usable, errors, strict=True)
                if error is None}

    def _write_packs(self, db: sqlite3.Connection, rows: list[Any]) -> int:
        """Insert encoded chunks (hash, size, codec, itemsize, base_id, data) into new
        packs, and their rows; returns the bytes stored."""
        places = _pack(db, [r[5] for r in rows])
        db.executemany("INSERT INTO chunks (hash, size, codec, itemsize, base_id, pack_id, "
                       "start, length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(*r[:5], *place, len(r[5])) for r, place in zip(rows, places,
                                                                          strict=True)])
        return sum(len(r[5]) for r in rows)

    def _write_solid(self, db: sqlite3.Connection, groups: list[list[Any]],
                     packs: list[tuple[str, bytes]]) -> int:
        """Insert solid packs (``_chunks.solid``'s output for ``groups`` of (hash, piece,
        _)), and their chunks as raw slices of the packs' content; returns bytes stored."""
        rows = []
        for group, (codec, data) in zip(groups, packs, strict=True):
            places = _insert_pack(db, codec, [len(piece) for _, piece, _ in group], data)
            rows.extend((h, len(piece), "raw", 1, None, *place, len(piece))
                        for (h, piece, _), place in zip(group, places, strict=True))
        db.executemany("INSERT INTO chunks (hash, size, codec, itemsize, base_id, pack_id, "
                       "start, length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return sum(len(data) for _, data in packs)

    def _jobs(self, rows: Sequence[Any], packs: dict[int, bytes] | None = None) -> list[Any]:
        """Decoding jobs for chunk rows (``_CHUNK_COLUMNS`` order), bases and bytes fetched.

        A job is (hash, size, codec, itemsize, stored bytes or a problem, base job or None).
        ``packs`` caches pack bytes across calls (a pack often spans two batches).
        """
        db = self._db
        by_id = {r[0]: r for r in rows}
        wanted = {r[5] for r in rows if r[5] is not None} - by_id.keys()
        for _ in range(_MAX_CHAIN):
            if not wanted:
                break
            ids = sorted(wanted)
            found = db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                               f"({','.join('?' * len(ids))})", ids).fetchall()
            by_id.update((r[0], tuple(r)) for r in found)
            wanted = {r[5] for r in found if r[5] is not None} - by_id.keys()
        cache = packs if packs is not None else {}
        needed = sorted({r[6] for r in by_id.values() if type(r[6]) is int} - cache.keys())
        fetched = {row[0]: _chunks.pack_content(*row[1:]) for row in db.execute(
            f"SELECT id, codec, size, data FROM packs WHERE id IN "
            f"({','.join('?' * len(needed))})", needed)}
        # Keep only this call's packs: the cache holds at most two batches' worth.
        current = {pid: cache[pid] for pid in {r[6] for r in by_id.values()} if pid in cache}
        current.update(fetched)
        cache.clear()
        cache.update(current)

        return [_job(tuple(r), by_id, current, 0) for r in rows]

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
        return self._list("WHERE v.id = ?", (self._resolve(ref)["id"],))[0]

    def _resolve(self, ref: Ref) -> sqlite3.Row:
        """The row of the version ``ref`` names, read from its table and checked to be it."""
        db = self._db
        version_id, alias_row = self._look_up(ref)
        # Lookups go through indexes, and SQLite answers indexed columns from the index:
        # a damaged index entry would hand over another version under the name and
        # number asked for. The row itself, read by rowid alone, must agree.
        real = db.execute(f"SELECT {_VERSION_COLUMNS} FROM versions v NOT INDEXED JOIN models "
                          "m NOT INDEXED ON m.id = v.model_id LEFT JOIN environments e ON "
                          "e.id = v.environment_id WHERE v.id = ?", (version_id,)).fetchone()
        if ref.alias is not None:
            agrees = real is not None and db.execute(
                "SELECT 1 FROM aliases NOT INDEXED WHERE rowid = ? AND alias = ? AND "
                "version_id = ?", (alias_row, ref.alias, real["id"])).fetchone()
        elif ref.version is None:  # latest: no higher number in the table itself
            agrees = real is not None and self._highest(real["id"], real["version"])
        else:
            agrees = real is not None and real["version"] == ref.version
        if not (agrees and real["name"] == ref.name):
            what = ref.name + (f"@{ref.alias}" if ref.alias else
                               f":{ref.version}" if ref.version else "")
            raise CorruptVaultError(f"{self.path}: vault file is damaged (an index of it does "
                                    f"not match its table where {what} is looked up); run "
                                    "verify()")
        return real

    def _highest(self, version_id: int, number: int) -> bool:
        """Whether no version of version ``version_id``'s model has a number above
        ``number``, by the tables alone. Usually the model's last_version says so at once;
        after the newest versions were deleted, every version row is read."""
        db = self._db
        model_id, last = db.execute(
            "SELECT m.id, m.last_version FROM versions v NOT INDEXED JOIN models m NOT INDEXED "
            "ON m.id = v.model_id WHERE v.id = ?", (version_id,)).fetchone()
        return last == number or db.execute(
            "SELECT max(version) FROM versions NOT INDEXED WHERE model_id = ?",
            (model_id,)).fetchone()[0] == number

    def _look_up(self, ref: Ref) -> tuple[int, int | None]:
        """(version id, alias rowid or None) of the version ``ref`` names, by the indexes;
        NotFoundError listing what there is, if none."""
        db = self._db
        model = db.execute("SELECT id FROM models WHERE name = ?", (ref.name,)).fetchone()
        if model is None:
            names = [r[0] for r in db.execute(
                "SELECT name FROM models m WHERE EXISTS (SELECT 1 FROM versions v "
                "WHERE v.model_id = m.id) ORDER BY name LIMIT 11")]
            known = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
            raise NotFoundError(f"no model named {ref.name!r} in {self.path} "
                                f"(models: {known or 'none'})")
        if ref.alias is not None:
            row = db.execute("SELECT version_id, rowid FROM aliases WHERE model_id = ? AND "
                             "alias = ?", (model["id"], ref.alias)).fetchone()
            if row is None:
                aliases = [r[0] for r in db.execute(
                    "SELECT alias FROM aliases WHERE model_id = ? ORDER BY alias",
                    (model["id"],))]
                raise NotFoundError(f"model {ref.name!r} has no alias {ref.alias!r} "
                                    f"(aliases: {', '.join(map(str, aliases)) or 'none'})")
            return row[0], row[1]
        if ref.version is not None:
            row = db.execute("SELECT id FROM versions WHERE model_id = ? AND version = ?",
                             (model["id"], ref.version)).fetchone()
        else:
            # "Latest" is a query, never a stored pointer that could go stale.
            row = db.execute("SELECT id FROM versions WHERE model_id = ? "
                             "ORDER BY version DESC LIMIT 1", (model["id"],)).fetchone()
        if row is None:
            numbers = [str(r[0]) for r in db.execute(
                "SELECT version FROM versions WHERE model_id = ? ORDER BY version",
                (model["id"],))]
            what = f"version {ref.version}" if ref.version is not None else "versions"
            raise NotFoundError(f"model {ref.name!r} has no {what} "
                                f"(versions: {', '.join(numbers) or 'none'})")
        return row[0], None

    def _records(self, rows: Sequence[Sequence[Any]]) -> list[ModelVersion]:
        """Records for rows of ``_RECORD_COLUMNS`` (plain tuples: listing 10,000 versions
        is mostly building these, and name lookups in sqlite3.Row cost a third of it)."""
        if not rows:
            return []
        db = self._db
        tags: dict[int, dict[str, str]] = {r[0]: {} for r in rows}
        aliases: dict[int, list[str]] = {r[0]: [] for r in rows}
        ids = list(tags)
        # Few versions: look up theirs (in groups, under SQLite's variable limit);
        # many: one pass over the tables beats a thousand lookups.
        groups = [ids[i:i + 500] for i in range(0, len(ids), 500)] if len(ids) <= 2000 else [[]]
        for some in groups:
            where = f"WHERE version_id IN ({','.join('?' * len(some))})" if some else ""
            for vid, key, value in db.execute(
                    f"SELECT version_id, key, value FROM tags {where} ORDER BY key", some):
                if vid in tags:
                    tags[vid][key] = value
            for vid, alias in db.execute(
                    f"SELECT version_id, alias FROM aliases {where} ORDER BY alias", some):
                if vid in aliases:
                    aliases[vid].append(alias)
        # Names and environments are shared by many versions: one string each, not one
        # per version; for a few records, only theirs (a save returns one record).
        names: dict[int, str] = {}
        environments: dict[int, str] = {}
        for table, column, found, key in (("models", "name", names, 1),
                                          ("environments", "json", environments, 11)):
            wanted = list({r[key] for r in rows})
            where = (f"WHERE id IN ({','.join('?' * len(wanted))})" if len(wanted) <= 500
                     else "")
            found.update(db.execute(f"SELECT id, {column} FROM {table} {where}",
                                    wanted if where else ()))
        lost = {r[1] for r in rows} - names.keys()
        if lost or not all(type(r[2]) is int and type(names[r[1]]) is str for r in rows):
            raise CorruptVaultError(f"{self.path}: vault file is damaged (a version's model "
                                    "or number is missing or not what modelvault writes)")
        make, columns = ModelVersion._make, Columns._make
        return [make(names[model_id], version, uuid_, digest, _parse_time(created_at), size,
                     added, kind, tags[vid], tuple(aliases[vid]), description,
                     columns((created_at, metadata, environments.get(env_id), key_id,
                              signature)))
                for (vid, model_id, version, uuid_, digest, created_at, size, added, kind,
                     description, metadata, env_id, key_id, signature) in rows]

    def _list(self, where: str, params: Sequence[Any] = ()) -> list[ModelVersion]:
        cursor = self._db.cursor()
        cursor.row_factory = None
        return self._records(cursor.execute(
            f"SELECT {_RECORD_COLUMNS} FROM versions v JOIN models m ON m.id = v.model_id "
            f"{where}", params).fetchall())

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
    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version of model ``name``, oldest first; of every model (by name) if None.

        >>> [v.version for v in vault.versions("demo")]
        [1]
        """
        if name is None:
            return self._list("ORDER BY m.name, v.version")
        check_name(name)
        records = self._list("WHERE m.name = ? ORDER BY v.version", (name,))
        if not records:
            self._resolve(Ref(name))  # raises NotFoundError naming what exists
        return records

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
            for chunks, target in zip(lists, targets, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                # Written batch by batch (a checkpoint need not fit in memory) to a side
                # file, renamed only once every chunk checked out: no half-written model.
                import tempfile

                fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                                               dir=target.parent)
                try:
                    with os.fdopen(fd, "wb") as f:
                        self._fill(row, _batch_views(chunks), advance,
                                   done=lambda views, f=f: f.writelines(views))
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
                f"SELECT pc.part, pc.chunk_id, {_CHUNK_COLUMNS[5:]} "
                "FROM part_chunks pc LEFT JOIN chunks c ON c.id = pc.chunk_id "
                "WHERE pc.version_id = ? ORDER BY pc.part, pc.seq", (row["id"],)):
            if type(chunk[0]) is not int or not 0 <= chunk[0] < len(parts):
                raise IntegrityError(
                    f"{row['name']}:{row['version']}: chunk list names part {chunk[0]}, "
                    "which is missing", model=row["name"], version=row["version"])
            if chunk[2] is not None:
                try:
                    fields = tuple(chunk)
                    _chunks.check_row(*fields[3:6], *fields[7:10])
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
        outs = [np.empty(p["size"], dtype=np.uint8) for p in parts]

        def pieces() -> Iterator[tuple[Any, memoryview]]:
            for out, chunks in zip(outs, lists, strict=True):
                view, offset = memoryview(out), 0
                for chunk in chunks:
                    yield chunk, view[offset:offset + chunk[2]]
                    offset += chunk[2]

        with self._progress(sum(p["size"] for p in parts),
                            f"load {row['name']}:{row['version']}") as advance:
            self._fill(row, pieces(), advance)
        return list(zip(parts, outs, strict=True))

    def _fill(self, row: sqlite3.Row, pieces: Iterable[tuple[Any, memoryview]],
              advance: Callable[[int], Any],
              done: Callable[[list[memoryview]], Any] | None = None) -> None:
        """Decode chunks (rows from ``_checked_chunk_lists``) into their views, hash-checked.

        Works in batches, across parts: the pool decodes one batch while the next is read
        from SQLite. ``done`` gets each batch's views once they hold their bytes, in order.
        """
        pending: tuple[list[memoryview], Callable[[], list[Any]]] | None = None

        def finish(views: list[memoryview], results: Callable[[], list[Any]]) -> None:
            for error in results():
                if error is not None:
                    raise IntegrityError(
                        f"{row['name']}:{row['version']}: chunk {error[0]} {error[1]}",
                        model=row["name"], version=row["version"], chunk=error[0])
            advance(sum(len(v) for v in views))
            if done is not None:
                done(views)

        packs: dict[int, bytes] = {}
        for batch in _runs(pieces, lambda piece: piece[0][2]):
            views = [view for _, view in batch]
            jobs = self._jobs([chunk for chunk, _ in batch], packs)
            started = (views, self._submit(_decode_checked, list(zip(views, jobs, strict=True))))
            if pending is not None:
                finish(*pending)
            pending = started
        if pending is not None:
            finish(*pending)

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
                if db.execute("SELECT name FROM models NOT INDEXED WHERE id = ?",
                              (model_id,)).fetchone()[0] != target.name:  # see _resolve
                    raise CorruptVaultError(f"{self.path}: vault file is damaged (an index of "
                                            f"it does not match its table where "
                                            f"{target.name} is looked up); run verify()")
                count = db.execute("SELECT count(*) FROM versions WHERE model_id = ?",
                                   (model_id,)).fetchone()[0]
                db.execute("DELETE FROM models WHERE id = ?", (model_id,))
                return int(count)
            row = self._resolve(target)
            db.execute("DELETE FROM versions WHERE id = ?", (row["id"],))
            return 1

    # -- copies -----------------------------------------------------------------

    @_api
    def export(self, dest: str | os.PathLike[str],
               refs: Sequence[str | ModelVersion] | None = None) -> Path:
        """Write a compact vault holding every version, or the versions ``refs`` name, to
        ``dest``: only their chunks (and the delta bases those need), packed anew.

        The copy is made in a temporary file beside ``dest``, flushed to disk, then
        renamed over it, so ``dest`` is at every moment the complete old file or the
        complete new one: the way to publish a vault into a synced folder or attach it
        to an email. Signatures, aliases and tags go along; so do version numbers.
        """
        dest = Path(dest)
        if dest.exists() and dest.resolve() == self.path.resolve():
            raise ValueError(f"{dest} is the vault itself; export to another file")
        with self._read():
            if refs is None:
                ids = [r[0] for r in self._db.execute("SELECT id FROM versions")]
            else:
                ids = sorted({self._resolve(_as_ref(ref))["id"] for ref in refs})
        partial = _schema.scratch_path(dest, ".partial")
        try:
            with Vault(partial, timeout=self._timeout, progress=False) as copy:
                copy._copy_from(self.path, ids, every_model=refs is None)
                copy.gc()  # repacks the packs that came along with chunks left behind
            _schema.fsync(partial)
            os.replace(partial, dest)
            _schema.fsync(dest.parent, directory=True)
        finally:
            for leftover in (partial, f"{partial}-journal"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return dest

    def _copy_from(self, source: Path, ids: list[int], *, every_model: bool) -> None:
        """Copy versions ``ids`` of the vault at ``source`` into this (new, empty) vault,
        with their models' rows, or every model's row if ``every_model``: a model whose
        versions were all deleted keeps its row, so that its numbers are not given out
        again, in a whole copy too."""
        with self._attached(source) as db, self._write():
            db.execute("CREATE TEMP TABLE wanted (id INTEGER PRIMARY KEY)")
            db.executemany("INSERT INTO temp.wanted VALUES (?)", [(i,) for i in ids])
            for table, where in (
                    ("environments", "id IN (SELECT environment_id FROM src.versions "
                                     "WHERE id IN temp.wanted)"),
                    ("models", "1" if every_model else
                     "id IN (SELECT model_id FROM src.versions WHERE id IN temp.wanted)"),
                    ("versions", "id IN temp.wanted"),
                    ("parts", "version_id IN temp.wanted")):
                db.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} "
                           f"WHERE {where}")
            copied = db.execute("SELECT count(*) FROM main.versions").fetchone()[0]
            if copied != len(ids):  # deleted by another process since they were named
                raise NotFoundError(f"{source}: {len(ids) - copied} of the versions to "
                                    "export were deleted meanwhile; nothing was written")
            needed = ("WITH RECURSIVE needed(id) AS (SELECT chunk_id FROM src.part_chunks "
                      "WHERE version_id IN temp.wanted UNION SELECT c.base_id FROM "
                      "src.chunks c JOIN needed ON c.id = needed.id "
                      "WHERE c.base_id NOT NULL)")
            db.execute(f"{needed} INSERT INTO main.packs SELECT * FROM src.packs WHERE id "
                       "IN (SELECT pack_id FROM src.chunks WHERE id IN needed)")
            db.execute(f"{needed} INSERT INTO main.chunks SELECT * FROM src.chunks "
                       "WHERE id IN needed")
            for table in ("part_chunks", "aliases", "tags"):
                db.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} "
                           "WHERE version_id IN temp.wanted")
            db.execute("DROP TABLE temp.wanted")

    @contextmanager
    def _attached(self, source: Path) -> Iterator[sqlite3.Connection]:
        """The vault at ``source`` attached as ``src``: read-only and through SQLite, so
        its locks are untouched, and read inside one transaction of ours, one snapshot."""
        db = self._db
        db.execute("ATTACH DATABASE ? AS src", (f"{source.absolute().as_uri()}?mode=ro",))
        try:
            yield db
        finally:
            db.execute("DETACH DATABASE src")

    @_api
    def merge(self, other: str | os.PathLike[str] | Vault) -> MergeReport:
        """Bring in every version of the vault ``other`` that this one lacks, copying only
        the chunks this one lacks. ``other`` is read, never changed.

        Versions are matched by id (``ModelVersion.id``), not number, so two copies of
        one vault that both went on being used (a sync service's "conflicted copy")
        merge without loss. A version brought in keeps its number unless a version here
        holds it; from the first such clash on, a model's versions brought in are
        numbered after this vault's last number, oldest first. An alias or tag that
        differs between the two is left as it is here. The report lists the versions
        added, the numbers changed and the conflicts.

        Every chunk brought in is decoded and its hash checked first: a damaged ``other``
        raises IntegrityError and nothing is merged. ``other`` is read under its read
        lock, while this vault is locked for writing: merging A into B while B is merged
        into A makes one of the two wait for the other, and time out (LockTimeout).
        """
        source = Path(other.path if isinstance(other, Vault) else other)
        if source.exists() and os.path.samefile(source, self.path):  # hard links too
            raise ValueError(f"{source} is the vault itself; merge another file into it")
        # Opening it as a vault first gives the usual errors for a file that is not one
        # (or that needs a writable open to roll back an interrupted write).
        Vault(source, readonly=True, create=False).close()
        with self._attached(source) as db, self._write():
            _schema.check(db, source, "src")  # again, in the snapshot merged from
            conflicts = [
                f"{name}:{number}: the version with this id differs in {source.name} "
                "(kept this one)" for name, number in db.execute(
                    "SELECT m.name, v.version FROM main.versions v JOIN main.models m ON "
                    "m.id = v.model_id JOIN src.versions s ON s.uuid = v.uuid JOIN src.models "
                    "sm ON sm.id = s.model_id WHERE s.digest IS NOT v.digest "
                    "OR sm.name IS NOT m.name")]
            models = self._merge_models(db, source)
            renumbered = self._merge_numbers(db, models)
            # Numbers they gave out (to versions since deleted, too) are not given out here.
            db.executemany("UPDATE main.models SET last_version = max(last_version, ?) "
                           "WHERE id = ?", [(last, model_id) for model_id, _, last
                                            in models.values()])
            offsets = self._merge_chunks(db)
            self._merge_versions(db, offsets)
            conflicts += self._merge_labels(db, source, models, offsets["versions"])
            added = self._list("WHERE v.id > ? ORDER BY m.name, v.version",
                               (offsets["versions"],))
            for table in ("incoming", "needed"):
                db.execute(f"DROP TABLE temp.{table}")
        return MergeReport(tuple(added), tuple(renumbered), tuple(conflicts))

    @staticmethod
    def _merge_models(db: sqlite3.Connection, source: Path
                      ) -> dict[int, tuple[int, str, int]]:
        """Our model row (added if missing) for each of ``src``'s, by their id: (our id,
        name, their last_version)."""
        models = {}
        for src_id, name, created_at, last in db.execute(
                "SELECT id, name, created_at, last_version FROM src.models").fetchall():
            try:
                check_name(name)
                _check_number(last, "last_version", lowest=0)
            except ValueError as exc:
                raise IntegrityError(f"{source}: {exc}; nothing was merged") from exc
            row = db.execute("SELECT id FROM main.models WHERE name = ?", (name,)).fetchone()
            model_id = row[0] if row else db.execute(
                "INSERT INTO main.models (name, created_at) VALUES (?, ?)",
                (name, created_at)).lastrowid
            models[src_id] = (model_id, name, last)
        return models

    def _merge_numbers(self, db: sqlite3.Connection,
                       models: dict[int, tuple[int, str, int]]) -> list[tuple[str, int, int]]:
        """Fill temp.incoming with the versions to bring in and their model, number and
        environment here; returns the renumbered ones as (name, theirs, ours)."""
        db.execute("CREATE TEMP TABLE incoming (src_id INTEGER PRIMARY KEY, model_id INTEGER, "
                   "version INTEGER, environment_id INTEGER)")
        rows = db.execute(
            "SELECT s.id, s.model_id, s.version, s.created_at, e.json FROM src.versions s "
            "LEFT JOIN src.environments e ON e.id = s.environment_id "
            "WHERE s.uuid NOT IN (SELECT uuid FROM main.versions) "
            "ORDER BY s.model_id, s.version").fetchall()
        renumbered = []
        for src_model, group in itertools.groupby(rows, key=lambda r: r[1]):
            if src_model not in models:
                raise IntegrityError("a version of the vault merged in names a model it does "
                                     "not hold; nothing was merged")
            model_id, name, _ = models[src_model]
            mine = list(group)
            for r in mine:
                try:
                    _check_number(r[2], "version number")
                except ValueError as exc:
                    raise IntegrityError(f"{name}: {exc}; nothing was merged") from exc
            held = {r[0] for r in db.execute("SELECT version FROM main.versions "
                                             "WHERE model_id = ?", (model_id,))}
            clash = next((i for i, r in enumerate(mine) if r[2] in held), len(mine))
            last = max(held | {db.execute("SELECT last_version FROM main.models WHERE id = ?",
                                          (model_id,)).fetchone()[0]})
            numbers = {r[0]: r[2] for r in mine[:clash]}
            for r in sorted(mine[clash:], key=lambda r: (r[3], r[2])):
                last += 1
                numbers[r[0]] = last
                renumbered.append((name, r[2], last))
            db.executemany("INSERT INTO temp.incoming VALUES (?, ?, ?, ?)",
                           [(r[0], model_id, numbers[r[0]],
                             None if r[4] is None else self._environment_id(db, r[4]))
                            for r in mine])
            db.execute("UPDATE main.models SET last_version = max(last_version, ?) "
                       "WHERE id = ?", (max(numbers.values()), model_id))
        return renumbered

    def _merge_chunks(self, db: sqlite3.Connection) -> dict[str, int]:
        """Copy the chunks the incoming versions need and this vault lacks (by hash), with
        their packs, check them, and tidy up; returns the id offsets of the copied rows."""
        offsets = {table: db.execute(f"SELECT coalesce(max(id), 0) FROM main.{table}"
                                     ).fetchone()[0] for table in ("chunks", "packs", "versions")}
        # Chunks whose hash is here already are not copied, nor are their bases.
        db.execute(
            "CREATE TEMP TABLE needed AS WITH RECURSIVE needed(id) AS ("
            "SELECT c.id FROM src.part_chunks pc JOIN src.chunks c ON c.id = pc.chunk_id "
            "WHERE pc.version_id IN (SELECT src_id FROM temp.incoming) "
            "AND NOT EXISTS (SELECT 1 FROM main.chunks m WHERE m.hash = c.hash) "
            "UNION SELECT b.id FROM needed JOIN src.chunks c ON c.id = needed.id "
            "JOIN src.chunks b ON b.id = c.base_id "
            "WHERE NOT EXISTS (SELECT 1 FROM main.chunks m WHERE m.hash = b.hash)) "
            "SELECT id FROM needed")
        db.execute("INSERT INTO main.packs SELECT id + ?, codec, size, data FROM src.packs "
                   "WHERE id IN (SELECT pack_id FROM src.chunks WHERE id IN temp.needed)",
                   (offsets["packs"],))
        # A delta whose base is here already is a delta of our copy of it.
        db.execute(
            "INSERT INTO main.chunks SELECT c.id + :chunks, c.hash, c.size, c.codec, "
            "c.itemsize, CASE WHEN c.base_id IS NULL THEN NULL "
            "WHEN c.base_id IN temp.needed THEN c.base_id + :chunks "
            "ELSE (SELECT m.id FROM main.chunks m JOIN src.chunks b ON b.hash = m.hash "
            "WHERE b.id = c.base_id) END, c.pack_id + :packs, c.start, c.length "
            "FROM src.chunks c WHERE c.id IN temp.needed", offsets)
        cursor = db.execute(f"SELECT {_CHUNK_COLUMNS} FROM main.chunks c WHERE c.id > ? "
                            "ORDER BY c.pack_id, c.start", (offsets["chunks"],))
        for _, chunk_hash, problem in self._bad_chunks(map(tuple, cursor)):
            raise IntegrityError(f"chunk {chunk_hash} of the vault merged in: {problem}; "
                                 "nothing was merged", chunk=chunk_hash)
        # A delta of a delta here may now lie deeper than ours ever do: store such
        # chunks whole, so that chains stay short however often vaults are merged.
        deep = [r[0] for r in db.execute(
            "WITH RECURSIVE chain(id, top, depth) AS (SELECT id, id, 0 FROM main.chunks "
            "WHERE id > ? AND base_id IS NOT NULL UNION ALL SELECT c.base_id, chain.top, "
            "chain.depth + 1 FROM chain JOIN main.chunks c ON c.id = chain.id "
            "WHERE c.base_id IS NOT NULL AND chain.depth <= ?) "
            "SELECT top FROM chain GROUP BY top HAVING max(depth) > ?",
            (offsets["chunks"], _MAX_CHAIN, 2 * DELTA_DEPTH))]
        self._flatten(db, deep)
        db.execute("DELETE FROM packs WHERE id > ? AND NOT EXISTS "
                   "(SELECT 1 FROM chunks c WHERE c.pack_id = packs.id)", (offsets["packs"],))
        self._repack(db, after=offsets["packs"])
        return offsets

    def _flatten(self, db: sqlite3.Connection, ids: list[int]) -> None:
        """Store the delta chunks ``ids`` whole, in new packs (chunks based on them are
        unaffected: a chunk's bytes stay the same however they are stored)."""
        for first in range(0, len(ids), _BATCH):
            batch = db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                               f"({','.join('?' * len(ids[first:first + _BATCH]))})",
                               ids[first:first + _BATCH]).fetchall()
            jobs = self._jobs([tuple(r) for r in batch])
            raws = [np.empty(job[1], dtype=np.uint8) for job in jobs]
            self._map(lambda task: _decode(*task), zip(map(memoryview, raws), jobs, strict=True))
            encoded = self._map(_encode_job, [(memoryview(raw), row[4], None)
                                              for raw, row in zip(raws, batch, strict=True)])
            places = _pack(db, [data for _, _, data, _ in encoded])
            db.executemany(
                "UPDATE chunks SET codec = ?, itemsize = ?, base_id = NULL, pack_id = ?, "
                "start = ?, length = ? WHERE id = ?",
                [(codec, itemsize, *place, len(data), row[0]) for (codec, itemsize, data, _),
                 place, row in zip(encoded, places, batch, strict=True)])

    @staticmethod
    def _merge_versions(db: sqlite3.Connection, offsets: dict[str, int]) -> None:
        """Copy the incoming versions' rows, parts and chunk lists, ids shifted past ours."""
        shift = offsets["versions"]
        db.execute(
            "INSERT INTO main.versions SELECT v.id + ?, v.uuid, i.model_id, i.version, "
            "v.created_at, v.kind, v.layout, v.size, v.added_bytes, v.digest, v.description, "
            "v.metadata, i.environment_id, v.key_id, v.signature "
            "FROM src.versions v JOIN temp.incoming i ON i.src_id = v.id", (shift,))
        db.execute("INSERT INTO main.parts SELECT version_id + ?, part, kind, name, dtype, "
                   "shape, fortran_order, itemsize, size FROM src.parts "
                   "WHERE version_id IN (SELECT src_id FROM temp.incoming)", (shift,))
        copied = db.execute(
            "INSERT INTO main.part_chunks SELECT pc.version_id + ?, pc.part, pc.seq, "
            "(SELECT m.id FROM main.chunks m WHERE m.hash = c.hash) FROM src.part_chunks pc "
            "JOIN src.chunks c ON c.id = pc.chunk_id "
            "WHERE pc.version_id IN (SELECT src_id FROM temp.incoming)", (shift,)).rowcount
        listed = db.execute("SELECT count(*) FROM src.part_chunks WHERE version_id IN "
                            "(SELECT src_id FROM temp.incoming)").fetchone()[0]
        if copied != listed:
            raise IntegrityError(f"{listed - copied} chunk(s) that versions of the vault "
                                 "merged in list are missing from it; nothing was merged")

    @staticmethod
    def _merge_labels(db: sqlite3.Connection, source: Path,
                      models: dict[int, tuple[int, str, int]], shift: int) -> list[str]:
        """Bring in aliases and tags this vault lacks; returns the ones that differ."""
        conflicts = []
        db.execute("INSERT INTO main.tags SELECT version_id + ?, key, value FROM src.tags "
                   "WHERE version_id IN (SELECT src_id FROM temp.incoming)", (shift,))
        for version_id, name, number, key, theirs, ours in db.execute(
                "SELECT v.id, m.name, v.version, t.key, t.value, o.value FROM src.tags t "
                "JOIN src.versions s ON s.id = t.version_id JOIN src.models sm ON "
                "sm.id = s.model_id JOIN main.versions v ON v.uuid = s.uuid "
                "JOIN main.models m ON m.id = v.model_id AND m.name = sm.name LEFT JOIN main.tags "
                "o ON o.version_id = v.id AND o.key = t.key WHERE s.id NOT IN "
                "(SELECT src_id FROM temp.incoming)").fetchall():
            if ours is None:
                db.execute("INSERT INTO main.tags VALUES (?, ?, ?)", (version_id, key, theirs))
            elif ours != theirs:
                conflicts.append(f"{name}:{number} tag {key}: {ours!r} here, {theirs!r} in "
                                 f"{source.name}")
        for src_model, alias, version_id, number in db.execute(
                "SELECT a.model_id, a.alias, v.id, v.version FROM src.aliases a "
                "JOIN src.models sm ON sm.id = a.model_id "
                "JOIN src.versions s ON s.id = a.version_id AND s.model_id = a.model_id "
                "JOIN main.versions v ON v.uuid = s.uuid "
                "JOIN main.models mm ON mm.id = v.model_id AND mm.name = sm.name").fetchall():
            model_id, name, _ = models[src_model]
            here = db.execute("SELECT v.id, v.version FROM main.aliases a JOIN main.versions "
                              "v ON v.id = a.version_id WHERE a.model_id = ? AND a.alias = ?",
                              (model_id, alias)).fetchone()
            try:
                check_alias(alias)
            except ValueError:
                conflicts.append(f"{name}@{alias} in {source.name} is not a valid alias "
                                 "(left out)")
                continue
            if here is None:
                db.execute("INSERT INTO main.aliases VALUES (?, ?, ?)",
                           (model_id, alias, version_id))
            elif here[0] != version_id:
                conflicts.append(f"{name}@{alias}: {name}:{here[1]} here, {name}:{number} in "
                                 f"{source.name} (numbered here)")
        return conflicts

    # -- housekeeping -----------------------------------------------------------

    @_api
    def gc(self) -> int:
        """Drop chunks no version uses and give their space back; returns bytes freed.

        A chunk that another chunk is a delta of stays while that chunk does.
        """
        with self._write() as db:
            before = self._file_bytes()
            db.execute(f"{_LIVE_CHUNKS} DELETE FROM chunks WHERE id NOT IN live")
            db.execute("DELETE FROM environments WHERE id NOT IN "
                       "(SELECT environment_id FROM versions)")
            db.execute("DELETE FROM packs WHERE NOT EXISTS "
                       "(SELECT 1 FROM chunks c WHERE c.pack_id = packs.id)")
            self._repack(db)
            # The file is created with auto_vacuum=INCREMENTAL: this hands free pages back
            # to the file system without VACUUM's full copy of the database. Each step of
            # the pragma frees one page, and Python's sqlite3 steps a statement that has no
            # result columns only once (fetchall() does not help): run it once per free page.
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            for _ in range(free):
                db.execute("PRAGMA incremental_vacuum")
            after = self._file_bytes()
        return before - after

    def _repack(self, db: sqlite3.Connection, *, after: int = 0) -> None:
        """Move the live chunks of packs (with ids above ``after``) that are mostly dead
        space into new packs."""
        sparse = [r[0] for r in db.execute(
            "SELECT p.id FROM packs p JOIN chunks c ON c.pack_id = p.id WHERE p.id > ? "
            "GROUP BY p.id HAVING 2 * sum(c.length) < p.size", (after,))]
        for first in range(0, len(sparse), 4):  # at most 4 solid packs' content at a time
            ids = sparse[first:first + 4]
            marks = ",".join("?" * len(ids))
            packs = {r[0]: (r[1] == "zstd", _chunks.pack_content(*r[1:])) for r in db.execute(
                f"SELECT id, codec, size, data FROM packs WHERE id IN ({marks})", ids)}
            chunks = db.execute(f"SELECT id, pack_id, start, length FROM chunks "
                                f"WHERE pack_id IN ({marks}) ORDER BY pack_id, start",
                                ids).fetchall()
            if not all(isinstance(packs[p][1], bytes) and type(s) is int and type(n) is int
                       and 0 <= s and s + n <= len(packs[p][1]) for _, p, s, n in chunks):
                continue  # damaged: verify() reports it; moving it would hide the damage
            for solid in (False, True):
                mine = [c for c in chunks if packs[c[1]][0] == solid]
                places = _pack(db, [packs[p][1][s:s + n] for _, p, s, n in mine], solid=solid)
                db.executemany("UPDATE chunks SET pack_id = ?, start = ? WHERE id = ?",
                               [(*place, c[0]) for c, place in zip(mine, places, strict=True)])
            db.execute(f"DELETE FROM packs WHERE id IN ({marks})", ids)

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
        # integrity_check, not quick_check: it also finds index entries that point at the
        # wrong row (the cost is in rows, not in the packs' bytes).
        result = [r[0] for r in db.execute("PRAGMA integrity_check")]
        if result != ["ok"]:
            problems.extend(Problem(f"SQLite integrity_check: {line}") for line in result)
        for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check"):
            problems.append(Problem(f"{table} row {rowid} points at a missing {parent} row"))
        for name, last in db.execute(
                "SELECT name, last_version FROM models WHERE typeof(last_version) <> "
                "'integer' OR last_version < 0 OR last_version >= 1 << 62"):
            problems.append(Problem(f"last_version {last!r} is not a number modelvault "
                                    "gives out: the next save would fail", name))
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
        cursor = db.execute(f"{_LIVE_CHUNKS} SELECT {_CHUNK_COLUMNS} FROM chunks c "
                            "WHERE c.id IN live ORDER BY c.pack_id, c.start")
        for chunk_id, chunk_hash, problem in self._bad_chunks(map(tuple, cursor)):
            name, number = users.get(chunk_id, (None, None))
            problems.append(Problem(f"chunk {chunk_hash}: {problem}", name, number,
                                    chunk_hash))
        return problems

    def _bad_chunks(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[int, str, str]]:
        """Decode chunk rows (``_CHUNK_COLUMNS`` order) and check their hashes; yields
        (id, hash, problem) for each one that fails."""
        packs: dict[int, bytes] = {}
        for batch in _runs(rows, lambda r: _chunks.check_size(r[2])):
            tasks = [(memoryview(np.empty(_chunks.check_size(job[1]), dtype=np.uint8)), job)
                     for job in self._jobs(batch, packs)]
            ids = {r[1]: r[0] for r in batch}
            for error in self._map(_decode_checked, tasks):
                if error is not None:
                    yield ids[error[0]], error[0], error[1]

    @_api
    @_snapshot
    def stats(self) -> VaultStats:
        """Sizes of the vault: raw, after dedup, after compression, and the file itself."""
        db = self._db
        models, versions, raw = db.execute(
            "SELECT count(DISTINCT model_id), count(*), coalesce(sum(size), 0) "
            "FROM versions").fetchone()
        chunks, unique, stored = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), "
            "(SELECT coalesce(sum(length(data)), 0) FROM packs) FROM chunks").fetchone()
        return VaultStats(models=models, versions=versions, chunks=chunks, raw_bytes=raw,
                          unique_bytes=unique, stored_bytes=stored,
                          file_bytes=self._file_bytes())


class _Background:
    """``function()`` run on a thread of its own; ``result()`` waits for it and returns
    its value, or raises what it raised."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = function()
            except BaseException as exc:  # handed to the caller by result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="modelvault-background", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _check_number(value: Any, what: str, *, lowest: int = 1) -> int:
    """``value`` if it is an integer modelvault could have given out, else ValueError."""
    if type(value) is not int or not lowest <= value < 2**62:
        raise ValueError(f"{what} {value!r} is not one modelvault gives out")
    return value


def _as_ref(ref: str | ModelVersion) -> Ref:
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)


def _insert_pack(db: sqlite3.Connection, codec: str, lengths: list[int], data: bytes
                 ) -> list[tuple[int, int]]:
    """Insert one pack whose content is blobs of ``lengths`` in a row; returns each
    blob's (pack id, start)."""
    pack_id = db.execute("INSERT INTO packs (codec, size, data) VALUES (?, ?, ?)",
                         (codec, sum(lengths), data)).lastrowid
    starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    return [(pack_id, start) for start in starts]


def _pack(db: sqlite3.Connection, blobs: list[bytes], *, solid: bool = False
          ) -> list[tuple[int, int]]:
    """Write ``blobs`` into new packs of about PACK_SIZE bytes (SOLID_PACK raw bytes
    compressed as one, if ``solid``); returns each one's (pack id, start)."""
    places: list[tuple[int, int]] = []
    group: list[bytes] = []

    def flush() -> None:
        codec, data = _chunks.solid(group) if solid else ("raw", b"".join(group))
        places.extend(_insert_pack(db, codec, [len(b) for b in group], data))
        group.clear()

    limit = _chunks.SOLID_PACK if solid else _chunks.PACK_SIZE
    length = 0
    for blob in blobs:
        if group and length + len(blob) > limit:
            flush()
            length = 0
        group.append(blob)
        length += len(blob)
    if group:
        flush()
    return places


def _batches(part: Part) -> Iterator[list[bytes | memoryview]]:
    """A part's chunk pieces a batch at a time: fixed-size for numbers, by content
    otherwise, and for files read from disk as they go."""
    # Stream chunks (~80 KiB) go by the two solid packs' worth: one for each core to
    # compress while the batch before is written.
    if part.path is not None:
        with open(part.path, "rb") as f:
            yield from _runs(_chunks.content_pieces(f), len, 4 * _BATCH,
                             2 * _chunks.SOLID_PACK)
        return
    assert part.data is not None
    if part.kind in ("array", "buffer"):
        cuts = _chunks.fixed_cuts(part.size, part.itemsize)
        yield from _runs((part.data[o:o + n] for o, n in cuts), len)
    else:
        cuts = _chunks.content_cuts(part.data)
        yield from _runs((part.data[o:o + n] for o, n in cuts), len, 4 * _BATCH,
                         2 * _chunks.SOLID_PACK)


def _batch_views(chunks: list[Any]) -> Iterator[tuple[Any, memoryview]]:
    """(chunk, view) for a part's chunks, with a fresh buffer per batch (as ``_runs`` cuts
    them): a part streamed to a file is never held whole."""
    for batch in _runs(chunks, lambda c: c[2]):
        view, offset = memoryview(np.empty(sum(c[2] for c in batch), dtype=np.uint8)), 0
        for chunk in batch:
            yield chunk, view[offset:offset + chunk[2]]
            offset += chunk[2]


def _solid_groups(new: list[Any]) -> list[list[Any]]:
    """New stream chunks (hash, piece, _) in consecutive groups of at most SOLID_PACK
    bytes (but for a single bigger chunk), as few and as even as that allows."""
    total = sum(len(piece) for _, piece, _ in new)
    target = total / max(1, -(-total // _chunks.SOLID_PACK))
    groups: list[list[Any]] = []
    size = 0
    for entry in new:
        if not groups or (size + len(entry[1]) > _chunks.SOLID_PACK
                          or size >= target and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += len(entry[1])
    return groups


def _runs(items: Iterable[Any], size: Callable[[Any], int], count: int = _BATCH,
          limit: int = _BATCH_BYTES) -> Iterator[list[Any]]:
    """``items`` in lists of at most ``count`` items and, short of one item, ``limit`` bytes."""
    run: list[Any] = []
    total = 0
    for item in items:
        if run and total + size(item) > limit:
            yield run
            run, total = [], 0
        run.append(item)
        total += size(item)
        if len(run) == count:
            yield run
            run, total = [], 0
    if run:
        yield run


def _part_keys(kind: str, layout: Any, count: int) -> list[str | None]:
    """What identifies each part across versions: its place in the layout, for deltas."""
    keys: list[str | None] = [None] * count
    if kind == "pickle":  # out-of-band buffers, in the order the pickle met them
        return [None] + [f"buffer {i}" for i in range(1, count)]

    def walk(node: Any, path: list[Any]) -> None:
        if not isinstance(node, dict):
            return
        index = node.get("array")
        if type(index) is int and 0 <= index < count:
            keys[index] = json.dumps(path)
        for key, child in node.get("dict", []) if isinstance(node.get("dict"), list) else []:
            walk(child, [*path, key])
        for name in ("list", "tuple"):
            if isinstance(node.get(name), list):
                for i, child in enumerate(node[name]):
                    walk(child, [*path, i])

    if kind == "arrays":
        walk(layout, [])
    return keys


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


def _job(row: tuple[Any, ...], by_id: dict[int, Any], packs: dict[int, bytes | str],
         depth: int) -> tuple[Any, ...]:
    """The decoding job for one chunk row (see ``Vault._jobs``), its base's inside.

    A module function, not a closure: a closure that calls itself is a reference cycle,
    which kept every batch's packs alive until the garbage collector ran (+260 MB at the
    peak of a 400 MB load).
    """
    chunk_id, chunk_hash, size, codec, itemsize, base_id, pack_id, start, length = row
    try:
        _chunks.check_row(size, codec, itemsize, pack_id, start, length)
    except IntegrityError as exc:
        return (chunk_hash, size, codec, itemsize, str(exc), None)
    pack = packs.get(pack_id)
    if pack is None:
        stored: memoryview | str = f"pack #{pack_id} is missing"
    elif isinstance(pack, str):
        stored = f"pack #{pack_id} {pack}"
    elif start + length > len(pack):
        stored = f"lies beyond the end of pack #{pack_id}"
    else:
        stored = memoryview(pack)[start:start + length]
    base = None
    if base_id is not None:
        if depth >= _MAX_CHAIN or base_id not in by_id:
            stored = (f"its delta base #{base_id} is missing, or its chain of deltas is "
                      f"longer than {_MAX_CHAIN}" if depth < _MAX_CHAIN
                      else "delta chain too long or circular")
        else:
            base = _job(by_id[base_id], by_id, packs, depth + 1)
    return (chunk_hash, size, codec, itemsize, stored, base)


def _encode_job(job: tuple[memoryview, int, np.ndarray | None]
                ) -> tuple[str, int, bytes, bool]:
    """Encode a new numeric chunk, as a delta against its parent's bytes where that is
    smaller; returns (codec, itemsize, stored bytes, whether it is a delta)."""
    piece, itemsize, parent = job
    level = _chunks.ARRAY_LEVEL
    if parent is None:
        return (*_chunks.encode(piece, itemsize, level), False)
    delta = np.frombuffer(piece, np.uint8).copy()
    _chunks.xor_into(memoryview(delta), parent)
    as_delta = _chunks.encode(memoryview(delta), itemsize, level)
    if len(as_delta[2]) <= len(piece) * _DELTA_SURE:
        return (*as_delta, True)
    alone = _chunks.encode(piece, itemsize, level)
    if len(as_delta[2]) < len(alone[2]):
        return (*as_delta, True)
    return (*alone, False)


def _chain_length(job: Any) -> int:
    """How many deltas lie between a decoding job's chunk and one stored whole."""
    length = 0
    while job[5] is not None:
        job, length = job[5], length + 1
    return length


def _decode_checked(task: tuple[memoryview, Any]) -> tuple[str, str] | None:
    """Decode one chunk into its slot and check its hash; (hash, problem) or None."""
    out, job = task
    try:
        _decode(out, job)
    except IntegrityError as exc:
        return job[0], str(exc)
    return None


def _decode(out: memoryview, job: Any) -> None:
    """Decode a job from ``Vault._jobs`` into ``out``, base first for a delta; check hashes."""
    expected, size, codec, itemsize, stored, base = job
    if isinstance(stored, str):
        raise IntegrityError(stored)
    if size != len(out):
        raise IntegrityError(f"holds {size} bytes where {len(out)} are needed")
    _chunks.decode_into(out, codec, itemsize, stored)
    if base is not None:
        parent = np.empty(len(out), dtype=np.uint8)
        try:
            _decode(memoryview(parent), base)
        except IntegrityError as exc:
            raise IntegrityError(f"its delta base {base[0]}: {exc}") from exc
        _chunks.xor_into(out, parent)
    if _chunks.chunk_hash(out) != expected:
        raise IntegrityError("hash mismatch: stored bytes are damaged")


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
