"""What every importer shares (the folders' in ``_importers``, MLflow's in ``_mlflow``):
the chain of versions an import adds, and the containment checks on what it reads.

A version already imported is recognised by a metadata key (``step``, ``revision``,
``mlflow_version``), not by hashing its files: metadata cannot change after a save, and
checking it reads nothing from the source. Every path an importer reads from a source
stays inside it, links followed (a cache's snapshot links into its blobs, never to
/etc/passwd).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import NotFoundError, VaultError
from ._progress import progress


@dataclass(frozen=True)
class Entry:
    """One version an import may add: what recognises it once imported, the aliases it
    gets, its weight on the progress bar, and how to save it (``save(parent)``, parent
    False for the first; None if it has nothing to save)."""

    value: int | str
    aliases: tuple[str, ...]
    size: int
    save: Callable[[Any], Any]


def import_chain(vault: Any, name: str, key: str, entries: Sequence[Entry],
                 unit: str = "B") -> tuple[list[Any], list[Any]]:
    """Save the ``entries`` of model ``name`` that no version's ``metadata[key]`` names
    yet, in order, each the child of the one before it (imported now or earlier), and
    point their aliases; (the versions added, as they are now; those already there)."""
    try:  # a user's own metadata may hold anything under that key
        existing = {v.metadata[key]: v for v in vault.versions(name)
                    if type(v.metadata.get(key)) in (int, str)}
    except NotFoundError:
        existing = {}
    added, found, parent = [], [], None
    with progress(sum(e.size for e in entries), f"import {name}", vault.progress,
                  unit=unit) as advance:
        for entry in entries:
            version = existing.get(entry.value)
            if version is not None:
                found.append(version)
            else:
                version = entry.save(False if parent is None else parent)
                if version is not None:
                    added.append(version)
            if version is not None:
                for alias in entry.aliases:
                    vault.alias(version, alias)
                parent = version
            advance(entry.size)
    # Read again: an alias set after its save is not in the record save returned.
    return [vault.get(v) for v in added], found


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
