import json
import sqlite3

import pytest


def test_verify_healthy(run, vault_file):
    result = run("verify", vault_file)
    assert result.exit_code == 0
    assert result.output.startswith("ok: 3 versions")


def test_verify_reports_damage_and_fails(run, vault_file):
    with sqlite3.connect(vault_file) as db:
        db.execute("UPDATE packs SET data = zeroblob(length(data)) WHERE id = "
                   "(SELECT min(id) FROM packs)")
    db.close()
    result = run("verify", vault_file)
    assert result.exit_code == 1
    assert "churn" in result.output or "team/weights" in result.output
    problems = json.loads(run("verify", vault_file, "--json").output)
    assert problems and problems[0]["chunk"]


def test_stats(run, vault_file):
    result = run("stats", vault_file)
    assert result.exit_code == 0
    assert "versions:     3" in result.output
    stats = json.loads(run("stats", vault_file, "--json").output)
    assert stats["versions"] == 3 and stats["models"] == 2
    assert stats["raw_bytes"] >= stats["unique_bytes"]
    assert stats["dedup_ratio"] >= 1.0


def test_stats_says_plainly_whether_the_file_is_smaller_or_larger(run, tmp_path, vault_file):
    import numpy as np

    import modelvault

    # A tiny model: the empty tables alone outweigh it.
    small = tmp_path / "small.vault"
    with modelvault.open(small) as vault:
        vault.save("m", {"w": np.arange(10.0)})
    line = [ln for ln in run("stats", small).output.splitlines() if ln.startswith("file:")]
    assert line and line[0].endswith("x larger than raw)"), line
    # Versions that share most of their bytes: far smaller than raw.
    with modelvault.open(vault_file) as vault:
        weights = vault.load("team/weights")
        for _ in range(8):
            vault.save("team/weights", weights)
    line = [ln for ln in run("stats", vault_file).output.splitlines() if ln.startswith("file:")]
    assert line and line[0].endswith("x smaller than raw)"), line
    empty = tmp_path / "empty.vault"
    modelvault.open(empty).close()
    assert "(no model bytes in it)" in run("stats", empty).output


def test_a_vault_cut_short_verify_names_each_damaged_version_and_export_salvages_the_rest(
        run, tmp_path):
    """Issue #18: 1,000 bytes cut off a vault (a failed download), and it opened, read,
    took saves; verify said only "database disk image is malformed"; export failed."""
    import numpy as np

    import modelvault

    path = tmp_path / "cut.vault"
    rng = np.random.default_rng(0)
    saved = {}
    with modelvault.open(path) as vault:
        for _ in range(4):
            saved[vault.save("m", {"w": rng.normal(size=120_000)}).ref] = None
        saved[vault.save("small", {"w": np.ones(3)}).ref] = None
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    # What cannot be read, found by loading each version (not by verify).
    damaged = set()
    with pytest.warns(modelvault.DamagedVaultWarning, match="cut short"):
        vault = modelvault.open(path)
    with vault:
        for ref in saved:
            try:
                vault.load(ref)
            except modelvault.IntegrityError as exc:
                assert exc.model is not None
                damaged.add(ref)
    assert damaged and damaged != set(saved)

    result = run("verify", path)
    assert result.exit_code == 1
    assert "cut short" in result.output
    named = {p["model"] + ":" + str(p["version"])
             for p in json.loads(run("verify", path, "--json").stdout) if p["model"]}
    assert named == damaged

    before = path.read_bytes()
    result = run("put", path, "m", __file__)
    assert result.exit_code == 1 and "cut short" in result.output and "--skip-damaged" in (
        result.output)
    assert path.read_bytes() == before

    copy = tmp_path / "salvaged.vault"
    result = run("export", path, copy, "--skip-damaged")
    assert result.exit_code == 0, result.output
    assert f"exported {len(saved) - len(damaged)} versions" in result.output
    assert all(ref in result.output for ref in damaged)  # left out, and named
    with modelvault.open(copy) as salvaged:
        assert {v.ref for v in salvaged.versions()} == set(saved) - damaged
        assert salvaged.verify() == []
