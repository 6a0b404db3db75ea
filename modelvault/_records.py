"""The records the API returns: frozen dataclasses, never raw rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ModelVersion:
    """One saved version of a model. Reading it touches no model bytes."""

    name: str
    version: int
    id: str  # uuid4: names this version uniquely, even among copies of the vault
    digest: str  # hex BLAKE3 of the version's content; equal content, equal digest
    created_at: datetime  # UTC
    size: int  # raw bytes of the model
    added_bytes: int  # stored chunk bytes this save added to the vault
    kind: str  # "arrays", "pickle" or "files"
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""
    environment: dict[str, Any] = field(default_factory=dict, repr=False)
    # "trusted": a key this machine trusts signed it; "untrusted": another key did;
    # "invalid": the signature fails, so the version changed after it was saved;
    # "unsigned". Pickled versions load without trust=True only when "trusted".
    signature: str = "unsigned"

    @property
    def ref(self) -> str:
        """The reference that names exactly this version, e.g. ``churn:3``."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ModelInfo:
    """A model and its versions at a glance."""

    name: str
    versions: int
    latest: int
    updated_at: datetime


@dataclass(frozen=True)
class VaultStats:
    """Sizes and ratios of a whole vault."""

    models: int
    versions: int
    chunks: int
    raw_bytes: int  # sum of every version's size, as if each were stored alone
    unique_bytes: int  # raw bytes of the distinct chunks
    stored_bytes: int  # compressed bytes of the distinct chunks
    file_bytes: int  # size of the vault file

    @property
    def dedup_ratio(self) -> float:
        return self.raw_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def total_ratio(self) -> float:
        """Raw bytes per byte of file: what dedup and compression saved together."""
        return self.raw_bytes / self.file_bytes if self.file_bytes else 1.0


@dataclass(frozen=True)
class Problem:
    """One thing ``Vault.verify`` found wrong."""

    message: str
    model: str | None = None
    version: int | None = None
    chunk: str | None = None

    def __str__(self) -> str:
        where = f"{self.model}:{self.version}" if self.model is not None else "vault"
        chunk = f" chunk {self.chunk[:16]}" if self.chunk else ""
        return f"{where}{chunk}: {self.message}"
