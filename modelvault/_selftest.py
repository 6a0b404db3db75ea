"""Input examples saved with a model, and checking that it still answers the same.

Owns which method a model is asked (``METHODS``), how an example and the model's answer
are kept (natively where they are numpy, pandas or torch), and how a fresh answer is
compared with the saved one, and the steps of a selftest (``run``). The Vault front
stores them as parts of the version; the reader reads them back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _torch
from ._lazy import lazy

if TYPE_CHECKING:
    from ._catalog import VersionRow
    from ._reader import Reader

np = lazy("numpy")

# The first of these the model has is what a selftest asks it; else the model itself,
# if it is callable (a torch module, a function).
METHODS = ("predict_proba", "predict", "transform", "decision_function")
# Floats agree when |saved - now| <= ATOL + RTOL * |saved|: a model recomputed by the same
# code gives the same bits; other builds of a library differ in the last few bits.
RTOL = 1e-5
ATOL = 1e-8


@dataclass(frozen=True)
class SelftestResult:
    """What ``Vault.selftest`` found for one version.

    ``passed`` is True when every value of the model's answer to its saved example
    agrees with the saved answer (exactly for integers, booleans and labels; within
    ``RTOL``/``ATOL`` for floats), False when any differs, None when the version has no
    example. ``compared`` and ``mismatched`` count values; ``max_abs`` and ``max_rel``
    are the largest absolute and relative differences among floats (None if none)."""

    ref: str
    method: str | None
    passed: bool | None
    compared: int
    mismatched: int
    max_abs: float | None
    max_rel: float | None
    message: str

    def __bool__(self) -> bool:
        return self.passed is True


def run(reader: Reader, row: VersionRow, load: Callable[[], Any], trust: bool
        ) -> SelftestResult:
    """Ask the model ``load()`` returns the example saved with ``row`` again and compare
    its answer with the saved one (see ``Vault.selftest``)."""
    example = row.layouts()[1]
    if example is None:
        return SelftestResult(row.where, None, None, 0, 0, None, None,
                              "no example was saved with it")
    model = load()
    saved = reader.example(row, example, trust)
    # The file never chooses the code to run: only a method of our own list, that
    # this model has (a class may have gained another since the save).
    method = example.get("method")
    if not askable(model, method):
        raise row.error(f"its example cannot be asked: it names {str(method)[:80]!r}, "
                        f"not one of {', '.join(METHODS)} or __call__ that "
                        f"this {type(model).__name__} has")
    try:
        now = answer(model, method, decode_example(saved["input"]))
    except Exception as exc:  # the model's own code failing is the finding
        return SelftestResult(
            row.where, method, False, 0, 0, None, None,
            f"{method} failed on the saved example: {type(exc).__name__}: {exc}")
    return compare(row.where, method, saved["output"], now)


def method_of(model: Any) -> str:
    """The method a model answers examples with; ValueError if it has none."""
    for name in METHODS:
        if callable(getattr(model, name, None)):
            return name
    if callable(model):
        return "__call__"
    raise ValueError(f"the model ({type(model).__name__}) has none of {', '.join(METHODS)} "
                     "and is not callable: it cannot take an example")


def askable(model: Any, method: object) -> bool:
    """Whether ``method`` (read from a file) is one of ours that ``model`` answers with."""
    if method == "__call__":
        return callable(model)
    return method in METHODS and callable(getattr(model, method, None))  # type: ignore[arg-type]


def answer(model: Any, method: str, example: Any) -> Any:
    """The model's answer to ``example``, as plain containers of numpy arrays. Under
    torch.no_grad() when torch is imported, so no graph is kept; the model's training
    mode is left as it is."""
    function = model if method == "__call__" else getattr(model, method)
    torch = sys.modules.get("torch")
    if torch is not None:
        with torch.no_grad():
            return plain(function(example))
    return plain(function(example))


def plain(value: Any) -> Any:
    """``value`` with its tensors, frames and array-likes as numpy arrays, its mappings
    (a Hugging Face ModelOutput too) as dicts and its sequences as lists."""
    if isinstance(value, np.ndarray):
        if value.dtype == object and value.size and all(isinstance(v, str)
                                                        for v in value.flat):
            return value.astype(str)  # labels: stored as numpy strings, not pickled
        return value
    if _torch.is_tensor(value):
        return _torch.values(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bytes)) or value is None:
        return value
    return np.asarray(value)


def encode_example(example: Any) -> Any:
    """An example as containers of arrays where it can be: a pandas DataFrame becomes its
    columns, index and names (string columns as numpy strings), rebuilt by
    ``decode_example``."""
    pandas = sys.modules.get("pandas")  # an example can be a DataFrame only if it is
    if pandas is not None and isinstance(example, pandas.DataFrame):
        columns = []
        for name in example.columns:
            values = example[name].to_numpy()
            strings = values.dtype == object and all(isinstance(v, str) for v in values)
            columns.append({"name": _json_name(name), "values": values.astype(str)
                            if strings else values, "object": bool(strings)})
        return {"__dataframe__": {"columns": columns, "index": example.index.to_numpy()}}
    return example


def decode_example(example: Any) -> Any:
    if isinstance(example, dict) and set(example) == {"__dataframe__"}:
        import pandas

        frame = example["__dataframe__"]
        return pandas.DataFrame(
            {c["name"]: c["values"].astype(object) if c["object"] else c["values"]
             for c in frame["columns"]}, index=frame["index"])
    return example


def compare(ref: str, method: str, saved: Any, now: Any,
            rtol: float = RTOL, atol: float = ATOL) -> SelftestResult:
    """The model's answer ``now`` against the ``saved`` one."""
    saved_leaves, now_leaves = _leaves(saved), _leaves(now)
    if saved_leaves.keys() != now_leaves.keys():
        return SelftestResult(ref, method, False, 0, 0, None, None,
                              f"{method} answered with other parts: saved "
                              f"{sorted(saved_leaves)}, now {sorted(now_leaves)}")
    compared = mismatched = 0
    max_abs = max_rel = None
    worst = ""
    for name, a in saved_leaves.items():
        b = now_leaves[name]
        where = f" at {name}" if name else ""
        if a.shape != b.shape:
            return SelftestResult(ref, method, False, compared, mismatched, max_abs, max_rel,
                                  f"{method} answered with shape {b.shape}{where}, saved "
                                  f"{a.shape}")
        compared += a.size
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            bad, top, top_rel = _float_differences(a, b, rtol, atol)
            if top is not None:
                max_abs = top if max_abs is None else max(max_abs, top)
                max_rel = top_rel if max_rel is None else max(max_rel, top_rel)
        elif a.dtype.kind != b.dtype.kind and not (a.dtype.kind in "biu"
                                                   and b.dtype.kind in "biu"):
            bad = int(a.size)  # labels that became numbers, or the other way
        else:
            bad = int(np.count_nonzero(a != b))
        if bad and not worst:
            worst = f"{bad} of {a.size} values differ{where}"
        mismatched += bad
    if mismatched:
        detail = f"; largest difference {max_abs:.6g}" if max_abs is not None else ""
        return SelftestResult(ref, method, False, compared, mismatched, max_abs, max_rel,
                              f"{method} answers differently: {worst}{detail} "
                              f"({mismatched} of {compared} values in all)")
    detail = f", largest difference {max_abs:.3g}" if max_abs else ""
    return SelftestResult(ref, method, True, compared, 0, max_abs, max_rel,
                          f"{method} answers as saved ({compared} values{detail})")


def _float_differences(a: Any, b: Any, rtol: float, atol: float
                       ) -> tuple[int, float | None, float | None]:
    """(values beyond tolerance, largest absolute difference, largest relative one) of
    the saved floats ``a`` and the fresh ``b``; NaN agrees with NaN."""
    dtype = np.complex128 if "c" in (a.dtype.kind, b.dtype.kind) else np.float64
    try:
        x, y = a.astype(dtype), b.astype(dtype)
    except (TypeError, ValueError):  # strings where numbers were
        return int(a.size), None, None
    bad = int(np.count_nonzero(~np.isclose(y, x, rtol=rtol, atol=atol, equal_nan=True)))
    difference = np.abs(y - x)
    finite = np.isfinite(difference)
    if not finite.any():
        return bad, None, None
    scale = np.abs(x)[finite]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(scale > 0, difference[finite] / scale, 0.0)
    return bad, float(difference[finite].max()), float(relative.max())


def _leaves(value: Any, name: str = "") -> dict[str, Any]:
    """Every array of a plain answer by its path (dict keys and positions joined with
    '.'); a string or None is a 0-d array of it."""
    if isinstance(value, dict):
        found: dict[str, Any] = {}
        for key, item in value.items():
            found.update(_leaves(item, f"{name}.{key}" if name else str(key)))
        return found
    if isinstance(value, list):
        found = {}
        for i, item in enumerate(value):
            found.update(_leaves(item, f"{name}.{i}" if name else str(i)))
        return found
    return {name: np.asarray(value, dtype=object if value is None else None)}


def _json_name(name: Any) -> Any:
    return name if isinstance(name, (str, int, float, bool)) or name is None else str(name)
