"""Files that are not healthy vaults, and vaults that cannot be written (issue #4, rows 3, 4).

Every bad file gets a typed error (NotAVaultError, CorruptVaultError,
FormatVersionError or IntegrityError), runs nothing it holds, costs bounded
memory, and makes the command line print one line on stderr and exit 1, never a
traceback. A read-only vault (opened readonly=True, or on read-only media) serves
every read and refuses every write with ReadOnlyError.

test_storage.py already checks that the library refuses most of these files
when it opens them; here each one also goes through loads, verify() and the CLI
in child processes.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pickle
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from helpers import one_line_error, same

import modelvault
from modelvault import (
    CorruptVaultError,
    DamagedVaultWarning,
    FormatVersionError,
    NotAVaultError,
    VaultError,
)
from modelvault._schema import FORMAT_VERSION, OLDEST_FORMAT

# Children run this checkout's modelvault, whatever is installed.
_SOURCE = str(Path(modelvault.__file__).resolve().parent.parent)
_ENV_PATH = os.pathsep.join([_SOURCE, *filter(None, [os.environ.get("PYTHONPATH")])])
GIB2 = 2 ** 31  # what a bomb decompresses to
_CLI_READS = ("ls", "show", "get", "verify")


Run = collections.namedtuple("Run", "args returncode stdout stderr maxrss_mb")


# Runs a Python command (``-m module ...`` or a script) and, at exit, writes the peak
# resident memory of this program alone (VmHWM) to the file $PEAK_FILE: ru_maxrss would
# carry over the peak of the process that started it, and a test run that imported
# torch has a big one.
_PEAK_WRAPPER = textwrap.dedent("""
    import atexit, os, runpy, sys

    def peak():
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        with open(os.environ["PEAK_FILE"], "w") as out:
            out.write(str(kb))

    atexit.register(peak)
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _processes(commands, folder):
    """Run Python commands (argument lists after the interpreter) at once; returns a
    Run each, with its peak RSS.

    Output goes to files, not pipes, so that the children never block on a full pipe.
    """
    started = []
    for i, args in enumerate(commands):
        out, err, peak = (folder / f".run{i}.{what}" for what in ("out", "err", "peak"))
        env = {**os.environ, "PYTHONPATH": _ENV_PATH, "PEAK_FILE": str(peak)}
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER,
                                        *[str(a) for a in args]],
                                       stdout=stdout, stderr=stderr, env=env)
        started.append((args, process, out, err, peak))
    runs = []
    for args, process, out, err, peak in started:
        process.wait()
        runs.append(Run(args, process.returncode, out.read_text(), err.read_text(),
                        int(peak.read_text()) / 1024 if peak.exists() else float("nan")))
        for path in (out, err, peak):
            path.unlink(missing_ok=True)
    return runs


def _cli_reads(path, folder, ref="arr"):
    """`modelvault ls/show/get/verify` on ``path``, as child processes, by command."""
    commands = {"ls": ["ls", path], "show": ["show", path, ref],
                "get": ["get", path, ref, "-o", folder / "cli-out"], "verify": ["verify", path]}
    runs = _processes([["-m", "modelvault", *args]
                       for args in commands.values()], folder)
    return dict(zip(commands, runs, strict=True))


def _healthy(folder, *, big=False):
    """A vault with an arrays model (alias, tag), a pickled one and a files one; returns
    (path, {ref: what loads}). ``big`` adds enough bytes to span a few dozen pages."""
    rng = np.random.default_rng(0)
    n = 60_000 if big else 1000
    contents = {
        "arr:1": {"w": rng.normal(size=n).astype(np.float32), "b": np.arange(10)},
        "obj:1": collections.deque((f"k{i}", "v" * (i % 50)) for i in range(n // 10)),
        "files:1": {"model.bin": rng.integers(0, 256, n * 2, dtype=np.uint8).tobytes(),
                    "config.json": b'{"layers": 4}'},
    }
    source = folder / "model"
    source.mkdir()
    for name, data in contents["files:1"].items():
        (source / name).write_bytes(data)
    path = folder / "healthy.vault"
    with modelvault.open(path) as vault:
        vault.save("arr", contents["arr:1"], aliases=["prod"], tags={"team": "a"})
        vault.save("obj", contents["obj:1"])
        vault.save_files("files", source)
        assert [v.kind for v in vault.versions()] == ["arrays", "files", "pickle"]
    shutil.rmtree(source)
    return path, contents


def _png():
    """A real 1x1 PNG image."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


# -- row 3: bad files --------------------------------------------------------------------------

_MARKER_SQL = ("INSERT INTO models (name, created_at) "
               "VALUES ('pwned', '2020-01-01T00:00:00.000000Z')")


def _other_app(path):
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('ann')")
    db.close()


def _set_pragma(pragma, value):
    def edit(path):
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA {pragma} = {value}")
        db.close()
    return edit


def _run_sql(*statements, writable_schema=False):
    def edit(path):
        db = sqlite3.connect(path, isolation_level=None)
        if writable_schema:
            db.execute("PRAGMA writable_schema = ON")
        for statement in statements:
            db.execute(statement)
        db.close()
    return edit


def _statistics(stat, rows=0):
    """ANALYZE's sqlite_stat1, ``rows`` rows more, its column ``stat`` redefined as the
    generated column ``stat`` (with writable_schema, as only a hostile file would)."""
    sql = f"CREATE TABLE sqlite_stat1(tbl, idx, stat AS ({stat}))".replace("'", "''")
    return _run_sql(
        "ANALYZE",
        "INSERT INTO sqlite_stat1 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
        f"FROM n WHERE i < {rows}) SELECT 'models', NULL, '1' FROM n WHERE {rows} > 0",
        f"UPDATE sqlite_master SET sql = '{sql}' WHERE name = 'sqlite_stat1'",
        writable_schema=True)


# name -> (how to make it from a healthy vault at the path, or bytes; the error expected)
_BAD_FILES = {
    "0 bytes": (b"", NotAVaultError),
    "random bytes": (random.Random(0).randbytes(100_000), NotAVaultError),
    "a PNG image": (_png(), NotAVaultError),
    "another app's SQLite database": (_other_app, NotAVaultError),
    "newer format version": (_set_pragma("user_version", FORMAT_VERSION + 1),
                             FormatVersionError),
    "older format version": (_set_pragma("user_version", OLDEST_FORMAT - 1),
                             FormatVersionError),
    "another application_id": (_set_pragma("application_id", 0x53514C69), NotAVaultError),
    # Each of these would write a marker row during modelvault's own writes.
    "a trigger": (_run_sql(f"CREATE TRIGGER evil AFTER INSERT ON tags BEGIN {_MARKER_SQL}; END",
                           f"CREATE TRIGGER evil2 BEFORE UPDATE ON models BEGIN {_MARKER_SQL}; "
                           "END"), CorruptVaultError),
    "a view in place of a table": (_run_sql(
        "ALTER TABLE tags RENAME TO tags_real",
        "CREATE VIEW tags AS SELECT * FROM tags_real",
        f"CREATE TRIGGER evil INSTEAD OF INSERT ON tags BEGIN {_MARKER_SQL}; END"),
        CorruptVaultError),
    # SQLite refuses new names starting with sqlite_, except by writing sqlite_master
    # directly; it then loads and fires the trigger like any other.
    "a trigger named like SQLite's own": (_run_sql(
        "INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql) VALUES ('trigger', "
        "'sqlite_evil', 'tags', 0, 'CREATE TRIGGER sqlite_evil AFTER INSERT ON tags BEGIN "
        f"{_MARKER_SQL.replace(chr(39), chr(39) * 2)}; END')", writable_schema=True),
        CorruptVaultError),
    # SQLite reads the planner's statistics (sqlite_stat1, made by ANALYZE) through the
    # file's own definition whenever it loads the schema, before any check of ours: a
    # generated column there ran at every open (a 20-million-character one: 59 s each).
    "statistics computed by the file's expression": (_statistics(
        "printf('%.*c', 100000, '7')"), CorruptVaultError),
    "statistics computed in 20,000 rows": (_statistics(
        "printf('%.*c', 100 * length(tbl), tbl)", rows=20_000), CorruptVaultError),
}


@pytest.mark.parametrize("what", list(_BAD_FILES))
def test_a_bad_file_gets_a_typed_error_runs_nothing_and_one_cli_line(tmp_path, what):
    make, error = _BAD_FILES[what]
    path, _ = _healthy(tmp_path)
    if isinstance(make, bytes):
        path.write_bytes(make)
    else:
        make(path)
    before = path.read_bytes()
    # Every way in: both open modes, the one-call API, and writes that would fire a
    # trigger (were the file opened at all).
    attempts = {
        "open": lambda: modelvault.open(path).close(),
        "open read-only": lambda: modelvault.open(path, readonly=True).close(),
        "load": lambda: modelvault.load(path, "arr"),
        "save": lambda: modelvault.save(path, "arr", {"w": np.zeros(3)}, tags={"k": "v"}),
    }
    failures = []
    for name, attempt in attempts.items():
        try:
            attempt()
            failures.append(f"{name} worked")
        except error as exc:
            if path.name not in str(exc):
                failures.append(f"{name}: {exc}")
    runs = _cli_reads(path, tmp_path)
    runs.update(zip(("tag", "put"), _processes([
        ["-m", "modelvault", "tag", path, "arr:1", "stage=prod"],
        ["-m", "modelvault", "put", path, "m", __file__]], tmp_path),
        strict=True))
    for command, run in runs.items():
        if not (one_line_error(run) and path.name in run.stderr):
            failures.append(f"CLI {command}: exit {run.returncode}, {run.stderr[-300:]!r}")
    # Nothing ran and nothing was written: the bytes are as they were, no journal beside.
    if before.startswith(b"SQLite format 3"):
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "models" in tables and db.execute(
                    "SELECT count(*) FROM models WHERE name = 'pwned'").fetchone()[0]:
                failures.append("the file's own SQL ran: a 'pwned' row was written")
        db.close()
    if path.read_bytes() != before:
        failures.append("the file was changed")
    if sorted(p.name for p in tmp_path.iterdir()) != [path.name]:
        failures.append(f"files were left: {sorted(p.name for p in tmp_path.iterdir())}")
    assert not failures, "\n".join(failures)


def _damaged_reads(path, contents, folder):
    """Open ``path``, read everything, try a save and the salvage; returns (outcome, wrong,
    foreign) where outcome is 'refused when opened', 'opened read-only, warned' or 'opened
    silently' (what a truncated file did before issue #18)."""
    wrong, foreign = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vault = modelvault.open(path)
        except VaultError:
            return "refused when opened", wrong, foreign
        except Exception as exc:  # noqa: BLE001 - any other kind is the failure looked for
            return "foreign", wrong, [("open", repr(exc))]
    warned = [w for w in caught if issubclass(w.category, DamagedVaultWarning)]
    outcome = ("opened read-only, warned" if warned and vault.readonly
               and "cut short" in str(warned[0].message) else "opened silently")
    refused, named = set(), set()
    with vault:
        calls = [(ref, lambda ref=ref: vault.load(ref, trust=True)) for ref in contents]
        calls += [("verify", vault.verify), ("versions", vault.versions),
                  ("get", lambda: vault.get("arr@prod")),
                  ("save", lambda: vault.save("arr", {"w": np.zeros(3)}))]
        for what, call in calls:
            try:
                result = call()
            except CorruptVaultError as exc:
                if what == "save" and "cut short" not in str(exc):
                    wrong.append(("save refused without saying why", str(exc)))
                refused.add(what)
                continue
            except VaultError:
                refused.add(what)
                continue
            except Exception as exc:  # noqa: BLE001
                foreign.append((what, repr(exc)))
                continue
            if what in contents and not same(contents[what], result):
                wrong.append(what)
            if what == "verify":
                named = {f"{p.model}:{p.version}" for p in result if p.model is not None}
        if "save" not in refused:
            wrong.append("a save was accepted")
        if "verify" not in refused:
            # verify names every version that cannot be read
            wrong += [(ref, "unreadable, not named by verify") for ref in contents
                      if ref in refused and ref not in named]
            salvaged = folder / "salvaged.vault"
            try:
                vault.export(salvaged, skip_damaged=True)
                with modelvault.open(salvaged) as copy:
                    whole = {v.ref: copy.load(v.ref, trust=True) for v in copy.versions()}
                    if copy.verify():
                        wrong.append(("salvage", copy.verify()))
                if sorted(whole) != sorted(set(contents) - named):
                    wrong.append(("salvage holds", sorted(whole), "named", sorted(named)))
                wrong += [(ref, "salvaged wrong") for ref in whole
                          if not same(contents[ref], whole[ref])]
            except Exception as exc:  # noqa: BLE001
                foreign.append(("salvage", repr(exc)))
            salvaged.unlink(missing_ok=True)
    return outcome, wrong, foreign


@pytest.mark.sweep
def test_a_fifo_at_the_path_is_refused_not_waited_on(tmp_path):
    """SQLite's open of a named pipe waits for a writer forever; a vault path that is
    not a regular file is refused before SQLite sees it."""
    import threading

    path = tmp_path / "pipe.vault"
    os.mkfifo(path)
    outcomes: list[object] = []

    def attempt(how):
        try:
            how()
            outcomes.append("opened")
        except BaseException as exc:  # noqa: BLE001 - the type is the finding
            outcomes.append(exc)

    for how in (lambda: modelvault.open(path).close(),
                lambda: modelvault.open(path, readonly=True).close(),
                lambda: modelvault.load(path, "arr")):
        thread = threading.Thread(target=attempt, args=(how,), daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the open waited on the pipe"
    assert all(isinstance(o, modelvault.NotAVaultError) for o in outcomes), outcomes
    assert all("not a regular file" in str(o) for o in outcomes)


def test_a_vault_truncated_anywhere_is_refused_or_opened_read_only_for_salvage(tmp_path, full):
    healthy, contents = _healthy(tmp_path, big=True)
    data = healthy.read_bytes()
    page = int.from_bytes(data[16:18], "big")  # the header's page size (a small vault's)
    pages = len(data) // page
    assert pages > 10
    # 0 bytes is in the catalogue above; every page boundary under --full, else 24 of them.
    step = 1 if full else max(1, pages // 24)
    cuts = [k * page for k in range(1, pages, step)]
    mid_page = [100, page + 1000, (pages // 2) * page + page // 2, len(data) - 1000,
                len(data) - 1]
    counts = collections.Counter()
    failures = []
    path = tmp_path / "truncated.vault"
    for cut in cuts + mid_page:
        path.write_bytes(data[:cut])
        outcome, wrong, foreign = _damaged_reads(path, contents, tmp_path)
        counts[outcome] += 1
        if wrong or foreign or outcome == "opened silently":
            failures.append((cut, outcome, wrong, foreign))
        if path.read_bytes() != data[:cut]:
            failures.append((cut, "the file was changed"))
    # The CLI on a few of them (on all of them under --full): each child costs ~0.5 s.
    for cut in cuts + mid_page if full else [cuts[0], cuts[len(cuts) // 2], cuts[-1],
                                             mid_page[-1]]:
        path.write_bytes(data[:cut])
        for command, run in _cli_reads(path, tmp_path).items():
            counts["CLI runs"] += 1
            # A file that opens says first, in one line, that it was cut short.
            warning, _, rest = run.stderr.partition("\n")
            if warning.startswith("Warning: ") and "cut short" in warning:
                run = run._replace(stderr=rest)
            ok = run.returncode == 0 and command != "verify"
            listed = (command == "verify" and run.returncode == 1 and not run.stderr
                      and run.stdout.strip())  # verify lists the problems it found
            if not (ok or listed or one_line_error(run)):
                failures.append((cut, command, run.returncode, run.stderr[-500:]))
    summary = (f"{len(cuts)} page boundaries of {pages} and {len(mid_page)} mid-page cuts: "
               f"{dict(counts)}")
    print(summary)
    assert not failures, f"{summary}; failures: {failures[:10]}"
    assert (counts["opened read-only, warned"] + counts["refused when opened"]
            == len(cuts) + len(mid_page))
    assert counts["opened read-only, warned"] > len(cuts) // 2  # the salvage was tried


def test_a_vault_in_wal_mode_with_pages_in_its_wal_file_alone_is_whole(tmp_path):
    """In WAL mode the file may hold fewer pages than SQLite counts (the rest wait in
    -wal for a checkpoint): that is no file cut short."""
    path, contents = _healthy(tmp_path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("PRAGMA journal_mode = WAL")
        other.execute("PRAGMA wal_autocheckpoint = 0")
        other.execute("INSERT INTO environments (json) VALUES (?)", ("{}" + " " * 200_000,))
        pages, page = (other.execute(f"PRAGMA {p}").fetchone()[0]
                       for p in ("page_count", "page_size"))
        assert pages * page > path.stat().st_size
        with warnings.catch_warnings():
            warnings.simplefilter("error", DamagedVaultWarning)
            with modelvault.open(path) as vault:
                assert not vault.readonly
                assert same(contents["arr:1"], vault.load("arr:1"))
                vault.save("arr", {"w": np.zeros(3)})
    finally:
        other.close()


# -- row 3: zstd bombs -------------------------------------------------------------------------


@functools.cache
def _bomb_frame(declared=GIB2, size_in_header=True):
    """One zstd frame that decompresses to 2 GiB of zeros (about 64 KB of blocks), its
    header declaring ``declared`` bytes, or no size at all."""
    params = zstandard.ZstdCompressor(level=1, write_content_size=size_in_header)
    writer = params.compressobj(size=GIB2 if size_in_header else -1)
    zeros = bytes(1 << 20)
    frame = b"".join([writer.compress(zeros) for _ in range(GIB2 >> 20)] + [writer.flush()])
    if size_in_header and declared != GIB2:
        # Header: magic (4), descriptor (1), window (1), then a 4-byte content size.
        assert frame[4] >> 6 == 2 and not frame[4] & 0x20
        frame = frame[:6] + struct.pack("<I", declared) + frame[10:]
    assert zstandard.frame_content_size(frame) == (declared if size_in_header else -1)
    return frame


def _chunk_of(db, name):
    return db.execute("SELECT c.id, c.size, c.pack_id FROM chunks c JOIN part_chunks pc ON "
                      "pc.chunk_id = c.id JOIN versions v ON v.id = pc.version_id JOIN models m "
                      "ON m.id = v.model_id WHERE m.name = ? ORDER BY pc.part, pc.seq",
                      (name,)).fetchone()


def _pack_bomb(size, frame):
    """Replace the pickle's solid pack with ``frame``, its size column saying ``size``."""
    def edit(db):
        _, _, pack_id = _chunk_of(db, "obj")
        db.execute("UPDATE packs SET codec = 'zstd', size = ?, data = ? WHERE id = ?",
                   (size, frame, pack_id))
    return edit, "obj"


def _chunk_bomb(make_stored, size=None):
    """Give the array's first chunk new stored bytes, alone in a new raw pack."""
    def edit(db):
        chunk_id, chunk_size, _ = _chunk_of(db, "arr")
        codec, itemsize, stored = make_stored(chunk_size)
        pack_id = db.execute("INSERT INTO packs (codec, size, data) VALUES ('raw', ?, ?)",
                             (len(stored), stored)).lastrowid
        db.execute("UPDATE chunks SET codec = ?, itemsize = ?, size = ?, pack_id = ?, "
                   "start = 0, length = ? WHERE id = ?",
                   (codec, itemsize, size or chunk_size, pack_id, len(stored), chunk_id))
    return edit, "arr"


def _lying_plane(chunk_size):
    """A shuffled 4-byte chunk whose first plane is a frame that claims the plane's size."""
    plane = chunk_size // 4
    frame = _bomb_frame(declared=plane)
    lengths = [len(frame)] + [plane | 0x80000000] * 3  # planes 1-3 stored as they are
    return "zstd-shuffle", 4, struct.pack("<4I", *lengths) + frame + bytes(3 * plane)


_BOMBS = {
    "pack declaring 2 GiB": lambda: _pack_bomb(GIB2, _bomb_frame()),
    "pack of 8 MiB holding a 2 GiB frame": lambda: _pack_bomb(8 << 20, _bomb_frame()),
    "pack frame lying about its size": lambda: _pack_bomb(8 << 20, _bomb_frame(8 << 20)),
    "pack frame declaring no size": lambda: _pack_bomb(8 << 20, _bomb_frame(
        size_in_header=False)),
    "chunk declaring 2 GiB": lambda: _chunk_bomb(
        lambda size: ("zstd", 1, _bomb_frame()), size=GIB2),
    "chunk frame lying about its size": lambda: _chunk_bomb(
        lambda size: ("zstd", 1, _bomb_frame(declared=size))),
    "byte plane frame lying about its size": lambda: _chunk_bomb(_lying_plane),
}

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import modelvault

    def rss_mb():  # resident now, not the peak so far
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    path, ref = sys.argv[1:]
    result = {}
    with modelvault.open(path) as vault:
        vault.get(ref)
        start = rss_mb()
        for what, call in (("load", lambda: vault.load(ref)), ("verify", vault.verify)):
            try:
                value = call()
                result[what] = [str(p) for p in value] if what == "verify" else "loaded"
            except modelvault.VaultError as exc:
                result[what] = f"{type(exc).__name__}: {exc}"
            except BaseException as exc:
                result[what] = f"FOREIGN {type(exc).__name__}: {exc}"
    # VmHWM, not ru_maxrss: exec() carries the parent's peak over into ru_maxrss, and a
    # test run that imported torch has a big one.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    result["grew_mb"] = peak - start
    print(json.dumps(result))
""")


@pytest.mark.parametrize("bomb", list(_BOMBS))
def test_a_zstd_bomb_is_refused_in_bounded_memory(tmp_path, bomb):
    path, _ = _healthy(tmp_path)
    healthy = tmp_path / "copy.vault"
    shutil.copy(path, healthy)
    edit, name = _BOMBS[bomb]()
    db = sqlite3.connect(path, isolation_level=None)
    edit(db)
    db.close()
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    child, control = _processes([[script, path, name], [script, healthy, name]], tmp_path)
    assert child.returncode == 0 and control.returncode == 0, child.stderr + control.stderr
    result, healthy_result = json.loads(child.stdout), json.loads(control.stdout)
    assert healthy_result["load"] == "loaded" and healthy_result["verify"] == []
    assert result["load"].startswith("IntegrityError: "), result
    assert f"{name}:1" in result["load"], result
    assert any(p.startswith(f"{name}:1 ") for p in result["verify"]), result
    assert result["grew_mb"] < 200, result
    script.unlink()

    runs = _cli_reads(path, tmp_path, ref=name)
    assert one_line_error(runs["get"]) and f"{name}:1" in runs["get"].stderr, runs["get"]
    verify = runs["verify"]
    assert verify.returncode == 1 and not verify.stderr and f"{name}:1" in verify.stdout, verify
    # ls and show read no chunks: they work on a vault with a damaged chunk.
    assert runs["ls"].returncode == 0 and runs["show"].returncode == 0
    baseline = _cli_reads(healthy, tmp_path, ref=name)
    print(f"{bomb}: load and verify grew the peak RSS by {result['grew_mb']:.0f} MB (on the "
          f"healthy vault {healthy_result['grew_mb']:.0f} MB); CLI get "
          f"and verify peaked at {runs['get'].maxrss_mb:.0f} and {runs['verify'].maxrss_mb:.0f}"
          f" MB (on the healthy vault {baseline['get'].maxrss_mb:.0f} and "
          f"{baseline['verify'].maxrss_mb:.0f} MB)")
    for command in ("get", "verify"):
        grew = runs[command].maxrss_mb - baseline[command].maxrss_mb
        assert grew < 200, (command, runs[command].maxrss_mb, baseline[command].maxrss_mb)


# -- row 4: read-only vaults -------------------------------------------------------------------

# The reads and writes, as a script run in a child: with readonly=True, or opened
# writable in a child that sees the vault's folder mounted read-only.
_READ_ONLY_SCRIPT = textwrap.dedent("""
    import pickle, subprocess, sys
    from pathlib import Path
    import numpy as np
    import modelvault

    path, other, out, readonly = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    readonly = readonly == "readonly"
    results = {}

    def attempt(name, call):
        try:
            results[name] = ("ok", call())
        except BaseException as exc:
            results[name] = ("error", type(exc).__name__, str(exc))

    with modelvault.open(path, readonly=readonly) as vault:
        for ref in ("arr:1", "obj:1", "files:1"):
            attempt(f"load {ref}", lambda: vault.load(ref))
        attempt("get", lambda: vault.get("arr@prod").ref)
        attempt("versions", lambda: [v.ref for v in vault.versions()])
        attempt("models", lambda: [m.name for m in vault.models()])
        attempt("verify", vault.verify)
        attempt("stats", lambda: vault.stats().versions)
        attempt("extract", lambda: sorted(p.name for p in vault.extract("files", out / "x")))

        def exported():
            with modelvault.open(vault.export(out / "exported.vault"), readonly=True) as copy:
                return [v.ref for v in copy.versions()]

        attempt("export", exported)
        (out / "new.bin").write_bytes(b"new")
        writes = {
            "save": lambda: vault.save("arr", {"w": np.zeros(3)}),
            "save_files": lambda: vault.save_files("files", out / "new.bin"),
            "delete version": lambda: vault.delete("arr:1"),
            "delete model": lambda: vault.delete("obj"),
            "alias": lambda: vault.alias("arr:1", "staging"),
            "unalias": lambda: vault.unalias("arr", "prod"),
            "tag": lambda: vault.tag("arr:1", stage="prod"),
            "gc": vault.gc,
        }
        if hasattr(vault, "merge"):
            writes["merge"] = lambda: vault.merge(other)
        for name, call in writes.items():
            attempt(name, call)
    if not readonly:  # read-only media: what opens the file writable must still read
        attempt("one-call load", lambda: modelvault.load(path, "arr"))
        for command in ("ls", "show", "get", "verify"):
            args = {"show": [path, "arr"], "get": [path, "arr", "-o", out / "cli"]}.get(
                command, [path])
            run = subprocess.run([sys.executable, "-m", "modelvault", command, *map(str, args)],
                                 capture_output=True, text=True)
            results[f"CLI {command}"] = ("ok" if run.returncode == 0 else "error", run.stderr)
    (out / "results.pkl").write_bytes(pickle.dumps(results))
""")


def _check_read_only(results, contents, path):
    """Every read gave the right answer; every write raised ReadOnlyError saying why."""
    counts = collections.Counter()
    for ref, value in contents.items():
        assert results[f"load {ref}"][0] == "ok", results[f"load {ref}"]
        assert same(value, results[f"load {ref}"][1]), ref
        counts["reads"] += 1
    expected = {"get": "arr:1", "versions": ["arr:1", "files:1", "obj:1"],
                "models": ["arr", "files", "obj"], "verify": [], "stats": 3,
                "extract": ["config.json", "model.bin"],
                "export": ["arr:1", "files:1", "obj:1"]}
    for name, value in expected.items():
        assert results[name] == ("ok", value), (name, results[name])
        counts["reads"] += 1
    for name in ("one-call load", "CLI ls", "CLI show", "CLI get", "CLI verify"):
        if name in results:
            assert results[name][0] == "ok", (name, results[name])
            counts["reads"] += 1
    writes = ["save", "save_files", "delete version", "delete model", "alias", "unalias",
              "tag", "gc"] + (["merge"] if "merge" in results else [])
    for name in writes:
        outcome = results[name]
        assert outcome[:2] == ("error", "ReadOnlyError"), (name, outcome)
        assert "read-only" in outcome[2] and path.name in outcome[2], (name, outcome[2])
        counts["writes refused"] += 1
    return counts


def _read_only_run(tmp_path, mode, prefix=()):
    """Run the script on a fresh vault in a child (behind ``prefix``, which may mount the
    vault's folder read-only); returns (results, counts), the vault file left unchanged."""
    folder = tmp_path / "media"
    folder.mkdir()
    path, contents = _healthy(folder)
    other = tmp_path / "other.vault"  # something for merge to bring in
    with modelvault.open(other) as vault:
        vault.save("new", {"w": np.ones(3)})
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "read_only.py"
    script.write_text(_READ_ONLY_SCRIPT)
    before = path.read_bytes()
    if prefix == ("chmod",):
        path.chmod(0o444)
        folder.chmod(0o555)
        prefix = ()
    try:
        child = subprocess.run([*prefix, sys.executable, script, path, other, out, mode],
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": _ENV_PATH})
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    assert child.returncode == 0, child.stderr
    results = pickle.loads((out / "results.pkl").read_bytes())
    counts = _check_read_only(results, contents, path)
    print(dict(counts))
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no journal left
    return results, counts


def test_a_vault_opened_read_only_reads_everything_and_refuses_every_write(tmp_path):
    results, counts = _read_only_run(tmp_path, "readonly")
    assert counts == {"reads": 10, "writes refused": 8 + ("merge" in results)}


def _read_only_mount():
    """How to run a command that sees a folder read-only: a command prefix, ("chmod",)
    or None.

    An unprivileged user and mount namespace (util-linux unshare) can bind-mount the
    folder read-only for its own processes. Failing that, chmod does it for any user but
    root, whom permission bits do not stop.
    """
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0:
        # "$0" is the folder (the vault's parent); "$@" the command to run.
        return lambda folder: (unshare, "-rm", "sh", "-c", 'mount --bind "$0" "$0" && '
                               'mount -o remount,bind,ro "$0" && exec "$@"', folder)
    if os.geteuid() != 0:
        return lambda folder: ("chmod",)
    return None


def test_a_vault_on_read_only_media_reads_everything_and_refuses_every_write(tmp_path):
    mount = _read_only_mount()
    if mount is None:
        pytest.skip("running as root without unshare: chmod cannot make the file read-only")
    # Opened as the CLI and modelvault.load() open it: writable, which SQLite turns
    # into read-only on read-only media.
    results, counts = _read_only_run(tmp_path, "writable", mount(tmp_path / "media"))
    assert counts == {"reads": 15, "writes refused": 8 + ("merge" in results)}


@pytest.mark.parametrize("stamp", [
    "2026-W48-1T08:00:00.000000Z",  # an ISO week date: Python's fromisoformat takes it
    "2026-12-06T08:00:00,000000Z",  # a comma fraction: so does it
    "2026-12-06T08:00:00.000000+00",
    "２０２６-12-06T08:00:00.000000Z",  # digits of another script
])
def test_a_timestamp_not_in_the_documented_format_is_a_damaged_version(tmp_path, stamp):
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        vault.save("m", {"w": np.ones(3)})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE versions SET created_at = ?", (stamp,))
    db.close()
    with modelvault.open(path) as vault, \
            pytest.raises(modelvault.IntegrityError, match="timestamp"):
        vault.versions("m")
