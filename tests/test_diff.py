"""vault.diff and `modelvault diff` (issue #12): what changed between two versions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import one_line_error

import modelvault
from modelvault import _environment


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "modelvault", *map(str, args)],
                          capture_output=True, text=True)


def by_name(diff):
    return {e.name: e for e in diff.entries}


def test_arrays_entries_added_removed_and_changed_with_their_numbers(vault):
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(300_000)  # 2.4 MB, unchanged: its chunks are shared
    w = np.arange(1, 11, dtype=np.float32)
    w2 = w.copy()
    w2[[2, 7]] += np.float32(0.5)
    vault.save("m", {"shared": shared, "w": w, "gone": np.ones(3), "shape": np.zeros(3),
                     "dtype": np.zeros(3, np.float32), "labels": np.array(["a", "b"])})
    vault.save("m", {"shared": shared, "w": w2, "new": np.ones(2, np.int8),
                     "shape": np.zeros((3, 1)), "dtype": np.zeros(3, np.float64),
                     "labels": np.array(["a", "c"])})
    d = vault.diff("m:1", "m:2")
    assert (d.a, d.b, d.kind) == ("m:1", "m:2", "arrays") and d
    entries = by_name(d)
    assert entries["shared"].change == "same" and entries["shared"].changed_share == 0.0
    assert entries["shared"].max_abs == 0.0 and entries["shared"].rel_l2 == 0.0
    changed = entries["w"]
    assert changed.change == "changed" and changed.dtype == ("float32", "float32")
    assert changed.shape == ((10,), (10,)) and changed.size == (40, 40)
    assert changed.max_abs == pytest.approx(0.5)
    assert changed.rel_l2 == pytest.approx(np.sqrt(0.5) / np.linalg.norm(w))
    assert changed.changed_share == pytest.approx(0.2)
    assert entries["gone"].change == "removed" and entries["gone"].shape == ((3,), None)
    assert entries["new"].change == "added" and entries["new"].dtype == (None, "int8")
    assert entries["shape"].change == "changed" and entries["shape"].shape == ((3,), (3, 1))
    assert entries["shape"].max_abs is None  # no element-wise numbers across shapes
    assert entries["dtype"].dtype == ("float32", "float64") and entries["dtype"].max_abs is None
    # Strings compare by element, with no arithmetic.
    assert entries["labels"].changed_share == 0.5 and entries["labels"].max_abs is None
    assert {e.name for e in d.changed} == {"w", "gone", "new", "shape", "dtype", "labels"}
    assert d.same_stream is None
    assert d.shared_bytes >= shared.nbytes and d.new_bytes < 100_000


def test_bits_decide_what_changed_nan_and_negative_zero(vault):
    a = np.array([np.nan, 0.0, 1.0])
    vault.save("m", {"x": a})
    vault.save("m", {"x": np.array([np.nan, -0.0, 1.0])})
    vault.save("m", {"x": a.copy()})
    moved = by_name(vault.diff("m:1", "m:2"))["x"]
    assert moved.change == "changed" and moved.changed_share == pytest.approx(1 / 3)
    assert moved.max_abs == 0.0  # -0.0 equals 0.0 in value, not in bits
    assert not vault.diff("m:1", "m:3")  # NaN where NaN was: nothing differs


def test_across_models_metadata_tags_aliases_description(vault):
    vault.save("bert-base", {"w": np.zeros(4)}, metadata={"acc": 0.9, "lr": 1e-4},
               tags={"stage": "dev", "team": "nlp"}, aliases=["stable"], description="base")
    vault.save("bert-sst2", {"w": np.zeros(4)}, metadata={"acc": 0.93, "task": "sst2"},
               tags={"stage": "prod", "team": "nlp"}, aliases=["prod"], description="tuned")
    d = vault.diff("bert-base:1", "bert-sst2@prod")
    assert d.metadata == modelvault.Changes({"task": "sst2"}, {"lr": 1e-4},
                                            {"acc": (0.9, 0.93)})
    assert d.tags == modelvault.Changes({}, {}, {"stage": ("dev", "prod")})
    assert d.aliases == modelvault.Changes({"prod": "bert-sst2:1"}, {"stable": "bert-base:1"})
    assert d.description == ("base", "tuned")
    assert not d.changed and d.shared_bytes == 32 and d.new_bytes == 0
    same = vault.diff("bert-base", "bert-base:1")
    assert not same and same.description is None and not same.metadata


def test_environment_changes(vault, monkeypatch):
    real = _environment.capture

    def older_numpy(imports):
        env = real(imports)
        return {**env, "python": "3.10.1",
                "packages": {**env["packages"], "numpy": "1.26.4", "oldlib": "0.1"}}

    monkeypatch.setattr(_environment, "capture", older_numpy)
    vault.save("m", {"w": np.zeros(3)})
    monkeypatch.setattr(_environment, "capture", real)
    vault.save("m", {"w": np.zeros(3)})
    env = vault.diff("m:1", "m:2").environment
    assert env.changed["numpy"] == ("1.26.4", np.__version__)
    assert env.changed["python"][0] == "3.10.1"
    assert env.removed == {"oldlib": "0.1"} and env.added == {}


def test_pickles_compare_streams_without_unpickling_another_machines(vault_path, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "their-keys"))
    with modelvault.open(vault_path) as vault:
        vault.save("p", {"labels": {"cat", "dog"}})
        vault.save("p", {"labels": {"cat", "dog"}})
        vault.save("p", {"labels": {"cat", "emu"}})
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "my-keys"))
    with modelvault.open(vault_path) as vault:
        with pytest.raises(modelvault.UntrustedError):
            vault.load("p:1")
        assert vault.diff("p:1", "p:2").same_stream is True
        d = vault.diff("p:1", "p:3")
        assert d.same_stream is False and d and d.entries == ()


def test_files_paths_with_sizes_and_safetensors_tensors(vault, tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy", reason="needs safetensors")
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    (one / "config.json").write_text('{"layers": 2}')
    (two / "config.json").write_text('{"layers": 3}')
    (one / "README.md").write_text("same")
    (two / "README.md").write_text("same")
    (one / "old.txt").write_text("x" * 10)
    (two / "new.txt").write_text("y" * 20)
    w = np.arange(12, dtype=np.float32)
    safetensors.save_file({"w": w, "b": np.zeros(2, np.float32)}, one / "model.safetensors")
    safetensors.save_file({"w": w * 2, "b": np.zeros(2, np.float32)}, two / "model.safetensors")
    vault.save_files("folder", one)
    vault.save_files("folder", two)
    entries = by_name(vault.diff("folder:1", "folder:2"))
    assert entries["config.json"].change == "changed"
    assert entries["config.json"].size == (13, 13)
    assert entries["README.md"].change == "same"
    assert entries["old.txt"].change == "removed" and entries["old.txt"].size == (10, None)
    assert entries["new.txt"].change == "added" and entries["new.txt"].size == (None, 20)
    assert entries["model.safetensors"].change == "changed"
    assert entries["w"].change == "changed" and entries["w"].max_abs == pytest.approx(11.0)
    assert entries["b"].change == "same"


def test_torch_tensors_bfloat16(vault):
    torch = pytest.importorskip("torch", reason="tensor versions need torch")
    a = {"w": torch.arange(8, dtype=torch.bfloat16), "i": torch.arange(3)}
    b = {"w": a["w"].clone(), "i": torch.arange(3)}
    b["w"][0] = 0.5
    vault.save("t", a)
    vault.save("t", b)
    entries = by_name(vault.diff("t:1", "t:2"))
    assert entries["w"].dtype == ("bfloat16", "bfloat16")
    assert entries["w"].max_abs == pytest.approx(0.5)
    assert entries["w"].changed_share == pytest.approx(1 / 8)
    assert entries["i"].change == "same" and entries["i"].dtype == ("int64", "int64")


def test_different_kinds_one_clear_error_and_nothing_changes(vault, vault_path):
    vault.save("a", {"w": np.zeros(3)})
    vault.save("p", {"labels": {"x"}})
    before = vault_path.read_bytes()
    with pytest.raises(ValueError, match="a:1, an arrays version, with p:1, a pickle version"):
        vault.diff("a", "p")
    with pytest.raises(modelvault.NotFoundError):
        vault.diff("a", "missing")
    vault.close()
    result = run_cli("diff", vault_path, "a", "p")
    assert one_line_error(result) and "pickle version" in result.stderr
    assert vault_path.read_bytes() == before


def test_cli_text_and_json(vault, vault_path):
    vault.save("m", {"w": np.arange(4.0), "old": np.zeros(2)}, metadata={"acc": 0.9})
    vault.save("m", {"w": np.arange(4.0) * 2, "new": np.zeros(2)}, metadata={"acc": 0.95})
    vault.close()
    result = run_cli("diff", vault_path, "m:1", "m:2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("m:1 -> m:2 (arrays versions): they differ")
    assert "  ~ acc: 0.9 -> 0.95" in out
    assert "entries: 0 same, 1 changed, 1 added, 1 removed" in out
    # 0 * 2 stays 0: three of the four values changed
    assert any(line.split()[:4] == ["~", "w", "float64", "4"] and line.split()[-1] == "75.0%"
               for line in out.splitlines())
    assert "bytes:" in out.splitlines()[-1]
    as_json = json.loads(run_cli("diff", vault_path, "m:1", "m:2", "--json").stdout)
    assert as_json["metadata"]["changed"] == {"acc": [0.9, 0.95]}
    w = next(e for e in as_json["entries"] if e["name"] == "w")
    assert w["max_abs"] == 3.0 and w["shape"] == [[4], [4]]
    same = run_cli("diff", vault_path, "m:1", "m:1")
    assert same.returncode == 0 and "no differences" in same.stdout


def test_plain_values_big_integers_and_non_finite_numbers(vault, vault_path):
    big = np.array([2 ** 62, 5], dtype=np.int64)
    vault.save("m", {"w": np.array([1.0, np.inf, np.nan]), "epoch": 6, "note": "a",
                     "ids": big, "lr": 0.1})
    vault.save("m", {"w": np.array([1.0, 2.0, np.nan]), "epoch": 7, "note": "a",
                     "ids": big + np.array([1, 0]), "extra": None})
    entries = by_name(vault.diff("m:1", "m:2"))
    assert entries["epoch"].change == "changed" and entries["epoch"].max_abs == 1.0
    assert entries["epoch"].dtype == ("int", "int")
    assert entries["note"].change == "same"
    assert entries["lr"].change == "removed" and entries["extra"].change == "added"
    assert entries["ids"].max_abs == 1.0 and entries["ids"].changed_share == 0.5
    assert entries["w"].max_abs == float("inf")  # inf -> 2.0; NaN where NaN was: no change
    assert entries["w"].changed_share == pytest.approx(1 / 3)
    vault.close()
    as_json = run_cli("diff", vault_path, "m:1", "m:2", "--json")
    w = next(e for e in json.loads(as_json.stdout)["entries"] if e["name"] == "w")
    assert w["max_abs"] == "inf"  # valid JSON: no Infinity


def test_complex_half_tensors(vault):
    torch = pytest.importorskip("torch", reason="tensor versions need torch")
    a = torch.zeros(3, dtype=torch.complex32)
    b = a.clone()
    b[1] = 1
    vault.save("c", {"z": a})
    vault.save("c", {"z": b})
    z = by_name(vault.diff("c:1", "c:2"))["z"]
    assert z.dtype == ("complex32", "complex32") and z.max_abs == pytest.approx(1.0)
