"""Turning Python objects into parts (named byte streams) and back.

Three kinds of version:

* ``arrays``: numpy arrays and torch tensors, and dicts/OrderedDicts/lists/tuples of
  them (with plain JSON scalars alongside). Each array or tensor is one part: dtype,
  shape and raw bytes, no pickle, so it loads without trusting anyone. Tensors that
  view one storage share one part, and come back sharing one storage.
* ``pickle``: anything else, through cloudpickle protocol 5. Large numeric
  buffers leave the pickle stream as out-of-band parts and are stored like arrays;
  so does every torch tensor storage in it (as ``torch.save`` does).
* ``files``: the files a framework wrote (ONNX, safetensors, a save_pretrained folder).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FunctionType
from typing import Any, NamedTuple

from . import _json, _torch, _trust
from ._errors import UnpicklableError, VaultError
from ._lazy import lazy

np = lazy("numpy")

# Element types that numpy has no descr for, by the name torch and ml_dtypes (JAX's
# dtypes for numpy) give them: parts.dtype holds the name, parts.itemsize the bytes
# per element. ml_dtypes' types as numpy arrays; torch's come from torch.
ML_DTYPES = frozenset({
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float6_e2m3fn",
    "float6_e3m2fn", "float4_e2m1fn", "int1", "int2", "int4", "uint1", "uint2", "uint4",
    "complex32", "bcomplex32"})

# Buffers below this stay inside the pickle stream: a forest has thousands of
# small node arrays that compress better together than one by one (7.9x vs 6.6x).
OUT_OF_BAND_MIN = 1024 * 1024
PICKLE_PROTOCOL = 5


class FileTensor(NamedTuple):
    """One tensor of a safetensors file: where its bytes are, and what they are."""

    name: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: list[int]
    start: int  # offset in the file
    size: int
    itemsize: int  # bytes per element, the byte-shuffle width (1 when unknown)


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
    # A safetensors file: the bytes of its header (with their 8-byte length), and its
    # tensors in file order, each to be cut from its own start.
    header: int = 0
    tensors: list[FileTensor] | None = None
    # A pickle stream: the module.name globals it imports (``_trust.own_pickle_imports``).
    imports: list[str] | None = None

    def __post_init__(self) -> None:
        if self.data is not None:
            self.size = len(self.data)


def serialize(obj: Any, what: str = "the object") -> tuple[str, Any, list[Part]]:
    """Split ``obj`` into (kind, layout, parts); layout is JSON that rebuilds it.
    UnpicklableError, naming it ``what``, if it must be pickled and cannot be."""
    parts: list[Part] = []
    if _is_native(obj):
        layout = _native_layout(obj, parts, _shared_storages(obj))
        return "arrays", layout, parts
    return "pickle", _pickle(obj, parts, what), parts


def pickled(obj: Any, what: str = "the object") -> tuple[str, Any, list[Part]]:
    """``serialize``'s answer for a pickle, whatever ``obj`` is (an object array too)."""
    parts: list[Part] = []
    return "pickle", _pickle(obj, parts, what), parts


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
    if _torch.is_tensor(obj):
        return _torch.storable(obj)
    if kind is dict or kind is OrderedDict:
        return all(type(key) is str and _native_tree(value, object_arrays)
                   for key, value in obj.items())
    if kind in (list, tuple):
        return all(_native_tree(item, object_arrays) for item in obj)
    if isinstance(obj, np.generic):  # metrics dicts are full of np.float64 values
        return not obj.dtype.hasobject
    return obj is None or kind in (str, int, float, bool)


def _shared_storages(obj: Any) -> dict[Any, int | None]:
    """The storages that more than one tensor in ``obj`` views (tied weights, views),
    each mapped to None until its part is made."""
    counts: dict[Any, int] = {}

    def walk(node: Any) -> None:
        if type(node) in (dict, OrderedDict):
            for value in node.values():
                walk(value)
        elif type(node) in (list, tuple):
            for value in node:
                walk(value)
        elif _torch.is_tensor(node) and not (node.is_conj() or node.is_neg()):
            # (A conjugate or negative view is stored resolved, as a part of its own.)
            key = _torch.storage_key(node)
            if key is not None:
                counts[key] = counts.get(key, 0) + 1

    if "torch" in sys.modules:
        walk(obj)
    return {key: None for key, count in counts.items() if count > 1}


def _native_layout(obj: Any, parts: list[Part], shared: dict[Any, int | None]) -> Any:
    kind = type(obj)
    if kind is np.ndarray:
        parts.append(array_part(obj))
        return {"array": len(parts) - 1}
    if _torch.is_tensor(obj):
        return _tensor_node(obj, parts, shared)
    if kind is dict:
        return {"dict": [[key, _native_layout(value, parts, shared)]
                         for key, value in obj.items()]}
    if kind is OrderedDict:
        node: dict[str, Any] = {"odict": [[key, _native_layout(value, parts, shared)]
                                          for key, value in obj.items()]}
        # A state_dict() carries its modules' versions here; load_state_dict reads them.
        metadata = getattr(obj, "_metadata", None)
        if isinstance(metadata, dict):
            try:
                node["metadata"] = json.loads(json.dumps(metadata, allow_nan=False))
            except (TypeError, ValueError):
                pass
        return node
    if kind is list:
        return {"list": [_native_layout(item, parts, shared) for item in obj]}
    if kind is tuple:
        return {"tuple": [_native_layout(item, parts, shared) for item in obj]}
    if isinstance(obj, np.generic):
        parts.append(array_part(np.asarray(obj)))
        return {"scalar": len(parts) - 1}
    if kind is float and not math.isfinite(obj):
        # Strict JSON (SQLite's json functions included) has no NaN or Infinity.
        return {"float": repr(obj)}
    return {"value": obj}


def _tensor_node(tensor: Any, parts: list[Part], shared: dict[Any, int | None]) -> Any:
    """A tensor's layout node, adding its part: its own elements, or (for a storage
    several tensors view) the whole storage, once, with the tensor as a view of it."""
    name = _torch.dtype_name(tensor.dtype)
    key = None if tensor.is_conj() or tensor.is_neg() else _torch.storage_key(tensor)
    if key in shared:
        if shared[key] is None:
            storage = tensor.untyped_storage()
            data = _torch.storage_bytes(storage)
            itemsize = tensor.dtype.itemsize
            whole = len(data) % itemsize == 0
            parts.append(Part(kind="array", data=data, dtype=name if whole else "|u1",
                              shape=[len(data) // itemsize if whole else len(data)],
                              itemsize=itemsize if whole else 1))
            shared[key] = len(parts) - 1
        node: dict[str, Any] = {"tensor": shared[key], "dtype": name,
                                "shape": list(tensor.shape), "stride": list(tensor.stride()),
                                "offset": tensor.storage_offset()}
    else:
        parts.append(Part(kind="array", data=_torch.contiguous_bytes(tensor), dtype=name,
                          shape=list(tensor.shape), itemsize=tensor.dtype.itemsize))
        node = {"tensor": len(parts) - 1}
    if type(tensor) is not sys.modules["torch"].Tensor:  # storable: an nn.Parameter
        node["parameter"] = True
    if tensor.requires_grad:
        node["grad"] = True
    return node


def array_part(array: np.ndarray) -> Part:
    fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
    # Fortran-ordered arrays keep their memory order (like .npy): the transpose is C-contiguous.
    flat = np.ascontiguousarray(array.T if fortran else array)
    if array.dtype.type.__module__ == "ml_dtypes":  # bfloat16 and co: numpy's descr is "<V2"
        if array.dtype.name not in ML_DTYPES:
            raise TypeError(f"arrays of dtype {array.dtype.name} cannot be stored yet")
        dtype = array.dtype.name
    else:
        descr = np.lib.format.dtype_to_descr(array.dtype)
        dtype = descr if isinstance(descr, str) else json.dumps(descr)
    return Part(
        kind="array",
        data=memoryview(flat.reshape(-1).view(np.uint8)) if flat.size else memoryview(b""),
        dtype=dtype,
        shape=list(array.shape),
        fortran_order=bool(fortran),
        itemsize=array.dtype.itemsize,
    )


def _pickle(obj: Any, parts: list[Part], what: str) -> dict[str, Any]:
    import copyreg
    import pickle  # here, as in unpickle: `import modelvault` and loads of arrays need none

    buffers: list[Part] = []

    def keep_in_band(buffer: pickle.PickleBuffer) -> bool:
        view = memoryview(buffer)
        if view.nbytes < OUT_OF_BAND_MIN or not view.contiguous:
            return True
        buffers.append(Part(kind="buffer", data=buffer.raw(), itemsize=view.itemsize))
        return False

    # What unpickling the stream imports: each class and function the standard pickler
    # names (saves by reference), noted as it goes. Searching a 20 MB forest's stream
    # for "__main__" took 10 ms, replaying it 14.
    named: set[str] = set()

    def module_of(found: Any, name: str) -> str:
        # pickle.whichmodule lets through what a module's __getattr__ raises but
        # AttributeError (torch.classes: RuntimeError), where the pickler's own lookup
        # goes on to the next module. __main__ if unsure: cloudpickle then reads the stream.
        try:
            return getattr(found, "__module__", None) or pickle.whichmodule(found, name)
        except Exception:
            return "__main__"

    class NamingPickler(pickle.Pickler):
        def reducer_override(self, found: Any) -> Any:
            # Called once for every object but None, booleans, numbers, str, bytes and
            # the built-in containers, before the pickler saves it.
            # Classes and Python functions the pickler saves by name; a built-in function
            # reduces to its name (a bound method of one: to getattr on its object).
            if isinstance(found, (type, FunctionType)):
                name = getattr(found, "__qualname__", None) or getattr(found, "__name__", "?")
                named.add(f"{module_of(found, name)}.{name}")
                return NotImplemented
            # Reduced here as the pickler would (copyreg's table, else __reduce_ex__), and
            # the pickler saves what this returns: a reduction to a name is a global the
            # stream imports too (numpy and SciPy ufuncs, torch dtypes).
            reduce = copyreg.dispatch_table.get(type(found))
            value = (reduce(found) if reduce is not None
                     else found.__reduce_ex__(PICKLE_PROTOCOL))
            if isinstance(value, str):
                named.add(f"{module_of(found, value)}.{value}")
            elif getattr(found, "__module__", None) == "__main__":
                named.add(f"__main__.{type(found).__qualname__}")
            return value

    # The standard pickler first: on a 20 MB forest it takes half the time of cloudpickle,
    # whose Python-level hook runs for every object. cloudpickle is needed only for what
    # it pickles by value: lambdas, local functions and classes (the standard pickler
    # refuses those), and functions and classes of __main__ (which it would pickle by a
    # reference that other processes cannot resolve).
    # With torch imported, tensor storages leave the stream through persistent ids.
    def dumps(base: type) -> tuple[bytes, list[tuple[Any, str]]]:
        if "torch" in sys.modules:
            return _torch.dumps(obj, base, keep_in_band)
        out = io.BytesIO()
        base(out, protocol=PICKLE_PROTOCOL, buffer_callback=keep_in_band).dump(obj)
        return out.getvalue(), []

    try:
        stream, storages = dumps(NamingPickler)
        imports = sorted(named)
        by_reference_only = not any(name.startswith("__main__.") for name in imports)
    except (pickle.PicklingError, AttributeError, TypeError):
        by_reference_only = False
    if not by_reference_only:
        import cloudpickle  # imported here: it costs ~40 ms and most saves never need it

        buffers.clear()
        try:
            stream, storages = dumps(cloudpickle.Pickler)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise _unpicklable(obj, what, exc) from exc
        # Classes it pickles by value are not imported: read the stream for what is.
        imports = _trust.own_pickle_imports(stream, [b.data for b in buffers])
    parts.append(Part(kind="pickle", data=memoryview(stream), imports=imports))
    parts.extend(buffers)
    layout: dict[str, Any] = {"pickle": 0, "buffers": list(range(1, len(parts)))}
    if storages:
        for data, name in storages:
            itemsize = _torch.torch_dtype(name).itemsize if name else 1
            parts.append(Part(kind="buffer", data=data, dtype=name or "|u1",
                              itemsize=itemsize if len(data) % itemsize == 0 else 1))
        layout["storages"] = list(range(1 + len(buffers), len(parts)))
    return layout


# How far the search for what pickle refuses goes: this many levels of attributes and
# items, the first this many of each tried alone (their tensors and large arrays left
# out), so that a failed save costs a few more pickles of the model at most.
_SEARCH_DEPTH = 4
_SEARCH_WIDTH = 200


def _unpicklable(obj: Any, what: str, exc: Exception) -> UnpicklableError:
    """The error for ``obj`` that pickle refused with ``exc``, naming where in it the
    object pickle refuses is, if a short search finds it."""
    path, culprit, deepest = "", obj, False
    for level in range(_SEARCH_DEPTH + 1):
        found = next(((label, member) for label, member in
                      itertools.islice(_members(culprit), _SEARCH_WIDTH)
                      if not _pickles(member)), None)
        if found is None:  # nothing in it is refused alone: it is what pickle refuses
            deepest = True
            break
        if level == _SEARCH_DEPTH:
            break
        path, culprit = path + found[0], found[1]
    advice = ("Leave it out of what is pickled (a __getstate__ that drops it and a "
              "__setstate__ that makes it again), or save what the model needs to come "
              "back instead (its state_dict(), its arrays).")
    if not path:
        return UnpicklableError(f"{what} ({type(obj).__qualname__}) cannot be pickled: "
                                f"{exc}. {advice}")
    kind = type(culprit).__qualname__
    if type(culprit).__module__ != "builtins":
        kind = f"{type(culprit).__module__}.{kind}"
    return UnpicklableError(
        f"{what} ({type(obj).__qualname__}) cannot be pickled: {path} "
        + (f"is a {kind}, which pickle refuses" if deepest
           else f"(a {kind}) holds something pickle refuses")
        + f" ({exc}). {advice}", path=path)


def _members(obj: Any) -> Iterator[tuple[str, Any]]:
    """The items of a container, or the attributes an object pickles (its
    ``__getstate__``), labelled as a path: ``['key']``, ``[0]``, ``.name``."""
    if isinstance(obj, dict):
        yield from ((f"[{key!r}]", value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        yield from ((f"[{i}]", value) for i, value in enumerate(obj))
    elif not isinstance(obj, type):
        try:
            state = obj.__getstate__() if hasattr(obj, "__getstate__") else vars(obj)
        except Exception:  # the object's own code: no attributes to offer then
            return
        for found in state if isinstance(state, tuple) else (state,):  # (dict, slots)
            if isinstance(found, dict):
                yield from ((f".{key}", value) for key, value in found.items())


class _Discard:
    def write(self, data: Any) -> int:
        return len(data)


def _pickles(obj: Any) -> bool:
    """Whether cloudpickle takes ``obj``; its tensor storages and large buffers are
    left out of the trial, which only pickle's refusals matter to."""
    import cloudpickle

    torch = sys.modules.get("torch")
    storages = () if torch is None else (torch.storage.TypedStorage, torch.UntypedStorage)

    class Trial(cloudpickle.Pickler):
        def persistent_id(self, found: Any) -> Any:
            return 0 if storages and isinstance(found, storages) else None

    try:
        Trial(_Discard(), protocol=PICKLE_PROTOCOL, buffer_callback=lambda b: False).dump(obj)
    except Exception:
        return False
    return True


def array_from_part(buffer: np.ndarray, dtype: str, shape: list[int],
                    fortran_order: bool) -> np.ndarray:
    """Rebuild an array over ``buffer`` (uint8, already holding its bytes) without copying."""
    if dtype in ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError as exc:
            raise VaultError(f"this version holds arrays of dtype {dtype}, which numpy reads "
                             "through the ml_dtypes package: pip install ml_dtypes") from exc
        dt = np.dtype(getattr(ml_dtypes, dtype))
    else:
        descr = _descr_from_json(_json.loads(dtype)) if dtype.startswith("[") else dtype
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


def rebuild_native(layout: Any, parts: Sequence[tuple[Any, np.ndarray]],
                   device: Any = None) -> Any:
    """Inverse of the arrays layout: nested containers with arrays and tensors put back
    in place. ``parts`` are (parts row, uint8 buffer); tensors go to ``device``."""
    return Rebuilder(parts, device).node(layout)


_LEAVES = ("array", "scalar", "tensor")


def entries(layout: Any) -> dict[str, dict[str, Any]]:
    """The arrays, scalars and tensors of an arrays layout, by flat name: the dict keys
    and list or tuple positions on the way to each, joined with '.'
    (``encoder.layer.0.weight``), in layout order."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, path: list[str]) -> None:
        if not isinstance(node, dict):
            return
        if any(tag in node for tag in _LEAVES):
            found[".".join(path)] = node
        for tag in ("dict", "odict"):
            for key, child in node[tag] if isinstance(node.get(tag), list) else []:
                walk(child, [*path, str(key)])
        for tag in ("list", "tuple"):
            for i, child in enumerate(node[tag]) if isinstance(node.get(tag), list) else []:
                walk(child, [*path, str(i)])

    walk(layout, [])
    return found


def select(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The names that ``patterns`` (exact names, or globs such as ``encoder.*.bias``)
    pick, in the order of ``names``; KeyError naming a pattern that picks none."""
    import fnmatch

    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"keys are names or glob patterns, not {type(pattern).__name__}")
        picked = {pattern} & set(names) or {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not picked:
            shown = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise KeyError(f"no entry named or matching {pattern!r} (entries: "
                           f"{shown or 'none'})")
        chosen |= picked
    return [name for name in names if name in chosen]


def native_imports(layout: Any, parts: Sequence[Part]) -> list[str]:
    """The types beyond numpy's that an arrays layout's values are made of (torch's
    tensors, ml_dtypes' element types), as ``module.name``: what its environment records."""
    found = set()
    for node in entries(layout).values():
        dtype = parts[leaf_part(node)].dtype
        if "tensor" in node:
            found.add("torch.Tensor")
        elif dtype in ML_DTYPES:
            found.add(f"ml_dtypes.{dtype}")
    return sorted(found)


def leaf_part(node: dict[str, Any]) -> int:
    """The part a leaf node of ``entries`` reads."""
    return next(node[tag] for tag in _LEAVES if tag in node)


class Rebuilder:
    """Rebuilds an arrays layout, each part converted once, when a node first needs it.
    ``parts`` maps a part's index to (parts row, uint8 buffer): a list of all of them, or
    a mapping that fetches one when asked."""

    def __init__(self, parts: Any, device: Any) -> None:
        self.parts = parts
        self.device = device
        self.arrays: dict[int, np.ndarray] = {}
        self.flats: dict[int, Any] = {}  # uint8 tensors over parts, shared by their views

    def node(self, layout: Any) -> Any:
        (tag, value), = ((k, v) for k, v in layout.items()
                         if k not in ("dtype", "shape", "stride", "offset", "parameter",
                                      "grad", "metadata"))
        if tag == "array":
            return self.array(value)
        if tag == "scalar":
            return self.array(value)[()]
        if tag == "tensor":
            return self.tensor(value, layout)
        if tag == "dict":
            return {key: self.node(item) for key, item in value}
        if tag == "odict":
            rebuilt = OrderedDict((key, self.node(item)) for key, item in value)
            if isinstance(layout.get("metadata"), dict):
                rebuilt._metadata = layout["metadata"]  # type: ignore[attr-defined]
            return rebuilt
        if tag == "list":
            return [self.node(item) for item in value]
        if tag == "tuple":
            return tuple(self.node(item) for item in value)
        if tag == "float":
            return float(value)
        if tag == "value":
            return value
        raise ValueError(f"unknown layout node {tag!r}")

    def array(self, index: int) -> np.ndarray:
        if index not in self.arrays:
            part, buffer = self.parts[index]
            self.arrays[index] = array_from_part(buffer, part.dtype, _json.loads(part.shape),
                                                 bool(part.fortran_order))
        return self.arrays[index]

    def tensor(self, index: int, node: dict[str, Any]) -> Any:
        torch = import_torch()
        part, buffer = self.parts[index]
        if index not in self.flats:
            self.flats[index] = _torch.from_buffer(buffer, self.device)
        if "stride" in node:  # a view of a storage other tensors view too
            tensor = _torch.view(self.flats[index], node["dtype"], node["shape"],
                                 node["stride"], node["offset"])
        else:
            tensor = _torch.tensor(self.flats[index], part.dtype, _json.loads(part.shape))
        if node.get("parameter"):
            return torch.nn.Parameter(tensor, requires_grad=bool(node.get("grad")))
        return tensor.requires_grad_(True) if node.get("grad") else tensor


def import_torch() -> Any:
    """torch, or a VaultError saying to install it."""
    try:
        import torch
    except ImportError as exc:
        raise VaultError("this version holds torch tensors: install torch to load it "
                         "(pip install torch)") from exc
    return torch


def unpickle(layout: Any, parts: Sequence[tuple[Any, np.ndarray]], device: Any = None
             ) -> Any:
    """Inverse of ``_pickle``: runs the stream's code, so only for trusted versions."""
    import pickle

    stream = parts[layout["pickle"]][1]
    buffers = [parts[i][1] for i in layout["buffers"]]
    storages = layout.get("storages")
    if storages is None:
        return pickle.loads(stream, buffers=buffers)
    import_torch()
    return _torch.loads(stream, buffers, [parts[i][1] for i in storages], device)


def part_keys(kind: str, layout: Any, count: int) -> list[str | None]:
    """What identifies each part across versions (its place in the layout), so that a
    part can be stored as a delta of the parent version's part in the same place."""
    keys: list[str | None] = [None] * count
    if kind == "pickle":  # out-of-band buffers and storages, in the order the pickle met them
        storages = layout.get("storages", []) if isinstance(layout, dict) else []
        for number, index in enumerate(storages if isinstance(storages, list) else []):
            if type(index) is int and 0 <= index < count:
                keys[index] = f"storage {number}"
        return [None] + [keys[i] or f"buffer {i}" for i in range(1, count)]

    def walk(node: Any, path: list[Any]) -> None:
        if not isinstance(node, dict):
            return
        index = node.get("array", node.get("tensor"))
        if type(index) is int and 0 <= index < count and keys[index] is None:
            keys[index] = json.dumps(path)
        for name in ("dict", "odict"):
            for key, child in node[name] if isinstance(node.get(name), list) else []:
                walk(child, [*path, key])
        for name in ("list", "tuple"):
            if isinstance(node.get(name), list):
                for i, child in enumerate(node[name]):
                    walk(child, [*path, i])

    if kind == "arrays":
        walk(layout, [])
    return keys
