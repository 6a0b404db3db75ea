"""Partial and lazy loads: only the chunks of the entries asked for are read.

Tested on what they read: the other entries' chunks are damaged, so reading them would
raise IntegrityError. Never on time.
"""

from __future__ import annotations

import multiprocessing
import sqlite3

import numpy as np
import pytest

import modelvault


def model():
    rng = np.random.default_rng(0)
    return {"encoder": {"layer": [{"weight": rng.normal(size=(200, 300)),
                                   "bias": rng.normal(size=300)} for _ in range(3)]},
            "embeddings": rng.normal(size=(500, 64)).astype(np.float32),
            "step": 7, "scale": np.float64(0.5)}


def damage_all_but(path, keep):
    """Flip a byte in every chunk of the version's parts but those of ``keep`` (flat
    names), through the layout the format documents."""
    import json

    from modelvault._serialize import entries, leaf_part

    with sqlite3.connect(path) as db:
        layout = json.loads(db.execute("SELECT layout FROM versions").fetchone()[0])
        found = entries(layout)
        keep_parts = {leaf_part(found[name]) for name in keep}
        rows = db.execute("SELECT pc.part, c.pack_id, c.start, c.length FROM part_chunks pc "
                          "JOIN chunks c ON c.id = pc.chunk_id").fetchall()
        for part, pack, start, length in rows:
            if part in keep_parts:
                continue
            data = bytearray(db.execute("SELECT data FROM packs WHERE id = ?",
                                        (pack,)).fetchone()[0])
            data[start + length // 2] ^= 0xFF
            db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(data), pack))
    db.close()


def test_keys_pick_entries_by_name_or_pattern_as_a_flat_dict(vault):
    obj = model()
    vault.save("net", obj)
    picked = vault.load("net", keys="encoder.layer.*.bias")
    assert list(picked) == [f"encoder.layer.{i}.bias" for i in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(picked[f"encoder.layer.{i}.bias"],
                                      obj["encoder"]["layer"][i]["bias"])
    both = vault.load("net", keys=["embeddings", "encoder.layer.1.weight", "scale"])
    assert list(both) == ["encoder.layer.1.weight", "embeddings", "scale"]  # layout order
    assert both["scale"] == 0.5 and both["embeddings"].dtype == np.float32
    with pytest.raises(KeyError, match="no entry named or matching 'decoder"):
        vault.load("net", keys="decoder.*")


def test_keys_read_only_the_chunks_of_those_entries(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("net", model())
    damage_all_but(vault_path, ["encoder.layer.2.weight", "embeddings"])
    with modelvault.open(vault_path) as vault:
        got = vault.load("net", keys=["encoder.layer.2.weight", "embeddings"])
        np.testing.assert_array_equal(got["embeddings"], model()["embeddings"])
        with pytest.raises(modelvault.IntegrityError, match="net:1"):
            vault.load("net")
        with pytest.raises(modelvault.IntegrityError):
            vault.load("net", keys="encoder.layer.0.bias")


def test_a_lazy_mapping_decodes_each_entry_when_first_read(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("net", model())
    damage_all_but(vault_path, ["embeddings"])
    with modelvault.open(vault_path) as vault:
        lazy = vault.load("net", lazy=True)  # reads no chunk yet
        assert len(lazy) == 8 and "encoder.layer.0.weight" in lazy
        assert list(lazy)[:2] == ["encoder.layer.0.weight", "encoder.layer.0.bias"]
        first = lazy["embeddings"]
        np.testing.assert_array_equal(first, model()["embeddings"])
        assert lazy["embeddings"] is first  # decoded once
        with pytest.raises(modelvault.IntegrityError):
            lazy["encoder.layer.0.bias"]
        with pytest.raises(KeyError):
            lazy["nothing"]
        with pytest.raises(TypeError):
            lazy["embeddings"] = 1  # read-only


def test_a_lazy_mapping_after_close_says_so(vault):
    vault.save("net", model())
    lazy = vault.load("net", lazy=True)
    vault.close()
    with pytest.raises(modelvault.VaultError, match="closed"):
        lazy["embeddings"]


def _in_another_process(path, home, action):
    import os

    os.environ["MODELVAULT_HOME"] = home
    with modelvault.open(path) as vault:
        if action == "delete":
            vault.delete("net:1")
        elif action == "repack":
            vault.delete("other:1")  # shares its packs with net:1
            vault.gc()
        else:  # collect what nothing uses any more
            vault.gc()


def _run(path, action):
    import os

    process = multiprocessing.get_context("spawn").Process(
        target=_in_another_process, args=(str(path), os.environ["MODELVAULT_HOME"], action))
    process.start()
    process.join(60)
    assert process.exitcode == 0


def test_a_lazy_mapping_survives_another_process_deleting_and_repacking(vault_path):
    # other:1 is eight 1 MiB chunks that compress well, so they share one pack; net:1's
    # "shared" entry is the same bytes as the first of them, so it is that chunk. Once
    # other:1 is gone, gc repacks the pack's one live chunk elsewhere.
    big = np.repeat(np.arange(8.0), 131072) + np.tile(np.arange(131072) % 7, 8)
    obj = {**model(), "shared": big[:131072].copy()}
    with modelvault.open(vault_path) as vault:
        vault.save("other", {"big": big})
        vault.save("net", obj)
        with sqlite3.connect(vault_path) as db:
            packs = {r[0] for r in db.execute("SELECT pack_id FROM chunks WHERE size = ?",
                                              (1 << 20,))}
        assert len(packs) == 1
        lazy = vault.load("net", lazy=True)
        _run(vault_path, "repack")  # gc moved the shared chunk into a new pack
        with sqlite3.connect(vault_path) as db:
            assert db.execute("SELECT count(*) FROM packs WHERE id = ?",
                              (packs.pop(),)).fetchone()[0] == 0
        np.testing.assert_array_equal(lazy["shared"], obj["shared"])
        np.testing.assert_array_equal(lazy["embeddings"], obj["embeddings"])
        _run(vault_path, "delete")  # deleted, not yet collected: its chunks are there
        np.testing.assert_array_equal(lazy["encoder.layer.0.weight"],
                                      obj["encoder"]["layer"][0]["weight"])
        _run(vault_path, "collect")
        with pytest.raises(modelvault.NotFoundError, match="deleted, and its chunks collected"):
            lazy["encoder.layer.1.weight"]


def test_keys_and_lazy_read_tensors_and_keep_views_shared(vault):
    torch = pytest.importorskip("torch")
    weight = torch.randn(50, 8)
    vault.save("tied", {"embed": weight, "head": weight, "other": torch.ones(3)})
    lazy = vault.load("tied", lazy=True)
    assert lazy["embed"].untyped_storage().data_ptr() == lazy["head"].untyped_storage().data_ptr()
    assert torch.equal(vault.load("tied", keys="he*")["head"], weight)
    assert vault.load("tied", keys="other", device="meta")["other"].device.type == "meta"


def test_keys_are_for_arrays_versions(vault):
    vault.save("obj", {"s": {1, 2}})
    with pytest.raises(ValueError, match="arrays versions"):
        vault.load("obj", keys="s")
