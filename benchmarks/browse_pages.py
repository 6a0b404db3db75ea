"""Every page `modelvault browse` lists, on a vault of 1 GB of weights (0.85 GB stored),
timed with Datasette's in-process client (medians of 3): issue #12's "every page under a
second". Needs the browse extra. Run alone:
``python -m benchmarks.browse_pages DIR`` (DIR keeps the vault between runs)."""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import modelvault
from modelvault import _browse


def big_vault(folder: Path) -> Path:
    """20 models x 10 tensors of 1.25 M fp32 (1 GB raw), and 300 small versions."""
    path = folder / "big.vault"
    if not path.exists():
        rng = np.random.default_rng(0)
        with modelvault.open(path) as vault:
            for i in range(20):
                vault.save(f"model-{i:02d}", {
                    f"layer{j}": (rng.standard_normal(1_250_000) * 0.02).astype(np.float32)
                    for j in range(10)}, tags={"i": str(i)})
            for i in range(300):
                vault.save("small", {"w": np.full(100, float(i))})
    return path


def pages(path: Path) -> list[str]:
    """The index, the database, every table and view sorted as a browser would, and
    every canned query."""
    name = _browse.database_name(path)
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        objects = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")]
    finally:
        db.close()
    return (["/", f"/{name}"] + [f"/{name}/{o}" for o in objects]
            + [f"/{name}/packs?_sort_desc=size", f"/{name}/pack_sizes?_sort_desc=stored",
               f"/{name}/chunks?_sort_desc=size", f"/{name}/versions.json?_labels=on",
               f"/{name}/versions_by_package?package=numpy&version=2"]
            + [f"/{name}/{q}" for q in _browse.QUERIES if q != "versions_by_package"]
            + [f"/{name}/not_signed_by_a_trusted_key"])


async def time_pages(path: Path) -> None:
    ds = _browse.datasette(path)
    await ds.invoke_startup()
    slowest = 0.0
    for page in pages(path):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            response = await ds.client.get(page)
            times.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise SystemExit(f"{page}: HTTP {response.status_code}")
        seconds = statistics.median(times)
        slowest = max(slowest, seconds)
        print(f"{seconds * 1e3:8.1f} ms  {len(response.content) / 1e3:8.1f} kB  {page}")
    print(f"slowest page: {slowest * 1e3:.0f} ms")


def main() -> None:
    folder = Path(sys.argv[1])
    folder.mkdir(exist_ok=True)
    path = big_vault(folder)
    print(f"vault: {path.stat().st_size / 1e9:.2f} GB")
    asyncio.run(time_pages(path))


if __name__ == "__main__":
    main()
