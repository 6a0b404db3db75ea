"""modelvault: every model and version in one SQLite file, deduplicated and compressed.

>>> import modelvault
>>> with modelvault.open(tmp_path / "models.vault") as vault:
...     vault.save("churn", {"weights": [1, 2]}).ref
'churn:1'
"""

from __future__ import annotations

import os
from typing import Any

from ._errors import (
    CorruptVaultError,
    DamagedVaultWarning,
    DiskFullError,
    EnvironmentWarning,
    FormatVersionError,
    IntegrityError,
    LockTimeout,
    NotAVaultError,
    NotFoundError,
    ReadOnlyError,
    RemoteError,
    TooLargeError,
    UnpicklableError,
    UntrustedError,
    VaultError,
)
from ._records import ModelInfo, ModelVersion, Problem, VaultStats
from ._vault import Vault
from ._version import __version__ as __version__

__all__ = [
    "Changes",
    "CorruptVaultError",
    "DamagedVaultWarning",
    "Diff",
    "DiskFullError",
    "EntryChange",
    "EnvironmentWarning",
    "FormatVersionError",
    "ImportReport",
    "IntegrityError",
    "LiveModel",
    "LockTimeout",
    "MergeReport",
    "ModelInfo",
    "ModelVersion",
    "NotAVaultError",
    "NotFoundError",
    "Problem",
    "PruneReport",
    "PushReport",
    "ReadOnlyError",
    "Remote",
    "RemoteError",
    "RemoteGcReport",
    "RemoteVersion",
    "SelftestResult",
    "TooLargeError",
    "UnpicklableError",
    "UntrustedError",
    "Vault",
    "VaultError",
    "VaultStats",
    "clone",
    "follow",
    "load",
    "open",
    "save",
]


def open(path: str | os.PathLike[str], *, readonly: bool = False,  # noqa: A001
         create: bool = True, timeout: float = 60.0, progress: bool | None = None,
         require: str | None = None, max_expansion: float | None = None) -> Vault:
    """Open (or create) the vault at ``path``; use it as a context manager. See ``Vault``."""
    return Vault(path, readonly=readonly, create=create, timeout=timeout, progress=progress,
                 require=require, max_expansion=max_expansion)


def save(path: str | os.PathLike[str], name: str, obj: Any, **options: Any) -> ModelVersion:
    """Save ``obj`` as the next version of ``name`` in the vault at ``path``, in one call."""
    with Vault(path) as vault:
        return vault.save(name, obj, **options)


def load(path: str | os.PathLike[str], ref: str, *, trust: bool = False,
         device: Any = None) -> Any:
    """Load the model ``ref`` names from the vault at ``path``, in one call."""
    # Not readonly: if a write was interrupted, only a writable open rolls its journal back.
    with Vault(path, create=False) as vault:
        return vault.load(ref, trust=trust, device=device)


def clone(url: str, path: str | os.PathLike[str], refs: list[str] | None = None, *,
          endpoint_url: str | None = None) -> Vault:
    """A new vault at ``path`` holding every version of the remote at ``url`` (or those
    ``refs`` name there), opened; see ``Vault.pull``. The file appears only once complete."""
    from pathlib import Path

    from . import _remote

    _remote.clone(url, Path(path), refs, endpoint_url=endpoint_url)
    return Vault(path, create=False)


# Imported when first asked for: `import modelvault` stays quick for the scripts and apps
# that only load (Remote would bring obstore and the network stack; follow, logging).
_LATER = {"Changes": "_diff", "Diff": "_diff", "EntryChange": "_diff", "Remote": "_remote",
          "LiveModel": "_follow", "follow": "_follow",
          "SelftestResult": "_selftest", "ImportReport": "_reports",
          "MergeReport": "_reports", "PruneReport": "_reports", "PushReport": "_reports",
          "RemoteGcReport": "_reports", "RemoteVersion": "_reports"}


def __getattr__(name: str) -> Any:
    if name in _LATER:
        import importlib

        value = getattr(importlib.import_module(f".{_LATER[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelvault' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LATER})
