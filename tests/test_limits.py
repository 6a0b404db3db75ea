"""What a file can make a reader allocate (issue #18): size bombs are refused before any
allocation, with a typed error, and only the caller can lift the cap."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from helpers import redigest, version_id

import modelvault
from modelvault import TooLargeError, _limits


def _listed(path, name, times):
    """Hostile case: the version's chunk list repeated ``times`` times, its part's size
    and shape to match and its digest recomputed, as anyone who can write the file can."""
    with sqlite3.connect(path) as db:
        vid = version_id(db, name)
        chunks = [c for (c,) in db.execute(
            "SELECT chunk_id FROM part_chunks WHERE version_id = ? AND part = 0 ORDER BY seq",
            (vid,))]
        size, = db.execute("SELECT size FROM parts WHERE version_id = ? AND part = 0",
                           (vid,)).fetchone()
        db.execute("DELETE FROM part_chunks WHERE version_id = ? AND part = 0", (vid,))
        db.executemany("INSERT INTO part_chunks VALUES (?, 0, ?, ?)",
                       ((vid, seq, chunk) for seq, chunk in enumerate(chunks * times)))
        db.execute("UPDATE parts SET size = ?, shape = ? WHERE version_id = ? AND part = 0",
                   (size * times, json.dumps([size * times]), vid))
        db.execute("UPDATE versions SET size = size + ?, key_id = NULL, signature = NULL "
                   "WHERE id = ?", (size * (times - 1), vid))
        redigest(db, vid)
    db.close()
    return size * times


@pytest.mark.parametrize("times", [3_000, 100_000])
def test_one_chunk_listed_many_times_is_refused_before_allocating(vault_path, tmp_path, times):
    with modelvault.open(vault_path) as vault:
        # 1 MiB of zeros is one chunk (the largest): the bomb is one row per 1 MiB claimed
        vault.save("m", {"w": np.zeros(1 << 20, np.uint8)})
        folder = tmp_path / "files"
        folder.mkdir()
        (folder / "w.bin").write_bytes(bytes(1 << 20))
        vault.save_files("f", folder)
    claimed = _listed(vault_path, "m", times)
    _listed(vault_path, "f", 3_000)  # a file is several chunks: enough rows already
    assert claimed >= 3_000 << 20
    out = tmp_path / "out"
    with modelvault.open(vault_path) as vault:
        assert vault.get("m").size == claimed  # listing shows the claim, and reads nothing
        for read in (lambda: vault.load("m"), lambda: vault.load("m", keys="w"),
                     lambda: vault.load("m", lazy=True)["w"],
                     lambda: vault.extract("f", out), lambda: vault.load("f")):
            with pytest.raises(TooLargeError, match="would expand to"):
                read()
        assert not out.exists()
        assert vault.verify() == []  # not damage: the chunks are sound, the claim is large


def test_the_caller_lifts_the_cap_never_the_file(vault_path, monkeypatch):
    monkeypatch.setattr(_limits, "EXPANSION_FLOOR", 1 << 20)
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.random.default_rng(0).integers(0, 255, 1 << 16, np.uint8)})
    _listed(vault_path, "m", 2_000)  # 128 MiB from 64 KiB: past a 1 MiB floor
    with modelvault.open(vault_path) as vault, pytest.raises(TooLargeError):
        vault.load("m")
    with modelvault.open(vault_path, max_expansion=float("inf")) as vault:
        assert vault.load("m")["w"].size == 2_000 << 16
    monkeypatch.setenv("MODELVAULT_MAX_EXPANSION", "inf")
    with modelvault.open(vault_path) as vault:
        assert vault.load("m")["w"].size == 2_000 << 16
    with pytest.raises(ValueError):
        modelvault.open(vault_path, max_expansion=0)


def test_honest_vaults_stay_under_the_cap(vault_path, monkeypatch):
    """Repeats and a fine-tune's deltas are weighed with their bases: under a floor of
    64 KiB, each still loads."""
    monkeypatch.setattr(_limits, "EXPANSION_FLOOR", 1 << 16)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 18).astype(np.float32)
    tuned = base.copy()
    tuned[::1000] += 1e-3
    with modelvault.open(vault_path) as vault:
        v1 = vault.save("net", {"w": base, "twice": base})
        vault.save("net", {"w": tuned, "twice": base}, parent=v1)
        assert vault.load("net:2")["w"].tobytes() == tuned.tobytes()
        assert vault.load("net:1")["twice"].tobytes() == base.tobytes()


def test_what_a_reader_would_refuse_is_refused_at_save(vault_path, monkeypatch):
    """A mostly-zero model past the floor reads like a bomb: the save says so (and how
    to keep it) instead of writing what no load would read back."""
    monkeypatch.setattr(_limits, "EXPANSION_FLOOR", 1 << 20)
    zeros = {"w": np.zeros(1 << 23, np.uint8), "b": np.arange(1000.0)}
    with modelvault.open(vault_path) as vault:
        with pytest.raises(TooLargeError, match="readers refuse such a version"):
            vault.save("sparse", zeros)
        assert vault.versions() == []
    with modelvault.open(vault_path, max_expansion=float("inf")) as vault:
        vault.save("sparse", zeros)
        assert vault.load("sparse")["w"].size == 1 << 23
    with modelvault.open(vault_path) as vault, pytest.raises(TooLargeError):
        vault.load("sparse")
    with modelvault.open(vault_path) as vault:  # below the floor: zeros are no question
        monkeypatch.setattr(_limits, "EXPANSION_FLOOR", 1 << 24)
        vault.save("small", zeros)
        assert vault.load("small")["w"].size == 1 << 23


def test_a_stride_zero_view_of_a_terabyte_is_refused(vault_path):
    torch = pytest.importorskip("torch", reason="tensor views need torch")
    storage = torch.arange(4, dtype=torch.float32)
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"a": storage, "b": storage[1:3]})  # b is a view of a's storage
    with sqlite3.connect(vault_path) as db:
        vid = version_id(db, "m")
        layout = db.execute("SELECT layout FROM versions WHERE id = ?", (vid,)).fetchone()[0]
        node = json.loads(layout)
        text = json.dumps(node)
        assert '"stride"' in text, text
        forged = text.replace('"shape": [2], "stride": [1]',
                              '"shape": [1048576, 1048576], "stride": [0, 0]')
        assert forged != text, text
        db.execute("UPDATE versions SET layout = ?, key_id = NULL, signature = NULL "
                   "WHERE id = ?", (forged, vid))
        redigest(db, vid)
    db.close()
    with modelvault.open(vault_path) as vault, pytest.raises(TooLargeError,
                                                             match="view of shape"):
        vault.load("m")


def test_an_honest_expanded_view_loads(vault_path):
    torch = pytest.importorskip("torch", reason="tensor views need torch")
    base = torch.zeros(4)
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"a": base, "b": base[:1].expand(80_000_000)})  # 320 MB, no bytes
        loaded = vault.load("m")
    assert loaded["b"].shape == (80_000_000,) and loaded["b"].stride() == (0,)


@pytest.mark.parametrize("dtype", ["(16000,16000)f8", "U100000000", "S100000000",
                                   "V100000000", "O", "M8[ns]", "(4,)f8"])
def test_a_parameter_dtype_that_is_not_a_number_is_refused(dtype):
    from modelvault._frameworks import _unjson

    with pytest.raises(ValueError, match="parameter array"):
        _unjson({"array": [0], "dtype": dtype})
    assert _unjson({"array": [1, 2], "dtype": "<i8"}).tolist() == [1, 2]


def test_chunk_rows_over_the_same_bytes_count_once(vault_path, monkeypatch):
    """Hostile case: K chunk rows over one region of one pack (start 0..K-1, so K
    hashes) would each count the region again, lifting the cap K times."""
    import blake3

    monkeypatch.setattr(_limits, "EXPANSION_FLOOR", 1 << 20)
    size, rows = 1 << 16, 8
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.zeros(4, np.uint8)})
    region = np.random.default_rng(0).bytes(size + rows)
    with sqlite3.connect(vault_path) as db:
        vid = version_id(db, "m")
        pack = db.execute("INSERT INTO packs (codec, size, data) VALUES ('raw', ?, ?)",
                          (len(region), region)).lastrowid
        ids = [db.execute("INSERT INTO chunks (hash, size, codec, itemsize, base_id, pack_id, "
                          "start, length) VALUES (?, ?, 'raw', 1, NULL, ?, ?, ?)",
                          (blake3.blake3(region[i:i + size]).hexdigest(), size, pack, i, size)
                          ).lastrowid for i in range(rows)]
        listed = ids * 150  # 1,200 x 64 KiB = 75 MiB: past 1000 x 64 KiB, under 1000 x 512
        db.execute("DELETE FROM part_chunks WHERE version_id = ?", (vid,))
        db.executemany("INSERT INTO part_chunks VALUES (?, 0, ?, ?)",
                       ((vid, seq, chunk) for seq, chunk in enumerate(listed)))
        db.execute("UPDATE parts SET size = ?, shape = ? WHERE version_id = ? AND part = 0",
                   (size * len(listed), json.dumps([size * len(listed)]), vid))
        db.execute("UPDATE versions SET key_id = NULL, signature = NULL WHERE id = ?", (vid,))
        redigest(db, vid)
    db.close()
    with modelvault.open(vault_path) as vault, pytest.raises(TooLargeError):
        vault.load("m")
