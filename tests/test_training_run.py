"""What the training callbacks share (integrations/_run.py), without a framework: a
checkpoint the vault cannot take, or a push the remote refuses, warns and lets training
go on; the next checkpoint's parent is the last one saved, and a failed push is tried
again with the next checkpoint's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import modelvault
from modelvault.integrations._run import VaultRun


def run(vault_path, remote=None):
    return VaultRun(vault_path, "net", remote=remote, best_alias="best", tags={"run": "a"},
                    description="")


def saving(step):
    return lambda vault, parent: vault.save(
        "net", {"w": np.full(1000, step, dtype=np.float32)}, metadata={"step": step},
        parent=parent)


def pushed_once_unblocked(r, blocker, step, tmp_path):
    """Make ``blocker`` the remote's parent folder, keep ``step`` with no warning, and
    return the refs a clone of the remote then holds and its @best."""
    blocker.unlink()
    blocker.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.keep(saving(step), False, f"step {step}")
    assert r.unpushed == []
    with modelvault.open(tmp_path / "clone.vault") as clone:
        clone.pull(f"file://{blocker}/r")
        versions = clone.versions("net")
        return ([v.ref for v in versions],
                next((v.ref for v in versions if "best" in v.aliases), None))


def test_a_checkpoint_the_vault_cannot_take_warns_and_the_next_one_follows_the_last_saved(
        vault_path, tmp_path):
    r = run(vault_path)
    assert r.keep(saving(1), True, "step 1").ref == "net:1"
    with pytest.warns(RuntimeWarning, match="checkpoint-2 not saved .*training goes on"):
        missing = r.keep(lambda vault, parent: vault.save_files(
            "net", tmp_path / "gone", parent=parent), True, "checkpoint-2")
    assert missing is None
    third = r.keep(saving(3), False, "step 3")
    assert [v.ref for v in r.saved] == ["net:1", "net:2"]
    with modelvault.open(vault_path) as vault:
        assert [p.ref for p in vault.lineage(third)] == ["net:1"]
        assert vault.get("net@best").ref == "net:1"


def test_a_refused_push_warns_keeps_the_version_and_is_tried_again(vault_path, tmp_path):
    blocker = tmp_path / "remote"
    blocker.write_text("a file where the remote's folder should be")
    r = run(vault_path, remote=f"file://{blocker}/r")
    with pytest.warns(RuntimeWarning, match=r"net:1 not pushed .*tried again"):
        assert r.keep(saving(1), True, "step 1").ref == "net:1"
    assert [v.ref for v in r.unpushed] == ["net:1"]
    assert pushed_once_unblocked(r, blocker, 2, tmp_path) == (["net:1", "net:2"], "net:1")


def test_a_bug_in_the_save_itself_still_raises(vault_path):
    r = run(vault_path)
    with pytest.raises(ZeroDivisionError):
        r.keep(lambda vault, parent: 1 / 0, False, "step 1")


@pytest.mark.parametrize("remote", ["nowhere", "s4://bucket/runs",
                                    "s3://AKIAEXAMPLE:secret@bucket/runs"])
def test_a_remote_that_cannot_be_reached_by_name_or_scheme_fails_before_training(
        vault_path, remote):
    with pytest.raises((modelvault.NotFoundError, ValueError), match="remote"):
        run(vault_path, remote=remote)


def test_a_version_saved_whose_alias_could_not_move_stays_the_runs(vault_path, tmp_path,
                                                                    monkeypatch):
    """The save committed and only moving @best failed (another writer held the lock): the
    version is the next one's parent and is pushed, and the warning says what failed."""
    r = run(vault_path, remote=f"file://{tmp_path}/r")
    r.keep(saving(1), True, "step 1")

    def locked(self, ref, alias):
        raise modelvault.LockTimeout("another process held the vault's lock")

    with monkeypatch.context() as patched:
        patched.setattr(modelvault.Vault, "alias", locked)
        with pytest.warns(RuntimeWarning, match="step 2 saved as net:2 but @best not moved"):
            second = r.keep(saving(2), True, "step 2")
    assert second.ref == "net:2"
    third = r.keep(saving(3), False, "step 3")
    assert [v.ref for v in r.saved] == ["net:1", "net:2", "net:3"]
    with modelvault.open(vault_path) as vault:
        assert [p.ref for p in vault.lineage(third)] == ["net:2", "net:1"]
        assert vault.get("net@best").ref == "net:1"
    with modelvault.open(tmp_path / "clone.vault") as clone:
        clone.pull(f"file://{tmp_path}/r")
        assert [v.ref for v in clone.versions("net")] == ["net:1", "net:2", "net:3"]


def test_a_version_pruned_before_its_retried_push_does_not_block_the_later_ones(
        vault_path, tmp_path):
    """A retention cleanup deleted an unpushed version while the remote was down: the
    retry pushes the versions left, it does not fail on the gone one at every checkpoint."""
    blocker = tmp_path / "remote"
    blocker.write_text("a file where the remote's folder should be")
    r = run(vault_path, remote=f"file://{blocker}/r")
    with pytest.warns(RuntimeWarning, match="not pushed"):
        r.keep(saving(1), False, "step 1")
        r.keep(saving(2), False, "step 2")
    with modelvault.open(vault_path) as vault:
        vault.prune("net", keep_last=1)
    assert pushed_once_unblocked(r, blocker, 3, tmp_path)[0] == ["net:2", "net:3"]


@pytest.mark.parametrize("deleted", ["net:2", "net"])
def test_a_version_deleted_mid_run_leaves_the_next_one_the_child_of_the_newest_kept(
        vault_path, deleted):
    r = run(vault_path)
    r.keep(saving(1), False, "step 1")
    r.keep(saving(2), False, "step 2")
    with modelvault.open(vault_path) as vault:
        vault.delete(deleted)  # a prune, or a hand, while training goes on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = r.keep(saving(3), False, "step 3")
    with modelvault.open(vault_path) as vault:
        expected = ["net:1"] if deleted == "net:2" else []
        assert [p.ref for p in vault.lineage(third)] == expected
