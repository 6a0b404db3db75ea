"""The vault's connection: one SQLite connection, its transactions, and the worker pool.

Owns how the file is reached: opening it (through ``_schema.connect``), read and write
transactions, another vault attached read-only, reopening after fork(), and the
threads that hash, encode and decode chunks. Knows nothing of tables or chunks: the
catalog and the pack store run their SQL through it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _pins, _schema
from ._errors import CorruptVaultError, DamagedVaultWarning, VaultError
from ._records import Problem

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

WORKERS = min(4, os.cpu_count() or 1)
# Connections inherited across fork(), never closed in the child (see Connection.db).
_INHERITED: list[sqlite3.Connection] = []


class Connection:
    """The SQLite connection of one ``Vault``, safe to share between its threads only
    under ``lock`` (the Vault's public methods take it)."""

    def __init__(self, path: Path, *, readonly: bool, create: bool, timeout: float) -> None:
        self.path = path
        self.lock_file = _pins.lock_path(path)  # lazy readers' pins
        # The file the worker threads' connections open and sync_ahead looks for, made
        # absolute now, as the main connection's was: the working folder may change.
        self._absolute = path.absolute()
        self.readonly = readonly
        self.timeout = timeout
        # One connection serves every thread: a save interleaved with another thread's
        # commit would commit half a version.
        self.lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None
        # What is wrong with the file as a whole, if anything: then it is read-only.
        self._conn, self.damage = _schema.open_file(path, readonly=readonly, create=create,
                                                    timeout=timeout)
        if self.damage is not None:
            self.readonly = True
            warnings.warn(DamagedVaultWarning(f"{path}: {self.damage}; opened read-only. "
                                              f"{self._salvage()}"), stacklevel=4)
        self._pool: ThreadPoolExecutor | None = None
        # Worker threads' own read-only connections, by thread (see read_slice), and
        # whether a write transaction of ours is open (they cannot see into it).
        self._slicers: dict[int, sqlite3.Connection] = {}
        self._writing = False
        self._syncer: _Syncer | None = None  # see sync_ahead
        self._upgraded = readonly  # whether a write found the file in the current format

    @property
    def db(self) -> sqlite3.Connection:
        """The sqlite3 connection, reopened in a child process after fork()."""
        if self._conn is None:
            raise VaultError(f"{self.path}: vault is closed")
        if os.getpid() != self._pid:
            # A connection must not cross fork(): the child opens its own. The inherited
            # one is kept referenced forever, since closing it in the child would roll
            # back and delete the parent's journal.
            _INHERITED.append(self._conn)
            _INHERITED.extend(self._slicers.values())
            self._slicers = {}
            self._pid = os.getpid()
            self._pool = None
            self._syncer = None
            self._conn = _schema.connect(self.path, readonly=self.readonly, create=False,
                                         timeout=self.timeout, damaged=bool(self.damage))
        return self._conn

    def _salvage(self) -> str:
        return (f"`modelvault export {self.path} NEW.vault --skip-damaged` (or "
                "vault.export(new, skip_damaged=True)) copies the versions that are whole "
                "to a new vault")

    @property
    def format(self) -> int:
        """The file's format version (an older one until a write upgrades it)."""
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        slicers, self._slicers = list(self._slicers.values()), {}
        for slicer in slicers:
            if os.getpid() == self._pid:
                slicer.close()
            else:
                _INHERITED.append(slicer)
        if self._conn is not None:
            if os.getpid() == self._pid:
                self._conn.close()
            else:  # inherited across fork(): see db
                _INHERITED.append(self._conn)
            self._conn = None

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def write(self, incoming: int = 0, *, exclusive: bool = False
              ) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the lock up front, so it never deadlocks.

        The first write of a connection upgrades a vault of an older format, in the
        same transaction: a vault is never left half upgraded, nor written in the new
        format under the old one's number. ``incoming``: the most bytes the write may
        add (see make_room). ``exclusive``: keep readers out from the start (gc, which
        must see every lazy reader's pins: see _pins).
        """
        if self.damage is not None:
            raise CorruptVaultError(f"{self.path}: {self.damage}; it is read-only. "
                                    f"{self._salvage()}")
        nested = self.db.in_transaction
        if incoming and not nested:
            self.make_room(incoming)
        try:
            with self._transaction("BEGIN EXCLUSIVE" if exclusive else "BEGIN IMMEDIATE"
                                   ) as db:
                self._writing = True
                try:
                    if not self._upgraded:
                        _schema.upgrade(db)
                    yield db
                finally:
                    if not nested:
                        self._writing = False
        finally:
            if not nested and self._syncer is not None:
                self._syncer.stop()
                self._syncer = None
        if not nested:
            self._upgraded = True

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one snapshot, so another process's gc cannot pull chunks
        out from under a load between its queries."""
        # Ended by ROLLBACK: a read has nothing to commit, and once it has met a damaged
        # page (a read of the other rows goes on: see PackStore._pack_content), SQLite's
        # COMMIT reports that damage again.
        with self._transaction("BEGIN", end="ROLLBACK") as db:
            yield db

    @contextmanager
    def _transaction(self, begin: str, end: str = "COMMIT") -> Iterator[sqlite3.Connection]:
        db = self.db
        if db.in_transaction:  # nested inside another of ours
            yield db
            return
        db.execute(begin)
        try:
            yield db
            db.execute(end)
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
    def attached(self, source: Path, *, damaged: bool = False
                 ) -> Iterator[sqlite3.Connection]:
        """The vault at ``source`` attached as ``src``: read-only and through SQLite, so
        its locks are untouched, and read inside one transaction of ours, one snapshot.
        ``damaged``: ``source`` is cut short (see ``_schema.connect``)."""
        db = self.db
        if damaged:  # on for as long as src is read: SQLite checks its header at each read
            db.execute("PRAGMA writable_schema = ON")
        try:
            db.execute("ATTACH DATABASE ? AS src", (f"{source.absolute().as_uri()}?mode=ro",))
            try:
                yield db
            finally:
                db.execute("DETACH DATABASE src")
        finally:
            if damaged:
                db.execute("PRAGMA writable_schema = OFF")

    def problems(self) -> list[Problem]:
        """What is wrong with the file as SQLite sees it: cut short, damaged pages or
        indexes, rows that point at missing rows."""
        db = self.db
        problems = [] if self.damage is None else [Problem(f"the file is damaged: "
                                                           f"{self.damage}")]
        try:
            # integrity_check, not quick_check: it also finds index entries that point at
            # the wrong row (the cost is in rows, not in the packs' bytes).
            result = [r[0] for r in db.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                problems.extend(Problem(f"SQLite integrity_check: {line}") for line in result)
            problems.extend(Problem(f"{table} row {rowid} points at a missing {parent} row")
                            for table, rowid, parent, _ in db.execute(
                                "PRAGMA foreign_key_check"))
        except sqlite3.DatabaseError as exc:
            if not _schema.is_damage(exc):
                raise
            problems.append(Problem(f"SQLite's checks stop at a damaged page ({exc})"))
        return problems

    def file_bytes(self) -> int:
        """The size of the file, as SQLite sees it."""
        db = self.db
        # Read through SQLite, never os.stat-then-open: opening the file ourselves
        # would drop SQLite's POSIX locks, which are per process, not per descriptor.
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages * db.execute("PRAGMA page_size").fetchone()[0])

    def make_room(self, incoming: int) -> None:
        """Move a vault in small pages to big ones if ``incoming`` more bytes could take
        it past ``_schema.GROW_AT`` (outside a transaction: VACUUM cannot run in one).

        Done before the write, while the copy is cheap: the file is at most GROW_AT.
        VACUUM writes through the rollback journal, so a process killed in it leaves
        the vault as it was, in its old pages.
        """
        db = self.db
        if db.execute("PRAGMA page_size").fetchone()[0] >= _schema.PAGE_SIZE \
                or self.file_bytes() + incoming <= _schema.GROW_AT:
            return
        cache = db.execute("PRAGMA cache_size").fetchone()[0]
        db.execute(f"PRAGMA page_size = {_schema.PAGE_SIZE}")
        db.execute("VACUUM")
        # Set again: SQLite keeps the cache's number of pages across the move, so its
        # 2 MB of small pages became 32 MB of big ones, all held until the commit
        # (more memory, and 28 MB of a MiniLM save written only then).
        db.execute(f"PRAGMA cache_size = {cache}")

    def vacuum(self) -> None:
        """Hand the file's free pages back to the file system (inside a write)."""
        db = self.db
        # The file is created with auto_vacuum=INCREMENTAL: this returns free pages
        # without VACUUM's full copy of the database. Each step of the pragma frees one
        # page, and Python's sqlite3 steps a statement that has no result columns only
        # once (fetchall() does not help): run it once per free page.
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        for _ in range(free):
            db.execute("PRAGMA incremental_vacuum")

    def sync_ahead(self) -> None:
        """Have the pages SQLite has handed the OS so far written to disk, on a thread of
        its own that lives as long as the write (call it inside one).

        SQLite writes a big transaction's pages to the file as they leave its cache, and
        syncs them all at COMMIT: 0.16-0.21 s of waiting for a BERT-base save's 370 MB,
        with the disk idle until then. Synced while the rest is still being encoded, the
        commit finds little left to write. Durability is SQLite's as before: pages it has
        written may reach the disk at any time, and the transaction is committed only
        by COMMIT.
        """
        if self._syncer is None:
            descriptor = _descriptor(self._absolute)
            if descriptor is None:
                return
            self._syncer = _Syncer(descriptor)
        self._syncer.ask()

    # -- reading slices of packs on worker threads -------------------------------------

    @property
    def slices(self) -> bool:
        """Whether worker threads may read packs through connections of their own
        (``read_slice``): they see what is committed, so not while a write of ours is open,
        nor in a damaged file (read through this connection's allowances alone)."""
        return not self._writing and self.damage is None and os.getpid() == self._pid

    def read_slice(self, pack_id: int, start: int, length: int) -> bytes | str:
        """``length`` bytes from ``start`` of pack ``pack_id``'s data, read on the calling
        worker thread through its own read-only connection; or why they could not be.

        One blob handle per chunk reads just the chunk's bytes with the GIL released
        (~0.3 ms per MiB against ~0.7 for a SELECT of the whole pack on the one connection,
        whose copy into ``bytes`` holds the GIL). Callers use this only inside a read
        transaction of this connection: in the rollback journal that keeps every writer
        from committing, so the worker sees the same file; whatever goes wrong here (a
        writer waiting to commit refuses new readers; a WAL file's newer snapshot) is
        only a reason to read the chunk again through this connection, and the chunk's
        hash decides either way.
        """
        try:
            slicer = self._slicers.get(threading.get_ident()) or self._slicer()
            with slicer.blobopen("packs", "data", pack_id, readonly=True) as blob:
                if start + length > len(blob):
                    return f"lies beyond the end of pack #{pack_id}"
                blob.seek(start)
                return blob.read(length)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            return f"pack #{pack_id} cannot be read on a worker thread ({exc})"

    def _slicer(self) -> sqlite3.Connection:
        # No busy wait: a writer waiting for our read lock to commit holds off new readers
        # until it gives up (see read_slice).
        slicer = sqlite3.connect(f"{self._absolute.as_uri()}?mode=ro", uri=True,
                                 isolation_level=None, timeout=0, check_same_thread=False)
        slicer.execute("PRAGMA trusted_schema = OFF")
        slicer.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _schema.MAX_VALUE)
        self._slicers[threading.get_ident()] = slicer
        return slicer

    # -- the worker pool ---------------------------------------------------------------

    def map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``function`` over ``items`` on the thread pool, results in order."""
        return self.submit(function, items)()

    def submit(self, function: Callable[[Any], Any], items: Iterable[Any], *,
               grouped: bool = True) -> Callable[[], list[Any]]:
        """Start ``function`` over ``items`` on the thread pool; call the result to wait.

        A call on a small chunk is ~20 us of work, less than a pool task's own overhead,
        so items go out in one group per thread rather than one task each, unless not
        ``grouped``.
        """
        items = list(items)
        pool = self._threads()
        step = max(1, -(-len(items) // WORKERS)) if grouped else 1
        futures = [pool.submit(lambda g: [function(x) for x in g], items[i:i + step])
                   for i in range(0, len(items), step)]
        return lambda: [result for future in futures for result in future.result()]

    def _threads(self) -> ThreadPoolExecutor:
        # zstd and blake3 release the GIL, so threads use both cores.
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=WORKERS,
                                            thread_name_prefix="modelvault")
        return self._pool


def _descriptor(path: Path) -> int | None:
    """A descriptor this process holds open on the file at ``path``: SQLite's own, found
    through /proc (Linux; elsewhere None). Never one of ours: closing any descriptor of
    a file drops every POSIX lock the process holds on it, SQLite's included."""
    if not hasattr(os, "fdatasync"):
        return None
    try:
        wanted = os.stat(path)
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            seen = os.fstat(int(name))
        except (OSError, ValueError):
            continue
        if (seen.st_dev, seen.st_ino) == (wanted.st_dev, wanted.st_ino):
            return int(name)
    return None


class _Syncer:
    """A thread that syncs a file descriptor whenever asked: once more after the asks
    that came while it synced, never once per ask."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor
        self._asked = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="modelvault-sync",
                                        daemon=True)
        self._thread.start()

    def ask(self) -> None:
        self._asked.set()

    def stop(self) -> None:
        self._stopping = True
        self._asked.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._asked.wait()
            if self._stopping:
                return
            self._asked.clear()
            try:
                os.fdatasync(self._descriptor)
            except OSError:  # closed (even reused) since it was found: only this sync lost
                pass
