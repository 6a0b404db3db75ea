"""The README's test command on a machine with nothing but the test extra (issue #18).

The suite collects there, and every test that needs a framework skips with a reason
naming it; .ci/run installs the frameworks extra, then runs exactly the README's command
and fails when it fails. The frameworks are made missing in a child process by a finder
that refuses to import them, as Python does a package that is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The frameworks extra's distributions, and the module each one installs.
FRAMEWORKS = {"torch": "torch", "transformers": "transformers",
              "sentence-transformers": "sentence_transformers", "diffusers": "diffusers",
              "safetensors": "safetensors", "ml_dtypes": "ml_dtypes", "onnx": "onnx",
              "lightgbm": "lightgbm", "xgboost-cpu": "xgboost", "xgboost": "xgboost",
              "pandas": "pandas", "accelerate": "accelerate",
              "lightning": "lightning"}

# pytest.main(argv[2:]) where the modules named in argv[1] cannot be imported. With
# --only-importorskip it runs only the tests that can skip for a missing package: those
# that call pytest.importorskip, or name a function or fixture of their module that does
# (a module-level call skips its whole file at collection).
WITHOUT = r"""
import ast, functools, importlib.abc, importlib.util, inspect, re, sys

MISSING = set(sys.argv[1].split(","))

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
find_spec = importlib.util.find_spec

def find_spec_or_none(name, package=None):  # None, as for a package not installed
    if name.partition(".")[0] in MISSING:
        return None
    return find_spec(name, package)

importlib.util.find_spec = find_spec_or_none

@functools.cache
def skippers(module):
    source = inspect.getsource(module)
    return {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
            and "importorskip(" in ast.get_source_segment(source, node)}

class OnlyImportorskip:
    def pytest_collection_modifyitems(self, config, items):
        def can_skip(item):
            source = inspect.getsource(item.function)
            return "importorskip(" in source or any(
                re.search(rf"\b{name}\b", source) for name in skippers(item.module))
        items[:] = [i for i in items if hasattr(i, "function") and can_skip(i)]

import pytest
args = sys.argv[2:]
plugins = []
if "--only-importorskip" in args:
    args.remove("--only-importorskip")
    plugins.append(OnlyImportorskip())
sys.exit(pytest.main(args, plugins=plugins))
"""


def pytest_without_frameworks(*args: str) -> subprocess.CompletedProcess:
    modules = ",".join(sorted(set(FRAMEWORKS.values())))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-c", WITHOUT, modules, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_frameworks_here_are_the_frameworks_extra():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {re.split(r"[\s;<>=!~\[]", r)[0] for r in extras["frameworks"]} == set(FRAMEWORKS)


@pytest.fixture(scope="module")
def without_frameworks() -> subprocess.CompletedProcess:
    """The README's `pytest` (the whole suite, doctests too) with no framework installed,
    running only the tests that can skip for a missing package."""
    return pytest_without_frameworks("--only-importorskip", "-q", "-rs",
                                     "--ignore=tests/test_fresh_machine.py")


def test_the_whole_suite_collects_without_the_frameworks(without_frameworks):
    result = without_frameworks
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not re.search(r"\berrors?\b", result.stdout.splitlines()[-1]), result.stdout[-3000:]


def test_framework_tests_skip_naming_the_missing_package(without_frameworks):
    reasons = re.findall(r"^SKIPPED \[\d+\] (\S+): (.*)$", without_frameworks.stdout, re.M)
    assert len(reasons) > 10, without_frameworks.stdout[-3000:]
    names = set(FRAMEWORKS) | set(FRAMEWORKS.values())
    unnamed = [(where, why) for where, why in reasons if not any(n in why for n in names)]
    assert unnamed == []


def readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    return next(line.split("#")[0].strip() for line in lines
                if line.startswith("pip install -e '.[test]'"))


def test_ci_installs_the_frameworks_then_runs_exactly_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_test_command() == "pip install -e '.[test]' && pytest"
    assert lines[-1] == readme_test_command()
    assert "pip install -e '.[frameworks]'" in lines


@pytest.mark.parametrize("pip_status,pytest_status,ran_pytest", [
    (0, 0, True), (0, 1, True), (0, 5, True), (1, 0, False)])
def test_ci_fails_when_the_install_or_any_test_fails_or_none_ran(tmp_path, pip_status,
                                                                pytest_status, ran_pytest):
    """pytest's 5 means it collected no test: a run that tested nothing must not pass."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    stubs = {"pip": f'echo "pip $*" >> {log}\ncase "$*" in *test*) exit {pip_status};; esac',
             "pytest": f"echo pytest >> {log}\nexit {pytest_status}"}
    for name, script in stubs.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert log.read_text().splitlines() == [
        "pip install torch==2.13.0", "pip install -e .[frameworks]",
        "pip install -e .[test]", *(["pytest"] if ran_pytest else [])]
    assert (result.returncode == 0) == (pip_status == pytest_status == 0)
