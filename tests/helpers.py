"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import``)."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig

import blake3
import numpy as np

from modelvault._trust import canonical_json


def command(name: str) -> str | None:
    """The path of a command that a package of the test extra installs (sqlite-utils, weed,
    rclone), or None. This interpreter's scripts folder comes first: a venv used without
    activating it (``.venv/bin/python -m pytest``) has its commands there, not on PATH."""
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", os.defpath)])
    return shutil.which(name, path=path)


def same(expected, got):
    """Equal values of equal types, arrays equal in dtype, shape and every element."""
    if isinstance(expected, np.ndarray):
        return (isinstance(got, np.ndarray) and got.dtype == expected.dtype
                and got.shape == expected.shape and np.array_equal(got, expected))
    if isinstance(expected, (dict, list, tuple)):
        if type(got) is not type(expected) or len(got) != len(expected):
            return False
        if isinstance(expected, dict):
            return expected.keys() == got.keys() and all(same(expected[k], got[k])
                                                         for k in expected)
        return all(same(e, g) for e, g in zip(expected, got, strict=True))
    return type(got) is type(expected) and got == expected


def one_line_error(result) -> bool:
    """True if a command failed the way the CLI promises: exit 1, one "Error:" line on
    stderr, no traceback (``result`` has ``returncode`` and ``stderr``)."""
    return (result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
            and "Traceback" not in result.stderr and result.stderr.startswith("Error: "))


def vault_connections(monkeypatch):
    """A list that gathers every sqlite3 connection opened from now on, in order.

    The seam for tests that must act on the vault's own connection (a trace callback to
    act between two statements of one write, a connection-scoped PRAGMA): modelvault
    opens its files with ``sqlite3.connect``, SQLite's public API, so no private name of
    ours is touched.
    """
    import sqlite3

    opened = []
    connect = sqlite3.connect

    def recording_connect(*args, **kwargs):
        connection = connect(*args, **kwargs)
        opened.append(connection)
        return connection

    monkeypatch.setattr(sqlite3, "connect", recording_connect)
    return opened


def version_id(db, name, number=1):
    """The row id of ``name:number`` in an open sqlite3 connection to a vault."""
    return db.execute("SELECT v.id FROM versions v JOIN models m ON m.id = v.model_id "
                      "WHERE m.name = ? AND v.version = ?", (name, number)).fetchone()[0]


def digest_parts(db, version_id):
    """A version's parts as its digest covers them (docs/format.md, "The digest")."""
    parts = []
    for part, pkind, name, dtype, shape, fortran, itemsize, size in db.execute(
            "SELECT part, kind, name, dtype, shape, fortran_order, itemsize, size "
            "FROM parts WHERE version_id = ? ORDER BY part", (version_id,)).fetchall():
        hashes = [h for (h,) in db.execute(
            "SELECT c.hash FROM part_chunks pc JOIN chunks c ON c.id = pc.chunk_id "
            "WHERE pc.version_id = ? AND pc.part = ? ORDER BY pc.seq", (version_id, part))]
        parts.append({"kind": pkind, "name": name, "dtype": dtype,
                      "shape": None if shape is None else json.loads(shape),
                      "fortran_order": fortran, "itemsize": itemsize, "size": size,
                      "chunks": hashes})
    return parts


def redigest(db, version_id):
    """Recompute a version's digest from its rows, as docs/format.md defines it (what
    anyone who can write the file can do after editing it)."""
    kind, layout = db.execute("SELECT kind, layout FROM versions WHERE id = ?",
                              (version_id,)).fetchone()
    digest = blake3.blake3(canonical_json({"kind": kind, "layout": json.loads(layout),
                                           "parts": digest_parts(db, version_id)})
                           ).hexdigest()
    db.execute("UPDATE versions SET digest = ? WHERE id = ?", (digest, version_id))
