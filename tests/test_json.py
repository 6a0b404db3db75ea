"""JSON read from a vault is input from whoever made the file (issue #18): bounded in
nesting, without duplicate keys, and every failure a typed error."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from helpers import version_id

import modelvault
from modelvault import _json

DEEP = "[" * 50_000 + "]" * 50_000
DEEP_OBJECT = '{"a":' * 50_000 + "1" + "}" * 50_000


def test_nesting_is_bounded_without_recursion():
    assert _json.loads("[" * _json.MAX_DEPTH + "]" * _json.MAX_DEPTH)
    for text in (DEEP, DEEP_OBJECT, "[" * (_json.MAX_DEPTH + 1) + "]" * (_json.MAX_DEPTH + 1)):
        with pytest.raises(ValueError, match="nested deeper"):
            _json.loads(text)


def test_a_repeated_key_is_refused():
    with pytest.raises(ValueError, match="repeats the key 'acc'"):
        _json.loads('{"acc": 0.99, "n": 1, "acc": 0.1}')


def _forge(path, sql, *args):
    with sqlite3.connect(path) as db:
        db.execute(sql, (*args, version_id(db, "m")))
    db.close()


FORGERIES = {
    "layout": "UPDATE versions SET layout = ? WHERE id = ?",
    "metadata": "UPDATE versions SET metadata = ? WHERE id = ?",
    "environment": "UPDATE environments SET json = ? WHERE id = "
                   "(SELECT environment_id FROM versions WHERE id = ?)",
    "lineage": "UPDATE lineage SET source = ? WHERE version_id = ?",
}


@pytest.mark.parametrize("text", [DEEP, DEEP_OBJECT], ids=["lists", "objects"])
@pytest.mark.parametrize("column", FORGERIES)
def test_deep_json_anywhere_in_a_version_gives_typed_errors(vault_path, column, text):
    """Hostile case: 50,000 levels in each JSON column a reader parses. Every entry point
    that reads it answers with a VaultError (or a status), never RecursionError; verify
    names the version and goes on to the others."""
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.arange(3.0)}, metadata={"acc": 0.9})
        vault.save("other", {"w": np.ones(2)})
    _forge(vault_path, FORGERIES[column], text)
    with modelvault.open(vault_path) as vault:
        mv = vault.get("m")
        assert mv.signature in ("invalid", "trusted")  # a status, not an exception
        for read in (lambda: mv.metadata, lambda: mv.environment, lambda: mv.source,
                     lambda: vault.load("m", trust=True), lambda: vault.diff("m", "other"),
                     lambda: vault.load("m")):
            try:
                read()
            except modelvault.VaultError:
                pass
        # (versions saved in one environment share its row: both then fail)
        assert "m" in {p.model for p in vault.verify()}


def test_a_repeated_key_in_signed_metadata_is_not_trusted(vault_path):
    """Hostile case: {"acc": 0.99, "acc": 0.1} parses as 0.1 in Python and 0.99 in
    SQLite's json_extract; a signature made over one must not vouch for the other."""
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.arange(3.0)}, metadata={"acc": 0.1})
        assert vault.get("m").signature == "trusted"
    _forge(vault_path, FORGERIES["metadata"], '{"acc": 0.99, "acc": 0.1}')
    with modelvault.open(vault_path) as vault:
        mv = vault.get("m")
        assert mv.signature == "invalid"
        with pytest.raises(modelvault.IntegrityError, match="metadata"):
            _ = mv.metadata
        assert any(p.model == "m" for p in vault.verify())


def test_saving_what_could_not_be_read_back_is_refused(vault):
    deep: dict = {}
    node = deep
    for _ in range(_json.MAX_DEPTH + 5):
        node["a"] = node = {}
    with pytest.raises(ValueError, match="nest"):
        vault.save("m", {"w": np.ones(1)}, metadata=deep)
    with pytest.raises(ValueError, match="nested deeper"):
        vault.save("m", _nest(np.ones(1), _json.MAX_DEPTH + 5))
    assert vault.versions() == []


def _nest(value, levels):
    for _ in range(levels):
        value = [value]
    return value
