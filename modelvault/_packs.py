"""The pack store: chunks in, chunks out, hash-checked.

Owns the ``chunks`` and ``packs`` tables: putting a version's new chunks into packs
(deduplicated by hash, delta-encoded against the parent's chunks where that is
smaller), reading chunks back into buffers with their hashes checked, finding bad
chunks, repacking sparse packs and sweeping chunks nothing uses. Leaves to others which
version uses which chunks (the catalog), how objects become parts (``_serialize``),
and the bytes-level codecs (``_chunks``).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import _chunks, _pins, _schema
from ._chunks import np
from ._connection import Connection
from ._errors import IntegrityError
from ._serialize import Part

# Chunks are hashed, looked up and encoded at most this many, and this many raw
# bytes, at a time: enough work per batch to keep both cores busy, little memory in
# flight (two batches while one is encoded and the one before is written).
_BATCH = 64
_BATCH_BYTES = 16 * 1024 * 1024
# A save's array chunks go by more: a batch ends its last pack short, and a model's
# small tensors (biases, norms: a few KiB each) would fill a batch with little work.
_SAVE_BATCH = 1024
# A delta chunk is at most this many XORs away from a chunk stored whole, so a load
# never decodes more than DELTA_DEPTH + 1 chunks per chunk; the next version in a
# long fine-tune series starts a new chain. Readers refuse chains beyond MAX_CHAIN.
DELTA_DEPTH = 4
MAX_CHAIN = 16
# A delta at most this fraction of the raw chunk is kept without also trying the chunk
# alone (XOR against a parent with a few changed rows: nearly all zeros).
_DELTA_SURE = 1 / 16


class ChunkRow(NamedTuple):
    """A row of the chunks table. ``hash`` is None for a chunk a version lists and the
    vault lacks (see ``Catalog.contents``)."""

    id: int
    hash: str | None
    size: int
    codec: str
    itemsize: int
    base_id: int | None
    pack_id: int
    start: int
    length: int


CHUNK_COLUMNS = ", ".join(f"c.{column}" for column in ChunkRow._fields)


def live_chunks(also: str = "") -> str:
    """A WITH clause naming ``live``: the chunks some version uses (and those the SELECT
    ``also`` gives), and the delta bases of those, transitively (UNION stops at cycles)."""
    return ("WITH RECURSIVE live(id) AS (SELECT chunk_id FROM part_chunks "
            f"{'UNION ' + also if also else ''} UNION SELECT c.base_id FROM chunks c "
            "JOIN live ON c.id = live.id WHERE c.base_id NOT NULL)")


# Every chunk listed and its delta bases (UNION ends a cycle), each at its share of its
# pack's stored bytes (a zstd pack of 8 MiB of zeros stores a few hundred bytes), and no
# pack counted for more than it holds: rows of one file may point at overlapping bytes,
# and each such row would otherwise count again.
_STORED_BYTES = """
WITH RECURSIVE chain(id) AS (
    SELECT value FROM json_each(?)
    UNION SELECT c.base_id FROM chunks c JOIN chain ON c.id = chain.id
          WHERE c.base_id IS NOT NULL),
listed(pack_id, bytes) AS (
    SELECT c.pack_id, total(c.length) FROM chain JOIN chunks c ON c.id = chain.id
    GROUP BY c.pack_id)
SELECT total(min(listed.bytes, p.size) * CAST(length(p.data) AS REAL) / max(p.size, 1))
FROM listed JOIN packs p ON p.id = listed.pack_id
"""


class Slice(NamedTuple):
    """Where a chunk's stored bytes lie in a pack stored raw: read on a worker thread
    (``Connection.read_slice``), not fetched with the whole pack."""

    pack_id: int
    start: int
    length: int


class Job(NamedTuple):
    """What decoding one chunk takes: its row's fields, its stored bytes (where they lie,
    or what is wrong with them), and its delta base's job."""

    hash: str
    size: int
    codec: str
    itemsize: int
    stored: memoryview | Slice | str
    base: Job | None


class NewChunk(NamedTuple):
    """A chunk a save is about to add: its hash, raw bytes, byte-shuffle width (0: a
    stream chunk, for a solid pack) and delta base, if any."""

    hash: str
    piece: memoryview | bytes
    itemsize: int
    base: ChunkRow | None


class Encoded(NamedTuple):
    codec: str
    itemsize: int
    data: bytes | memoryview
    is_delta: bool


class Stored(NamedTuple):
    """What ``PackStore.put`` did for a version's parts."""

    hashes: list[list[str]]  # each part's chunk hashes, in order
    ids: dict[str, int]  # every one of those chunks' row id, by hash
    sizes: list[int]  # each part's bytes (a file's: what was read)
    added: int  # stored bytes of the chunks added


# A part's delta bases: parent chunks by run key, then by position (see PackStore.put).
Bases = dict[Any, list[ChunkRow]]


class BadChunk(NamedTuple):
    id: int
    hash: str
    problem: str


class PackStore:
    """The chunks and packs of one vault, reached through its connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    # -- putting chunks in -------------------------------------------------------------

    def put(self, parts: list[Part], bases: list[Bases | None],
            advance: Callable[[int], Any], *, compress: bool = True) -> Stored:
        """Store the chunks of ``parts`` the vault lacks (inside a write transaction).

        ``bases`` are each part's parent chunks that new chunks of the same size may be
        stored as XOR deltas of: by the key of the run of pieces they belong to (None
        for a whole part; a tensor's name in a safetensors file), then by position in
        it. Unless ``compress``, new chunks are stored as they are.

        A pipeline over batches that run across parts (a model's many small tensors
        would otherwise each be a batch, and wait for the one before): while the pool
        encodes one batch and then hashes the next, this thread writes the batch before
        to SQLite, and the disk takes what was written before that.
        """
        connection = self._connection
        known: dict[str, int] = {}
        pending: set[str] = set()  # encoded or being encoded, not yet written
        hash_lists: list[list[str]] = [[] for _ in parts]
        sizes = [0] * len(parts)
        added = 0
        writing: tuple[list[NewChunk], Callable[[], list[Any]]] | None = None

        def write(new: list[NewChunk], results: Callable[[], list[Any]]) -> int:
            if new[0].itemsize:
                stored = self._add_chunks(new, results())
            else:
                stored = self._add_solid(_solid_groups(new), results())
            known.update(self.ids([chunk.hash for chunk in new]))
            pending.difference_update(chunk.hash for chunk in new)
            return stored

        batches = store_batches(parts)
        batch = next(batches, None)
        # Hashed and encoded from the same bytes: a file changing under us cannot store
        # bytes under another content's hash.
        hashing = connection.submit(_hash, batch or [])
        while batch is not None:
            batch_hashes = hashing()
            for piece, h in zip(batch, batch_hashes, strict=True):
                hash_lists[piece.part].append(h)
                sizes[piece.part] += len(piece.data)
            advance(sum(len(piece.data) for piece in batch))
            unknown = sorted(set(batch_hashes) - known.keys() - pending)
            if unknown:
                known.update(self.ids(unknown))
            new: list[NewChunk] = []
            for piece, h in zip(batch, batch_hashes, strict=True):
                if h in known or h in pending:
                    continue
                pending.add(h)
                part_bases = bases[piece.part] if piece.itemsize else None
                run_bases = part_bases.get(piece.key) if part_bases else None
                base = (run_bases[piece.seq] if run_bases is not None
                        and piece.seq < len(run_bases) else None)
                new.append(NewChunk(h, piece.data, piece.itemsize, base if base is not None
                                    and base.size == len(piece.data) else None))
            encoding = (new, self._encode(new, compress)) if new else None
            batch = next(batches, None)
            # Queued behind the encoding: the pool never waits for this thread's writes.
            hashing = connection.submit(_hash, batch or [])
            if writing is not None:
                added += write(*writing)
            writing = encoding
        if writing is not None:
            added += write(*writing)
        return Stored(hash_lists, known, sizes, added)

    def _encode(self, new: list[NewChunk], compress: bool) -> Callable[[], list[Any]]:
        """Start encoding new chunks on the pool: numeric ones one by one, as deltas
        where that is smaller; stream chunks into solid packs. Unless ``compress``: as
        they are."""
        connection = self._connection
        numeric = new[0].itemsize > 0
        if not compress:
            stored = ([Encoded("raw", 1, c.piece, False) for c in new] if numeric
                      else [("raw", b"".join(c.piece for c in group))
                            for group in _solid_groups(new)])
            return lambda: stored
        if numeric:
            bases = self._base_bytes([c.base for c in new if c.base is not None])
            # Tasks of about a chunk's bytes: a millisecond or two of work each, which
            # keeps both cores busy to the end of the batch, and small chunks go together.
            tasks = runs([(c.piece, c.itemsize, bases.get(c.base.id) if c.base is not None
                           else None) for c in new], lambda task: len(task[0]),
                         len(new), _chunks.ARRAY_CHUNK)
            results = connection.submit(_encode_all, tasks, grouped=False)
            return lambda: [encoded for task in results() for encoded in task]
        # One task per pack: each is milliseconds of zstd, and whole packs share out
        # between the cores more evenly than groups of them.
        return connection.submit(_chunks.solid, [[c.piece for c in group]
                                                 for group in _solid_groups(new)],
                                 grouped=False)

    def ids(self, hashes: list[str]) -> dict[str, int]:
        """The row ids of the chunks with these hashes that the vault holds."""
        if not hashes:
            return {}
        marks = ",".join("?" * len(hashes))
        return dict(self._connection.db.execute(
            f"SELECT hash, id FROM chunks WHERE hash IN ({marks})", hashes))

    def rows(self, hashes: list[str]) -> dict[str, ChunkRow]:
        """The chunk rows the vault holds of these hashes, by hash."""
        found: dict[str, ChunkRow] = {}
        for first in range(0, len(hashes), 500):
            some = hashes[first:first + 500]
            found.update((r.hash, r) for r in map(ChunkRow._make, self._connection.db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.hash IN "
                f"({','.join('?' * len(some))})", some)))
        return found

    def stored_bytes(self, ids: Iterable[int]) -> float:
        """The bytes the file stores for the chunks of these row ids: each distinct chunk
        and every delta base under it once, a chunk in a compressed pack at its share of
        the pack's stored size (what ``_limits.check`` weighs a read against)."""
        (total,), = self._connection.db.execute(_STORED_BYTES, (json.dumps(sorted(set(ids))),))
        return total

    def _base_bytes(self, rows: list[ChunkRow]) -> dict[int, np.ndarray]:
        """Raw bytes of the parent chunks that may serve as delta bases, by chunk id.

        Left out: chunks already DELTA_DEPTH deltas deep, and any that fail to decode
        (a damaged parent costs only the delta, never the save).
        """
        if not rows:
            return {}
        # Once per chunk: a parent that repeats a piece (tied or tiled weights) names the
        # same chunk many times, and two tasks decoding a delta into one buffer at once
        # would interleave their XORs and leave it wrong.
        rows = list({r.id: r for r in rows}.values())
        usable = [(r.id, job) for r, job in zip(rows, self._jobs(rows), strict=True)
                  if _chain_length(job) < DELTA_DEPTH]
        outs = {cid: np.empty(job.size, dtype=np.uint8) for cid, job in usable}
        errors = self._connection.map(_decode_checked, [(memoryview(outs[cid]), job, None)
                                                        for cid, job in usable])
        return {cid: outs[cid] for (cid, _), error in zip(usable, errors, strict=True)
                if error is None}

    def _add_chunks(self, new: list[NewChunk], encoded: list[Encoded]) -> int:
        """Write encoded numeric chunks into new packs, and their rows; returns the
        bytes stored."""
        places = self._pack([e.data for e in encoded])
        self._connection.db.executemany(
            "INSERT INTO chunks (hash, size, codec, itemsize, base_id, pack_id, start, "
            "length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(c.hash, len(c.piece), e.codec, e.itemsize,
              c.base.id if e.is_delta and c.base is not None else None, *place, len(e.data))
             for c, e, place in zip(new, encoded, places, strict=True)])
        return sum(len(e.data) for e in encoded)

    def _add_solid(self, groups: list[list[NewChunk]], packs: list[tuple[str, bytes]]) -> int:
        """Write solid packs (``_chunks.solid``'s output for ``groups``), and their chunks
        as raw slices of the packs' content; returns the bytes stored."""
        rows = []
        for group, (codec, data) in zip(groups, packs, strict=True):
            places = self._new_pack(codec, [len(c.piece) for c in group], [data])
            rows.extend((c.hash, len(c.piece), "raw", 1, None, *place, len(c.piece))
                        for c, place in zip(group, places, strict=True))
        self._connection.db.executemany(
            "INSERT INTO chunks (hash, size, codec, itemsize, base_id, pack_id, start, "
            "length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return sum(len(data) for _, data in packs)

    def _pack(self, blobs: list[bytes | memoryview], *, solid: bool = False
              ) -> list[tuple[int, int]]:
        """Write ``blobs`` into new packs of about PACK_SIZE bytes (SOLID_PACK raw bytes
        compressed as one, if ``solid``); returns each one's (pack id, start)."""
        places: list[tuple[int, int]] = []
        group: list[bytes | memoryview] = []

        def flush() -> None:
            lengths = [len(b) for b in group]
            if solid:
                codec, data = _chunks.solid(group)
                places.extend(self._new_pack(codec, lengths, [data]))
            else:
                places.extend(self._new_pack("raw", lengths, group))
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

    def _new_pack(self, codec: str, lengths: list[int], data: list[bytes | memoryview]
                  ) -> list[tuple[int, int]]:
        """Insert one pack whose stored bytes are ``data`` in a row, and whose content is
        blobs of ``lengths`` in a row; returns each blob's (pack id, start)."""
        db = self._connection.db
        stored = sum(len(d) for d in data)
        # Room made first and filled through a blob handle: the bytes go straight into
        # SQLite's pages, where binding them would copy them twice more (and a pack
        # would first be joined from its chunks). The pack's pages must stay in SQLite's
        # cache in between, or their zeros are written and read back: 1 MiB packs fit
        # its default 2 MB; 4 MiB ones wrote a MiniLM save's 77 MB twice.
        pack_id = db.execute("INSERT INTO packs (codec, size, data) VALUES (?, ?, zeroblob(?))",
                             (codec, sum(lengths), stored)).lastrowid
        if stored:
            with db.blobopen("packs", "data", pack_id) as blob:
                for piece in data:
                    blob.write(piece)
            self._connection.sync_ahead()
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        return [(pack_id, start) for start in starts]

    # -- reading chunks out ------------------------------------------------------------

    def read(self, pieces: Iterable[tuple[ChunkRow, memoryview]],
             advance: Callable[[int], Any],
             done: Callable[[list[memoryview]], Any] | None = None) -> None:
        """Decode chunks into their views, each one's hash checked; IntegrityError naming
        the first chunk that fails (inside a read transaction).

        Works in batches: the pool reads and decodes one batch while the next is looked up.
        Chunks of raw packs (numbers) are read by the worker threads themselves, each just
        its own bytes; a chunk that fails that way is read again through this connection,
        whose error is the one reported. ``done`` gets each batch's views once they hold
        their bytes, in order.
        """
        connection = self._connection
        sliced = connection.slices
        pending: tuple[list[tuple[ChunkRow, memoryview]], Callable[[], list[Any]]] | None = None
        packs: dict[int, bytes | str] = {}

        def finish(batch: list[tuple[ChunkRow, memoryview]],
                   results: Callable[[], list[Any]]) -> None:
            outcome = results()
            errors = [error for error in outcome if error is not None]
            if errors and sliced:  # read again, each whole pack through this connection
                failed = [piece for piece, error in zip(batch, outcome, strict=True)
                          if error is not None]
                jobs = self._jobs([chunk for chunk, _ in failed], {})
                errors = [error for error in connection.map(_decode_checked, [
                    (view, job, None) for (_, view), job in zip(failed, jobs, strict=True)])
                    if error is not None]
            if errors:
                hash, problem = errors[0]
                raise IntegrityError(f"chunk {hash} {problem}", chunk=hash)
            views = [view for _, view in batch]
            advance(sum(len(v) for v in views))
            if done is not None:
                done(views)

        for batch in runs(pieces, lambda piece: piece[0].size):
            jobs = self._jobs([chunk for chunk, _ in batch], packs, sliced=sliced)
            started = (batch, connection.submit(_decode_checked, [
                (view, job, connection.read_slice)
                for (_, view), job in zip(batch, jobs, strict=True)]))
            if pending is not None:
                finish(*pending)
            pending = started
        if pending is not None:
            finish(*pending)

    def _jobs(self, rows: Sequence[ChunkRow], packs: dict[int, bytes | str] | None = None,
              *, sliced: bool = False) -> list[Job]:
        """Decoding jobs for chunk rows, with their bases' rows and the packs' bytes
        fetched (or, if ``sliced``, where the chunks of raw packs lie). ``packs`` caches
        pack bytes across calls (a pack often spans two batches)."""
        db = self._connection.db
        by_id = {r.id: r for r in rows}
        wanted = {r.base_id for r in rows if r.base_id is not None} - by_id.keys()
        for _ in range(MAX_CHAIN):
            if not wanted:
                break
            ids = sorted(wanted)
            found = [ChunkRow._make(r) for r in db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                f"({','.join('?' * len(ids))})", ids)]
            by_id.update((r.id, r) for r in found)
            wanted = {r.base_id for r in found if r.base_id is not None} - by_id.keys()
        cache = packs if packs is not None else {}
        used = {r.pack_id for r in by_id.values() if type(r.pack_id) is int}
        # A raw pack's chunks are sliced where they lie: its size, not its bytes.
        raw = self._raw_sizes(sorted(used - cache.keys())) if sliced else {}
        fetched = {pack_id: self._pack_content(pack_id)
                   for pack_id in sorted(used - cache.keys() - raw.keys())}
        # Keep only this call's packs: the cache holds at most two batches' worth.
        current = {pid: cache[pid] for pid in used if pid in cache}
        current.update(fetched)
        cache.clear()
        cache.update(current)
        return [_job(r, by_id, current, raw, 0) for r in rows]

    def _raw_sizes(self, ids: list[int]) -> dict[int, int]:
        """The stored sizes of the packs of ``ids`` stored raw and whole (size as declared).
        Left out, to be fetched whole: compressed packs, and any whose row is damaged."""
        found: dict[int, int] = {}
        try:
            for first in range(0, len(ids), 500):
                some = ids[first:first + 500]
                found.update((pid, size) for pid, size in self._connection.db.execute(
                    "SELECT id, size FROM packs WHERE codec = 'raw' AND typeof(data) = 'blob' "
                    f"AND length(data) = size AND id IN ({','.join('?' * len(some))})", some))
        except sqlite3.DatabaseError as exc:
            if not _schema.is_damage(exc):
                raise
            return {}
        return found

    def _pack_content(self, pack_id: int) -> bytes | str:
        """A pack's content, or what is wrong with it: a pack on a damaged page (a file
        cut short) fails only the chunks in it, not every chunk read with them."""
        try:
            row = self._connection.db.execute(
                "SELECT codec, size, data FROM packs WHERE id = ?", (pack_id,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if not _schema.is_damage(exc):
                raise
            return f"cannot be read: its page of the file is damaged ({exc})"
        return "is missing" if row is None else _chunks.pack_content(*row)

    def chunks(self, where: str = "", params: Sequence[Any] = (), *, live: bool = False
               ) -> Iterator[ChunkRow]:
        """Chunk rows (``where`` filters ``chunks c``; only live ones if ``live``) in the
        order of their packs, which reads each pack once."""
        live_clause = ("c.id IN live" if live else "")
        condition = " AND ".join(filter(None, [live_clause, where]))
        cursor = self._connection.db.execute(
            f"{live_chunks() if live else ''} SELECT {CHUNK_COLUMNS} FROM chunks c "
            f"{'WHERE ' + condition if condition else ''} ORDER BY c.pack_id, c.start",
            params)
        return map(ChunkRow._make, cursor)

    def bad_chunks(self, rows: Iterable[ChunkRow]) -> Iterator[BadChunk]:
        """Decode chunk rows and check their hashes; yields each one that fails."""
        packs: dict[int, bytes] = {}
        for batch in runs(rows, lambda r: _chunks.check_size(r.size)):
            tasks = [(memoryview(np.empty(_chunks.check_size(job.size), dtype=np.uint8)), job, None)
                     for job in self._jobs(batch, packs)]
            ids = {r.hash: r.id for r in batch}
            for error in self._connection.map(_decode_checked, tasks):
                if error is not None:
                    yield BadChunk(ids[error[0]], error[0], error[1])

    # -- housekeeping ------------------------------------------------------------------

    def sweep(self) -> None:
        """Drop chunks no version uses (nor any chunk as its delta base), and repack
        (inside a write transaction)."""
        db = self._connection.db
        unused = [r[0] for r in db.execute(
            f"{live_chunks()} SELECT id FROM chunks WHERE id NOT IN live")]
        pinned = _pins.held(self._connection.lock_file, unused)  # by lazy mappings
        db.execute(f"{live_chunks('SELECT value FROM json_each(?)')} "
                   "DELETE FROM chunks WHERE id NOT IN live", (json.dumps(sorted(pinned)),))
        db.execute("DELETE FROM packs WHERE NOT EXISTS "
                   "(SELECT 1 FROM chunks c WHERE c.pack_id = packs.id)")
        self.repack()

    def repack(self, *, after: int = 0) -> None:
        """Move the live chunks of packs (with ids above ``after``) that are mostly dead
        space into new packs."""
        db = self._connection.db
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
                places = self._pack([packs[p][1][s:s + n] for _, p, s, n in mine],
                                    solid=solid)
                db.executemany("UPDATE chunks SET pack_id = ?, start = ? WHERE id = ?",
                               [(*place, c[0]) for c, place in zip(mine, places, strict=True)])
            db.execute(f"DELETE FROM packs WHERE id IN ({marks})", ids)

    def flatten(self, ids: list[int]) -> None:
        """Store the delta chunks ``ids`` whole, in new packs (chunks based on them are
        unaffected: a chunk's bytes stay the same however they are stored)."""
        db = self._connection.db
        for first in range(0, len(ids), _BATCH):
            some = ids[first:first + _BATCH]
            batch = [ChunkRow._make(r) for r in db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                f"({','.join('?' * len(some))})", some)]
            jobs = self._jobs(batch)
            raws = [np.empty(job.size, dtype=np.uint8) for job in jobs]
            self._connection.map(lambda task: _decode(*task, None),
                                 zip(map(memoryview, raws), jobs, strict=True))
            encoded = self._connection.map(_encode, [(memoryview(raw), row.itemsize, None)
                                                     for raw, row in zip(raws, batch,
                                                                         strict=True)])
            places = self._pack([e.data for e in encoded])
            db.executemany(
                "UPDATE chunks SET codec = ?, itemsize = ?, base_id = NULL, pack_id = ?, "
                "start = ?, length = ? WHERE id = ?",
                [(e.codec, e.itemsize, *place, len(e.data), row.id)
                 for e, place, row in zip(encoded, places, batch, strict=True)])

    def delta_depths(self, after: int, limit: int) -> list[int]:
        """Chunks with ids above ``after`` lying more than ``limit`` deltas from a chunk
        stored whole."""
        return [r[0] for r in self._connection.db.execute(
            "WITH RECURSIVE chain(id, top, depth) AS (SELECT id, id, 0 FROM main.chunks "
            "WHERE id > ? AND base_id IS NOT NULL UNION ALL SELECT c.base_id, chain.top, "
            "chain.depth + 1 FROM chain JOIN main.chunks c ON c.id = chain.id "
            "WHERE c.base_id IS NOT NULL AND chain.depth <= ?) "
            "SELECT top FROM chain GROUP BY top HAVING max(depth) > ?",
            (after, MAX_CHAIN, limit))]


class Piece(NamedTuple):
    """A chunk's bytes as a save cuts them, and where they come from."""

    part: int  # the index of the part they belong to
    data: bytes | memoryview
    itemsize: int  # numeric pieces: their byte-shuffle width; 0 for stream pieces
    key: Any  # the run of pieces they belong to, for delta bases (see PackStore.put)
    seq: int  # their position in that run


def store_batches(parts: list[Part]) -> Iterator[list[Piece]]:
    """The parts' pieces a batch at a time, as ``PackStore.put`` stores them: numeric
    pieces in runs that go on across parts; a stream part's own by two solid packs'
    worth, one for each core to compress while the batch before is written."""
    every = (piece for index, part in enumerate(parts) for piece in _pieces(index, part))
    for stream, group in itertools.groupby(every, lambda p: p.part if p.itemsize == 0 else -1):
        if stream >= 0:
            yield from runs(group, _length, 4 * _BATCH, 2 * _chunks.SOLID_PACK)
        else:
            yield from runs(group, _length, _SAVE_BATCH)


def _length(piece: Piece) -> int:
    return len(piece.data)


def _pieces(index: int, part: Part) -> Iterator[Piece]:
    """A part's chunk pieces: fixed-size for numbers (and for each tensor of a
    safetensors file, from its own start), by content otherwise, and for files read
    from disk as they go."""
    if part.path is not None:
        with open(part.path, "rb") as f:
            if part.tensors is None:
                yield from (Piece(index, piece, 0, None, 0)
                            for piece in _chunks.content_pieces(f))
                return
            header = f.read(part.header)
            yield from (Piece(index, header[o:o + n], 0, None, 0)
                        for o, n in _chunks.content_cuts(memoryview(header)))
            for tensor in part.tensors:
                itemsize = max(tensor.itemsize, 1)
                for seq, (_, n) in enumerate(_chunks.fixed_cuts(tensor.size, tensor.itemsize)):
                    yield Piece(index, f.read(n), itemsize, tensor.name, seq)
        return
    data = part.data
    assert data is not None
    if part.kind in ("array", "buffer"):
        itemsize = max(part.itemsize, 1)
        yield from (Piece(index, data[o:o + n], itemsize, None, seq)
                    for seq, (o, n) in enumerate(_chunks.fixed_cuts(part.size, part.itemsize)))
    else:
        yield from (Piece(index, data[o:o + n], 0, None, 0)
                    for o, n in _chunks.content_cuts(data))


def tensor_runs(part: Part) -> list[list[Any]] | None:
    """For a safetensors file part, each tensor's [name, dtype, shape, first chunk,
    number of chunks] in the part's chunk list, as ``_pieces`` cuts it; else None."""
    if part.tensors is None or part.path is None:
        return None
    with open(part.path, "rb") as f:
        first = len(_chunks.content_cuts(memoryview(f.read(part.header))))
    found = []
    for tensor in part.tensors:
        count = len(_chunks.fixed_cuts(tensor.size, tensor.itemsize))
        found.append([tensor.name, tensor.dtype, tensor.shape, first, count])
        first += count
    return found


def batch_views(chunks: list[ChunkRow]) -> Iterator[tuple[ChunkRow, memoryview]]:
    """(chunk, view) for a part's chunks, with a fresh buffer per batch (as ``runs`` cuts
    them): a part streamed to a file is never held whole."""
    for batch in runs(chunks, lambda c: c.size):
        view, offset = memoryview(np.empty(sum(c.size for c in batch), dtype=np.uint8)), 0
        for chunk in batch:
            yield chunk, view[offset:offset + chunk.size]
            offset += chunk.size


def runs(items: Iterable[Any], size: Callable[[Any], int], count: int = _BATCH,
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


def _solid_groups(new: list[NewChunk]) -> list[list[NewChunk]]:
    """New stream chunks in consecutive groups of at most SOLID_PACK bytes (but for a
    single bigger chunk), as few and as even as that allows."""
    total = sum(len(c.piece) for c in new)
    target = total / max(1, -(-total // _chunks.SOLID_PACK))
    groups: list[list[NewChunk]] = []
    size = 0
    for chunk in new:
        if not groups or (size + len(chunk.piece) > _chunks.SOLID_PACK
                          or size >= target and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(chunk)
        size += len(chunk.piece)
    return groups


def _job(row: ChunkRow, by_id: dict[int, ChunkRow], packs: dict[int, bytes | str],
         raw: dict[int, int], depth: int) -> Job:
    """The decoding job for one chunk row, its base's inside.

    A module function, not a closure: a closure that calls itself is a reference cycle,
    which kept every batch's packs alive until the garbage collector ran (+260 MB at the
    peak of a 400 MB load).
    """
    try:
        _chunks.check_row(row.size, row.codec, row.itemsize, row.pack_id, row.start,
                          row.length)
    except IntegrityError as exc:
        return Job(row.hash, row.size, row.codec, row.itemsize, str(exc), None)
    pack = packs.get(row.pack_id)
    stored: memoryview | Slice | str
    if row.pack_id in raw:
        stored = (Slice(row.pack_id, row.start, row.length)
                  if row.start + row.length <= raw[row.pack_id]
                  else f"lies beyond the end of pack #{row.pack_id}")
    elif pack is None:
        stored = f"pack #{row.pack_id} is missing"
    elif isinstance(pack, str):
        stored = f"pack #{row.pack_id} {pack}"
    elif row.start + row.length > len(pack):
        stored = f"lies beyond the end of pack #{row.pack_id}"
    else:
        stored = memoryview(pack)[row.start:row.start + row.length]
    base = None
    if row.base_id is not None:
        if depth >= MAX_CHAIN or row.base_id not in by_id:
            stored = (f"its delta base #{row.base_id} is missing, or its chain of deltas is "
                      f"longer than {MAX_CHAIN}" if depth < MAX_CHAIN
                      else "delta chain too long or circular")
        else:
            base = _job(by_id[row.base_id], by_id, packs, raw, depth + 1)
    return Job(row.hash, row.size, row.codec, row.itemsize, stored, base)


def _hash(piece: Piece) -> str:
    return _chunks.chunk_hash(piece.data)


def _encode_all(tasks: list[tuple[memoryview, int, np.ndarray | None]]) -> list[Encoded]:
    return [_encode(task) for task in tasks]


def _encode(task: tuple[memoryview, int, np.ndarray | None]) -> Encoded:
    """Encode a new numeric chunk, as a delta against its parent's bytes where that is
    smaller."""
    piece, itemsize, parent = task
    level = _chunks.ARRAY_LEVEL
    if parent is None:
        return Encoded(*_chunks.encode(piece, itemsize, level), False)
    delta = np.frombuffer(piece, np.uint8).copy()
    _chunks.xor_into(memoryview(delta), parent)
    as_delta = _chunks.encode(memoryview(delta), itemsize, level)
    if len(as_delta[2]) <= len(piece) * _DELTA_SURE:
        return Encoded(*as_delta, True)
    alone = _chunks.encode(piece, itemsize, level)
    if len(as_delta[2]) < len(alone[2]):
        return Encoded(*as_delta, True)
    return Encoded(*alone, False)


def _chain_length(job: Job) -> int:
    """How many deltas lie between a job's chunk and one stored whole."""
    length = 0
    while job.base is not None:
        job, length = job.base, length + 1
    return length


def _decode_checked(task: tuple[memoryview, Job, Callable[[int, int, int], bytes | str] | None]
                    ) -> tuple[str, str] | None:
    """Decode one chunk into its slot and check its hash; (hash, problem) or None.
    The task's third item reads a job's ``Slice`` (None: a job has none)."""
    out, job, read_slice = task
    try:
        _decode(out, job, read_slice)
    except IntegrityError as exc:
        return job.hash, str(exc)
    return None


def _decode(out: memoryview, job: Job,
            read_slice: Callable[[int, int, int], bytes | str] | None) -> None:
    """Decode a job into ``out``, base first for a delta; check hashes."""
    stored = job.stored
    if isinstance(stored, Slice):
        assert read_slice is not None
        stored = read_slice(*stored)
    if isinstance(stored, str):
        raise IntegrityError(stored)
    if job.size != len(out):
        raise IntegrityError(f"holds {job.size} bytes where {len(out)} are needed")
    _chunks.decode_into(out, job.codec, job.itemsize, stored)
    if job.base is not None:
        parent = np.empty(len(out), dtype=np.uint8)
        try:
            _decode(memoryview(parent), job.base, read_slice)
        except IntegrityError as exc:
            raise IntegrityError(f"its delta base {job.base.hash}: {exc}") from exc
        _chunks.xor_into(out, parent)
    if _chunks.chunk_hash(out) != job.hash:
        raise IntegrityError("hash mismatch: stored bytes are damaged")
