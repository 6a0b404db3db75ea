"""Metric plots: numbers from a model's metadata across its versions, drawn with
matplotlib (the optional ``plot`` extra), aliases marked on their versions' points.

Everything drawn comes from a vault file someone else may have written: values are taken
only when they are plain finite numbers an axis can hold, and every label is cut short,
stripped of unprintable characters and kept out of matplotlib's mathtext (a ``$`` in an
alias or key would otherwise be parsed, and a crafted one makes the parser raise).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import NotFoundError
from ._records import ModelVersion

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "plotting needs matplotlib: pip install 'modelvault[plot]'"
# Beyond this magnitude matplotlib cannot compute an axis' ticks and raises (two values of
# 1e308 and -1e308 overflow the range); such a value is skipped like a non-number.
MAX_MAGNITUDE = 1e300
MAX_ANNOTATED = 30  # points whose aliases are written out: the newest ones
MAX_ALIASES_SHOWN = 3  # aliases written at one point; the rest as "+N"
MAX_LABEL = 40  # characters of any one label taken from the file
MAX_DEPTH = 4  # levels of nested metadata searched for metric names
MAX_LISTED = 20  # metric names listed in an error
X_AXES = ("version", "created")


@dataclass(frozen=True)
class Series:
    """One metric's points (x, value, version) and how many versions had no number for it."""

    metric: str
    points: tuple[tuple[Any, float, ModelVersion], ...]
    skipped: int


def plot(name: str, versions: Sequence[ModelVersion], metric: str | Sequence[str], *,
         x: str = "version", ax: Axes | None = None,
         path: str | os.PathLike[str] | None = None) -> Figure:
    """Draw ``metric`` (one key or several) of ``versions`` of model ``name``; see
    ``Vault.plot``."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ValueError(f"metric must be a metadata key or a list of them, not {metric!r}")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
    known = metric_names(versions)
    unknown = [m for m in metrics if not any(_found(mv.metadata, m)[0] for mv in versions)]
    if unknown:
        raise NotFoundError(f"{name} has no metadata {', '.join(map(repr, unknown))}; "
                            f"its metrics: {_listed(known)}")
    series = [collect(versions, m, x) for m in metrics]
    if not any(s.points for s in series):
        raise ValueError(f"no version of {name} has a number for {', '.join(metrics)} "
                         f"(its metrics: {_listed(known)})")
    matplotlib = _matplotlib()
    with matplotlib.rc_context({"text.usetex": False}):
        figure = _draw(name, series, x, ax)
        if path is not None:
            _save(figure, path)
    return figure


def collect(versions: Sequence[ModelVersion], metric: str, x: str = "version") -> Series:
    """The points of ``metric`` over ``versions``; a version without it, or whose value is
    no plain finite number (text, even "0.9", a bool, NaN, inf, a huge one), is skipped."""
    points, skipped = [], 0
    for mv in versions:
        found, value = _found(mv.metadata, metric)
        number = _number(value) if found else None
        if number is None:
            skipped += 1
        else:
            points.append((mv.version if x == "version" else mv.created_at, number, mv))
    return Series(metric, tuple(points), skipped)


def metric_names(versions: Sequence[ModelVersion]) -> list[str]:
    """Every metadata key (nested ones dotted, as "eval.loss") that holds a number in
    some version, sorted."""
    return sorted(metric_counts(versions))


def metric_counts(versions: Sequence[ModelVersion]) -> Counter[str]:
    """How many of ``versions`` hold a number for each metadata key (nested ones dotted)."""
    return Counter({key: len(numbers) for key, numbers in metric_values(versions).items()})


def metric_values(versions: Sequence[ModelVersion]) -> dict[str, list[float]]:
    """The numbers ``versions`` hold for each metadata key (nested ones dotted), in order."""
    values: dict[str, list[float]] = {}
    for mv in versions:
        for key, value in _leaves(mv.metadata, "", MAX_DEPTH):
            number = _number(value)
            if number is not None:
                values.setdefault(key, []).append(number)
    return values


def _found(metadata: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """(True, value) of ``key``: the key itself, or else a dotted path into nested dicts."""
    if key in metadata:
        return True, metadata[key]
    value: Any = metadata
    for part in key.split(".", MAX_DEPTH)[:MAX_DEPTH + 1]:
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _leaves(value: Any, prefix: str, depth: int) -> Iterator[tuple[str, Any]]:
    if not isinstance(value, Mapping) or depth == 0:
        return
    for key, item in value.items():
        path = f"{prefix}{key}"
        yield path, item
        yield from _leaves(item, path + ".", depth - 1)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_MAGNITUDE else None


def _listed(names: list[str]) -> str:
    if not names:
        return "none with a number"
    shown = ", ".join(_label(n) for n in names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _label(text: object) -> str:
    """``text`` safe to draw: printable, short, and its ``$`` escaped so matplotlib shows
    it rather than parsing mathtext."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    if len(text) > MAX_LABEL:
        text = text[:MAX_LABEL - 1] + "…"
    return text.replace("$", r"\$")


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return matplotlib


def _draw(name: str, series: list[Series], x: str, ax: Axes | None) -> Figure:
    from matplotlib.figure import Figure

    if ax is None:
        # A Figure of its own, not pyplot's: no GUI window, no global state, and the
        # user's backend is left as it is (savefig picks Agg for a PNG by itself).
        ax = Figure(figsize=(8, 4.5), layout="constrained").add_subplot()
    for s in series:
        label = _label(s.metric) + (f" ({s.skipped} skipped)" if s.skipped else "")
        ax.plot([p[0] for p in s.points], [p[1] for p in s.points], marker="o", label=label)
    _mark_aliases(ax, series)
    skipped = series[0].skipped
    if len(series) == 1:
        ax.set_ylabel(_label(series[0].metric))
        note = f" ({skipped} version{'s' * (skipped != 1)} without a number skipped)" \
            if skipped else ""
        ax.set_title(f"{_label(name)}: {_label(series[0].metric)}{note}")
    else:
        ax.set_ylabel("value")
        ax.set_title(_label(name))
        ax.legend()
    ax.set_xlabel("version" if x == "version" else "created (UTC)")
    if x == "version":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    return ax.figure  # type: ignore[return-value]


def _mark_aliases(ax: Axes, series: list[Series]) -> None:
    """Write each aliased version's aliases at its point (the first metric that has
    one), for the newest MAX_ANNOTATED of them."""
    marked: dict[str, tuple[Any, float, ModelVersion]] = {}
    for s in series:
        for point in s.points:
            if point[2].aliases:
                marked.setdefault(point[2].id, point)
    newest = sorted(marked.values(), key=lambda p: p[2].version)[-MAX_ANNOTATED:]
    for xv, yv, mv in newest:
        aliases = sorted(str(a) for a in mv.aliases)
        text = " ".join("@" + _label(a) for a in aliases[:MAX_ALIASES_SHOWN])
        if len(aliases) > MAX_ALIASES_SHOWN:
            text += f" +{len(aliases) - MAX_ALIASES_SHOWN}"
        ax.scatter([xv], [yv], s=80, facecolors="none", edgecolors="black", zorder=3)
        ax.annotate(text, (xv, yv), xytext=(0, 9), textcoords="offset points",
                    ha="center", fontsize=8)


def png(figure: Figure) -> bytes:
    """``figure`` drawn as PNG bytes (by Agg, whatever the user's backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    _save(figure, buffer)
    return buffer.getvalue()


def _save(figure: Figure, path: str | os.PathLike[str] | io.BytesIO) -> None:
    buffer = isinstance(path, io.BytesIO)
    target = path if isinstance(path, io.BytesIO) else os.fspath(path)
    with warnings.catch_warnings():
        # A label in a script the default font lacks draws as boxes; no need to say so.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
        try:
            figure.savefig(target, format="png" if buffer else None)
        except (ValueError, RuntimeError, OverflowError) as exc:
            where = "" if buffer else f" to {target}"
            raise ValueError(f"cannot draw the plot{where}: {exc}") from exc
