"""Browse's metric pages: ``/-/metrics`` lists the models, ``/-/metrics/<model>`` charts
a model's metrics across its versions, each chart a PNG at ``/-/metrics/<model>/chart.png``
drawn by ``_plot`` (no JavaScript: the pages work offline).

Model names, metric names and values come from the vault file or the URL: names are quoted
in links and escaped in HTML, a metric is charted only if the model's versions have it, and
the work is bounded (the newest MAX_VERSIONS versions, at most MAX_METADATA bytes of
their metadata, MAX_METRICS metrics listed,
MAX_CHARTS charts on a page) and done off the event loop, MAX_DRAWING charts at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

from . import _plot
from ._catalog import Catalog
from ._connection import Connection
from ._errors import VaultError
from ._records import ModelVersion

MAX_VERSIONS = 1000  # newest versions charted: a model of 100,000 draws as fast as this
# Metadata JSON read per page or chart, newest versions first: every key of it is walked,
# and a version may hold thousands (1,000 versions of 5,000 keys took 10 s and 800 MB).
# A Trainer run's versions hold a few KB each: its newest 1,000 fit.
MAX_METADATA = 8 * 1024 * 1024
MAX_METRICS = 20  # metrics listed on a page, the ones that change first
MAX_CHARTS = 6  # charts on one page
DEFAULT_CHARTS = 3  # charts shown when none are asked for
MAX_MODELS = 1000  # models listed on the index
MAX_KEY = 200  # characters of a metric name listed or asked for
MAX_SHOWN = 80  # characters of a name from the file written on a page
_DRAWING = threading.BoundedSemaphore(2)  # charts drawn at once: each holds a core


@dataclass(frozen=True)
class ModelMetrics:
    """What a model's page shows: its newest versions (oldest first), how many it has, and
    its metrics: those whose number changes first, then the ones most versions hold."""

    name: str
    versions: tuple[ModelVersion, ...]
    total: int
    metrics: tuple[str, ...]


def model_metrics(connection: Connection, name: str) -> ModelMetrics | None:
    """The model ``name``'s metrics, or None if the vault has no model by that name."""
    total = connection.db.execute(
        "SELECT count(*) FROM versions v JOIN models m ON m.id = v.model_id WHERE m.name = ?",
        (name,)).fetchone()[0]
    if not total:
        return None
    sizes = connection.db.execute(
        "SELECT v.version, length(v.metadata) FROM versions v JOIN models m ON m.id = "
        "v.model_id WHERE m.name = ? ORDER BY v.version DESC LIMIT ?", (name, MAX_VERSIONS))
    oldest, read = None, 0
    for version, size in sizes:
        read += size
        if oldest is not None and read > MAX_METADATA:
            break
        oldest = version
    newest = Catalog(connection).records("WHERE m.name = ? AND v.version >= ? "
                                         "ORDER BY v.version DESC", (name, oldest))
    versions = tuple(reversed(newest))
    values = _plot.metric_values(versions)
    # A number that never changes (a run's fixed argument: a batch size, a seed) is not
    # worth a chart: the ones that change come first, then those most versions hold.
    metrics = sorted((k for k in values if len(k) <= MAX_KEY),
                     key=lambda k: (len(set(values[k])) < 2, -len(values[k]), k))
    return ModelMetrics(name, versions, total, tuple(metrics[:MAX_METRICS]))


def chosen(asked: list[str], metrics: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the metrics to chart, the asked ones that are not this model's): the first
    MAX_CHARTS asked for, or the first DEFAULT_CHARTS when none is."""
    if not asked:
        return list(metrics[:DEFAULT_CHARTS]), []
    known = [m for m in dict.fromkeys(asked) if m in metrics]
    unknown = [m for m in dict.fromkeys(asked) if m not in metrics]
    return known[:MAX_CHARTS], unknown[:MAX_CHARTS]


def png(model: ModelMetrics, metric: str) -> bytes:
    """The chart of ``metric`` across ``model``'s versions, as PNG bytes."""
    with _DRAWING:
        return _plot.png(_plot.plot(model.name, model.versions, metric))


def shown(text: str) -> str:
    """A name from the file cut to a length a page can show."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 1] + "…"


def _matplotlib_missing() -> str | None:
    try:
        _plot._matplotlib()
    except ImportError as exc:
        return str(exc)
    return None


_PAGE = """{% extends "base.html" %}
{% block title %}{{ title }}{% endblock %}
{% block content %}
<h1>{{ title }}</h1>
{% for line in notes %}<p>{{ line }}</p>{% endfor %}
{% if models %}<ul>{% for name, href, count in models %}
<li><a href="{{ href }}">{{ name }}</a> ({{ count }} version{{ "s" if count != 1 }})</li>
{% endfor %}</ul>{% endif %}
{% if metrics %}<form action="" method="get"><p>
{% for key, label, on in metrics %}<label style="display: inline-block;
 width: auto; margin-right: 1.5em; white-space: nowrap"><input type="checkbox"
 name="metric" value="{{ key }}"{{ " checked" if on }}> {{ label }}</label>
{% endfor %}<input type="submit" value="Chart"></p></form>{% endif %}
{% for src, alt in charts %}<p><img src="{{ src }}" alt="{{ alt }}" width="800"
 height="450" style="max-width: 100%; height: auto"></p>{% endfor %}
{% endblock %}
"""


def routes(path: Path, reading: Callable[[Path], Any]) -> list[tuple[str, Any]]:
    """The Datasette routes of the metric pages of the vault at ``path``; ``reading`` opens
    it read-only and yields its connection, in a read transaction."""
    from datasette.utils.asgi import Response

    def metrics_of(name: str) -> ModelMetrics | None:
        with reading(path) as connection:
            return model_metrics(connection, name)

    def models() -> list[Any]:
        with reading(path) as connection:
            return Catalog(connection).models()

    async def page(datasette: Any, title: str, status: int = 200, **context: Any) -> Any:
        template = datasette.jinja_env.from_string(_PAGE)
        context = {"title": title, "notes": [], "models": [], "metrics": [], "charts": [],
                   **context}
        return Response.html(await datasette.render_template(template, context), status)

    def link(datasette: Any, name: str, tail: str = "") -> str:
        return datasette.urls.path(f"/-/metrics/{quote(name, safe='')}{tail}")

    async def read(datasette: Any, work: Callable[[], Any]) -> tuple[Any, Any]:
        """(work's result, None), or (None, an error page) if the vault cannot be read:
        422, as the file is at fault, where a 5xx would say the server failed."""
        try:
            return await asyncio.to_thread(work), None
        except VaultError as exc:
            return None, await page(datasette, "This vault cannot be read", 422,
                                    notes=[str(exc)[:2000]])

    async def index(datasette: Any) -> Any:
        found, error = await read(datasette, models)
        if error:
            return error
        listed = [(shown(m.name), link(datasette, m.name), m.versions)
                  for m in found[:MAX_MODELS]]
        notes = ([f"The first {MAX_MODELS:,} of {len(found):,} models."]
                 if len(found) > MAX_MODELS else [] if found else ["No models yet."])
        return await page(datasette, "Metrics by model", models=listed, notes=notes)

    async def model_page(datasette: Any, request: Any) -> Any:
        name = unquote(request.url_vars["model"])
        model, error = await read(datasette, lambda: metrics_of(name))
        if error:
            return error
        if model is None:
            return await page(datasette, "No such model", 404,
                              notes=[f"The vault has no model named {shown(name)!r}."])
        asked = [m for m in request.args.getlist("metric") if len(m) <= MAX_KEY]
        charted, unknown = chosen(asked, model.metrics)
        notes = []
        if model.total > len(model.versions):
            notes.append(f"The newest {len(model.versions):,} of its {model.total:,} "
                         "versions are charted.")
        if not model.metrics:
            notes.append("No version of this model has a number in its metadata.")
        if unknown:
            notes.append("Not metrics of this model: " + ", ".join(map(shown, unknown)))
        missing = _matplotlib_missing()
        if missing and model.metrics:
            notes.append(missing)  # how to install it
            charted = []
        return await page(
            datasette, f"Metrics of {shown(name)}", notes=notes,
            metrics=[(m, shown(m), m in charted) for m in model.metrics],
            charts=[(link(datasette, name, "/chart.png?" + urlencode({"metric": m})),
                     f"{shown(m)} across the versions of {shown(name)}") for m in charted])

    async def chart(datasette: Any, request: Any) -> Any:
        name = unquote(request.url_vars["model"])
        metric = request.args.getlist("metric")
        if len(metric) != 1 or len(metric[0]) > MAX_KEY:
            return Response.text("one metric=, a metadata key of the model", status=400)
        model, error = await read(datasette, lambda: metrics_of(name))
        if error:
            return error
        if model is None or metric[0] not in model.metrics:
            return Response.text("no such model or metric", status=404)
        missing = _matplotlib_missing()
        if missing:
            return Response.text(missing, status=501)
        try:
            body = await asyncio.to_thread(png, model, metric[0])
        except (VaultError, ValueError) as exc:
            return Response.text(f"cannot draw this chart: {exc}"[:2000], status=422)
        return Response(body, content_type="image/png")

    return [(r"^/-/metrics/?$", index),
            (r"^/-/metrics/(?P<model>[^/]+)/chart\.png$", chart),
            (r"^/-/metrics/(?P<model>[^/]+)/?$", model_page)]
