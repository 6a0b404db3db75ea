"""Browsing a vault in Datasette (``modelvault browse``): read-only, with foreign keys
labelled, canned queries, pack bytes never read on a table page, and each model's name
linked to its metrics page (``_browse_metrics``).

Datasette is an optional extra (``pip install 'modelvault[browse]'``): imported only here.
"""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import _json
from ._catalog import Catalog
from ._connection import Connection
from ._errors import CorruptVaultError, DamagedVaultWarning
from ._guard import translated
from ._html import human_bytes
from ._refs import UUID

# Views allowed to read packs.data: they ask only its length, which SQLite takes from
# the row's header without reading the blob's pages.
_SIZE_VIEWS = ("model_versions", "pack_sizes")

QUERIES = {
    "versions_by_package": {
        "title": "Versions saved with a package version",
        "description": "package: a distribution name (scikit-learn); version: a prefix "
                       "(1.5 matches 1.5.2), or empty for every version",
        # Datasette passes a field left empty as ''.
        "sql": "SELECT m.name AS model, v.version, p.name AS package, p.version AS "
               "package_version, v.created_at FROM versions v JOIN models m ON "
               "m.id = v.model_id JOIN packages p ON p.environment_id = v.environment_id "
               "WHERE p.name = :package AND (coalesce(:version, '') = '' OR "
               "p.version = :version OR p.version LIKE :version || '.%') "
               "ORDER BY m.name, v.version",
    },
    "storage_per_model": {
        "title": "Storage per model",
        "description": "raw: every version's size as if stored alone; added: the chunk "
                       "bytes each version's save added to the vault",
        "sql": "SELECT m.name AS model, count(*) AS versions, sum(v.size) AS raw_bytes, "
               "sum(v.added_bytes) AS added_bytes FROM versions v JOIN models m ON "
               "m.id = v.model_id GROUP BY m.id ORDER BY added_bytes DESC",
    },
}




def queries(signed: list[str]) -> dict[str, Any]:
    """The canned queries. Which versions a trusted key signed is decided here, by
    checking each signature (``signed``: their uuids), not by SQL: a key id is only a
    claim, and a trusted key id beside a garbage signature is not signed."""
    marks = ", ".join(f"'{uuid}'" for uuid in signed if UUID.fullmatch(uuid)) or "NULL"
    return {**QUERIES, "not_signed_by_a_trusted_key": {
        "title": "Versions not signed by a key this machine trusts",
        "description": "unsigned, signed by a key not trusted here (`modelvault keys` lists "
                       "the trusted ones), or with a signature that does not verify; checked "
                       "when browse started, so versions saved since are listed too. Pickles "
                       "among them load only with trust",
        "sql": "SELECT m.name AS model, v.version, v.kind, v.key_id, v.created_at FROM "
               "versions v JOIN models m ON m.id = v.model_id WHERE v.uuid NOT IN "
               f"({marks}) ORDER BY m.name, v.version",
    }}


def _signed(path: Path) -> list[str]:
    """The uuids of the versions whose signature a key trusted here verifies."""
    with reading(path) as connection:
        records = Catalog(connection).every_record()
    return [mv.id for mv in records if mv.signature == "trusted"]


@contextmanager
def reading(path: Path) -> Iterator[Connection]:
    """A read-only connection to the vault at ``path``, in a read transaction; a damaged
    vault raises CorruptVaultError, every failure a VaultError."""
    with warnings.catch_warnings(record=True) as seen, translated(path):
        warnings.simplefilter("always", DamagedVaultWarning)
        connection = Connection(path, readonly=True, create=True, timeout=60.0)
        try:
            damaged = [w.message for w in seen
                       if issubclass(w.category, DamagedVaultWarning)]
            if damaged:  # its pages would fail one by one, as HTTP 500s
                raise CorruptVaultError(f"browse reads whole vaults: {damaged[0]}")
            with connection.read():
                yield connection
        finally:
            connection.close()


def metadata(path: Path) -> dict[str, Any]:
    labels = {"models": "name", "versions": "uuid"}
    descriptions = {
        "packs": "Chunk bytes, compressed. The data column is not read here (it shows "
                 "empty): pack_sizes lists each pack's stored size.",
        "chunks": "One row per distinct chunk: its BLAKE3 hash, raw size, codec, delta "
                  "base, and where its bytes are in its pack.",
        "versions": "One row per saved version; model_versions is the readable view.",
    }
    tables = {name: {"label_column": column} for name, column in labels.items()}
    for name, text in descriptions.items():
        tables.setdefault(name, {})["description"] = text
    return {"title": f"modelvault: {path.name}",
            "description": "A modelvault file, read-only. docs/format.md explains every "
                           "table and column.",
            "databases": {database_name(path): {
                "tables": tables,
                "queries": queries(_signed(path)),
            }}}


def database_name(path: Path) -> str:
    return path.stem  # as Datasette names a database file


def authorizer(action: int, table: str | None, column: str | None, db: str | None,
               source: str | None) -> int:
    """Pack bytes read as NULL, unless a size view reads their length."""
    if (action == sqlite3.SQLITE_READ and table == "packs" and column == "data"
            and source not in _SIZE_VIEWS):
        return sqlite3.SQLITE_IGNORE
    return sqlite3.SQLITE_OK


# Columns of byte counts (in tables, views and the canned queries), which HTML pages show
# in units with the exact count on hover; JSON keeps the numbers.
_BYTE_COLUMNS = frozenset({"size", "stored_size", "added_bytes", "raw_bytes", "stored"})
# Columns holding a version's environment JSON: folded under a one-line summary.
_ENVIRONMENT_COLUMNS = frozenset({("model_versions", "environment"), ("environments", "json")})


# Columns of a version's metadata JSON: folded under its start when long (a Trainer's
# checkpoint holds its ~80 run arguments, a page of text in every row).
_METADATA_COLUMNS = frozenset({("model_versions", "metadata"), ("versions", "metadata")})
FOLDED_OVER = 300  # characters of metadata shown whole; longer is folded
SUMMARY = 120  # characters of folded metadata shown on its one line


# Tables and views whose name column is a model's name: linked to its metrics page.
_MODEL_TABLES = frozenset({"models", "model_versions", "model_summary"})


def render_cell(value: Any, column: str, table: str | None,
                link: Callable[[str], str] = lambda path: path) -> Any:
    """How an HTML page shows a cell of a vault, or None for Datasette's own way;
    ``link`` makes a path of this site a URL (Datasette's base_url)."""
    from markupsafe import Markup, escape

    if table in _MODEL_TABLES and column == "name" and isinstance(value, str):
        href = link(f"/-/metrics/{quote(value, safe='')}")
        return Markup(f'<a href="{escape(href)}" title="its metrics across versions">'
                      f"{escape(value)}</a>")
    if column in _BYTE_COLUMNS and type(value) is int:
        return Markup(f'<span title="{value:,} bytes" style="white-space: nowrap">'
                      f"{human_bytes(value)}</span>")
    if (table, column) in _ENVIRONMENT_COLUMNS and isinstance(value, str):
        return _folded(environment_summary(value), value)
    if ((table, column) in _METADATA_COLUMNS and isinstance(value, str)
            and len(value) > FOLDED_OVER):
        return _folded(value[:SUMMARY - 1] + "…", value)
    return None


def _folded(summary: str, text: str) -> Any:
    """``text`` folded under the one line ``summary``, both escaped."""
    from markupsafe import Markup, escape

    return Markup(f"<details><summary>{escape(summary)}</summary>"
                  f'<pre style="white-space: pre-wrap">{escape(text)}</pre></details>')


def environment_summary(text: str, shown: int = 3) -> str:
    """One line for an environment's JSON: Python and the first packages."""
    try:
        env = _json.loads(text)
    except (ValueError, TypeError):
        return "unreadable environment"
    if not isinstance(env, dict):
        return "unreadable environment"
    packages = env.get("packages")
    packages = packages if isinstance(packages, dict) else {}
    items = [f"{name} {version}" for name, version in list(packages.items())[:shown]]
    if len(packages) > shown:
        items.append(f"+{len(packages) - shown} more")
    line = ", ".join([f"Python {env.get('python', '?')}", *items])
    return line if len(line) <= 120 else line[:119] + "…"


class _Plugin:
    """The Datasette plugin that guards every connection to a vault it opens, and shows
    sizes and environments readably."""

    @staticmethod
    def prepare_connection(conn: sqlite3.Connection, database: str) -> None:
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.set_authorizer(authorizer)

    @staticmethod
    def render_cell(value: Any, column: str, table: str | None, database: str,
                    datasette: Any) -> Any:
        return render_cell(value, column, table, datasette.urls.path)

    @staticmethod
    def register_routes(datasette: Any) -> list[tuple[str, Any]]:
        from . import _browse_metrics

        # One vault per browse: the file Datasette serves is the one charted.
        paths = [db.path for db in datasette.databases.values() if db.path]
        return _browse_metrics.routes(Path(paths[0]), reading) if len(paths) == 1 else []


def datasette(path: str | Path) -> Any:
    """A Datasette instance serving the vault at ``path`` read-only."""
    from datasette import hookimpl
    from datasette.app import Datasette
    from datasette.plugins import pm

    if pm.get_plugin("modelvault-browse") is None:
        _Plugin.prepare_connection = hookimpl(_Plugin.prepare_connection)  # type: ignore[method-assign]
        _Plugin.render_cell = hookimpl(_Plugin.render_cell)  # type: ignore[method-assign]
        _Plugin.register_routes = hookimpl(_Plugin.register_routes)  # type: ignore[method-assign]
        pm.register(_Plugin, name="modelvault-browse")
    path = Path(path)
    return Datasette([str(path)], metadata=metadata(path),
                     settings={"sql_time_limit_ms": 3000})


def serve(path: str | Path, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(datasette(path).app(), host=host, port=port, log_level="warning")
