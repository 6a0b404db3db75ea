"""Sharing a vault: several processes, locks, read-only files, progress output."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3

import numpy as np
import pytest

import modelvault
from modelvault import LockTimeout, ReadOnlyError


def _save_many(path: str, home: str, writer: int, count: int) -> None:
    os.environ["MODELVAULT_HOME"] = home
    with modelvault.open(path) as vault:
        for i in range(count):
            vault.save("shared", {"w": np.full(1000, writer * 1000 + i)},
                       metadata={"writer": writer, "i": i})


def test_processes_saving_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.vault")
    modelvault.open(path).close()  # create it once, as a team would
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(path, os.environ["MODELVAULT_HOME"], w, 8))
             for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with modelvault.open(path) as vault:
        versions = vault.versions("shared")
        assert [v.version for v in versions] == list(range(1, 25))
        seen = sorted((v.metadata["writer"], v.metadata["i"]) for v in versions)
        assert seen == [(w, i) for w in range(3) for i in range(8)]
        for v in versions:
            expected = v.metadata["writer"] * 1000 + v.metadata["i"]
            assert (vault.load(v)["w"] == expected).all()
        assert vault.verify() == []
    assert sorted(os.listdir(tmp_path)) == ["shared.vault"]


def test_a_held_write_lock_times_out_as_lock_timeout(tmp_path):
    path = tmp_path / "v.vault"
    modelvault.open(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with modelvault.open(path, timeout=0.2) as vault:
            with pytest.raises(LockTimeout) as info:
                vault.save("m", [1])
            assert isinstance(info.value, TimeoutError)
            assert vault.models() == []  # readers are not blocked by a pending writer
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with modelvault.open(path) as vault:
        assert vault.save("m", [1]).version == 1  # the failed save left nothing behind


def test_read_only_vault_reads_but_refuses_writes(tmp_path):
    path = tmp_path / "v.vault"
    with modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(3)}, aliases=["prod"])
    with modelvault.open(path, readonly=True) as vault:
        assert vault.load("m@prod")["w"].tolist() == [0, 1, 2]
        assert vault.verify() == []
        assert vault.stats().versions == 1
        for write in (lambda: vault.save("m", [1]), lambda: vault.alias("m:1", "x"),
                      lambda: vault.tag("m:1", a="b"), lambda: vault.delete("m"),
                      lambda: vault.gc()):
            with pytest.raises(ReadOnlyError):
                write()
    with pytest.raises(modelvault.NotAVaultError):
        modelvault.open(tmp_path / "missing.vault", readonly=True)
    assert not (tmp_path / "missing.vault").exists()


def test_progress_bar_on_request(tmp_path, capsys):
    with modelvault.Vault(tmp_path / "v.vault", progress=True) as vault:
        vault.save("m", {"w": np.zeros(300_000)})
        vault.load("m")
    err = capsys.readouterr().err
    assert "save m" in err and "load m:1" in err


def test_closed_vault_says_so(tmp_path):
    vault = modelvault.open(tmp_path / "v.vault")
    vault.close()
    with pytest.raises(modelvault.VaultError, match="closed"):
        vault.models()
