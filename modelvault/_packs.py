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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import _chunks, _pins
from ._chunks import np
from ._connection import Connection
from ._serialize import Part
from ._unpack import (
    BATCH,
    CHUNK_COLUMNS,
    MAX_CHAIN,
    BadChunk,
    ChunkReader,
    ChunkRow,
    batch_views,
    chain_length,
    decode,
    decode_checked,
    runs,
)

__all__ = ["CHUNK_COLUMNS", "BadChunk", "ChunkRow", "PackStore", "batch_views"]

# A save's array chunks go by more: a batch ends its last pack short, and a model's
# small tensors (biases, norms: a few KiB each) would fill a batch with little work.
_SAVE_BATCH = 1024
# A delta chunk is at most this many XORs away from a chunk stored whole, so a load
# never decodes more than DELTA_DEPTH + 1 chunks per chunk; the next version in a
# long fine-tune series starts a new chain (readers accept up to MAX_CHAIN).
DELTA_DEPTH = 4
# A delta at most this fraction of the raw chunk is kept without also trying the chunk
# alone (XOR against a parent with a few changed rows: nearly all zeros).
_DELTA_SURE = 1 / 16


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


class PackStore:
    """The chunks and packs of one vault, reached through its connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._reader = ChunkReader(connection)
        # Chunks out, hash-checked: see _unpack.
        self.read = self._reader.read
        self.bad_chunks = self._reader.bad_chunks

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
        found: dict[str, int] = {}
        for first in range(0, len(hashes), 500):  # a save's batch holds up to 1024
            some = hashes[first:first + 500]
            found.update(self._connection.db.execute(
                f"SELECT hash, id FROM chunks WHERE hash IN ({','.join('?' * len(some))})",
                some))
        return found

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
        usable = [(r.id, job) for r, job in zip(rows, self._reader.jobs(rows), strict=True)
                  if chain_length(job) < DELTA_DEPTH]
        outs = {cid: np.empty(job.size, dtype=np.uint8) for cid, job in usable}
        errors = self._connection.map(decode_checked, [(memoryview(outs[cid]), job, None)
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
        # cache in between, or their zeros are written and read back (4 MiB packs in
        # SQLite's default 2 MB cache wrote a MiniLM save's 77 MB twice): the cache is
        # _schema.CACHE_KIB, more than PACK_SIZE.
        pack_id = db.execute("INSERT INTO packs (codec, size, data) VALUES (?, ?, zeroblob(?))",
                             (codec, sum(lengths), stored)).lastrowid
        if stored:
            with db.blobopen("packs", "data", pack_id) as blob:
                for piece in data:
                    blob.write(piece)
            self._connection.sync_ahead()
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        return [(pack_id, start) for start in starts]

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

    # -- housekeeping ------------------------------------------------------------------

    def unused(self) -> list[int]:
        """The ids of the chunks no version uses, nor any chunk as its delta base."""
        return [r[0] for r in self._connection.db.execute(
            f"{live_chunks()} SELECT id FROM chunks WHERE id NOT IN live")]

    def sweep(self) -> None:
        """Drop chunks no version uses (nor any chunk as its delta base), and repack
        (inside a write transaction)."""
        db = self._connection.db
        unused = self.unused()
        pinned = _pins.held(self._connection.lock_file, unused)  # by lazy mappings
        db.execute(f"{live_chunks('SELECT value FROM json_each(?)')} "
                   "DELETE FROM chunks WHERE id NOT IN live", (json.dumps(sorted(pinned)),))
        db.execute("DELETE FROM packs WHERE NOT EXISTS "
                   "(SELECT 1 FROM chunks c WHERE c.pack_id = packs.id)")
        self.repack()

    def repack(self, *, after: int = 0, dead: float = 0.5) -> None:
        """Move the live chunks of packs (with ids above ``after``) that are more than
        ``dead`` dead space into new packs (0: any)."""
        db = self._connection.db
        sparse = [r[0] for r in db.execute(
            "SELECT p.id FROM packs p JOIN chunks c ON c.pack_id = p.id WHERE p.id > ? "
            "GROUP BY p.id HAVING sum(c.length) < (1 - ?) * p.size", (after, dead))]
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
        for first in range(0, len(ids), BATCH):
            some = ids[first:first + BATCH]
            batch = [ChunkRow._make(r) for r in db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                f"({','.join('?' * len(some))})", some)]
            jobs = self._reader.jobs(batch)
            raws = [np.empty(job.size, dtype=np.uint8) for job in jobs]
            self._connection.map(lambda task: decode(*task, None),
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
            yield from runs(group, _length, 4 * BATCH, 2 * _chunks.SOLID_PACK)
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
