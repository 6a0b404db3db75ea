"""The torch tensors of a pickled version by name, found without running its pickle.

A pickled ``nn.Module`` (an optimizer, a checkpoint) is stored with every tensor
storage taken out of the stream as a part of its own (``_torch.dumps``); which tensor
views which storage, how, and under what name, is in the stream. The stream is
replayed here with every global it names replaced by a stand-in of ours, except the
few whose meaning we know (a tensor or Parameter rebuilt from a storage, an
OrderedDict, a class cloudpickle made by value): nothing the stream names runs, so
reading its tensors needs no trust.

A module's tensors are named as its ``state_dict()`` names them (``0.weight``); others by
the dict keys, list positions and attribute names on the way to them, joined with '.'
(as an arrays version's). Each tensor becomes an arrays layout node (a
view of its storage's part) that ``_serialize.Rebuilder`` rebuilds.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections import OrderedDict
from typing import Any, NamedTuple

from ._torch import STORAGE_TAG

# Limits that keep what a hostile stream costs small: a stream of at most MAX_OPS
# opcodes (a module of 200 layers takes about 20,000), none of whose dict keys or set
# members has a hash it chooses (_check), is replayed; its objects are walked
# at most MAX_DEPTH deep and in at most MAX_STEPS steps, a step for each item of each
# object walked (an object reached again through others counts again); names of
# MAX_NAME_CHARS in all are made. A stream beyond them is refused with ValueError (the
# version still loads whole, with trust).
MAX_OPS = 1_000_000
MAX_DEPTH = 64
MAX_STEPS = 1_000_000
MAX_NAME_CHARS = 16 * 1024 * 1024
# A tensor's shape and stride: at most MAX_DIMS ints (sizes torch keeps as int64), so that
# what is said of a view, and what is computed from it, stays small.
MAX_DIMS = 64
_INT64 = 2**63

_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


class _Storage(NamedTuple):
    number: int  # its place in the layout's "storages"
    dtype: str  # parts.dtype's name for the tensors viewing it


class _Tensor(NamedTuple):
    storage: _Storage
    offset: Any
    shape: Any
    stride: Any
    grad: bool
    parameter: bool = False


class _Object:
    """Stands in for whatever the stream makes from a global it names; keeps the state
    and items it is given, where tensors may be."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Object:
        # Here, not in __init__: NEWOBJ makes an instance without calling __init__ (an
        # optimizer in a checkpoint), and the walk reads these of every stand-in.
        self = super().__new__(cls)
        self.state = None
        self.items = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Object:  # a function made by value
        return _Object()

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append((len(self.items), value))

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def add(self, value: Any) -> None:
        pass


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any,
                    requires_grad: Any = False, *rest: Any) -> Any:
    if not isinstance(storage, _Storage):
        return _Object()
    return _Tensor(storage, offset, _listed(shape), _listed(stride), requires_grad is True)


def _rebuild_parameter(data: Any, requires_grad: Any = True, *rest: Any) -> Any:
    if not isinstance(data, _Tensor):
        return _Object()
    return data._replace(grad=requires_grad is True, parameter=True)


def _rebuild_from_type(function: Any, kind: Any, args: Any, state: Any = None) -> Any:
    # A Tensor subclass, or a tensor with attributes: the tensor itself is rebuilt inside.
    if function in (_rebuild_tensor, _rebuild_parameter) and isinstance(args, tuple):
        return function(*args)
    return _Object()


def _ordered_dict(*args: Any) -> Any:
    # Its items are set by the stream (SETITEMS), whose keys _check has seen; pairs given
    # here would be hashed where _check does not look.
    return OrderedDict(args[0] if args and isinstance(args[0], dict) else ())


def _made_class(*args: Any) -> type:
    """A class cloudpickle pickled by value (one of __main__): the stand-ins' class, so
    that its instances are made and given their state."""
    return _Object


_KNOWN = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _Replay(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".", 1)[0] == "cloudpickle" and name in (
                "_make_skeleton_class", "_make_skeleton_enum"):
            return _made_class
        return _KNOWN.get((module, name), _Object)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 3 and pid[0] == STORAGE_TAG
                and type(pid[1]) is int and 0 <= pid[1] < _INT64 and isinstance(pid[2], str)):
            # Its type only: the repr of what a stream makes can be gigabytes long (one
            # large bytes object listed a million times through the memo).
            raise pickle.UnpicklingError(
                f"a persistent id that is not a storage's (a {type(pid).__name__})")
        return _Storage(pid[1], pid[2])


def entries(stream: Any, layout: Any) -> dict[str, dict[str, Any]]:
    """The tensors of a pickle version by name, as arrays layout nodes, from its stream
    and its layout (whose "storages" name each storage's part). ValueError for a stream
    that cannot be read, or that exceeds the limits above."""
    data = bytes(stream)
    _check(data)
    try:
        root = _Replay(io.BytesIO(data), buffers=_NoBuffers()).load()
    except Exception as exc:  # only our stand-ins and pickle's own code ran
        raise ValueError(f"its pickle cannot be read: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from exc
    storages = layout.get("storages") if isinstance(layout, dict) else None
    try:
        return {name: _node(tensor, storages) for name, tensor in _walk(root).items()}
    except (AttributeError, TypeError, RecursionError) as exc:  # objects of odd shapes
        raise ValueError(f"its pickle's objects cannot be walked: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from exc


class _NoBuffers:
    """Out-of-band buffers (large arrays) hold no tensors: each is empty to the replay."""

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> bytes:
        return b""


def _check(data: bytes) -> None:
    """Refuse a stream before replaying it: one too long, one whose memo indices pickle's
    C unpickler would make room for (a 5-byte LONG_BINPUT can ask for gigabytes), or one
    that has it hash dict keys or set members whose hashes the stream chooses (the ints
    n * (2**61 - 1) all hash to 0: 330,000 of them in one dict take the C unpickler nine
    minutes). Which object is a key is found by following the replay's stack, each object
    on it known only by its hash kind (below), with pickle's own opcode table."""
    stack: list[int] = []
    marks: list[int] = []  # the stack's length at each open MARK, as the C unpickler keeps
    memo = bytearray()  # the kind of each memo entry, _UNSET where none was put
    filled = 0  # memo entries put: the index MEMOIZE puts at
    for count, (opcode, arg, _) in enumerate(_opcodes(data)):
        if count >= MAX_OPS:
            raise ValueError(f"its pickle has more than {MAX_OPS:,} opcodes")
        name = opcode.name
        if name in _MEMO_OPS and not 0 <= arg <= count:
            raise ValueError(f"its pickle has a memo index {arg} at opcode {count}")
        before, after = opcode.stack_before, opcode.stack_after
        if name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()  # POP right after a MARK takes the mark
            continue
        items: list[int] = []
        if pickletools.markobject in before:
            if not marks:
                raise ValueError(f"its pickle cannot be read: opcode {count} ({name}) "
                                 "has no MARK")
            items = stack[marks[-1]:]
            del stack[marks.pop():]
            before = before[:before.index(pickletools.markobject)]
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "DUP"):
            before = [pickletools.anyobject]  # they read the top object and leave it
            after = [pickletools.anyobject] * (2 if name == "DUP" else 1)
        if len(stack) - len(before) < (marks[-1] if marks else 0):
            raise ValueError(f"its pickle cannot be read: opcode {count} ({name}) takes "
                             "more objects than its stack holds")
        taken = stack[len(stack) - len(before):]
        del stack[len(stack) - len(before):]
        keys = (taken[1:2] if name == "SETITEM" else items[::2] if name in ("SETITEMS", "DICT")
                else items if name in ("ADDITEMS", "FROZENSET") else ())
        if _CHOSEN in keys:
            raise ValueError(f"its pickle's opcode {count} ({name}) hashes an object whose "
                             "hash it chooses (a large int, or a tuple or frozenset of "
                             "numbers)")
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = filled if name == "MEMOIZE" else arg
            memo.extend(b"\xff" * (index + 1 - len(memo)))
            filled += memo[index] == _UNSET
            memo[index] = taken[0]
            kind = taken[0]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg >= len(memo) or memo[arg] == _UNSET:
                raise ValueError(f"its pickle cannot be read: opcode {count} gets memo "
                                 f"index {arg}, never put")
            kind = memo[arg]
        elif name in _SAME:
            kind = taken[0]
        else:
            kind = _kind(name, arg, items or taken)
        if pickletools.markobject in after:
            marks.append(len(stack))
        else:
            stack.extend([kind] * len(after))


# How an object on the replay's stack hashes, for _check: _OPAQUE (a str's or bytes'
# hash is salted per process; a stand-in's is its id; a list cannot be hashed), _NUMBER
# (distinct ints below 2**61 - 1 hash apart, and floats nearly all do; but the hash of a
# tuple of them can be chosen), _CHOSEN (an int that large, or a tuple or frozenset of
# numbers: a stream can make many of them hash alike).
_OPAQUE, _NUMBER, _CHOSEN, _UNSET = 0, 1, 2, 0xFF
# Opcodes that leave on the stack the object they took first (a list appended to, the
# object given its state, the top one DUP copies).
_SAME = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD",
         "READONLY_BUFFER", "DUP"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


def _kind(name: str, arg: Any, parts: list[int]) -> int:
    """The hash kind of the object opcode ``name`` makes of ``arg``, or of objects of
    the kinds ``parts``."""
    if name in _INTS and type(arg) is int:  # INT's arg may be a bool, which is opaque
        return _NUMBER if abs(arg) < 2**61 - 1 else _CHOSEN
    if name in ("FLOAT", "BINFLOAT"):
        return _NUMBER
    if name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"):
        return _CHOSEN if any(parts) else _OPAQUE
    return _OPAQUE


def _opcodes(data: bytes) -> Any:
    try:
        yield from pickletools.genops(io.BytesIO(data))
    except Exception as exc:  # pickletools' own reading of a damaged stream
        raise ValueError(f"its pickle cannot be read: {type(exc).__name__}: {exc}") from exc


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    """The named children of an object the replay made, or None for a leaf."""
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    if not isinstance(node, _Object):
        return None
    state = node.state
    if isinstance(state, dict) and all(
            isinstance(state.get(key), dict) for key in ("_parameters", "_buffers", "_modules")):
        # An nn.Module: what its state_dict() holds, in its order.
        dropped = state.get("_non_persistent_buffers_set")
        dropped = dropped if isinstance(dropped, set) else set()
        return ([(k, v) for k, v in state["_parameters"].items() if v is not None]
                + [(k, v) for k, v in state["_buffers"].items()
                   if v is not None and k not in dropped]
                + list(state["_modules"].items()))
    found: list[tuple[Any, Any]] = []
    for part in state if isinstance(state, tuple) else (state,):  # (dict, slots)
        if isinstance(part, dict):
            found += part.items()
    return found + node.items


def _walk(root: Any) -> dict[str, _Tensor]:
    """Every tensor under ``root`` by name, depth first in the objects' order. An object
    met again on another path is walked again (a module used twice has its tensors
    under both names, as in its state_dict()); one met again inside itself is not."""
    found: dict[str, _Tensor] = {}
    chars = steps = 0
    # A path is (parent path, key, id of the object the key is in, length of the name
    # it makes) or None: names are made only for tensors, and the objects above a node
    # are found by following it.
    stack: list[tuple[Any, int, Any]] = [(None, 0, root)]
    while stack:
        path, depth, node = stack.pop()
        if isinstance(node, _Tensor):
            # Counted before it is made: a name joins its keys, and one long key reached
            # on each of 63 levels would make a name of 63 times its length.
            chars += path[3] if path else 0
            if chars > MAX_NAME_CHARS:
                raise ValueError(f"its tensors' names take more than {MAX_NAME_CHARS:,} "
                                 "characters")
            keys = []
            while path is not None:
                path, key, _, _ = path
                keys.append(key)
            found.setdefault(".".join(reversed(keys)), node)
            continue
        children = _children(node)
        if not children or _inside(path, id(node)):
            continue
        if depth >= MAX_DEPTH:
            raise ValueError(f"its objects are nested more than {MAX_DEPTH} deep")
        # Each item counts, whatever its key: a visit copies all of them, and one large
        # object may be reached through the memo from many places.
        steps += len(children)
        if steps > MAX_STEPS:
            raise ValueError(f"its objects take more than {MAX_STEPS:,} steps to walk")
        start = path[3] + 1 if path else 0  # its name, and a "." if it has one
        for key, child in reversed(children):
            if type(key) in (str, int):
                key = str(key)
                stack.append(((path, key, id(node), start + len(key)), depth + 1, child))
    return found


def _inside(path: Any, node: int) -> bool:
    """Whether the object ``node`` (an id) is one of those ``path`` goes through."""
    while path is not None:
        path, _, above, _ = path
        if above == node:
            return True
    return False


def _node(tensor: _Tensor, storages: Any) -> dict[str, Any]:
    """An arrays layout node viewing the part of the tensor's storage."""
    number = tensor.storage.number
    if not (isinstance(storages, list) and 0 <= number < len(storages)
            and type(storages[number]) is int):
        raise ValueError(f"its pickle names storage {number}, which its layout lacks")
    dims = tensor.shape, tensor.stride
    if not (all(isinstance(d, list) and len(d) <= MAX_DIMS for d in dims)
            and all(type(n) is int and 0 <= n < _INT64
                    for n in (*tensor.shape, *tensor.stride, tensor.offset))):
        raise ValueError(f"its pickle gives a tensor a shape, stride or offset other than "
                         f"at most {MAX_DIMS} ints from 0 to 2**63")
    node: dict[str, Any] = {"tensor": storages[number], "dtype": tensor.storage.dtype,
                            "shape": tensor.shape, "stride": tensor.stride,
                            "offset": tensor.offset}
    if tensor.parameter:
        node["parameter"] = True
    if tensor.grad:
        node["grad"] = True
    return node
