"""Key pairs (issue #12): versions are signed with a private key that never leaves the
machine; teams share public keys, and trust is one-way, by name."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from click.testing import CliRunner

import modelvault
from modelvault import UntrustedError
from modelvault._cli import cli


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [str(a) for a in args])


def as_machine(monkeypatch, tmp_path, name):
    home = tmp_path / f"{name}-home"
    monkeypatch.setenv("MODELVAULT_HOME", str(home))
    return home


def alice_saves_and_exports(run, tmp_path, monkeypatch):
    """Alice saves a pickle into v.vault and exports her public key to alice.pub; then
    the machine is Bob's. Returns the vault's path."""
    path = tmp_path / "v.vault"
    as_machine(monkeypatch, tmp_path, "alice")
    modelvault.save(path, "alices", {"s": {1}})
    (tmp_path / "alice.pub").write_text(run("key", "export").output)
    as_machine(monkeypatch, tmp_path, "bob")
    return path


def test_export_prints_the_public_key_only(run, tmp_path, monkeypatch):
    home = as_machine(monkeypatch, tmp_path, "alice")
    result = run("key", "export", "--name", "alice")
    assert result.exit_code == 0, result.output
    private = (home / "private.key").read_text().strip().split(":", 1)[1]
    assert stat.S_IMODE((home / "private.key").stat().st_mode) == 0o600
    line = result.output.strip()
    assert line.startswith("modelvault-public-v2:") and line.endswith(" alice")
    assert private not in result.output  # nothing that can sign leaves the machine
    assert len(line.split()[0].split(":", 1)[1]) == 64


def test_a_teammates_public_key_is_trusted_by_name_one_way(run, tmp_path, monkeypatch):
    path = alice_saves_and_exports(run, tmp_path, monkeypatch)
    modelvault.save(path, "bobs", {"s": {2}})
    with pytest.raises(UntrustedError):
        modelvault.load(path, "alices")
    trusted = run("trust", tmp_path / "alice.pub", "--name", "alice")
    assert trusted.exit_code == 0, trusted.output
    assert trusted.output.startswith("trusted alice (key ")
    assert modelvault.load(path, "alices") == {"s": {1}}
    with modelvault.open(path) as vault:
        assert vault.get("alices").signer == "alice"
        assert vault.get("bobs").signer == "this machine"
    shown = run("show", path, "alices")
    assert "signature:   trusted, signed by alice (key " in shown.output
    listed = run("keys")
    assert [line.split()[0] for line in listed.output.splitlines()[2:]] == ["this", "alice"]

    as_machine(monkeypatch, tmp_path, "alice")  # and Alice does not trust Bob for it
    with pytest.raises(UntrustedError):
        modelvault.load(path, "bobs")
    shown = run("show", path, "bobs")
    assert "untrusted: signed by key " in shown.output


def test_untrust_removes_a_key(run, tmp_path, monkeypatch):
    path = alice_saves_and_exports(run, tmp_path, monkeypatch)
    assert run("trust", tmp_path / "alice.pub").exit_code == 0  # named by the file: user@host
    # Bob has saved nothing: no key of his own yet, so Alice's is the only one.
    names = [k["name"] for k in json.loads(run("keys", "--json").output)]
    assert len(names) == 1 and "@" in names[0]
    other = names[0]
    assert modelvault.load(path, "alices") == {"s": {1}}
    removed = run("untrust", other)
    assert removed.exit_code == 0 and removed.output.startswith(f"no longer trusted: {other}")
    with pytest.raises(UntrustedError):
        modelvault.load(path, "alices")
    again = run("untrust", other)
    assert again.exit_code == 1 and "no key is trusted as" in again.output


@pytest.mark.parametrize("text, message", [
    ("hello", "not a modelvault public key"),
    ("modelvault-public-v2:zz alice", "invalid hex"),
    ("modelvault-public-v2:" + "ab" * 16 + " alice", "32 bytes, not 16"),
    ("modelvault-private-v2:" + "ab" * 32, "is a private key; never share it"),
    ("", "empty key file"),
])
def test_a_bad_or_wrong_kind_of_key_file_is_one_clear_error(run, tmp_path, text, message):
    bad = tmp_path / "bad.pub"
    bad.write_text(text)
    result = run("trust", bad)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    listed = run("keys", "--json")
    assert "bad" not in listed.output  # nothing was trusted


def test_names_and_keys_are_trusted_once(run, tmp_path, monkeypatch):
    as_machine(monkeypatch, tmp_path, "alice")
    (tmp_path / "alice.pub").write_text(run("key", "export").output)
    as_machine(monkeypatch, tmp_path, "carol")
    (tmp_path / "carol.pub").write_text(run("key", "export").output)
    as_machine(monkeypatch, tmp_path, "bob")
    assert run("trust", tmp_path / "alice.pub", "--name", "alice").exit_code == 0
    twice = run("trust", tmp_path / "alice.pub", "--name", "al")
    assert twice.exit_code == 1 and "trusted already, as 'alice'" in twice.output
    taken = run("trust", tmp_path / "carol.pub", "--name", "alice")
    assert taken.exit_code == 1 and "a key named 'alice' is trusted already" in taken.output
    invalid = run("trust", tmp_path / "carol.pub", "--name", "../../etc")
    assert invalid.exit_code == 1 and "invalid key name" in invalid.output


def test_a_tampered_version_fails_its_key_pair_signature(tmp_path, monkeypatch):
    import sqlite3

    as_machine(monkeypatch, tmp_path, "alice")
    path = tmp_path / "v.vault"
    modelvault.save(path, "obj", {"s": {1}}, metadata={"auc": 0.5})
    modelvault.save(path, "arr", {"w": np.zeros(3)}, parent="obj:1")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE lineage SET parent = NULL")  # the lineage is signed too
        db.execute("UPDATE versions SET metadata = '{\"auc\": 0.99}' WHERE id = 1")
    db.close()
    with modelvault.open(path) as vault:
        assert vault.get("obj").signature == "invalid"
        assert vault.get("arr").signature == "invalid"
        with pytest.raises(UntrustedError):
            vault.load("obj")
        assert {p.model for p in vault.verify()} == {"obj", "arr"}


def test_a_forged_parent_cannot_hide_in_the_source_column(tmp_path, monkeypatch):
    import sqlite3

    as_machine(monkeypatch, tmp_path, "alice")
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        real = vault.save("base", {"w": np.zeros(2)})
        other = vault.save("other", {"w": np.ones(2)})
        vault.save("tuned", {"s": {1}}, parent=real)
    with sqlite3.connect(path) as db:  # a second "parent" key, smuggled into source
        db.execute("UPDATE lineage SET parent = ?, source = ? WHERE parent = ?",
                   (other.id, f'{{}}, "parent": "{real.id}"', real.id))
        db.execute("INSERT INTO lineage (version_id, parent, source) VALUES "
                   "((SELECT id FROM versions WHERE uuid = ?), X'00ff', '{}') "
                   "ON CONFLICT (version_id) DO UPDATE SET parent = X'00ff'", (other.id,))
    db.close()
    with modelvault.open(path) as vault:
        assert vault.get("tuned").signature == "invalid"
        assert vault.get("other").signature == "invalid"  # a blob parent: not an error
        with pytest.raises(UntrustedError):
            vault.load("tuned")
        assert {p.model for p in vault.verify()} == {"tuned", "other"}
