"""torch tensors as parts and back: a state dict is stored as arrays, never a pickle.

Used only when torch is already imported (a saved object can hold a tensor only if
it is), or when a version holding tensors is loaded; ``import modelvault`` never
imports torch. Owns: which tensors can be stored natively, their dtype names, their
bytes, rebuilding them (views of one storage sharing it again, placed on a device),
and the pickler and unpickler that take tensor storages out of a pickle stream as
parts, as ``torch.save`` does with persistent ids.
"""

from __future__ import annotations

import functools
import io
import reprlib
import sys
import warnings
from typing import Any

from . import _limits
from ._lazy import lazy

np = lazy("numpy")

# Integer types by width in bytes, to move any type's bits as they are.
_INTEGERS: dict[int, Any] = {}

# The persistent id of a storage taken out of a pickle stream: (tag, index into the
# layout's "storages", dtype name or None for an untyped storage).
STORAGE_TAG = "modelvault-storage"


def is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def values(tensor: Any) -> np.ndarray:
    """A tensor's values as a numpy array on the CPU, for comparing them: the dtypes
    numpy lacks widened (bfloat16 and the float8s to float32, complex32 to complex64)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16 or str(tensor.dtype).startswith("torch.float8"):
        tensor = tensor.float()
    elif tensor.dtype == torch.complex32:
        tensor = tensor.to(torch.complex64)
    return tensor.resolve_conj().resolve_neg().numpy()


def storable(tensor: Any) -> bool:
    """Whether a tensor is stored as an array part: a plain or Parameter tensor with
    strided memory and data (not sparse, quantized, nested, meta or a subclass)."""
    import torch

    return (type(tensor) in (torch.Tensor, torch.nn.Parameter)
            and tensor.layout == torch.strided and not tensor.is_quantized
            and not tensor.is_nested and tensor.device.type != "meta")


@functools.cache
def dtype_name(dtype: Any) -> str:
    """How parts.dtype names a torch dtype: numpy's descr where numpy has the type
    (float32 is "<f4", as for an array), else torch's own name ("bfloat16")."""
    import torch

    try:
        return str(np.lib.format.dtype_to_descr(torch.empty(0, dtype=dtype).numpy().dtype))
    except TypeError:  # numpy has no such type
        return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> Any:
    """The torch dtype ``dtype_name`` gave ``name``; ValueError for any other name."""
    found = _dtypes().get(name) if type(name) is str else None
    if found is None:
        raise ValueError(f"unknown tensor dtype {reprlib.repr(name)}")
    return found


@functools.cache
def _dtypes() -> dict[str, Any]:
    """Every torch dtype by the name ``dtype_name`` gives it: the names torch_dtype
    reads, so that a name from a file only picks from this table. (getattr(torch, name)
    would let it pick any attribute, and import the submodule one names: "_inductor"
    imports 800 modules.)"""
    import torch

    with warnings.catch_warnings():  # complex32 and the quantized types warn when made
        warnings.simplefilter("ignore")
        return {dtype_name(dtype): dtype for dtype in vars(torch).values()
                if isinstance(dtype, torch.dtype)}


def contiguous_bytes(tensor: Any) -> memoryview:
    """A tensor's elements as C-ordered bytes, on the CPU."""
    import torch

    if not _INTEGERS:
        _INTEGERS.update({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64})
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.numel() == 0:
        return memoryview(b"")
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        try:  # no copy: a state dict's tensors are nearly all like this
            return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        except RuntimeError:
            pass  # strides a byte view cannot take (size-1 dimensions): copied below
    # Copied as integers of the same width: torch has no copy kernel for sub-byte types
    # (int1, uint4, ...), and a fresh tensor has the strides a byte view needs (a
    # contiguous tensor of size-1 dimensions may not).
    same_width = _INTEGERS.get(tensor.dtype.itemsize, tensor.dtype)
    flat = torch.empty(tensor.shape, dtype=same_width)
    flat.copy_(tensor.view(same_width) if tensor.dtype != same_width else tensor)
    return memoryview(flat.reshape(-1).view(torch.uint8).numpy())


def storage_key(tensor: Any) -> tuple[int, int, str] | None:
    """What identifies the storage a tensor views (None for an empty one: nothing to
    share). Its size too: two storages may start at one address (torch.from_numpy of an
    array and of a slice of it) and be of different lengths."""
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes(), str(storage.device)


def storage_bytes(storage: Any) -> memoryview:
    """All bytes of an untyped storage, on the CPU."""
    import torch

    if storage.nbytes() == 0:
        return memoryview(b"")
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    return memoryview(whole.cpu().numpy())


def from_buffer(buffer: Any, device: Any) -> Any:
    """A uint8 tensor over a part's bytes (no copy on the CPU), on ``device``."""
    import torch

    flat = torch.from_numpy(buffer) if buffer.nbytes else torch.empty(0, dtype=torch.uint8)
    return flat if device is None else flat.to(device)


def tensor(flat: Any, name: str, shape: list[int]) -> Any:
    """The tensor of dtype ``name`` and ``shape`` whose bytes are the uint8 tensor ``flat``."""
    import torch

    dtype = torch_dtype(name)
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != flat.numel():
        raise ValueError(f"tensor of shape {shape} and dtype {name} needs "
                         f"{count * dtype.itemsize} bytes, part holds {flat.numel()}")
    if flat.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=flat.device)
    return flat.view(dtype).reshape(shape)


def view(flat: Any, name: str, shape: list[int], stride: list[int], offset: int) -> Any:
    """A tensor viewing the storage of the uint8 tensor ``flat`` (shared with every
    other view of it), as it viewed the storage it was saved from."""
    import torch

    dtype = torch_dtype(name)
    if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) <= 64
            and len(shape) == len(stride)
            and all(type(n) is int and 0 <= n < 2**63 for n in [*shape, *stride, offset])):
        # Named by its size only: the lists are the file's, of any length.
        raise ValueError(f"bad view: a shape of {len(shape) if isinstance(shape, list) else '?'}"
                         " dimensions, or a stride, offset or dimension that is not a "
                         "non-negative 64-bit integer")
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    if all(shape) and last * dtype.itemsize > flat.numel():
        raise ValueError(f"view of shape {shape} reaches past its storage")
    _limits.check_view(shape, dtype.itemsize, flat.numel())  # TooLargeError
    return torch.empty(0, dtype=dtype, device=flat.device).set_(
        flat.untyped_storage(), offset, shape, stride)


def dumps(obj: Any, base: type, buffer_callback: Any) -> tuple[bytes, list[tuple[Any, str]]]:
    """Pickle ``obj`` with a subclass of the pickler ``base``, taking every tensor
    storage out of the stream; returns the stream and the storages as (bytes, dtype
    name or "" for an untyped storage), in the order of their ids."""
    import torch

    storages: list[tuple[Any, str]] = []
    seen: dict[Any, int] = {}

    class StoragePickler(base):  # type: ignore[misc, valid-type]
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, torch.storage.TypedStorage):
                untyped, name = obj._untyped_storage, dtype_name(obj.dtype)
            elif isinstance(obj, torch.UntypedStorage):
                untyped, name = obj, ""
            else:
                return None
            key = ((untyped.data_ptr(), untyped.nbytes(), str(untyped.device))
                   if untyped.nbytes() else id(obj))
            if key not in seen:
                seen[key] = len(storages)
                storages.append((untyped, name))
            return (STORAGE_TAG, seen[key], name or None)

    out = io.BytesIO()
    StoragePickler(out, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue(), [(storage_bytes(s), name) for s, name in storages]


def loads(stream: Any, buffers: list[Any], storages: list[Any], device: Any) -> Any:
    """Unpickle a stream ``dumps`` wrote; ``storages`` are the storages' part buffers."""
    import pickle

    import torch

    made: dict[int, Any] = {}

    class StorageUnpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) == 3 and pid[0] == STORAGE_TAG
                    and type(pid[1]) is int and 0 <= pid[1] < len(storages)):
                raise pickle.UnpicklingError(  # never its repr: see _pickle_tensors
                    f"a persistent id that is not a storage's (a {type(pid).__name__})")
            if pid[1] not in made:
                made[pid[1]] = from_buffer(storages[pid[1]], device).untyped_storage()
            untyped = made[pid[1]]
            if pid[2] is None:
                return untyped
            return torch.storage.TypedStorage(wrap_storage=untyped,
                                              dtype=torch_dtype(pid[2]), _internal=True)

    return StorageUnpickler(io.BytesIO(stream), buffers=buffers).load()
