"""Page sizes (issue #11): a vault starts in 4 KiB pages, so an empty or small one stays
small, and moves to 16 KiB pages in one VACUUM before a write that may take it past
``_schema.GROW_AT``; a process killed in that move leaves every version whole."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import same

import modelvault
from modelvault import _schema

SEED = 11  # issue #11
# Raw bytes above GROW_AT: a save of this many bytes always moves a vault to big pages.
BIG = _schema.GROW_AT + 1024 * 1024


def page_size(path: Path) -> int:
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()


def small_versions(vault: modelvault.Vault) -> dict[str, object]:
    """Save a few small versions of every kind; returns what each ref holds."""
    rng = np.random.default_rng(0)
    saved = {}
    for i in range(3):
        obj = {"w": rng.standard_normal(50_000).astype(np.float32), "step": i}
        saved[vault.save("small", obj).ref] = obj
    labels = {"labels": ["cat", "dog"], "ids": {3, 4}}
    saved[vault.save("labels", labels).ref] = labels
    return saved


def big_array() -> np.ndarray:
    return np.arange(BIG // 8, dtype=np.float64)


def test_an_empty_vault_is_small(tmp_path):
    path = tmp_path / "empty.vault"
    modelvault.open(path).close()
    assert path.stat().st_size <= 128 * 1024
    assert page_size(path) == _schema.SMALL_PAGE


def test_small_saves_stay_in_small_pages(tmp_path):
    path = tmp_path / "small.vault"
    with modelvault.open(path) as vault:
        saved = small_versions(vault)
        stored = vault.stats().stored_bytes
    assert page_size(path) == _schema.SMALL_PAGE
    # The file is the chunks' bytes plus a few pages per table, not 64 KiB per table.
    assert path.stat().st_size <= stored + 160 * 1024
    with modelvault.open(path, readonly=True) as vault:
        assert all(same(obj, vault.load(ref)) for ref, obj in saved.items())


def test_a_big_save_moves_the_vault_to_big_pages_first(tmp_path):
    path = tmp_path / "grow.vault"
    with modelvault.open(path) as vault:
        saved = small_versions(vault)
        vault.alias("small:2", "prod")
        vault.tag("small:3", stage="dev")
        big = big_array()
        saved[vault.save("big", big).ref] = big
    assert page_size(path) == _schema.PAGE_SIZE
    db = sqlite3.connect(path)
    try:  # what VACUUM must carry over: the file's identity and its settings
        assert db.execute("PRAGMA application_id").fetchone()[0] == _schema.APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == _schema.FORMAT_VERSION
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        db.close()
    with modelvault.open(path) as vault:
        assert vault.verify() == []
        assert all(same(obj, vault.load(ref)) for ref, obj in saved.items())
        assert vault.get("small@prod").version == 2
        assert vault.get("small:3").tags == {"stage": "dev"}
        vault.save("small", {"w": np.zeros(10)})  # and it goes on taking writes


def test_export_of_a_small_version_is_small_and_merge_grows(tmp_path):
    big_path, small_path = tmp_path / "big.vault", tmp_path / "small.vault"
    with modelvault.open(big_path) as vault:
        saved = small_versions(vault)
        vault.save("big", big_array())
        assert page_size(big_path) == _schema.PAGE_SIZE
        vault.export(small_path, refs=list(saved))
    assert page_size(small_path) == _schema.SMALL_PAGE
    with modelvault.open(small_path) as vault:
        assert all(same(obj, vault.load(ref)) for ref, obj in saved.items())
        vault.merge(big_path)  # brings the big version: the copy moves to big pages first
        assert vault.verify() == []
        assert same(big_array(), vault.load("big"))
    assert page_size(small_path) == _schema.PAGE_SIZE


def test_a_vault_in_64_kib_pages_keeps_them(tmp_path):
    """Earlier versions moved vaults to 64 KiB pages: bigger than PAGE_SIZE, never moved
    again (a move down would copy the whole file for ~2 % of it)."""
    path = tmp_path / "old.vault"
    with modelvault.open(path) as vault:
        saved = small_versions(vault)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA page_size = 65536")
    db.execute("VACUUM")
    db.close()
    assert page_size(path) == 65536 > _schema.PAGE_SIZE
    with modelvault.open(path) as vault:
        vault.save("big", big_array())
        assert same(big_array(), vault.load("big"))
        assert all(same(obj, vault.load(ref)) for ref, obj in saved.items())
    assert page_size(path) == 65536


# -- a process killed while the vault moves to big pages ----------------------------------

def _grow_and_die(path: Path, steps: int, delay: float, big: np.ndarray) -> None:
    """In a child: save ``big`` (which starts the move to big pages) and SIGKILL this
    process ``steps`` VM instructions, or ``delay`` seconds, into the VACUUM. Steps
    reach each row the VACUUM copies; a delay also reaches its commit, where SQLite
    copies pages back through the journal without running instructions."""
    connect = sqlite3.connect

    def dying_connect(*args, **kwargs):
        connection = connect(*args, **kwargs)
        calls = [0]

        def progress():
            calls[0] += 1
            if calls[0] >= steps:
                os.kill(os.getpid(), signal.SIGKILL)
            return 0

        def trace(sql):
            if sql.strip().upper() == "VACUUM":
                if steps:
                    connection.set_progress_handler(progress, 1)
                else:  # SQLite lets go of the GIL while it works: the timer fires in it
                    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()

        connection.set_trace_callback(trace)
        return connection

    sqlite3.connect = dying_connect  # in a child process that dies here
    with modelvault.open(path) as vault:
        vault.save("big", big)


def _vacuum_steps(path: Path, big: np.ndarray, tmp_path: Path) -> tuple[int, int, float]:
    """How many VM instructions a save of ``big`` into a copy of ``path`` runs from its
    VACUUM on (in the VACUUM, in all), and the VACUUM's seconds: what kills are spread
    over."""
    copy = tmp_path / "count.vault"
    copy.write_bytes(path.read_bytes())
    counted = [0]
    in_vacuum = []
    seconds = []
    connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        connection = connect(*args, **kwargs)

        def trace(sql):
            if sql.strip().upper() == "VACUUM":
                seconds.append(time.perf_counter())
                connection.set_progress_handler(
                    lambda: counted.__setitem__(0, counted[0] + 1), 1)
            elif counted[0] and not in_vacuum:  # the first statement after it
                in_vacuum.append(counted[0])
                seconds.append(time.perf_counter() - seconds[0])

        connection.set_trace_callback(trace)
        return connection

    sqlite3.connect = counting_connect
    try:
        with modelvault.open(copy) as vault:
            vault.save("big", big)
    finally:
        sqlite3.connect = connect
    assert page_size(copy) == _schema.PAGE_SIZE
    return in_vacuum[0], counted[0], seconds[1]


@pytest.mark.sweep
def test_kill_9_while_moving_to_big_pages_keeps_every_version_whole(tmp_path, full):
    trials = 150 if full else 25
    original = tmp_path / "original.vault"
    with modelvault.open(original) as vault:  # the signing key is made here, not in a child
        saved = small_versions(vault)
    big = big_array()
    vacuum, total, seconds = _vacuum_steps(original, big, tmp_path)
    assert vacuum > 10  # the VACUUM takes many steps to kill within
    path = tmp_path / "models.vault"
    outcomes: Counter[str] = Counter()
    for trial in range(trials):
        rng = random.Random(f"{SEED}:{trial}")
        label = f"seed {SEED} trial {trial}"
        path.write_bytes(original.read_bytes())
        # Most kills land in the VACUUM; some in the save after it. Half the trials
        # count instructions, half wait a random time.
        steps = (rng.randint(1, vacuum) if rng.random() < 0.8
                 else rng.randint(vacuum, total + 1))
        delay = 0.0
        if trial % 2:
            steps, delay = 0, rng.uniform(0, 1.5 * seconds)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                _grow_and_die(path, steps, delay, big)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        with modelvault.open(path) as vault:  # rolls back what the kill left half done
            assert vault.verify() == [], label
            refs = {v.ref for v in vault.versions()}
            assert set(saved) <= refs, label
            for ref, obj in saved.items():
                assert same(obj, vault.load(ref)), label
            has_big = "big:1" in refs
            if has_big:
                assert same(big, vault.load("big")), label
        pages = page_size(path)
        assert pages in (_schema.SMALL_PAGE, _schema.PAGE_SIZE), label
        assert not has_big or pages == _schema.PAGE_SIZE, label
        assert not path.with_name(path.name + "-journal").exists(), label
        outcomes[("killed" if killed else "finished") + f", {pages // 1024} KiB pages"
                 + (", big saved" if has_big else "")] += 1
    # The sweep must have killed inside the move, not only before or after it.
    assert outcomes["killed, 4 KiB pages"] > 0, outcomes
    big_pages = f"killed, {_schema.PAGE_SIZE // 1024} KiB pages"
    assert any(k.startswith(big_pages) for k in outcomes), outcomes
    print(dict(outcomes))
