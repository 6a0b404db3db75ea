"""A Lightning callback that keeps each checkpoint Lightning saves as a vault version.

>>> from modelvault.integrations.lightning import VaultCallback
>>> trainer = Trainer(..., callbacks=[ModelCheckpoint(...), VaultCallback("runs.vault", "net")])
... # doctest: +SKIP

Each time Lightning saves a checkpoint (a ``ModelCheckpoint`` or ``trainer.save_checkpoint``),
the module's ``state_dict()`` becomes the next version of the model: tensors stored natively,
each as its XOR with the previous version's where that is smaller. Not the ``.ckpt`` file:
it is a pickle that also holds the optimizer state only a resumed run needs.

A save is one vault transaction: a process killed mid-save leaves every checkpoint saved
before it whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ._run import VaultRun

MODES = ("min", "max")


class VaultCallback(Callback):
    """Save the module's ``state_dict()`` as the next version of ``name`` in the vault at
    ``vault_path`` each time Lightning saves a checkpoint (once per global step).

    The version's parent is the one this run saved before (so its lineage is the run's and
    its tensors are stored as deltas). Its metadata holds the trainer's finite numeric
    ``callback_metrics`` (at the top level: ``metadata["val_loss"]``), the global step,
    the epoch and the module's ``hparams`` (as JSON; a
    non-finite number or an object JSON has no form for kept as text). ``best_alias``
    (``None`` for none) moves to the version saved when ``monitor`` improved on the run's
    best so far (lower for ``mode="min"``, higher for ``"max"``); with ``monitor=None``, to
    the one saved when the trainer's monitoring ``ModelCheckpoint`` (if any) found a new
    best. ``remote`` (a URL or a remote's name, see ``Vault.push``): each version is pushed
    there once saved. A checkpoint the vault cannot take (locked past its timeout, a full
    disk) or a push the remote refuses gives a RuntimeWarning and training goes on; a
    failed push is tried again with the next checkpoint. Only the global-zero process saves.

    Raises ValueError for an invalid name, alias, tag, mode or remote URL, NotFoundError
    for a remote name the vault lacks, and the vault's errors
    (``NotAVaultError``, ``LockTimeout``, ...) when it is created, before training starts.
    """

    def __init__(self, vault_path: str | os.PathLike[str], name: str, *,
                 monitor: str | None = None, mode: str = "min", remote: str | None = None,
                 best_alias: str | None = "best", tags: Mapping[str, Any] | None = None,
                 description: str = "") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.run = VaultRun(vault_path, name, remote=remote, best_alias=best_alias, tags=tags,
                            description=description)
        self.saved = self.run.saved  # this run's versions, in order
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None  # the monitored value of the run's best version
        self.seen: tuple[str, float | None] | None = None  # ModelCheckpoint's best, last looked

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        run = self.run
        if run.saved and run.saved[-1].metadata.get("step") == trainer.global_step:
            return  # a second save of the same weights (save_last, a second ModelCheckpoint)
        metrics = finite_metrics(trainer.callback_metrics)
        version = run.keep(lambda vault, parent: vault.save(
            run.name, pl_module.state_dict(),
            # Metrics at the top level, as the importers and the Trainer callback keep them.
            metadata={**metrics, "step": trainer.global_step, "epoch": trainer.current_epoch,
                      "hparams": json_safe(pl_module.hparams)},
            tags=run.tags, description=run.description, parent=parent),
            self.is_best(trainer, metrics), f"the checkpoint of step {trainer.global_step}")
        if self.monitor is not None and version and run.best_alias in version.aliases:
            # The best is the best the vault holds: one whose save failed is no bar.
            self.best = metrics[self.monitor]

    def is_best(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> bool:
        """Whether the checkpoint being saved is the run's best so far (with no monitor,
        noting ModelCheckpoint's best)."""
        if self.monitor is not None:
            value = metrics.get(self.monitor)
            # Strictly better only: a metric not logged since stays equal.
            return value is not None and (self.best is None or (
                value < self.best if self.mode == "min" else value > self.best))
        checkpoint = next((c for c in trainer.checkpoint_callbacks
                           if isinstance(c, ModelCheckpoint) and c.monitor is not None), None)
        if checkpoint is None or checkpoint.best_model_score is None:
            return False
        # ModelCheckpoint sets its best before it saves; unchanged since the last save,
        # this save is not its new best (a periodic save by another callback, say).
        seen = (checkpoint.best_model_path, _number(checkpoint.best_model_score))
        new, self.seen = seen != self.seen, seen
        return new


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of Lightning's ``callback_metrics`` (scalar tensors): a NaN loss
    must not make the save refuse its metadata."""
    numbers = {str(key): _number(value) for key, value in metrics.items()}
    return {key: value for key, value in numbers.items() if value is not None}


def json_safe(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` as JSON a vault accepts: NaN and infinities as their names, objects
    JSON has no form for (a dtype, a path, a module) as their ``str``, non-text keys
    that JSON cannot take dropped."""
    text = json.dumps(dict(hparams), default=str, skipkeys=True)
    return json.loads(text, parse_constant=str)


def _number(value: Any) -> float | None:
    if hasattr(value, "numel"):  # a torch tensor: a number only when it holds one
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
