"""What merge, prune, push, pull and a remote's gc report: frozen dataclasses, as the records.

Apart from ``_records``: only those operations make them, and ``import modelvault``
need not build their classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._records import ModelVersion


@dataclass(frozen=True)
class MergeReport:
    """What ``Vault.merge`` or ``Vault.pull`` did: versions brought in, numbers changed,
    labels moved (a pull's), conflicts left."""

    added: tuple[ModelVersion, ...]  # the versions brought in, as numbered here
    renumbered: tuple[tuple[str, int, int], ...]  # (name, number there, number here)
    conflicts: tuple[str, ...]  # aliases and tags that differ, kept as they are here
    moved: tuple[str, ...] = ()  # aliases and tags a pull moved here, as the remote has them

    def __str__(self) -> str:
        lines = [f"added {len(self.added)} version(s)"
                 + (f", {len(self.renumbered)} renumbered" if self.renumbered else "")
                 + (f", moved {len(self.moved)} label(s)" if self.moved else "")
                 + (f", {len(self.conflicts)} conflict(s) kept as they are here"
                    if self.conflicts else "")]
        lines += [f"  {name}:{old} is {name}:{new} here" for name, old, new in self.renumbered]
        lines += [f"  moved: {m}" for m in self.moved]
        lines += [f"  conflict: {c}" for c in self.conflicts]
        return "\n".join(lines)


@dataclass(frozen=True)
class PruneReport:
    """What ``Vault.prune`` or ``Remote.prune`` deleted (or, in a dry run, would delete),
    how many versions it kept, and the bytes ``gc`` frees after it.

    From a vault: ModelVersion records, and the stored bytes of the chunks no version
    uses once these are gone. From a remote: RemoteVersion records, and the bytes of the
    pack objects, indexes and manifests no version there uses once these are gone
    (what a remote gc deletes when its grace period has passed).
    """

    deleted: tuple[ModelVersion, ...] | tuple[RemoteVersion, ...]
    kept: int
    freed_bytes: int
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"{verb} {len(self.deleted)} version(s), kept {self.kept}; gc "
                 f"{'would free' if self.dry_run else 'frees'} {self.freed_bytes:,} bytes"]
        lines += [f"  {mv.ref}" for mv in self.deleted]
        return "\n".join(lines)


@dataclass(frozen=True)
class RemoteVersion:
    """A version on a remote, as its log tells it (no weights read)."""

    name: str
    version: int
    id: str  # the version's uuid, as ModelVersion.id
    created_at: str  # ISO 8601, UTC
    kind: str
    size: int  # raw bytes of the model
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class PushReport:
    """What ``Vault.push`` did: versions added to the remote (numbered there), and the
    chunks and bytes uploaded for them (only those the remote lacked)."""

    added: tuple[RemoteVersion, ...]
    chunks: int
    uploaded_bytes: int

    def __str__(self) -> str:
        lines = [f"pushed {len(self.added)} version(s): {self.chunks} chunk(s), "
                 f"{self.uploaded_bytes:,} bytes uploaded"]
        lines += [f"  {v.ref}" for v in self.added]
        return "\n".join(lines)


@dataclass(frozen=True)
class RemoteGcReport:
    """What a remote gc deleted: objects (pack objects, indexes, manifests) and bytes."""

    objects: int
    bytes: int

    def __str__(self) -> str:
        return f"deleted {self.objects} object(s), {self.bytes:,} bytes"


@dataclass(frozen=True)
class ImportReport:
    """What ``Vault.import_`` did: the versions it added and those already imported."""

    name: str  # the model imported into (of an MLflow registry: the models, joined by ", ")
    added: tuple[ModelVersion, ...]  # the versions saved, oldest first
    existing: tuple[ModelVersion, ...]  # checkpoints or revisions an earlier import saved
