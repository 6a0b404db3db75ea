"""The Hugging Face Trainer callback (issue #22, item 1): a tiny BERT trained a few steps
on CPU, each checkpoint the Trainer writes kept as a version of one model."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import modelvault

pytest.importorskip("torch", reason="the Trainer callback needs torch")
pytest.importorskip("transformers", reason="the Trainer callback needs transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

# Trains the tiny model; run in this process and, for the kill, in a child. ARM_AT set:
# the save of that step dies (SIGKILL) as the version's row goes in, the last write of
# its transaction, after all its chunks.
TRAIN = r'''
import os, signal, sqlite3, sys
from pathlib import Path
import torch
from transformers import (BertConfig, BertForSequenceClassification, Trainer,
                          TrainerCallback, TrainingArguments)
from modelvault.integrations.transformers import VaultCallback

class Data(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 100, (n, 16), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}

ARMED = False
class Arm(TrainerCallback):  # runs before the vault's callback, as it is listed first
    def on_save(self, args, state, control, **kwargs):
        global ARMED
        ARMED = state.global_step == ARM_AT

def train(out, vault, arm_at=None, remote=None):
    global ARM_AT
    ARM_AT = arm_at
    if arm_at is not None:
        connect = sqlite3.connect
        def dying_connect(*a, **k):
            connection = connect(*a, **k)
            connection.set_trace_callback(
                lambda sql: ARMED and sql.lstrip().startswith("INSERT INTO versions")
                and os.kill(os.getpid(), signal.SIGKILL))
            return connection
        sqlite3.connect = dying_connect
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    args = TrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=8,
        learning_rate=1e-3, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, logging_steps=2, metric_for_best_model="eval_loss",
        load_best_model_at_end=True, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=BertForSequenceClassification(config), args=args,
                      train_dataset=Data(64, 1), eval_dataset=Data(16, 2),
                      callbacks=[Arm(), VaultCallback(vault, "bert", tags={"run": "t"},
                                                          remote=remote)])
    trainer.train()
    return trainer

if __name__ == "__main__":
    train(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
'''


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainer")
    (folder / "train_tiny.py").write_text(TRAIN)
    sys.path.insert(0, str(folder))
    try:
        import train_tiny
    finally:
        sys.path.remove(str(folder))
    return folder / "train_tiny.py", train_tiny.train


@pytest.fixture(scope="module")
def run(train, tmp_path_factory):
    """One training run: (its output folder, its vault, the Trainer)."""
    tmp = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:  # keys in a temporary home, as conftest's
        patch.setenv("MODELVAULT_HOME", str(tmp / "home"))
        remote = (tmp / "remote").as_uri() if importlib.util.find_spec("obstore") else None
        trainer = train[1](tmp / "out", tmp / "runs.vault", remote=remote)
    return tmp / "out", tmp / "runs.vault", trainer, remote


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_every_checkpoint_is_a_version_whose_parent_is_the_one_before(run, tmp_path):
    out, path, *_ = run
    checkpoints = _checkpoints(out)
    with modelvault.open(path) as vault:
        versions = vault.versions("bert")
        assert len(versions) == len(checkpoints) == 4
        assert [v.metadata["step"] for v in versions] == [2, 4, 6, 8]
        assert [v.ref for v in vault.lineage(versions[-1])] == ["bert:3", "bert:2", "bert:1"]
        assert versions[0].parent is None and all(v.tags == {"run": "t"} for v in versions)
        # The model's files, as the Trainer wrote them; not its resumption state.
        files = vault.extract(versions[-1], tmp_path / "x")
        assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
        assert (tmp_path / "x" / "model.safetensors").read_bytes() \
            == (checkpoints[-1] / "model.safetensors").read_bytes()
        assert vault.verify() == []


def test_later_checkpoints_are_stored_as_deltas(run):
    with modelvault.open(run[1]) as vault:
        first, *later = vault.versions("bert")
    assert all(v.added_bytes < v.size and v.added_bytes < first.added_bytes for v in later)


def test_best_follows_the_lowest_eval_loss(run):
    out, path, trainer, _ = run
    with modelvault.open(path) as vault:
        versions = vault.versions("bert")
        losses = {v.version: v.metadata["eval_loss"] for v in versions}
        best = vault.get("bert@best")
    assert losses[best.version] == min(losses.values())
    assert best.metadata["step"] == int(Path(trainer.state.best_model_checkpoint).name[11:])


def test_each_version_is_pushed_with_its_alias(run, tmp_path):
    remote = run[3]
    if remote is None:
        pytest.skip("pushing needs obstore")
    with modelvault.clone(remote, tmp_path / "clone.vault") as clone:
        assert [v.ref for v in clone.versions("bert")] == [f"bert:{n}" for n in (1, 2, 3, 4)]
        with modelvault.open(run[1]) as vault:
            assert clone.get("bert@best").id == vault.get("bert@best").id


def test_best_is_the_trainers_best_checkpoint_by_step_or_by_folder():
    from transformers import TrainerState

    from modelvault.integrations.transformers import is_best

    state = TrainerState(global_step=6, best_model_checkpoint="out/checkpoint-4")
    assert not is_best(state, Path("out/checkpoint-6"))
    state.best_model_checkpoint = "out/checkpoint-6"  # transformers before best_global_step
    assert is_best(state, Path("out/checkpoint-6"))
    state.best_global_step = 4  # a greater_is_better metric fell: the Trainer kept step 4
    assert not is_best(state, Path("out/checkpoint-6"))


def test_metadata_holds_the_step_metrics_and_the_run_arguments(run):
    with modelvault.open(run[1]) as vault:
        metadata = vault.get("bert:2").metadata
    assert metadata["step"] == 4 and metadata["epoch"] == 0.5
    assert {"loss", "learning_rate", "eval_loss"} <= metadata.keys()
    assert metadata["training_args"]["save_steps"] == 2
    assert metadata["training_args"]["metric_for_best_model"] == "eval_loss"


def test_a_process_killed_mid_save_keeps_every_finished_checkpoint(train, tmp_path):
    env = {**os.environ, "MODELVAULT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(Path(modelvault.__file__).parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(train[0]), str(tmp_path / "out"),
                            str(tmp_path / "runs.vault"), "6"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert len(_checkpoints(tmp_path / "out")) == 3  # checkpoint-6 written, its save killed
    with modelvault.open(tmp_path / "runs.vault") as vault:
        assert vault.verify() == []
        assert [v.metadata["step"] for v in vault.versions("bert")] == [2, 4]
        for version, step in ((1, 2), (2, 4)):
            vault.extract(f"bert:{version}", tmp_path / str(step))
            assert (tmp_path / str(step) / "model.safetensors").read_bytes() == \
                (tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors").read_bytes()


def test_nan_metrics_are_left_out_not_refused():
    from modelvault.integrations.transformers import logged

    history = [{"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1e-3,
                "step": 2, "epoch": 0.25},
               {"eval_loss": 0.7, "eval_note": "text", "step": 2, "epoch": 0.25},
               {"loss": 0.5, "step": 4}]
    assert logged(history, 2) == [{"learning_rate": 1e-3}, {"eval_loss": 0.7}]
    json.dumps(logged(history, 4), allow_nan=False)


def test_a_bad_vault_or_name_fails_before_training(tmp_path):
    from modelvault.integrations.transformers import VaultCallback

    with pytest.raises(ValueError):
        VaultCallback(tmp_path / "v.vault", "bad name!")
    with pytest.raises(ValueError):
        VaultCallback(tmp_path / "v.vault", "bert", best_alias="no good")
    with pytest.raises(ValueError, match="tag keys"):
        VaultCallback(tmp_path / "v.vault", "bert", tags={"": "empty key"})
    with pytest.raises(TypeError):  # as save_files would raise it at the first checkpoint
        VaultCallback(tmp_path / "v.vault", "bert", tags={"run": ["not", "a", "scalar"]})
    (tmp_path / "not.vault").write_bytes(b"hostile: not a SQLite file" * 100)
    with pytest.raises(modelvault.NotAVaultError):
        VaultCallback(tmp_path / "not.vault", "bert")


def test_a_checkpoint_folder_that_cannot_be_read_warns_and_training_goes_on(tmp_path):
    """A checkpoint folder not where the callback looks (a hyperparameter search trial
    writes under output_dir/run-N/) or not readable: a warning, not a stopped run."""
    from types import SimpleNamespace

    from modelvault.integrations.transformers import VaultCallback

    callback = VaultCallback(tmp_path / "v.vault", "bert")
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), to_json_string=lambda: "{}")
    state = SimpleNamespace(is_world_process_zero=True, global_step=2, log_history=[],
                            epoch=0.5, best_global_step=None, best_model_checkpoint=None)
    with pytest.warns(RuntimeWarning, match="checkpoint-2 not saved .*training goes on"):
        callback.on_save(args, state, None)
    assert callback.saved == []


def test_a_checkpoint_of_resume_state_only_warns_and_a_sharded_model_is_kept(tmp_path):
    """A checkpoint whose weights the Trainer wrote elsewhere holds no model file: a
    warning, training goes on. FSDP's sharded model folder is kept, its optimizer's not
    (unless the model folder is all there is: then the whole checkpoint, so that its
    files keep their paths)."""
    from types import SimpleNamespace

    from modelvault.integrations.transformers import VaultCallback

    callback = VaultCallback(tmp_path / "v.vault", "bert")
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), to_json_string=lambda: "{}")
    state = SimpleNamespace(is_world_process_zero=True, global_step=2, log_history=[],
                            epoch=0.5, best_global_step=None, best_model_checkpoint=None)
    folder = tmp_path / "out" / "checkpoint-2"
    (folder / "optimizer_0").mkdir(parents=True)
    (folder / "optimizer_0" / "__0_0.distcp").write_bytes(b"optimizer shard")
    (folder / "rng_state.pth").write_bytes(b"rng")
    with pytest.warns(RuntimeWarning, match="checkpoint-2 holds no model files"):
        callback.on_save(args, state, None)
    assert callback.saved == []
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"model shard")
    callback.on_save(args, state, None)
    with modelvault.open(tmp_path / "v.vault") as vault:  # the model folder alone: the
        # whole checkpoint is kept, so its files keep the folder's name in their paths
        assert sorted(vault.load("bert:1")) == ["optimizer_0/__0_0.distcp",
                                                "pytorch_model_fsdp_0/__0_0.distcp",
                                                "rng_state.pth"]
    (folder / "config.json").write_text("{}")
    state.global_step = 4
    folder.rename(tmp_path / "out" / "checkpoint-4")
    callback.on_save(args, state, None)
    with modelvault.open(tmp_path / "v.vault") as vault:
        assert sorted(vault.load("bert:2")) == ["config.json",
                                                "pytorch_model_fsdp_0/__0_0.distcp"]


def test_importing_modelvault_imports_no_framework():
    code = "import sys, modelvault; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_the_readme_section_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Train with it", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = [line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith("bert:")]
    assert [line[:2] for line in lines] == [["bert:1", "2"], ["bert:2", "4"],
                                            ["bert:3", "6"], ["bert:4", "8"]]
    assert sum("'best'" in " ".join(line) for line in lines) == 1


def test_infinite_run_arguments_do_not_make_the_save_refuse_its_metadata(tmp_path):
    """max_grad_norm=inf (clipping off) is a real setting; JSON has no infinity."""
    from transformers import TrainerState, TrainingArguments

    from modelvault.integrations.transformers import checkpoint_metadata

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_grad_norm=float("inf"),
                             report_to=[], use_cpu=True)
    metadata = checkpoint_metadata(args, TrainerState(global_step=2, epoch=0.5))
    json.dumps(metadata, allow_nan=False)
    assert metadata["training_args"]["max_grad_norm"] == "Infinity"
