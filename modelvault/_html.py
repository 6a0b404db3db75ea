"""How a vault shows to people: sizes in human units, and the notebook views, the HTML
Jupyter shows for a vault, a version, a list of versions and a diff (``_repr_html_``).

Everything shown comes from a vault file, which a stranger may have made: every text is
escaped (a ``<script>`` in a tag shows as text), control and direction-changing
characters are shown as escapes, and every table and value is cut to a bound, so a vault
of 100,000 versions or a 16 MiB description makes a page of kilobytes. No JavaScript and
no stylesheet: the page works offline and in a notebook that trusts nothing.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from ._errors import VaultError

# The records, the diff and the vault import this module when first shown, so it
# imports none of them: their types are Any below.

ROWS = 200  # rows of a table shown; the rest are counted
TEXT = 200  # characters of a value shown; the rest cut with an ellipsis
SHORT = 60  # characters of a value in a list's row
PACKAGES = 10  # packages shown of a version's environment
ALIASES = 10  # aliases shown per model of a vault

# C0 and C1 controls, zero-width and bidirectional marks: shown as escapes, so a name
# cannot hide text or reorder what follows it.
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_TABLE = '<table cellpadding="3" style="border-collapse:collapse;text-align:left">'
_GONE = "\u2014"  # the side of a change that lacks it


def human_bytes(n: float) -> str:
    """A byte count for people: ``950 B``, ``4.3 MB`` (powers of 1000)."""
    units = ["B", "KB", "MB", "GB"]
    while abs(n) >= 1000 and len(units) > 1:
        n /= 1000
        units.pop(0)
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


def text(value: Any, limit: int = TEXT) -> str:
    """``value`` as escaped HTML: a string as it is, anything else as JSON; cut to
    ``limit`` characters."""
    if not isinstance(value, str):
        try:
            value = json.dumps(_rounded(value), ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            value = object.__repr__(value)
    if len(value) > limit:
        value = value[:limit] + "\u2026"
    return html.escape(_HIDDEN.sub(_escape, value))


def _rounded(value: Any, depth: int = 0) -> Any:
    """``value`` with its floats cut to 7 significant digits, for reading: 0.79, not
    0.7899999999999999. (The vault keeps them whole; JSON and the API give them so.)"""
    if type(value) is float and math.isfinite(value):
        return float(f"{value:.7g}")
    if depth > 20:  # _json bounds what a file may nest; this only bounds the walk
        return value
    if isinstance(value, dict):
        return {k: _rounded(v, depth + 1) for k, v in islice(value.items(), ROWS)}
    if isinstance(value, list):
        return [_rounded(v, depth + 1) for v in islice(value, ROWS)]
    return value


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def size(n: Any) -> str:
    """A byte count in human units; anything a damaged file holds instead, as text."""
    if type(n) in (int, float) and math.isfinite(n):  # one line: "24\u00a0B", never "24 / B"
        return html.escape(human_bytes(n)).replace(" ", "\u00a0")
    return text(n, SHORT)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], total: int | None = None
          ) -> str:
    """A table of cells already HTML, at most ``ROWS`` rows; ``total``, the number of rows
    there are when ``rows`` holds only some, for the "... and N more" line. Without a
    header, the first cell of each row is its label."""
    first = "td" if header else "th"
    shown = [(f"<tr><{first}>{row[0]}</{first}>" + "".join(f"<td>{cell}</td>"
                                                        for cell in row[1:]) + "</tr>")
             for row in islice(rows, ROWS)]
    head = ("<tr>" + "".join(f"<th>{text(h, SHORT)}</th>" for h in header) + "</tr>"
            if header else "")
    more = "" if total is None or total <= len(shown) else (
        f"<tr><td colspan=\"{max(len(header), 2)}\">\u2026 and {total - len(shown)} "
        "more</td></tr>")
    return f"{_TABLE}{head}{''.join(shown)}{more}</table>"


def _items(mapping: Any, limit: int = TEXT) -> list[list[str]]:
    """Rows of (key, value) of a mapping (the first ``ROWS``), values cut to ``limit``."""
    if not isinstance(mapping, dict):
        return [["", text(mapping, limit)]]
    return [[text(k, SHORT), text(v, limit)] for k, v in islice(mapping.items(), ROWS)]


def _listed(values: Iterable[Any], total: int | None, limit: int = SHORT) -> str:
    """The first few values joined with commas, and how many more of ``total`` there are
    (None: unknown, an ellipsis if there are any)."""
    shown = [text(v, limit) for v in islice(values, ALIASES + 1)]
    if len(shown) <= ALIASES:
        return ", ".join(shown)
    more = "" if total is None else f" and {total - ALIASES} more"
    return ", ".join(shown[:ALIASES]) + f", \u2026{more}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _read(field: Callable[[], Any]) -> Any:
    """A record's field, or why it cannot be read (a damaged column) as an ``_Unreadable``."""
    try:
        return field()
    except VaultError as exc:
        return _Unreadable(str(exc))


class _Unreadable(str):
    """What a field that could not be read shows instead."""


def _shown(value: Any) -> str:
    if isinstance(value, _Unreadable):
        return f"<em>unreadable: {text(str(value))}</em>"
    return text(value)


# -- a version ----------------------------------------------------------------------------

def version(mv: Any) -> str:
    """A version's card: what it is, its labels, lineage, signature, metadata and
    environment."""
    rows = [["kind", text(mv.kind, SHORT)],
            ["created", text(f"{mv.created_at:%Y-%m-%d %H:%M:%S} UTC")],
            ["size", f"{size(mv.size)}, of which this save added {size(mv.added_bytes)} "
                     "to the vault"]]
    if mv.description:
        rows.append(["description", text(mv.description)])
    if mv.aliases:
        rows.append(["aliases", _listed(mv.aliases, len(mv.aliases))])
    if mv.tags:
        rows.append(["tags", _listed((f"{k}={v}" for k, v in mv.tags.items()),
                                     len(mv.tags))])
    if mv.parent is not None:
        rows.append(["parent", text(mv.parent, SHORT)])
    source = _read(lambda: mv.source)
    if source:
        rows.append(["source", _shown(source) if isinstance(source, _Unreadable)
                     else _listed((f"{k}: {v}" for k, v in source.items()), len(source),
                                  TEXT)])
    signature = _read(lambda: mv.signature)
    signer = None if isinstance(signature, _Unreadable) else _read(lambda: mv.signer)
    rows.append(["signature", _shown(signature) + (f" by {text(signer, SHORT)}"
                                                   if isinstance(signer, str) else "")])
    rows.append(["id", text(mv.id, SHORT)])
    rows.append(["digest", text(mv.digest, SHORT)])
    parts = [f"<div><strong>{text(mv.ref, TEXT)}</strong>", table((), rows)]
    metadata = _read(lambda: mv.metadata)
    if metadata:
        parts.append("<div><strong>metadata</strong></div>")
        parts.append(f"<div>{_shown(metadata)}</div>" if isinstance(metadata, _Unreadable)
                     else table(("key", "value"), _items(metadata), len(metadata)))
    parts.append(_environment(_read(lambda: mv.environment)))
    return "".join(parts) + "</div>"


def _environment(environment: Any) -> str:
    """A version's environment folded: Python in the summary, the first packages inside."""
    if isinstance(environment, _Unreadable):
        return f"<div>environment {_shown(environment)}</div>"
    packages = environment.get("packages")
    packages = packages if isinstance(packages, dict) else {}
    python = environment.get("python")
    summary = (f"environment: Python {text(python, SHORT)}" if python else "environment") + (
        f", {_count(len(packages), 'package')}" if packages else "")
    rows = _items({k: v for k, v in islice(environment.items(), ROWS) if k != "packages"})
    rows += _items(dict(islice(packages.items(), PACKAGES)), SHORT)
    more = f"<div>\u2026 and {len(packages) - PACKAGES} more packages</div>" if (
        len(packages) > PACKAGES) else ""
    return f"<details><summary>{summary}</summary>{table((), rows)}{more}</details>"


def versions(records: Sequence[Any]) -> str:
    """One row per version (the first ``ROWS``)."""
    rows = ([text(mv.ref, SHORT), text(mv.kind, SHORT),
             text(f"{mv.created_at:%Y-%m-%d %H:%M}"), size(mv.size), size(mv.added_bytes),
             _listed(mv.aliases, len(mv.aliases)),
             _listed((f"{k}={v}" for k, v in mv.tags.items()), len(mv.tags)),
             _short(_read(lambda mv=mv: mv.metadata)),
             text(mv.description, SHORT)]
            for mv in islice(records, ROWS))
    header = ("version", "kind", "created", "size", "added", "aliases", "tags", "metadata",
              "description")
    return (f"<div>{_count(len(records), 'version')}"
            f"{table(header, rows, len(records))}</div>")


def _short(value: Any) -> str:
    return _shown(value) if isinstance(value, _Unreadable) or not value else text(value, SHORT)


# -- a vault ------------------------------------------------------------------------------

def vault(path: Path, read: Callable[[int, int], tuple[list[Any], int, int]]
          ) -> str:
    """A vault's file, its size and its models; ``read(models, aliases)`` reads them. A
    closed or damaged vault says so instead."""
    try:
        models, total, file_bytes = read(ROWS, ALIASES + 1)  # one more: are there more?
    except VaultError as exc:
        return f"<div><strong>Vault</strong> {text(str(exc))}</div>"
    rows = ([text(m.name, SHORT), text(m.versions, SHORT), text(m.latest, SHORT),
             _listed((f"@{alias} \u2192 {number}" for alias, number in m.aliases),
                     None),
             size(m.stored)]
            for m in models)
    return (f"<div><strong>Vault</strong> {text(str(path))} ({size(file_bytes)}, "
            f"{_count(total, 'model')})"
            f"{table(('model', 'versions', 'latest', 'aliases', 'stored'), rows, total)}"
            "</div>")


# -- a diff -------------------------------------------------------------------------------

def diff(d: Any) -> str:
    """What changed between two versions: labels, metadata and environment, then each
    entry that is not the same."""
    head = (f"<div><strong>{text(d.a, SHORT)} \u2192 {text(d.b, SHORT)}</strong> "
            f"({text(d.kind, SHORT)}): of {text(d.b, SHORT)}'s stored bytes "
            f"{size(d.shared_bytes)} shared, {size(d.new_bytes)} new")
    rows: list[list[str]] = []
    for what, changes in (("metadata", d.metadata), ("tags", d.tags),
                          ("aliases", d.aliases), ("environment", d.environment)):
        rows += _changes(what, changes)
    if d.description is not None:
        rows.append(["description", "", text(d.description[0]), text(d.description[1])])
    parts = [head]
    if rows:
        parts.append(table(("what", "name", d.a, d.b), rows, len(rows)))
    changed = d.changed
    if changed:
        parts.append(table(("entry", "change", "dtype", "shape", "size", "max abs",
                            "rel L2", "changed"), (_entry(e) for e in changed), len(changed)))
    same = len(d.entries) - len(changed)
    if same:
        parts.append(f"<div>{same} entr{'y' if same == 1 else 'ies'} the same</div>")
    if d.same_stream is not None:
        parts.append(f"<div>pickle streams {'equal' if d.same_stream else 'differ'}</div>")
    if not d:
        parts.append("<div>no differences</div>")
    return "".join(parts) + "</div>"


def _changes(what: str, changes: Any) -> list[list[str]]:
    """Rows of one group of changes, the first ``ROWS`` of each kind."""
    return ([[what, text(k, SHORT), _GONE, text(v)] for k, v in islice(
                changes.added.items(), ROWS)]
            + [[what, text(k, SHORT), text(v), _GONE] for k, v in islice(
                changes.removed.items(), ROWS)]
            + [[what, text(k, SHORT), text(a), text(b)] for k, (a, b) in islice(
                changes.changed.items(), ROWS)])


def _entry(e: Any) -> list[str]:
    def pair(values: tuple[Any, Any], show: Callable[[Any], str]) -> str:
        a, b = (_GONE if v is None else show(v) for v in values)
        return a if a == b else f"{a} \u2192 {b}"

    def number(x: float | None) -> str:
        return "" if x is None else f"{x:.3g}"

    return [text(e.name, SHORT), text(e.change, SHORT),
            pair(e.dtype, lambda v: text(v, SHORT)),
            pair(e.shape, lambda v: text("\u00d7".join(map(str, v)) if v else "scalar",
                                         SHORT)),
            pair(e.size, size), number(e.max_abs), number(e.rel_l2),
            "" if e.changed_share is None else f"{e.changed_share:.1%}"]
