"""Turning Python objects into parts (named byte streams) and back.

Three kinds of version:

* ``arrays``: numpy arrays, and dicts/lists/tuples of them (with plain JSON
  scalars alongside). Each array is one part: dtype, shape and raw bytes, no
  pickle, so it loads without trusting anyone.
* ``pickle``: anything else, through cloudpickle protocol 5. Large numeric
  buffers leave the pickle stream as out-of-band parts and are stored like arrays.
* ``files``: the files a framework wrote (ONNX, safetensors, a save_pretrained folder).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ._lazy import lazy

np = lazy("numpy")

# Buffers below this stay inside the pickle stream: a forest has thousands of
# small node arrays that compress better together than one by one (7.9x vs 6.6x).
OUT_OF_BAND_MIN = 1024 * 1024
PICKLE_PROTOCOL = 5


@dataclass
class Part:
    """One byte stream of a version, with what is needed to rebuild it."""

    kind: str  # "array" | "pickle" | "buffer" | "file"
    data: memoryview | None = field(default=None, repr=False)  # contiguous bytes, format "B"
    path: Path | None = None  # file parts: read chunk by chunk while stored, never whole
    name: str | None = None  # file path inside a files version
    dtype: str | None = None  # arrays: numpy's dtype descr (JSON for structured dtypes)
    shape: list[int] | None = None
    fortran_order: bool = False
    itemsize: int = 1  # byte-shuffle width; 1 means no shuffle
    size: int = 0  # bytes; for a file, its size when it was found
    mode: int | None = None  # a file's permission bits

    def __post_init__(self) -> None:
        if self.data is not None:
            self.size = len(self.data)


def serialize(obj: Any) -> tuple[str, Any, list[Part]]:
    """Split ``obj`` into (kind, layout, parts); layout is JSON that rebuilds it."""
    parts: list[Part] = []
    if _is_native(obj):
        layout = _native_layout(obj, parts)
        return "arrays", layout, parts
    return "pickle", _pickle(obj, parts), parts


def _is_native(obj: Any) -> bool:
    # An object array is refused only where everything else could be stored natively:
    # deciding that before raising keeps the answer independent of the items' order.
    object_arrays: list[np.ndarray] = []
    if not _native_tree(obj, object_arrays):
        return False
    if object_arrays:
        raise TypeError(
            "numpy arrays of dtype object hold Python objects, not numbers, and cannot "
            "be stored as arrays; convert them to a numeric or string dtype")
    return True


def _native_tree(obj: Any, object_arrays: list[np.ndarray]) -> bool:
    kind = type(obj)
    if kind is np.ndarray:
        if obj.dtype.hasobject:
            object_arrays.append(obj)
        return True
    if kind is dict:
        return all(type(key) is str and _native_tree(value, object_arrays)
                   for key, value in obj.items())
    if kind in (list, tuple):
        return all(_native_tree(item, object_arrays) for item in obj)
    if isinstance(obj, np.generic):  # metrics dicts are full of np.float64 values
        return not obj.dtype.hasobject
    return obj is None or kind in (str, int, float, bool)


def _native_layout(obj: Any, parts: list[Part]) -> Any:
    kind = type(obj)
    if kind is np.ndarray:
        parts.append(_array_part(obj))
        return {"array": len(parts) - 1}
    if kind is dict:
        return {"dict": [[key, _native_layout(value, parts)] for key, value in obj.items()]}
    if kind is list:
        return {"list": [_native_layout(item, parts) for item in obj]}
    if kind is tuple:
        return {"tuple": [_native_layout(item, parts) for item in obj]}
    if isinstance(obj, np.generic):
        parts.append(_array_part(np.asarray(obj)))
        return {"scalar": len(parts) - 1}
    if kind is float and not math.isfinite(obj):
        # Strict JSON (SQLite's json functions included) has no NaN or Infinity.
        return {"float": repr(obj)}
    return {"value": obj}


def _array_part(array: np.ndarray) -> Part:
    fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
    # Fortran-ordered arrays keep their memory order (like .npy): the transpose is C-contiguous.
    flat = np.ascontiguousarray(array.T if fortran else array)
    descr = np.lib.format.dtype_to_descr(array.dtype)
    return Part(
        kind="array",
        data=memoryview(flat.reshape(-1).view(np.uint8)) if flat.size else memoryview(b""),
        dtype=descr if isinstance(descr, str) else json.dumps(descr),
        shape=list(array.shape),
        fortran_order=bool(fortran),
        itemsize=array.dtype.itemsize,
    )


def _pickle(obj: Any, parts: list[Part]) -> dict[str, Any]:
    buffers: list[Part] = []

    def keep_in_band(buffer: pickle.PickleBuffer) -> bool:
        view = memoryview(buffer)
        if view.nbytes < OUT_OF_BAND_MIN or not view.contiguous:
            return True
        buffers.append(Part(kind="buffer", data=buffer.raw(), itemsize=view.itemsize))
        return False

    # The standard pickler first: on a 20 MB forest it takes half the time of cloudpickle,
    # whose Python-level hook runs for every object. cloudpickle is needed only for what
    # it pickles by value: lambdas, local functions and classes (the standard pickler
    # refuses those), and functions and classes of __main__ (which it would pickle by a
    # reference that other processes cannot resolve; any "__main__" in the stream,
    # even inside data, sends the object to cloudpickle, which is merely slower).
    try:
        stream = pickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=keep_in_band)
        by_reference_only = b"__main__" not in stream
    except (pickle.PicklingError, AttributeError, TypeError):
        by_reference_only = False
    if not by_reference_only:
        import cloudpickle  # imported here: it costs ~40 ms and most saves never need it

        buffers.clear()
        stream = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL,
                                   buffer_callback=keep_in_band)
    parts.append(Part(kind="pickle", data=memoryview(stream)))
    parts.extend(buffers)
    return {"pickle": 0, "buffers": list(range(1, len(parts)))}


def files_parts(paths: Sequence[str | os.PathLike[str]]) -> list[Part]:
    """Parts for files and folders, named by path relative to what was given.

    A single folder contributes its files relative to itself (``config.json``);
    otherwise a file is named by its base name and a folder's files get the folder's
    name in front (``tokenizer/vocab.txt``). Files are read only while they are
    stored, one at a time, so a folder larger than memory can be saved.
    """
    roots = [Path(p) for p in paths]
    if not roots:
        raise ValueError("no files given")
    files: dict[str, Path] = {}
    for root in roots:
        if root.is_file():
            found = [(root.name, root)]
        elif root.is_dir():
            prefix = "" if len(roots) == 1 else f"{root.resolve().name}/"
            found = [(prefix + p.relative_to(root).as_posix(), p)
                     for p in sorted(root.rglob("*")) if p.is_file()]
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
        for name, file in found:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{file}: file name is not valid UTF-8") from exc
            safe_relative_path(name)  # what extract would refuse is refused now
            if name in files:
                raise ValueError(f"two files would be stored as {name!r}")
            files[name] = file
    parts = []
    for name in sorted(files):
        found = files[name].stat()
        parts.append(Part(kind="file", path=files[name], name=name, size=found.st_size,
                          mode=stat.S_IMODE(found.st_mode) & 0o777))
    return parts


def safe_relative_path(name: str) -> PurePosixPath:
    """``name`` as a relative path that cannot escape the folder it is extracted to."""
    path = PurePosixPath(name)
    if not name or not path.parts or path.is_absolute() or ".." in path.parts \
            or "\\" in name or "\x00" in name:
        raise ValueError(f"unsafe file name in vault: {name!r}")
    return path


def array_from_part(buffer: np.ndarray, dtype: str, shape: list[int],
                    fortran_order: bool) -> np.ndarray:
    """Rebuild an array over ``buffer`` (uint8, already holding its bytes) without copying."""
    descr = _descr_from_json(json.loads(dtype)) if dtype.startswith("[") else dtype
    dt = np.lib.format.descr_to_dtype(descr)
    if dt.hasobject:
        raise ValueError("object dtype in an array part")
    count = 1
    for n in shape:
        count *= n
    if count * dt.itemsize != buffer.nbytes:
        raise ValueError(f"array of shape {shape} and dtype {dtype} needs {count * dt.itemsize} "
                         f"bytes, part holds {buffer.nbytes}")
    if not buffer.nbytes:  # no elements, or items of zero bytes: nothing to view
        return np.empty(shape, dtype=dt, order="F" if fortran_order else "C")
    flat = buffer.view(dt)
    if fortran_order:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _descr_from_json(descr: Any) -> Any:
    """Undo what JSON did to a structured descr: a titled field's (title, name) became a list."""
    if not isinstance(descr, list):
        return descr
    fields = []
    for name, fmt, *shape in descr:
        if isinstance(name, list):
            name = tuple(name)
        fields.append((name, _descr_from_json(fmt), *shape))
    return fields


def rebuild_native(layout: Any, arrays: list[np.ndarray]) -> Any:
    """Inverse of the arrays layout: nested containers with arrays put back in place."""
    (tag, value), = layout.items()
    if tag == "array":
        return arrays[value]
    if tag == "scalar":
        return arrays[value][()]
    if tag == "dict":
        return {key: rebuild_native(item, arrays) for key, item in value}
    if tag == "list":
        return [rebuild_native(item, arrays) for item in value]
    if tag == "tuple":
        return tuple(rebuild_native(item, arrays) for item in value)
    if tag == "float":
        return float(value)
    if tag == "value":
        return value
    raise ValueError(f"unknown layout node {tag!r}")


def part_keys(kind: str, layout: Any, count: int) -> list[str | None]:
    """What identifies each part across versions (its place in the layout), so that a
    part can be stored as a delta of the parent version's part in the same place."""
    keys: list[str | None] = [None] * count
    if kind == "pickle":  # out-of-band buffers, in the order the pickle met them
        return [None] + [f"buffer {i}" for i in range(1, count)]

    def walk(node: Any, path: list[Any]) -> None:
        if not isinstance(node, dict):
            return
        index = node.get("array")
        if type(index) is int and 0 <= index < count:
            keys[index] = json.dumps(path)
        for key, child in node.get("dict", []) if isinstance(node.get("dict"), list) else []:
            walk(child, [*path, key])
        for name in ("list", "tuple"):
            if isinstance(node.get(name), list):
                for i, child in enumerate(node[name]):
                    walk(child, [*path, i])

    if kind == "arrays":
        walk(layout, [])
    return keys
