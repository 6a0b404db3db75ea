"""Push: versions of a vault to a remote, uploading only the chunks it lacks.

Data first, then what points at it: pack objects (each ``.pack``, then its ``.idx``),
then the versions' manifests, then one log entry naming them (docs/remote.md, "Push").
Works on the vault's pieces (``Local``), under a push lock on the remote that keeps a
remote gc out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from .. import _chunks, _pins
from .._catalog import VersionRow
from .._errors import IntegrityError, RemoteError
from .._progress import progress
from .._refs import Ref
from .._reports import PushReport
from . import _labels
from ._log import State
from ._objects import PackWriter, Placed, Sent, by_object, spans
from ._remote import FORMAT, PART_FIELDS, VERSION_FIELDS, Local, Remote
from ._store import dumps, limit


class _Row(NamedTuple):
    """A chunk of the vault, as a push sends it."""

    id: int
    hash: str
    size: int
    codec: str
    itemsize: int
    base: str | None  # its delta base's hash
    pack_id: int
    start: int
    length: int

    def placed(self, start: int) -> Placed:
        """This chunk as a blob holds it at ``start``."""
        return Placed(self.hash, self.size, self.codec, self.itemsize, self.base, start,
                      self.length)


def _manifest(db: Any, row: VersionRow, hashes: list[list[str]], lineage: bool
              ) -> dict[str, Any]:
    """A version's rows, as the remote keeps them (docs/remote.md)."""
    columns = ", ".join(f"v.{f}" for f in VERSION_FIELDS)
    values = db.execute(f"SELECT {columns}, e.json FROM versions v LEFT JOIN environments e "
                        "ON e.id = v.environment_id WHERE v.id = ?", (row.id,)).fetchone()
    parts = [dict(zip(PART_FIELDS, r, strict=True)) for r in db.execute(
        f"SELECT {', '.join(PART_FIELDS)} FROM parts WHERE version_id = ? ORDER BY part",
        (row.id,))]
    found = db.execute("SELECT parent, source FROM lineage WHERE version_id = ?",
                       (row.id,)).fetchone() if lineage else None
    return {"format": FORMAT, "model": row.name,
            "version": dict(zip(VERSION_FIELDS, values[:-1], strict=True)),
            "environment": values[-1], "parts": parts, "chunks": hashes,
            "lineage": None if found is None else {"parent": found[0], "source": found[1]}}


def push(local: Local, remote: Remote, refs: Sequence[Ref] | None) -> PushReport:
    """Send the versions ``refs`` name (every one if None) that the remote lacks."""
    remote.check_descriptor(create=True)
    remote.probe()
    lock = remote.lock("push")

    def renew() -> None:
        # Pushed an hour on; and a gc that started meanwhile (this lock had expired)
        # stops this push before it can rely on chunks that gc may delete.
        remote.renew(lock)
        remote.others(lock, ("locks/gc-",))

    try:
        return _push(local, remote, refs, renew)
    finally:
        remote.store.delete(lock)


def _push(local: Local, remote: Remote, refs: Sequence[Ref] | None,
          renew: Callable[[], None]) -> PushReport:
    connection, catalog = local.connection, local.catalog
    state = remote.log.state()
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
            manifests[row.uuid] = dumps(_manifest(db, row, [[c.hash for c in chunks]
                                                            for chunks in contents.chunks],
                                                  lineage))
            chunk_ids.update(c.id for chunks in contents.chunks for c in chunks)
            size = len(manifests[row.uuid])
            if size > limit("manifest"):  # readers would refuse it: send nothing
                raise RemoteError(f"{row.where}: its manifest would be {size} bytes, more "
                                  f"than the {limit('manifest')} readers take")
        # Labels go along for the versions sent, and for those named: a vault that is
        # behind must not move back the remote's aliases of versions it did not push,
        # nor those it names but has not moved since it last saw the remote (below).
        seen_aliases, seen_tags = _labels.seen(db, remote.url)
        labels = {r.uuid: r.name for r in (rows if refs is not None else new)}
        # Labels that are not text, or an alias row of another model than its version's
        # (the file's maker wrote them), are none.
        aliases = {(name, a): uuid for uuid, name in labels.items()
                   for (a,) in db.execute(
                       "SELECT a.alias FROM aliases a JOIN versions v ON v.id = a.version_id "
                       "AND v.model_id = a.model_id WHERE v.uuid = ? "
                       "AND typeof(a.alias) = 'text'", (uuid,))}
        tags = {uuid: dict(db.execute("SELECT t.key, t.value FROM tags t JOIN versions v "
                                      "ON v.id = t.version_id WHERE v.uuid = ? AND "
                                      "typeof(t.key) = 'text' AND typeof(t.value) = 'text'",
                                      (uuid,)))
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
    sent = Sent()
    try:
        # Until a fresh listing of the remote shows every chunk: one more pass finds
        # what a remote gc took meanwhile (it can, if this push's lock expired).
        for _ in range(3):
            renew()
            more = _upload(local, remote, closure, there, renew)
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
            if (uuid in known and state.aliases.get(name, {}).get(alias) != uuid
                    and seen_aliases.get((name, alias)) != uuid):
                events.append({"op": "alias", "model": name, "alias": alias, "uuid": uuid})
        for uuid, mine in sorted(tags.items()):
            theirs = state.versions.get(uuid, {}).get("tags", {})
            for key, value in sorted(mine.items()):
                # Of a version this entry adds (again), what was seen is of a copy since
                # deleted there: its tags go along.
                if (uuid in known and theirs.get(key) != value
                        and (uuid not in state.versions
                             or seen_tags.get((uuid, key)) != value)):
                    events.append({"op": "tag", "uuid": uuid, "key": key, "value": value})
        return events

    state, _ = remote.log.commit(make)
    # What this push leaves equal on both sides is where the remote is, as a pull would
    # record it; what differs (this vault is behind, or ahead on a version not sent)
    # stays as the last pull saw it, so that the next pull still follows the remote.
    _labels.record(local, remote.url, state, {r.name for r in rows})
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


def _upload(local: Local, remote: Remote, ids: set[int], there: set[int],
            renew: Callable[[], None]) -> Sent:
    """Upload, in pack objects, the chunks among ``ids`` the remote lacks or has in no
    copy known good (``_compare``), and those among ``there`` it does not list;
    ``renew`` after each (the push's lock)."""
    connection = local.connection
    index = remote.packs.index()
    with connection.lock, connection.read() as db:
        rows = _push_rows(db, ids)
        listed = [r for r in _push_rows(db, there) if r.hash not in index]
    known = remote.packs.checked()
    good = known | _compare(local, remote, index,
                            [r for r in rows if r.hash in index and r.hash not in known])
    missing = sorted([r for r in rows if r.hash not in good] + listed,
                     key=lambda r: (r.pack_id, r.start))
    if not missing:
        return Sent()
    total = sum(r.length for r in missing)
    with progress(total, f"push to {remote.url}", local.progress) as advance:
        writer = PackWriter(remote.packs, advance, renew)
        try:
            _gather(local, writer, missing)
            writer.flush()
        finally:
            writer.shutdown()
    return writer.sent


def _push_rows(db: Any, ids: Iterable[int]) -> list[_Row]:
    """The rows of the chunks ``ids``, as a push needs them."""
    return [_Row._make(r) for r in _in_batches(
        db, "SELECT c.id, c.hash, c.size, c.codec, c.itemsize, b.hash, c.pack_id, c.start, "
        "c.length FROM chunks c LEFT JOIN chunks b ON b.id = c.base_id WHERE c.id IN ({})",
        ids)]


def _compare(local: Local, remote: Remote, index: dict[str, Any], rows: list[_Row]
             ) -> set[str]:
    """The chunks among ``rows`` whose copy on the remote, where ``index`` places it, is
    this vault's: the same size, codecs, delta base and stored bytes (so it decodes to
    its hash as ours does). Read with one ranged get per pack object, of the blobs
    holding them; remembered (``PackObjects.mark_checked``). A copy that differs, or
    cannot be read, is not known good: the push sends ours (pack objects named by
    anyone's bytes may hold anything)."""
    mine = {}
    for group, (codec, size, data), _ in _local_packs(local, rows):
        content = _content(local, group, codec, size, data)
        for r in group:
            stored = _chunks.blake3.blake3(content[r.start:r.start + r.length]).digest()
            mine[r.hash] = (r.size, r.codec, r.itemsize, r.base, stored)
    good: set[str] = set()
    for name, blobs in by_object(index, mine):
        try:
            datas = remote.store.ranges(f"packs/{name}.pack", spans(index, blobs))
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
        remote.packs.mark_checked(name, same)
        good |= same
    return good


def _local_packs(local: Local, rows: list[_Row]
                 ) -> Iterator[tuple[list[_Row], Any, bool]]:
    """This vault's packs holding the chunk rows ``rows``: (the rows in it, (codec,
    size, data), whether they are all of its chunks), pack by pack. Each group's rows
    are read again with their pack, in one read: a gc here may have moved the chunks
    (they are pinned, so they are somewhere) since they were listed."""
    connection = local.connection
    for _, listed in _by_pack(sorted(rows, key=lambda r: (r.pack_id, r.start))):
        ids = [r.id for r in listed]
        with connection.lock, connection.read() as db:
            fresh = sorted(_push_rows(db, ids), key=lambda r: (r.pack_id, r.start))
            if len(fresh) != len(ids):
                raise IntegrityError(f"{local.path}: {len(ids) - len(fresh)} chunk(s) to "
                                     "push are missing; run verify()")
            packs = []
            for pack_id, group in _by_pack(fresh):
                found = db.execute("SELECT codec, size, data FROM packs WHERE id = ?",
                                   (pack_id,)).fetchone()
                if found is None:
                    raise IntegrityError(f"{local.path}: pack {pack_id} is missing; run "
                                         "verify()")
                whole = db.execute("SELECT count(*) FROM chunks WHERE pack_id = ?",
                                   (pack_id,)).fetchone()[0] == len(group)
                packs.append((group, found, whole))
        yield from packs


def _content(local: Local, group: list[_Row], codec: str, size: int, data: bytes) -> bytes:
    """What the chunks ``group`` point into, of this vault's pack (codec, size, data)."""
    content = _chunks.pack_content(codec, size, data)
    if isinstance(content, str):
        raise IntegrityError(f"{local.path}: pack {group[0].pack_id}: {content}")
    return content


def _gather(local: Local, writer: PackWriter, missing: list[_Row]) -> None:
    """Hand ``writer`` the chunk rows ``missing``, pack by pack of this vault: a pack
    whose chunks all go, as it is; of another, those chunks packed anew."""
    for group, (codec, size, data), whole in _local_packs(local, missing):
        if whole:
            writer.add(codec, size, bytes(data), [r.placed(r.start) for r in group])
            continue
        content = _content(local, group, codec, size, data)
        pieces = [content[r.start:r.start + r.length] for r in group]
        if codec == "raw":
            writer.add("raw", sum(map(len, pieces)), b"".join(pieces), _placed(group, pieces))
        else:  # a solid pack's chunks, compressed together again
            new_codec, packed = _chunks.solid(pieces)
            writer.add(new_codec, sum(map(len, pieces)), packed, _placed(group, pieces))


def _placed(group: list[_Row], pieces: list[bytes]) -> list[Placed]:
    placed, at = [], 0
    for row, piece in zip(group, pieces, strict=True):
        placed.append(row.placed(at))
        at += len(piece)
    return placed


def _by_pack(rows: list[_Row]) -> Iterator[tuple[int, list[_Row]]]:
    group: list[_Row] = []
    for row in rows:
        if group and group[-1].pack_id != row.pack_id:
            yield group[0].pack_id, group
            group = []
        group.append(row)
    if group:
        yield group[0].pack_id, group
