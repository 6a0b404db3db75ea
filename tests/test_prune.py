"""Retention (issue #21, item 3, on a vault): prune deletes the versions no rule keeps,
never a model's latest, never an aliased one unless told; a dry run deletes nothing; the
bytes it says gc frees are the bytes gc frees."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from click.testing import CliRunner

import modelvault
from modelvault import NotFoundError
from modelvault._cli import cli


def _weights(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(50_000).astype(np.float32)}


@pytest.fixture
def series(vault_path):
    """m:1..6 (m:2 @prod, m:3 tagged), n:1..2; each version's weights distinct."""
    with modelvault.open(vault_path) as vault:
        for i in range(1, 7):
            vault.save("m", _weights(i), aliases=["prod"] if i == 2 else [],
                       tags={"keep": "yes"} if i == 3 else None, parent=False)
        for i in range(1, 3):
            vault.save("n", _weights(100 + i), parent=False)
    return vault_path


def _refs(vault: modelvault.Vault) -> list[str]:
    return [v.ref for v in vault.versions()]


# Rules and what they leave of `series` (tests/test_remote_prune.py: of a remote's too).
RULES = [
    ({"keep_last": 2}, ["m:2", "m:5", "m:6", "n:1", "n:2"]),
    ({"keep_last": 1}, ["m:2", "m:6", "n:2"]),
    ({"keep_last": 1, "keep_aliased": False}, ["m:6", "n:2"]),
    ({"keep_last": 1, "keep_tagged": True}, ["m:2", "m:3", "m:6", "n:2"]),
    ({"keep_tagged": True, "keep_aliased": False}, ["m:3", "m:6", "n:2"]),
    ({"keep_last": 10}, ["m:1", "m:2", "m:3", "m:4", "m:5", "m:6", "n:1", "n:2"]),
]


@pytest.mark.parametrize(("rules", "left"), RULES)
def test_the_rules_keep_what_they_say_and_every_models_latest(series, rules, left):
    with modelvault.open(series) as vault:
        report = vault.prune(**rules)
        assert _refs(vault) == left
        assert sorted(mv.ref for mv in report.deleted) == sorted(
            set(["m:1", "m:2", "m:3", "m:4", "m:5", "m:6", "n:1", "n:2"]) - set(left))
        assert report.kept == len(left) and not report.dry_run
        for ref in left:  # what stays loads whole
            vault.load(ref)
        assert vault.verify() == []


def test_keep_since_by_date_string_and_datetime(series):
    with modelvault.open(series) as vault:
        times = {v.ref: v.created_at for v in vault.versions()}
        cut = times["m:5"]
        assert vault.prune("m", keep_since=cut, dry_run=True).deleted == tuple(
            v for v in vault.versions("m") if v.version in (1, 3, 4))
        naive = cut.astimezone(timezone.utc).replace(tzinfo=None)
        assert [mv.ref for mv in vault.prune("m", keep_since=naive, dry_run=True).deleted] \
            == ["m:1", "m:3", "m:4"]
        tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
        assert [mv.ref for mv in vault.prune("m", keep_since=tomorrow).deleted] \
            == ["m:1", "m:3", "m:4", "m:5"]
        assert _refs(vault) == ["m:2", "m:6", "n:1", "n:2"]  # n untouched: prune("m")


def test_a_dry_run_deletes_nothing_and_says_what_gc_would_free(series):
    with modelvault.open(series) as vault:
        before = _refs(vault)
        dry = vault.prune(keep_last=1, dry_run=True)
        assert _refs(vault) == before and dry.dry_run
        stored = vault.stats().stored_bytes
        real = vault.prune(keep_last=1)
        assert [mv.ref for mv in real.deleted] == [mv.ref for mv in dry.deleted]
        assert real.freed_bytes == dry.freed_bytes > 5 * 150_000
        assert vault.stats().stored_bytes == stored  # nothing freed before gc
        vault.gc()
        assert vault.stats().stored_bytes == pytest.approx(stored - real.freed_bytes, abs=1)


def test_chunks_a_kept_version_shares_or_bases_on_are_not_counted_and_stay(vault_path):
    base = _weights(1)
    tuned = {"w": base["w"] + np.float32(1e-4)}
    with modelvault.open(vault_path) as vault:
        vault.save("m", base)
        vault.save("m", base)  # the same chunks again: nothing of m:1 is freed with it
        vault.save("m", tuned)  # a delta of m:2's chunks
        report = vault.prune(keep_last=1)
        assert [mv.ref for mv in report.deleted] == ["m:1", "m:2"]
        assert report.freed_bytes == 0  # m:3's delta needs its base
        vault.gc()
        assert vault.verify() == []
        np.testing.assert_array_equal(vault.load("m")["w"], tuned["w"])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({}, ValueError, "needs a rule"),
    ({"keep_aliased": False}, ValueError, "needs a rule"),
    ({"keep_last": 0}, ValueError, "at least 1"),
    ({"keep_last": True}, ValueError, "at least 1"),
    ({"keep_since": "yesterday"}, ValueError, "ISO 8601"),
    ({"keep_since": 12}, TypeError, "datetime"),
])
def test_bad_rules_are_refused_before_anything_is_deleted(series, kwargs, error, match):
    with modelvault.open(series) as vault:
        with pytest.raises(error, match=match):
            vault.prune(**kwargs)
        assert len(vault.versions()) == 8


def test_an_unknown_model_is_not_found(series):
    with modelvault.open(series) as vault, pytest.raises(NotFoundError, match="nope"):
        vault.prune("nope", keep_last=1)


def test_a_read_only_vault_refuses_to_prune(series):
    with modelvault.open(series, readonly=True) as vault, \
            pytest.raises(modelvault.VaultError):
        vault.prune(keep_last=1)


def test_a_damaged_created_at_is_an_error_not_a_guess(series):
    with sqlite3.connect(series) as db:
        db.execute("UPDATE versions SET created_at = 'not a time' WHERE version = 1")
    with pytest.raises(modelvault.VaultError), modelvault.open(series) as vault:
        vault.prune(keep_since="2020-01-01")
    db = sqlite3.connect(series)
    assert db.execute("SELECT count(*) FROM versions").fetchone() == (8,)


def test_the_cli_prints_what_it_deletes_and_what_gc_frees(series):
    runner = CliRunner()
    dry = runner.invoke(cli, ["prune", str(series), "m", "--keep-last", "1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would delete 4 version(s), kept 2; `modelvault gc` would free")
    assert [line.split()[0] for line in dry.output.splitlines()[1:]] == [
        "m:1", "m:3", "m:4", "m:5"]
    done = runner.invoke(cli, ["prune", str(series), "--keep-last", "1", "--keep-tagged",
                               "--drop-aliased", "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.output)
    assert [f"{v['name']}:{v['version']}" for v in out["deleted"]] == [
        "m:1", "m:2", "m:4", "m:5", "n:1"]
    assert out["kept"] == 3 and out["freed_bytes"] > 0 and out["dry_run"] is False
    refused = runner.invoke(cli, ["prune", str(series)])
    assert refused.exit_code != 0 and "needs a rule" in refused.output
    with modelvault.open(series) as vault:
        assert _refs(vault) == ["m:3", "m:6", "n:2"]
