import json
import sqlite3


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
