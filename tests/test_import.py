"""Importers on real sources made here: a Trainer's output folder of checkpoint folders and
a Hugging Face cache folder with two revisions, and the hostile sources beside them."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

import modelvault

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs safetensors")

STEPS = [500, 1000, 1500]  # checkpoint-1000 sorts before checkpoint-500 as text


def _weights(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 256)).astype(np.float32)
    w[: step // 500] += 1.0  # a few rows change from one checkpoint to the next
    return {"w": w, "b": np.full(256, step, dtype=np.float32)}


def _trainer_state(step: int, best: int) -> dict:
    history = []
    for s in STEPS[: STEPS.index(step) + 1]:
        history += [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-4, "epoch": s / 500},
                    {"step": s, "eval_loss": 2.0 / s if s != best else 0.001}]
    return {"global_step": step, "log_history": history,
            "best_model_checkpoint": f"/somewhere/run/checkpoint-{best}"}


@pytest.fixture
def run_dir(tmp_path):
    """A Trainer's output folder: checkpoint-N folders and the final model at the top."""
    out = tmp_path / "my-run"
    for step in STEPS:
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        safetensors_numpy.save_file(_weights(step), str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"hidden_size": 256}')
        (folder / "trainer_state.json").write_text(json.dumps(_trainer_state(step, 1000)))
        (folder / "optimizer.pt").write_bytes(os.urandom(4096))  # resume state: left out
        (folder / "rng_state.pth").write_bytes(b"rng")
    safetensors_numpy.save_file(_weights(1500), str(out / "model.safetensors"))
    (out / "config.json").write_text('{"hidden_size": 256}')
    return out


def _blob(cache, data: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (cache / "blobs" / digest).write_bytes(data)
    return digest


def _snapshot(cache, revision: str, files: dict[str, bytes], mtime: float) -> None:
    """A snapshot as the hub writes it: relative links into blobs/."""
    folder = cache / "snapshots" / revision
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).symlink_to(f"../../blobs/{_blob(cache, data)}")
    os.utime(folder, (mtime, mtime))


@pytest.fixture
def cache_dir(tmp_path):
    """models--org--tiny: two revisions sharing the weights blob, refs/main on the newer."""
    cache = tmp_path / "hub" / "models--org--tiny"
    (cache / "blobs").mkdir(parents=True)
    (cache / "refs").mkdir()
    weights = tmp_path / "w.safetensors"
    safetensors_numpy.save_file(_weights(500), str(weights))
    old, new = "a" * 40, "b" * 40
    _snapshot(cache, old, {"model.safetensors": weights.read_bytes(),
                           "config.json": b'{"v": 1}'}, 1_000_000)
    _snapshot(cache, new, {"model.safetensors": weights.read_bytes(),
                           "config.json": b'{"v": 2}'}, 2_000_000)
    (cache / "refs" / "main").write_text(new)
    return cache


def test_checkpoints_become_versions_in_step_order_each_a_child_of_the_one_before(
        vault, run_dir):
    report = vault.import_(run_dir)
    assert report.name == "my-run" and report.existing == ()
    versions = vault.versions("my-run")
    assert [v.metadata["step"] for v in versions] == STEPS
    assert [v.ref for v in vault.lineage("my-run:3")] == ["my-run:2", "my-run:1"]
    assert vault.lineage("my-run:1") == []
    assert versions[1].metadata == {"step": 1000, "loss": 0.001, "learning_rate": 1e-4,
                                    "epoch": 2.0, "eval_loss": 0.001}
    assert vault.get("my-run@best").metadata["step"] == 1000
    # Each checkpoint is stored as a delta of the one before: a few rows changed.
    assert versions[1].added_bytes < versions[0].added_bytes / 4
    files = vault.load("my-run:2")
    # The model's files, as the Trainer callback keeps them: not what only resuming needs.
    assert sorted(files) == ["config.json", "model.safetensors"]
    assert files["model.safetensors"] == (run_dir / "checkpoint-1000/model.safetensors"
                                          ).read_bytes()


def test_a_sharded_model_folder_is_kept_and_resume_folders_and_state_only_ones_are_not(
        vault, run_dir):
    """FSDP writes the model into pytorch_model_fsdp_0/ and its optimizer into
    optimizer_0/; DeepSpeed its states into global_stepN/. A checkpoint holding only
    resume state is skipped with a warning, and the next one's parent is the one before."""
    sharded = run_dir / "checkpoint-1000"
    (sharded / "model.safetensors").unlink()
    (sharded / "pytorch_model_fsdp_0").mkdir()
    (sharded / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"model shard")
    (sharded / "optimizer_0").mkdir()
    (sharded / "optimizer_0" / "__0_0.distcp").write_bytes(b"optimizer shard")
    (sharded / "global_step1000").mkdir()
    (sharded / "global_step1000" / "mp_rank_00_model_states.pt").write_bytes(b"states")
    for path in (run_dir / "checkpoint-1500").iterdir():
        if path.name not in ("trainer_state.json", "optimizer.pt", "rng_state.pth"):
            path.unlink()
    with pytest.warns(UserWarning, match="checkpoint-1500: no model files"):
        report = vault.import_(run_dir)
    assert [v.metadata["step"] for v in report.added] == [500, 1000]
    assert sorted(vault.load("my-run:2")) == ["config.json",
                                              "pytorch_model_fsdp_0/__0_0.distcp"]
    (run_dir / "checkpoint-1500" / "model.safetensors").write_bytes(
        (run_dir / "checkpoint-500" / "model.safetensors").read_bytes())
    again = vault.import_(run_dir)
    assert [v.metadata["step"] for v in again.added] == [1500]
    assert vault.lineage(again.added[0])[0].metadata["step"] == 1000


def test_a_pipelines_scheduler_folder_is_model_and_accelerates_state_is_not(vault, run_dir):
    """A checkpoint holding a diffusers pipeline: its scheduler/ (and a model named after
    an optimizer) are the model; Accelerate's optimizer.bin, scheduler.bin and
    random_states_0.pkl are resume state."""
    folder = run_dir / "checkpoint-500"
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    (folder / "optimizer_net.safetensors").write_bytes(b"a learned optimizer")
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "rng_state_1.pth"):
        (folder / name).write_bytes(b"resume")
    vault.import_(run_dir)
    assert sorted(vault.load("my-run:1")) == [
        "config.json", "model.safetensors", "model_index.json", "optimizer_net.safetensors",
        "scheduler/scheduler_config.json"]


def test_importing_twice_adds_nothing_and_a_new_checkpoint_joins_the_chain(vault, run_dir):
    vault.import_(run_dir, name="team/run")
    again = vault.import_(run_dir, name="team/run")
    assert again.added == () and [v.ref for v in again.existing] == [
        "team/run:1", "team/run:2", "team/run:3"]
    assert len(vault.versions("team/run")) == 3
    (run_dir / "checkpoint-2000").mkdir()
    safetensors_numpy.save_file(_weights(2000), str(run_dir / "checkpoint-2000/m.safetensors"))
    report = vault.import_(run_dir, name="team/run")
    assert [v.ref for v in report.added] == ["team/run:4"]
    assert vault.lineage("team/run:4")[0].ref == "team/run:3"
    assert report.added[0].metadata == {"step": 2000}  # no trainer_state.json there


def test_hugging_face_cache_revisions_share_their_blobs(vault, cache_dir):
    report = vault.import_(cache_dir)
    assert report.name == "org/tiny"
    first, second = vault.versions("org/tiny")
    assert (first.metadata, second.metadata) == ({"revision": "a" * 40}, {"revision": "b" * 40})
    assert vault.get("org/tiny@main") == second
    assert vault.lineage(second) == [first]
    assert vault.load(second)["config.json"] == b'{"v": 2}'
    # The weights blob both snapshots link to is stored once.
    assert first.added_bytes > 200_000 and second.added_bytes < 1_000
    assert vault.import_(cache_dir).added == ()
    assert len(vault.versions("org/tiny")) == 2


def test_a_snapshot_link_out_of_the_cache_is_refused_before_anything_is_saved(
        vault, cache_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (cache_dir / "snapshots" / ("b" * 40) / "passwd").symlink_to(secret)
    with pytest.raises(modelvault.VaultError, match="passwd links outside"):
        vault.import_(cache_dir)
    assert vault.models() == []


def test_a_checkpoint_link_out_of_the_run_folder_is_refused(vault, run_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"x")
    (run_dir / "checkpoint-2000").symlink_to(outside)
    with pytest.raises(modelvault.VaultError, match="checkpoint-2000 links outside"):
        vault.import_(run_dir)


def _outside(tmp_path):
    """A folder beside the source, with a file no import may read."""
    outside = tmp_path / "outside"
    (outside / ("c" * 40)).mkdir(parents=True)
    (outside / "secret.txt").write_text("root:x:0:0")
    (outside / ("c" * 40) / "secret.txt").write_text("root:x:0:0")
    return outside


def _snapshots_link_out(cache, outside):
    shutil.rmtree(cache / "snapshots")
    (cache / "snapshots").symlink_to(outside)


def _refs_link_out(cache, outside):
    shutil.rmtree(cache / "refs")
    (cache / "refs").symlink_to(outside)


def _linked_folder_links_out(cache, outside):
    """A snapshot that is a link to a folder inside the cache, and in that folder a
    link out: the snapshot's own link is fine, what is below it is not."""
    (cache / "data").mkdir()
    (cache / "data" / "secret.txt").symlink_to(outside / "secret.txt")
    (cache / "snapshots" / ("c" * 40)).symlink_to("../data")


@pytest.mark.parametrize("escape", [_snapshots_link_out, _refs_link_out,
                                    _linked_folder_links_out])
def test_a_link_out_of_the_cache_anywhere_on_the_way_is_refused(
        vault, cache_dir, tmp_path, escape):
    escape(cache_dir, _outside(tmp_path))
    with pytest.raises(modelvault.VaultError, match="links outside"):
        vault.import_(cache_dir)
    assert vault.models() == []


def test_a_checkpoint_linked_to_a_folder_with_a_link_out_is_refused(vault, run_dir, tmp_path):
    outside = _outside(tmp_path)
    (run_dir / "real").mkdir()
    (run_dir / "real" / "secret.txt").symlink_to(outside / "secret.txt")
    (run_dir / "checkpoint-2000").symlink_to("real")
    with pytest.raises(modelvault.VaultError, match="links outside"):
        vault.import_(run_dir)
    assert vault.models() == []


def test_a_trainer_state_linked_from_outside_is_not_read(vault, run_dir, tmp_path):
    outside = _outside(tmp_path)
    (outside / "state.json").write_text(json.dumps(
        {"log_history": [{"step": 500, "leaked": 42}]}))
    for step in STEPS:
        (run_dir / f"checkpoint-{step}" / "trainer_state.json").unlink()
    (run_dir / "trainer_state.json").symlink_to(outside / "state.json")
    with pytest.raises(modelvault.VaultError, match="links outside"):
        vault.import_(run_dir)
    assert vault.models() == []


@pytest.mark.parametrize("where", ["snapshots/" + "a" * 40 + "/loop", "refs/loop"])
def test_a_symlink_loop_in_the_cache_is_a_vault_error(vault, cache_dir, where):
    (cache_dir / where).symlink_to("loop")
    try:
        vault.import_(cache_dir)  # Python 3.13 resolves a loop to itself: skipped
    except modelvault.VaultError as exc:
        assert "loop" in str(exc)


def test_a_symlink_loop_in_a_checkpoint_is_a_vault_error(vault, run_dir):
    (run_dir / "checkpoint-500" / "trainer_state.json").unlink()
    (run_dir / "checkpoint-500" / "trainer_state.json").symlink_to("trainer_state.json")
    try:
        vault.import_(run_dir)
    except modelvault.VaultError as exc:
        assert "loop" in str(exc)


@pytest.mark.parametrize("state", [b"{not json", b"[1, 2]", b"[" * 100_000,
                                   b'{"log_history": [{"step": 500, "loss": "NaN", '
                                   b'"x": {"deep": 1}}, 7], "best_model_checkpoint": 3}'])
def test_a_malformed_trainer_state_costs_its_metrics_not_the_import(vault, run_dir, state):
    for step in STEPS:
        (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_bytes(state)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        vault.import_(run_dir)
    assert [v.metadata for v in vault.versions("my-run")] == [{"step": s} for s in STEPS]
    assert vault.get("my-run:1").aliases == ()


def test_a_huge_trainer_state_is_not_read(vault, run_dir, monkeypatch):
    from modelvault import _importers

    monkeypatch.setattr(_importers, "MAX_TRAINER_STATE", 100)
    with pytest.warns(UserWarning, match="over 100 bytes"):
        vault.import_(run_dir)
    assert vault.get("my-run:2").metadata == {"step": 1000}


def test_odd_folder_names_are_skipped_with_a_warning(vault, run_dir):
    for odd in ("checkpoint-abc", "checkpoint--1", "checkpoint-1e3", "checkpoint-" + "9" * 30):
        (run_dir / odd).mkdir()
    with pytest.warns(UserWarning, match="not a checkpoint-<step> folder"):
        report = vault.import_(run_dir)
    assert [v.metadata["step"] for v in report.added] == STEPS


def test_a_folder_without_checkpoints_is_a_clear_error(vault, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(modelvault.VaultError, match="no checkpoint-<step> folders"):
        vault.import_(tmp_path / "empty")
    with pytest.raises(modelvault.NotFoundError, match="no such folder"):
        vault.import_(tmp_path / "missing")


def test_an_invalid_model_name_is_refused(vault, run_dir):
    with pytest.raises(ValueError, match="invalid model name"):
        vault.import_(run_dir, name="../etc")


def test_the_command_imports_and_reports(run, tmp_path, run_dir, cache_dir):
    path = tmp_path / "cli.vault"
    result = run("import", path, run_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("added my-run:1 (step=500): ")
    assert lines[1].endswith("@best")
    assert lines[-1] == "imported 3 version(s) of my-run; 0 already there"
    result = run("import", path, run_dir)
    assert result.output == "imported 0 version(s) of my-run; 3 already there\n"
    result = run("import", path, cache_dir, "--name", "tiny", "--json")
    found = json.loads(result.output)
    assert found["name"] == "tiny" and [v["version"] for v in found["added"]] == [1, 2]
    result = run("import", path, tmp_path / "hub")  # neither kind of source
    assert result.exit_code == 1 and "nothing to import" in result.output


def test_a_progress_bar_follows_the_import_when_asked(vault_path, run_dir, capsys):
    with modelvault.open(vault_path, progress=True) as vault:
        vault.import_(run_dir)
    assert "import my-run" in capsys.readouterr().err


def test_the_readme_section_runs_as_written(tmp_path, run_dir, monkeypatch, run):
    """The README's "Bring models in": its first command and its Python, as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Bring models in", 1)[1].split("\n## ", 1)[0]
    command = section.split("```bash\n", 1)[1].splitlines()[0].split("#")[0].split()
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    run_dir.rename(tmp_path / "runs" / "my-run")
    assert command[:2] == ["modelvault", "import"]
    assert run(*command[1:]).exit_code == 0
    with modelvault.open("other.vault") as vault:
        exec(code, {"vault": vault})  # noqa: S102 - our own README
        assert [v.metadata["step"] for v in vault.versions("my-run")] == STEPS
    with modelvault.open("models.vault") as vault:
        assert [v.metadata["step"] for v in vault.versions("my-run")] == STEPS


def test_a_version_with_other_metadata_under_step_does_not_stop_the_import(vault, run_dir):
    vault.save("my-run", {"w": np.zeros(3)}, metadata={"step": [500]})
    vault.save("my-run", {"w": np.zeros(3)}, metadata={"step": True})
    assert len(vault.import_(run_dir).added) == 3
