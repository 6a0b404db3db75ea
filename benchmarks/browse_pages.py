"""Every page `modelvault browse` lists, on a vault of 1 GB of weights (0.85 GB stored),
timed with Datasette's in-process client (medians of 3): issue #12's "every page under a
second". Needs the browse extra. Run alone:
``python -m benchmarks.browse_pages DIR`` (DIR keeps the vault between runs)."""
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import modelvault
from modelvault import _browse as b

d = Path(sys.argv[1])
d.mkdir(exist_ok=True)
p = d / "big.vault"
if not p.exists():
    rng = np.random.default_rng(0)
    with modelvault.open(p) as v:
        for i in range(20):  # 20 models x 50 MB of weights, partly compressible
            w = {f"layer{j}": (rng.standard_normal(1_250_000) * 0.02).astype(np.float32) for j in range(10)}
            v.save(f"model-{i:02d}", w, tags={"i": str(i)})
        for i in range(300):
            v.save("small", {"w": np.full(100, float(i))})
print("vault", p.stat().st_size / 1e9, "GB")
ds = b.datasette(p)
name = b.database_name(p)
pages = ["/", f"/{name}", f"/{name}/packs", f"/{name}/packs.json", f"/{name}/packs?_sort_desc=size",
         f"/{name}/pack_sizes?_sort_desc=stored", f"/{name}/chunks", f"/{name}/chunks?_sort_desc=size",
         f"/{name}/versions", f"/{name}/versions.json?_labels=on", f"/{name}/parts", f"/{name}/part_chunks",
         f"/{name}/model_versions", f"/{name}/model_summary", f"/{name}/environments", f"/{name}/packages",
         f"/{name}/lineage", f"/{name}/aliases", f"/{name}/tags", f"/{name}/models",
         f"/{name}/versions_by_package?package=numpy&version=2", f"/{name}/storage_per_model",
         f"/{name}/not_signed_by_a_trusted_key"]
async def go():
    await ds.invoke_startup()
    worst = 0
    for page in pages:
        times = []
        for _ in range(3):
            t = time.perf_counter(); r = await ds.client.get(page); times.append(time.perf_counter() - t)
            assert r.status_code == 200, (page, r.status_code, r.text[:300])
        m = statistics.median(times); worst = max(worst, m)
        print(f"{m*1e3:8.1f} ms  {len(r.content)/1e3:8.1f} kB  {page}")
    print(f"slowest page: {worst*1e3:.0f} ms")
asyncio.run(go())
