"""Reading chunks out of packs: decoding jobs, the worker threads' batches, hash checks.

Owns how a chunk's row becomes its bytes: where its stored bytes lie (a slice of a raw
pack, read on a worker thread, or a slice of a pack's content fetched whole), its chain
of delta bases, decoding (``_chunks``) into the caller's buffer, and the BLAKE3 check of
every chunk of the chain. The pack store (``_packs``) puts chunks in and keeps them; the
reader (``_reader``) decides which chunks a load needs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import _chunks, _schema
from ._chunks import np
from ._connection import Connection
from ._errors import IntegrityError

# Chunks are read (and a save's stream chunks hashed and encoded) at most this many, and
# this many raw bytes, at a time: enough work per batch to keep both cores busy, little
# memory in flight (two batches: one decoded while the next is looked up).
BATCH = 64
_BATCH_BYTES = 16 * 1024 * 1024
# Readers refuse chains of deltas beyond MAX_CHAIN (writers stop at DELTA_DEPTH, in
# _packs), so a damaged or circular chain costs at most this many decodes per chunk.
MAX_CHAIN = 16


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


class BadChunk(NamedTuple):
    id: int
    hash: str
    problem: str


class ChunkReader:
    """Reads and checks the chunks of one vault, through its connection and its worker
    threads."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

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
                jobs = self.jobs([chunk for chunk, _ in failed], {})
                errors = [error for error in connection.map(decode_checked, [
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
            jobs = self.jobs([chunk for chunk, _ in batch], packs, sliced=sliced)
            started = (batch, connection.submit(decode_checked, [
                (view, job, connection.read_slice)
                for (_, view), job in zip(batch, jobs, strict=True)]))
            if pending is not None:
                finish(*pending)
            pending = started
        if pending is not None:
            finish(*pending)

    def jobs(self, rows: Sequence[ChunkRow], packs: dict[int, bytes | str] | None = None,
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
            # In groups under SQLite's variable limit (999 before 3.32): a save's
            # batch of delta bases may hold 1024.
            found: list[ChunkRow] = []
            for first in range(0, len(ids), 500):
                some = ids[first:first + 500]
                found.extend(map(ChunkRow._make, db.execute(
                    f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                    f"({','.join('?' * len(some))})", some)))
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
        Left out, to be fetched whole: compressed packs, and any whose row is damaged or
        that ``_chunks.pack_content`` would refuse (a size above MAX_PACK: refused, not
        sliced, whatever a worker could read of it)."""
        found: dict[int, int] = {}
        try:
            for first in range(0, len(ids), 500):
                some = ids[first:first + 500]
                found.update((pid, size) for pid, size in self._connection.db.execute(
                    "SELECT id, size FROM packs WHERE codec = 'raw' AND typeof(data) = 'blob' "
                    "AND typeof(size) = 'integer' AND size BETWEEN 0 AND ? "
                    f"AND length(data) = size AND id IN ({','.join('?' * len(some))})",
                    [_chunks.MAX_PACK, *some]))
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

    def bad_chunks(self, rows: Iterable[ChunkRow]) -> Iterator[BadChunk]:
        """Decode chunk rows and check their hashes; yields each one that fails."""
        packs: dict[int, bytes] = {}
        for batch in runs(rows, lambda r: _chunks.check_size(r.size)):
            tasks = [(memoryview(np.empty(_chunks.check_size(job.size), dtype=np.uint8)), job, None)
                     for job in self.jobs(batch, packs)]
            ids = {r.hash: r.id for r in batch}
            for error in self._connection.map(decode_checked, tasks):
                if error is not None:
                    yield BadChunk(ids[error[0]], error[0], error[1])


def batch_views(chunks: list[ChunkRow]) -> Iterator[tuple[ChunkRow, memoryview]]:
    """(chunk, view) for a part's chunks, with a fresh buffer per batch (as ``runs`` cuts
    them): a part streamed to a file is never held whole."""
    for batch in runs(chunks, lambda c: c.size):
        view, offset = memoryview(np.empty(sum(c.size for c in batch), dtype=np.uint8)), 0
        for chunk in batch:
            yield chunk, view[offset:offset + chunk.size]
            offset += chunk.size


def runs(items: Iterable[Any], size: Callable[[Any], int], count: int = BATCH,
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


def chain_length(job: Job) -> int:
    """How many deltas lie between a job's chunk and one stored whole."""
    length = 0
    while job.base is not None:
        job, length = job.base, length + 1
    return length


def decode_checked(task: tuple[memoryview, Job, Callable[[int, int, int], bytes | str] | None]
                    ) -> tuple[str, str] | None:
    """Decode one chunk into its slot and check its hash; (hash, problem) or None.
    The task's third item reads a job's ``Slice`` (None: a job has none)."""
    out, job, read_slice = task
    try:
        decode(out, job, read_slice)
    except IntegrityError as exc:
        return job.hash, str(exc)
    return None


def decode(out: memoryview, job: Job,
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
            decode(memoryview(parent), job.base, read_slice)
        except IntegrityError as exc:
            raise IntegrityError(f"its delta base {job.base.hash}: {exc}") from exc
        _chunks.xor_into(out, parent)
    if _chunks.chunk_hash(out) != job.hash:
        raise IntegrityError("hash mismatch: stored bytes are damaged")
