"""What every training callback keeps between checkpoints: the vault, the model's name,
what each version gets, and the run's versions so far. Imports no framework.

A checkpoint the vault cannot take (locked past its timeout, a full disk, a file gone)
or a push the remote refuses warns and lets training go on: hours of training are worth
more than one version, and the framework's own checkpoint stays where it wrote it. A
push that failed is tried again with the next checkpoint's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import modelvault

from .._errors import NotFoundError, VaultError
from .._refs import check_alias, check_name
from .._remote import check_remote
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
        self.unpushed: list[modelvault.ModelVersion] = []  # saved, their push failed
        with modelvault.open(self.vault_path) as vault:
            if remote is not None:  # a name the vault lacks, no store's URL, or one
                # holding credentials (never used, and echoed by each failed push): fail now
                check_remote("remote", vault._remote_url(remote))

    def keep(self, save: Callable[[modelvault.Vault, modelvault.ModelVersion | None],
                                  modelvault.ModelVersion],
             best: bool, what: str) -> modelvault.ModelVersion | None:
        """Save the next version (``save(vault, parent)``, parent the run's previous
        version), move ``best_alias`` to it when ``best``, push it and any version whose
        push failed before to ``remote``. None, with a RuntimeWarning naming ``what`` (the
        checkpoint), if the vault could not take it; the version, with one, if only the
        alias could not move."""
        version = None
        try:
            with modelvault.open(self.vault_path) as vault:
                # The run's newest version the vault still has: one pruned or deleted
                # mid-run would make every later save fail for want of its parent.
                kept = self._kept(vault)
                version = save(vault, next((v for v in reversed(self.saved)
                                            if v.id in kept), None))
                # Committed from here on: the run keeps it even if the alias cannot
                # move, or the next version's parent and the push would skip it.
                self.saved.append(version)
                if self.best_alias and best:
                    version = self.saved[-1] = vault.alias(version, self.best_alias)
        except (VaultError, OSError) as exc:
            if version is None:
                warnings.warn(f"modelvault: {what} not saved to {self.vault_path}, "
                              f"training goes on: {exc}", RuntimeWarning, stacklevel=3)
                return None
            warnings.warn(f"modelvault: {what} saved as {version.ref} but "
                          f"@{self.best_alias} not moved to it: {exc}", RuntimeWarning,
                          stacklevel=3)
        if self.remote is not None:
            self.unpushed.append(version)
            self.push()
        return version

    def push(self) -> None:
        """Push the run's versions not yet on ``remote``; warn if the remote refuses."""
        try:
            with modelvault.open(self.vault_path) as vault:
                # One deleted since (pruned while the remote was down) has nothing to
                # push, and asking for it would fail every later push.
                kept = self._kept(vault)
                self.unpushed = [v for v in self.unpushed if v.id in kept]
                vault.push(self.remote, self.unpushed)
        except (VaultError, OSError) as exc:
            warnings.warn(f"modelvault: {', '.join(v.ref for v in self.unpushed)} not "
                          f"pushed to {self.remote} yet (tried again at the next "
                          f"checkpoint): {exc}", RuntimeWarning, stacklevel=4)
            return
        self.unpushed.clear()

    def _kept(self, vault: modelvault.Vault) -> set[str]:
        """The ids of the model's versions the vault has now (none if it has no model)."""
        try:
            return {v.id for v in vault.versions(self.name)}
        except NotFoundError:
            return set()
