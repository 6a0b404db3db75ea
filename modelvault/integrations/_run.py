"""What every training callback keeps between checkpoints: the vault, the model's name,
what each version gets, and the run's versions so far. Imports no framework."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import modelvault

from .._refs import check_alias, check_name
from .._writer import tag_changes


class VaultRun:
    """Checks its arguments and opens the vault once when made, so a wrong path, name,
    alias or tag fails before training starts, not at the first checkpoint."""

    def __init__(self, vault_path: str | os.PathLike[str], name: str, *,
                 remote: str | None, best_alias: str | None,
                 tags: Mapping[str, Any] | None, description: str) -> None:
        check_name(name)
        if best_alias is not None:
            check_alias(best_alias)
        self.vault_path = Path(vault_path)
        self.name = name
        self.remote = remote
        self.best_alias = best_alias
        self.tags = dict(tags or {})
        tag_changes(self.tags)  # as save would raise it at the first checkpoint
        self.description = description
        self.saved: list[modelvault.ModelVersion] = []  # this run's versions, in order
        with modelvault.open(self.vault_path):
            pass

    def keep(self, save: Callable[[modelvault.Vault, modelvault.ModelVersion | None],
                                  modelvault.ModelVersion],
             best: bool) -> modelvault.ModelVersion:
        """Save the next version (``save(vault, parent)``, parent the run's previous
        version), move ``best_alias`` to it when ``best``, push it to ``remote``."""
        with modelvault.open(self.vault_path) as vault:
            version = save(vault, self.saved[-1] if self.saved else None)
            if self.best_alias and best:
                version = vault.alias(version, self.best_alias)
            if self.remote is not None:
                vault.push(self.remote, [version])
        self.saved.append(version)
        return version
