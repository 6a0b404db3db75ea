"""The catalog: models, versions, aliases and tags, and what each version is made of.

Owns the ``models``, ``versions``, ``environments``, ``parts``, ``part_chunks``,
``aliases`` and ``tags`` tables: resolving a reference to its version (checked against
the table itself, so a damaged index cannot hand over another version), building the
records the API returns, adding a version's rows, moving labels, deleting, and checking
a version's chunk list against its digest. Leaves the chunks' bytes to the pack store
and argument checks, trust and the order of steps to the ``Vault``.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, NamedTuple

from . import _chunks, _json, _schema, _serialize, _trust
from ._connection import Connection
from ._errors import CorruptVaultError, IntegrityError, NotFoundError
from ._packs import Bases, ChunkRow
from ._records import Columns, ModelInfo, ModelVersion, Problem
from ._refs import Ref
from ._serialize import Part

# Kinds whose parts are files, named in the layout's "files".
FILE_KINDS = ("files", "framework")


class VersionRow(NamedTuple):
    """A version as stored: its versions row with its model's name and environment text."""

    id: int
    uuid: str
    name: str
    version: int
    created_at: str
    kind: str
    layout: str
    size: int
    added_bytes: int
    digest: str
    description: str
    metadata: str
    environment: str | None
    key_id: str | None
    signature: str | None
    parent: str | None  # the lineage row's (format 5 on); both None where there is none
    source: str | None

    @property
    def where(self) -> str:
        """``name:version``, for messages."""
        return f"{self.name}:{self.version}"

    @property
    def what(self) -> str:
        """``an arrays version``, ``a pickle version``: its kind, for messages."""
        return f"{'an' if self.kind[:1] in 'aeiou' else 'a'} {self.kind} version"

    @property
    def manifest(self) -> _trust.Manifest:
        return _trust.Manifest(self.uuid, self.name, self.kind, self.digest, self.created_at,
                               self.description, self.metadata, self.environment,  # type: ignore[arg-type]
                               _trust.lineage_text(self.parent, self.source))

    def layouts(self) -> tuple[Any, dict[str, Any] | None]:
        """``split_layout`` of this version's layout; IntegrityError naming the version if
        it cannot be read (not JSON, too deep, a malformed example)."""
        try:
            return split_layout(self.layout)
        except (ValueError, TypeError) as exc:
            raise self.error(f"unreadable layout: {exc}") from exc

    def error(self, message: str, chunk: str | None = None) -> IntegrityError:
        """An IntegrityError about this version."""
        return IntegrityError(f"{self.where}: {message}", model=self.name,
                              version=self.version, chunk=chunk)


class PartRow(NamedTuple):
    """A row of the parts table: one byte stream of a version."""

    version_id: int | None
    part: int
    kind: str
    name: str | None
    dtype: str | None
    shape: str | None  # JSON
    fortran_order: int
    itemsize: int
    size: int


class ModelSummary(NamedTuple):
    """A model at a glance: its versions, latest number, the stored bytes its saves
    added, and some of its aliases as (alias, version number)."""

    name: str
    versions: int
    latest: int
    stored: float  # total(): a float, and whatever a damaged file holds
    aliases: tuple[tuple[str, int], ...]


class Contents(NamedTuple):
    """A version's parts and, per part, its chunks in order."""

    parts: list[PartRow]
    chunks: list[list[ChunkRow]]


def split_layout(text: str) -> tuple[Any, dict[str, Any] | None]:
    """A version's layout as (its kind's layout, its example's descriptor or None). A
    version saved with an example stores ``{"model": layout, "example": descriptor}``;
    no kind's own layout has those two keys alone."""
    layout = _json.loads(text)
    if isinstance(layout, dict) and layout.keys() == {"model", "example"}:
        example = layout["example"]
        if not (isinstance(example, dict) and type(example.get("first")) is int):
            raise ValueError("its example's descriptor is malformed")
        return layout["model"], example
    return layout, None


def model_contents(contents: Contents, example: dict[str, Any] | None) -> Contents:
    """The model's own parts of a version's contents (its example's come after them)."""
    if example is None:
        return contents
    first = example["first"]
    if not 0 <= first <= len(contents.parts):
        raise ValueError(f"its example starts at part {first} of {len(contents.parts)}")
    return Contents(contents.parts[:first], contents.chunks[:first])


class NewVersion(NamedTuple):
    """Everything a save writes into the catalog for one version."""

    manifest: _trust.Manifest  # uuid, name, kind, digest, created_at, texts
    model_id: int
    number: int
    layout: str  # JSON
    added_bytes: int
    key_id: str
    signature: str
    parent: str | None  # uuid of the version this one came from
    source: str  # JSON: where it was made (git commit, script)
    parts: list[PartRow]
    chunk_ids: list[list[int]]
    tags: list[tuple[str, str]]
    aliases: list[str]


_VERSION_COLUMNS = ("v.id, v.uuid, m.name, v.version, v.created_at, v.kind, v.layout, v.size, "
                    "v.added_bytes, v.digest, v.description, v.metadata, e.json, v.key_id, "
                    "v.signature, {lineage}")
# What a ModelVersion is made of, in the order Catalog._build takes them.
_RECORD_COLUMNS = ("v.id, v.model_id, v.version, v.uuid, v.digest, v.created_at, v.size, "
                   "v.added_bytes, v.kind, v.description, v.metadata, v.environment_id, "
                   "v.key_id, v.signature, {lineage}")
_PART_COLUMNS = ", ".join(PartRow._fields)
# A version's chunk list, with each chunk's row (NULLs where the vault lacks it).
_LIST_COLUMNS = "pc.part, pc.chunk_id, " + ", ".join(f"c.{f}" for f in ChunkRow._fields[1:])


class Catalog:
    """The names, versions and labels of one vault, reached through its connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    # -- finding versions --------------------------------------------------------------

    def resolve(self, ref: Ref) -> VersionRow:
        """The version ``ref`` names, read from its table and checked to be it."""
        db = self._connection.db
        version_id, alias_row = self._look_up(ref)
        # Lookups go through indexes, and SQLite answers indexed columns from the index:
        # a damaged index entry would hand over another version under the name and
        # number asked for. The row itself, read by rowid alone, must agree.
        columns, join = self._lineage()
        found = db.execute(f"SELECT {columns(_VERSION_COLUMNS)} FROM versions v NOT INDEXED "
                           "JOIN models m NOT INDEXED ON m.id = v.model_id LEFT JOIN "
                           f"environments e ON e.id = v.environment_id {join} WHERE v.id = ?",
                           (version_id,)).fetchone()
        real = None if found is None else VersionRow._make(found)
        if real is None:
            agrees = False
        elif ref.alias is not None:
            agrees = db.execute(
                "SELECT 1 FROM aliases NOT INDEXED WHERE rowid = ? AND alias = ? AND "
                "version_id = ?", (alias_row, ref.alias, real.id)).fetchone() is not None
        elif ref.version is None:  # latest: no higher number in the table itself
            agrees = self._highest(real.id, real.version)
        else:
            agrees = real.version == ref.version
        if real is None or not (agrees and real.name == ref.name):
            what = ref.name + (f"@{ref.alias}" if ref.alias else
                               f":{ref.version}" if ref.version else "")
            raise self._damaged_index(what)
        return real

    def _damaged_index(self, what: str) -> CorruptVaultError:
        return CorruptVaultError(f"{self._connection.path}: vault file is damaged (an index "
                                 f"of it does not match its table where {what} is looked "
                                 "up); run verify()")

    def _highest(self, version_id: int, number: int) -> bool:
        """Whether no version of version ``version_id``'s model has a number above
        ``number``, by the tables alone. Usually the model's last_version says so at once;
        after the newest versions were deleted, every version row is read."""
        db = self._connection.db
        model_id, last = db.execute(
            "SELECT m.id, m.last_version FROM versions v NOT INDEXED JOIN models m NOT INDEXED "
            "ON m.id = v.model_id WHERE v.id = ?", (version_id,)).fetchone()
        return bool(last == number or db.execute(
            "SELECT max(version) FROM versions NOT INDEXED WHERE model_id = ?",
            (model_id,)).fetchone()[0] == number)

    def _look_up(self, ref: Ref) -> tuple[int, int | None]:
        """(version id, alias rowid or None) of the version ``ref`` names, by the indexes;
        NotFoundError listing what there is, if none."""
        db = self._connection.db
        model_id = self.model_id(ref.name)
        if ref.alias is not None:
            row = db.execute("SELECT version_id, rowid FROM aliases WHERE model_id = ? AND "
                             "alias = ?", (model_id, ref.alias)).fetchone()
            if row is None:
                aliases = [r[0] for r in db.execute(
                    "SELECT alias FROM aliases WHERE model_id = ? ORDER BY alias",
                    (model_id,))]
                raise NotFoundError(f"model {ref.name!r} has no alias {ref.alias!r} "
                                    f"(aliases: {', '.join(map(str, aliases)) or 'none'})")
            return row[0], row[1]
        if ref.version is not None:
            row = db.execute("SELECT id FROM versions WHERE model_id = ? AND version = ?",
                             (model_id, ref.version)).fetchone()
        else:
            # "Latest" is a query, never a stored pointer that could go stale.
            row = db.execute("SELECT id FROM versions WHERE model_id = ? "
                             "ORDER BY version DESC LIMIT 1", (model_id,)).fetchone()
        if row is None:
            numbers = [str(r[0]) for r in db.execute(
                "SELECT version FROM versions WHERE model_id = ? ORDER BY version",
                (model_id,))]
            what = f"version {ref.version}" if ref.version is not None else "versions"
            raise NotFoundError(f"model {ref.name!r} has no {what} "
                                f"(versions: {', '.join(numbers) or 'none'})")
        return row[0], None

    def model_id(self, name: str) -> int:
        """The id of model ``name``; NotFoundError listing the models there are, if none."""
        db = self._connection.db
        model = db.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()
        if model is None:
            names = [r[0] for r in db.execute(
                "SELECT name FROM models m WHERE EXISTS (SELECT 1 FROM versions v "
                "WHERE v.model_id = m.id) ORDER BY name LIMIT 11")]
            known = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
            raise NotFoundError(f"no model named {name!r} in {self._connection.path} "
                                f"(models: {known or 'none'})")
        return int(model[0])

    def rows(self) -> list[VersionRow]:
        """Every version, by model name and number."""
        columns, join = self._lineage()
        return [VersionRow._make(r) for r in self._connection.db.execute(
            f"SELECT {columns(_VERSION_COLUMNS)} FROM versions v JOIN models m ON "
            "m.id = v.model_id LEFT JOIN environments e ON e.id = v.environment_id "
            f"{join} ORDER BY m.name, v.version")]

    def _lineage(self) -> tuple[Callable[[str], str], str]:
        """How a query gets each version's lineage row: (fill in a column list, join).
        A vault of an older format opened read-only has no lineage table."""
        if self._connection.format >= 5:
            return (lambda text: text.format(lineage="l.parent, l.source"),
                    "LEFT JOIN lineage l ON l.version_id = v.id")
        return (lambda text: text.format(lineage="NULL, NULL")), ""

    def ancestors(self, version_id: int) -> list[ModelVersion]:
        """The records of the versions version ``version_id`` came from, nearest first,
        by their lineage rows (docs/format.md gives this walk as SQL). The chain stops at
        a parent this vault lacks; a cycle, which only a hand-edited file has, is
        followed once."""
        if self._connection.format < 5:  # older vaults, read as they are, have no lineage
            return []
        chain = dict.fromkeys(self._connection.db.execute(
            "WITH RECURSIVE chain(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT p.id, chain.depth + 1 FROM chain JOIN lineage l ON "
            "l.version_id = chain.id JOIN versions p ON p.uuid = l.parent "
            "WHERE chain.depth < 1000) SELECT v.id, v.uuid FROM chain JOIN versions v "
            "ON v.id = chain.id WHERE chain.depth > 0 AND v.id != ? ORDER BY chain.depth",
            (version_id, version_id)).fetchall())
        if not chain:
            return []
        ids = [i for i, _ in chain]
        found = {r.id: r for r in self.records(
            f"WHERE v.id IN ({','.join('?' * len(ids))})", ids)}
        return [found[uuid] for _, uuid in chain]

    # -- records -----------------------------------------------------------------------

    def record(self, ref: Ref) -> ModelVersion:
        """The record of the version ``ref`` names."""
        return self.records("WHERE v.id = ?", (self.resolve(ref).id,))[0]

    def records(self, where: str, params: Sequence[Any] = ()) -> list[ModelVersion]:
        """Records of the versions ``where`` selects (from ``versions v JOIN models m``)."""
        columns, join = self._lineage()
        with _no_collection():
            return self._build(self._connection.db.execute(
                f"SELECT {columns(_RECORD_COLUMNS)} FROM versions v JOIN models m ON m.id = "
                f"v.model_id {join} {where}", params).fetchall())

    def every_record(self) -> list[ModelVersion]:
        """Records of every version, by model name and number."""
        # One pass over the table, sorted here: ordered by SQLite, the join walks the
        # name index and fetches each row by rowid, at 2.5x the time (10,000 versions).
        columns, join = self._lineage()
        with _no_collection():
            records = self._build(self._connection.db.execute(
                f"SELECT {columns(_RECORD_COLUMNS)} FROM versions v {join}").fetchall())
            records.sort(key=_by_name_and_number)
        return records

    def _build(self, rows: Sequence[Sequence[Any]]) -> list[ModelVersion]:
        """Records for rows of ``_RECORD_COLUMNS`` (plain tuples: listing 10,000 versions
        is mostly building these, and named access costs a third of it)."""
        if not rows:
            return []
        db = self._connection.db
        # Only the versions that have tags or aliases get an entry: most have none.
        tags: dict[int, dict[str, str]] = {}
        alias_lists: dict[int, list[str]] = {}
        ids = [r[0] for r in rows]
        # Few versions: look up theirs (in groups, under SQLite's variable limit);
        # many: one pass over the tables beats a thousand lookups (the rows of versions
        # not listed are never asked for).
        groups = [ids[i:i + 500] for i in range(0, len(ids), 500)] if len(ids) <= 2000 else [[]]
        for some in groups:
            where = f"WHERE version_id IN ({','.join('?' * len(some))})" if some else ""
            for vid, key, value in db.execute(
                    f"SELECT version_id, key, value FROM tags {where} ORDER BY key", some):
                tags.setdefault(vid, {})[key] = value
            for vid, alias in db.execute(
                    f"SELECT version_id, alias FROM aliases {where} ORDER BY alias", some):
                alias_lists.setdefault(vid, []).append(alias)
        aliases = {vid: tuple(found) for vid, found in alias_lists.items()}
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
            raise CorruptVaultError(f"{self._connection.path}: vault file is damaged (a "
                                    "version's model or number is missing or not what "
                                    "modelvault writes)")
        # tuple.__new__ is Columns._make without its Python-level call and length check
        # (the tuple display has its seven fields).
        make, new = ModelVersion._make, tuple.__new__
        return [make(names[model_id], version, uuid_, digest, parse_time(created_at), size,
                     added, kind, tags.get(vid) or {}, aliases.get(vid, ()), description,
                     new(Columns, (created_at, metadata, environments.get(env_id), key_id,
                                   signature, parent, source)))
                for (vid, model_id, version, uuid_, digest, created_at, size, added, kind,
                     description, metadata, env_id, key_id, signature, parent, source) in rows]

    def models(self) -> list[ModelInfo]:
        """Every model that has versions, by name."""
        rows = self._connection.db.execute(
            "SELECT m.name, count(*), max(v.version), max(v.created_at) FROM models m "
            "JOIN versions v ON v.model_id = m.id GROUP BY m.id ORDER BY m.name").fetchall()
        return [ModelInfo(name, count, latest, parse_time(updated))
                for name, count, latest, updated in rows]

    def summaries(self, limit: int, aliases: int) -> tuple[list[ModelSummary], int]:
        """The first ``limit`` models by name, each with up to ``aliases`` of its aliases,
        and the number of models: a notebook's view of a vault of any size (two queries,
        bounded whatever the file holds)."""
        db = self._connection.db
        # total(): a float that cannot overflow, where sum() of a damaged size would raise.
        rows = db.execute(
            "SELECT m.id, m.name, count(*), max(v.version), total(v.added_bytes), "
            "count(*) OVER () FROM models m JOIN versions v ON v.model_id = m.id "
            "GROUP BY m.id ORDER BY m.name LIMIT ?", (limit,)).fetchall()
        labels: dict[int, list[tuple[str, int]]] = {}
        ids = [r[0] for r in rows]
        for model_id, alias, number in db.execute(
                "SELECT model_id, alias, version FROM (SELECT a.model_id, a.alias, v.version, "
                "row_number() OVER (PARTITION BY a.model_id ORDER BY a.alias) AS n FROM "
                "aliases a JOIN versions v ON v.id = a.version_id WHERE a.model_id IN "
                f"({','.join('?' * len(ids))})) WHERE n <= ?", (*ids, aliases)):
            labels.setdefault(model_id, []).append((alias, number))
        return ([ModelSummary(name, count, latest, stored, tuple(labels.get(i, ())))
                 for i, name, count, latest, stored, _ in rows],
                rows[0][5] if rows else 0)

    # -- what a version is made of -----------------------------------------------------

    def contents(self, row: VersionRow) -> Contents:
        """A version's parts and their chunks. A chunk the vault lacks comes back with
        hash None; ``check`` refuses such lists."""
        db = self._connection.db
        parts = [PartRow._make(r) for r in db.execute(
            f"SELECT {_PART_COLUMNS} FROM parts WHERE version_id = ? ORDER BY part",
            (row.id,))]
        lists: list[list[ChunkRow]] = [[] for _ in parts]
        for part, *fields in db.execute(
                f"SELECT {_LIST_COLUMNS} FROM part_chunks pc LEFT JOIN chunks c ON "
                "c.id = pc.chunk_id WHERE pc.version_id = ? ORDER BY pc.part, pc.seq",
                (row.id,)):
            if type(part) is not int or not 0 <= part < len(parts):
                raise row.error(f"chunk list names part {part}, which is missing")
            chunk = ChunkRow._make(fields)
            if chunk.hash is not None:
                try:
                    _chunks.check_row(chunk.size, chunk.codec, chunk.itemsize, chunk.pack_id,
                                      chunk.start, chunk.length)
                except IntegrityError as exc:
                    raise row.error(f"chunk {chunk.hash}: {exc}", chunk.hash) from exc
            lists[part].append(chunk)
        return Contents(parts, lists)

    def check(self, row: VersionRow, contents: Contents) -> None:
        """IntegrityError unless every chunk exists, each part's chunks add up to its
        size, and the parts and chunk hashes give the version's digest."""
        for part, chunks in zip(*contents, strict=True):
            for chunk in chunks:
                if chunk.hash is None:
                    raise row.error(f"chunk #{chunk.id} is missing from the vault",
                                    str(chunk.id))
            if sum(c.size for c in chunks) != part.size:
                raise row.error(f"part {part.part}'s chunks do not add up to its "
                                f"{part.size} bytes")
        try:
            found = digest(row.kind, _json.loads(row.layout), contents.parts,
                           [[c.hash for c in chunks] for chunks in contents.chunks])
        except (ValueError, TypeError) as exc:
            raise row.error(f"unreadable parts: {exc}") from exc
        if found != row.digest:
            raise row.error("its parts or chunk list do not match its digest (the file was "
                            "edited or damaged)")

    def bases(self, parent: VersionRow, kind: str, layout: Any, parts: list[PartRow]
              ) -> list[Bases | None]:
        """Per new part, the chunks of the ``parent`` version that its chunks may be
        XORed against (see ``PackStore.put``), None where there are none.

        An array or buffer part's base is the parent's part at the same place in the
        layout (the same dict key, say) with the same kind, dtype and shape. A tensor
        in a safetensors file's base is the tensor of the same name, dtype and shape in
        the parent's file of the same path.
        """
        none: list[Bases | None] = [None] * len(parts)
        try:
            old_layout, example = parent.layouts()
            old = model_contents(self.contents(parent), example)
            if kind in FILE_KINDS:
                return _file_bases(old_layout if parent.kind in FILE_KINDS else {}, old,
                                   layout)
            old_keys = _serialize.part_keys(parent.kind, old_layout, len(old.parts))
        except (IntegrityError, ValueError, TypeError, KeyError, IndexError):
            return none  # a damaged parent only costs the deltas
        by_key = {key: (p, chunks) for key, p, chunks in zip(old_keys, *old, strict=True)
                  if key is not None}
        bases = none
        for i, (key, part) in enumerate(zip(_serialize.part_keys(kind, layout, len(parts)),
                                            parts, strict=True)):
            match = by_key.get(key) if key is not None else None
            if match is not None and part.kind in ("array", "buffer") and (
                    _shape_of(match[0]) == _shape_of(part)):
                bases[i] = {None: match[1]}
        return bases

    # -- writing -----------------------------------------------------------------------

    def next_number(self, name: str, created_at: str) -> tuple[int, int]:
        """(model id, number) for the next version of ``name``; adds the model if new."""
        db = self._connection.db
        row = db.execute("SELECT id, last_version FROM models WHERE name = ?",
                         (name,)).fetchone()
        if row is None:
            return db.execute("INSERT INTO models (name, created_at) VALUES (?, ?)",
                              (name, created_at)).lastrowid, 1
        try:
            return row[0], check_number(row[1], "last_version", lowest=0) + 1
        except ValueError as exc:
            raise CorruptVaultError(f"{self._connection.path}: model {name!r}: {exc}: the "
                                    "file is damaged") from exc

    def add(self, new: NewVersion) -> None:
        """Write a version's rows (its chunks are in already): this makes it visible."""
        db = self._connection.db
        m = new.manifest
        version_id = db.execute(
            "INSERT INTO versions (uuid, model_id, version, created_at, kind, layout, "
            "size, added_bytes, digest, description, metadata, environment_id, key_id, "
            "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.id, new.model_id, new.number, m.created_at, m.kind, new.layout,
             sum(p.size for p in new.parts), new.added_bytes, m.digest, m.description,
             m.metadata, self.environment_id(m.environment), new.key_id,
             new.signature)).lastrowid
        db.executemany(
            f"INSERT INTO parts ({_PART_COLUMNS}) VALUES ({','.join('?' * len(PartRow._fields))})",
            [p._replace(version_id=version_id) for p in new.parts])
        db.executemany(
            "INSERT INTO part_chunks (version_id, part, seq, chunk_id) VALUES (?, ?, ?, ?)",
            [(version_id, i, seq, c) for i, ids in enumerate(new.chunk_ids)
             for seq, c in enumerate(ids)])
        db.execute("INSERT INTO lineage (version_id, parent, source) VALUES (?, ?, ?)",
                   (version_id, new.parent, new.source))
        db.executemany("INSERT INTO tags (version_id, key, value) VALUES (?, ?, ?)",
                       [(version_id, k, v) for k, v in new.tags])
        db.executemany(
            "INSERT OR REPLACE INTO aliases (model_id, alias, version_id) VALUES (?, ?, ?)",
            [(new.model_id, a, version_id) for a in new.aliases])
        db.execute("UPDATE models SET last_version = ? WHERE id = ?",
                   (new.number, new.model_id))

    def environment_id(self, text: str) -> int:
        """The environments row holding ``text``, added if new. Versions saved on one
        machine share one row: listing 10,000 versions reads it once, not 10,000 times."""
        db = self._connection.db
        # A scan, not an index: there are as many rows as machines and package sets.
        row = db.execute("SELECT id FROM environments WHERE json = ?", (text,)).fetchone()
        if row is not None:
            return int(row[0])
        env_id = int(db.execute("INSERT INTO environments (json) VALUES (?)",
                                (text,)).lastrowid)
        _schema.add_packages(db, env_id, text)  # each package a row: queryable without JSON
        return env_id

    def set_alias(self, row: VersionRow, alias: str) -> None:
        self._connection.db.execute(
            "INSERT OR REPLACE INTO aliases (model_id, alias, version_id) "
            "SELECT model_id, ?, id FROM versions WHERE id = ?", (alias, row.id))

    def remove_alias(self, name: str, alias: str) -> None:
        self.resolve(Ref(name, alias=alias))  # NotFoundError if there is none
        self._connection.db.execute(
            "DELETE FROM aliases WHERE alias = ? AND model_id = "
            "(SELECT id FROM models WHERE name = ?)", (alias, name))

    def set_tags(self, row: VersionRow, items: list[tuple[str, str | None]]) -> None:
        """Set tags on a version; a value of None removes that tag."""
        db = self._connection.db
        for key, value in items:
            if value is None:
                db.execute("DELETE FROM tags WHERE version_id = ? AND key = ?", (row.id, key))
            else:
                db.execute("INSERT OR REPLACE INTO tags (version_id, key, value) "
                           "VALUES (?, ?, ?)", (row.id, key, value))

    def delete(self, ref: Ref) -> int:
        """Delete the version ``ref`` names, or every version of a bare name's model
        (keeping the model's row and so its numbers); returns how many."""
        db = self._connection.db
        if ref.version is None and ref.alias is None:
            model_id = self.model_id(ref.name)
            if db.execute("SELECT name FROM models NOT INDEXED WHERE id = ?",
                          (model_id,)).fetchone()[0] != ref.name:  # see resolve
                raise self._damaged_index(ref.name)
            count = db.execute("SELECT count(*) FROM versions WHERE model_id = ?",
                               (model_id,)).fetchone()[0]
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))
            return int(count)
        db.execute("DELETE FROM versions WHERE id = ?", (self.resolve(ref).id,))
        return 1

    def drop_unused_environments(self) -> None:
        self._connection.db.execute("DELETE FROM environments WHERE id NOT IN "
                                    "(SELECT environment_id FROM versions)")

    def problems(self) -> list[Problem]:
        """What is wrong with the models' rows: last_version numbers no save can follow."""
        db = self._connection.db
        problems = []
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
        return problems


@contextmanager
def _no_collection() -> Iterator[None]:
    """No cyclic garbage collection meanwhile. Listing versions makes tens of thousands
    of objects (rows, strings, records) and none in a cycle: the collector's passes that
    they set off find nothing, and took a sixth of listing 10,000 versions."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _by_name_and_number(record: ModelVersion) -> tuple[str, int]:
    # Python orders str by code point, as SQLite's BINARY collation orders UTF-8.
    return record.name, record.version


def part_row(part: Part, index: int, size: int) -> PartRow:
    """The parts row of a part about to be saved, ``size`` bytes long."""
    return PartRow(None, index, part.kind, part.name, part.dtype,
                   None if part.shape is None else json.dumps(part.shape),
                   int(part.fortran_order), part.itemsize, size)


def digest(kind: str, layout: Any, parts: Sequence[PartRow], hashes: list[list[str]]) -> str:
    """The version's content hash: BLAKE3 over its layout, part descriptors and chunk names."""
    descriptors = [{"kind": p.kind, "name": p.name, "dtype": p.dtype,
                    "shape": None if p.shape is None else _json.loads(p.shape),
                    "fortran_order": p.fortran_order, "itemsize": p.itemsize, "size": p.size,
                    "chunks": chunks} for p, chunks in zip(parts, hashes, strict=True)]
    return _chunks.chunk_hash(_trust.canonical_json(
        {"kind": kind, "layout": layout, "parts": descriptors}))


def _file_bases(old_layout: Any, old: Contents, layout: Any) -> list[Bases | None]:
    """Bases for the tensors of safetensors files: the same-named tensor, of the same
    dtype and shape, in the parent's file of the same path (layouts' "tensors" runs)."""
    def runs(of: Any) -> list[Any]:
        found = of.get("tensors") or [None] * len(of.get("files", []))
        return found if isinstance(found, list) else []

    old_files: dict[str, dict[str, list[ChunkRow]]] = {}
    for name, file_runs, chunks in zip(old_layout.get("files", []), runs(old_layout),
                                       old.chunks, strict=True):
        if isinstance(file_runs, list):
            old_files[name] = {run[0]: (run[1], run[2], chunks[run[3]:run[3] + run[4]])
                               for run in file_runs}
    bases: list[Bases | None] = []
    for name, file_runs in zip(layout["files"], runs(layout), strict=True):
        found = old_files.get(name, {})
        mine: Bases = {}
        for tensor, dtype, shape, _, _ in file_runs or []:
            match = found.get(tensor)
            if match is not None and (match[0], match[1]) == (dtype, shape):
                mine[tensor] = match[2]
        bases.append(mine or None)
    return bases


def _shape_of(part: PartRow) -> tuple[Any, ...]:
    """What must match for a parent's part to serve as a delta base of a new one."""
    return (part.kind, part.dtype, part.shape, part.fortran_order, part.itemsize, part.size)


def check_number(value: Any, what: str, *, lowest: int = 1) -> int:
    """``value`` if it is an integer modelvault could have given out, else ValueError."""
    if type(value) is not int or not lowest <= value < 2**62:
        raise ValueError(f"{what} {value!r} is not one modelvault gives out")
    return value


def now() -> str:
    """The time now as versions and remote log entries record it (``parse_time`` reads it)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z", re.ASCII)


def parse_time(text: str) -> datetime:
    # fromisoformat is 50x faster than strptime (listing 10,000 versions parses 10,000);
    # the pattern keeps it as strict as the format Vault writes (fromisoformat alone also
    # takes week dates and comma fractions, which another reader would refuse).
    if isinstance(text, str) and _TIME.fullmatch(text):
        try:
            return datetime.fromisoformat(text[:26] + "+00:00")
        except ValueError:
            pass
    raise IntegrityError(f"{text!r} is not a modelvault timestamp")
