"""Older formats are read as they are and upgraded by the first write, never refused.

tests/fixtures/format3.vault was written by the code at 09c3271, the last that wrote
format 3 (tests/fixtures/make_format3.py), and signed with tests/fixtures/format3.key.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import modelvault
from modelvault._schema import FORMAT_VERSION

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def old_vault(tmp_path):
    path = tmp_path / "format3.vault"
    shutil.copyfile(FIXTURES / "format3.vault", path)
    return path


@pytest.fixture
def as_its_saver(_private_key_home):
    """This machine holds the key the fixture was signed with (its own pickles)."""
    (_private_key_home / "key").write_text((FIXTURES / "format3.key").read_text())


def user_version(path):
    with sqlite3.connect(path) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    return version


def expected_weights():
    rng = np.random.default_rng(3)
    return rng.normal(size=(256, 300)).astype(np.float32)


def check_contents(vault):
    """Every version of the fixture, as make_format3.py saved it."""
    assert [v.ref for v in vault.versions()] == ["files:1", "net:1", "net:2", "obj:1"]
    weight = expected_weights()
    first, second = vault.load("net:1"), vault.load("net@production")
    np.testing.assert_array_equal(first["layer.weight"], weight)
    np.testing.assert_array_equal(second["layer.weight"], weight + np.float32(1e-3))
    assert (first["step"], first["name"], second["layer.bias"].dtype) == (7, "net", np.float32)
    assert vault.get("net:1").metadata == {"acc": 0.5} and vault.get("net:1").tags == {
        "stage": "base"}
    obj = vault.load("obj", trust=True)
    assert obj["set"] == {1, 2, 3} and obj["big"].shape == (300_000,)
    assert vault.load("files") == {"config.json": b'{"dim": 300}',
                                   "tokenizer/vocab.txt": b"hello\nworld\n" * 100}
    assert vault.verify() == []


def test_a_format_3_vault_is_read_as_it_is(old_vault):
    with modelvault.open(old_vault, readonly=True) as vault:
        check_contents(vault)
    with modelvault.open(old_vault) as vault:  # writable, but only read
        check_contents(vault)
        vault.extract("files", old_vault.parent / "out")
    assert user_version(old_vault) == 3


def test_the_first_write_upgrades_it_in_the_same_transaction(old_vault):
    with modelvault.open(old_vault) as vault:
        with pytest.raises(modelvault.NotFoundError):
            vault.alias("net:3", "x")  # deleted: the write rolls back, upgrade and all
        assert user_version(old_vault) == 3
        mv = vault.save("net", {"w": np.ones(3)})
        assert mv.ref == "net:4"  # net:3 was deleted: its number is not given out again
        assert user_version(old_vault) == FORMAT_VERSION
        refs = [v.ref for v in vault.versions()]
    assert refs == ["files:1", "net:1", "net:2", "net:4", "obj:1"]
    with modelvault.open(old_vault, readonly=True) as vault:
        np.testing.assert_array_equal(vault.load("net:2")["layer.weight"],
                                      expected_weights() + np.float32(1e-3))
        assert vault.verify() == []


def test_its_own_machines_pickles_still_load_without_trust(old_vault, as_its_saver):
    with modelvault.open(old_vault) as vault:
        vault.tag("obj:1", checked="yes")  # a write: upgraded
        assert user_version(old_vault) == FORMAT_VERSION
        assert vault.get("obj").signature == "trusted"
        assert vault.load("obj")["set"] == {1, 2, 3}


def test_another_machine_still_needs_trust_for_its_pickles(old_vault):
    with modelvault.open(old_vault) as vault:
        with pytest.raises(modelvault.UntrustedError):
            vault.load("obj")


def test_merge_and_export_take_a_format_3_vault_in(old_vault, tmp_path):
    copy = tmp_path / "copy.vault"
    with modelvault.open(old_vault) as vault:
        vault.export(copy)
    assert user_version(copy) == FORMAT_VERSION and user_version(old_vault) == 3
    with modelvault.open(copy) as vault:
        check_contents(vault)
    merged = tmp_path / "merged.vault"
    with modelvault.open(merged) as vault:
        report = vault.merge(old_vault)
        assert len(report.added) == 4
        check_contents(vault)
    # And the other way: a newer vault merged into a format-3 one upgrades it.
    with modelvault.open(merged) as vault:
        vault.save("new", {"w": np.zeros(2)})
    with modelvault.open(old_vault) as vault:
        vault.merge(merged)
        assert vault.load("new")["w"].tolist() == [0.0, 0.0]
    assert user_version(old_vault) == FORMAT_VERSION
