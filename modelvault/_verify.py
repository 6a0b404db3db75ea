"""The checker: every version's rows, signature and chunks re-read and re-hashed.

It reads the vault its own way, not through the read path of ``load``: it goes on past
a damaged row or page and reports each problem, with the versions a bad chunk hurts.
"""

from __future__ import annotations

import sqlite3

from . import _schema, _trust
from ._catalog import Catalog
from ._connection import Connection
from ._errors import IntegrityError
from ._packs import PackStore
from ._records import Problem


def verify(connection: Connection, catalog: Catalog, packs: PackStore) -> list[Problem]:
    """Every problem of the file, of each version and of each chunk a version uses
    ([] = healthy), read inside one read transaction of the caller's."""
    problems = connection.problems() + catalog.problems()
    keys = _trust.trusted()
    users: dict[int, list[tuple[str, int]]] = {}  # every version that uses a chunk
    for row in catalog.rows():
        try:
            contents = catalog.contents(row)
            for chunk_id in {c.id for chunks in contents.chunks for c in chunks}:
                users.setdefault(chunk_id, []).append((row.name, row.version))
            catalog.check(row, contents)
            if _trust.signature_status(row.manifest, row.key_id, row.signature,
                                       keys) == "invalid":
                raise IntegrityError("signature does not match: the version was changed "
                                     "after it was saved")
        except IntegrityError as exc:
            problems.append(Problem(str(exc), row.name, row.version, exc.chunk))
        except sqlite3.DatabaseError as exc:  # its rows are on a damaged page
            if not _schema.is_damage(exc):
                raise
            problems.append(Problem(f"its rows cannot be read ({exc})", row.name,
                                    row.version))
    for bad in packs.bad_chunks(packs.chunks(live=True)):
        for name, number in users.get(bad.id, [(None, None)]):
            problems.append(Problem(f"chunk {bad.hash}: {bad.problem}", name, number,
                                    bad.hash))
    return problems
