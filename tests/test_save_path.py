"""How saves write chunks: a pipeline over batches that run across a model's arrays,
repeats within one save stored once, solid packs still one part's own, and the early
sync of what SQLite has written, which must leave SQLite's locks alone."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import modelvault
from modelvault import _chunks, _packs, _schema


def _small_arrays(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.bias": rng.standard_normal(256).astype(np.float32) for i in range(count)}


def _equal(loaded: dict[str, np.ndarray], model: dict[str, np.ndarray]) -> bool:
    return loaded.keys() == model.keys() and all(
        loaded[k].dtype == model[k].dtype and np.array_equal(loaded[k], model[k])
        for k in model)


def test_a_models_small_arrays_share_packs(vault_path):
    model = _small_arrays(200)  # 1 KiB each: one pack, not 200 rows of a few hundred bytes
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        assert _equal(vault.load("m"), model)
        assert _equal(vault.load("m", keys="layer7.bias"), {"layer7.bias": model["layer7.bias"]})
        assert vault.verify() == []
    with sqlite3.connect(vault_path) as db:
        assert db.execute("SELECT count(*) FROM packs").fetchone() == (1,)
        assert db.execute("SELECT count(DISTINCT pack_id) FROM chunks").fetchone() == (1,)


def test_array_packs_across_parts_stay_within_the_pack_size(vault_path):
    rng = np.random.default_rng(1)
    # Incompressible bytes in pieces that do not divide 1 MiB: packs fill up across parts.
    model = {f"t{i}": rng.integers(0, 256, 300_000 + 1000 * i, dtype=np.uint8)
             for i in range(12)}
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        assert _equal(vault.load("m"), model)
    with sqlite3.connect(vault_path) as db:
        sizes = [r[0] for r in db.execute("SELECT length(data) FROM packs")]
        assert max(sizes) <= _chunks.PACK_SIZE
        assert len(sizes) < len(model)


def test_repeats_within_one_save_are_stored_once(vault_path):
    rng = np.random.default_rng(2)
    big = rng.standard_normal(700_000).astype(np.float32)  # 2.8 MB: 3 chunks
    small = rng.standard_normal(100).astype(np.float32)
    # More than one write batch of the same chunks, and repeats inside a batch.
    model = {**{f"big{i}": big for i in range(8)}, **{f"small{i}": small for i in range(50)}}
    with modelvault.open(vault_path) as vault:
        vault.save("m", model)
        assert _equal(vault.load("m"), model)
        assert vault.verify() == []
    with sqlite3.connect(vault_path) as db:
        assert db.execute("SELECT count(*) FROM chunks").fetchone() == (4,)


def test_a_solid_pack_holds_one_parts_chunks(vault_path, tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(rng.integers(0, 4, 300_000, dtype=np.uint8).tobytes())
        paths.append(path)
    with modelvault.open(vault_path) as vault:
        vault.save_files("f", paths)
        loaded = vault.load("f")
        assert all(loaded[p.name] == p.read_bytes() for p in paths)
    with sqlite3.connect(vault_path) as db:
        assert db.execute(
            "SELECT max(parts) FROM (SELECT count(DISTINCT pc.part) AS parts FROM part_chunks pc "
            "JOIN chunks c ON c.id = pc.chunk_id GROUP BY c.pack_id)").fetchone() == (1,)


def test_a_save_that_fails_while_encoding_adds_nothing(vault_path, monkeypatch):
    model = {**_small_arrays(30), "w": np.arange(1_000_000, dtype=np.float32)}
    real = _packs._encode
    calls = []

    def failing(task):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room to encode")
        return real(task)

    with modelvault.open(vault_path) as vault:
        vault.save("first", _small_arrays(3, seed=9))
        monkeypatch.setattr(_packs, "_encode", failing)
        with pytest.raises(MemoryError):
            vault.save("m", model)
        monkeypatch.setattr(_packs, "_encode", real)
        assert [m.name for m in vault.models()] == ["first"]
        vault.save("m", model)  # the pool and the connection are fine
        assert _equal(vault.load("m"), model)
        assert vault.verify() == []


def test_after_the_move_to_big_pages_sqlite_caches_no_more_bytes_than_before(vault_path):
    """SQLite keeps its cache's number of pages when VACUUM changes their size: 8 MiB of
    small pages would become 32 MiB of big ones, each held (dirty) until the commit."""
    mib = 1024 * 1024
    with modelvault.open(vault_path) as vault:
        connection = vault._connection
        connection.make_room(_schema.GROW_AT + 1)
        assert connection.db.execute("PRAGMA page_size").fetchone() == (_schema.PAGE_SIZE,)
        with pytest.raises(KeyboardInterrupt), connection.write() as db:  # rolled back
            size = vault_path.stat().st_size
            for _ in range(16):
                db.execute("INSERT INTO packs (codec, size, data) VALUES ('raw', ?, "
                           "randomblob(?))", (mib, mib))
            # All but the cache's worth is out of the cache, in the file.
            assert vault_path.stat().st_size - size >= 15 * mib - _schema.CACHE_KIB * 1024
            raise KeyboardInterrupt
        assert vault.models() == []


_TAKE_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    db.execute("BEGIN IMMEDIATE")
except sqlite3.OperationalError:
    sys.exit(3)
sys.exit(0)
"""


def test_syncing_ahead_keeps_sqlites_locks(vault_path):
    """The early sync uses SQLite's own descriptor: one of ours, once closed, would drop
    the process's locks on the file and let another writer in mid-transaction."""
    with modelvault.open(vault_path) as vault:
        vault.save("m", _small_arrays(3))
        connection = vault._connection
        with connection.write():
            connection.db.execute("UPDATE models SET name = name")
            connection.sync_ahead()
            if sys.platform == "linux":
                assert connection._syncer is not None
                connection._syncer.stop()  # after its sync
            taken = subprocess.run([sys.executable, "-c", _TAKE_WRITE_LOCK, str(vault_path)],
                                   check=False).returncode
            assert taken == 3
        assert connection._syncer is None  # its thread ends with the write
        assert subprocess.run([sys.executable, "-c", _TAKE_WRITE_LOCK, str(vault_path)],
                              check=False).returncode == 0
        assert _equal(vault.load("m"), _small_arrays(3))


def test_a_save_batch_stays_under_old_sqlites_variable_limit(vault_path):
    """SQLite before 3.32 (Ubuntu 20.04's 3.31, for one) binds at most 999 variables in a
    statement; a save batch holds up to 1024 new chunks, looked up by hash."""
    model = _small_arrays(1100)
    with modelvault.open(vault_path) as vault:
        vault._connection.db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        vault.save("m", model)
        assert _equal(vault.load("m"), model)
        # Fine-tunes: each chunk a delta of its parent's, which is a delta in turn (the
        # bases of a batch's bases are looked up by id).
        for step in (1, 2):
            model = {k: v.copy() for k, v in model.items()}
            for v in model.values():
                v[step] += 1
            vault.save("m", model)
        assert _equal(vault.load("m"), model)
    with sqlite3.connect(vault_path) as db:
        assert db.execute("SELECT count(*) FROM chunks WHERE base_id IN "
                          "(SELECT id FROM chunks WHERE base_id IS NOT NULL)").fetchone()[0] > 999
