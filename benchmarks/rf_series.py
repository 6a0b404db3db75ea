"""Issue #2's storage targets: a warm-started RandomForest saved as 10 versions.

    python benchmarks/rf_series.py [--versions 10]

Trains RandomForestClassifier(200 trees) on make_classification(10000 x 40),
warm-starts it to 245 trees in 5-tree steps, saves each of the 10 forests into
one fresh vault, and prints the vault size next to what those versions weigh as
separate joblib files and as gzip-9 archives (what modelstore stores). Then it
re-saves the unchanged last model and prints the bytes that added to the file.
Sizes are exact; times are medians and only indicative (2 shared cores).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import joblib
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

import modelvault


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("MODELVAULT_HOME", tempfile.mkdtemp(prefix="modelvault-home-"))
    X, y = make_classification(n_samples=10000, n_features=40, random_state=0)
    forest = RandomForestClassifier(n_estimators=200, warm_start=True, random_state=0, n_jobs=-1)
    joblib_bytes = gzip_bytes = 0
    save_times = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "models.vault"
        with modelvault.open(path) as vault:
            for i in range(args.versions):
                forest.n_estimators = 200 + 5 * i
                forest.fit(X, y)
                buffer = io.BytesIO()
                joblib.dump(forest, buffer)
                joblib_bytes += buffer.tell()
                gzip_bytes += len(gzip.compress(buffer.getvalue(), compresslevel=9))
                start = time.perf_counter()
                mv = vault.save("forest", forest, metadata={"trees": forest.n_estimators})
                save_times.append(time.perf_counter() - start)
                print(f"v{mv.version}: {forest.n_estimators} trees, raw {mv.size / 1e6:.1f} MB, "
                      f"added {mv.added_bytes / 1e6:.2f} MB, {save_times[-1]:.2f} s")
            before = path.stat().st_size
            again = vault.save("forest", forest)
            start = time.perf_counter()
            vault.load("forest")
            load_time = time.perf_counter() - start
        after = path.stat().st_size
        print()
        print(f"{args.versions} versions as joblib files:  {joblib_bytes / 1e6:8.1f} MB")
        print(f"{args.versions} versions as gzip-9 archives: {gzip_bytes / 1e6:8.1f} MB  "
              "(modelstore's layout)")
        print(f"{args.versions} versions in one vault:       {before / 1e6:8.1f} MB  "
              "(target <= 9 MB)")
        print(f"re-save of the unchanged model: chunk bytes added {again.added_bytes} B, "
              f"file grew {after - before} B = {100 * (after - before) / again.size:.3f} % "
              f"of its {again.size / 1e6:.1f} MB (target < 1 %)")
        print(f"median save {statistics.median(save_times):.2f} s, load {load_time:.2f} s")


if __name__ == "__main__":
    main()
