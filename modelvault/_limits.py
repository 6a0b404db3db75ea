"""How far a version may expand when it is read: the cap on what a file makes us allocate.

A version lists its chunks, and may list one chunk many times (dedup within a model) or
chunks that compress extremely well; both happen in honest models (zeros, repeated
layers), and both let a file of a few kilobytes claim gigabytes: one 1 MiB chunk listed
100,000 times is a 2 MB file that asks for 98 GiB. So a reader compares what a version
would expand to with the bytes the file really stores for it (its distinct chunks and
their delta bases) and refuses, before allocating anything, a version that expands more
than ``MAX_EXPANSION`` times past a floor every small model stays under. Real models stay
far below it (weights compress 1.2-1.5x; a fine-tune's deltas are counted with their
bases); one over a gigabyte that is more than 99.9 % repeats is refused, and at save
too, so nothing this code writes reads back refused. The caller, never the file, may
raise or lift the cap: ``Vault(path, max_expansion=...)`` or the MODELVAULT_MAX_EXPANSION
environment variable ("inf" lifts it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ._errors import TooLargeError

# Raw bytes any version may read whatever it stores: more than any LoRA adapter or small
# model (a mostly-zero one too), and as much memory as a hostile file can make a reader take.
EXPANSION_FLOOR = 1024 * 1024 * 1024
# Raw bytes per stored byte beyond the floor: zstd's best is ~30,000x (a chunk of zeros);
# weights compress 1.2-1.5x, sparse ones tens of times.
MAX_EXPANSION = 1000.0


def max_expansion(given: float | None = None) -> float:
    """The cap in force: ``given`` by the caller, else the environment's, else the default."""
    if given is None:
        text = os.environ.get("MODELVAULT_MAX_EXPANSION")
        if not text:
            return MAX_EXPANSION
        try:
            given = float(text)
        except ValueError:
            raise ValueError(f"MODELVAULT_MAX_EXPANSION={text!r} is not a number") from None
    if not given > 0:
        raise ValueError(f"max_expansion must be positive, not {given!r}")
    return float(given)


def check(where: str, raw: int, stored: Callable[[], float], ratio: float, *,
          saving: bool = False) -> None:
    """TooLargeError if ``raw`` bytes read from the ``stored()`` bytes (asked only past
    the floor) exceed the cap. A save is refused by the same rule, so that whatever is
    written reads back under the same cap."""
    if raw <= EXPANSION_FLOOR:
        return
    found = stored()
    if raw <= ratio * found:
        return
    what = (f"{where} would expand to {raw:,} bytes from the {found:,.0f} bytes the file "
            f"stores for it, more than {ratio:g} times")
    if saving:
        raise TooLargeError(f"{what}: readers refuse such a version as a size bomb. Save "
                            "and load it with max_expansion=float('inf') (or "
                            "MODELVAULT_MAX_EXPANSION=inf) if it really is mostly repeats")
    raise TooLargeError(f"{what} (the cap on what a file can make a reader allocate): the "
                        "file is hostile or damaged. If you trust it, open the vault with "
                        "max_expansion=float('inf') or set MODELVAULT_MAX_EXPANSION=inf")


def check_view(shape: list[int], itemsize: int, storage: int) -> None:
    """TooLargeError if a tensor view of ``shape`` covers more bytes than its storage
    holds, past the floor and the cap in force (the environment's: a view is rebuilt
    far from the Vault): a stride-0 view of 2^40 elements fits in one element of
    storage, and anything that copies it takes terabytes. Making the view allocates
    nothing, so an honest ``expand()`` below the floor always loads."""
    count = 1
    for n in shape:
        count *= n
    check(f"a view of shape {shape}", count * itemsize, lambda: storage, max_expansion())
