"""export: a compact copy of all or some versions, replacing the destination in one step."""

from __future__ import annotations

import os
import sqlite3
import warnings

import numpy as np
import pytest

import modelvault


def fine_tune(model, seed):
    rng = np.random.default_rng(seed)
    return {k: w + rng.standard_normal(w.shape, dtype=np.float32) * 1e-6
            for k, w in model.items()}


@pytest.fixture
def source(tmp_path):
    """A vault with a fine-tuned model (deltas), a pickle, aliases, tags, and a gap."""
    rng = np.random.default_rng(0)
    base = {f"l{i}": rng.standard_normal((512, 1024), dtype=np.float32) * 0.02
            for i in range(2)}
    tuned = fine_tune(base, 1)
    path = tmp_path / "source.vault"
    with modelvault.open(path) as vault:
        vault.save("bert", base, aliases=["prod"], tags={"stage": "base"})
        vault.save("bert", tuned, metadata={"auc": 0.9})
        vault.save("obj", {"labels": {"a", "b"}, "text": "x" * 300_000})
        vault.save("gone", rng.integers(0, 256, 2_000_000, dtype=np.uint8))
        vault.delete("gone")
    return path, base, tuned


def contents(path):
    with modelvault.open(path, readonly=True) as vault:
        return {v.ref: (v.id, v.digest, v.aliases, v.tags, v.metadata, v.signature)
                for v in vault.versions()}


def test_export_of_everything_is_complete_and_compact(source, tmp_path):
    path, base, tuned = source
    dest = tmp_path / "copy.vault"
    with modelvault.open(path) as vault:
        assert vault.export(dest) == dest
    assert contents(dest) == contents(path)
    with modelvault.open(dest) as copy:
        assert copy.verify() == []
        np.testing.assert_array_equal(copy.load("bert:1")["l0"], base["l0"])
        np.testing.assert_array_equal(copy.load("bert@latest")["l1"], tuned["l1"])
        assert copy.load("obj")["labels"] == {"a", "b"}
        assert copy.get("bert@prod").version == 1
    # The deleted model's chunks stayed behind: the copy is smaller than the source.
    assert dest.stat().st_size < path.stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["copy.vault", "source.vault"]


def test_export_of_some_versions_takes_their_chunks_and_delta_bases(source, tmp_path):
    path, _, tuned = source
    dest = tmp_path / "tuned.vault"
    with modelvault.open(path) as vault:
        vault.export(dest, ["bert:2"])
    assert list(contents(dest)) == ["bert:2"]
    assert contents(dest)["bert:2"] == contents(path)["bert:2"]
    with modelvault.open(dest) as copy:
        np.testing.assert_array_equal(copy.load("bert")["l0"], tuned["l0"])
        assert copy.verify() == []
        stats = copy.stats()
    with sqlite3.connect(dest) as db:
        # bert:2's chunks are deltas, so bert:1's chunks came along as their bases,
        # but nothing of obj or of the deleted model.
        # (2 arrays of 2 MiB: 4 chunks each.)
        assert db.execute("SELECT count(*) FROM chunks WHERE base_id IS NOT NULL"
                          ).fetchone()[0] == 4
        assert db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 8
        dead = db.execute("SELECT sum(p.size) - (SELECT sum(length) FROM chunks) "
                          "FROM packs p").fetchone()[0]
    assert dead == 0 and stats.versions == 1


def test_exported_versions_count_the_bytes_they_added_to_the_copy(source, tmp_path):
    path, _, _ = source
    with modelvault.open(path) as vault:
        vault.save("again", vault.load("bert:1"))  # bert:1's bytes: it adds nothing
        assert vault.get("again").added_bytes == 0
        vault.export(tmp_path / "one.vault", ["again"])
        vault.export(tmp_path / "all.vault")
        first = vault.get("bert:1").added_bytes
    with modelvault.open(tmp_path / "one.vault") as copy:
        # Every stored byte of the copy is its: it brought them all.
        assert copy.get("again").added_bytes == pytest.approx(copy.stats().stored_bytes,
                                                              rel=0.01)
    with modelvault.open(tmp_path / "all.vault") as copy:
        added = {v.ref: v.added_bytes for v in copy.versions()}
        assert added["bert:1"] == first and added["again:1"] == 0
        assert sum(added.values()) == pytest.approx(copy.stats().stored_bytes, rel=0.01)


def test_export_replaces_the_destination_and_leaves_no_side_files(source, tmp_path):
    path, _, _ = source
    dest = tmp_path / "published.vault"
    dest.write_bytes(b"an older copy")
    with modelvault.open(path) as vault:
        vault.export(dest, ["obj"])
        with pytest.raises(ValueError, match="vault itself"):
            vault.export(path)
        with pytest.raises(modelvault.NotFoundError):
            vault.export(tmp_path / "never.vault", ["nothing:1"])
    assert list(contents(dest)) == ["obj:1"]
    assert sorted(os.listdir(tmp_path)) == ["published.vault", "source.vault"]


def test_cli_export(run, vault_file, tmp_path):
    dest = tmp_path / "out.vault"
    result = run("export", vault_file, dest, "churn@production", "team/weights")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"exported 2 versions to {dest}")
    assert sorted(v.ref for v in modelvault.open(dest, readonly=True).versions()) == [
        "churn:1", "team/weights:1"]
    assert run("export", vault_file, tmp_path / "x.vault", "nope").exit_code == 1


def test_a_whole_copy_keeps_the_numbers_of_emptied_models(tmp_path):
    path, dest = tmp_path / "a.vault", tmp_path / "b.vault"
    with modelvault.open(path) as vault:
        vault.save("m", [1])
        vault.delete("m:1")  # the model keeps its row: m:1 is never given out again
        vault.export(dest)
    with modelvault.open(dest) as copy:
        assert copy.save("m", [2]).version == 2


def test_export_refuses_a_delta_chunk_whose_base_is_gone(tmp_path):
    # A damaged source: copied as it is, the delta would decode to nothing (or to
    # wrong bytes, as a chunk of no base). Nothing is written.
    import numpy as np

    path, dest = tmp_path / "a.vault", tmp_path / "copy.vault"
    w = np.random.default_rng(0).normal(size=300_000)
    with modelvault.open(path) as vault:
        vault.save("net", {"w": w})
        w[:10] += 1
        vault.save("net", {"w": w})
    with sqlite3.connect(path) as db:
        base = db.execute("SELECT base_id FROM chunks WHERE base_id IS NOT NULL").fetchone()[0]
        db.execute("UPDATE chunks SET base_id = 999999 WHERE base_id = ?", (base,))
    db.close()
    with modelvault.open(path) as vault:
        with pytest.raises(modelvault.IntegrityError, match="delta base is missing; nothing "
                                                            "was exported"):
            vault.export(dest)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["a.vault"]


def test_export_skip_damaged_warns_at_the_callers_line(tmp_path):
    """export(skip_damaged=True)'s DamagedVaultWarning names the line that called export."""
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        vault.save("good", {"w": np.arange(1000.0)})
        vault.save("bad", {"w": np.random.default_rng(1).normal(size=1000)})
    db = sqlite3.connect(path)
    pack = db.execute("SELECT c.pack_id FROM chunks c JOIN part_chunks pc ON "
                      "pc.chunk_id = c.id JOIN versions v ON v.id = pc.version_id "
                      "JOIN models m ON m.id = v.model_id WHERE m.name = 'bad'").fetchone()[0]
    db.execute("UPDATE packs SET data = zeroblob(length(data)) WHERE id = ?", (pack,))
    db.commit()
    db.close()
    with modelvault.open(path) as vault, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vault.export(tmp_path / "out.vault", skip_damaged=True)
    damaged = [w for w in caught if issubclass(w.category, modelvault.DamagedVaultWarning)]
    assert damaged and "bad:1" in str(damaged[0].message)
    assert damaged[0].filename == __file__
