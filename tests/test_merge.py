"""merge: bring in the versions another vault has and this one lacks, matched by id."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3

import numpy as np
import pytest

import modelvault
from modelvault import _packs


def weights(seed, n=300_000):
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def nudge(w, seed, share=0.05):
    """A fine-tune: a few entries change a little, so the vault stores XOR deltas."""
    rng = np.random.default_rng(seed)
    return w + (rng.random(w.size) < share).astype(np.float32) * 1e-3


@pytest.fixture
def conflicted(tmp_path):
    """A vault and its "conflicted copy": both had net:1..3 (net@prod on 2), then each
    saved, tagged and aliased on its own; the copy also emptied a model of versions."""
    mine, theirs = tmp_path / "models.vault", tmp_path / "models (conflicted copy).vault"
    w = weights(0)
    with modelvault.open(mine) as vault:
        for i in range(3):
            vault.save("net", {"w": nudge(w, i)}, aliases=["prod"] if i == 1 else [])
    shutil.copy(mine, theirs)
    with modelvault.open(mine) as vault:
        vault.save("net", {"w": nudge(w, 10)}, metadata={"side": "mine"})  # net:4
        vault.tag("net:1", stage="mine")
    with modelvault.open(theirs) as vault:
        vault.save("net", {"w": nudge(w, 20)}, tags={"side": "theirs"})  # net:4 there
        vault.save("net", {"w": nudge(w, 21)}, aliases=["prod"])  # net:5 there
        vault.save("obj", {"labels": {"a", "b"}})
        vault.tag("net:1", stage="theirs", owner="ana")
        vault.tag("net:2", reviewed="yes")
        vault.alias("obj:1", "prod")
        for _ in range(2):
            vault.save("gone", [1])
        vault.delete("gone:1")
        vault.delete("gone:2")  # the model's row stays, with its last number
    return mine, theirs, w


def test_a_conflicted_copy_merges_without_loss(conflicted):
    mine, theirs, w = conflicted
    before = hashlib.sha256(theirs.read_bytes()).hexdigest()
    with modelvault.open(mine) as vault:
        report = vault.merge(theirs)
        assert [v.ref for v in report.added] == ["net:5", "net:6", "obj:1"]
        assert report.renumbered == (("net", 4, 5), ("net", 5, 6))
        assert report.conflicts == (
            f"net:1 tag stage: 'mine' here, 'theirs' in {theirs.name}",
            f"net@prod: net:2 here, net:6 in {theirs.name} (numbered here)")
        assert [v.ref for v in vault.versions()] == [f"net:{i}" for i in range(1, 7)] + ["obj:1"]
        np.testing.assert_array_equal(vault.load("net:4")["w"], nudge(w, 10))
        np.testing.assert_array_equal(vault.load("net:5")["w"], nudge(w, 20))
        np.testing.assert_array_equal(vault.load("net:6")["w"], nudge(w, 21))
        assert vault.load("obj") == {"labels": {"a", "b"}}  # a pickle: its signature holds
        assert {v.signature for v in vault.versions()} == {"trusted"}
        assert vault.get("net:1").tags == {"stage": "mine", "owner": "ana"}
        assert vault.get("net:2").tags == {"reviewed": "yes"}
        assert vault.get("net:5").tags == {"side": "theirs"}
        assert vault.get("net@prod").version == 2  # ours stays
        assert vault.get("obj@prod").version == 1  # theirs, where we had none
        assert vault.verify() == []
        # Numbers given out there are not given out here; the next save goes after both.
        assert vault.save("gone", [3]).version == 3
        assert vault.save("net", [7]).version == 7
    assert hashlib.sha256(theirs.read_bytes()).hexdigest() == before  # only read


def test_merging_again_adds_nothing_and_merging_back_converges(conflicted):
    mine, theirs, _ = conflicted
    with modelvault.open(mine) as vault:
        vault.merge(theirs)
        size = mine.stat().st_size
        again = vault.merge(theirs)
        assert again.added == () and again.renumbered == ()
        assert mine.stat().st_size == size
        ids = {v.id: v.digest for v in vault.versions()}
    with modelvault.open(theirs) as vault:
        vault.merge(mine)
        assert {v.id: v.digest for v in vault.versions()} == ids
        assert vault.verify() == []


def test_only_missing_chunks_are_copied(tmp_path):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    big = {f"l{i}": weights(i, 500_000) for i in range(4)}
    with modelvault.open(mine) as vault:
        vault.save("m", big)
    shutil.copy(mine, theirs)
    with modelvault.open(theirs) as vault:
        changed = {**big, "l3": weights(99, 500_000)}  # one of four tensors is new
        added = vault.save("m", changed).added_bytes
    with modelvault.open(mine) as vault:
        chunks = vault.stats().chunks
        stored = vault.stats().stored_bytes
        vault.merge(theirs)
        stats = vault.stats()
        assert stats.chunks == chunks + 2  # the new tensor's two 1 MiB chunks
        assert stats.stored_bytes - stored == added
        np.testing.assert_array_equal(vault.load("m:2")["l3"], changed["l3"])


def test_a_merged_version_counts_the_bytes_it_added_here(tmp_path):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    w, other = weights(0), weights(1)
    with modelvault.open(theirs) as vault:
        vault.save("net", {"w": w})
        second = vault.save("net", {"w": w, "v": other})  # added other's bytes there
    with modelvault.open(mine) as vault:
        vault.save("copy", {"w": w})  # w's chunks are here already
        report = vault.merge(theirs)
        assert {v.ref: v.added_bytes for v in report.added} == {
            "net:1": 0, "net:2": second.added_bytes}
        assert vault.get("net:1").added_bytes == 0


def test_a_delta_whose_base_is_here_is_rebased_on_our_copy(tmp_path):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    w = weights(0)
    with modelvault.open(theirs) as vault:
        vault.save("net", {"w": w})
        vault.save("net", {"w": nudge(w, 1)})  # a delta against net:1's chunks
    with modelvault.open(mine) as vault:
        vault.save("other-name", {"w": w})  # the same bytes, so the same chunks
        report = vault.merge(theirs)
        assert [v.ref for v in report.added] == ["net:1", "net:2"]
        np.testing.assert_array_equal(vault.load("net:2")["w"], nudge(w, 1))
        assert vault.verify() == []
    with sqlite3.connect(mine) as db:
        assert db.execute("SELECT count(*) FROM chunks WHERE base_id IS NOT NULL"
                          ).fetchone()[0] > 0


def test_long_delta_chains_are_stored_whole(tmp_path, monkeypatch):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    w = weights(0)
    # DELTA_DEPTH is the writer's policy (docs/format.md: readers accept chains of up to
    # 16): a writer with a higher one makes longer chains.
    monkeypatch.setattr(_packs, "DELTA_DEPTH", 12)
    with modelvault.open(theirs) as vault:
        for i in range(12):
            w = nudge(w, i)
            vault.save("net", {"w": w})
    monkeypatch.undo()
    with modelvault.open(mine) as vault:
        vault.merge(theirs)
        np.testing.assert_array_equal(vault.load("net")["w"], w)
        assert vault.verify() == []
    with sqlite3.connect(mine) as db:
        depths = db.execute(
            "WITH RECURSIVE chain(id, depth) AS (SELECT id, 0 FROM chunks UNION ALL "
            "SELECT c.base_id, depth + 1 FROM chain JOIN chunks c ON c.id = chain.id "
            "WHERE c.base_id IS NOT NULL) SELECT max(depth) FROM chain").fetchone()[0]
        assert depths == 2 * _packs.DELTA_DEPTH
        assert db.execute("SELECT count(*) FROM packs p WHERE NOT EXISTS "
                          "(SELECT 1 FROM chunks c WHERE c.pack_id = p.id)"
                          ).fetchone()[0] == 0  # what the chunks stored whole left


def test_a_damaged_vault_is_not_merged(conflicted, flip_chunk_byte):
    mine, theirs, _ = conflicted
    with sqlite3.connect(theirs) as db:
        new = db.execute("SELECT max(id) FROM chunks").fetchone()[0]  # obj's, theirs alone
        flip_chunk_byte(db, new)
    db.close()
    before = hashlib.sha256(mine.read_bytes()).hexdigest()
    with modelvault.open(mine) as vault:
        with pytest.raises(modelvault.IntegrityError, match="nothing was merged"):
            vault.merge(theirs)
        assert [v.ref for v in vault.versions()] == [f"net:{i}" for i in range(1, 5)]
    assert hashlib.sha256(mine.read_bytes()).hexdigest() == before


def test_what_cannot_be_merged(vault, vault_path, tmp_path):
    vault.save("m", [1])
    with pytest.raises(ValueError, match="itself"):
        vault.merge(vault_path)
    with pytest.raises(modelvault.NotAVaultError):
        vault.merge(tmp_path / "missing.vault")
    (tmp_path / "junk.vault").write_bytes(b"not a database at all" * 100)
    with pytest.raises(modelvault.NotAVaultError):
        vault.merge(tmp_path / "junk.vault")
    other = tmp_path / "other.vault"
    modelvault.open(other).close()
    with sqlite3.connect(other) as db:
        db.execute("CREATE VIEW extra AS SELECT 1")
    db.close()
    with pytest.raises(modelvault.CorruptVaultError, match="extra"):
        vault.merge(other)
    assert [v.ref for v in vault.versions()] == ["m:1"]


def test_versions_from_another_machine_keep_their_signature(tmp_path, monkeypatch):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "colleague"))
    modelvault.save(theirs, "obj", {"a set": {1}})
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "me"))
    modelvault.save(mine, "obj", [0])
    with modelvault.open(mine) as vault:
        assert vault.merge(theirs).renumbered == (("obj", 1, 2),)
        assert vault.get("obj:2").signature == "untrusted"
        with pytest.raises(modelvault.UntrustedError):
            vault.load("obj:2")
        assert vault.load("obj:2", trust=True) == {"a set": {1}}


def test_cli_merge_lists_what_changed(conflicted, run):
    mine, theirs, _ = conflicted
    result = run("merge", mine, theirs)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "added 3 version(s), 2 renumbered, 2 conflict(s) kept as they are here",
        "  net:4 is net:5 here",
        "  net:5 is net:6 here",
        f"  conflict: net:1 tag stage: 'mine' here, 'theirs' in {theirs.name}",
        f"  conflict: net@prod: net:2 here, net:6 in {theirs.name} (numbered here)"]
    assert run("merge", mine, mine.with_name("nope.vault")).exit_code != 0


@pytest.mark.parametrize("edit", [
    "UPDATE versions SET version = 'abc' WHERE version = 2",
    "UPDATE versions SET version = -3 WHERE version = 2",
    "UPDATE models SET last_version = 9223372036854775807",
])
def test_numbers_no_vault_gives_out_are_not_merged(tmp_path, edit):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    with modelvault.open(theirs) as vault:
        vault.save("x", [1])
        vault.save("x", [2])
    with sqlite3.connect(theirs) as db:
        db.execute(edit)
    db.close()
    with modelvault.open(mine) as vault:
        with pytest.raises(modelvault.IntegrityError, match="nothing was merged"):
            vault.merge(theirs)
        assert vault.versions() == [] and vault.save("x", [3]).version == 1


def test_a_known_version_under_another_name_brings_no_aliases_or_tags(tmp_path):
    mine, theirs = tmp_path / "a.vault", tmp_path / "b.vault"
    with modelvault.open(mine) as vault:
        vault.save("x", [1])
    shutil.copy(mine, theirs)
    with sqlite3.connect(theirs) as db:  # the same version id, filed under another model
        db.execute("UPDATE models SET name = 'y'")
    db.close()
    with modelvault.open(theirs) as vault:
        vault.alias("y:1", "prod")
        vault.tag("y:1", stage="prod")
    with modelvault.open(mine) as vault:
        report = vault.merge(theirs)
        assert report.added == () and report.conflicts == (
            f"x:1: the version with this id differs in {theirs.name} (kept this one)",)
        assert vault.get("x:1").tags == {} and vault.get("x:1").aliases == ()
        assert vault.verify() == []


def test_the_same_file_under_another_name_is_not_merged(vault, vault_path, tmp_path):
    vault.save("m", [1])
    link = tmp_path / "link.vault"
    os.link(vault_path, link)
    with pytest.raises(ValueError, match="itself"):
        vault.merge(link)
