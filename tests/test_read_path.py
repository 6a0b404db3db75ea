"""How loads read chunks: worker threads slice numeric chunks out of their packs through
connections of their own, and anything that goes wrong there is read again through the
vault's own connection, whose answer counts. And the uncompressed choice for saves."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import numpy as np
import pytest

import modelvault
from modelvault import IntegrityError
from modelvault._connection import Connection


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((700, 800)).astype(np.float32),  # 2.1 MB: 3 chunks
            "b": rng.standard_normal(5000).astype(np.float64),
            "c": rng.integers(0, 9, 3000, dtype=np.int16)}


def _equal(loaded: dict[str, np.ndarray], model: dict[str, np.ndarray]) -> bool:
    return loaded.keys() == model.keys() and all(
        loaded[k].dtype == model[k].dtype and np.array_equal(loaded[k], model[k])
        for k in model)


@pytest.fixture
def sliced(monkeypatch):
    """Every call of Connection.read_slice, with the thread that made it and whether it
    failed; ``swap`` replaces what the calls return."""
    calls: list[tuple[str, int, bool]] = []
    real = Connection.read_slice
    state: dict[str, object] = {"swap": None}

    def spy(self, pack_id, start, length):
        found = real(self, pack_id, start, length)
        calls.append((threading.current_thread().name, pack_id, isinstance(found, str)))
        swap = state["swap"]
        return found if swap is None else swap(found)

    monkeypatch.setattr(Connection, "read_slice", spy)
    return calls, state


def test_numeric_chunks_are_sliced_out_of_their_packs_on_the_worker_threads(
        vault_path, sliced):
    calls, _ = sliced
    model = _weights()
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        calls.clear()
        assert _equal(vault.load("m"), model)
        chunks = sqlite3.connect(vault_path).execute(
            "SELECT count(*) FROM chunks c JOIN packs p ON p.id = c.pack_id "
            "WHERE p.codec = 'raw'").fetchone()[0]
    assert len(calls) == chunks > 3
    assert all(name.startswith("modelvault") and not failed for name, _, failed in calls)


@pytest.mark.parametrize("swap", [
    lambda data: "a worker could not read it",
    lambda data: bytes(len(data)) if isinstance(data, bytes) else data,  # wrong bytes
    lambda data: data[:-1] if isinstance(data, bytes) else data,  # short
])
def test_a_slice_that_fails_is_read_again_through_the_vaults_connection(
        vault_path, sliced, swap):
    _, state = sliced
    model = _weights()
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        state["swap"] = swap
        assert _equal(vault.load("m"), model)
        assert _equal(vault.load("m", keys="a"), {"a": model["a"]})
        assert vault.verify() == []


def test_damage_found_both_ways_is_reported_as_the_chunk_of_its_version(vault_path, sliced):
    calls, _ = sliced
    with modelvault.open(vault_path) as vault:
        vault.save("m", _weights())
    with sqlite3.connect(vault_path) as db:  # one byte of a numeric chunk flipped
        pack_id, start = db.execute(
            "SELECT c.pack_id, c.start FROM chunks c JOIN packs p ON p.id = c.pack_id "
            "WHERE p.codec = 'raw' ORDER BY c.id LIMIT 1").fetchone()
        data = bytearray(db.execute("SELECT data FROM packs WHERE id = ?",
                                    (pack_id,)).fetchone()[0])
        data[start + 100] ^= 0xFF
        db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(data), pack_id))
    with modelvault.open(vault_path) as vault, \
            pytest.raises(IntegrityError, match=r"m:1: chunk [0-9a-f]{64} "):
        vault.load("m")
    assert calls


@pytest.mark.parametrize("sql", [
    # a chunk said to lie past its raw pack's end
    "UPDATE chunks SET start = start + 100000000 WHERE id = (SELECT min(id) FROM chunks)",
    "UPDATE chunks SET length = 2000000 WHERE id = (SELECT min(id) FROM chunks)",
    # a raw pack whose declared size is not what it holds: never sliced
    "UPDATE packs SET size = size + 1 WHERE id = (SELECT min(id) FROM packs)",
    # a pack that is not a blob
    "UPDATE packs SET data = 'text' WHERE id = (SELECT min(id) FROM packs)",
    # a chunk in a pack that does not exist
    "UPDATE chunks SET pack_id = 99999 WHERE id = (SELECT min(id) FROM chunks)",
    "UPDATE chunks SET pack_id = -1 WHERE id = (SELECT min(id) FROM chunks)",
])
def test_hostile_chunk_and_pack_rows_are_integrity_errors(vault_path, sql):
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"a": _weights()["a"]})
    with sqlite3.connect(vault_path) as db:
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute(sql)
    with modelvault.open(vault_path) as vault:
        with pytest.raises(IntegrityError):
            vault.load("m")
        with pytest.raises(IntegrityError):
            vault.load("m", keys="a")
        assert vault.verify()


def test_a_load_while_another_connection_writes_reads_what_is_committed(vault_path):
    model = _weights()
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        other = sqlite3.connect(vault_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a writer in the middle of its transaction
        # A small change: a big one spills to the file under an exclusive lock, which
        # keeps every reader out (SQLite's rule, not ours).
        other.execute("UPDATE packs SET codec = codec WHERE id = (SELECT min(id) FROM packs)")
        try:
            assert _equal(vault.load("m"), model)
        finally:
            other.execute("ROLLBACK")
            other.close()


def test_a_writer_waiting_to_commit_does_not_stall_a_load(vault_path, sliced):
    """A writer that waits for our read lock to commit holds off new readers (SQLite's
    PENDING lock): the workers' reads then fail at once and go through our connection."""
    calls, _ = sliced
    model = _weights()
    with modelvault.open(vault_path, timeout=30) as vault:
        vault.save("m", model)
        calls.clear()
        other = sqlite3.connect(vault_path, isolation_level=None, timeout=3,
                                check_same_thread=False)
        committed = threading.Event()
        with vault._connection.read() as db:  # our read lock, held through the load
            db.execute("SELECT count(*) FROM versions").fetchone()
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE models SET name = name")

            def commit() -> None:
                try:
                    other.execute("COMMIT")  # waits for our read lock
                except sqlite3.OperationalError:
                    other.execute("ROLLBACK")
                committed.set()

            thread = threading.Thread(target=commit)
            thread.start()
            time.sleep(0.2)  # the writer now holds PENDING
            assert _equal(vault.load("m"), model)
        thread.join()
        other.close()
        assert committed.is_set()
    assert calls and all(failed for _, _, failed in calls)


def test_a_wal_vault_loads_through_slices(vault_path, sliced):
    calls, _ = sliced
    model = _weights()
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
    with sqlite3.connect(vault_path) as db:
        assert db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    with modelvault.open(vault_path) as vault:
        calls.clear()
        assert _equal(vault.load("m"), model)
        vault.save("m", {k: v + 1 for k, v in model.items()})
        assert _equal(vault.load("m:2"), {k: v + 1 for k, v in model.items()})
    assert calls


def test_a_read_only_vault_in_a_read_only_folder_loads_through_slices(tmp_path, sliced):
    if os.geteuid() == 0:
        pytest.skip("root reads and writes whatever the permission bits say")
    calls, _ = sliced
    folder = tmp_path / "ro"
    folder.mkdir()
    model = _weights()
    with modelvault.open(folder / "m.vault") as vault:
        vault.save("m", model)
    folder.chmod(0o555)
    try:
        with modelvault.open(folder / "m.vault", readonly=True) as vault:
            assert _equal(vault.load("m"), model)
    finally:
        folder.chmod(0o755)
    assert calls


def test_a_child_process_after_fork_opens_its_own_worker_connections(vault_path):
    model = _weights()
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        assert _equal(vault.load("m"), model)  # the parent's workers have connections
        pid = os.fork()
        if pid == 0:  # the child: a load, then out without any cleanup of the parent's
            ok = False
            try:
                ok = _equal(vault.load("m"), model)
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _equal(vault.load("m"), model)


def test_closing_the_vault_closes_the_worker_connections(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("m", _weights())
        vault.load("m")
        slicers = list(vault._connection._slicers.values())
        assert slicers
    for slicer in slicers:
        with pytest.raises(sqlite3.ProgrammingError):
            slicer.execute("SELECT 1")


# -- the uncompressed choice -----------------------------------------------------------


def test_an_uncompressed_save_stores_chunks_as_they_are_and_loads_the_same(vault_path):
    model = _weights()
    with modelvault.open(vault_path) as vault:
        mv = vault.save("m", model, compress=False)
        assert _equal(vault.load("m"), model)
        assert _equal(vault.load("m", keys="a"), {"a": model["a"]})
        assert vault.verify() == []
    raw = sum(a.nbytes for a in model.values())
    assert mv.added_bytes >= raw
    db = sqlite3.connect(vault_path)
    assert {r[0] for r in db.execute("SELECT DISTINCT codec FROM chunks")} == {"raw"}
    assert {r[0] for r in db.execute("SELECT DISTINCT codec FROM packs")} == {"raw"}


def test_an_uncompressed_fine_tune_is_stored_whole_not_as_a_delta(vault_path):
    model = _weights()
    tuned = {k: (v + np.asarray(1e-4, v.dtype)) if v.dtype.kind == "f" else v
             for k, v in model.items()}
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        vault.save("m", tuned, compress=False)
        assert _equal(vault.load("m:2"), tuned)
    db = sqlite3.connect(vault_path)
    assert db.execute("SELECT count(*) FROM chunks WHERE base_id IS NOT NULL").fetchone() \
        == (0,)


def test_chunks_the_vault_holds_stay_as_they_are_stored(vault_path):
    model = _weights()
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        again = vault.save("m", model, compress=False)
        assert again.added_bytes == 0
        raw = vault.save("n", _weights(1), compress=False)
        assert vault.save("n", _weights(1)).added_bytes == 0
        assert raw.added_bytes > 0


def test_uncompressed_pickles_and_files(vault_path, tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"abc" * 300_000)
    obj = {"s": {1, 2, 3}, "text": "xyz" * 200_000}
    with modelvault.open(vault_path) as vault:
        files = vault.save_files("f", blob, compress=False)
        pickled = vault.save("p", obj, compress=False)
        assert vault.load("f")["weights.bin"] == blob.read_bytes()
        assert vault.load("p", trust=True) == obj
    assert files.added_bytes >= 900_000 and pickled.added_bytes >= 600_000


def test_put_no_compress_stores_files_as_they_are(vault_path, tmp_path):
    from click.testing import CliRunner

    from modelvault._cli import cli

    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"abc" * 300_000)
    result = CliRunner().invoke(cli, ["put", str(vault_path), "f", str(blob), "--no-compress"])
    assert result.exit_code == 0, result.output
    with modelvault.open(vault_path) as vault:
        assert vault.get("f").added_bytes >= 900_000
        assert vault.load("f")["weights.bin"] == blob.read_bytes()


def test_a_raw_pack_declaring_more_than_readers_accept_is_refused_not_sliced(vault_path):
    """docs/format.md: a reader refuses a pack whose size is above 8 MiB before it reads it.
    A worker's slice must not accept what a read of the whole pack refuses (nor read a
    chunk row's length, up to 4 bytes per item of its itemsize, out of such a pack)."""
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"a": _weights()["a"]})
    with sqlite3.connect(vault_path) as db:
        pack_id, data = db.execute("SELECT id, data FROM packs WHERE codec = 'raw' "
                                   "ORDER BY id LIMIT 1").fetchone()
        big = data + bytes(9 * 1024 * 1024)
        db.execute("UPDATE packs SET data = ?, size = ? WHERE id = ?", (big, len(big), pack_id))
    with modelvault.open(vault_path) as vault:
        with pytest.raises(IntegrityError, match="malformed"):
            vault.load("m")
        with pytest.raises(IntegrityError, match="malformed"):
            vault.load("m", keys="a")


def test_worker_connections_open_the_vault_opened_not_one_the_working_folder_now_names(
        tmp_path, monkeypatch, sliced):
    calls, _ = sliced
    model = _weights()
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with modelvault.open("m.vault") as vault:
        vault.save("m", model)
        monkeypatch.chdir(tmp_path / "there")  # where another vault of that name lies
        with modelvault.open("m.vault") as other:
            other.save("m", _weights(1))
        calls.clear()
        assert _equal(vault.load("m"), model)
        opened = {slicer.execute("PRAGMA database_list").fetchone()[2]
                  for slicer in vault._connection._slicers.values()}
    assert calls and opened == {str(tmp_path / "here" / "m.vault")}
