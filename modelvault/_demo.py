"""`modelvault demo`: the main job in one command, on data scikit-learn ships with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(path: Path, echo: Callable[[str], None] = print) -> None:
    """Train a forest in three warm-started rounds, save each round, load the last back."""
    from . import Vault  # the front, from the package root once it is loaded

    try:
        from sklearn.datasets import load_breast_cancer
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the demo needs scikit-learn: pip install 'modelvault[demo]'") from exc

    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    forest = RandomForestClassifier(n_estimators=100, warm_start=True, random_state=0)
    echo(f"vault: {path}")
    with Vault(path) as vault:
        for trees in (100, 150, 200):
            forest.n_estimators = trees
            forest.fit(X_train, y_train)
            accuracy = float(forest.score(X_test, y_test))
            mv = vault.save("demo/cancer-forest", forest,
                            metadata={"trees": trees, "test_accuracy": round(accuracy, 4)},
                            tags={"dataset": "breast_cancer"}, aliases=["latest-trained"],
                            description=f"warm start to {trees} trees")
            echo(f"saved {mv.ref:<24} {trees} trees  accuracy {accuracy:.3f}  "
                 f"model {_mb(mv.size)}  added to vault {_mb(mv.added_bytes)}")
        again = vault.save("demo/cancer-forest", forest, description="same model again")
        echo(f"saved {again.ref:<24} unchanged model: added {again.added_bytes} bytes of chunks")
        stats = vault.stats()
        echo("")
        echo(f"{stats.versions} versions would take {_mb(stats.raw_bytes)} as separate files; "
             f"the vault file is {_mb(stats.file_bytes)} "
             f"({stats.dedup_ratio:.1f}x from dedup, {stats.compression_ratio:.1f}x from zstd)")
        model = vault.load("demo/cancer-forest@latest-trained")
        predicted = model.predict(X_test[:8])
        echo(f"loaded demo/cancer-forest@latest-trained: predicts {predicted.tolist()}")
        echo(f"                               true labels {y_test[:8].tolist()}")
        problems = vault.verify()
        echo(f"verify: {'ok' if not problems else problems}")
    echo("")
    echo(f"try: modelvault log {path} demo/cancer-forest")
