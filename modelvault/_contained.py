"""Containment: every path an importer reads from a source stays inside it, links
followed (a cache's snapshot links into its blobs, never to /etc/passwd).

Apart from the importers: the folder importers and the MLflow importer (on its
download folder) both check with it, and neither imports the other's source format.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ._errors import VaultError


def check_contained(folder: Path, root: Path) -> None:
    """VaultError naming the first path at or below ``folder`` that leads outside
    ``root``: a cache's snapshot links into its blobs, never to /etc/passwd."""
    check_inside(folder, root)  # first, so a link out is never walked
    for path in walk(folder):
        check_inside(path, root)


def check_inside(path: Path, root: Path) -> None:
    """VaultError if ``path`` is, or is reached through, a link leading outside
    ``root``. Every path is resolved, not only links: a linked folder on the way
    (``snapshots`` -> /etc) makes a plain file in it an outside one."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise VaultError(f"{path}: cannot follow its links ({exc}); refusing to import it"
                         ) from None
    if not target.is_relative_to(root.resolve()):
        raise VaultError(f"{path} links outside {root} (to {target}); refusing to import it")


def walk(folder: Path) -> Iterator[Path]:
    """What ``rglob`` walks below ``folder``, a linked one too (what ``save_files`` will
    read)."""
    yield from folder.rglob("*") if folder.is_dir() else ()
