"""The MLflow importer: an MLflow model registry, read through MLflow's own client,
brought into a vault.

``mlflow:URI`` names the registry by its tracking URI (``mlflow:sqlite:///mlflow.db``,
``mlflow:file:///path/mlruns``, ``mlflow:http://host:5000``; a bare ``mlflow:`` is
MLflow's default, ``MLFLOW_TRACKING_URI``). Each registered model (or the one named)
becomes a vault model of the same name; each of its versions, in version order, one
version holding its artifacts' files (or its model, below), the child of the one before
(so its tensors are stored as deltas). Its metadata: ``mlflow_version`` (what recognises it
once imported, as ``step`` does a checkpoint), ``mlflow_run_id``, the run's latest
finite metrics (top level, as a checkpoint's are, so plots find them) and its params
(``mlflow_params``), ``mlflow_flavor`` from its ``MLmodel``, and its description and
source URI. Its tags become tags, its legacy stage the tag ``mlflow_stage``, and the
registered model's aliases become aliases.

Where the flavor is one a vault stores natively and its artifact loads without
unpickling (xgboost in JSON or UBJSON, a lightgbm Booster's text, onnx), the version is
that model, loaded through its framework and saved as ``Vault.save`` would; anything
else (sklearn's pickles, pytorch's) stays files. No option unpickles them: the model
saved again would carry the vault's signature, vouching for code nobody checked.

Everything MLflow returns is a stranger's: names that cannot be vault names are skipped
with a warning (never pasted into a search filter), numbers are kept only when finite,
params and tags bounded, a missing run costs its metrics (warned), a local artifact
folder with a link leading out of it is refused before it is copied, and MLflow's own
errors become VaultErrors. ``import modelvault`` imports no MLflow: this module imports
it when called.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sqlite3
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from ._errors import NotFoundError, RemoteError, VaultError
from ._importing import Entry, check_contained, import_chain
from ._refs import check_alias, check_name
from ._reports import ImportReport

PREFIX = "mlflow:"
MAX_METRICS = 200  # metrics, and params, kept per run
MAX_PARAM = 1000  # characters of a param's value kept (MLflow allows 6000)
MAX_TAGS = 100
MAX_TAG = 5000  # characters of a tag's value (MLflow's own limit is about this)
MAX_TEXT = 10_000  # characters of a description or source URI
MAX_MLMODEL = 1024 * 1024
_KEY = re.compile(r"[^\x00-\x1f]{1,100}")  # a metric, param or tag key we keep
_FLAVOR = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def import_registry(vault: Any, source: str, name: str | None) -> ImportReport:
    """Import the registry ``source`` (``mlflow:URI``) into ``vault``: every registered
    model, or only ``name``. The report's ``name`` is the model's, or the imported
    models' names joined by ``", "``."""
    client = _client(source[len(PREFIX):])
    with _settings(client.tracking_uri):
        return _import(vault, client, source, name)


def _import(vault: Any, client: Any, source: str, name: str | None) -> ImportReport:
    if name is not None:
        check_name(name)
        found = _call(lambda: client.get_registered_model(name).name, f"model {name!r}")
        if found != name:  # a server answering with another model's name
            raise RemoteError(f"MLflow: asked for model {name!r}, was given "
                              f"{str(found)[:200]!r}")
        names = [name]
    else:
        names = [n for n in _registered(client) if _valid_name(n)]
    if not names:
        raise VaultError(f"{source}: no registered models; nothing to import")
    added: list[Any] = []
    existing: list[Any] = []
    for model in names:
        more, found = _import_model(vault, client, model)
        added += more
        existing += found
    return ImportReport(name=", ".join(names), added=tuple(added), existing=tuple(existing))


def _client(uri: str) -> Any:
    """MLflow's client of ``uri`` (None: MLflow's default), after checking a local store
    exists: MLflow would otherwise create an empty one where a path was mistyped."""
    import mlflow
    from mlflow import MlflowClient

    uri = uri or _call(mlflow.get_tracking_uri, "MLflow's tracking URI")
    kind, path = _local_store(uri)
    if kind == "sqlite":
        if not path.is_file():
            raise NotFoundError(f"{path}: no such MLflow database")
        _check_mlflow_database(path)
    elif kind == "folder" and not path.is_dir():
        raise NotFoundError(f"{path}: no such MLflow folder")
    return _call(lambda: MlflowClient(tracking_uri=uri, registry_uri=uri), uri)


def _local_store(uri: str) -> tuple[str | None, Path]:
    """("sqlite", its database file) or ("folder", its file store) for a local
    registry; (None, Path()) for one behind a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return "sqlite", Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if parsed.scheme in ("", "file"):
        return "folder", Path(parsed.path if parsed.scheme else uri)
    return None, Path()


def _local_root(uri: str) -> Path | None:
    """The folder a local registry's artifacts may lie in: the one its SQLite file lies
    in (MLflow keeps them in ./mlruns beside it by default), or its file store folder
    itself (MLflow keeps them inside it; the folder it lies in may be a home folder);
    None for a registry behind a server."""
    kind, path = _local_store(uri)
    return path.parent if kind == "sqlite" else path if kind == "folder" else None


# MLflow's HTTP client tries a server that does not answer 8 times, backing off for
# minutes, each try waiting up to 120 s; an import gives up sooner. MLflow's own
# download bars, one per version, would print whatever the vault's progress setting.
# A user's own setting of these wins.
_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@contextmanager
def _settings(uri: str) -> Iterator[None]:
    """MLflow's process-wide settings for the import, then restored: its tracking URI
    set to ``uri`` (MLflow's file store reads a version's metrics through a client of
    that global URI, whose default creates mlflow.db in the current folder), and its
    HTTP retries bounded and its download bars hidden (``_SETTINGS``)."""
    import mlflow

    try:  # where MLflow keeps the URI set_tracking_uri set; None: never set
        from mlflow.tracking._tracking_service import utils
    except ImportError:  # another MLflow: its URI is then left set to the registry's
        utils = types.SimpleNamespace()
    keys = ("MLFLOW_TRACKING_URI", *_SETTINGS)
    saved = getattr(utils, "_tracking_uri", None), {key: os.environ.get(key) for key in keys}
    for key, value in _SETTINGS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved[0]
        for key, value in saved[1].items():
            _restore(key, value)


def _restore(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _check_mlflow_database(path: Path) -> None:
    """VaultError unless ``path`` is an MLflow database: MLflow would add its tables to
    any other SQLite file."""
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                               "name = 'registered_models'").fetchone()
    except sqlite3.Error as exc:  # not a database, or one locked by its writer
        raise VaultError(f"{path}: cannot read it as an MLflow database ({exc})") from None
    if found is None:
        raise VaultError(f"{path}: not an MLflow database (no registered_models table)")


def _call(read: Callable[[], Any], what: str) -> Any:
    """``read()``, MLflow's errors as ours: MLflow's client raises its own exception,
    the HTTP library's, SQLAlchemy's or OSError depending on the store behind it."""
    try:
        return read()
    except VaultError:
        raise
    except Exception as exc:
        code = getattr(exc, "error_code", None)
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFoundError(f"MLflow: {what}: {str(exc)[:500]}") from exc
        raise RemoteError(f"MLflow: {what}: {type(exc).__name__}: {str(exc)[:500]}") from exc


def _registered(client: Any) -> Iterator[str]:
    """Every registered model's name, page by page."""
    token = None
    while True:
        page = _call(lambda t=token: client.search_registered_models(max_results=1000,
                                                                     page_token=t),
                     "registered models")
        yield from (model.name for model in page)
        token = page.token
        if not token:
            return


def _valid_name(name: Any) -> bool:
    try:
        check_name(name)
    except ValueError:
        warnings.warn(f"MLflow model {str(name)[:200]!r} cannot be a vault model name; "
                      "skipped (renamed in MLflow to letters, digits and . _ - /, it "
                      "comes in)", stacklevel=4)
        return False
    return True


def _import_model(vault: Any, client: Any, name: str) -> tuple[list[Any], list[Any]]:
    """Import one registered model's versions in order: (added, already there)."""
    versions = _versions(client, name)
    aliases: dict[int, list[str]] = {}
    model = _call(lambda: client.get_registered_model(name), f"model {name!r}")
    for alias, number in (getattr(model, "aliases", None) or {}).items():
        try:
            aliases.setdefault(int(number), []).append(check_alias(alias))
        except (ValueError, TypeError):
            warnings.warn(f"MLflow model {name}: alias {str(alias)[:200]!r} cannot be a "
                          "vault alias; left out", stacklevel=4)
    entries = [Entry(number, tuple(aliases.get(number, ())), 1,
                     functools.partial(_save, vault, client, name, number, version))
               for number, version in versions]
    return import_chain(vault, name, "mlflow_version", entries, unit="version")


def _versions(client: Any, name: str) -> list[tuple[int, Any]]:
    """The model's registered versions by number; those not READY skipped (warned)."""
    # check_name let no quote through, so the name is safe inside the filter's quotes.
    check_name(name)
    versions: dict[int, Any] = {}
    token = None
    while True:
        page = _call(lambda t=token: client.search_model_versions(
            filter_string=f"name = '{name}'", max_results=1000, page_token=t),
            f"versions of {name!r}")
        for version in page:
            number = _number(version.version)
            if number is None or version.name != name:
                warnings.warn(f"MLflow model {name}: version {str(version.version)[:40]!r} "
                              "is not a version number; skipped", stacklevel=5)
            elif str(getattr(version, "status", "READY")) != "READY":
                warnings.warn(f"MLflow model {name}: version {number} is "
                              f"{str(version.status)[:40]}, not READY; skipped", stacklevel=5)
            else:
                versions[number] = version
        token = page.token
        if not token:
            return sorted(versions.items(), key=lambda item: item[0])


def _number(value: Any) -> int | None:
    text = str(value)
    if text.isascii() and text.isdigit() and 1 <= int(text) < 2**63:
        return int(text)
    return None


def _save(vault: Any, client: Any, name: str, number: int, version: Any, parent: Any) -> Any:
    """Download one version's artifacts and save them as the next vault version."""
    metadata = _run_metadata(client, name, number, getattr(version, "run_id", None))
    for key, attribute in (("mlflow_description", "description"),
                           ("mlflow_source", "source")):
        text = getattr(version, attribute, None)
        if isinstance(text, str) and text:
            metadata[key] = text[:MAX_TEXT]
    tags = _tags(name, number, getattr(version, "tags", None) or {})
    stage = getattr(version, "current_stage", None)
    if isinstance(stage, str) and stage not in ("", "None"):
        tags["mlflow_stage"] = stage[:MAX_TAG]
    with _downloaded(client, name, number) as folder:
        flavor, conf = _mlmodel(folder)
        if flavor is not None:
            metadata["mlflow_flavor"] = flavor
        metadata["mlflow_version"] = number  # last: a metric of that name does not win
        options = {"metadata": metadata, "tags": tags, "source": False, "parent": parent}
        model = _native(flavor, conf, folder, f"MLflow model {name} version {number}")
        if model is not None:
            return vault.save(name, model, **options)
        return vault.save_files(name, folder, **options)


def _run_metadata(client: Any, name: str, number: int, run_id: Any) -> dict[str, Any]:
    """The run's id, latest finite metrics and bounded params; only what exists of them
    when the run is gone (warned)."""
    if not isinstance(run_id, str) or not run_id:
        return {}
    metadata: dict[str, Any] = {"mlflow_run_id": run_id[:200]}
    try:
        run = _call(lambda: client.get_run(run_id), f"run {run_id[:200]!r}")
    except NotFoundError:
        warnings.warn(f"MLflow model {name} version {number}: its run {run_id[:200]!r} is "
                      "gone; imported without its metrics and params", stacklevel=5)
        return metadata
    metrics = getattr(run.data, "metrics", None) or {}
    for key, value in list(metrics.items()):
        if len(metadata) > MAX_METRICS:
            break
        if isinstance(key, str) and _KEY.fullmatch(key) and not key.startswith("mlflow_") \
                and type(value) in (int, float) and math.isfinite(value):
            metadata[key] = value
    params = {key: value[:MAX_PARAM] for key, value
              in list((getattr(run.data, "params", None) or {}).items())[:MAX_METRICS]
              if isinstance(key, str) and _KEY.fullmatch(key) and isinstance(value, str)}
    if params:
        metadata["mlflow_params"] = params
    return metadata


def _tags(name: str, number: int, tags: Any) -> dict[str, str]:
    """The version's tags that are strings of bounded size; the others warned and left
    out."""
    kept: dict[str, str] = {}
    for key, value in list(tags.items()) if isinstance(tags, dict) else []:
        if (isinstance(key, str) and _KEY.fullmatch(key) and isinstance(value, str)
                and len(value) <= MAX_TAG and len(kept) < MAX_TAGS):
            kept[key] = value
        else:
            warnings.warn(f"MLflow model {name} version {number}: tag {str(key)[:100]!r} "
                          "left out (not a short string, or too many tags)", stacklevel=5)
    return kept


@contextmanager
def _downloaded(client: Any, name: str, number: int) -> Iterator[Path]:
    """The version's artifacts, downloaded through MLflow into a temporary folder that
    nothing in it leads out of."""
    from mlflow.artifacts import download_artifacts

    uri = _call(lambda: client.get_model_version_download_uri(name, str(number)),
                f"artifacts of {name} version {number}")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):  # MLflow copies what a link points to: check first
        # Unquoted as MLflow unquotes it before copying: %2E%2E climbs out as .. does.
        local = Path(url2pathname(parsed.path if parsed.scheme else uri))
        # A registry's own artifacts lie beside it; a version whose source names
        # another (a stranger's registry pointing at ~/.ssh) would copy that into the vault.
        root = _local_root(client.tracking_uri) or local
        if not local.resolve().is_relative_to(root.resolve()):
            raise VaultError(f"MLflow model {name} version {number}: its artifacts {local} "
                             f"lie outside {root}, the folder the registry lies in; "
                             "refusing to read them (import through the registry's server, "
                             "mlflow:http://..., which serves its artifacts itself)")
        check_contained(local, local)
    with tempfile.TemporaryDirectory(prefix="modelvault-mlflow-") as tmp:
        path = Path(_call(lambda: download_artifacts(
            artifact_uri=uri, dst_path=tmp, tracking_uri=client.tracking_uri),
            f"artifacts of {name} version {number}"))
        check_contained(path, Path(tmp))
        yield path


class _Aliased(Exception):
    """An MLmodel with a YAML alias."""


def _mlmodel(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """The version's MLmodel flavor (the first that is not the generic python_function)
    and its settings, read as plain YAML and bounded; (None, {}) when there is none."""
    path = folder / "MLmodel"
    if not path.is_file() or path.stat().st_size > MAX_MLMODEL:
        return None, {}
    import yaml  # MLflow's own requirement

    class Loader(yaml.SafeLoader):
        """Refuses an alias where it meets one: merge keys over aliases double at each
        level (a few hundred bytes, hours to load), and MLflow writes none."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise _Aliased
            return super().compose_node(parent, index)

    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
    except _Aliased:
        warnings.warn(f"{path.name} of this version has YAML aliases; its flavor is not "
                      "recorded", stacklevel=6)
        return None, {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        warnings.warn(f"{path.name} of this version is not YAML; its flavor is not recorded",
                      stacklevel=6)
        return None, {}
    flavors = document.get("flavors") if isinstance(document, dict) else None
    names = [f for f in flavors if isinstance(f, str) and _FLAVOR.fullmatch(f)] \
        if isinstance(flavors, dict) else []
    specific = [f for f in names if f != "python_function"]
    if not names:
        return None, {}
    flavor = (specific or names)[0]
    conf = flavors[flavor]
    return flavor, conf if isinstance(conf, dict) else {}


# The model classes whose MLflow artifact loads without unpickling, and loads into what
# Vault.save stores natively: (flavor, MLmodel's model_class) -> the class in its
# package. A class from the file is looked up here, never imported by its name.
_XGBOOST = {f"xgboost.{module}.{cls}": cls for module, cls in (
    ("core", "Booster"), ("sklearn", "XGBClassifier"), ("sklearn", "XGBRegressor"),
    ("sklearn", "XGBRanker"), ("sklearn", "XGBRFClassifier"), ("sklearn", "XGBRFRegressor"))}


def _native(flavor: str | None, conf: dict[str, Any], folder: Path, what: str) -> Any:
    """The model an xgboost (JSON or UBJSON), lightgbm Booster (text) or onnx artifact
    holds, loaded through its framework; None to keep the files: another flavor (a
    pickle, whose loading would run its code), the framework not installed, or an
    artifact it cannot read (warned)."""
    data = conf.get("data")
    model_class = conf.get("model_class")
    if flavor not in ("xgboost", "lightgbm", "onnx") or not isinstance(data, str):
        return None
    path = folder / data
    if not path.resolve().is_relative_to(folder.resolve()) or not path.is_file():
        return None
    try:
        if flavor == "xgboost" and conf.get("model_format") in ("json", "ubj") \
                and model_class in _XGBOOST:
            import xgboost

            model = getattr(xgboost, _XGBOOST[model_class])()
            model.load_model(str(path))
            return model
        if flavor == "lightgbm" and model_class == "lightgbm.basic.Booster":
            import lightgbm

            return lightgbm.Booster(model_file=str(path))
        if flavor == "onnx":
            import onnx
            from onnx.external_data_helper import _get_all_tensors, uses_external_data

            # External data would be read from paths the file names: kept as files.
            # Every tensor onnx.load would fill, not only the graph's initializers: a
            # node's attribute or a subgraph's may name it too.
            model = onnx.load(str(path), load_external_data=False)
            if any(uses_external_data(t) for t in _get_all_tensors(model)):
                return None
            return model
    except ImportError:
        warnings.warn(f"{what}: a {flavor} model, kept as files ({flavor} is not installed)",
                      stacklevel=6)
    except Exception as exc:  # whatever the framework's reader raises on a bad file
        warnings.warn(f"{what}: its {flavor} model could not be read ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); kept as files", stacklevel=6)
    return None
