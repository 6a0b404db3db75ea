"""A Hugging Face ``Trainer`` callback that keeps each checkpoint as a vault version.

>>> from modelvault.integrations.transformers import VaultCallback
>>> trainer = Trainer(model, args, ..., callbacks=[VaultCallback("runs.vault", "bert")])
... # doctest: +SKIP

Each ``checkpoint-N/`` the Trainer writes becomes the next version of the model: its
model files (weights, config, tokenizer), not the optimizer and scheduler state only a
resumed run needs. The files the Trainer has just written are stored as they are, so
the weights are not serialized a second time; each ``.safetensors`` tensor is stored as
its XOR with the previous checkpoint's where that is smaller (measured on a tiny BERT:
the same bytes added as saving its state dict, and the version extracts to a folder
``from_pretrained`` opens).

A save is one vault transaction: a process killed mid-save leaves every checkpoint saved
before it whole (tests/test_trainer_callback.py kills one).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .._importers import model_files
from ._run import VaultRun

# log_history entries' bookkeeping, kept as the version's own step and epoch instead.
BOOKKEEPING = ("step", "epoch")


class VaultCallback(TrainerCallback):
    """Save each checkpoint the Trainer writes as the next version of ``name`` in the
    vault at ``vault_path``.

    The version's parent is the one the previous checkpoint of this run became (so its
    lineage is the run's and its tensors are stored as deltas). Its metadata holds the
    latest logged training and eval metrics (finite numbers only, at the top level:
    ``metadata["eval_loss"]``, as the importers keep them), the step, the epoch and the
    run's ``TrainingArguments``. ``best_alias`` (``None`` for none) moves to the
    version the Trainer calls its best (``metric_for_best_model``, ``greater_is_better``).
    ``remote`` (a URL or a remote's name, see ``Vault.push``): each version is pushed
    there once saved. A checkpoint the vault cannot take (locked past its timeout, a full
    disk) or a push the remote refuses gives a RuntimeWarning and training goes on; a
    failed push is tried again with the next checkpoint. Only the main process saves.

    Raises ValueError for an invalid name, alias, tag or remote URL, NotFoundError for a
    remote name the vault lacks, and the vault's errors
    (``NotAVaultError``, ``LockTimeout``, ...) when it is created, before training starts.
    """

    def __init__(self, vault_path: str | os.PathLike[str], name: str, *,
                 remote: str | None = None, best_alias: str | None = "best",
                 tags: Mapping[str, Any] | None = None, description: str = "") -> None:
        self.run = VaultRun(vault_path, name, remote=remote, best_alias=best_alias, tags=tags,
                            description=description)
        self.saved = self.run.saved  # this run's versions, in order

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            files = model_files(folder)
        except OSError as exc:  # a search trial writes under output_dir/run-N/, say
            warnings.warn(f"modelvault: {folder.name} not saved to {self.run.vault_path}, "
                          f"training goes on: {exc}", RuntimeWarning, stacklevel=2)
            return
        if not files:  # the weights written elsewhere: nothing here is the model
            warnings.warn(f"modelvault: {folder} holds no model files, only what resuming "
                          "the run needs; not saved, training goes on", RuntimeWarning,
                          stacklevel=2)
            return
        run = self.run
        run.keep(lambda vault, parent: vault.save_files(
            run.name, files, metadata=checkpoint_metadata(args, state),
            tags=run.tags, description=run.description, parent=parent),
            is_best(state, folder), folder.name)


def checkpoint_metadata(args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
    """The latest metrics, step, epoch and the run's arguments, as JSON a vault accepts."""
    metrics: dict[str, float] = {}
    for entry in logged(state.log_history, state.global_step):
        metrics.update(entry)
    # Metrics at the top level, as the importers keep them: vault.plot(name, "eval_loss")
    # reads a run saved by the callback and one imported afterwards alike.
    return {**metrics, "step": state.global_step, "epoch": _finite(state.epoch),
            # max_grad_norm=inf is written as Infinity, which no JSON holds: kept as its name
            "training_args": json.loads(args.to_json_string(), parse_constant=str)}


def logged(history: Sequence[Mapping[str, Any]], step: int) -> list[dict[str, float]]:
    """The last training log and the last eval log at or before ``step``, their finite
    numbers only: a NaN loss must not make the save refuse its metadata."""
    latest: dict[bool, dict[str, float]] = {}
    for entry in history:
        if entry.get("step", 0) <= step:
            numbers = {k: v for k, v in entry.items()
                       if k not in BOOKKEEPING and _finite(v) is not None}
            latest[any(k.startswith("eval_") for k in entry)] = numbers
    return [latest[key] for key in (False, True) if key in latest]


def is_best(state: TrainerState, folder: Path) -> bool:
    """Whether the Trainer holds this checkpoint for its best so far."""
    best_step = getattr(state, "best_global_step", None)  # transformers >= 4.51
    if best_step is not None:
        return bool(best_step == state.global_step)
    best = state.best_model_checkpoint
    return best is not None and Path(best).name == folder.name


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None
