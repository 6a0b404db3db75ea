"""Pull: versions of a remote into a vault, fetching only the chunks it lacks.

Each version is gathered in a vault file of its own beside the vault
(``.NAME.pull-<uuid>``): the chunks it lacks, fetched a pack object at a time and
committed as they come (a pull interrupted and run again fetches only what had not
arrived), and the version's rows, checked against its digest and signature. Then the
copier merges it in, taking the chunk lists from the manifest and the chunks the vault
has by hash, so numbers and checks are merge's. The labels come last, once, by the
remote's log (``_labels``), not through these files. Clone is a pull into a new vault,
put in place when complete.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import _atomic, _copier, _pins, _schema, _trust
from .._catalog import Contents
from .._errors import (
    IntegrityError,
    LockTimeout,
    RemoteError,
    UntrustedError,
    VaultError,
)
from .._packs import ChunkRow
from .._progress import progress
from .._refs import Ref
from .._reports import MergeReport
from . import _labels
from ._log import State
from ._names import locked
from ._objects import by_object, spans
from ._remote import PART_FIELDS, VERSION_FIELDS, Local, Remote
from ._store import HASH, is_text


class _BadPack(IntegrityError):
    """A pack object that does not hold what its index says (``why``): a pull takes it
    as absent and tries again, with other copies of its chunks."""

    def __init__(self, pack: str, why: str, chunk: str | None = None) -> None:
        super().__init__(f"packs/{pack}.pack {why}", chunk=chunk)
        self.pack = pack
        self.why = why


def pull(local: Local, remote: Remote, refs: Sequence[str] | None,
         prefer: str | None = None) -> MergeReport:
    """Bring in the versions ``refs`` name on the remote (every one if None) that the
    vault lacks; then settle the labels of their models (of every model, if None) as
    ``_labels`` does, ``prefer`` deciding the conflicts."""
    if prefer not in _labels.PREFER:
        raise ValueError(f"prefer={prefer!r}: None, 'theirs' or 'ours'")
    remote.check_descriptor(create=False)
    state = remote.log.state()
    wanted = ([state.resolve(r) for r in refs] if refs is not None
              else list(state.versions))
    with local.connection.lock, local.connection.read() as db:
        here = {u for (u,) in db.execute("SELECT uuid FROM versions")}
    todo = sorted({u for u in wanted if u not in here},
                  key=lambda u: (state.versions[u]["model"], state.versions[u]["number"]))
    # Bundles an interrupted pull left, for versions no longer wanted, after a day.
    for old in local.path.parent.glob(f".{glob.escape(local.path.name)}.pull-*"):
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
            report = _pull_from_good_copies(local, remote, state, uuid)
        except UntrustedError as exc:  # require="trusted": the others still come
            conflicts.append(f"not pulled: {exc}")
            continue
        added += report.added
        renumbered += report.renumbered
        conflicts += report.conflicts
    # The labels once, after the versions: those of a version pulled are theirs unless
    # it was here already (a merge from another source). By the log as it is now: a
    # pull that ran meanwhile may have followed a later move, which the log as this pull
    # first read it would take back (the same State, read on from where it was).
    models = None if refs is None else {state.versions[u]["model"] for u in wanted}
    state = remote.log.state()
    moved, left = _labels.follow(local, remote.url, state, models, prefer,
                                 added=[v.id for v in added])
    return MergeReport(tuple(added), tuple(renumbered), tuple(conflicts + left),
                       tuple(moved))


def _pull_from_good_copies(local: Local, remote: Remote, state: State, uuid: str
                           ) -> MergeReport:
    """Pull the version ``uuid``; where a pack object proves bad, again without it: its
    chunks from other copies (a push that found it bad sent its own), or an
    IntegrityError naming it if there are none."""
    while True:
        try:
            return _pull_one(local, remote, state, uuid)
        except _BadPack as exc:  # never the same twice: it leaves the index
            remote.packs.distrust(exc.pack, exc.why)


def _pull_one(local: Local, remote: Remote, state: State, uuid: str) -> MergeReport:
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
    if local.require == "trusted":  # before a byte is fetched
        status = _signature_status(manifest, state.versions[uuid])
        if status != "trusted":
            raise UntrustedError(f"{state.versions[uuid]['model']}:"
                                 f"{state.versions[uuid]['number']} on the remote is {status}"
                                 ", and this vault takes only versions a trusted key signed "
                                 "(require='trusted')")
    index = remote.packs.index()
    connection = local.connection
    wanted = {h for part in hashes for h in part}
    with connection.lock, connection.read():
        here = local.packs.rows(sorted(wanted))
        # The delta bases of the chunks to fetch (from the remote's index), but for those
        # this vault has: a chunk here needs nothing from the remote.
        todo = [h for h in wanted if h not in here]
        while todo:
            bases = {b for b in ((index.get(h) or {}).get("base") for h in todo)
                     if isinstance(b, str) and b not in wanted}
            wanted |= bases
            here.update(local.packs.rows(sorted(bases)))
            todo = [b for b in bases if b not in here]
        pin = _pins.Pin(connection.lock_file, [r.id for r in here.values()])  # till merged
    try:
        missing = sorted(wanted - set(here))
        lost = [h for h in missing if h not in index]
        if lost:
            raise IntegrityError(f"{remote.packs.lost(lost[0])}: {key} needs it; nothing was "
                                 "pulled", chunk=lost[0])
        # The version is gathered in a vault of its own beside this one, committed pack
        # object by pack object: a pull that was interrupted, run again, fetches only
        # what this file lacks. It goes once the version is merged, or found bad.
        bundle = bundle_path(local.path, uuid)
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
                into = Local.open(bundle, progress=False)
                try:
                    # Scratch: its journal keeps it whole through a kill; an OS crash may
                    # cost it, never the vault.
                    into.connection.db.execute("PRAGMA synchronous = OFF")
                    _reset(into, missing)
                    with progress(sum(index[h]["size"] for h in missing),
                                  f"pull {entry['model']}:{entry['number']}",
                                  local.progress) as advance:
                        fetched = _fetch(into, remote, missing, index, advance)
                    version_id, by_hash = _rows(into, remote, state, uuid, manifest, here,
                                                index)
                finally:
                    into.connection.close()
                try:  # the one version written there, whatever else the file holds
                    report = _copier.copy_from(local.connection, local.catalog, local.packs,
                                               bundle, [version_id], check=True,
                                               action="pull", by_hash=by_hash)
                except IntegrityError as exc:
                    where = (index.get(exc.chunk or "") or {}).get("pack")
                    if where is None:
                        raise
                    raise _BadPack(where, f"does not hold what its index says (chunk "
                                   f"{exc.chunk} fails its check)", exc.chunk) from exc
                for name, hashes in fetched.items():  # checked by the merge: known good
                    remote.packs.mark_checked(name, hashes)
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
    with locked(path):
        try:
            yield
        finally:
            if not bundle.exists():  # done with: a puller waiting on it finds its version in
                path.unlink(missing_ok=True)


def bundle_path(vault: Path, uuid: str) -> Path:
    """The file a pull of the version ``uuid`` into ``vault`` gathers it in."""
    return vault.with_name(f".{vault.name}.pull-{uuid}")


def _remove(bundle: Path) -> None:
    for leftover in (bundle, Path(f"{bundle}-journal")):
        leftover.unlink(missing_ok=True)


def _scalar(value: Any) -> bool:
    """Whether ``value`` fits a column as is: text, null, or an integer SQLite holds."""
    return value is None or is_text(value) or (
        type(value) is int and -2**63 <= value < 2**63)


def _check_manifest(manifest: Any, entry: dict[str, Any]) -> None:
    """ValueError unless ``manifest`` has the shape docs/remote.md gives, for the log's
    ``entry``: every value a row's column could hold, before any reaches SQLite, and the
    version the entry added (its digest binds the parts and chunks; entries written
    before the digest was in them give the rest only)."""
    if not isinstance(manifest, dict) or manifest.get("model") != entry["model"]:
        raise ValueError("it names another model")
    version, parts, chunks = manifest["version"], manifest["parts"], manifest["chunks"]
    if not (isinstance(version, dict) and all(_scalar(version.get(f)) for f in VERSION_FIELDS)
            and isinstance(parts, list) and isinstance(chunks, list)
            and len(parts) == len(chunks)
            and all(isinstance(p, dict) and all(_scalar(p.get(f)) for f in PART_FIELDS)
                    for p in parts)
            and all(isinstance(c, list) and all(isinstance(h, str) and HASH.fullmatch(h)
                                                for h in c) for c in chunks)
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


# Every table of a pull's file but the fetched chunks' (packs, chunks), children first.
_ROWS = ("part_chunks", "parts", "aliases", "tags", "lineage", "versions", "models",
         "packages", "environments", "remotes", "remote_aliases", "remote_tags")


def _reset(into: Local, missing: list[str]) -> None:
    """Leave in a pull's file only the chunks the version still ``missing`` that lie
    whole in their packs, and no other row. A file found there may hold an earlier run's
    rows (written again from the remote as it is now), the byte-less rows an older
    modelvault wrote for chunks the vault had then, or rows of anyone who could write
    this folder: none of it may reach the vault but bytes the merge hash-checks."""
    with into.connection.write() as db:
        for table in _ROWS:
            db.execute(f"DELETE FROM {table}")
        db.execute("CREATE TEMP TABLE needed (hash TEXT PRIMARY KEY) WITHOUT ROWID")
        db.executemany("INSERT INTO temp.needed VALUES (?)", [(h,) for h in missing])
        # An old byte-less row: length 0 for a chunk of some bytes. (A chunk's base_id is
        # set again from the remote's index once the version's rows are written.)
        db.execute("DELETE FROM chunks WHERE hash NOT IN temp.needed OR NOT EXISTS ("
                   "SELECT 1 FROM packs p WHERE p.id = chunks.pack_id AND chunks.start >= 0 "
                   "AND (chunks.length > 0 OR chunks.size = 0) "
                   "AND chunks.start + chunks.length <= p.size)")
        db.execute("DELETE FROM packs WHERE id NOT IN (SELECT pack_id FROM chunks)")
        db.execute("DROP TABLE temp.needed")


def _fetch(into: Local, remote: Remote, missing: list[str], index: dict[str, Any],
           advance: Callable[[int], Any]) -> dict[str, list[str]]:
    """Fetch into ``into`` the chunks ``missing`` that it lacks, from the blobs that hold
    them: one ranged get and one commit per pack object. Returns the chunks fetched,
    by pack object."""
    with into.connection.read():
        have = set(into.packs.rows(missing))
    advance(sum(index[h]["size"] for h in have))
    objects = by_object(index, [h for h in missing if h not in have])

    def get(name: str, blobs: dict[int, list[str]]) -> list[bytes]:
        try:
            return remote.store.ranges(f"packs/{name}.pack", spans(index, blobs))
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
            places = [index[blobs[b][0]]["span"] for b in chosen]
            with into.connection.write() as db:
                for blob, span, data in zip(chosen, places, datas, strict=True):
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


def _rows(into: Local, remote: Remote, state: State, uuid: str, manifest: dict[str, Any],
          here: dict[str, ChunkRow], index: dict[str, Any]
          ) -> tuple[int, _copier.ByHash]:
    """Write the version ``uuid``'s rows into ``into`` (which holds the chunks fetched,
    and no rows else: ``_reset``), all but its chunk lists, and link the chunks fetched
    to their delta bases there; then check its digest and signature. Returns what the
    merge takes by hash: the chunk lists, as the manifest gives them, and the delta
    bases of chunks fetched that this vault has (``here``) and ``into`` lacks; with the
    version's row id there."""
    entry = state.versions[uuid]
    version = manifest["version"]
    bases = {}
    with into.connection.write() as db:
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
        env_id = into.catalog.environment_id(env) if env is not None else None
        columns = ", ".join(VERSION_FIELDS)
        version_id = db.execute(
            f"INSERT INTO versions ({columns}, model_id, version, environment_id) VALUES "
            f"({','.join('?' * len(VERSION_FIELDS))}, ?, ?, ?)",
            [*(version[f] for f in VERSION_FIELDS), model_id, entry["number"], env_id]
        ).lastrowid
        if manifest.get("lineage") is not None:
            db.execute("INSERT INTO lineage (version_id, parent, source) VALUES (?, ?, ?)",
                       (version_id, manifest["lineage"]["parent"],
                        manifest["lineage"]["source"]))
        db.executemany(
            f"INSERT INTO parts (version_id, {', '.join(PART_FIELDS)}) VALUES "
            f"(?, {','.join('?' * len(PART_FIELDS))})",
            [(version_id, *(p[f] for f in PART_FIELDS)) for p in manifest["parts"]])
        # The version as the manifest gives it must be the one signed and digested.
        row = into.catalog.resolve(Ref(entry["model"], version=entry["number"]))
        chunks = {**into.packs.rows(list(ids)), **here}
        contents = Contents(into.catalog.contents(row).parts,
                            [[chunks[h] for h in part] for part in manifest["chunks"]])
        try:
            into.catalog.check(row, contents)
            if _trust.signature_status(row.manifest, row.key_id, row.signature,
                                       _trust.trusted()) == "invalid":
                raise row.error("signature does not match: the manifest was changed after "
                                "the version was signed")
        except IntegrityError as exc:
            raise IntegrityError(f"{remote.url}/versions/{uuid}.json: {exc}; nothing was "
                                 "pulled") from exc
    return version_id, _copier.ByHash({uuid: manifest["chunks"]}, bases)


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
    if path.exists():
        raise FileExistsError(f"{path} exists; clone makes a new vault")
    remote = Remote(url, **options)
    partial = _atomic.scratch_path(path, ".partial")
    try:
        local = Local.open(partial)
        try:
            pull(local, remote, refs)
        finally:
            local.connection.close()
        _atomic.fsync(partial)
        os.replace(partial, path)
    finally:
        for leftover in (partial, Path(f"{partial}-journal")):
            if leftover.exists():
                leftover.unlink()
    return path
