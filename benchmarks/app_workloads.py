"""W10: an app update, against an S3 server (moto's) started on 127.0.0.1 for the run.

A trainer's vault saves a fine-tune of a MiniLM-sized model, moves ``@production`` to it
and pushes; the app's vault follows ``@production`` through ``modelvault.follow``, which
pulls and swaps. Timed: from the alias move to the app serving the new version (the
handle's ``refresh()``, so the figure leaves out the wait for the next poll, which is
``every`` at most). The baseline is an app that fetches whole files: the trainer puts
the model's safetensors file with obstore, the app gets it and loads it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import modelvault

from . import models
from .remote_workloads import _Counted, _Moto
from .report import MB, Section, Target, ratio
from .timing import median
from .workloads import Context, open_vault


def _fine_tunes(base: dict[str, np.ndarray], layers: int, kind: str, seed: int
                ) -> dict[str, np.ndarray]:
    """A fine-tune of ``base``: every weight nudged (full), or the last layer and the
    pooler retrained (last)."""
    rng = np.random.default_rng(seed)
    if kind == "full":
        return {k: (w + models.normal(rng, w.shape, std=0.00002)).astype(w.dtype)
                for k, w in base.items()}
    last = (f"encoder.layer.{layers - 1}.", "pooler.")
    return {k: (models.normal(rng, w.shape).astype(w.dtype) if k.startswith(last) else w)
            for k, w in base.items()}


def w10_app_update(ctx: Context) -> Section:
    """An app following @production through a remote: latency and bytes per update."""
    section = Section("W10", "app update: trainer moves @production and pushes, the app "
                             "follows it through `modelvault.follow` (moto S3 on 127.0.0.1), "
                             "against obstore put + get + load of the whole safetensors file")
    if not all(ctx.peer(section, m, "W10") for m in ("obstore", "moto", "safetensors")):
        return section
    import obstore
    from obstore.store import from_url
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    shape = ctx.sizes.minilm
    base, what = models.minilm_fp32(shape)
    base = {k: np.ascontiguousarray(w) for k, w in base.items()}
    raw = models.nbytes(base)
    work = ctx.workdir("w10")
    runs = max(ctx.runs, 3)
    print(f"  W10: app updates of MiniLM ({what}, {raw / MB:.0f} MB), {runs} runs each",
          flush=True)
    with _Moto() as moto:
        url = moto.bucket()
        trainer_path, app_path = work / "trainer.vault", work / "app.vault"
        with open_vault(trainer_path) as trainer:
            trainer.save("minilm", base, aliases=["production"])
            trainer.push(url, endpoint_url=moto.endpoint)
        modelvault.clone(url, app_path, ["minilm@production"],
                         endpoint_url=moto.endpoint).close()
        # Polls far apart: the benchmark drives the handle with refresh().
        live = modelvault.follow(app_path, "minilm@production", remote=url, every=3600.0,
                                 endpoint_url=moto.endpoint)
        try:
            for kind, label in (("last", "last layer + pooler retrained"),
                                ("full", "full fine-tune (all weights + 0.1 % of their std)")):
                moves, serves, received = [], [], []
                for run in range(runs):
                    tuned = _fine_tunes(base, shape.layers, kind, seed=100 + run)
                    with open_vault(trainer_path) as trainer:
                        mv = trainer.save("minilm", tuned, parent="minilm@production")
                        started = time.perf_counter()
                        trainer.alias(mv, "production")
                        trainer.push(url, [mv.ref], endpoint_url=moto.endpoint)
                        pushed = time.perf_counter()
                    with _Counted() as counted:
                        swapped = live.refresh()
                    served = time.perf_counter()
                    if not swapped or live.version.id != mv.id:
                        raise RuntimeError(f"W10: the app did not swap to {mv.ref}")
                    moves.append(pushed - started)
                    serves.append(served - pushed)
                    received.append(counted.received)
                total = [a + b for a, b in zip(moves, serves, strict=True)]
                section.add(f"{label}: alias + push on the trainer", median(moves), "s",
                            runs=moves)
                section.add(f"{label}: pull + load + swap in the app (refresh)", median(serves),
                            "s", runs=serves)
                section.add(f"{label}: alias move to serving, total", median(total), "s",
                            runs=total)
                section.add(f"{label}: bytes downloaded per update", median(received), "B")
                _baseline(section, label, tuned, total, received, obstore, from_url, st_save,
                          st_load, moto, url)
        finally:
            live.close()
        moto.drop(url)
    return section


def _baseline(section: Section, label: str, tuned: dict[str, np.ndarray], total: list[float],
              received: list[float], obstore: Any, from_url: Any, st_save: Any, st_load: Any,
              moto: _Moto, url: str) -> None:
    """The whole-file app: the trainer puts the safetensors file, the app gets and loads
    it; timed as many times as the vault's update, side by side."""
    blob = st_save(tuned)
    store = from_url(url, client_options={"allow_http": True}, endpoint=moto.endpoint)
    times = []
    for run in range(len(total)):
        started = time.perf_counter()
        obstore.put(store, f"whole/{run}.safetensors", blob)
        st_load(obstore.get(store, f"whole/{run}.safetensors").bytes().to_bytes())
        times.append(time.perf_counter() - started)
    section.add(f"{label}: obstore put + get + safetensors load of the file", median(times),
                "s", runs=times)
    section.add(f"{label}: update latency, whole file / vault (higher: vault faster)",
                ratio(median(times), median(total)), "x")
    section.add(f"{label}: bytes downloaded per update / safetensors file",
                median(received) / len(blob), "x",
                target=Target("<=", 0.2 if label.startswith("last") else 0.8))
