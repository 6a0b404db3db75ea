"""What modelvault is compared with: plain files, pickle, joblib, safetensors, modelstore, MLflow.

Each function does what a user of that tool would write. Plain files, pickle, joblib and
safetensors run in the suite's process; modelstore and MLflow run in child processes
(``benchmarks.child``), which keeps their imports, logging and memory out of the
measurements of everything else.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import pickle
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .timing import clear, tree_bytes

FOREST = "forest"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the physical baseline ------------------------------------------------------------------


def write_fsync(path: Path, buffers: Iterable[Any]) -> None:
    """Write the buffers to a new file and fsync it: the least a durable save can cost."""
    with open(path, "wb") as f:
        for buffer in buffers:
            f.write(buffer)
        f.flush()
        os.fsync(f.fileno())


def read_all(path: Path) -> bytes:
    """Read the whole file into memory: the least a load can cost."""
    return path.read_bytes()


# -- pickle and joblib ----------------------------------------------------------------------


def pickle_dump(obj: Any, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=5))


def pickle_load(path: Path) -> Any:
    return pickle.loads(path.read_bytes())


def joblib_dump(obj: Any, path: Path, compress: int) -> None:
    import joblib

    joblib.dump(obj, path, compress=compress)


def joblib_load(path: Path) -> Any:
    import joblib

    return joblib.load(path)


# -- safetensors ----------------------------------------------------------------------------


def safetensors_save(weights: dict[str, Any], path: Path,
                     metadata: dict[str, str] | None = None) -> None:
    """save_file, then fsync: modelvault commits durably, so the peer must too."""
    from safetensors.numpy import save_file

    save_file(weights, path, metadata=metadata)
    fsync(path)


def safetensors_load(path: Path) -> dict[str, Any]:
    """load_file copies every tensor out of its mmap into writable arrays of its own."""
    from safetensors.numpy import load_file

    return load_file(path)


# -- modelstore (file-system backend), run in a child process --------------------------------


def modelstore_timings(model_path: str, workdir: str, runs: int, warmup: int) -> dict[str, Any]:
    """Per run, in a fresh directory: create the store, upload the model, load it back."""
    import joblib
    from modelstore import ModelStore

    model = joblib.load(model_path)
    root = Path(workdir) / "modelstore"
    times: dict[str, list[float]] = {"create": [], "upload": [], "load": []}
    for round_number in range(warmup + runs):
        clear(root)
        gc.collect()
        start = time.perf_counter()
        store = ModelStore.from_file_system(root_directory=str(root), create_directory=True)
        created = time.perf_counter()
        meta = store.upload(FOREST, model=model)
        uploaded = time.perf_counter()
        gc.collect()
        loaded_at = time.perf_counter()
        loaded = store.load(FOREST, meta["model"]["model_id"])
        finished = time.perf_counter()
        if type(loaded) is not type(model):
            raise RuntimeError(f"modelstore loaded a {type(loaded).__name__}")
        if round_number >= warmup:
            times["create"].append(created - start)
            times["upload"].append(uploaded - created)
            times["load"].append(finished - loaded_at)
    return {**times, "stored_bytes": tree_bytes(root)}


def modelstore_series(model_paths: list[str], workdir: str) -> dict[str, Any]:
    """Upload each model as the next version of one domain; the store's total bytes."""
    import joblib
    from modelstore import ModelStore

    root = Path(workdir) / "modelstore-series"
    clear(root)
    store = ModelStore.from_file_system(root_directory=str(root), create_directory=True)
    for path in model_paths:
        store.upload(FOREST, model=joblib.load(path))
    return {"stored_bytes": tree_bytes(root)}


# -- MLflow with a SQLite tracking and registry store, run in a child process ----------------


def mlflow_timings(model_path: str, workdir: str, runs: int, warmup: int) -> dict[str, Any]:
    """Import, one-time DB creation, then per run: log_model + register, and load by alias.

    The registry is created once, as a team would; each run registers the next versions of
    the same model. Recent MLflow saves scikit-learn models with skops by default, and
    loading those needs every sklearn type listed as trusted; we save with cloudpickle,
    which is also what modelvault uses for a forest. Each run logs the model twice: as
    users get it by default, where MLflow infers the requirements by importing the model in
    a subprocess (seconds), and with ``pip_requirements`` given, which skips that.
    """
    # No network here, and nothing of ours should phone home.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    start = time.perf_counter()
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    imported = time.perf_counter() - start

    import joblib
    import sklearn

    model = joblib.load(model_path)
    root = Path(workdir) / "mlflow"
    clear(root)
    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    start = time.perf_counter()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment(FOREST, artifact_location=(root / "artifacts").as_uri())
    created = time.perf_counter() - start
    pinned = [f"scikit-learn=={sklearn.__version__}"]
    variants = {"log_register": {}, "log_register_pinned": {"pip_requirements": pinned}}
    times: dict[str, list[float]] = {"log_register": [], "log_register_pinned": [], "load": []}
    for round_number in range(warmup + runs):
        for variant, options in variants.items():
            gc.collect()
            start = time.perf_counter()
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.sklearn.log_model(model, name="model",
                                                serialization_format="cloudpickle",
                                                registered_model_name=FOREST, **options)
            if round_number >= warmup:
                times[variant].append(time.perf_counter() - start)
        client.set_registered_model_alias(FOREST, "champion", info.registered_model_version)
        gc.collect()
        start = time.perf_counter()
        loaded = mlflow.sklearn.load_model(f"models:/{FOREST}@champion")
        if round_number >= warmup:
            times["load"].append(time.perf_counter() - start)
        if type(loaded) is not type(model):
            raise RuntimeError(f"MLflow loaded a {type(loaded).__name__}")
    versions = len(variants) * (warmup + runs)
    return {"import": imported, "create_db": created, **times,
            "artifact_bytes": tree_bytes(root / "artifacts") / versions,
            "db_bytes": tree_bytes(root / "mlflow.db")}
