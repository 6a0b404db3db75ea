"""Selftest (issue #12): an example saved with a model, asked again after an upgrade."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import modelvault

SWITCHY = textwrap.dedent('''
    """A model whose answers depend on a module-level switch, as a library upgrade's would."""
    import os

    import numpy as np

    DOUBLE = os.environ.get("SWITCHY_DOUBLE") == "1"


    class Model:
        def predict(self, X):
            total = np.asarray(X, dtype=float).sum(axis=1)
            return total * 2 if DOUBLE else total


    class Labeller:
        def predict(self, frame):
            return np.where(frame["x"] > 0, frame["name"], "none")
''')


@pytest.fixture
def switchy(tmp_path, monkeypatch):
    """The module above, importable (so pickles refer to it by name), and its folder."""
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "switchy.py").write_text(SWITCHY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("SWITCHY_DOUBLE", raising=False)
    sys.modules.pop("switchy", None)
    import switchy

    yield switchy
    sys.modules.pop("switchy", None)


def run_cli(folder, *args, **env):
    return subprocess.run([sys.executable, "-m", "modelvault", *map(str, args)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(folder), **env})


def test_a_model_that_answers_the_same_passes(vault):
    sklearn = pytest.importorskip("sklearn.ensemble", reason="a real model")
    from sklearn.datasets import make_classification

    X, y = make_classification(300, 6, random_state=0)
    model = sklearn.RandomForestClassifier(20, random_state=0).fit(X, y)
    mv = vault.save("forest", model, example=X[:50])
    result = vault.selftest(mv)
    assert result and result.passed is True and result.method == "predict_proba"
    assert result.compared == 100 and result.mismatched == 0 and result.max_abs == 0.0
    loaded = vault.load("forest")  # the model loads as it would without an example
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_a_changed_behaviour_fails_with_the_largest_difference(vault, vault_path, switchy,
                                                               tmp_path):
    X = np.arange(12.0).reshape(4, 3)
    vault.save("summer", switchy.Model(), example=X)
    assert vault.selftest("summer").passed is True
    switchy.DOUBLE = True  # the same code, behaving differently: as after an upgrade
    failed = vault.selftest("summer")
    assert failed.passed is False and not failed
    assert failed.mismatched == 4 and failed.compared == 4
    assert failed.max_abs == pytest.approx(30.0)  # the last row: 30 saved, 60 now
    assert "predict answers differently: 4 of 4 values differ" in failed.message
    vault.close()
    folder = tmp_path / "lib"
    ok = run_cli(folder, "selftest", vault_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].startswith("summer:1  ok: predict answers as saved")
    bad = run_cli(folder, "selftest", vault_path, "summer", SWITCHY_DOUBLE="1")
    assert bad.returncode == 1
    assert bad.stdout.startswith("summer:1  FAILED: predict answers differently")
    assert "largest difference 30" in bad.stdout


def test_a_dataframe_example_is_stored_natively(vault, vault_path, switchy):
    pandas = pytest.importorskip("pandas", reason="a DataFrame example needs pandas")
    frame = pandas.DataFrame({"x": [1.5, -2.0, 3.0], "name": ["a", "b", "c"]})
    vault.save("labels", switchy.Labeller(), example=frame)
    result = vault.selftest("labels")
    assert result.passed is True and result.compared == 3
    vault.close()
    with sqlite3.connect(vault_path) as db:
        layout = json.loads(db.execute("SELECT layout FROM versions").fetchone()[0])
    db.close()
    assert layout["example"]["kind"] == "arrays"  # no pickle: numpy strings and floats
    assert layout["example"]["method"] == "predict"


def test_a_torch_module_is_called(vault):
    torch = pytest.importorskip("torch", reason="a torch module")
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    module.train()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    vault.save("net", module, example=x)
    assert module.training  # the save did not change the model's mode
    result = vault.selftest("net")
    assert result.passed is True and result.method == "__call__" and result.compared == 15


def test_an_example_the_model_cannot_take_writes_nothing(vault, vault_path, switchy):
    vault.save("first", {"w": np.zeros(2)})
    before = vault_path.read_bytes()
    with pytest.raises(ValueError, match="cannot take this example: predict raised"):
        vault.save("summer", switchy.Model(), example="not numbers")
    with pytest.raises(ValueError, match="none of predict_proba, predict"):
        vault.save("plain", {"w": np.zeros(2)}, example=np.zeros(2))
    assert vault_path.read_bytes() == before
    assert [v.ref for v in vault.versions()] == ["first:1"]


def test_versions_without_an_example_are_reported_not_errors(vault, vault_path, switchy,
                                                            tmp_path):
    vault.save("plain", {"w": np.zeros(2)})
    vault.save("summer", switchy.Model(), example=np.ones((2, 2)))
    assert vault.selftest("plain").passed is None
    vault.close()
    result = run_cli(tmp_path / "lib", "selftest", vault_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "summer:1  ok: predict answers as saved (2 values)",
        "1 version(s) with an example; 1 without one"]
    one = run_cli(tmp_path / "lib", "selftest", vault_path, "plain")
    assert one.returncode == 0 and "plain:1  skipped: no example was saved with it" in one.stdout


def test_the_example_travels_with_the_version(vault, tmp_path, switchy):
    vault.save("summer", switchy.Model(), example=np.ones((3, 2)), metadata={"a": 1})
    vault.save("summer", switchy.Model(), example=np.ones((3, 2)) * 2)
    copy = vault.export(tmp_path / "copy.vault")
    with modelvault.open(copy) as other:
        assert other.selftest("summer:1").passed is True
        assert other.selftest("summer:2").compared == 3
        assert other.verify() == []
    merged = tmp_path / "merged.vault"
    with modelvault.open(merged) as other:
        other.merge(vault.path)
        assert other.selftest("summer:2").passed is True
    d = vault.diff("summer:1", "summer:2")
    assert d.same_stream is True  # the model is the same; only the example differs


def test_a_pickled_example_needs_trust_whatever_the_models_kind(vault_path, tmp_path,
                                                                monkeypatch):
    xgboost = pytest.importorskip("xgboost", reason="an xgboost model (no pickle of its own)")
    from modelvault import _serialize

    X = np.random.default_rng(0).normal(size=(40, 3))
    model = xgboost.XGBClassifier(n_estimators=2).fit(X, (X[:, 0] > 0).astype(int))
    real = _serialize.serialize
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "theirs"))
    with monkeypatch.context() as patch:
        # Examples numpy cannot hold (object arrays) are pickled: make this one so.
        def no_native_example(obj):
            if isinstance(obj, dict) and set(obj) == {"input", "output"}:
                raise TypeError("object arrays")
            return real(obj)

        patch.setattr(_serialize, "serialize", no_native_example)
        with modelvault.open(vault_path) as vault:
            assert vault.save("xgb", model, example=X[:5]).kind == "framework"
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "mine"))
    with modelvault.open(vault_path) as vault:
        assert vault.load("xgb").predict(X[:2]).shape == (2,)  # the model needs no trust
        with pytest.raises(modelvault.UntrustedError, match="has a pickled example"):
            vault.selftest("xgb")
        assert vault.selftest("xgb", trust=True).passed is True


def test_the_file_never_chooses_the_method_selftest_calls(vault, tmp_path, monkeypatch):
    """Hostile case: an arrays version (an ndarray, which has ``tofile``) whose example
    names ``tofile`` and a path. Signed and digest-checked as anyone can make it; selftest
    must refuse it without calling anything, and write nothing."""
    from modelvault import _selftest

    target = tmp_path / "written-by-selftest.pth"
    with monkeypatch.context() as patch:  # what a forger's writer would store
        patch.setattr(_selftest, "method_of", lambda model: "tofile")
        patch.setattr(_selftest, "answer", lambda model, method, example: np.zeros(1))
        vault.save("weights", np.arange(4.0), example=np.str_(target))
    with pytest.raises(modelvault.IntegrityError, match="example cannot be asked"):
        vault.selftest("weights")
    with pytest.raises(modelvault.IntegrityError):
        vault.selftest("weights", trust=True)
    assert not target.exists()


def test_a_model_with_methods_of_ours_is_still_never_asked_another(vault, tmp_path, switchy,
                                                                    monkeypatch):
    """Hostile case: the model has predict, the forged example names tofile (which it has
    too, as a subclass of ndarray would): only a method of our own list is called."""
    from modelvault import _selftest

    target = tmp_path / "written-by-selftest"

    class Arrayish(np.ndarray):
        def predict(self, x):
            return np.asarray(x, dtype=float).sum()

    model = np.arange(3.0).view(Arrayish)
    assert callable(model.tofile)
    with monkeypatch.context() as patch:
        patch.setattr(_selftest, "method_of", lambda model: "tofile")
        patch.setattr(_selftest, "answer", lambda model, method, example: np.zeros(1))
        vault.save("arrayish", switchy.Model(), example=np.str_(target))
    monkeypatch.setattr(modelvault.Vault, "load", lambda self, ref, trust=False: model)
    with pytest.raises(modelvault.IntegrityError, match="names 'tofile'"):
        vault.selftest("arrayish", trust=True)
    assert not target.exists()
    assert _selftest.askable(model, "predict") and not _selftest.askable(model, "tofile")
    assert not _selftest.askable(model, "__call__") and not _selftest.askable(model, None)
