"""Older formats are read as they are and upgraded by the first write, never refused.

tests/fixtures/format3.vault was written by the code at 09c3271, the last that wrote
format 3 (tests/fixtures/make_format3.py), and signed with tests/fixtures/format3.key.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import modelvault
from modelvault._schema import FORMAT_VERSION

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_copy(tmp_path, name):
    """A copy of the fixture vault ``name`` (format3, format4) to write to."""
    path = tmp_path / f"{name}.vault"
    shutil.copyfile(FIXTURES / f"{name}.vault", path)
    return path


def hold_key(home, name):
    """This machine holds the key fixture ``name`` was signed with (its own pickles)."""
    (home / "key").write_text((FIXTURES / f"{name}.key").read_text())


@pytest.fixture
def old_vault(tmp_path):
    return fixture_copy(tmp_path, "format3")


@pytest.fixture
def as_its_saver(_private_key_home):
    hold_key(_private_key_home, "format3")


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


# -- format 4 -> 5: lineage and packages tables, key pairs -----------------------------------
# tests/fixtures/format4.vault was written by the code at b973859, the last that wrote
# format 4 (tests/fixtures/make_format4.py), and signed with the HMAC secret in format4.key.

@pytest.fixture
def vault4(tmp_path):
    return fixture_copy(tmp_path, "format4")


@pytest.fixture
def as_its_saver4(_private_key_home):
    hold_key(_private_key_home, "format4")


def check_contents4(vault):
    """Every version of the format-4 fixture, as make_format4.py saved it."""
    torch = pytest.importorskip("torch", reason="the fixture holds torch tensors")
    assert {"files:1", "net:1", "net:2", "obj:1", "xgb:1"} <= {v.ref for v in vault.versions()}
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 32, generator=generator).to(torch.bfloat16)
    first, second = vault.load("net:1"), vault.load("net@production")
    assert torch.equal(first["linear.weight"], weight) and first["steps"].item() == 12
    assert torch.equal(second["linear.bias"], torch.full((64,), 0.25))
    assert vault.get("net:1").metadata == {"acc": 0.5}
    assert vault.get("net:1").tags == {"stage": "base"}
    assert vault.load("obj", trust=True)["set"] == {1, 2, 3}
    files = vault.load("files")
    assert files["config.json"] == b'{"dim": 32}' and "model.safetensors" in files
    assert vault.load("files", keys="embed")["embed"].shape == (100, 32)
    pytest.importorskip("xgboost", reason="the fixture holds an xgboost model")
    assert vault.load("xgb").predict(np.zeros((2, 4))).shape == (2,)
    assert vault.verify() == []


def tables(path):
    with sqlite3.connect(path) as db:
        found = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    return found


def assert_schema_of_a_new_vault(path, tmp_path):
    """An upgraded file's schema is a new one's: a fresh vault's, object for object."""
    fresh = tmp_path / "fresh.vault"
    modelvault.open(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    with contextlib.closing(sqlite3.connect(path)) as a, \
            contextlib.closing(sqlite3.connect(fresh)) as b:
        assert a.execute(schema).fetchall() == b.execute(schema).fetchall()


def signatures(path, uuids=None):
    """(uuid, digest, key_id, signature) of the versions of ``path`` (or of ``uuids``)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT uuid, digest, key_id, signature FROM versions").fetchall()
    return sorted(r for r in rows if uuids is None or r[0] in uuids)


def test_a_format_4_vault_is_read_as_it_is(vault4):
    with modelvault.open(vault4, readonly=True) as vault:
        check_contents4(vault)
        assert [v.ref for v in vault.versions()] == ["files:1", "net:1", "net:2", "obj:1",
                                                    "xgb:1"]
        assert all(v.parent is None and v.source == {} for v in vault.versions())
        assert vault.lineage("net:2") == []
    with modelvault.open(vault4) as vault:  # writable, but only read
        check_contents4(vault)
    assert user_version(vault4) == 4 and "lineage" not in tables(vault4)


def test_the_first_write_upgrades_format_4_to_the_current_format(vault4, tmp_path):
    with modelvault.open(vault4) as vault:
        with pytest.raises(modelvault.NotFoundError):
            vault.tag("net:3", x="y")  # deleted: the write rolls back, upgrade and all
        assert user_version(vault4) == 4 and "lineage" not in tables(vault4)
        mv = vault.save("net", {"w": np.ones(3)}, parent="net:2")
        assert mv.ref == "net:4" and user_version(vault4) == FORMAT_VERSION
        assert [v.ref for v in vault.lineage(mv)] == ["net:2"]
        check_contents4(vault)
    assert {"lineage", "packages", "packages_by_name"} <= tables(vault4)
    assert_schema_of_a_new_vault(vault4, tmp_path)
    with sqlite3.connect(vault4) as a:
        # Every environment's packages became rows.
        rows = a.execute("SELECT p.name FROM packages p JOIN versions v ON "
                         "v.environment_id = p.environment_id JOIN models m ON "
                         "m.id = v.model_id WHERE m.name = 'xgb'").fetchall()
    a.close()
    assert {"numpy", "scikit-learn", "xgboost-cpu"} <= {r[0] for r in rows}


def test_the_upgrade_keeps_signatures_and_its_own_machine_still_checks_them(vault4,
                                                                            as_its_saver4):
    with sqlite3.connect(vault4) as db:
        before = db.execute("SELECT uuid, key_id, signature FROM versions").fetchall()
    db.close()
    with modelvault.open(vault4) as vault:
        assert vault.get("obj").signature == "trusted"  # by the legacy secret
        vault.tag("obj:1", checked="yes")  # a write: upgraded
        assert user_version(vault4) == FORMAT_VERSION
        after = vault.get("obj")
        assert after.signature == "trusted" and after.signer == "this machine (legacy secret)"
        assert vault.load("obj")["set"] == {1, 2, 3}
        new = vault.save("obj", {"set": {4}})
        assert new.signer == "this machine" and new.key_id != after.key_id
    with sqlite3.connect(vault4) as db:
        kept = db.execute("SELECT uuid, key_id, signature FROM versions WHERE uuid IN "
                          f"({','.join('?' * len(before))})", [r[0] for r in before]).fetchall()
    db.close()
    # Never re-signed: the legacy secret was shared like a password, so a key-pair
    # signature would vouch for whatever its holders made.
    assert sorted(kept) == sorted(before)


def test_on_another_machine_hmac_signatures_stay_and_still_need_trust(vault4, tmp_path,
                                                                       monkeypatch):
    with modelvault.open(vault4) as vault:
        vault.save("mine", {"s": {1}})  # upgrades; this machine holds no legacy secret
        with pytest.raises(modelvault.UntrustedError):
            vault.load("obj")
        assert vault.get("obj").signature == "untrusted"
        assert vault.load("mine") == {"s": {1}}
    with sqlite3.connect(vault4) as db:
        kept = db.execute("SELECT signature FROM versions v JOIN models m ON "
                          "m.id = v.model_id WHERE m.name = 'obj'").fetchone()[0]
    db.close()
    assert not kept.startswith("ed25519:")  # the HMAC, as it was
    # The machine that holds the secret still checks it, after the upgrade elsewhere.
    home = tmp_path / "saver-home"
    home.mkdir()
    hold_key(home, "format4")
    monkeypatch.setenv("MODELVAULT_HOME", str(home))
    with modelvault.open(vault4, readonly=True) as vault:
        assert vault.get("obj").signature == "trusted"
        assert vault.load("obj")["set"] == {1, 2, 3}


def test_a_damaged_environment_text_does_not_block_the_upgrading_write(vault4):
    with sqlite3.connect(vault4) as db:
        db.execute("UPDATE environments SET json = CAST(X'7bff7d' AS TEXT) WHERE id = "
                   "(SELECT environment_id FROM versions v JOIN models m ON "
                   "m.id = v.model_id WHERE m.name = 'obj')")
    db.close()
    with modelvault.open(vault4) as vault:
        vault.tag("net:1", checked="yes")  # the write that upgrades reads every environment
    assert user_version(vault4) == FORMAT_VERSION


# -- format 5 -> 6: the remotes table ---------------------------------------------------------
# tests/fixtures/format5.vault was written by the code at 7c0513a, the last that wrote
# format 5 (tests/fixtures/make_format5.py), and signed with the private key in format5.key.

def check_contents5(vault):
    """Every version of the format-5 fixture, as make_format5.py saved it."""
    torch = pytest.importorskip("torch", reason="the fixture holds torch tensors")
    assert {"clf:1", "files:1", "net:1", "net:2", "obj:1"} <= {v.ref for v in vault.versions()}
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 32, generator=generator).to(torch.bfloat16)
    first, second = vault.load("net:1"), vault.load("net@production")
    assert torch.equal(first["linear.weight"], weight) and first["steps"].item() == 12
    assert torch.equal(second["linear.bias"], torch.full((64,), 0.25))
    assert [v.ref for v in vault.lineage("net:2")] == ["net:1"]
    assert vault.get("net:1").tags == {"stage": "base"}
    assert vault.load("obj", trust=True)["set"] == {1, 2, 3}
    assert vault.load("files")["config.json"] == b'{"dim": 32}'
    assert vault.selftest("clf", trust=True).passed
    assert vault.verify() == []


def test_a_format_5_vault_is_read_as_it_is_and_upgraded_by_its_first_write(tmp_path):
    path = fixture_copy(tmp_path, "format5")
    with modelvault.open(path, readonly=True) as vault:
        check_contents5(vault)
        assert vault.remotes() == {}
    assert user_version(path) == 5 and "remotes" not in tables(path)
    before = signatures(path)
    with modelvault.open(path) as vault:
        vault.add_remote("origin", "s3://bucket/models")
        assert user_version(path) == FORMAT_VERSION
        assert vault.remotes() == {"origin": "s3://bucket/models"}
        check_contents5(vault)
    assert_schema_of_a_new_vault(path, tmp_path)
    assert signatures(path) == before


# -- format 6 -> 7: what the vault last saw on each remote --------------------------------------
# tests/fixtures/format6.vault was written by the code at 8e3990d, the last that wrote
# format 6 (tests/fixtures/make_format6.py), and signed with the private key in format6.key.

def check_contents6(vault):
    """Every version of the format-6 fixture, as make_format6.py saved it."""
    check_contents5(vault)
    assert {"clf:1", "files:1", "net:1", "net:2", "obj:1", "raw:1"} <= {
        v.ref for v in vault.versions()}
    assert vault.get("raw@production").version == 1
    raw = vault.load("raw")["w"]
    assert raw.shape == (256, 64) and raw.dtype == np.float32


def test_a_format_6_vault_is_read_as_it_is_and_upgraded_by_its_first_write(tmp_path):
    path = fixture_copy(tmp_path, "format6")
    with modelvault.open(path, readonly=True) as vault:
        check_contents6(vault)
        assert vault.remotes() == {"origin": "s3://bucket/models"}  # not carried by merge
    assert user_version(path) == 6 and "remote_aliases" not in tables(path)
    before = signatures(path)
    with modelvault.open(path) as vault:
        with pytest.raises(modelvault.NotFoundError):
            vault.alias("net:3", "x")  # deleted: the write rolls back, upgrade and all
        assert user_version(path) == 6
        vault.alias("raw:1", "staging")
        assert user_version(path) == FORMAT_VERSION
        check_contents6(vault)
        assert vault.save("net", {"w": np.ones(3)}).ref == "net:4"  # net:3's is given out
    assert {"remote_aliases", "remote_tags"} <= tables(path)
    assert_schema_of_a_new_vault(path, tmp_path)
    assert signatures(path, {r[0] for r in before}) == before
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM remote_aliases").fetchone() == (0,)


def test_a_push_or_pull_is_a_first_write_and_a_read_only_pull_stays_format_6(tmp_path):
    """A push records what it leaves equal there, and a pull what it finds equal: each
    upgrades the file in its write. Opened read-only, a pull that takes nothing writes
    nothing (it failed on the format-6 file's missing remote_aliases table)."""
    pytest.importorskip("obstore")
    url = f"file://{tmp_path / 'remote'}"
    pusher = fixture_copy(tmp_path, "format6")
    with modelvault.open(pusher) as vault:
        vault.push(url, ["raw@production"])
    assert user_version(pusher) == FORMAT_VERSION
    puller = shutil.copyfile(FIXTURES / "format6.vault", tmp_path / "puller.vault")
    with modelvault.open(puller, readonly=True) as vault:
        report = vault.pull(url)
        assert report.added == report.moved == report.conflicts == ()
    assert user_version(puller) == 6
    with modelvault.open(puller) as vault:
        assert vault.pull(url).moved == ()
    assert user_version(puller) == FORMAT_VERSION
    with contextlib.closing(sqlite3.connect(puller)) as db:
        assert db.execute("SELECT model, alias FROM remote_aliases").fetchall() == [
            ("raw", "production")]


@pytest.mark.parametrize("name", ["format5", "format6"])
def test_its_signer_still_trusts_a_key_pair_fixture_after_the_upgrade(tmp_path,
                                                                      _private_key_home, name):
    (_private_key_home / "private.key").write_text((FIXTURES / f"{name}.key").read_text())
    path = fixture_copy(tmp_path, name)
    with modelvault.open(path) as vault:
        vault.tag("net:1", checked="yes")
        assert user_version(path) == FORMAT_VERSION
        assert vault.get("obj").signature == "trusted"
        assert vault.load("obj")["set"] == {1, 2, 3}


@pytest.mark.parametrize("name, old_format, check, count", [
    ("format3", 3, check_contents, 4), ("format4", 4, check_contents4, 5),
    ("format5", 5, check_contents5, 5), ("format6", 6, check_contents6, 6)])
def test_merge_and_export_take_an_older_vault_in(tmp_path, name, old_format, check, count):
    old = fixture_copy(tmp_path, name)
    copy = tmp_path / "copy.vault"
    with modelvault.open(old) as vault:
        vault.export(copy)
    assert user_version(copy) == FORMAT_VERSION and user_version(old) == old_format
    with modelvault.open(copy) as vault:
        check(vault)
    merged = tmp_path / "merged.vault"
    with modelvault.open(merged) as vault:
        report = vault.merge(old)
        assert len(report.added) == count
        check(vault)
        new = vault.save("new", {"w": np.zeros(2)})
    # And the other way: a newer vault merged into an older one upgrades it.
    with modelvault.open(old) as vault:
        vault.merge(merged)
        assert vault.load("new")["w"].tolist() == [0.0, 0.0]
        assert vault.get("new").source == new.source and new.source  # lineage came along
    assert user_version(old) == FORMAT_VERSION
