"""Following a remote's labels, the way git follows a remote's branches.

Each label (an alias of a model, a tag of a version) has three positions: ours (this
vault's), theirs (the remote's, as its log tells it) and seen (where it was on the remote
when this vault last took it or matched it: the tables ``remote_aliases`` and
``remote_tags``, by the remote's URL). After a pull has merged the versions, ``follow``
settles every label in scope:

* ours == theirs: nothing to do; seen := theirs.
* ours == seen (nobody moved it here since): take theirs, if it is a version this vault
  has (or the label is gone there); seen := theirs.
* theirs == seen (moved here only): keep ours, for a push to send.
* otherwise (moved on both sides, or never seen and different): a conflict, reported in
  the same words at every pull; ``prefer="theirs"`` takes theirs, ``prefer="ours"``
  keeps ours and records theirs as seen (settled until the remote moves it again).

A push records seen := theirs where it leaves ours == theirs (``record``), never a
position this vault does not hold: a vault that is behind keeps following. The tables
are advisory state in a file anyone may have written: a row that fails its checks counts
as absent (docs/remote.md, "Labels").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .._catalog import VersionRow
from .._errors import ReadOnlyError
from .._refs import Ref, check_alias, check_name
from ._log import State, _passes
from ._remote import Local
from ._store import limit

PREFER = (None, "theirs", "ours")
_SETTLE = "pull with --theirs to take the remote's, --ours to keep this one"
_SHOWN = 60  # characters of a tag value a report line shows
_NAME, _ALIAS = _passes(check_name), _passes(check_alias)
# Each table's columns besides ``remote``: a label's key (two), and its position there.
_COLUMNS = {"remote_aliases": ("model", "alias", "uuid"),
            "remote_tags": ("uuid", "key", "value")}


class _Version(NamedTuple):
    """A version of this vault, in scope."""

    model: str
    number: int


class _Positions(NamedTuple):
    """One label's three positions (None: absent)."""

    ours: str | None
    theirs: str | None
    seen: str | None


@dataclass
class _Plan:
    """What settling the labels writes, and what it reports."""

    aliases: list[tuple[str, str, str | None]] = field(default_factory=list)  # here
    tags: list[tuple[str, str, str | None]] = field(default_factory=list)  # here
    seen_aliases: list[tuple[str, str, str | None]] = field(default_factory=list)
    seen_tags: list[tuple[str, str, str | None]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # versions no longer there: seen dropped
    moved: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def writes(self) -> bool:
        return bool(self.aliases or self.tags or self.seen_aliases or self.seen_tags
                    or self.gone)


def follow(local: Local, url: str, state: State, models: set[str] | None,
           prefer: str | None, added: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Settle the labels of ``models`` (None: every model on the remote and every model
    this vault saw there) by the rule above; returns the lines for the labels moved and
    the conflicts left. ``added``: the versions this pull brought, whose tags are not
    reported as moved (they came with the version)."""
    return _settle(local, url, state, models, prefer, pulling=True, added=set(added))


def record(local: Local, url: str, state: State, models: set[str]) -> None:
    """After a push: seen := theirs for every label of ``models`` where ours == theirs.
    A vault opened read-only, or on a read-only file, records nothing: the next pull
    records what is still equal then."""
    connection = local.connection
    if connection.readonly or connection.damage is not None:
        return
    try:
        _settle(local, url, state, models, None, pulling=False, added=set())
    except ReadOnlyError:
        pass


def _settle(local: Local, url: str, state: State, models: set[str] | None,
            prefer: str | None, *, pulling: bool, added: set[str]
            ) -> tuple[list[str], list[str]]:
    connection = local.connection
    # Planned in a read, and again in the write that carries it out (if it writes
    # anything): a pull that changes nothing writes nothing.
    with connection.lock, connection.read() as db:
        plan = _plan(db, url, state, models, prefer, pulling, added)
    # A read-only vault takes no label (the write refuses), and records nothing: as
    # after a push, the next pull that can write records what is equal then.
    if plan.aliases or plan.tags or (plan.writes() and not connection.readonly):
        with connection.lock, connection.write() as db:
            plan = _plan(db, url, state, models, prefer, pulling, added)
            _apply(local, url, plan)
    return plan.moved, plan.conflicts


def _plan(db: sqlite3.Connection, url: str, state: State, models: set[str] | None,
          prefer: str | None, pulling: bool, added: set[str]) -> _Plan:
    tracked = db.execute("PRAGMA user_version").fetchone()[0] >= 7
    seen_aliases = _tracked(db, "remote_aliases", url) if tracked else []
    scope = models if models is not None else (
        set(state.aliases) | {e["model"] for e in state.versions.values()}
        | {m for m, _, _ in seen_aliases})
    here = {u: _Version(m, n) for u, m, n in db.execute(
        "SELECT v.uuid, m.name, v.version FROM versions v JOIN models m ON m.id = v.model_id")
        if m in scope}
    # Versions both here and there, of one model on both sides: the ones whose tags
    # follow, and the positions an alias may take.
    both = {u for u, v in here.items() if state.versions.get(u, {}).get("model") == v.model}
    plan = _Plan()

    def at(uuid: str | None) -> str:  # a version here, as report lines give it
        return "unset" if uuid is None else f"{here[uuid].model}:{here[uuid].number}"

    # Aliases, by (model, alias). Here too a label that is not text (the file's maker
    # wrote it) is none.
    ours = {(m, a): u for m, a, u in db.execute(
        "SELECT m.name, a.alias, v.uuid FROM aliases a JOIN models m ON m.id = a.model_id "
        "JOIN versions v ON v.id = a.version_id AND v.model_id = a.model_id "
        "WHERE typeof(a.alias) = 'text'") if m in scope}
    theirs = {(m, a): u for m in scope for a, u in state.aliases.get(m, {}).items()}
    # A seen position must be a version of that model, here or there (else the row is
    # a stranger's, or its version was deleted on both sides: absent either way).
    seen = {(m, a): u for m, a, u in _unique(seen_aliases)
            if m in scope and _NAME(m) and _ALIAS(a)
            and m in ((here[u].model if u in here else None),
                      state.versions.get(u, {}).get("model"))}
    plan.aliases, plan.seen_aliases = _judge(
        [_Label((m, a), f"{m}@{a}", _Positions(ours.get((m, a)), theirs.get((m, a)),
                                              seen.get((m, a))),
                at, "moved", True)
         for m, a in sorted(ours.keys() | theirs.keys() | seen.keys())
         # at a version this vault lacks: followed once it has it
         if theirs.get((m, a)) is None or theirs[m, a] in both],
        plan, url, prefer, pulling)

    # Tags, by (version, key), of the versions both here and there.
    rows = _tracked(db, "remote_tags", url) if tracked else []
    if models is None:
        plan.gone = sorted({u for u, _, _ in rows} - set(state.versions))
    # Of a version this pull added, what was seen describes a copy deleted here since:
    # its tags come with it, as any added version's do.
    seen_tags = {(u, k): v for u, k, v in _unique(rows) if u in both - added and k}
    mine = {(u, k): v for u, k, v in db.execute(
        "SELECT v.uuid, t.key, t.value FROM tags t JOIN versions v ON v.id = t.version_id "
        "WHERE typeof(t.key) = 'text' AND typeof(t.value) = 'text'") if u in both}
    there = {(u, k): v for u in both for k, v in state.versions[u]["tags"].items()}
    plan.tags, plan.seen_tags = _judge(
        [_Label((u, k), f"{at(u)} tag {_word(k)}",
                _Positions(mine.get((u, k)), there.get((u, k)), seen_tags.get((u, k))),
                _shown, "changed", u not in added)
         for u, k in sorted(mine.keys() | there.keys() | seen_tags.keys(),
                            key=lambda k: (*here[k[0]], k[1]))],
        plan, url, prefer, pulling)
    return plan


class _Label(NamedTuple):
    """One label, as the rule sees it."""

    key: tuple[str, str]  # (model, alias) or (version uuid, tag key)
    name: str  # as report lines give it: churn@production, churn:1 tag stage
    where: _Positions
    shown: Callable[[str | None], str]  # a position, as report lines give it
    verb: str  # what a label does: an alias "moved", a tag "changed"
    reported: bool  # whether a move of it is reported


def _judge(labels: list[_Label], plan: _Plan, url: str, prefer: str | None, pulling: bool
           ) -> tuple[list[tuple[str, str, str | None]], list[tuple[str, str, str | None]]]:
    """The rule, for ``labels``: (those to take, as (*key, theirs)), (those whose seen
    position becomes theirs, likewise); their report lines go to ``plan``."""
    taken, seen = [], []
    for label in labels:
        where = label.where
        take, settled, conflict = _decide(where, prefer, pulling)
        if take:
            taken.append((*label.key, where.theirs))
            if label.reported:
                plan.moved.append(f"{label.name}: {label.shown(where.ours)} -> "
                                  f"{label.shown(where.theirs)} (from {url})")
        if conflict:
            why = ("set differently on both sides before any pull from there"
                   if where.seen is None else f"{label.verb} on both sides since the last pull")
            plan.conflicts.append(f"{label.name}: {label.shown(where.ours)} here, "
                                  f"{label.shown(where.theirs)} on {url} ({why}; {_SETTLE})")
        if settled and where.seen != where.theirs:
            seen.append((*label.key, where.theirs))
    return taken, seen


def _decide(where: _Positions, prefer: str | None, pulling: bool
            ) -> tuple[bool, bool, bool]:
    """(take theirs here, record theirs as seen, report a conflict) for one label; after
    a push (not ``pulling``), only what it leaves equal is recorded."""
    if where.ours == where.theirs:
        return False, True, False
    if not pulling or where.theirs == where.seen:  # moved here only: a push sends it
        return False, False, False
    if where.ours == where.seen or prefer == "theirs":
        return True, True, False
    return False, prefer == "ours", prefer is None


def _word(key: str) -> str:
    """A tag's key, as report lines give it: as it is if short and printable, else
    as ``_shown`` gives a value (a key may hold a newline, or a terminal's escapes)."""
    return key if key.isprintable() and len(key) <= _SHOWN else _shown(key)


def _shown(value: str | None) -> str:
    if value is None:
        return "unset"
    return repr(value) if len(value) <= _SHOWN else f"{value[:_SHOWN]!r}..."


def _apply(local: Local, url: str, plan: _Plan) -> None:
    """Carry out ``plan`` (inside the write that planned it)."""
    db, catalog = local.connection.db, local.catalog
    for model, alias, uuid in plan.aliases:
        if uuid is None:
            catalog.remove_alias(model, alias)
        else:
            catalog.set_alias(_row(local, uuid), alias)
    for uuid, key, value in plan.tags:
        catalog.set_tags(_row(local, uuid), [(key, value)])
    _record(db, "remote_aliases", url, plan.seen_aliases)
    _record(db, "remote_tags", url, plan.seen_tags)
    db.executemany("DELETE FROM remote_tags WHERE remote = ? AND uuid = ?",
                   [(url, uuid) for uuid in plan.gone])


def _record(db: sqlite3.Connection, table: str, url: str,
            rows: list[tuple[str, str, str | None]]) -> None:
    """Set the seen positions ``rows`` (key, key, position; None: absent) in ``table``."""
    first, second, position = _COLUMNS[table]
    for row in rows:
        db.execute(f"DELETE FROM {table} WHERE remote = ? AND {first} = ? AND {second} = ?",
                   (url, *row[:2]))
        if row[2] is not None:
            db.execute(f"INSERT INTO {table} (remote, {first}, {second}, {position}) "
                       "VALUES (?, ?, ?, ?)", (url, *row))


def _row(local: Local, uuid: str) -> VersionRow:
    """The catalog's row of the version ``uuid`` here (checked, as every resolve is)."""
    model, number = local.connection.db.execute(
        "SELECT m.name, v.version FROM versions v JOIN models m ON m.id = v.model_id "
        "WHERE v.uuid = ?", (uuid,)).fetchone()
    return local.catalog.resolve(Ref(model, version=number))


def seen(db: sqlite3.Connection, url: str
         ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """Where this vault last saw the remote ``url``'s labels: aliases by (model, alias)
    and tags by (version uuid, key). A push leaves alone a label still at its seen
    position here while the remote has moved it: this vault is behind on it, and
    sending it would move the remote's back."""
    if db.execute("PRAGMA user_version").fetchone()[0] < 7:
        return {}, {}
    return ({(m, a): u for m, a, u in _unique(_tracked(db, "remote_aliases", url))},
            {(u, k): v for u, k, v in _unique(_tracked(db, "remote_tags", url))})


def _tracked(db: sqlite3.Connection, table: str, url: str) -> list[tuple[str, str, str]]:
    """The rows of ``table`` for the remote ``url`` whose columns are all UTF-8 text no
    longer than a log entry (a remote's label cannot be longer). Read as bytes: a row of
    another type or encoding counts as absent, never as an error."""
    cast = ", ".join(f"CAST({c} AS BLOB)" for c in _COLUMNS[table])
    text = " AND ".join(f"typeof({c}) = 'text' AND length(CAST({c} AS BLOB)) <= :most"
                        for c in _COLUMNS[table])
    found = []
    for row in db.execute(f"SELECT {cast} FROM {table} WHERE remote = :url AND {text}",
                          {"url": url, "most": limit("log")}):
        try:
            found.append(tuple(bytes(value).decode("utf-8") for value in row))
        except UnicodeDecodeError:
            continue
    return found  # type: ignore[return-value]


def _unique(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``rows`` but those whose key (the first two columns) is given more than once: a
    file whose key index was edited may list one label twice, and neither counts."""
    count: dict[tuple[str, str], int] = {}
    for a, b, _ in rows:
        count[a, b] = count.get((a, b), 0) + 1
    return [r for r in rows if count[r[0], r[1]] == 1]



