"""Progress bars for long saves, loads, pushes and pulls (tqdm, only when shown)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Work larger than this shows a progress bar when stderr is a terminal.
MIN_BYTES = 64 * 1024 * 1024

Advance = Callable[[int], Any]


@contextmanager
def progress(total: int, desc: str, shown: bool | None, unit: str = "B") -> Iterator[Advance]:
    """Yield a function that advances a progress bar by n bytes, or n of ``unit`` (a
    no-op when hidden).

    ``shown``: True or False as the caller asked; None shows it when stderr is a terminal,
    for work of at least ``MIN_BYTES`` (counted in bytes) or of more than one item.
    """
    least = MIN_BYTES if unit == "B" else 2
    show = shown if shown is not None else total >= least and sys.stderr.isatty()
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False) as bar:
        yield bar.update
