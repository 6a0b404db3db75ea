"""Doctest set-up: every docstring example runs against a fresh vault holding ``demo:1``."""

import importlib.util

import pytest

# Each imports its framework when imported, as it must: --doctest-modules may only collect
# it where that is installed (tests/test_fresh_machine.py runs the suite without).
collect_ignore = [f"modelvault/integrations/{module}.py"
                  for module in ("transformers", "lightning")
                  if not importlib.util.find_spec(module)]


@pytest.fixture(autouse=True)
def _doctest_vault(request, tmp_path, monkeypatch):
    if type(request.node).__name__ != "DoctestItem":
        yield
        return
    import numpy as np

    import modelvault

    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "home"))
    namespace = request.getfixturevalue("doctest_namespace")
    vault = modelvault.open(tmp_path / "doctest.vault")
    vault.save("demo", [1, 2, 3])
    namespace.update(vault=vault, tmp_path=tmp_path, np=np)
    yield
    vault.close()
