"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import``)."""

from __future__ import annotations

import os
import shutil
import sysconfig

import numpy as np


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
