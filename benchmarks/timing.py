"""How the suite times things: medians of interleaved runs after a warm-up, and child processes."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import REPO

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


_trim: Callable[[], Any] = int  # replaced by cold_allocations(); int() is a cheap no-op


def cold_allocations() -> str:
    """Before every timed op, hand the memory glibc keeps from earlier ops back to the OS.

    By default glibc keeps freed memory, so a load that runs after another one writes into
    memory that is already faulted in. On this VM that alone swings safetensors' load between
    1 and 6 GB/s depending on what ran before it. ``malloc_trim(0)`` before each op makes
    every op pay for its memory, as in a fresh process, whatever order the ops run in; within
    an op, glibc reuses memory as it does in any process. (Fixing glibc's mmap threshold
    instead, as an earlier version of this suite did, also made every temporary buffer of
    128 KiB or more a fresh mmap, which no process does and which cost modelvault's many
    1 MiB chunk buffers ~40 % of their speed.) Returns what was done, for the report.
    """
    global _trim
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return "default allocator (not glibc)"
    _trim = lambda: trim(0)  # noqa: E731
    return "glibc; malloc_trim(0) before every timed op"


@dataclass(frozen=True)
class Op:
    """One timed call; ``setup`` runs untimed before each call (e.g. to clear its directory)."""

    run: Callable[[], Any]
    setup: Callable[[], Any] | None = None


def measure(ops: dict[str, Op], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds taken by each op in each of ``runs`` rounds, after ``warmup`` discarded rounds.

    Each round calls every op once, in order (a, b, c, a, b, c, ...), so a slow spell of the
    shared machine hits all of them alike and the ratios between them stay meaningful.
    Results are dropped at once: holding a loaded model would skew the next op's timing.
    """
    times: dict[str, list[float]] = {name: [] for name in ops}
    for round_number in range(warmup + runs):
        gc.collect()  # here rather than inside an op; results are freed by refcount anyway
        for name, op in ops.items():
            if op.setup is not None:
                op.setup()
            _trim()
            start = time.perf_counter()
            op.run()
            elapsed = time.perf_counter() - start
            if round_number >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def clear(path: Path) -> None:
    """Remove a file or a directory tree, if present."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def tree_bytes(path: Path) -> int:
    """Bytes of all files under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child_env() -> dict[str, str]:
    """The environment for child processes: this checkout first on the import path, and
    bytecode caching on. A machine may set PYTHONDONTWRITEBYTECODE (this one does): then
    every process compiles this checkout's modules from source (~40 ms for modelvault),
    while the packages compared with it were byte-compiled by pip when installed, as
    modelvault is for its users."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class ChildFailed(RuntimeError):
    """A child process exited non-zero; the message ends with the tail of its log."""


def run_child(task: str, args: dict[str, Any], workdir: Path, label: str) -> dict[str, Any]:
    """Run ``python -m benchmarks.child TASK`` and return the JSON it wrote.

    The child's output (MLflow and modelstore log a lot) goes to ``workdir/LABEL.log``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result, log = workdir / f"{label}.json", workdir / f"{label}.log"
    command = [sys.executable, "-m", "benchmarks.child", task, json.dumps(args), str(result)]
    with open(log, "w") as out:
        process = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                 env=child_env(), stdin=subprocess.DEVNULL)
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise ChildFailed(f"{label} exited {process.returncode}: " + " / ".join(tail))
    return json.loads(result.read_text())
