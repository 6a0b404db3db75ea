"""Edges found in review: lock failures, threads, fork, tampering, damaged rows."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading

import numpy as np
import pytest
from helpers import redigest, vault_connections, version_id

import modelvault
from modelvault import IntegrityError, LockTimeout
from modelvault._trust import canonical_json


def test_a_commit_that_times_out_leaves_no_transaction_open(tmp_path):
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        vault.save("m", [1])
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM chunks").fetchall()  # holds a shared lock
    with modelvault.open(path, timeout=0.2) as vault:
        with pytest.raises(LockTimeout):
            vault.tag("m:1", stage="prod")  # the COMMIT cannot get its exclusive lock
        reader.execute("COMMIT")
        reader.close()
        assert vault.tag("m:1", stage="prod").tags == {"stage": "prod"}
        with modelvault.open(path, timeout=0.2) as other:  # nobody is left locked out
            assert other.get("m").tags == {"stage": "prod"}


def test_threads_sharing_one_vault_save_whole_versions(vault):
    def work(t):
        for i in range(6):
            vault.save("shared", {"w": np.full(5000, t * 100 + i)}, metadata={"t": t, "i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = vault.versions("shared")
    assert [v.version for v in versions] == list(range(1, 25))
    for v in versions:
        assert (vault.load(v)["w"] == v.metadata["t"] * 100 + v.metadata["i"]).all()
    assert vault.verify() == []


def _child_saves(vault):
    vault.save("forked", [2])


def test_a_forked_child_opens_its_own_connection(vault):
    vault.save("forked", [1])
    child = multiprocessing.get_context("fork").Process(target=_child_saves, args=(vault,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    vault.save("forked", [3])  # the parent's connection still works
    assert [vault.load(v) for v in vault.versions("forked")] == [[1], [2], [3]]
    assert vault.verify() == []


def test_arrays_whose_signed_manifest_changed_do_not_load(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.arange(4, dtype="<f8")})
    # Reinterpret the bytes as float32 and recompute the (unkeyed) digest to match.
    db = sqlite3.connect(vault_path)
    db.execute("UPDATE parts SET dtype = '<f4', shape = '[8]', itemsize = 4")
    kind, layout, vid = db.execute("SELECT kind, layout, id FROM versions").fetchone()
    parts = []
    for p in db.execute("SELECT kind, name, dtype, shape, fortran_order, itemsize, size, part "
                        "FROM parts WHERE version_id = ? ORDER BY part", (vid,)).fetchall():
        hashes = [r[0] for r in db.execute(
            "SELECT c.hash FROM part_chunks pc JOIN chunks c ON c.id = pc.chunk_id "
            "WHERE pc.version_id = ? AND pc.part = ? ORDER BY pc.seq", (vid, p[7]))]
        parts.append({"kind": p[0], "name": p[1], "dtype": p[2], "shape": json.loads(p[3]),
                      "fortran_order": p[4], "itemsize": p[5], "size": p[6], "chunks": hashes})
    import blake3

    digest = blake3.blake3(canonical_json(
        {"kind": kind, "layout": json.loads(layout), "parts": parts})).hexdigest()
    db.execute("UPDATE versions SET digest = ?", (digest,))
    db.commit()
    db.close()
    with modelvault.open(vault_path) as vault:
        assert vault.get("m").signature == "invalid"
        with pytest.raises(IntegrityError, match="signature does not match"):
            vault.load("m")
        assert vault.load("m", trust=True)["w"].dtype == np.float32
        assert any("signature" in p.message for p in vault.verify())


@pytest.mark.parametrize("column,value", [
    ("metadata", "{not json"), ("environment", "[1,"), ("created_at", "yesterday")])
def test_damaged_version_columns_raise_integrity_error(vault_path, column, value):
    with modelvault.open(vault_path) as vault:
        vault.save("m", [1])
    with sqlite3.connect(vault_path) as db:
        if column == "environment":
            db.execute("UPDATE environments SET json = ?", (value,))
        else:
            db.execute(f"UPDATE versions SET {column} = ?", (value,))
    db.close()
    with modelvault.open(vault_path) as vault:
        with pytest.raises(IntegrityError):
            record = vault.get("m")  # the timestamp is read at once, JSON on first use
            assert record.metadata is not None and record.environment is not None
        with pytest.raises(IntegrityError):
            vault.load("m")
        assert vault.verify()


@pytest.mark.parametrize("update", [
    "UPDATE chunks SET size = 1000000000000",
    "UPDATE packs SET data = CAST(data AS TEXT)",
    "UPDATE chunks SET start = start + 1000000000",
    "UPDATE chunks SET base_id = id",
    "UPDATE chunks SET itemsize = 'x'",
    "UPDATE parts SET dtype = NULL",
])
def test_damaged_chunk_and_part_rows_are_reported_not_raised(vault_path, update):
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.random.default_rng(0).normal(size=20_000)})
    with sqlite3.connect(vault_path) as db:
        db.execute(update)
    db.close()
    with modelvault.open(vault_path) as vault:
        with pytest.raises((IntegrityError, modelvault.CorruptVaultError)):
            vault.load("m")
        try:
            assert vault.verify() != []
        except modelvault.CorruptVaultError:
            pass  # a blob turned into non-UTF-8 TEXT cannot even be read back


def test_latest_is_a_reserved_alias(vault):
    vault.save("m", [1])
    vault.save("m", [2])
    assert vault.load("m@latest") == [2]
    with pytest.raises(ValueError, match="newest"):
        vault.alias("m:1", "latest")


def test_numpy_scalars_are_stored_natively(vault):
    value = {"auc": np.float64(0.91), "n": np.int32(7), "label": np.str_("cat")}
    assert vault.save("metrics", value).kind == "arrays"
    loaded = vault.load("metrics")
    assert loaded == value
    assert [type(v) for v in loaded.values()] == [np.float64, np.int32, np.str_]


def test_zero_byte_items_round_trip(vault):
    vault.save("m", np.zeros(3, dtype=[]))
    assert vault.load("m").shape == (3,)


@pytest.mark.parametrize("name", [
    ".", "a/../b", "/etc/passwd", "a\\b", "", "x/D:/Windows/Temp/evil.dll", "D:evil.txt",
    "C:", "model.bin:stream", "NUL.txt", "x/com1", "trailing.", "trailing ", "a//b",
    "x" * 256, "a/" * 70 + "b", "tab\there", 'q"uote', "star*"])
def test_extract_refuses_file_names_unsafe_on_any_system(name):
    from modelvault._files import safe_relative_path

    with pytest.raises(ValueError):
        safe_relative_path(name)


@pytest.mark.parametrize("names", [
    ["a", "a/b"],                          # a file where a folder must be: FileExistsError
    ["Model.bin", "model.bin"],            # one file on macOS and Windows
    ["ok.bin", "x/D:/Windows/Temp/evil.dll"],
    ["ok.bin", "D:evil.txt"],
    ["ok.bin", "n" * 300],                 # OSError: name too long, after a partial write
    ["caf\u00e9.bin", "cafe\u0301.bin"],    # one name on macOS (NFC and NFD)
    ["\u00c5/x", "A\u030a"],                # a file where a folder must be, on macOS
    ["ab", "a\u200cb"],                      # HFS+ ignores the joiner
])
def test_a_forged_files_version_extracts_nothing(vault, vault_path, tmp_path, names):
    """Hostile case: a files version whose names were rewritten in the file (digest
    recomputed, signature then invalid, so ``trust=True`` as a user might pass)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for i, _ in enumerate(names):
        (folder / f"f{i}").write_bytes(b"bytes %d" % i)
    vault.save_files("m", folder)
    with sqlite3.connect(vault_path) as db:
        vid = version_id(db, "m")
        for i, name in enumerate(names):
            db.execute("UPDATE parts SET name = ? WHERE version_id = ? AND name = ?",
                       (name, vid, f"f{i}"))
        redigest(db, vid)
    db.close()
    out = tmp_path / "out"
    outside = set(tmp_path.rglob("*"))
    with pytest.raises(modelvault.IntegrityError, match="file name"):
        vault.extract("m", out, trust=True)
    assert set(tmp_path.rglob("*")) == outside  # not even the out folder
    assert vault.load("m", trust=True).keys() == set(names)  # as bytes, by name: harmless


def test_names_one_system_would_overwrite_are_refused_at_save(vault, tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.bin").write_bytes(b"1")
    (folder / "Sub").mkdir()
    (folder / "Sub" / "w.bin").write_bytes(b"2")
    with pytest.raises(ValueError, match="case and Unicode normalization do not count"):
        vault.save_files("m", folder)


def test_cli_meta_keeps_text_that_json_would_change(run, tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    vault = tmp_path / "v.vault"
    assert run("put", vault, "m", f, "--meta", "version=1.10", "--meta", "sha=1e5",
               "--meta", "dim=384", "--meta", "auc=0.91", "--meta", "ok=true").exit_code == 0
    metadata = json.loads(run("show", vault, "m", "--json").output)["metadata"]
    assert metadata == {"version": "1.10", "sha": "1e5", "dim": 384, "auc": 0.91, "ok": True}


def test_reading_creates_no_key(tmp_path, monkeypatch):
    path = tmp_path / "v.vault"
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "saver"))
    modelvault.save(path, "m", [1])
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "reader"))
    assert modelvault.load(path, "m") == [1]
    with modelvault.open(path) as vault:
        assert vault.verify() == [] and vault.get("m").signature == "untrusted"
    assert not (tmp_path / "reader").exists()


def test_a_trigger_named_like_sqlites_own_objects_is_refused(vault_path):
    modelvault.open(vault_path).close()
    with sqlite3.connect(vault_path) as db:
        db.execute("CREATE TRIGGER sqliteXevil AFTER INSERT ON tags "
                   "BEGIN UPDATE versions SET description = 'pwned'; END")
    db.close()
    with pytest.raises(modelvault.CorruptVaultError, match="sqliteXevil"):
        modelvault.open(vault_path)


def _die_mid_save(path, home):
    import os

    os.environ["MODELVAULT_HOME"] = home
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA cache_size = 1")  # spill pages so the journal holds real content
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM chunks")
    os._exit(9)  # like kill -9: no rollback, the journal stays behind


def test_an_interrupted_write_is_rolled_back_by_the_next_open(vault_path, run):
    import os

    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.random.default_rng(0).normal(size=300_000)})
    child = multiprocessing.get_context("fork").Process(
        target=_die_mid_save, args=(str(vault_path), os.environ["MODELVAULT_HOME"]))
    child.start()
    child.join(60)
    assert os.path.exists(f"{vault_path}-journal")
    with pytest.raises(modelvault.ReadOnlyError, match="journal"):
        modelvault.open(vault_path, readonly=True).models()
    result = run("verify", vault_path)  # a read command: it rolls the journal back
    assert result.exit_code == 0, result.output
    assert not os.path.exists(f"{vault_path}-journal")
    assert modelvault.load(vault_path, "m")["w"].shape == (300_000,)


def test_file_names_extract_would_refuse_are_refused_at_save(vault, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a\\b.txt").write_text("x")
    with pytest.raises(ValueError, match="unsafe file name"):
        vault.save_files("m", folder)


def test_extract_of_an_object_says_to_use_load(vault, tmp_path):
    vault.save("obj", {"a set": {1}})
    with pytest.raises(ValueError, match="use load"):
        vault.extract("obj", tmp_path / "out")


def _open_and_save(path, home, index, barrier):
    import os

    os.environ["MODELVAULT_HOME"] = home
    barrier.wait()
    with modelvault.open(path) as vault:
        vault.save(f"m{index}", [index])


def test_processes_creating_one_vault_at_once_all_get_it(tmp_path):
    # The vault is built beside its path and linked into place, so no process sees it
    # half made (an empty file would be refused as "not a vault").
    import os

    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = tmp_path / f"new{round_}.vault"
        barrier = context.Barrier(4)
        children = [context.Process(target=_open_and_save, args=(
            str(path), os.environ["MODELVAULT_HOME"], i, barrier)) for i in range(4)]
        for child in children:
            child.start()
        for child in children:
            child.join(120)
        assert [c.exitcode for c in children] == [0] * 4
        with modelvault.open(path) as vault:
            assert [m.name for m in vault.models()] == ["m0", "m1", "m2", "m3"]
        assert sorted(os.listdir(tmp_path)) == sorted(f"new{i}.vault" for i in range(round_ + 1))


def test_a_value_larger_than_we_write_is_refused_not_read(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("m", [1])
    with sqlite3.connect(vault_path) as db:  # 100 MB of metadata: more than saves allow
        db.execute("UPDATE versions SET metadata = '\"' || printf('%.*c', 100000000, 'x') || '\"'")
    db.close()
    with modelvault.open(vault_path) as vault:
        with pytest.raises(modelvault.CorruptVaultError, match="larger than modelvault writes"):
            vault.get("m")
        with pytest.raises(modelvault.CorruptVaultError):
            vault.load("m")


def test_metadata_and_descriptions_have_a_limit(vault):
    limit = 16 * 1024 * 1024  # as the save docstring says
    with pytest.raises(ValueError, match="limit"):
        vault.save("m", [1], metadata={"curve": "x" * limit})
    with pytest.raises(ValueError, match="limit"):
        vault.save("m", [1], description="x" * (limit + 1))
    assert vault.models() == []
    big = vault.save("m", [1], metadata={"curve": "x" * (limit - 20)},
                     description="x" * limit)
    assert big.version == 1 and len(vault.get("m").description) == limit


@pytest.mark.parametrize("operation", ["save", "alias", "tag"])
def test_a_write_reads_the_record_it_returns_before_its_commit(vault_path, monkeypatch,
                                                              operation):
    # Read after the commit, the record could be gone: another process may delete the
    # version in between, and a save that succeeded would raise NotFoundError. Here
    # another process deletes the model as soon as the write has committed, before any
    # further statement of the vault's connection runs.
    opened = vault_connections(monkeypatch)
    with modelvault.open(vault_path) as vault:
        vault.save("m", [1])
        connection = opened[-1]  # the vault's own (the first made the new file)
        state = {"committed": False, "deleted": 0}

        def trace(statement):
            if state["committed"] and not state["deleted"]:
                state["deleted"] = _delete_in_another_process(vault_path)
            state["committed"] = statement.strip().upper() == "COMMIT"

        connection.set_trace_callback(trace)
        record = {"save": lambda: vault.save("m", [2]),
                  "alias": lambda: vault.alias("m:1", "prod"),
                  "tag": lambda: vault.tag("m:1", stage="x")}[operation]()
        connection.set_trace_callback(None)
        assert state["committed"] and not state["deleted"], state
        assert record.name == "m"
        assert _delete_in_another_process(vault_path) == 1 + (operation == "save")


def _delete_in_another_process(path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import modelvault, sys; print(modelvault.open(sys.argv[1])"
         ".delete('m'))", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_scratch_files_of_dead_processes_on_this_host_are_swept(tmp_path, vault):
    import os
    import socket
    import subprocess

    vault.save("m", [1])
    finished = subprocess.Popen(["true"])
    finished.wait()
    pid = finished.pid  # a process that no longer runs
    host = socket.gethostname()
    stale = [tmp_path / f".copy.vault.{host}.{pid}.1.partial",
             tmp_path / f".copy.vault.{host}.{pid}.1.partial-journal",
             tmp_path / f"..copy.vault.{host}.{pid}.1.partial.{host}.{pid}.1.creating",
             tmp_path / f".new.vault.{host}.{pid}.1.creating"]
    kept = [tmp_path / f".copy.vault.other-host.{pid}.1.partial",  # maybe still writing
            tmp_path / f".copy.vault.{host}.{os.getpid()}.1.partial"]  # a live process's
    for path in stale + kept:
        path.write_bytes(b"x")
    vault.export(tmp_path / "copy.vault")
    modelvault.open(tmp_path / "new.vault").close()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_a_damaged_index_never_hands_over_another_model(vault_path):
    # Swap two model names in the table's page only: the index on models.name still
    # says the old thing, and a lookup through it must not act on the other model.
    with modelvault.open(vault_path) as vault:
        vault.save("alpha1", [1])
        vault.save("alpha2", [2])
    with sqlite3.connect(vault_path) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'models'"
                          ).fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = bytearray(vault_path.read_bytes())
    page = slice((root - 1) * size, root * size)
    table = data[page]
    first, second = table.find(b"alpha1"), table.find(b"alpha2")
    table[first + 5], table[second + 5] = ord("2"), ord("1")
    data[page] = table
    vault_path.write_bytes(data)
    with modelvault.open(vault_path) as vault:
        for call in (lambda: vault.get("alpha1"), lambda: vault.load("alpha1:1"),
                     lambda: vault.delete("alpha1")):
            with pytest.raises(modelvault.CorruptVaultError, match="index"):
                call()
        assert sorted(m.name for m in vault.models()) == ["alpha1", "alpha2"]
        assert any("integrity_check" in p.message for p in vault.verify())


@pytest.mark.parametrize("value,read", [("'abc'", "abc"), ("9223372036854775807", 2**63 - 1),
                                        ("-1", -1)])
def test_a_damaged_last_version_stops_saves_with_a_vault_error(vault_path, value, read):
    with modelvault.open(vault_path) as vault:
        vault.save("m", [1])
    with sqlite3.connect(vault_path) as db:
        db.execute(f"UPDATE models SET last_version = {value}")
    db.close()
    with modelvault.open(vault_path) as vault:
        with pytest.raises(modelvault.CorruptVaultError, match="last_version"):
            vault.save("m", [2])
        assert vault.load("m") == [1]
        assert (f"last_version {read!r} is not a number modelvault gives out: the next save "
                "would fail") in [p.message for p in vault.verify()]
