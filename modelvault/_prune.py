"""Retention: which versions a set of keep-rules keeps, and deleting the others.

A version is kept when any rule keeps it; every model's latest version is always kept,
so a rule set can never empty a model (delete it by name for that). The rules judge a
vault's versions here and a remote's (``_remote/_retention``) alike. What gc would then
free is measured by deleting inside the write and asking the pack store which chunks no
version uses any more; a dry run rolls that write back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol, TypeVar

from ._catalog import parse_time
from ._refs import Ref

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._connection import Connection
    from ._packs import PackStore
    from ._reports import PruneReport


class _DryRun(Exception):
    """Raised inside the write to roll back what a dry run deleted."""


def since(value: datetime | str | None) -> datetime | None:
    """``keep_since`` as an aware UTC datetime: a datetime (naive ones are UTC) or an ISO
    8601 date or time; ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        try:  # 2026-12-01, 2026-12-01T12:00:00Z, ...+00:00
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"keep_since {value!r} is not an ISO 8601 date or time "
                             "(2026-12-01 or 2026-12-01T12:00:00Z; UTC unless it says)"
                             ) from None
    if not isinstance(value, datetime):
        raise TypeError(f"keep_since must be a datetime or an ISO 8601 string, not "
                        f"{type(value).__name__}")
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def rules(keep_last: int | None, keep_tagged: bool, keep_since: datetime | str | None
          ) -> datetime | None:
    """Check a rule set before anything is deleted (ValueError, TypeError); returns
    ``keep_since`` as ``since`` gives it."""
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError(f"keep_last must be a whole number of at least 1, not {keep_last!r}")
    when = since(keep_since)
    if keep_last is None and when is None and not keep_tagged:
        raise ValueError("prune needs a rule that says what to keep besides aliases: "
                         "keep_last, keep_since or keep_tagged")
    return when


class Labelled(Protocol):
    """A version as the rules see it: a vault's ModelVersion or a remote's RemoteVersion
    (whose ``created_at`` is the log's ISO 8601 text)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def created_at(self) -> datetime | str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    @property
    def tags(self) -> Mapping[str, str]: ...


V = TypeVar("V", bound=Labelled)


def _saved(mv: Labelled) -> datetime:
    at = mv.created_at
    return parse_time(at) if isinstance(at, str) else at  # IntegrityError if not a time


def doomed(versions: Sequence[V], *, keep_last: int | None, keep_aliased: bool,
           keep_tagged: bool, keep_since: datetime | None) -> list[V]:
    """The versions no rule keeps, oldest first per model."""
    by_model: dict[str, list[V]] = {}
    for mv in versions:
        by_model.setdefault(mv.name, []).append(mv)
    out = []
    for name in sorted(by_model):
        newest_first = sorted(by_model[name], key=lambda mv: mv.version, reverse=True)
        for rank, mv in enumerate(newest_first):
            keep = (rank == 0 or (keep_last is not None and rank < keep_last)
                    or (keep_aliased and bool(mv.aliases)) or (keep_tagged and bool(mv.tags))
                    or (keep_since is not None and _saved(mv) >= keep_since))
            if not keep:
                out.append(mv)
    return sorted(out, key=lambda mv: (mv.name, mv.version))


def prune(connection: Connection, catalog: Catalog, packs: PackStore,
          name: str | None, *, keep_last: int | None, keep_aliased: bool,
          keep_tagged: bool, keep_since: datetime | str | None,
          dry_run: bool) -> PruneReport:
    """Delete the versions (of model ``name``, or of every model) no rule keeps, in one
    write; with ``dry_run``, only say which and what gc would free."""
    from ._reports import PruneReport

    when = rules(keep_last, keep_tagged, keep_since)
    report: PruneReport | None = None
    try:
        with connection.write():
            if name is None:
                listed = catalog.every_record()
            else:
                catalog.resolve(Ref(name))  # NotFoundError naming the models there are
                listed = catalog.records("WHERE m.name = ? ORDER BY v.version", (name,))
            gone = doomed(listed, keep_last=keep_last, keep_aliased=keep_aliased,
                          keep_tagged=keep_tagged, keep_since=when)
            for mv in gone:
                catalog.delete(Ref(mv.name, version=mv.version))
            report = PruneReport(tuple(gone), len(listed) - len(gone),
                                 int(packs.stored_bytes(packs.unused())), dry_run)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    assert report is not None
    return report
