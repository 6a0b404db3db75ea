"""The Lightning callback (issue #22, item 1): a tiny LightningModule trained a few steps on
CPU, each checkpoint Lightning saves kept as a version of one model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import modelvault

pytest.importorskip("torch", reason="the Lightning callback needs torch")
pytest.importorskip("lightning", reason="the Lightning callback needs lightning")

# Validation loss per step the module reports, so @best is known in advance: lowest at
# step 4, NaN at step 6 (a hostile metric, never the best), inf at step 8.
VAL_LOSS = {2: 0.9, 4: 0.3, 6: float("nan"), 8: float("inf")}


def _module_class():
    import lightning.pytorch as pl
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self, width: int = 64, lr: float = 1e-2, clip: float = float("inf"),
                     where: Path = Path("data")):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(width, width)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train_loss", loss)
            self.log("val_loss", VAL_LOSS.get(self.global_step + 1, 1.0))
            self.log("grad_inf", float("inf"))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(
                torch.randn(64, self.hparams.width, generator=torch.Generator().manual_seed(0)))
            return torch.utils.data.DataLoader(data, batch_size=8)

    return Tiny


def _train(tmp: Path, **callback):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from modelvault.integrations.lightning import VaultCallback

    torch.manual_seed(0)
    module = _module_class()()
    checkpoint = ModelCheckpoint(tmp / "ckpt", every_n_train_steps=2, save_top_k=-1,
                                 **callback.pop("checkpoint", {}))
    vault_callback = VaultCallback(tmp / "runs.vault", "net", tags={"run": "t"}, **callback)
    trainer = pl.Trainer(max_steps=8, enable_checkpointing=True, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp,
                         callbacks=[checkpoint, vault_callback])
    trainer.fit(module)
    return module, checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELVAULT_HOME", str(tmp / "home"))
        remote = (tmp / "remote").as_uri() if importlib.util.find_spec("obstore") else None
        module, checkpoint = _train(tmp, monitor="val_loss", remote=remote)
    return tmp / "runs.vault", module, tmp / "ckpt", remote


def test_every_checkpoint_is_a_version_whose_parent_is_the_one_before(run):
    path, module, folder, _ = run
    with modelvault.open(path) as vault:
        versions = vault.versions("net")
        assert len(versions) == len(list(folder.glob("*.ckpt"))) == 4
        assert [v.metadata["step"] for v in versions] == [2, 4, 6, 8]
        assert [v.ref for v in vault.lineage(versions[-1])] == ["net:3", "net:2", "net:1"]
        assert versions[0].parent is None and all(v.tags == {"run": "t"} for v in versions)
        last = vault.load(versions[-1])
        assert last.keys() == module.state_dict().keys()
        assert all((last[k] == v).all() for k, v in module.state_dict().items())
        assert vault.verify() == []


def test_later_checkpoints_are_stored_as_deltas(run):
    with modelvault.open(run[0]) as vault:
        first, *later = vault.versions("net")
    assert all(v.added_bytes < v.size and v.added_bytes < first.added_bytes for v in later)


def test_best_follows_the_lowest_monitored_value_not_nan_or_inf(run):
    with modelvault.open(run[0]) as vault:
        assert vault.get("net@best").metadata["step"] == 4
        assert vault.get("net@best").metadata["val_loss"] == pytest.approx(0.3)


def test_metadata_holds_step_epoch_finite_metrics_and_hyperparameters(run):
    with modelvault.open(run[0]) as vault:
        metadata = [v.metadata for v in vault.versions("net")]
    assert metadata[1]["step"] == 4 and metadata[1]["epoch"] == 0
    assert {"train_loss", "val_loss"} <= metadata[1].keys()
    assert all("grad_inf" not in m for m in metadata)
    assert "val_loss" not in metadata[2] and "val_loss" not in metadata[3]
    assert all(math.isfinite(x) for m in metadata for k, x in m.items()
               if k not in ("step", "epoch", "hparams"))
    assert metadata[0]["hparams"] == {"width": 64, "lr": 1e-2, "clip": "Infinity",
                                      "where": "data"}


def test_best_follows_the_model_checkpoints_best_without_a_monitor(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "home"))
    _, checkpoint = _train(tmp_path, best_alias="top",
                           checkpoint={"monitor": "val_loss", "mode": "max"})
    with modelvault.open(tmp_path / "runs.vault") as vault:
        top = vault.get("net@top")
    # The NaN and the inf at steps 6 and 8: ModelCheckpoint counts inf as the highest.
    assert top.metadata["step"] == 8
    assert Path(checkpoint.best_model_path).name == f"epoch=0-step={top.metadata['step']}.ckpt"


def test_best_is_the_best_saved_when_the_best_checkpoints_save_failed(tmp_path, monkeypatch):
    """The lowest val_loss (step 4) could not be saved: @best moves on to the lowest of
    those saved (step 6), not stays at step 2 as though step 4 were in the vault."""
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(VAL_LOSS, 6, 0.5)
    save = modelvault.Vault.save

    def full_at_step_4(self, name, model, **kwargs):
        if kwargs["metadata"]["step"] == 4:
            raise modelvault.DiskFullError("the disk is full")
        return save(self, name, model, **kwargs)

    monkeypatch.setattr(modelvault.Vault, "save", full_at_step_4)
    with pytest.warns(RuntimeWarning, match="step 4 not saved"):
        _train(tmp_path, monitor="val_loss")
    with modelvault.open(tmp_path / "runs.vault") as vault:
        assert [v.metadata["step"] for v in vault.versions("net")] == [2, 6, 8]
        assert vault.get("net@best").metadata["step"] == 6


def test_a_second_save_of_the_same_step_adds_no_version(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "home"))
    module, _ = _train(tmp_path)
    module.trainer.save_checkpoint(tmp_path / "again.ckpt")
    with modelvault.open(tmp_path / "runs.vault") as vault:
        assert len(vault.versions("net")) == 4
        assert all(not v.aliases for v in vault.versions("net"))  # nothing monitored


def test_each_version_is_pushed_with_its_alias(run, tmp_path):
    remote = run[3]
    if remote is None:
        pytest.skip("pushing needs obstore")
    with modelvault.clone(remote, tmp_path / "clone.vault") as clone:
        assert [v.ref for v in clone.versions("net")] == [f"net:{n}" for n in (1, 2, 3, 4)]
        with modelvault.open(run[0]) as vault:
            assert clone.get("net@best").id == vault.get("net@best").id


# A run whose save at step 6 dies (SIGKILL) as the version's row goes in, the last write
# of its transaction, after all its chunks.
KILLED = r"""
import os, signal, sqlite3, sys
import lightning.pytorch as pl, torch
from lightning.pytorch.callbacks import ModelCheckpoint
from modelvault.integrations.lightning import VaultCallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 64)
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)

class Dying(VaultCallback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        connect = sqlite3.connect
        def dying_connect(*a, **k):
            connection = connect(*a, **k)
            connection.set_trace_callback(
                lambda sql: sql.lstrip().startswith("INSERT INTO versions")
                and os.kill(os.getpid(), signal.SIGKILL))
            return connection
        if trainer.global_step == 6:
            sqlite3.connect = dying_connect
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 64)),
                                   batch_size=8)
pl.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
           accelerator="cpu", default_root_dir=sys.argv[1],
           callbacks=[ModelCheckpoint(sys.argv[1], every_n_train_steps=2, save_top_k=-1),
                      Dying(sys.argv[2], "net")]).fit(Net(), data)
"""


def test_a_process_killed_mid_save_keeps_every_finished_checkpoint(tmp_path):
    (tmp_path / "killed.py").write_text(KILLED)
    env = {**os.environ, "MODELVAULT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(Path(modelvault.__file__).parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "ckpt"),
                            str(tmp_path / "runs.vault")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    with modelvault.open(tmp_path / "runs.vault") as vault:
        assert vault.verify() == []
        assert [v.metadata["step"] for v in vault.versions("net")] == [2, 4]
        assert vault.load("net:2").keys() == {"layer.weight", "layer.bias"}


def test_hyperparameters_are_made_json_safe():
    from modelvault.integrations.lightning import finite_metrics, json_safe

    safe = json_safe({"nan": float("nan"), "ninf": float("-inf"), "path": Path("a"),
                      "nested": {"t": (1, 2)}, (1, 2): "a tuple key"})
    assert safe == {"nan": "NaN", "ninf": "-Infinity", "path": "a", "nested": {"t": [1, 2]}}
    json.dumps(safe, allow_nan=False)
    import torch

    assert finite_metrics({"a": torch.tensor(1.5), "b": torch.tensor(float("nan")),
                           "c": torch.ones(3), "d": "text", "e": True, "f": 2}) == \
        {"a": 1.5, "f": 2.0}


def test_a_bad_vault_name_alias_tag_or_mode_fails_before_training(tmp_path):
    from modelvault.integrations.lightning import VaultCallback

    with pytest.raises(ValueError):
        VaultCallback(tmp_path / "v.vault", "bad name!")
    with pytest.raises(ValueError):
        VaultCallback(tmp_path / "v.vault", "net", best_alias="no good")
    with pytest.raises(ValueError, match="mode"):
        VaultCallback(tmp_path / "v.vault", "net", monitor="val_loss", mode="lowest")
    with pytest.raises(ValueError, match="tag keys"):
        VaultCallback(tmp_path / "v.vault", "net", tags={"": "empty key"})
    with pytest.raises(TypeError):
        VaultCallback(tmp_path / "v.vault", "net", tags={"run": ["not", "a", "scalar"]})
    (tmp_path / "not.vault").write_bytes(b"hostile: not a SQLite file" * 100)
    with pytest.raises(modelvault.NotAVaultError):
        VaultCallback(tmp_path / "not.vault", "net")


def test_importing_modelvault_imports_no_framework():
    code = "import sys, modelvault; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_the_readme_section_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("### With Lightning", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "home"))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = [line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith("net:")]
    assert [line[:2] for line in lines] == [["net:1", "2"], ["net:2", "4"],
                                            ["net:3", "6"], ["net:4", "8"]]
    assert sum("'best'" in " ".join(line) for line in lines) == 1
