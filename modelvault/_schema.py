"""The file format: DDL, format version, and opening a file as a vault.

docs/format.md explains every table and column; keep the two in step and bump
FORMAT_VERSION whenever a reader of the old format would misread the new one. Every
bump comes with a migration from the format before it (``MIGRATIONS``) and a fixture
vault of that format in tests/fixtures/: older vaults are read as they are and
upgraded by their first write, never refused.
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import _atomic, _json
from ._errors import (
    CorruptVaultError,
    DiskFullError,
    FormatVersionError,
    LockTimeout,
    NotAVaultError,
    ReadOnlyError,
    VaultError,
)

# PRAGMA application_id: the bytes "MVLT", so `file` and SQLite tools can tell a vault apart.
APPLICATION_ID = 0x4D564C54
FORMAT_VERSION = 7
# The oldest format this modelvault reads (and upgrades on the first write). Formats 1
# and 2 were development snapshots of 0.1.0, never released.
OLDEST_FORMAT = 3

TABLES = """
CREATE TABLE models (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    last_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE environments (
    id   INTEGER PRIMARY KEY,
    json TEXT NOT NULL
);
CREATE TABLE versions (
    id          INTEGER PRIMARY KEY,
    uuid        TEXT NOT NULL UNIQUE,
    model_id    INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    layout      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    added_bytes INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata    TEXT NOT NULL DEFAULT '{}',
    environment_id INTEGER NOT NULL REFERENCES environments(id),
    key_id      TEXT,
    signature   TEXT,
    UNIQUE (model_id, version)
);
CREATE TABLE parts (
    version_id    INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    part          INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    name          TEXT,
    dtype         TEXT,
    shape         TEXT,
    fortran_order INTEGER NOT NULL DEFAULT 0,
    itemsize      INTEGER NOT NULL DEFAULT 1,
    size          INTEGER NOT NULL,
    PRIMARY KEY (version_id, part)
) WITHOUT ROWID;
CREATE TABLE packs (
    id    INTEGER PRIMARY KEY,
    codec TEXT NOT NULL,
    size  INTEGER NOT NULL,
    data  BLOB NOT NULL
);
CREATE TABLE chunks (
    id       INTEGER PRIMARY KEY,
    hash     TEXT NOT NULL UNIQUE,
    size     INTEGER NOT NULL,
    codec    TEXT NOT NULL,
    itemsize INTEGER NOT NULL DEFAULT 1,
    base_id  INTEGER REFERENCES chunks(id),
    pack_id  INTEGER NOT NULL REFERENCES packs(id),
    start    INTEGER NOT NULL,
    length   INTEGER NOT NULL
);
CREATE TABLE part_chunks (
    version_id INTEGER NOT NULL,
    part       INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    chunk_id   INTEGER NOT NULL REFERENCES chunks(id),
    PRIMARY KEY (version_id, part, seq),
    FOREIGN KEY (version_id, part) REFERENCES parts(version_id, part) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX part_chunks_by_chunk ON part_chunks(chunk_id);
CREATE TABLE aliases (
    model_id   INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    alias      TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    PRIMARY KEY (model_id, alias)
);
CREATE INDEX aliases_by_version ON aliases(version_id);
CREATE TABLE tags (
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (version_id, key)
);
"""

# Format 5's tables: a version's lineage, and package versions as rows; and a view of
# each pack's sizes (SQLite reads a blob's length from its row header, not its pages,
# so a browser sorting packs by size reads no pack bytes). A migration runs this very
# text, so an upgraded file's schema is a new one's, word for word.
TABLES_5 = """
CREATE TABLE lineage (
    version_id INTEGER PRIMARY KEY REFERENCES versions(id) ON DELETE CASCADE,
    parent     TEXT,
    source     TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE packages (
    environment_id INTEGER NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    version        TEXT NOT NULL,
    PRIMARY KEY (environment_id, name)
) WITHOUT ROWID;
CREATE INDEX packages_by_name ON packages(name, version);
CREATE VIEW pack_sizes AS
SELECT id, codec, size, length(data) AS stored FROM packs;
"""

# Views exist for people browsing the file in a SQLite browser; the library never reads them.
# No JSON functions here: SQLite refuses them in views under trusted_schema=OFF, which
# careful readers (modelvault included) set.
VIEWS = """
CREATE VIEW model_versions AS
SELECT m.name, v.version, v.created_at, v.kind, v.size,
       (SELECT CAST(round(coalesce(sum(c.length * 1.0 * length(p.data) / max(p.size, 1)), 0))
                AS INTEGER)
          FROM chunks c JOIN packs p ON p.id = c.pack_id
         WHERE c.id IN (SELECT pc.chunk_id FROM part_chunks pc WHERE pc.version_id = v.id))
         AS stored_size,
       (SELECT group_concat(a.alias, ', ') FROM aliases a WHERE a.version_id = v.id) AS aliases,
       (SELECT group_concat(t.key || '=' || t.value, ', ') FROM tags t
         WHERE t.version_id = v.id) AS tags,
       v.metadata, v.description,
       (SELECT e.json FROM environments e WHERE e.id = v.environment_id) AS environment,
       v.digest, v.uuid
FROM versions v JOIN models m ON m.id = v.model_id
ORDER BY m.name, v.version;
CREATE VIEW model_summary AS
SELECT m.name, count(v.id) AS versions, max(v.version) AS latest, max(v.created_at) AS updated_at
FROM models m JOIN versions v ON v.model_id = m.id
GROUP BY m.id
ORDER BY m.name;
"""

# Format 6's table: the remotes a vault remembers by name (URLs only: credentials come
# from the environment, never the file, which is emailed and synced).
TABLES_6 = """
CREATE TABLE remotes (
    name TEXT PRIMARY KEY,
    url  TEXT NOT NULL
) WITHOUT ROWID;
"""

# Format 7's tables: what this vault last saw on each remote (by its URL, as
# ``Remote.url`` gives it): where each alias pointed, and each version's tags. A pull
# follows what moved there since, unless it moved here too (docs/remote.md, "Labels").
# Advisory: a row that fails its checks counts as absent, never as an error.
TABLES_7 = """
CREATE TABLE remote_aliases (
    remote TEXT NOT NULL,
    model  TEXT NOT NULL,
    alias  TEXT NOT NULL,
    uuid   TEXT NOT NULL,
    PRIMARY KEY (remote, model, alias)
) WITHOUT ROWID;
CREATE TABLE remote_tags (
    remote TEXT NOT NULL,
    uuid   TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (remote, uuid, key)
) WITHOUT ROWID;
"""

# Page sizes. Every table and index takes at least one page, so a vault starts with
# SQLite's default 4 KiB pages: ~80 KB empty where 64 KiB pages made 1.2 MB, which
# would dwarf a small model. Blob rows of ~1 MiB (packs) wrote ~1.4x faster in big
# pages, so a vault about to hold more than GROW_AT moves to them first
# (Connection.make_room), in one VACUUM: SQLite's rollback journal makes that all or
# nothing, and any SQLite reader reads any page size. 16 KiB, not SQLite's largest
# 64: the ~22 near-empty tables and the packs' half-empty last pages cost a 91 MB
# vault 3 % of its size in 64 KiB pages, 0.7 % in 16, at the same save and load speed.
# Vaults in bigger pages (earlier versions wrote 64 KiB) keep them.
SMALL_PAGE = 4096
PAGE_SIZE = 16384
GROW_AT = 32 * 1024 * 1024
# SQLite's page cache, per connection, in KiB: more than a pack (PACK_SIZE), whose pages
# are made as zeros (INSERT of zeroblob) and then filled through a blob handle; in a
# smaller cache (SQLite's default is 2000 KiB) they leave it, zeros written to the file,
# before they are filled, and the pack is written twice.
CACHE_KIB = 8192
# The longest string or blob SQLite may hand us (SQLITE_LIMIT_LENGTH).
MAX_VALUE = 64 * 1024 * 1024

# The planner's statistics tables, which ANALYZE makes (a SQLite browser may run it):
# allowed besides our schema, but only as SQLite itself writes them. SQLite reads
# sqlite_stat1 through the file's own definition of it each time it loads the schema,
# so a column redefined as a generated one would run the file's expression at every
# open. (sqlite_stat2 and 3 were made by SQLite before 3.8; none is allowed.)
STATISTICS = {"sqlite_stat1": ("table", "CREATE TABLE sqlite_stat1(tbl,idx,stat)"),
              "sqlite_stat4": ("table", "CREATE TABLE sqlite_stat4(tbl,idx,neq,nlt,ndlt,"
                                        "sample)")}
# What SQLite may spend loading a file's schema, before we have seen it: VM steps, and
# the longest value. Loading ours (and its statistics) takes about 400 steps and
# values under 1 KB; these bound what a hostile schema makes SQLite evaluate then.
SCHEMA_STEPS = 5_000
SCHEMA_VALUE = 8 * 1024


def open_file(path: str | os.PathLike[str], *, readonly: bool = False, create: bool = True,
              timeout: float = 60.0) -> tuple[sqlite3.Connection, str | None]:
    """``connect``, and what is wrong with the file as a whole (None: nothing).

    A file cut short (a failed copy or download) is opened read-only all the same
    (``connect(damaged=True)``), so that the versions whose bytes are all there can be
    read and exported; SQLite checks only the pages it reads, so a file short of part
    of its last page would open, and take writes, as if whole.
    """
    path = Path(path)
    try:
        conn = connect(path, readonly=readonly, create=create, timeout=timeout)
    except CorruptVaultError:
        conn = _cut_short(path, timeout)
        if conn is None:
            raise
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        return conn, (f"it ends after page {pages}, short of the pages its header counts: "
                      "the file was cut short")
    missing = _shortfall(conn, path)
    if not missing:
        return conn, None
    conn.close()
    return (connect(path, readonly=True, create=False, timeout=timeout, damaged=True),
            f"its last page lacks {missing} bytes: the file was cut short")


def _shortfall(conn: sqlite3.Connection, path: Path) -> int:
    """How many bytes the file lacks of the pages SQLite counts in it.

    SQLite counts the pages its header gives (bytes 28-31, valid while the
    version-valid-for number at 92 equals the change counter at 24; else the file's
    size, rounded up to whole pages) and refuses a file with fewer whole pages than that,
    but reads the missing end of a last page as zeros. In WAL mode the last pages may
    be in the -wal file alone: only a last page cut short counts there.
    """
    conn.execute("BEGIN")
    try:
        # The read lock the first pragma takes keeps writers from resizing the file
        # until COMMIT.
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = path.stat().st_size
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        wal = conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.execute("COMMIT")
    return -size % page if wal else max(0, pages * page - size)


def _cut_short(path: Path, timeout: float) -> sqlite3.Connection | None:
    """A damaged connection to ``path`` if SQLite refuses it only for having fewer pages
    than its header counts (and it is a vault); None otherwise."""
    try:
        conn = connect(path, readonly=True, create=False, timeout=timeout, damaged=True)
    except VaultError:
        return None
    # writable_schema let SQLite read the pages there are; without it, the same
    # connection is refused at its header if that is what is wrong.
    conn.execute("PRAGMA writable_schema = OFF")
    try:
        conn.execute("PRAGMA page_count")
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            conn.execute("PRAGMA writable_schema = ON")
            return conn
    conn.close()
    return None


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite found a page damaged (SQLITE_CORRUPT): the rows on other pages may
    still be read."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_CORRUPT


def connect(path: str | os.PathLike[str], *, readonly: bool = False, create: bool = True,
            timeout: float = 60.0, damaged: bool = False) -> sqlite3.Connection:
    """Open ``path`` as a vault, creating it when missing (if ``create`` and not read-only).

    ``damaged``: open it read-only, with SQLite reading the pages there are of a file
    shorter than its header says (see ``open_file``).

    Raises NotAVaultError, FormatVersionError or CorruptVaultError for files that
    are not vaults this version can read.
    """
    path = Path(path)
    readonly = readonly or damaged
    # os.stat, unlike open(), takes no file descriptor and so cannot drop SQLite's POSIX locks.
    if not path.exists():
        if readonly or not create:
            raise NotAVaultError(f"{path}: no such vault")
        _create(path)
    if path.is_dir():
        raise NotAVaultError(f"{path}: is a directory, not a vault file")
    if not path.is_file():  # a FIFO or a device: SQLite's open would wait on it forever
        raise NotAVaultError(f"{path}: not a regular file, so not a vault file")
    uri = f"{path.absolute().as_uri()}?mode={'ro' if readonly else 'rw'}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA foreign_keys = ON")
        # Nothing we read or write comes near this (packs are at most 8 MiB): a damaged
        # or hostile file declaring a gigabyte string gets an error, not our memory.
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE)
        if damaged:
            # Else SQLite refuses a file with fewer pages than its header counts. Nothing
            # writes through a read-only connection, its schema above all.
            conn.execute("PRAGMA writable_schema = ON")
        check(conn, path)
        # After the checks: this pragma reads the schema, which a file cut short may not
        # give before writable_schema is on (damaged) or before check() names the problem.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        if not readonly:
            _remove_cold_journal(conn, path, timeout)
    except sqlite3.Error as exc:
        conn.close()
        error = translate(exc, path)
        if readonly and isinstance(error, ReadOnlyError) and _has_journal(path):
            # A write was interrupted; only a connection that may write can roll it back.
            error = ReadOnlyError(f"{path}: an interrupted write left {path.name}-journal "
                                  "beside it; open the vault once without readonly (any "
                                  "modelvault command does) so SQLite can roll it back")
        raise error from exc
    except VaultError:
        conn.close()
        raise
    return conn


def _remove_cold_journal(conn: sqlite3.Connection, path: Path, timeout: float) -> None:
    """Delete a journal that holds nothing to roll back.

    A write killed before SQLite first wrote to the database leaves a journal whose
    header was never written: a "cold" one, which SQLite rightly ignores, and leaves
    there until the next write. Until then the vault would be two files, and a copy of
    the folder would carry the stray one along. Taking the write lock rolls back a hot
    journal; a journal still there while we hold the lock belongs to no writer. The lock
    is tried without waiting: if another process holds it, the journal is theirs.
    """
    if not _has_journal(path):
        return
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        Path(f"{path}-journal").unlink(missing_ok=True)
    except OSError:
        pass  # not ours to delete (another user's, in a shared folder): SQLite ignores it
    finally:
        conn.execute("COMMIT")


def _create(path: Path) -> None:
    """Make an empty vault at ``path`` in one step: built beside it, then linked into
    place. No process ever sees a vault half made, so an empty or headerless file at
    ``path`` is never one being created: it is refused (it may be a failed copy). If
    another process creates the vault first, theirs is kept."""
    partial = _atomic.scratch_path(path, ".creating")
    try:
        conn = sqlite3.connect(partial, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        try:
            conn.execute(f"PRAGMA page_size = {SMALL_PAGE}")
            # Lets gc() return freed pages to the file system without a full VACUUM copy.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            # No journal and no syncs while it is built: nobody sees the scratch file, a
            # failed build is deleted, and the one fsync below makes it durable before it
            # is put into place (the journal mode is not stored in the file).
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("BEGIN")
            for statement in ddl(FORMAT_VERSION).split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        _atomic.fsync(partial)
        _atomic.place(partial, path)
        _atomic.fsync(path.parent, directory=True)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    except OSError as exc:
        raise NotAVaultError(f"{path}: cannot create ({exc})") from exc
    finally:
        for leftover in (partial, Path(f"{partial}-journal")):
            leftover.unlink(missing_ok=True)


def check(conn: sqlite3.Connection, path: Path, schema: str = "main") -> None:
    """Refuse the database ``schema`` of ``conn`` unless it is a vault of our format
    whose schema is exactly ours (``schema`` names an attached database, if not main)."""
    with _bounded(conn, path):
        _check(conn, path, schema)


@contextmanager
def _bounded(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """Bound what SQLite spends while it loads the schema (SCHEMA_STEPS, SCHEMA_VALUE).

    SQLite loads a file's schema at the first statement that needs it, and reads the
    statistics table then, before any check of ours can look at the schema; nothing
    (not trusted_schema=OFF, nor an authorizer, which SQLite skips while loading)
    keeps that reading from evaluating expressions the file defines.
    """
    steps = itertools.count(1)
    conn.set_progress_handler(lambda: next(steps) > SCHEMA_STEPS, 1)  # True interrupts
    length = conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SCHEMA_VALUE)
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_INTERRUPT:
            raise
        raise CorruptVaultError(f"{path}: schema is not modelvault's (SQLite takes more than "
                                f"{SCHEMA_STEPS} steps to load it; ours takes a few hundred)"
                                ) from exc
    finally:
        conn.set_progress_handler(None, 1)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, length)


def _check(conn: sqlite3.Connection, path: Path, schema: str) -> None:
    app_id = conn.execute(f"PRAGMA {schema}.application_id").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise NotAVaultError(f"{path}: not a modelvault file (application_id {app_id:#x})")
    version = conn.execute(f"PRAGMA {schema}.user_version").fetchone()[0]
    if version < OLDEST_FORMAT:
        raise FormatVersionError(
            f"{path}: format version {version} was written by a pre-release of modelvault "
            f"(a 0.1.0 development snapshot) that this version ({FORMAT_VERSION}) no longer reads")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: format version {version} is newer than this modelvault reads "
            f"({FORMAT_VERSION}); upgrade modelvault")
    found = _schema_of(conn, schema)
    expected = {**_expected_schema(version),
                **{name: STATISTICS[name] for name in found.keys() & STATISTICS.keys()}}
    if found != expected:
        # Anything else (a trigger, a view, an edited column) could run SQL on our
        # writes or make a column read back as something else: refuse the file.
        differ = sorted(f"{(found.get(name) or expected[name])[0]} {name}"
                        for name in found.keys() | expected.keys()
                        if found.get(name) != expected.get(name))
        raise CorruptVaultError(f"{path}: schema is not modelvault's "
                                f"(differs at: {', '.join(differ)})")


def _format_3_to_4(db: sqlite3.Connection) -> None:
    """Format 4 adds what a format-3 reader would refuse (named dtypes such as bfloat16,
    torch tensor nodes, odict nodes, pickled tensor storages, framework versions) and
    no table or column: the tables stay as they are."""


def _format_4_to_5(db: sqlite3.Connection) -> None:
    """Format 5 adds the lineage and packages tables and fills packages from every
    environment. Versions keep their signatures (see docs/format.md)."""
    _run(db, TABLES_5)
    # Read as bytes: one damaged text must not make the vault unwritable (a write may
    # be the delete of the damaged version).
    for env_id, raw in db.execute(
            "SELECT id, CAST(json AS BLOB) FROM environments").fetchall():
        try:
            add_packages(db, env_id, bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, TypeError):
            continue


def add_packages(db: sqlite3.Connection, env_id: int, text: object) -> None:
    """The packages rows of environments row ``env_id`` (whose JSON is ``text``)."""
    try:
        packages = _json.loads(text).get("packages")  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):
        return  # a damaged row lists no packages; verify() reports the version
    if isinstance(packages, dict):
        db.executemany("INSERT OR IGNORE INTO packages (environment_id, name, version) "
                       "VALUES (?, ?, ?)", [(env_id, name, version)
                                            for name, version in packages.items()
                                            if isinstance(version, str)])


def _format_5_to_6(db: sqlite3.Connection) -> None:
    """Format 6 adds the remotes table, empty."""
    _run(db, TABLES_6)


def _format_6_to_7(db: sqlite3.Connection) -> None:
    """Format 7 adds the tables of what the vault last saw on its remotes, empty: a
    first pull from a remote then takes the labels this vault lacks and records those
    equal on both sides, and reports those that differ as conflicts (as pulls did before
    format 7) until one side is chosen."""
    _run(db, TABLES_7)


def _run(db: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


# From each format, the step to the next one, run inside the upgrading write.
MIGRATIONS = {3: _format_3_to_4, 4: _format_4_to_5, 5: _format_5_to_6, 6: _format_6_to_7}


def upgrade(db: sqlite3.Connection) -> None:
    """Bring the main database up to FORMAT_VERSION inside the caller's write transaction
    (user_version is part of the transaction: a rolled-back write leaves the old format)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    while version < FORMAT_VERSION:
        MIGRATIONS[version](db)
        version += 1
        db.execute(f"PRAGMA user_version = {version}")


def _has_journal(path: Path) -> bool:
    return Path(f"{path}-journal").exists()  # a stat, not an open(): no lock is disturbed


def _schema_of(conn: sqlite3.Connection, schema: str = "main") -> dict[str, tuple[str, str]]:
    """name -> (type, SQL with whitespace squeezed) of every schema object.

    Names starting with ``sqlite_`` are listed too: SQLite names our automatic indexes
    so, and a trigger written into sqlite_master under such a name (with
    writable_schema) would fire like any other.
    """
    try:
        rows = conn.execute(f"SELECT type, name, sql FROM {schema}.sqlite_master").fetchall()
    except UnicodeDecodeError as exc:
        raise CorruptVaultError(f"schema text is not UTF-8: {exc}") from exc
    return {name: (kind, " ".join(str(sql).split())) for kind, name, sql in rows}


def ddl(version: int) -> str:
    """The schema of a vault of format ``version`` (3 and up), as SQL."""
    return (TABLES + (TABLES_5 if version >= 5 else "") + (TABLES_6 if version >= 6 else "")
            + (TABLES_7 if version >= 7 else "") + VIEWS)


@functools.cache
def _expected_schema(version: int) -> dict[str, tuple[str, str]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(ddl(version))
        return _schema_of(conn)
    finally:
        conn.close()


# SQLITE_FULL, and the write-side I/O errors SQLite reports when the file system refuses
# a write for want of room: a quota (EDQUOT) or a file-size limit (EFBIG, FAT32's 4 GiB)
# come back as SQLITE_IOERR_WRITE/FSYNC/TRUNCATE, not as SQLITE_FULL.
_WRITE_REFUSED = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_FSYNC,
                  sqlite3.SQLITE_IOERR_DIR_FSYNC, sqlite3.SQLITE_IOERR_TRUNCATE}


def translate(exc: sqlite3.Error, path: object = None) -> VaultError:
    """Map a sqlite3 exception onto our exception tree."""
    message = str(exc)
    where = f"{path}: " if path is not None else ""
    lowered = message.lower()
    if getattr(exc, "sqlite_errorcode", None) in _WRITE_REFUSED:
        return DiskFullError(f"{where}could not write: the disk is full, or a quota or "
                             f"file-size limit was hit ({message}); nothing was changed")
    if "locked" in lowered or "busy" in lowered:
        return LockTimeout(f"{where}timed out waiting for another process's lock ({message})")
    if "readonly" in lowered or "read-only" in lowered:
        return ReadOnlyError(f"{where}vault is read-only ({message})")
    if "too big" in lowered:  # beyond MAX_VALUE: more than modelvault ever writes
        return CorruptVaultError(f"{where}vault file holds a value larger than modelvault "
                                 f"writes: damaged or not made by modelvault ({message})")
    if "file is not a database" in lowered:
        return NotAVaultError(f"{where}not a modelvault file ({message})")
    if ("malformed" in lowered or "corrupt" in lowered or "disk i/o" in lowered
            or "could not decode" in lowered):  # a TEXT column that holds no UTF-8
        return CorruptVaultError(f"{where}vault file is damaged ({message})")
    if "unable to open" in lowered:
        return NotAVaultError(f"{where}cannot open ({message})")
    return VaultError(f"{where}{message}")
