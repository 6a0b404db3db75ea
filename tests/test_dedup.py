"""Equal bytes are stored once: re-saves, small edits and shared arrays cost little."""

from __future__ import annotations

import os

import numpy as np
import pytest

import modelvault
from modelvault._chunks import ARRAY_CHUNK

CHUNK = ARRAY_CHUNK
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def forest_data():
    from sklearn.datasets import make_classification

    return make_classification(n_samples=6000, n_features=20, n_informative=10,
                               random_state=0)


def _arrays(seed=0, count=6):
    rng = np.random.default_rng(seed)
    return {f"layer{i}": rng.standard_normal(MIB // 8) * (i + 1) for i in range(count)}


def _standalone_stored_bytes(tmp_path, value, name="alone"):
    """What ``value`` costs in a vault of its own."""
    path = tmp_path / f"{name}.vault"
    with modelvault.open(path) as other:
        return other.save("x", value).added_bytes


def _resave_growth(path, name, obj):
    """(first save, second save, file bytes the identical second save added)."""
    with modelvault.open(path) as vault:
        first = vault.save(name, obj)
    before = os.path.getsize(path)
    with modelvault.open(path) as vault:
        second = vault.save(name, obj)
        assert vault.verify() == []
    after = os.path.getsize(path)
    return first, second, after - before


def test_identical_arrays_resave_adds_no_chunk_bytes(vault_path):
    model = _arrays()
    first, second, growth = _resave_growth(vault_path, "arrays", model)
    assert first.added_bytes > 0.5 * first.size  # random floats barely compress
    assert second.added_bytes == 0
    assert second.digest == first.digest
    assert growth < 0.01 * first.size
    with modelvault.open(vault_path) as vault:
        assert vault.stats().dedup_ratio == pytest.approx(2.0)
        loaded = vault.load("arrays:1")
        for key, arr in model.items():
            np.testing.assert_array_equal(loaded[key], arr)


def test_identical_forest_resave_adds_no_chunk_bytes(vault_path, forest_data):
    from sklearn.ensemble import RandomForestClassifier

    X, y = forest_data
    forest = RandomForestClassifier(n_estimators=40, random_state=0).fit(X, y)
    first, second, growth = _resave_growth(vault_path, "forest", forest)
    assert first.kind == "pickle"
    assert first.size > MIB  # big enough for 1 % to be above per-version bookkeeping
    assert second.added_bytes == 0
    assert second.digest == first.digest
    assert growth < 0.01 * first.size
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("forest:2")
        np.testing.assert_array_equal(loaded.predict(X), forest.predict(X))


def test_changing_one_array_adds_about_that_array_only(vault, tmp_path):
    model = _arrays(count=6)
    first = vault.save("m", model)
    changed = dict(model)
    changed["layer3"] = np.random.default_rng(99).standard_normal(MIB // 8)
    alone = _standalone_stored_bytes(tmp_path, changed["layer3"])

    second = vault.save("m", changed)
    assert second.added_bytes <= alone * 1.05 + 4096
    assert second.added_bytes >= alone * 0.95  # the new array really was stored
    assert second.added_bytes < first.added_bytes / 4
    loaded = vault.load("m:2")
    np.testing.assert_array_equal(loaded["layer3"], changed["layer3"])
    np.testing.assert_array_equal(loaded["layer0"], model["layer0"])
    np.testing.assert_array_equal(vault.load("m:1")["layer3"], model["layer3"])
    assert vault.verify() == []


def test_changing_a_few_rows_adds_at_most_their_chunks(vault):
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((2048, 512)).astype(np.float32)  # 4 MiB, 2 KiB rows
    first = vault.save("emb", {"weights": weights, "bias": np.zeros(512, np.float32)})
    rows = rng.choice(weights.shape[0], size=16, replace=False)
    edited = weights.copy()
    edited[rows] += 1.0
    second = vault.save("emb", {"weights": edited, "bias": np.zeros(512, np.float32)})
    # Each changed chunk is stored as its XOR with the parent's: zeros but for the rows.
    assert second.added_bytes <= 16 * 2048
    assert 0 < second.added_bytes < first.added_bytes / 4
    np.testing.assert_array_equal(vault.load("emb:2")["weights"], edited)
    np.testing.assert_array_equal(vault.load("emb:1")["weights"], weights)


def test_neighbouring_rows_share_a_chunk(vault):
    weights = np.random.default_rng(2).standard_normal((1024, 256)).astype(np.float32)
    vault.save("m", weights)
    edited = weights.copy()
    edited[64:80] = 0  # 16 rows of 1 KiB, all inside the second 64 KiB chunk
    mv = vault.save("m", edited)
    assert 0 < mv.added_bytes <= CHUNK
    np.testing.assert_array_equal(vault.load("m"), edited)


def test_dedup_across_model_names(vault, tmp_path):
    rng = np.random.default_rng(3)
    shared = rng.standard_normal(MIB // 8)
    own = rng.standard_normal(20_000)
    a = vault.save("team-a/model", {"encoder": shared, "head": rng.standard_normal(20_000)})
    # Same array elsewhere in another model's layout: chunks are cut from the array's own start.
    b = vault.save("team-b/model", [own, {"frozen": shared}])
    alone = _standalone_stored_bytes(tmp_path, own)
    assert b.added_bytes <= alone * 1.05 + 4096
    assert b.added_bytes < a.added_bytes / 4
    stats = vault.stats()
    assert stats.unique_bytes < stats.raw_bytes - shared.nbytes * 0.99
    # Deleting one model keeps the shared chunks for the other.
    vault.delete("team-a/model")
    vault.gc()
    assert vault.verify() == []
    np.testing.assert_array_equal(vault.load("team-b/model")[1]["frozen"], shared)


def test_pickled_buffers_dedup_with_native_arrays(vault):
    """A large buffer inside a pickled object is stored like an array: same bytes, same chunks."""
    shared = np.random.default_rng(4).standard_normal(MIB // 4)  # 2 MiB: out of band
    vault.save("native", {"w": shared})
    mv = vault.save("pickled", {"w": shared, "classes": {"a", "b"}})  # a set: pickled
    assert mv.kind == "pickle"
    assert mv.added_bytes < 0.02 * shared.nbytes
    np.testing.assert_array_equal(vault.load("pickled")["w"], shared)


def test_warm_started_forest_adds_much_less_than_the_first(vault, forest_data):
    from sklearn.ensemble import RandomForestClassifier

    X, y = forest_data
    forest = RandomForestClassifier(n_estimators=50, warm_start=True, random_state=0)
    forest.fit(X, y)
    first = vault.save("forest", forest)
    forest.n_estimators = 60
    forest.fit(X, y)  # keeps the 50 trees, grows 10 more
    second = vault.save("forest", forest)
    assert second.size > first.size
    # Ten new trees are a sixth of the model; chunk boundaries around them cost a bit more.
    assert second.added_bytes < 0.4 * first.added_bytes
    loaded = vault.load("forest:2")
    assert len(loaded.estimators_) == 60
    np.testing.assert_array_equal(loaded.predict(X), forest.predict(X))
    assert len(vault.load("forest:1").estimators_) == 50
