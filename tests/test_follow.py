"""follow(): a model that stays what an alias names, swapped whole, never broken by a
bad version (issue #21).

Waits are bounded by the handle's checks (``LiveModel.checks``), with ``every`` small;
the clock only bounds a hang, and no test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import multiprocessing
import operator
import os
import queue
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import modelvault
from modelvault import IntegrityError, UntrustedError, VaultError

EVERY = 0.05
# Checks a change may take to be served: the one in progress when it committed may
# have read the file just before, the next one sees it (and one more for a busy machine).
POLLS = 3
PATIENCE = 120.0  # seconds: only bounds a hang (the machine is shared)


def _model(seq: int, arrays: int = 4, size: int = 20_000) -> dict:
    """A model whose every array carries ``seq``: a mix of two versions shows."""
    return {f"a{i}": np.full(size, seq, dtype=np.float32) for i in range(arrays)}


def _seq(model: dict) -> int | None:
    """The number every array of ``model`` carries, or None for a mix (or not ours)."""
    values = {float(v) for array in model.values() for v in np.unique(array)}
    return int(values.pop()) if len(values) == 1 else None


def _save(vault, seq: int, **options):
    return vault.save("churn", _model(seq), metadata={"seq": seq}, parent=False, **options)


def _wait(live, condition, polls: int = POLLS) -> bool:
    """Wait until ``condition()`` or until ``live`` made ``polls`` more checks."""
    start, deadline = live.checks, time.monotonic() + PATIENCE
    while not condition() and live.checks < start + polls and time.monotonic() < deadline:
        time.sleep(EVERY / 10)
    return condition()


def _only_chunks_of(path: Path, ref: str) -> list[int]:
    """The chunks version ``ref`` (name:N) uses and no other version does."""
    name, number = ref.split(":")
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [c for (c,) in db.execute(
            "SELECT DISTINCT pc.chunk_id FROM part_chunks pc JOIN versions v "
            "ON v.id = pc.version_id JOIN models m ON m.id = v.model_id "
            "WHERE m.name = ? AND v.version = ? AND pc.chunk_id NOT IN "
            "(SELECT chunk_id FROM part_chunks WHERE version_id != v.id)",
            (name, int(number)))]


@pytest.fixture
def churn(vault_path):
    """A vault holding churn:1 (seq 1) as churn@production."""
    with modelvault.open(vault_path) as vault:
        _save(vault, 1, aliases=["production"])
    return vault_path


@pytest.fixture
def loads(monkeypatch):
    """How many times Vault.load and Vault.get ran."""
    counts: Counter[str] = Counter()
    for method in ("load", "get"):
        real = getattr(modelvault.Vault, method)

        def counted(self, *args, _real=real, _method=method, **kwargs):
            counts[_method] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(modelvault.Vault, method, counted)
    return counts


def _follow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("modelvault follow")]


# -- following --------------------------------------------------------------------

def _move(path, seq: int) -> None:
    """Save seq as the next churn version and point churn@production at it (in a
    process of its own)."""
    with modelvault.open(path) as vault:
        _save(vault, seq, aliases=["production"])


def test_it_swaps_when_another_process_moves_the_alias(churn):
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        assert _seq(live.model) == 1 and live.version.ref == "churn:1"
        writer = multiprocessing.get_context("spawn").Process(target=_move, args=(churn, 2))
        writer.start()
        writer.join(PATIENCE)
        assert writer.exitcode == 0
        assert _wait(live, lambda: live.version.ref == "churn:2")
        assert _seq(live.model) == 2 and live.current.version.metadata == {"seq": 2}
        assert live.error is None


def test_nothing_is_loaded_or_queried_while_nothing_changes(churn, loads):
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        first = dict(loads)
        assert first == {"load": 1, "get": 2}  # resolve, load, check it still is that one
        assert not _wait(live, lambda: False, polls=10)  # ten checks of an unchanged file
        assert loads == first
        with modelvault.open(churn) as vault:  # a write elsewhere: one query, no load
            vault.save("other", {"w": np.ones(2)})
        assert not _wait(live, lambda: False, polls=POLLS)
        assert loads == {"load": 1, "get": 3}
        assert live.version.ref == "churn:1"


def test_a_bare_name_follows_every_new_save(vault_path):
    with modelvault.open(vault_path) as vault:
        _save(vault, 1)
        with modelvault.follow(vault_path, "churn", every=EVERY) as live:
            for seq in (2, 3):
                _save(vault, seq)
                assert _wait(live, lambda seq=seq: _seq(live.model) == seq)
            assert live.version.ref == "churn:3"


def test_refresh_checks_now_and_says_whether_it_swapped(churn):
    changes = []
    with modelvault.follow(churn, "churn@production", every=3600,
                           on_change=lambda old, new: changes.append((old.ref, new.ref))
                           ) as live:
        assert live.refresh() is False
        with modelvault.open(churn) as vault:
            _save(vault, 2, aliases=["production"])
        assert live.refresh() is True and _seq(live.model) == 2
        assert live.refresh() is False
        assert changes == [("churn:1", "churn:2")]
    with pytest.raises(VaultError, match="close"):
        live.refresh()


def test_calling_the_handle_calls_the_model(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("double", functools.partial(operator.mul, 2))
        vault.save("weights", {"w": np.ones(2)})
    with modelvault.follow(vault_path, "double") as live:
        assert live(21) == 42
    with modelvault.follow(vault_path, "weights") as live, \
            pytest.raises(TypeError, match=r"use \.model"):
        live(1)


def test_close_stops_the_thread_and_releases_the_vault(churn):
    live = modelvault.follow(churn, "churn@production", every=EVERY)
    assert len(_follow_threads()) == 1
    live.close()
    assert _follow_threads() == []
    assert _seq(live.model) == 1  # what serves keeps serving until it is dropped
    live.close()  # twice is harmless


def test_an_on_change_run_by_refresh_may_close_the_handle(churn):
    """on_change, run by refresh() on the caller's thread, closes the handle while the
    checking thread's tick waits for that check: close() waited for that thread, which
    waited for the check close() was called from, and both hung."""
    def on_change(old, new):
        time.sleep(5 * EVERY)  # the thread's next tick comes while this check runs
        live.close()

    live = modelvault.follow(churn, "churn@production", every=EVERY, on_change=on_change)
    _move(churn, 2)
    caller = threading.Thread(target=live.refresh, daemon=True)
    caller.start()
    caller.join(PATIENCE)
    assert not caller.is_alive(), "close() from on_change hung"
    assert _seq(live.model) == 2 and _follow_threads() == []


def test_every_may_be_longer_than_a_thread_can_wait(churn):
    """every=math.inf (only refresh() checks) or any more than threading.TIMEOUT_MAX:
    the thread's wait raised OverflowError and the thread died with a traceback."""
    with modelvault.follow(churn, "churn@production", every=math.inf) as live:
        (thread,) = _follow_threads()
        thread.join(20 * EVERY)  # long enough for a wait that raises to have raised
        assert thread.is_alive()
        _move(churn, 2)
        assert live.refresh() and _seq(live.model) == 2
    assert not thread.is_alive()


def test_a_handle_dropped_without_close_ends_its_thread(churn):
    live = modelvault.follow(churn, "churn@production", every=EVERY)
    (thread,) = _follow_threads()
    handle = weakref.ref(live)
    del live
    gc.collect()
    assert handle() is None
    thread.join(PATIENCE)
    assert not thread.is_alive()


def test_a_replaced_model_is_released(churn):
    with modelvault.follow(churn, "churn@production", every=3600) as live:
        old = weakref.ref(live.model["a0"])
        with modelvault.open(churn) as vault:
            _save(vault, 2, aliases=["production"])
        assert live.refresh()
        gc.collect()
        assert old() is None


def test_a_first_load_that_fails_raises(churn, tmp_path):
    with pytest.raises(modelvault.NotFoundError):
        modelvault.follow(churn, "churn@staging")
    with pytest.raises(modelvault.NotAVaultError):
        modelvault.follow(tmp_path / "missing.vault", "churn")
    with pytest.raises(ValueError):
        modelvault.follow(churn, "churn@production", every=0)
    with pytest.raises(ValueError, match="read-only"):
        modelvault.follow(churn, "churn", remote="file:///nowhere", readonly=True)
    assert _follow_threads() == []


def test_a_fork_child_serves_what_it_had_and_follows_again_from_refresh(churn):
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        results = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(
            target=_in_fork_child, args=(live, churn, results))
        child.start()
        outcome = results.get(timeout=PATIENCE)
        child.join(PATIENCE)
        assert outcome == {"threads": 0, "served": 1, "after refresh": 2, "swapped": True,
                           "threads after": 1}
        assert _wait(live, lambda: _seq(live.model) == 2)  # the parent follows on


def _in_fork_child(live, path, results) -> None:
    outcome = {"threads": len(_follow_threads()), "served": _seq(live.model)}
    _move(path, 2)
    outcome["swapped"] = live.refresh()
    outcome["after refresh"] = _seq(live.model)
    outcome["threads after"] = len(_follow_threads())
    live.close()
    results.put(outcome)


# -- failing safe -----------------------------------------------------------------

def test_a_damaged_version_keeps_the_old_model_until_it_is_mended(churn, flip_chunk_byte,
                                                                    caplog):
    """Hostile case: @production moves to a version with a damaged chunk. The whole old
    model serves, the error is an IntegrityError logged once however many checks fail,
    and the new version serves once the chunk is mended."""
    with modelvault.open(churn) as vault:
        _save(vault, 2, aliases=["production"])
    chunks = _only_chunks_of(churn, "churn:2")
    with modelvault.open(churn) as vault:
        vault.alias("churn:1", "production")
    with modelvault.follow(churn, "churn@production", every=EVERY) as live, \
            caplog.at_level(logging.WARNING, logger="modelvault"):
        with contextlib.closing(sqlite3.connect(churn)) as db, db:
            flip_chunk_byte(db, chunks[-1])
            db.execute("UPDATE aliases SET version_id = (SELECT max(id) FROM versions)")
        assert _wait(live, lambda: live.error is not None)
        assert isinstance(live.error, IntegrityError)
        with pytest.raises(IntegrityError):
            live.refresh()
        _wait(live, lambda: False, polls=5)
        assert _seq(live.model) == 1 and live.version.ref == "churn:1"
        warnings = [r for r in caplog.records if r.name == "modelvault"
                    and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "IntegrityError" in warnings[0].getMessage()
        assert "still serving churn:1" in warnings[0].getMessage()
        with contextlib.closing(sqlite3.connect(churn)) as db, db:
            flip_chunk_byte(db, chunks[-1])  # the same XOR again: mended
        assert _wait(live, lambda: _seq(live.model) == 2)
        assert live.error is None and live.version.ref == "churn:2"


def test_a_damaged_version_is_passed_by_when_the_alias_moves_on(churn, flip_chunk_byte):
    with modelvault.open(churn) as vault:
        _save(vault, 2)
    with contextlib.closing(sqlite3.connect(churn)) as db, db:
        for chunk in _only_chunks_of(churn, "churn:2"):
            flip_chunk_byte(db, chunk)
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        with modelvault.open(churn) as vault:
            vault.alias("churn:2", "production")
            assert _wait(live, lambda: live.error is not None)
            assert _seq(live.model) == 1
            _save(vault, 3, aliases=["production"])
        assert _wait(live, lambda: _seq(live.model) == 3)
        assert live.error is None


def test_a_check_that_keeps_failing_stays_failed_and_is_retried(churn, flip_chunk_byte,
                                                                 loads, caplog):
    """While the version at the alias cannot be loaded, ``error`` stays set (a health
    probe reads it) and the load is tried again at growing intervals with no commit to
    the file. A tick that only waits out the backoff is not a check that worked: it
    cleared the error, logged "works again", and the version was never tried again."""
    with modelvault.open(churn) as vault:
        _save(vault, 2)
    with contextlib.closing(sqlite3.connect(churn)) as db, db:
        for chunk in _only_chunks_of(churn, "churn:2"):
            flip_chunk_byte(db, chunk)
    with modelvault.follow(churn, "churn@production", every=EVERY) as live, \
            caplog.at_level(logging.INFO, logger="modelvault"):
        with modelvault.open(churn) as vault:
            vault.alias("churn:2", "production")
        assert _wait(live, lambda: live.error is not None)
        tried = loads["load"]
        assert not _wait(live, lambda: live.error is None, polls=12)
        assert loads["load"] > tried and _seq(live.model) == 1
        assert not [r for r in caplog.records if "works again" in r.getMessage()]


def test_a_vault_gone_for_many_checks_is_followed_again_when_it_is_back(churn, tmp_path):
    """Hostile case: the file is gone for a long while (1,100 checks: 9 hours at the
    default ``every``). Every check fails with a VaultError, the thread lives on, and the
    vault put back is followed again. The backoff's 2**failures once overflowed a float
    at the 1,025th failure, killing the thread."""
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        os.replace(churn, tmp_path / "away.vault")
        for _ in range(1100):
            with pytest.raises(VaultError, match="gone"):
                live.refresh()
        os.replace(tmp_path / "away.vault", churn)
        _move(churn, 2)
        assert _wait(live, lambda: _seq(live.model) == 2, polls=10)
        assert live.error is None and len(_follow_threads()) == 1


def test_a_signed_only_handle_refuses_an_unsigned_version(churn, caplog):
    with modelvault.follow(churn, "churn@production", every=EVERY, require="trusted") as live, \
            caplog.at_level(logging.WARNING, logger="modelvault"):
        with modelvault.open(churn) as vault:
            _save(vault, 2)
        with contextlib.closing(sqlite3.connect(churn)) as db, db:
            db.execute("UPDATE versions SET key_id = NULL, signature = NULL WHERE version = 2")
        with modelvault.open(churn) as vault:
            vault.alias("churn:2", "production")
        assert _wait(live, lambda: live.error is not None)
        assert isinstance(live.error, UntrustedError)
        assert _seq(live.model) == 1
        assert any("require='trusted'" in r.getMessage() for r in caplog.records)


def test_a_file_replaced_by_garbage_keeps_serving_and_a_good_one_is_taken(churn, tmp_path):
    """Hostile case: the vault file is renamed over by garbage, then by another vault
    (as ``export`` publishes one). The garbage changes nothing that serves; the new
    vault's @production serves once it has loaded whole."""
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"SQLite format 3\0" + os.urandom(8192))
        os.replace(garbage, churn)
        assert _wait(live, lambda: live.error is not None)
        assert isinstance(live.error, VaultError) and _seq(live.model) == 1
        other = tmp_path / "other.vault"
        with modelvault.open(other) as vault:
            _save(vault, 7, aliases=["production"])
            vault.export(tmp_path / "published.vault")
        os.replace(tmp_path / "published.vault", churn)
        assert _wait(live, lambda: _seq(live.model) == 7, polls=10)
        assert live.error is None and live.version.ref == "churn:1"  # that vault's churn:1
        churn.unlink()  # gone: the last model serves on
        assert _wait(live, lambda: live.error is not None, polls=10)
        assert isinstance(live.error, VaultError) and _seq(live.model) == 7


def test_a_file_overwritten_in_place_with_garbage_keeps_serving(churn):
    """Hostile case: another process writes garbage over the file the handle has open
    (the same inode). Every check fails with a VaultError; the model serves on."""
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        # In a child: a file this process opened and closed would drop SQLite's locks.
        subprocess.run([sys.executable, "-c", "import os, sys; f = open(sys.argv[1], 'r+b'); "
                        "f.write(os.urandom(os.path.getsize(sys.argv[1])))", str(churn)],
                       check=True)
        assert _wait(live, lambda: live.error is not None, polls=10)
        assert isinstance(live.error, VaultError), repr(live.error)
        with pytest.raises(VaultError):
            live.refresh()
        assert _seq(live.model) == 1 and live.version.ref == "churn:1"


_KILLED_WRITER = textwrap.dedent("""
    import os, sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("PRAGMA cache_size = 1")  # spill to the file mid-write: the journal is hot
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE packs SET data = zeroblob(length(data))")
    os._exit(0)  # killed before COMMIT
""")


def test_a_writer_killed_mid_write_is_rolled_back_and_following_goes_on(churn):
    """Hostile case: a writer dies mid-write and leaves a hot journal. The handle's
    first read rolls it back (a read-only connection would fail on it at every check
    until some other process opened the file to write), and the next move serves."""
    with modelvault.open(churn) as vault:  # pages enough to spill before the kill
        vault.save("other", {"w": np.random.default_rng(0).random(300_000)})
    with modelvault.follow(churn, "churn@production", every=EVERY) as live:
        subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(churn)], check=True)
        journal = Path(f"{churn}-journal")
        assert journal.read_bytes()[:1] not in (b"", b"\0")  # hot
        assert _wait(live, lambda: not journal.exists())
        assert live.error is None and _seq(live.model) == 1
        _move(churn, 2)
        assert _wait(live, lambda: _seq(live.model) == 2)


# -- read-only vaults -------------------------------------------------------------

_READ_ONLY_APP = textwrap.dedent("""
    import sys, time
    import modelvault
    path = sys.argv[1]
    try:
        modelvault.follow(path, "churn@production", remote="file:///nowhere")
    except modelvault.ReadOnlyError as exc:
        print("remote refused:", "read-only" in str(exc), flush=True)
    with modelvault.follow(path, "churn@production", every=0.05) as live:
        print("serving", live.version.ref, flush=True)
        sys.stdin.readline()  # the parent moved the alias
        start = live.checks
        while live.version.ref == "churn:1" and live.checks < start + 3:
            time.sleep(0.005)
        print("serving", live.version.ref, live.error, flush=True)
""")


def test_a_vault_in_a_read_only_folder_is_watched(churn, tmp_path):
    from test_bad_files import _read_only_mount

    mount = _read_only_mount()
    if mount is None:
        pytest.skip("running as root without unshare: chmod cannot make the file read-only")
    script = tmp_path / "app.py"
    script.write_text(_READ_ONLY_APP)
    prefix = mount(churn.parent)
    if prefix == ("chmod",):
        churn.parent.chmod(0o555)
        prefix = ()
    env = {**os.environ, "PYTHONPATH": str(Path(modelvault.__file__).parent.parent)}
    try:
        app = subprocess.Popen([*prefix, sys.executable, str(script), str(churn)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert app.stdout.readline() == "remote refused: True\n"
        assert app.stdout.readline() == "serving churn:1\n"
        churn.parent.chmod(0o755)  # the trainer writes; the app's view stays read-only
        _move(churn, 2)
        app.stdin.write("moved\n")
        app.stdin.flush()
        assert app.stdout.readline() == "serving churn:2 None\n"
        assert app.wait(PATIENCE) == 0
    finally:
        churn.parent.chmod(0o755)
    assert not list(churn.parent.glob("*-journal"))


# -- remotes ----------------------------------------------------------------------

@pytest.fixture
def remote(tmp_path, churn):
    """A file:// remote holding churn:1 as churn@production, pushed from ``churn``."""
    url = f"file://{tmp_path / 'remote'}"
    with modelvault.open(churn) as vault:
        vault.push(url)
    return url


def test_prefer_theirs_lets_the_remote_decide_an_alias_moved_on_both_sides(tmp_path, churn,
                                                                         remote):
    app = tmp_path / "app.vault"
    with modelvault.follow(app, "churn@production", remote=remote, every=3600,
                           prefer="theirs") as live:
        with modelvault.open(app) as vault:  # moved here by hand...
            _save(vault, 5, aliases=["production"])
        with modelvault.open(churn) as vault:  # ...and on the remote: a conflict
            _save(vault, 2, aliases=["production"])
            vault.push(remote)
        live.refresh()
        assert live.version.metadata["seq"] == 2 and live.error is None
    with pytest.raises(ValueError, match="prefer"):
        modelvault.follow(app, "churn@production", remote=remote, prefer="mine")


def test_two_apps_starting_together_both_serve_the_clone(tmp_path, churn, remote,
                                                         monkeypatch):
    """The second to clone a missing vault finds the first one's file in place."""
    import modelvault._follow as following

    app = tmp_path / "app.vault"
    real = following.clone

    def raced(url, path, refs, **options):
        real(url, path, refs, **options).close()  # the other app got there first
        raise FileExistsError(f"{path} exists; clone makes a new vault")

    monkeypatch.setattr(following, "clone", raced)
    with modelvault.follow(app, "churn@production", remote=remote, every=3600) as live:
        assert live.version.ref == "churn:1"


def test_a_missing_vault_is_cloned_with_just_the_ref(tmp_path, churn, remote):
    with modelvault.open(churn) as vault:
        _save(vault, 2)  # not in the clone: not what the ref names
        vault.push(remote)
    app = tmp_path / "app" / "app.vault"
    app.parent.mkdir()
    with modelvault.follow(app, "churn@production", remote=remote, every=3600) as live:
        assert live.version.ref == "churn:1" and _seq(live.model) == 1
    with modelvault.open(app) as vault:
        assert [v.ref for v in vault.versions()] == ["churn:1"]


def test_each_check_pulls_the_ref_and_a_remote_that_is_down_keeps_serving(tmp_path, churn,
                                                                          remote):
    app = tmp_path / "app.vault"
    with modelvault.follow(app, "churn@production", remote=remote, every=3600) as live:
        with modelvault.open(churn) as vault:
            _save(vault, 2, aliases=["production"])
            vault.push(remote)
        live.refresh()
        with modelvault.open(app) as vault:
            assert "churn:2" in [v.ref for v in vault.versions()]  # pulled
        os.rename(tmp_path / "remote", tmp_path / "away")
        with pytest.raises(VaultError):
            live.refresh()
        assert isinstance(live.error, VaultError) and live.model is not None


def test_a_pull_conflict_is_logged_once(tmp_path, churn, remote, caplog):
    """@production moved in the app's vault and on the remote: the pull's conflict is
    logged once, not at every check, and the app serves its own choice."""
    app = tmp_path / "app.vault"
    with modelvault.follow(app, "churn@production", remote=remote, every=3600) as live, \
            caplog.at_level(logging.WARNING, logger="modelvault"):
        with modelvault.open(app) as vault:
            _save(vault, 5, aliases=["production"])
        with modelvault.open(churn) as vault:
            _save(vault, 2, aliases=["production"])
            vault.push(remote)
        for _ in range(3):
            live.refresh()
        assert _seq(live.model) == 5 and live.error is None
    conflicts = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and "churn@production:" in r.getMessage()]
    # Once per wording: before pull remembered the remote's aliases, a second pull
    # worded the same conflict differently (issue #21).
    assert conflicts and len(set(conflicts)) == len(conflicts)
    assert all(remote in message for message in conflicts)


def test_it_serves_the_remotes_alias_once_pulled(tmp_path, churn, remote):
    app = tmp_path / "app.vault"
    with modelvault.follow(app, "churn@production", remote=remote, every=EVERY) as live:
        with modelvault.open(churn) as vault:
            _save(vault, 2, aliases=["production"])
            vault.push(remote)
        assert _wait(live, lambda: _seq(live.model) == 2)
        assert live.error is None


# -- the two-process trial --------------------------------------------------------

def _trainer(path, rounds: int, moved, served) -> None:
    """Each round: save a checkpoint that never goes to production, then one that does,
    move @production to it, say so, and wait until the app serves it."""
    with modelvault.open(path) as vault:
        for round_ in range(1, rounds + 1):
            _save(vault, 2 * round_ - 1)
            production = 2 * round_
            _save(vault, production, aliases=["production"])
            moved.put(production)
            if served.get(timeout=PATIENCE) != production:
                return
    moved.put(None)


def test_an_app_following_a_trainer_serves_only_whole_production_models(tmp_path, full):
    """Issue #21's trial with a local vault: a trainer process saves and moves
    @production N times while this process follows it and serves predictions in a loop.
    Every prediction comes from one whole model that was @production at some time;
    every move is served within POLLS checks; replaced models are released."""
    rounds = 200 if full else 20
    path = tmp_path / "app.vault"
    with modelvault.open(path) as vault:
        _save(vault, 0, aliases=["production"])
    context = multiprocessing.get_context("spawn")
    moved, served = context.Queue(), context.Queue()
    trainer = context.Process(target=_trainer, args=(path, rounds, moved, served))
    with modelvault.follow(path, "churn@production", every=EVERY) as live:
        trainer.start()
        try:
            counts = serve(live, moved, served)
        finally:
            served.put(-1)  # a trainer still waiting gives up
            trainer.join(PATIENCE)
            if trainer.is_alive():
                trainer.kill()
    _report("app following a trainer (local vault)", rounds, counts)
    check_trial(counts, rounds)
    assert trainer.exitcode == 0


def serve(live, moved, served) -> Counter[str]:
    """Serve predictions from ``live`` in a loop until the trainer says it is done (None
    on ``moved``); each seq it announces on ``moved`` is answered on ``served`` once
    served. Returns the trial's counts: predictions, wrong ones (a mix of versions, or
    a model that is not the version it says), moves, the most checks a move took to be
    served, served seqs that were never announced, and models still in memory at the end
    (each replaced one should be released)."""
    counts: Counter[str] = Counter(wrong=0, moves=0)
    announced = {0}
    polls: list[int] = []
    models: dict[int | None, weakref.ref] = {}
    waiting: tuple[int, int] | None = None  # (seq moved to, checks by then)
    done = False
    deadline = time.monotonic() + PATIENCE * 5
    while not done and time.monotonic() < deadline:
        serving = live.current
        seq = _seq(serving.model)
        counts["predictions"] += 1
        if seq is None or seq != serving.version.metadata["seq"]:
            counts["wrong"] += 1
        models.setdefault(seq, weakref.ref(serving.model["a0"]))
        del serving
        if live.error is not None:
            counts[f"checks failed: {type(live.error).__name__}"] += 1
            counts["errors not VaultError"] += not isinstance(live.error, VaultError)
        if waiting is not None and seq == waiting[0]:
            polls.append(live.checks - waiting[1])
            served.put(seq)
            waiting = None
        elif waiting is not None and live.checks - waiting[1] > 10 * POLLS:
            break  # not served: check_trial says so
        with contextlib.suppress(queue.Empty):
            message = moved.get_nowait()
            if message is None:
                done = True
            else:
                announced.add(message)
                counts["moves"] += 1
                waiting = (message, live.checks)
        time.sleep(0.001)
    counts["done"] = done
    counts["final"] = _seq(live.model)
    counts["moves served"] = len(polls)
    counts["most checks to serve a move"] = max(polls, default=0)
    counts["served but never @production"] = len(set(models) - announced)
    gc.collect()
    alive = [seq for seq, ref in models.items() if ref() is not None]
    counts["models still in memory"] = len(alive)
    counts["the one in memory is the final one"] = alive == [counts["final"]]
    return counts


def check_trial(counts: Counter[str], rounds: int) -> None:
    """The trial's promises, on the counts ``serve`` gave."""
    assert counts["done"] and counts["moves"] == rounds and counts["moves served"] == rounds
    assert counts["wrong"] == 0 and counts["served but never @production"] == 0
    assert counts["most checks to serve a move"] <= POLLS
    assert counts["models still in memory"] == 1 and counts["the one in memory is the final one"]
    assert counts["final"] == 2 * rounds
    assert counts["errors not VaultError"] == 0


def _report(title: str, rounds: int, counts: Counter[str]) -> None:
    """Print the trial's counts (shown with ``pytest -s``, and on failure)."""
    print(f"\n{title}: {rounds} moves of @production")
    for key, count in sorted(counts.items()):
        print(f"  {key}: {count}")
