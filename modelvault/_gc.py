"""Garbage collection: what no version uses leaves the file, and its space goes back.

Its own module because it spans the three pieces (the catalog's environments, the pack
store's chunks, the connection's free pages), and both ``Vault.gc`` and export (which
repacks its new copy with it) run it.
"""

from __future__ import annotations

from ._catalog import Catalog
from ._connection import Connection
from ._packs import PackStore


def collect_garbage(connection: Connection, catalog: Catalog, packs: PackStore) -> int:
    """Drop the environments and chunks no version uses, repack, and give the free pages
    back, in one exclusive write; returns the bytes the file shrank by."""
    with connection.write(exclusive=True):
        before = connection.file_bytes()
        catalog.drop_unused_environments()
        packs.sweep()
        connection.vacuum()
        return before - connection.file_bytes()
