"""The copier: versions of one vault, and the chunks the destination lacks, into another.

One mechanism serves ``export`` (into a new, empty vault) and ``merge`` (into a vault
with versions of its own). The steps are the ones a remote store will take too: pick
the versions the destination lacks (by id), number them, bring the chunks it lacks (by
hash) with their delta bases, check them, then the versions' rows, then the labels.

Works through SQLite with the source attached as ``src``, inside the destination's
write transaction, so the source is read in one snapshot and either everything is
copied or nothing. Leaves chunk bytes to the pack store and records to the catalog.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import warnings
from pathlib import Path
from typing import NamedTuple

from . import _atomic, _packs, _schema, _trust
from ._catalog import Catalog, check_number
from ._connection import Connection
from ._errors import DamagedVaultWarning, IntegrityError, NotFoundError, UntrustedError
from ._gc import collect_garbage
from ._guard import translated
from ._packs import PackStore
from ._refs import check_alias, check_name
from ._reports import MergeReport
from ._verify import verify


def export(connection: Connection, catalog: Catalog, packs: PackStore, dest: Path,
           ids: list[int] | None, *, skip_damaged: bool) -> Path:
    """Write a new vault of the versions ``ids`` (every one if None) to ``dest``, in a
    temporary file beside it renamed over it once on disk (see ``Vault.export``)."""
    if skip_damaged:
        ids = _whole(connection, catalog, packs, ids, dest)
    partial = _atomic.scratch_path(dest, ".partial")
    try:
        into = Connection(partial, readonly=False, create=True, timeout=connection.timeout)
        try:
            into_catalog, into_packs = Catalog(into), PackStore(into)
            copy_from(into, into_catalog, into_packs, connection.path, ids, check=False,
                      action="export", damaged=connection.damage is not None)
            # Repacks the packs that came along with chunks left behind; its errors name
            # the copy, as they did when the copy was a Vault of its own.
            with translated(partial):
                collect_garbage(into, into_catalog, into_packs)
        finally:
            into.close()
        _atomic.fsync(partial)
        os.replace(partial, dest)
        _atomic.fsync(dest.parent, directory=True)
    finally:
        for leftover in (partial, f"{partial}-journal"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return dest


def _whole(connection: Connection, catalog: Catalog, packs: PackStore,
           ids: list[int] | None, dest: Path) -> list[int]:
    """The versions ``ids`` (every one if None) that verify() finds nothing wrong
    with; a DamagedVaultWarning names the others."""
    with connection.read():
        damaged = {(p.model, p.version) for p in verify(connection, catalog, packs)
                   if p.version is not None}
    with connection.read():
        rows = [r for r in catalog.rows() if ids is None or r.id in ids]
    left_out = [r.where for r in rows if (r.name, r.version) in damaged]
    if left_out:
        warnings.warn(DamagedVaultWarning(
            f"{connection.path}: left out of {dest.name}, damaged: {', '.join(left_out)}"),
            stacklevel=5)  # past export, Vault.export and its guard
    return [r.id for r in rows if (r.name, r.version) not in damaged]


def merge(connection: Connection, catalog: Catalog, packs: PackStore, source: Path,
          require: str | None) -> MergeReport:
    """Bring in every version of the vault ``source`` that this one lacks, or with
    ``require``, every one it lets in (see ``Vault.merge``)."""
    # Opening it first gives the usual errors for a file that is not a vault (or that
    # needs a writable open to roll back an interrupted write); 60 s: Vault's default.
    theirs = Connection(source, readonly=True, create=False, timeout=60.0)
    try:
        if require is None:
            ids, refused = None, []
        else:  # as a pull does: only what a key trusted here signed comes in
            with translated(source), theirs.read():
                ids, refused = _required_ids(Catalog(theirs), require)
    finally:
        theirs.close()
    report = copy_from(connection, catalog, packs, source, ids, check=True, action="merge")
    return MergeReport(report.added, report.renumbered, (*report.conflicts, *refused))


def _required_ids(catalog: Catalog, require: str) -> tuple[list[int], list[str]]:
    """The row ids of the versions ``require`` lets in, and a line for each refused."""
    ids, refused = [], []
    for row in catalog.rows():
        status = _trust.signature_status(row.manifest, row.key_id, row.signature)
        try:
            _trust.check_required(require, status, row.where)
            ids.append(row.id)
        except UntrustedError as exc:
            refused.append(f"not merged: {exc}")
    return ids, refused


def copy_from(connection: Connection, catalog: Catalog, packs: PackStore, source: Path,
              ids: list[int] | None, *, check: bool, action: str, damaged: bool = False,
              by_hash: ByHash | None = None) -> MergeReport:
    """``copy`` with ``source`` attached, in a write transaction of its own sized for what
    comes in. ``damaged``: ``source`` is cut short (see ``Connection.attached``)."""
    with connection.attached(source, damaged=damaged) as db:
        # The raw bytes of the versions copied: more than they can add.
        incoming = db.execute(
            "SELECT coalesce(sum(size), 0) FROM src.versions"
            + ("" if ids is None else f" WHERE id IN ({','.join('?' * len(ids))})"),
            ids or ()).fetchone()[0]
        with connection.write(incoming):
            return copy(connection, catalog, packs, source, ids, check=check, action=action,
                        by_hash=by_hash)


class Model(NamedTuple):
    """A model of the source, as the destination holds it."""

    id: int  # the destination's id
    name: str
    last_version: int  # the source's


class Offsets(NamedTuple):
    """The destination's highest ids before the copy: copied rows get ids above them."""

    chunks: int
    packs: int
    versions: int


class ByHash(NamedTuple):
    """What a source names by hash alone, for the destination to give from its own
    chunks: a pull's bundle holds the chunks it fetched, not those the vault has."""

    lists: dict[str, list[list[str]]]  # version uuid: its parts' chunk hashes, in order
    bases: dict[str, str]  # chunk hash: its delta base's hash, where the source lacks it


def copy(connection: Connection, catalog: Catalog, store: PackStore, source: Path,
         ids: list[int] | None, *, check: bool, action: str,
         by_hash: ByHash | None = None) -> MergeReport:
    """Copy the versions ``ids`` of the vault ``source`` (every one if None) that the
    destination lacks, with the chunks it lacks.

    Inside a write transaction with ``source`` attached as ``src``. Versions keep their
    numbers unless one here holds it; from the first clash on, a model's incoming
    versions are numbered after the destination's last number. Models come along with
    every version copied, and every model (so that numbers given out there are never
    given out here) when ``ids`` is None. ``check`` decodes every chunk copied and
    checks its hash before anything is committed (a source we did not write).
    ``action`` ("export", "merge" or "pull") names the operation in errors.
    ``by_hash``: chunk lists and delta bases the source gives by hash, not by its rows:
    a chunk it names so must be the destination's already.
    """
    nothing = f"nothing was {action}{'d' if action.endswith('e') else 'ed'}"
    db = connection.db
    _schema.check(db, source, "src")  # again, in the snapshot copied from
    db.execute("CREATE TEMP TABLE wanted (id INTEGER PRIMARY KEY)")
    if ids is None:
        db.execute("INSERT INTO temp.wanted SELECT id FROM src.versions")
    else:
        db.executemany("INSERT INTO temp.wanted VALUES (?)", [(i,) for i in ids])
        found = db.execute("SELECT count(*) FROM src.versions WHERE id IN temp.wanted"
                           ).fetchone()[0]
        if found != len(set(ids)):  # deleted by another process since they were named
            raise NotFoundError(f"{source}: {len(set(ids)) - found} of the versions to "
                                f"{action} were deleted meanwhile; "
                                "nothing was written")
    conflicts = [
        f"{name}:{number}: the version with this id differs in {source.name} "
        "(kept this one)" for name, number in db.execute(
            "SELECT m.name, v.version FROM main.versions v JOIN main.models m ON "
            "m.id = v.model_id JOIN src.versions s ON s.uuid = v.uuid JOIN src.models "
            "sm ON sm.id = s.model_id WHERE s.id IN temp.wanted AND (s.digest IS NOT "
            "v.digest OR sm.name IS NOT m.name)")]
    models = _models(db, catalog, source, nothing, every=ids is None)
    renumbered = _numbers(db, catalog, models, nothing)
    # Numbers given out there (to versions since deleted, too) are not given out here.
    db.executemany("UPDATE main.models SET last_version = max(last_version, ?) "
                   "WHERE id = ?", [(m.last_version, m.id) for m in models.values()])
    _listed(db, by_hash)
    offsets = _chunks(db, store, nothing, check=check)
    _versions(db, offsets, nothing)
    _added_bytes(db, offsets)
    conflicts += _labels(db, source, models, offsets.versions)
    added = catalog.records("WHERE v.id > ? ORDER BY m.name, v.version", (offsets.versions,))
    for table in ("wanted", "incoming", "listed", "bases", "needed"):
        db.execute(f"DROP TABLE temp.{table}")
    return MergeReport(tuple(added), tuple(renumbered), tuple(conflicts))


def _models(db: sqlite3.Connection, catalog: Catalog, source: Path, nothing: str, *,
            every: bool) -> dict[int, Model]:
    """Our model (added if missing) for each model of ``src`` that comes along, by their
    id."""
    models = {}
    for src_id, name, created_at, last in db.execute(
            "SELECT id, name, created_at, last_version FROM src.models"
            + ("" if every else " WHERE id IN (SELECT model_id FROM src.versions "
               "WHERE id IN temp.wanted)")).fetchall():
        try:
            check_name(name)
            check_number(last, "last_version", lowest=0)
        except ValueError as exc:
            raise IntegrityError(f"{source}: {exc}; {nothing}") from exc
        row = db.execute("SELECT id FROM main.models WHERE name = ?", (name,)).fetchone()
        model_id = row[0] if row else db.execute(
            "INSERT INTO main.models (name, created_at) VALUES (?, ?)",
            (name, created_at)).lastrowid
        models[src_id] = Model(model_id, name, last)
    return models


def _numbers(db: sqlite3.Connection, catalog: Catalog, models: dict[int, Model],
             nothing: str) -> list[tuple[str, int, int]]:
    """Fill temp.incoming with the versions to bring in and their model, number and
    environment here; returns the renumbered ones as (name, theirs, ours)."""
    db.execute("CREATE TEMP TABLE incoming (src_id INTEGER PRIMARY KEY, model_id INTEGER, "
               "version INTEGER, environment_id INTEGER)")
    rows = db.execute(
        "SELECT s.id, s.model_id, s.version, s.created_at, e.json FROM src.versions s "
        "LEFT JOIN src.environments e ON e.id = s.environment_id "
        "WHERE s.id IN temp.wanted AND s.uuid NOT IN (SELECT uuid FROM main.versions) "
        "ORDER BY s.model_id, s.version").fetchall()
    renumbered = []
    for src_model, group in itertools.groupby(rows, key=lambda r: r[1]):
        if src_model not in models:
            raise IntegrityError("a version of the vault copied from names a model it does "
                                 f"not hold; {nothing}")
        model = models[src_model]
        theirs = list(group)
        for r in theirs:
            try:
                check_number(r[2], "version number")
            except ValueError as exc:
                raise IntegrityError(f"{model.name}: {exc}; {nothing}") from exc
        held = {r[0] for r in db.execute("SELECT version FROM main.versions "
                                         "WHERE model_id = ?", (model.id,))}
        clash = next((i for i, r in enumerate(theirs) if r[2] in held), len(theirs))
        last = max(held | {db.execute("SELECT last_version FROM main.models WHERE id = ?",
                                      (model.id,)).fetchone()[0]})
        numbers = {r[0]: r[2] for r in theirs[:clash]}
        for r in sorted(theirs[clash:], key=lambda r: (r[3], r[2])):
            last += 1
            numbers[r[0]] = last
            renumbered.append((model.name, r[2], last))
        db.executemany("INSERT INTO temp.incoming VALUES (?, ?, ?, ?)",
                       [(r[0], model.id, numbers[r[0]],
                         None if r[4] is None else catalog.environment_id(r[4]))
                        for r in theirs])
        db.execute("UPDATE main.models SET last_version = max(last_version, ?) "
                   "WHERE id = ?", (max(numbers.values()), model.id))
    return renumbered


def _listed(db: sqlite3.Connection, by_hash: ByHash | None) -> None:
    """Fill temp.listed with the incoming versions' chunk lists, by hash (what ``by_hash``
    gives for a version, or else the source's rows), and
    temp.bases with the delta bases ``by_hash`` gives."""
    db.execute("CREATE TEMP TABLE listed (version_id INTEGER, part INTEGER, seq INTEGER, "
               "hash TEXT, PRIMARY KEY (version_id, part, seq)) WITHOUT ROWID")
    db.execute("CREATE TEMP TABLE bases (hash TEXT PRIMARY KEY, base TEXT NOT NULL) "
               "WITHOUT ROWID")
    ids = dict(db.execute("SELECT s.uuid, s.id FROM src.versions s "
                          "JOIN temp.incoming i ON i.src_id = s.id"))
    given = [ids[uuid] for uuid in (by_hash.lists if by_hash else ()) if uuid in ids]
    # A row whose chunk the source lacks comes with no hash: _versions refuses it. A
    # version whose lists come by hash takes none of the source's rows besides them.
    db.execute("INSERT INTO temp.listed SELECT pc.version_id, pc.part, pc.seq, c.hash "
               "FROM src.part_chunks pc LEFT JOIN src.chunks c ON c.id = pc.chunk_id "
               "WHERE pc.version_id IN (SELECT src_id FROM temp.incoming) "
               f"AND pc.version_id NOT IN ({','.join('?' * len(given))})", given)
    if by_hash is None:
        return
    db.executemany("INSERT INTO temp.listed VALUES (?, ?, ?, ?)",
                   [(ids[uuid], part, seq, h) for uuid, lists in by_hash.lists.items()
                    if uuid in ids for part, hashes in enumerate(lists)
                    for seq, h in enumerate(hashes)])
    db.executemany("INSERT INTO temp.bases VALUES (?, ?)", by_hash.bases.items())


def _chunks(db: sqlite3.Connection, store: PackStore, nothing: str, *, check: bool
            ) -> Offsets:
    """Copy the chunks the incoming versions need and the destination lacks (by hash),
    with their packs, check them if ``check``, and tidy up."""
    offsets = Offsets(*(db.execute(f"SELECT coalesce(max(id), 0) FROM main.{table}"
                                   ).fetchone()[0] for table in Offsets._fields))
    # Chunks whose hash is here already are not copied, nor are their bases.
    db.execute(
        "CREATE TEMP TABLE needed AS WITH RECURSIVE needed(id) AS ("
        "SELECT c.id FROM temp.listed l JOIN src.chunks c ON c.hash = l.hash "
        "WHERE NOT EXISTS (SELECT 1 FROM main.chunks m WHERE m.hash = c.hash) "
        "UNION SELECT b.id FROM needed JOIN src.chunks c ON c.id = needed.id "
        "JOIN src.chunks b ON b.id = c.base_id "
        "WHERE NOT EXISTS (SELECT 1 FROM main.chunks m WHERE m.hash = b.hash)) "
        "SELECT id FROM needed")
    lost = db.execute(
        "SELECT c.hash FROM src.chunks c LEFT JOIN temp.bases t ON t.hash = c.hash "
        "WHERE c.id IN temp.needed AND (c.base_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM src.chunks b WHERE b.id = c.base_id) OR t.base IS NOT NULL AND "
        "NOT EXISTS (SELECT 1 FROM main.chunks m WHERE m.hash = t.base))").fetchone()
    if lost is not None:  # copied, it would be a delta of nothing: refuse, as a load would
        raise IntegrityError(f"chunk {lost[0]} of the vault copied from: its delta base is "
                             f"missing; {nothing}", chunk=lost[0])
    db.execute("INSERT INTO main.packs SELECT id + ?, codec, size, data FROM src.packs "
               "WHERE id IN (SELECT pack_id FROM src.chunks WHERE id IN temp.needed)",
               (offsets.packs,))
    # A delta whose base is here already is a delta of our copy of it (a base named by
    # hash is always here).
    db.execute(
        "INSERT INTO main.chunks SELECT c.id + :chunks, c.hash, c.size, c.codec, "
        "c.itemsize, CASE WHEN c.base_id IS NULL THEN (SELECT m.id FROM temp.bases t "
        "JOIN main.chunks m ON m.hash = t.base WHERE t.hash = c.hash) "
        "WHEN c.base_id IN temp.needed THEN c.base_id + :chunks "
        "ELSE (SELECT m.id FROM main.chunks m JOIN src.chunks b ON b.hash = m.hash "
        "WHERE b.id = c.base_id) END, c.pack_id + :packs, c.start, c.length "
        "FROM src.chunks c WHERE c.id IN temp.needed", offsets._asdict())
    if check:
        for bad in store.bad_chunks(store.chunks("c.id > ?", (offsets.chunks,))):
            raise IntegrityError(f"chunk {bad.hash} of the vault copied from: {bad.problem}; "
                                 f"{nothing}", chunk=bad.hash)
    # A delta of a delta here may now lie deeper than ours ever do: store such chunks
    # whole, so that chains stay short however often vaults are merged.
    store.flatten(store.delta_depths(offsets.chunks, 2 * _packs.DELTA_DEPTH))
    db.execute("DELETE FROM packs WHERE id > ? AND NOT EXISTS "
               "(SELECT 1 FROM chunks c WHERE c.pack_id = packs.id)", (offsets.packs,))
    # Packs come whole, with the chunks here already that share them (a save's array
    # packs run across parts): whatever they hold that nothing here uses is rewritten out
    # now, not left as dead space until they are mostly dead.
    store.repack(after=offsets.packs, dead=0)
    return offsets


def _versions(db: sqlite3.Connection, offsets: Offsets, nothing: str) -> None:
    """Copy the incoming versions' rows, parts and chunk lists (temp.listed, each chunk
    by hash: ours, copied or here before), ids shifted past ours."""
    shift = offsets.versions
    db.execute(
        "INSERT INTO main.versions SELECT v.id + ?, v.uuid, i.model_id, i.version, "
        "v.created_at, v.kind, v.layout, v.size, v.added_bytes, v.digest, v.description, "
        "v.metadata, i.environment_id, v.key_id, v.signature "
        "FROM src.versions v JOIN temp.incoming i ON i.src_id = v.id", (shift,))
    if db.execute("PRAGMA src.user_version").fetchone()[0] >= 5:  # older ones have none
        db.execute("INSERT INTO main.lineage SELECT version_id + ?, parent, source FROM "
                   "src.lineage WHERE version_id IN (SELECT src_id FROM temp.incoming)",
                   (shift,))
    db.execute("INSERT INTO main.parts SELECT version_id + ?, part, kind, name, dtype, "
               "shape, fortran_order, itemsize, size FROM src.parts "
               "WHERE version_id IN (SELECT src_id FROM temp.incoming)", (shift,))
    copied = db.execute(
        "INSERT INTO main.part_chunks SELECT l.version_id + ?, l.part, l.seq, m.id "
        "FROM temp.listed l JOIN main.chunks m ON m.hash = l.hash", (shift,)).rowcount
    listed = db.execute("SELECT count(*) FROM temp.listed").fetchone()[0]
    if copied != listed:
        raise IntegrityError(f"{listed - copied} chunk(s) that versions of the vault "
                             f"copied from list are missing from it; {nothing}")


def _added_bytes(db: sqlite3.Connection, offsets: Offsets) -> None:
    """Set each copied version's added_bytes to what it added here, as a save's says what
    it added there: the stored bytes of the chunks copied in for it (and their delta
    bases) that no version copied before it brought. A chunk of a solid pack counts for
    its share of the pack's compressed bytes, in proportion to its raw length."""
    added = dict(db.execute(
        "WITH RECURSIVE needs(version_id, chunk_id) AS ("
        "SELECT version_id, chunk_id FROM main.part_chunks WHERE version_id > :versions "
        "AND chunk_id > :chunks UNION SELECT n.version_id, c.base_id FROM needs n "
        "JOIN main.chunks c ON c.id = n.chunk_id WHERE c.base_id > :chunks), "
        "first(chunk_id, version_id) AS (SELECT chunk_id, min(version_id) FROM needs "
        "GROUP BY chunk_id) "
        "SELECT f.version_id, CAST(round(sum(c.length * 1.0 * length(p.data) / "
        "max(p.size, 1))) AS INTEGER) FROM first f JOIN main.chunks c ON c.id = f.chunk_id "
        "JOIN main.packs p ON p.id = c.pack_id GROUP BY f.version_id", offsets._asdict()))
    db.executemany("UPDATE main.versions SET added_bytes = ? WHERE id = ?",
                   [(added.get(vid, 0), vid) for (vid,) in db.execute(
                       "SELECT id FROM main.versions WHERE id > ?", (offsets.versions,))])


def _labels(db: sqlite3.Connection, source: Path, models: dict[int, Model], shift: int
            ) -> list[str]:
    """Bring in the aliases and tags of the copied versions that the destination lacks;
    returns the ones that differ."""
    conflicts = []
    db.execute("INSERT INTO main.tags SELECT version_id + ?, key, value FROM src.tags "
               "WHERE version_id IN (SELECT src_id FROM temp.incoming)", (shift,))
    for version_id, name, number, key, theirs, ours in db.execute(
            "SELECT v.id, m.name, v.version, t.key, t.value, o.value FROM src.tags t "
            "JOIN src.versions s ON s.id = t.version_id JOIN src.models sm ON "
            "sm.id = s.model_id JOIN main.versions v ON v.uuid = s.uuid "
            "JOIN main.models m ON m.id = v.model_id AND m.name = sm.name LEFT JOIN main.tags "
            "o ON o.version_id = v.id AND o.key = t.key WHERE s.id IN temp.wanted AND "
            "s.id NOT IN (SELECT src_id FROM temp.incoming)").fetchall():
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
            "JOIN main.models mm ON mm.id = v.model_id AND mm.name = sm.name "
            "WHERE s.id IN temp.wanted").fetchall():
        model = models[src_model]
        here = db.execute("SELECT v.id, v.version FROM main.aliases a JOIN main.versions "
                          "v ON v.id = a.version_id WHERE a.model_id = ? AND a.alias = ?",
                          (model.id, alias)).fetchone()
        try:
            check_alias(alias)
        except ValueError:
            conflicts.append(f"{model.name}@{alias} in {source.name} is not a valid alias "
                             "(left out)")
            continue
        if here is None:
            db.execute("INSERT INTO main.aliases VALUES (?, ?, ?)",
                       (model.id, alias, version_id))
        elif here[0] != version_id:
            conflicts.append(f"{model.name}@{alias}: {model.name}:{here[1]} here, "
                             f"{model.name}:{number} in {source.name} (numbered here)")
    return conflicts
