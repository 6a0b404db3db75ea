"""Lineage and package rows (issue #12): where a version came from, queryable in SQL."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import modelvault
from modelvault import _environment

DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                        "HOME": str(cwd), "PATH": "/usr/bin:/bin"})


def save_script(tmp_path, body):
    """Run a script that saves into models.vault, from ``tmp_path``; returns its path."""
    script = tmp_path / "train.py"
    script.write_text("import numpy as np, modelvault\n"
                      "with modelvault.open('models.vault') as v:\n" + body)
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    return script


def test_parent_is_recorded_and_the_chain_followed(vault):
    base = vault.save("bert-base", {"w": np.zeros(4)})
    tuned = vault.save("bert-sst2", {"w": np.ones(4)}, parent="bert-base:1")
    again = vault.save("bert-sst2", {"w": np.full(4, 2.0)}, parent=tuned)
    plain = vault.save("bert-sst2", {"w": np.full(4, 3.0)})  # delta base by default: no lineage
    assert base.parent is None and tuned.parent == base.id and again.parent == tuned.id
    assert plain.parent is None
    assert [v.ref for v in vault.lineage("bert-sst2:2")] == ["bert-sst2:1", "bert-base:1"]
    assert vault.lineage("bert-base") == [] and vault.lineage(plain) == []
    with pytest.raises(modelvault.NotFoundError):
        vault.save("x", {"w": np.zeros(1)}, parent="no-such-model")
    assert "x" not in {m.name for m in vault.models()}  # nothing was written


def test_source_records_git_and_script(tmp_path):
    git(tmp_path, "init", "-q", "-b", "trial")
    (tmp_path / "data.txt").write_text("1")
    git(tmp_path, "add", "data.txt")
    git(tmp_path, "commit", "-q", "-m", "first")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout.strip()
    script = save_script(tmp_path, "    v.save('m', {'w': np.zeros(2)})\n")
    (tmp_path / "data.txt").write_text("2")  # a tracked file changes: dirty
    save_script(tmp_path, "    v.save('m', {'w': np.ones(2)})\n")
    with modelvault.open(tmp_path / "models.vault") as vault:
        clean, dirty = vault.get("m:1").source, vault.get("m:2").source
    assert clean == {"git_commit": commit, "git_branch": "trial", "git_dirty": False,
                     "script": str(script)}
    assert dirty["git_dirty"] is True and dirty["git_commit"] == commit


def test_source_outside_git_and_turned_off(tmp_path, monkeypatch):
    script = save_script(tmp_path, "    v.save('m', {'w': np.zeros(2)})\n"
                                   "    v.save('m', {'w': np.ones(2)}, source=False)\n")
    monkeypatch.setenv("MODELVAULT_NO_SOURCE", "1")
    with modelvault.open(tmp_path / "models.vault") as vault:
        vault.save("m", {"w": np.full(2, 2.0)})
        assert vault.get("m:1").source == {"script": str(script)}  # no repository there
        assert vault.get("m:2").source == {} and vault.get("m:3").source == {}


def test_lineage_survives_export_and_merge_and_a_missing_parent_is_named(vault, tmp_path):
    base = vault.save("base", {"w": np.zeros(4)})
    vault.save("tuned", {"w": np.ones(4)}, parent=base)
    exported = vault.export(tmp_path / "some.vault", refs=["tuned"])
    with modelvault.open(exported) as copy:
        tuned = copy.get("tuned")
        assert tuned.parent == base.id and tuned.source == vault.get("tuned").source
        assert copy.lineage("tuned") == []  # its parent stayed behind
        assert tuned.signature == "trusted"  # lineage and signature both came along
    merged = tmp_path / "merged.vault"
    with modelvault.open(merged) as other:
        other.merge(vault.path)
        assert [v.ref for v in other.lineage("tuned")] == ["base:1"]
    from click.testing import CliRunner

    from modelvault._cli import cli

    shown = CliRunner().invoke(cli, ["lineage", str(exported), "tuned"])
    assert shown.exit_code == 0
    assert shown.output.splitlines()[-1].strip() == f"{base.id} (not in this vault)"
    chain = CliRunner().invoke(cli, ["lineage", str(merged), "tuned"])
    assert [line.split()[0] for line in chain.output.splitlines()] == ["tuned:1", "base:1"]
    show = CliRunner().invoke(cli, ["show", str(merged), "tuned"])
    assert f"parent:      base:1 ({base.id})" in show.output


def test_the_documented_queries_work_without_json_functions_or_trusted_schema(vault,
                                                                                 vault_path,
                                                                                 monkeypatch):
    real = _environment.capture

    def with_sklearn(version):
        def capture(imports):
            env = real(imports)
            return {**env, "packages": {**env["packages"], "scikit-learn": version}}
        return capture

    monkeypatch.setattr(_environment, "capture", with_sklearn("1.5.2"))
    vault.save("churn", {"w": np.zeros(2)})
    vault.save("churn", {"w": np.ones(2)})
    monkeypatch.setattr(_environment, "capture", with_sklearn("1.6.0"))
    vault.save("churn", {"w": np.full(2, 2.0)})
    vault.save("base", {"w": np.zeros(2)})
    vault.save("churn", {"w": np.full(2, 3.0)}, parent="churn:2")
    vault.save("churn", {"w": np.full(2, 4.0)}, parent="churn:4")
    vault.close()
    text = DOC.read_text(encoding="utf-8")
    by_package, chain = [q for q in re.findall(r"```sql\n(.*?)```", text, re.S)
                         if "p.version LIKE '1.5.%'" in q or "WITH RECURSIVE chain" in q]
    db = sqlite3.connect(vault_path)
    try:
        db.execute("PRAGMA trusted_schema = OFF")
        assert db.execute(by_package).fetchall() == [("churn", 1, "1.5.2"), ("churn", 2, "1.5.2")]
        last = db.execute("SELECT v.id FROM versions v JOIN models m ON m.id = v.model_id "
                          "WHERE m.name = 'churn' AND v.version = 5").fetchone()[0]
        assert db.execute(chain, (last,)).fetchall() == [("churn", 4), ("churn", 2)]
    finally:
        db.close()
