"""The suite's child processes: ``python -m benchmarks.child TASK ARGS_JSON RESULT_PATH``.

Started by ``timing.run_child``, never by hand. Each task writes a JSON object of results
to RESULT_PATH. Peak memory needs a process of its own (a peak never goes down), and the
heavy peers are kept out of the suite's process.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any


def rss_now() -> int:
    """This process's resident set size now, in bytes."""
    try:
        import psutil
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def rss_peak() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux's ``ru_maxrss`` is no good here: exec() carries over the peak of the process it
    replaces, so a child started by a suite holding 1 GB of weights reports at least 1 GB.
    ``VmHWM`` in /proc/self/status counts only this program's own memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB elsewhere


def rss(tool: str, phase: str, path: str, shape: dict[str, int]) -> dict[str, Any]:
    """Peak RSS of one save or load of the W2 fp32 weights, above the baseline before it.

    The baseline is taken after the imports and, for a save, after building the model,
    which ``bert_like`` does without temporaries, so the build's own peak stays under it.
    """
    from . import peers
    from .models import BertShape, bert_like, nbytes

    if tool == "modelvault":
        import modelvault
    else:
        import safetensors.numpy  # noqa: F401  (imported before the baseline)
    if phase == "save":
        weights = bert_like(BertShape(**shape))
        baseline = rss_now()
        if tool == "modelvault":
            with modelvault.open(path, progress=False) as vault:
                vault.save("bert", weights)
        else:
            peers.safetensors_save(weights, Path(path))
    else:
        baseline = rss_now()
        if tool == "modelvault":
            with modelvault.open(path, progress=False) as vault:
                weights = vault.load("bert")
        else:
            weights = peers.safetensors_load(Path(path))
    return {"baseline": baseline, "peak": rss_peak(), "model_bytes": nbytes(weights)}


def main() -> None:
    from . import peers

    tasks = {
        "rss": rss,
        "modelstore": peers.modelstore_timings,
        "modelstore-series": peers.modelstore_series,
        "mlflow": peers.mlflow_timings,
    }
    task, args, result = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result.write_text(json.dumps(tasks[task](**args)))


if __name__ == "__main__":
    main()
