"""Delta chunks: a changed array stored as its XOR with the parent version's array."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import modelvault
from modelvault import IntegrityError, NotFoundError
from modelvault._packs import DELTA_DEPTH


def weights(seed, n=4, shape=(512, 1024)):
    rng = np.random.default_rng(seed)
    return {f"layer{i}": rng.standard_normal(shape, dtype=np.float32) * 0.02 for i in range(n)}


def fine_tuned(model, seed, scale=2e-6):
    rng = np.random.default_rng(seed)
    return {k: w + rng.standard_normal(w.shape, dtype=np.float32) * scale
            for k, w in model.items()}


def chunk_rows(path, name, version):
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT c.id, c.base_id FROM part_chunks pc JOIN chunks c ON c.id = pc.chunk_id "
            "JOIN versions v ON v.id = pc.version_id JOIN models m ON m.id = v.model_id "
            "WHERE m.name = ? AND v.version = ?", (name, version)).fetchall()


def chain_lengths(path):
    with sqlite3.connect(path) as db:
        bases = dict(db.execute("SELECT id, base_id FROM chunks"))
    lengths = []
    for chunk in bases:
        length = 0
        while bases[chunk] is not None:
            chunk, length = bases[chunk], length + 1
        lengths.append(length)
    return lengths


def assert_same(loaded, expected):
    assert loaded.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(loaded[key], expected[key])


def standalone_bytes(tmp_path, model):
    with modelvault.open(tmp_path / "alone.vault") as other:
        return other.save("m", model).added_bytes


def test_a_fine_tune_is_stored_as_deltas_and_loads_exactly(vault, tmp_path):
    base = weights(0)
    tuned = fine_tuned(base, 1)
    vault.save("m", base)
    second = vault.save("m", tuned)
    assert all(b is not None for _, b in chunk_rows(vault.path, "m", 2))
    assert second.added_bytes < 0.75 * standalone_bytes(tmp_path, tuned)
    assert_same(vault.load("m:2"), tuned)
    assert_same(vault.load("m:1"), base)
    assert vault.verify() == []


def test_a_few_changed_rows_cost_a_few_kilobytes(vault):
    base = weights(0, n=1, shape=(4096, 768))  # 12 MiB: 12 chunks
    vault.save("emb", base)
    edited = {"layer0": base["layer0"].copy()}
    rows = np.random.default_rng(2).choice(4096, 16, replace=False)
    edited["layer0"][rows] = np.random.default_rng(3).standard_normal((16, 768)) * 0.02
    second = vault.save("emb", edited)
    assert second.added_bytes < 16 * 768 * 4 * 1.5
    assert_same(vault.load("emb"), edited)


def test_parent_false_stores_whole_chunks(vault, tmp_path):
    base = weights(0)
    tuned = fine_tuned(base, 1)
    vault.save("m", base)
    second = vault.save("m", tuned, parent=False)
    assert all(b is None for _, b in chunk_rows(vault.path, "m", 2))
    assert second.added_bytes == standalone_bytes(tmp_path, tuned)


def test_parent_can_be_another_model(vault):
    base = weights(0)
    vault.save("bert-base", base)
    tuned = fine_tuned(base, 1)
    vault.save("bert-sentiment", tuned, parent="bert-base:1")
    assert all(b is not None for _, b in chunk_rows(vault.path, "bert-sentiment", 1))
    assert_same(vault.load("bert-sentiment"), tuned)
    with pytest.raises(NotFoundError):
        vault.save("other", tuned, parent="nothing-here")


def test_only_arrays_at_the_same_place_with_the_same_shape_and_dtype_are_deltas(vault):
    base = weights(0, n=2)
    vault.save("m", base)
    renamed = {"other": base["layer0"] + 1e-6, "layer1": (base["layer1"] + 1e-6).reshape(-1)}
    vault.save("m", renamed)
    assert all(b is None for _, b in chunk_rows(vault.path, "m", 2))
    assert_same(vault.load("m"), renamed)


def test_a_random_array_is_not_stored_as_a_delta(vault):
    vault.save("m", weights(0))
    vault.save("m", weights(1))  # unrelated values: the XOR is no smaller
    assert all(b is None for _, b in chunk_rows(vault.path, "m", 2))


def test_chains_stay_short_and_every_version_loads(vault):
    versions = [weights(0, n=1)]
    for seed in range(1, 2 * DELTA_DEPTH + 3):
        versions.append(fine_tuned(versions[-1], seed))
    for model in versions:
        vault.save("m", model)
    lengths = chain_lengths(vault.path)
    assert max(lengths) == DELTA_DEPTH
    for number, model in enumerate(versions, 1):
        assert_same(vault.load(f"m:{number}"), model)
    assert vault.verify() == []


def test_gc_keeps_bases_of_live_deltas(vault):
    base = weights(0)
    tuned = fine_tuned(base, 1)
    vault.save("m", base)
    vault.save("m", tuned)
    vault.delete("m:1")
    vault.gc()
    assert_same(vault.load("m"), tuned)
    assert vault.verify() == []
    vault.delete("m")
    vault.gc()
    with sqlite3.connect(vault.path) as db:
        assert db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM packs").fetchone()[0] == 0


def test_pickle_buffers_get_deltas_too(vault):
    big = np.random.default_rng(0).standard_normal(600_000).astype(np.float32) * 0.02
    vault.save("obj", {"labels": {"a", "b"}, "w": big})  # a set: pickled; w leaves the stream
    tuned = big + np.random.default_rng(1).standard_normal(big.shape, dtype=np.float32) * 2e-6
    vault.save("obj", {"labels": {"a", "b"}, "w": tuned})
    assert any(b is not None for _, b in chunk_rows(vault.path, "obj", 2))
    np.testing.assert_array_equal(vault.load("obj")["w"], tuned)


def test_a_damaged_base_fails_the_delta_that_needs_it(vault, flip_chunk_byte):
    base = weights(0, n=1)
    tuned = fine_tuned(base, 1)
    vault.save("m", base)
    vault.save("m", tuned)
    base_id = next(b for _, b in chunk_rows(vault.path, "m", 2) if b is not None)
    with sqlite3.connect(vault.path) as db:
        flip_chunk_byte(db, base_id)
    with pytest.raises(IntegrityError) as info:
        vault.load("m:2")
    assert (info.value.model, info.value.version) == ("m", 2)
    assert {p.version for p in vault.verify()} == {1, 2}
    # A damaged parent costs the next save its deltas, not the save itself.
    again = fine_tuned(tuned, 2)
    vault.save("m", again, parent="m:1")
    assert_same(vault.load("m:3"), again)


def test_gc_repacks_mostly_dead_packs(vault):
    rng = np.random.default_rng(0)
    # Small incompressible arrays share packs; deleting most of them leaves holes.
    for i in range(40):
        vault.save(f"m{i}", rng.integers(0, 256, 100_000, dtype=np.uint8))
    for i in range(40):
        if i % 4:
            vault.delete(f"m{i}")
    before = vault.stats().file_bytes
    freed = vault.gc()
    assert freed > 0 and vault.stats().file_bytes < before
    with sqlite3.connect(vault.path) as db:
        dead = db.execute(
            "SELECT sum(length(p.data)) - (SELECT sum(length) FROM chunks) FROM packs p"
        ).fetchone()[0]
    assert dead == 0
    assert vault.verify() == []
    rng = np.random.default_rng(0)
    for i in range(40):
        expected = rng.integers(0, 256, 100_000, dtype=np.uint8)
        if i % 4 == 0:
            np.testing.assert_array_equal(vault.load(f"m{i}"), expected)


def test_gc_repacks_solid_packs_of_streams(vault, tmp_path):
    rng = np.random.default_rng(4)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    first = " ".join(rng.choice(words, 300_000)).encode()  # ~1.8 MB: one solid pack
    second = first[: len(first) // 2] + " ".join(rng.choice(words, 150_000)).encode()
    for i, text in enumerate((first, second)):
        (tmp_path / "vocab.txt").write_bytes(text)
        vault.save_files("tok", tmp_path / "vocab.txt", description=str(i))
    vault.delete("tok:1")
    assert vault.gc() > 0
    with sqlite3.connect(vault.path) as db:
        for size, live in db.execute("SELECT p.size, sum(c.length) FROM packs p "
                                     "JOIN chunks c ON c.pack_id = p.id GROUP BY p.id"):
            assert live == size  # nothing dead is left in any pack
        assert db.execute("SELECT count(*) FROM packs WHERE codec = 'zstd'").fetchone()[0]
    assert vault.verify() == []
    assert vault.load("tok")["vocab.txt"] == second


def test_a_damaged_solid_pack_fails_every_chunk_in_it(vault, flip_chunk_byte):
    vault.save("obj", {"labels": {"a", "b"}, "text": "x" * 500_000})
    with sqlite3.connect(vault.path) as db:
        (chunk_id,) = db.execute("SELECT c.id FROM chunks c JOIN packs p ON p.id = c.pack_id "
                                 "WHERE p.codec = 'zstd' LIMIT 1").fetchone()
        flip_chunk_byte(db, chunk_id)
    with pytest.raises(IntegrityError) as info:
        vault.load("obj", trust=True)
    assert (info.value.model, info.value.version) == ("obj", 1)
    problems = vault.verify()
    assert problems and all(p.model == "obj" for p in problems)


def test_a_parent_that_repeats_a_chunk_gives_right_deltas(vault):
    # Tiled or tied weights name one parent chunk many times; it must be decoded once,
    # not by several threads into one buffer.
    rng = np.random.default_rng(5)
    block = rng.standard_normal(1024 * 1024 // 4, dtype=np.float32) * 0.02  # one chunk
    vault.save("m", {"w": np.tile(block, 16)})
    tuned = block + rng.standard_normal(block.shape, dtype=np.float32) * 1e-6
    vault.save("m", {"w": np.tile(tuned, 16)})  # its one chunk is a delta of block's
    saved = []
    for i in range(6):
        weights = np.tile(tuned, 16)
        weights[rng.choice(weights.size, 50, replace=False)] += 1e-3 * (i + 1)
        saved.append(weights)
        vault.save("m", {"w": weights}, parent="m:2")
    for number, weights in enumerate(saved, 3):
        np.testing.assert_array_equal(vault.load(f"m:{number}")["w"], weights)
    assert vault.verify() == []
