"""The records the API returns: frozen dataclasses, never raw rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple

from . import _json
from ._errors import IntegrityError


class Columns(NamedTuple):
    """A version's stored text behind ``metadata``, ``environment`` and ``signature``."""

    created_at: str
    metadata: str
    environment: str
    key_id: str | None
    signature: str | None
    parent: str | None = None  # the lineage row's; both None where there is none
    source: str | None = None


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
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""
    # Parsed and checked on first use (see the properties below): listing 10,000
    # versions should not parse 20,000 JSON texts and check 10,000 signatures.
    columns: Columns = field(default=Columns("", "{}", "{}", None, None), repr=False,
                             compare=False)

    @classmethod
    def _make(cls, name: str, version: int, id: str, digest: str, created_at: datetime,
              size: int, added_bytes: int, kind: str, tags: dict[str, str],
              aliases: tuple[str, ...], description: str, columns: Columns) -> ModelVersion:
        """A record from its field values, without the generated __init__: listing 10,000
        versions spends most of its time building records, and __init__'s per-field
        object.__setattr__ makes that 5x slower. Stored into the instance's own dict in
        field order: that dict shares its keys with every other record's (168 bytes, not
        the 464 of a dict display put in its place), which made listing 10,000 versions
        a tenth faster."""
        record = object.__new__(cls)
        fields = record.__dict__
        fields["name"] = name
        fields["version"] = version
        fields["id"] = id
        fields["digest"] = digest
        fields["created_at"] = created_at
        fields["size"] = size
        fields["added_bytes"] = added_bytes
        fields["kind"] = kind
        fields["tags"] = tags
        fields["aliases"] = aliases
        fields["description"] = description
        fields["columns"] = columns
        return record

    @property
    def ref(self) -> str:
        """The reference that names exactly this version, e.g. ``churn:3``."""
        return f"{self.name}:{self.version}"

    def __repr__(self) -> str:  # one line: the dataclass's held the whole description
        from ._html import human_bytes

        return f"<ModelVersion {self.ref!r} {self.kind} {human_bytes(self.size)}>"

    def _repr_html_(self) -> str:  # a notebook's card of the version
        from ._html import version

        return version(self)

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """What was saved with the version (metrics, parameters); immutable."""
        return self._json("metadata")

    @cached_property
    def environment(self) -> dict[str, Any]:
        """Python, platform and package versions the version was saved with."""
        return self._json("environment")

    @property
    def signature(self) -> str:
        """"trusted": a key this machine trusts signed it; "untrusted": another key did;
        "invalid": the signature fails, so the version changed after it was saved;
        "unsigned". Pickled versions load without trust=True only when "trusted".
        Checked against the keys trusted at the time of asking."""
        from . import _trust

        columns = self.columns
        return _trust.signature_status(self._manifest(), columns.key_id, columns.signature)

    @property
    def signer(self) -> str | None:
        """The name of the trusted key that signed this version ("this machine" for its
        own), or None: unsigned, or signed by a key not trusted here (``signature`` says
        which, and whether the signature holds)."""
        from . import _trust

        if self.signature not in ("trusted",):
            return None
        return _trust.signer(self.columns.key_id)

    @property
    def key_id(self) -> str | None:
        """The fingerprint of the key that signed this version, or None if unsigned."""
        return self.columns.key_id if isinstance(self.columns.key_id, str) else None

    @property
    def parent(self) -> str | None:
        """The id of the version this one came from (``save(parent=...)``), or None."""
        return self.columns.parent

    @cached_property
    def source(self) -> dict[str, Any]:
        """Where the version was made: the git commit, branch and whether the working
        tree had changes, and the script or notebook; {} when not recorded."""
        return {} if self.columns.source is None else self._json("source")

    def _manifest(self) -> Any:
        from . import _trust

        columns = self.columns
        return _trust.Manifest(self.id, self.name, self.kind, self.digest,
                               columns.created_at, self.description, columns.metadata,
                               columns.environment,
                               _trust.lineage_text(columns.parent, columns.source))

    def _json(self, column: str) -> Any:
        try:
            value = _json.loads(getattr(self.columns, column))
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"{self.ref}: {column} is not valid JSON",
                                 model=self.name, version=self.version) from exc
        if not isinstance(value, dict):
            raise IntegrityError(f"{self.ref}: {column} is not a JSON object",
                                 model=self.name, version=self.version)
        return value


class VersionList(list[ModelVersion]):
    """The list ``Vault.versions`` returns: a plain list of ModelVersion, shown in a
    notebook as a table of one row per version."""

    __slots__ = ()

    def _repr_html_(self) -> str:
        from ._html import versions

        return versions(self)


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
