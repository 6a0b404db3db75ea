"""Trust: pickles load only when a trusted key signed them; tampering is caught."""

from __future__ import annotations

import sqlite3
import stat

import numpy as np
import pytest

import modelvault
from modelvault import IntegrityError, UntrustedError
from modelvault._trust import key_id, own_private, pickle_imports


class Marker:
    """Unpickling this creates a file: proof that loading ran the pickle's code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def use_home(monkeypatch, path):
    monkeypatch.setenv("MODELVAULT_HOME", str(path))


def test_key_is_created_once_with_private_permissions(tmp_path, monkeypatch):
    use_home(monkeypatch, tmp_path / "home")
    first = own_private().private_bytes_raw()
    assert own_private().private_bytes_raw() == first
    mode = (tmp_path / "home" / "private.key").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert not (tmp_path / "home" / "key").exists()  # no legacy HMAC secret is made


def test_foreign_pickle_is_not_executed_without_trust(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    vault_path = tmp_path / "v.vault"
    use_home(monkeypatch, tmp_path / "alice")
    modelvault.save(vault_path, "evil", Marker(marker))
    assert not marker.exists()

    use_home(monkeypatch, tmp_path / "bob")
    with modelvault.open(vault_path) as vault:
        with pytest.raises(UntrustedError) as info:
            vault.load("evil")
        assert not marker.exists()
        assert "io.open" in info.value.imports
        assert "io.open" in str(info.value)
        handle = vault.load("evil", trust=True)
        handle.close()
    assert marker.exists()


def test_own_pickles_load_without_asking(tmp_path, monkeypatch):
    use_home(monkeypatch, tmp_path / "alice")
    with modelvault.open(tmp_path / "v.vault") as vault:
        vault.save("obj", {"when": {1, 2, 3}})  # a set is not native: pickled
        assert vault.get("obj").kind == "pickle"
        assert vault.load("obj") == {"when": {1, 2, 3}}


def test_exported_key_makes_a_teammate_trusted(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from modelvault._cli import cli

    vault_path = tmp_path / "v.vault"
    use_home(monkeypatch, tmp_path / "alice")
    modelvault.save(vault_path, "obj", {"a set": {1}})
    runner = CliRunner()
    exported = runner.invoke(cli, ["key", "export"])
    assert exported.exit_code == 0
    (tmp_path / "alice.key").write_text(exported.output)

    use_home(monkeypatch, tmp_path / "bob")
    with pytest.raises(UntrustedError):
        modelvault.load(vault_path, "obj")
    trusted = runner.invoke(cli, ["trust", str(tmp_path / "alice.key")])
    assert trusted.exit_code == 0, trusted.output
    assert modelvault.load(vault_path, "obj") == {"a set": {1}}


def test_arrays_never_need_trust(tmp_path, monkeypatch):
    vault_path = tmp_path / "v.vault"
    use_home(monkeypatch, tmp_path / "alice")
    modelvault.save(vault_path, "w", {"w": np.arange(5)})
    use_home(monkeypatch, tmp_path / "bob")
    np.testing.assert_array_equal(modelvault.load(vault_path, "w")["w"], np.arange(5))


def test_tampered_metadata_breaks_the_signature(tmp_path, monkeypatch):
    use_home(monkeypatch, tmp_path / "alice")
    path = tmp_path / "v.vault"
    modelvault.save(path, "obj", {"a set": {1}}, metadata={"auc": 0.5})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE versions SET metadata = '{\"auc\": 0.99}'")
    db.close()
    with modelvault.open(path) as vault:
        with pytest.raises(UntrustedError):
            vault.load("obj")
        problems = vault.verify()
        assert any("signature" in p.message for p in problems)
        assert vault.load("obj", trust=True) == {"a set": {1}}


def test_swapped_chunk_list_is_an_integrity_error(tmp_path, monkeypatch):
    use_home(monkeypatch, tmp_path / "alice")
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        vault.save("m", {"a": np.arange(100_000), "b": np.ones(100_000)})
    with sqlite3.connect(path) as db:
        ids = [r[0] for r in db.execute(
            "SELECT DISTINCT chunk_id FROM part_chunks ORDER BY chunk_id")]
        db.execute("UPDATE part_chunks SET chunk_id = ? WHERE chunk_id = ?", (ids[-1], ids[0]))
    db.close()
    with modelvault.open(path) as vault:
        with pytest.raises(IntegrityError) as info:
            vault.load("m")
        assert info.value.model == "m" and info.value.version == 1
        assert any(p.version == 1 for p in vault.verify())


def test_flipped_byte_in_a_chunk_names_model_version_and_chunk(tmp_path, monkeypatch,
                                                             flip_chunk_byte):
    use_home(monkeypatch, tmp_path / "alice")
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        vault.save("m", {"a": np.random.default_rng(0).normal(size=50_000)})
    with sqlite3.connect(path) as db:
        chunk_id, chunk_hash = db.execute("SELECT id, hash FROM chunks LIMIT 1").fetchone()
        flip_chunk_byte(db, chunk_id, mask=0x10)
    db.close()
    with modelvault.open(path) as vault:
        with pytest.raises(IntegrityError) as info:
            vault.load("m")
        assert (info.value.model, info.value.version, info.value.chunk) == ("m", 1, chunk_hash)
        assert chunk_hash in str(info.value)
        problems = vault.verify()
        assert [(p.model, p.version, p.chunk) for p in problems] == [("m", 1, chunk_hash)]


def test_pickle_imports_names_classes_without_running_them():
    import pickle

    from sklearn.linear_model import LogisticRegression

    stream = pickle.dumps(LogisticRegression(), protocol=5)
    assert "sklearn.linear_model._logistic.LogisticRegression" in pickle_imports(stream)
    assert pickle_imports(pickle.dumps(Marker("x"), protocol=2)) == ["io.open"]


def test_key_ids_differ_between_keys():
    assert key_id(b"a" * 32) != key_id(b"b" * 32)
    assert len(key_id(b"a" * 32)) == 16


def test_imports_of_our_own_pickles_match_the_opcode_reading():
    import collections
    import pickle

    import cloudpickle
    from sklearn.tree import DecisionTreeClassifier

    from modelvault._trust import own_pickle_imports

    tree = DecisionTreeClassifier(max_depth=3).fit([[0], [1], [2], [3]], [0, 1, 0, 1])
    for obj in ({"a": collections.OrderedDict(x=1), "b": np.arange(3), "c": {1, 2}},
                tree, [np.float32(1), frozenset([2]), bytearray(b"x")]):
        stream = pickle.dumps(obj, protocol=5)
        assert own_pickle_imports(stream, []) == pickle_imports(stream)
    scale = 3
    stream = cloudpickle.dumps(lambda x: x * scale, protocol=5)
    assert own_pickle_imports(stream, []) == pickle_imports(stream)
    buffers = []
    stream = pickle.dumps(np.zeros(10), protocol=5, buffer_callback=buffers.append)
    assert own_pickle_imports(stream, [b.raw() for b in buffers]) == pickle_imports(stream)


def test_a_signed_only_app_refuses_every_version_its_team_key_did_not_sign(tmp_path,
                                                                          monkeypatch):
    """Hostile case: the file holds the team's version and a stranger's arrays version
    (other tensors, signed by another key, or unsigned, or with a broken signature).
    By default arrays need no signature; an app that requires one reads only the team's."""
    from click.testing import CliRunner

    from modelvault._cli import cli

    vault_path = tmp_path / "v.vault"
    runner = CliRunner()
    use_home(monkeypatch, tmp_path / "team")
    modelvault.save(vault_path, "churn", {"w": np.arange(3)})
    (tmp_path / "team.key").write_text(runner.invoke(cli, ["key", "export"]).output)
    use_home(monkeypatch, tmp_path / "stranger")
    modelvault.save(vault_path, "churn", {"w": -np.arange(3)})  # churn:2, their key
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"stranger")
    with modelvault.open(vault_path) as vault:
        vault.save_files("files", folder)
        vault.save("unsigned", {"w": np.ones(2)})
    with sqlite3.connect(vault_path) as db:
        db.execute("UPDATE versions SET key_id = NULL, signature = NULL WHERE id = "
                   "(SELECT v.id FROM versions v JOIN models m ON m.id = v.model_id "
                   "WHERE m.name = 'unsigned')")
    db.close()

    use_home(monkeypatch, tmp_path / "app")
    assert runner.invoke(cli, ["trust", str(tmp_path / "team.key")]).exit_code == 0
    with modelvault.open(vault_path) as vault:
        assert vault.load("churn:2")["w"].tolist() == [0, -1, -2]  # default: arrays load
    with modelvault.open(vault_path, require="trusted") as vault:
        assert vault.load("churn:1")["w"].tolist() == [0, 1, 2]
        for ref in ("churn:2", "churn", "unsigned"):
            for trust in (False, True):
                with pytest.raises(UntrustedError, match="require='trusted'"):
                    vault.load(ref, trust=trust)
        with pytest.raises(UntrustedError):
            vault.extract("files", tmp_path / "out")
        with pytest.raises(UntrustedError):
            vault.load("churn:2", keys="w")
        with pytest.raises(UntrustedError):
            vault.diff("churn:1", "churn:2")  # its values are its data too
    assert not (tmp_path / "out").exists()
    with modelvault.open(tmp_path / "app.vault", require="trusted") as app:
        report = app.merge(vault_path)  # as a pull: only what a trusted key signed
        assert [v.ref for v in app.versions()] == ["churn:1"]
        assert sum(c.startswith("not merged: ") for c in report.conflicts) == 3
    monkeypatch.setenv("MODELVAULT_REQUIRE", "trusted")  # the same for the CLI and load()
    with pytest.raises(UntrustedError):
        modelvault.load(vault_path, "churn:2")
    env = runner.invoke(cli, ["env", str(vault_path), "churn:2"])
    assert env.exit_code == 1 and "require='trusted'" in env.output
    got = runner.invoke(cli, ["get", str(vault_path), "files", "-o", str(tmp_path / "out")])
    assert got.exit_code == 1 and "require='trusted'" in got.output
    monkeypatch.setenv("MODELVAULT_REQUIRE", "signed")
    with pytest.raises(ValueError, match="require must be"):
        modelvault.open(vault_path)


def test_an_invalid_require_is_refused_before_the_file_is_made(tmp_path):
    """Vault() checked ``require`` before opening the file; the refactor opens (and
    creates) it first, then leaves the connection open when the check fails."""
    path = tmp_path / "x.vault"
    with pytest.raises(ValueError, match="require"):
        modelvault.open(path, require="bogus")
    assert not path.exists()
