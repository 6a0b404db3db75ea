"""Comparing two versions: what ``Vault.diff`` returns, and the arithmetic behind it.

Owns the records of a diff, how two entries (arrays or tensors), plain values and files
compare, and the order of a diff's reads: the rows and contents of both versions in one
read, then their entries one at a time through the reader's lazy mappings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _torch, _trust
from ._catalog import FILE_KINDS, Catalog, Contents, VersionRow
from ._connection import Connection
from ._lazy import lazy
from ._reader import Reader
from ._refs import Ref

np = lazy("numpy")

# Elements compared per step: bounds the float64 copies a diff of a big tensor makes.
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Changes:
    """How two mappings differ: keys only in the second (``added``), only in the first
    (``removed``), and in both with other values (``changed``: key -> (first, second))."""

    added: dict[str, Any] = field(default_factory=dict)
    removed: dict[str, Any] = field(default_factory=dict)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    @classmethod
    def between(cls, a: dict[str, Any], b: dict[str, Any]) -> Changes:
        return cls({k: b[k] for k in b.keys() - a.keys()},
                   {k: a[k] for k in a.keys() - b.keys()},
                   {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]})


@dataclass(frozen=True)
class EntryChange:
    """One array, tensor or file of two versions: how it changed.

    ``change`` is "added", "removed", "changed" or "same". ``dtype``, ``shape`` and
    ``size`` (bytes) are (first, second), None on the side that lacks it. For a numeric
    entry of one dtype and shape in both: ``max_abs``, the largest absolute change of an
    element; ``rel_l2``, the L2 norm of the change over the first's (None if the first is
    all zeros); ``changed_share``, the share of elements whose bits differ (0.0-1.0).
    """

    name: str
    change: str
    dtype: tuple[str | None, str | None] = (None, None)
    shape: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None)
    size: tuple[int | None, int | None] = (None, None)
    max_abs: float | None = None
    rel_l2: float | None = None
    changed_share: float | None = None


@dataclass(frozen=True)
class Diff:
    """What differs between version ``a`` and version ``b`` (refs; two models may be
    compared). ``entries`` lists every array, tensor or file by name, "same" ones too;
    ``same_stream`` says whether two pickled versions hold the same bytes (None for
    other kinds). Of b's bytes, ``shared_bytes`` are in chunks a has too, ``new_bytes``
    in chunks it has not."""

    a: str
    b: str
    kind: str
    metadata: Changes
    tags: Changes
    aliases: Changes
    environment: Changes
    description: tuple[str, str] | None
    entries: tuple[EntryChange, ...]
    same_stream: bool | None
    shared_bytes: int
    new_bytes: int

    @property
    def changed(self) -> tuple[EntryChange, ...]:
        """The entries that are not "same"."""
        return tuple(e for e in self.entries if e.change != "same")

    def __repr__(self) -> str:  # one line: the dataclass's listed every entry
        return (f"<Diff {self.a!r} -> {self.b!r}: {'differ' if self else 'the same'}, "
                f"{len(self.changed)} of {len(self.entries)} entries changed>")

    def _repr_html_(self) -> str:  # a notebook's table of what changed
        from ._html import diff

        return diff(self)

    def __bool__(self) -> bool:
        """True if anything differs."""
        return bool(self.metadata or self.tags or self.aliases or self.environment
                    or self.description or self.changed or self.same_stream is False)


def diff(connection: Connection, catalog: Catalog, reader: Reader, refs: Sequence[Ref]
         ) -> Diff:
    """What differs from the version ``refs[0]`` names to the one ``refs[1]`` names (see
    ``Vault.diff``); ValueError if they are of different kinds."""
    with connection.read():
        rows = [catalog.resolve(ref) for ref in refs]
        for row in rows:  # nothing is unpickled, but require="trusted" holds: its values
            reader.check_signature(row, trust=True)  # are the version's data too
        if rows[0].kind != rows[1].kind:
            raise ValueError(f"cannot diff {rows[0].where}, {rows[0].what}, "
                             f"with {rows[1].where}, {rows[1].what}")
        records = [catalog.records("WHERE v.id = ?", (r.id,))[0] for r in rows]
        contents = [reader.contents(r) for r in rows]
    hashes = [[[c.hash for c in chunks] for chunks in found.chunks] for found in contents]
    sizes = {c.hash: c.size for chunks in contents[1].chunks for c in chunks}
    seen = {h for part in hashes[0] for h in part}
    shared = sum(size for h, size in sizes.items() if h in seen)
    kind = rows[0].kind
    entries: list[EntryChange] = []
    if kind in FILE_KINDS:
        entries += _file_changes(contents, hashes)
    if kind == "arrays" or any(r.layouts()[0].get("tensors") for r in rows):
        entries += _entry_changes(reader, rows)
    if kind == "arrays":
        entries += _value_changes(rows)
    return Diff(
        records[0].ref, records[1].ref, kind,
        Changes.between(*(r.metadata for r in records)),
        Changes.between(*(r.tags for r in records)),
        Changes.between(*({alias: r.ref for alias in r.aliases} for r in records)),
        Changes.between(*(environment_items(r.environment) for r in records)),
        None if records[0].description == records[1].description
        else (records[0].description, records[1].description),
        tuple(entries),
        hashes[0] == hashes[1] and rows[0].layout == rows[1].layout
        if kind == "pickle" else None,
        shared, sum(sizes.values()) - shared)


def _entry_changes(reader: Reader, rows: list[VersionRow]) -> list[EntryChange]:
    """Each array or tensor of two versions compared, one entry in memory at a time.
    Nothing is unpickled, so no trust is needed; a signature that fails still refuses."""
    maps = []
    for row in rows:
        if _trust.signature_status(row.manifest, row.key_id, row.signature) == "invalid":
            raise row.error("its signature does not match: the version was changed "
                            "after it was saved")
        try:
            maps.append(reader.load(row, lazy=True))
        except ValueError:  # a files version without safetensors files
            maps.append({})
    names = list(dict.fromkeys([*maps[0], *maps[1]]))
    return [compare(name, maps[0][name] if name in maps[0] else None,
                    maps[1][name] if name in maps[1] else None) for name in names]


def _value_changes(rows: list[VersionRow]) -> list[EntryChange]:
    """The plain values of two arrays versions (an epoch count beside the weights)."""
    try:
        found = [values(r.layouts()[0]) for r in rows]
    except (ValueError, TypeError) as exc:
        raise rows[0].error(f"cannot read its layout: {exc}") from exc
    missing = object()
    return [compare_values(name, found[0].get(name, missing), found[1].get(name, missing),
                           missing)
            for name in dict.fromkeys([*found[0], *found[1]])]


def _file_changes(contents: list[Contents], hashes: list[list[list[str]]]
                  ) -> list[EntryChange]:
    """The files of two files versions by path: added, removed, changed or the same."""
    files = [{(part.name or f"part {i}"): (part.size, hashes[side][i])
              for i, part in enumerate(found.parts)} for side, found in enumerate(contents)]
    changes = []
    for path in dict.fromkeys([*files[0], *files[1]]):
        a, b = files[0].get(path), files[1].get(path)
        change = ("added" if a is None else "removed" if b is None
                  else "same" if a[1] == b[1] else "changed")
        changes.append(EntryChange(path, change, size=(a and a[0], b and b[0])))
    return changes


def values(layout: Any, name: str = "") -> dict[str, Any]:
    """The plain values (numbers, strings, booleans, None) of an arrays layout by flat
    name, as ``entries`` names arrays: an epoch count or a label saved beside weights."""
    if not isinstance(layout, dict):
        return {}
    found: dict[str, Any] = {}
    for tag in ("dict", "odict", "list", "tuple"):
        if tag in layout and isinstance(layout[tag], list):
            items = (layout[tag] if tag in ("dict", "odict")
                     else [[i, node] for i, node in enumerate(layout[tag])])
            for key, node in items:
                found.update(values(node, f"{name}.{key}" if name else str(key)))
            return found
    if "value" in layout:
        return {name: layout["value"]}
    if "float" in layout:
        return {name: float(layout["float"])}
    return {}


def compare_values(name: str, a: Any, b: Any, missing: object) -> EntryChange:
    """How plain value ``name`` changed (``missing`` on the side that lacks it)."""
    def kind(v: Any) -> str | None:
        return None if v is missing else type(v).__name__

    change = ("added" if a is missing else "removed" if b is missing
              else "same" if type(a) is type(b) and (a == b or a != a and b != b)
              else "changed")
    number = (a is not missing and b is not missing and isinstance(a, (int, float))
              and isinstance(b, (int, float)) and not isinstance(a, bool)
              and not isinstance(b, bool))
    return EntryChange(name, change, (kind(a), kind(b)),
                       max_abs=float(abs(b - a)) if number and change != "same" else
                       (0.0 if number else None))


def environment_items(environment: dict[str, Any]) -> dict[str, Any]:
    """An environment record as one flat mapping: Python, platform, modelvault and each
    package by name."""
    items = {k: v for k, v in environment.items() if k != "packages"}
    items.update(environment.get("packages", {}))
    return items


def described(value: Any) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) of an array or tensor."""
    if _torch.is_tensor(value):
        return str(value.dtype).removeprefix("torch."), tuple(value.shape)
    return str(value.dtype), tuple(value.shape)


def compare(name: str, a: Any, b: Any) -> EntryChange:
    """How entry ``name`` changed from ``a`` to ``b`` (arrays or tensors; either None if
    that side lacks it)."""
    if a is None or b is None:
        present = b if a is None else a
        dtype, shape = described(present)
        pair = (lambda v: (None, v)) if a is None else (lambda v: (v, None))
        return EntryChange(name, "added" if a is None else "removed", pair(dtype),
                           pair(shape), pair(_nbytes(present)))
    (dtype_a, shape_a), (dtype_b, shape_b) = described(a), described(b)
    base = dict(name=name, dtype=(dtype_a, dtype_b), shape=(shape_a, shape_b),
                size=(_nbytes(a), _nbytes(b)))
    if (dtype_a, shape_a) != (dtype_b, shape_b):
        return EntryChange(change="changed", **base)
    x, y = _array(a), _array(b)
    if x.size == 0:
        return EntryChange(change="same", changed_share=0.0, **base)
    bits_x, bits_y = _items(x), _items(y)
    numeric = x.dtype.kind in "biufc" or _is_ml_dtype(x)
    # 64-bit integers beyond 2**53 lose their last digits as floats: exact as Python ints.
    exact = x.dtype.kind in "iu" and x.dtype.itemsize == 8 and any(
        int(v.max()) > 2 ** 53 or int(v.min()) < -2 ** 53 for v in (x, y))
    changed = 0
    max_abs = 0.0
    squares = norm = 0.0
    for start in range(0, x.size, _BLOCK):
        stop = start + _BLOCK
        if bits_x.ndim == 1:
            changed += int(np.count_nonzero(bits_x[start:stop] != bits_y[start:stop]))
        else:
            changed += int(np.count_nonzero(
                (bits_x[start:stop] != bits_y[start:stop]).any(axis=1)))
        if not numeric:
            continue
        wide = (object if exact else np.complex128 if x.dtype.kind == "c" else np.float64)
        first = x.reshape(-1)[start:stop].astype(wide)
        second = y.reshape(-1)[start:stop].astype(wide)
        if exact:
            delta = np.array([float(abs(v)) for v in second - first], dtype=np.float64)
            first = np.array([float(v) for v in first], dtype=np.float64)
        else:
            with np.errstate(all="ignore"):
                delta = np.abs(second - first)
        with np.errstate(all="ignore"):  # NaN where NaN was is no change; huge values
            known = ~np.isnan(delta)      # may square to inf, and say so
            max_abs = max(max_abs, float(np.max(delta, initial=0.0, where=known)))
            squares += float(np.sum(np.square(delta), where=known))
            size = np.abs(first)
            norm += float(np.sum(np.square(size), where=~np.isnan(size)))
    share = changed / x.size
    result = EntryChange(change="changed" if changed else "same", changed_share=share, **base)
    if not numeric:
        return result
    return EntryChange(**{**result.__dict__, "max_abs": max_abs,
                          "rel_l2": (squares ** 0.5 / norm ** 0.5) if norm else
                          (0.0 if not squares else None)})


def _is_ml_dtype(array: Any) -> bool:  # bfloat16 and the float8s of ml_dtypes
    return array.dtype.type.__module__.startswith("ml_dtypes")


def _nbytes(value: Any) -> int:
    if _torch.is_tensor(value):
        return int(value.numel() * value.element_size())
    return int(value.nbytes)


def _array(value: Any) -> np.ndarray:
    """A C-contiguous numpy array of the value's elements (torch's bfloat16 and other
    dtypes numpy lacks widened to float32: the comparison is of values)."""
    return np.ascontiguousarray(_torch.values(value) if _torch.is_tensor(value) else value)


def _items(array: np.ndarray) -> np.ndarray:
    """The array's elements as unsigned integers of their width (or rows of bytes), so
    that equal bits compare equal (NaN too) and -0.0 differs from 0.0."""
    flat = array.reshape(-1)
    width = array.dtype.itemsize
    if width in (1, 2, 4, 8):
        return flat.view(f"u{width}")
    return flat.view(np.uint8).reshape(-1, width)
