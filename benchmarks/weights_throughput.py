"""Save/load throughput on transformer-like fp32 weights, next to plain file I/O.

    python benchmarks/weights_throughput.py [--layers 20] [--runs 3]

Makes LAYERS float32 arrays of 768 x 3072 (normal, std 0.02; 9.4 MB each), then
per run: writes the same bytes to a plain file with fsync and reads them back
(the physical baseline), and saves them into a fresh vault and loads them back.
Prints medians over the runs and the ratios to the baseline measured in the
same run; only those ratios mean anything on shared, noisy cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import modelvault


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MODELVAULT_HOME", tempfile.mkdtemp(prefix="modelvault-home-"))
    rng = np.random.default_rng(0)
    weights = {f"layer{i}": rng.standard_normal((768, 3072), dtype=np.float32) * 0.02
               for i in range(args.layers)}
    raw = sum(a.nbytes for a in weights.values())
    blob = b"".join(a.tobytes() for a in weights.values())
    times: dict[str, list[float]] = {"write+fsync": [], "read": [], "save": [], "load": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            plain, vault_path = Path(tmp) / "plain.bin", Path(tmp) / "w.vault"
            for path in (plain, vault_path):
                path.unlink(missing_ok=True)
            start = time.perf_counter()
            with open(plain, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            times["write+fsync"].append(time.perf_counter() - start)
            start = time.perf_counter()
            plain.read_bytes()
            times["read"].append(time.perf_counter() - start)
            with modelvault.open(vault_path) as vault:
                start = time.perf_counter()
                vault.save("weights", weights)
                times["save"].append(time.perf_counter() - start)
                start = time.perf_counter()
                vault.load("weights")
                times["load"].append(time.perf_counter() - start)
            stored = vault_path.stat().st_size
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{raw / 1e6:.0f} MB of fp32 weights, medians of {args.runs} runs")
    for name in ("write+fsync", "save", "read", "load"):
        print(f"  {name:<12} {raw / 1e6 / median[name]:7.0f} MB/s")
    print(f"  save = {median['write+fsync'] / median['save']:.2f}x the throughput of a plain "
          f"write+fsync; load = {median['read'] / median['load']:.2f}x a plain read")
    print(f"  vault file = raw / {raw / stored:.3f}")


if __name__ == "__main__":
    main()
