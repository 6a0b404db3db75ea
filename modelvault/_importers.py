"""Importers: models already stored elsewhere, brought into a vault as versions.

Two sources, told apart by their shape:

- a training output folder of ``checkpoint-N`` folders (as a Hugging Face ``Trainer``
  writes them): one files version per checkpoint in step order, each the child of the
  one before (so its tensors are stored as deltas), its step and that step's logged
  metrics (``trainer_state.json``) as metadata, ``@best`` on ``best_model_checkpoint``;
- a Hugging Face cache folder (``models--org--name`` with ``snapshots/<rev>/``): one
  version per snapshot revision, oldest download first, each a child of the one before;
  the revision as metadata and each ``refs/`` name as an alias. A blob two snapshots
  share is stored once by the vault's own dedup.

A version already imported is recognised by its metadata (``step`` of a checkpoint,
``revision`` of a snapshot; ``_importing.import_chain``): a version the Trainer callback
saved with the same step counts as imported too.

Everything read from the source is a stranger's: a file (or a link to one) outside the
source folder is refused with a VaultError naming it, before anything is saved; a
``trainer_state.json`` that is too big or not the Trainer's is ignored with a warning;
folder names that are not ``checkpoint-<digits>`` are skipped with a warning.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _json
from ._errors import NotFoundError, VaultError
from ._importing import Entry, check_contained, check_inside, import_chain, walk
from ._refs import check_alias, check_name
from ._reports import ImportReport

_CHECKPOINT = re.compile(r"checkpoint-([0-9]{1,18})")  # below 2**63: SQLite's integers
_REVISION = re.compile(r"[0-9A-Za-z._-]{1,100}")
# A Trainer's state of a long run is a few MB; beyond this it is not one we read.
MAX_TRAINER_STATE = 32 * 1024 * 1024
MAX_REF = 200  # bytes of a refs/ file: a commit hash and a newline
MAX_METRICS = 200  # metrics kept per step
# What a checkpoint folder holds for resuming the run rather than for the model: left
# out (the optimizer alone is twice the model's size, and training_args.bin is a pickle).
# Folders too: FSDP's optimizer_0/ and DeepSpeed's global_stepN/ are resume state, while
# FSDP's sharded model (pytorch_model_fsdp_0/) is the model.
# Whole names, not prefixes: a diffusers pipeline's scheduler/ folder is the model.
RESUME_STATE = re.compile(
    r"trainer_state\.json|training_args\.bin"
    r"|(optimizer|scheduler|scaler)(_\d+)?\.(pt|bin|pth)"  # Trainer's and Accelerate's
    r"|(rng_state|random_states)(_\d+)?\.(pth|pkl)"
    r"|optimizer_\d+|global_step\d+")  # FSDP's and DeepSpeed's folders


@dataclass(frozen=True)
class _Item:
    """One version to import: its folder, what identifies it, its metadata and aliases."""

    folder: Path
    key: str  # "step" or "revision": the metadata that recognises it once imported
    value: int | str
    metadata: dict[str, Any]
    aliases: tuple[str, ...]


def import_source(vault: Any, source: str | os.PathLike[str], name: str | None) -> ImportReport:
    """Import the checkpoint folder or Hugging Face cache folder ``source`` into
    ``vault`` as versions of ``name`` (default: from the folder's name), or the MLflow
    registry ``mlflow:URI`` (``_mlflow``: every registered model, or only ``name``)."""
    if isinstance(source, str) and source.startswith("mlflow:"):
        from ._mlflow import import_registry

        return import_registry(vault, source, name)
    root = Path(source)
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such folder")
    folder = root.resolve().name  # "." names the folder it is
    if folder.startswith("models--") and (root / "snapshots").is_dir():
        default, items = folder[len("models--"):].replace("--", "/"), _snapshots(root)
    else:
        default, items = folder, _checkpoints(root)
    name = check_name(default if name is None else name)
    for item in items:  # every link checked before the first save
        check_contained(item.folder, root)
    entries = []
    for item in items:
        # A checkpoint's model files, as the Trainer callback keeps them; a snapshot whole.
        paths = model_files(item.folder) if item.key == "step" else [item.folder]
        entries.append(Entry(item.value, item.aliases, sum(_size(p) for p in paths),
                             functools.partial(_save, vault, name, item, paths)))
    added, found = import_chain(vault, name, items[0].key, entries)
    return ImportReport(name=name, added=tuple(added), existing=tuple(found))


def _save(vault: Any, name: str, item: _Item, paths: list[Path], parent: Any) -> Any:
    """Save one checkpoint's or snapshot's files; None for a checkpoint without model
    files (warned)."""
    if not paths:
        warnings.warn(f"{item.folder}: no model files, only what resuming the run needs; "
                      "skipped", stacklevel=4)
        return None
    return vault.save_files(name, paths, metadata=item.metadata, parent=parent, source=False)


def _checkpoints(root: Path) -> list[_Item]:
    """The checkpoint folders of a training output folder, in step order."""
    steps: dict[int, Path] = {}
    for child in sorted(root.iterdir()):
        if not child.name.startswith("checkpoint-") or not child.is_dir():
            continue  # the final model's files, logs, runs/: not checkpoints
        match = _CHECKPOINT.fullmatch(child.name)
        if match is None:
            warnings.warn(f"{child}: not a checkpoint-<step> folder; skipped", stacklevel=3)
            continue
        check_inside(child, root)  # named itself, before its trainer_state.json is read
        steps[int(match.group(1))] = child
    if not steps:
        raise VaultError(f"{root}: no checkpoint-<step> folders and not a Hugging Face "
                         "cache folder (models--org--name); nothing to import")
    last = _trainer_state(steps[max(steps)], root) or _trainer_state(root, root)
    best = None
    if last is not None and isinstance(last.get("best_model_checkpoint"), str):
        match = _CHECKPOINT.fullmatch(Path(last["best_model_checkpoint"]).name)
        best = int(match.group(1)) if match else None
    items = []
    for step in sorted(steps):
        state = _trainer_state(steps[step], root) or last
        items.append(_Item(steps[step], "step", step,
                           {**_metrics(state, step), "step": step},
                           ("best",) if step == best else ()))
    return items


def _trainer_state(folder: Path, root: Path) -> dict[str, Any] | None:
    """The folder's ``trainer_state.json``, or None if it has none or it is not one
    (warned): a metric less is better than an import refused."""
    path = folder / "trainer_state.json"
    check_inside(path, root)  # read before the checkpoints' links are checked
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_TRAINER_STATE + 1)
        if len(text) > MAX_TRAINER_STATE:
            raise ValueError(f"over {MAX_TRAINER_STATE:,} bytes")
        state = _json.loads(text)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path}: ignored ({exc})", stacklevel=4)
        return None
    return state


def _metrics(state: dict[str, Any] | None, step: int) -> dict[str, Any]:
    """The numbers ``log_history`` logged at ``step`` (loss, eval_loss, epoch, ...)."""
    history = state.get("log_history") if state else None
    found: dict[str, Any] = {}
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        for key, value in entry.items():
            if (isinstance(key, str) and len(key) <= 100 and key != "step"
                    and len(found) < MAX_METRICS
                    and type(value) in (int, float) and math.isfinite(value)):
                found[key] = value
    return found


def _snapshots(root: Path) -> list[_Item]:
    """The snapshot revisions of a cache folder, oldest download first, with the
    ``refs/`` names pointing at each as aliases."""
    names: dict[str, list[str]] = {}
    refs = root / "refs"
    check_contained(refs, root)
    check_inside(root / "snapshots", root)  # else its listing is of another folder
    for path in sorted(refs.rglob("*")) if refs.is_dir() else []:
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            revision = f.read(MAX_REF).decode("ascii", "replace").strip()
        ref = path.relative_to(refs).as_posix()
        alias = ref.replace("/", "-")
        try:
            check_alias(alias)
        except ValueError:
            warnings.warn(f"{path}: {ref!r} cannot be an alias; left out", stacklevel=3)
            continue
        names.setdefault(revision, []).append(alias)
    folders = []
    for child in (root / "snapshots").iterdir():
        if not (_REVISION.fullmatch(child.name) and child.is_dir()):
            warnings.warn(f"{child}: not a snapshot revision folder; skipped", stacklevel=3)
            continue
        folders.append(child)
    if not folders:
        raise VaultError(f"{root}: no snapshots; nothing to import")
    folders.sort(key=lambda f: (f.stat().st_mtime, f.name))
    return [_Item(f, "revision", f.name, {"revision": f.name},
                  tuple(names.get(f.name, ()))) for f in folders]


def model_files(folder: Path) -> list[Path]:
    """The files and folders of checkpoint ``folder`` that make the model, in name order:
    not the state only a resumed run needs (``RESUME_STATE``)."""
    kept = sorted(path for path in folder.iterdir()
                  if (path.is_file() or path.is_dir())
                  and not RESUME_STATE.fullmatch(path.name))
    if len(kept) == 1 and kept[0].is_dir():
        # save_files names a lone folder's files relative to that folder, which would
        # lose its name: the whole checkpoint keeps the layout, resume state and all.
        return [folder]
    return kept


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (walk(path) if path.is_dir() else [path])
               if p.is_file())
