"""Shared fixtures: a private key folder per test, a fresh vault file, and sweep counts.

Fault-injection sweeps (marked ``sweep``) run in every ``pytest`` at counts that
meet issue #4's figures where that is cheap; ``pytest -m sweep --full`` runs them
at their full counts (every bit flipped, more kill points), which takes longer.
"""

from __future__ import annotations

import pytest

import modelvault

# tests/fixtures holds the scripts that wrote the old-format vaults, run by hand with the
# code of their day; they import torch and xgboost at the top and are not tests, so
# --doctest-modules must not import them (on a machine without torch it cannot).
collect_ignore = ["fixtures"]


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the fault-injection sweeps at their full counts")


@pytest.fixture
def full(request) -> bool:
    """True under ``pytest --full``: sweeps run every trial instead of the CI sample."""
    return bool(request.config.getoption("--full"))


@pytest.fixture(autouse=True)
def _private_key_home(tmp_path_factory, monkeypatch):
    """Point MODELVAULT_HOME at a temporary folder so no test touches the real keys."""
    home = tmp_path_factory.mktemp("modelvault-home")
    monkeypatch.setenv("MODELVAULT_HOME", str(home))
    yield home


@pytest.fixture
def vault_path(tmp_path):
    return tmp_path / "models.vault"


@pytest.fixture
def vault(vault_path):
    v = modelvault.open(vault_path)
    try:
        yield v
    finally:
        v.close()


@pytest.fixture
def run():
    """Invoke the CLI in-process: run("ls", path) -> click Result (paths may be Path objects)."""
    from click.testing import CliRunner

    from modelvault._cli import cli

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args])

    return invoke


@pytest.fixture
def vault_file(tmp_path):
    """A closed vault: churn:1 (alias production), churn:2 (tag team=growth), team/weights:1."""
    import numpy as np

    path = tmp_path / "cli.vault"
    with modelvault.open(path) as v:
        v.save("churn", {"w": np.arange(10.0)}, aliases=["production"])
        v.save("churn", {"w": np.arange(12.0)}, metadata={"auc": 0.91}, tags={"team": "growth"})
        v.save("team/weights", np.random.default_rng(0).normal(size=(300, 300)))
    return path


@pytest.fixture
def flip_chunk_byte():
    """flip(db, chunk_id, index=None, mask=0xFF): damage a chunk's stored bytes in place."""
    return _flip_chunk_byte


def _flip_chunk_byte(db, chunk_id, index=None, mask=0xFF):
    """XOR one stored byte of a chunk (in the middle by default) inside its pack, in place."""
    pack_id, start, length = db.execute(
        "SELECT pack_id, start, length FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
    codec, data = db.execute("SELECT codec, data FROM packs WHERE id = ?", (pack_id,)).fetchone()
    data = bytearray(data)
    if codec == "raw":
        data[start + (length // 2 if index is None else index)] ^= mask
    else:  # a solid pack: damage its compressed frame, and so every chunk in it
        data[len(data) // 2 if index is None else index] ^= mask
    db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(data), pack_id))
