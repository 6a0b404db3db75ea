"""docs/format.md and docs/remote.md are the specification, and their code blocks marked
``<!-- spec:run -->`` are a reader written from it. These tests take the blocks out of the
documents and run them (the Python ones in one namespace, in document order; the shell
one with bash, where the sqlite3 and zstd commands are installed) against the fixture
vaults of formats 3 to 6, a format-7 vault made here with every kind of version, and
a remote pushed to; what they read must be what modelvault's own load gives (bit for bit
for arrays, tensors and files). So the documents cannot drift from the code. The DDL
blocks (``<!-- spec:ddl N -->``) must be each format's schema exactly, and the limits,
tables and names the reader writes down must be modelvault's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import modelvault

ROOT = Path(__file__).resolve().parent.parent
FORMAT = ROOT / "docs" / "format.md"
REMOTE = ROOT / "docs" / "remote.md"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def marked(path: Path, lang: str, mark: str = "<!-- spec:run -->") -> list[str]:
    """The code of the ``lang`` blocks right after ``mark`` lines, in document order."""
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"^{re.escape(mark)}\n```{lang}\n(.*?)\n```$", text, re.S | re.M)


def run_blocks(path: Path, namespace: dict) -> dict:
    for code in marked(path, "python"):
        exec(compile(code, str(path), "exec"), namespace)  # the spec's own reader
    return namespace


@pytest.fixture(scope="module")
def spec() -> dict:
    """The reference reader of docs/format.md (its marked Python blocks, run)."""
    return run_blocks(FORMAT, {"__name__": "format_md"})


@pytest.fixture(scope="module")
def remote_spec(spec) -> dict:
    """docs/format.md's reader with docs/remote.md's blocks run on top."""
    return run_blocks(REMOTE, dict(spec))


# -- comparing what the spec reads with what modelvault loads ----------------------------


def tensor_bits(tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(__import__("torch").uint8).numpy()) if flat.numel() else b""


def identical(mine, theirs, where="object") -> None:
    """Assert that ``mine`` (the spec reader's) is ``theirs`` (modelvault's): same types,
    same bits of every array and tensor, same views of shared storages."""
    torch = sys.modules.get("torch")
    assert type(mine) is type(theirs), f"{where}: {type(mine)} is not {type(theirs)}"
    if isinstance(theirs, np.ndarray):
        assert (mine.dtype, mine.shape, mine.flags.f_contiguous) == (
            theirs.dtype, theirs.shape, theirs.flags.f_contiguous), where
        assert mine.tobytes("A") == theirs.tobytes("A"), where
    elif isinstance(theirs, np.generic):
        assert mine.dtype == theirs.dtype and mine.tobytes() == theirs.tobytes(), where
    elif torch is not None and isinstance(theirs, torch.Tensor):
        assert (mine.dtype, mine.shape, mine.stride(), mine.storage_offset(),
                mine.requires_grad) == (theirs.dtype, theirs.shape, theirs.stride(),
                                        theirs.storage_offset(), theirs.requires_grad), where
        assert tensor_bits(mine) == tensor_bits(theirs), where
    elif isinstance(theirs, dict):
        assert list(mine) == list(theirs), where
        assert getattr(mine, "_metadata", None) == getattr(theirs, "_metadata", None), where
        for key in theirs:
            identical(mine[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            identical(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        assert repr(mine) == repr(theirs), where
    elif isinstance(theirs, (str, bytes, int, bool, type(None), set, frozenset)):
        assert mine == theirs, where
    elif type(theirs).__module__.startswith("xgboost"):
        booster = [m if type(m).__name__ == "Booster" else m.get_booster()
                   for m in (mine, theirs)]
        assert booster[0].save_raw() == booster[1].save_raw(), where
    elif type(theirs).__module__.startswith("lightgbm"):
        boosters = [m if type(m).__name__ == "Booster" else m.booster_ for m in (mine, theirs)]
        assert boosters[0].model_to_string() == boosters[1].model_to_string(), where
        if hasattr(theirs, "get_params"):
            identical(mine.predict_proba(np.ones((2, 4))), theirs.predict_proba(np.ones((2, 4))))
    elif type(theirs).__module__.startswith("onnx"):
        assert mine.SerializeToString() == theirs.SerializeToString(), where
    elif callable(getattr(theirs, "state_dict", None)):  # a torch module
        identical(mine.state_dict(), theirs.state_dict(), f"{where}.state_dict()")
    else:
        assert pickle.dumps(mine, 5) == pickle.dumps(theirs, 5), where
    if torch is not None:
        assert shared_storages(mine) == shared_storages(theirs), where


def shared_storages(obj) -> list[list[str]]:
    """Which of ``obj``'s tensors (by path) share a storage."""
    torch = sys.modules["torch"]
    found: dict[int, list[str]] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            if node.untyped_storage().nbytes():
                found.setdefault(node.untyped_storage().data_ptr(), []).append(path)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}.{i}")

    walk(obj, "")
    return sorted(paths for paths in found.values() if len(paths) > 1)


def versions_of(path: Path) -> list[tuple[str, int, str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT m.name, v.version, v.kind FROM versions v JOIN models m "
                          "ON m.id = v.model_id ORDER BY m.name, v.version").fetchall()


def keys_of(spec, *key_files: Path) -> dict:
    return dict(spec["read_key_file"](path.read_text()) for path in key_files)


def check_example(spec, path: Path, name: str, keys: dict) -> None:
    """The spec's example of ``name``: its input, asked of the model modelvault loads by
    the method the layout names, gives its saved output (and modelvault's selftest of
    the same version passes)."""
    with modelvault.open(path, readonly=True) as vault:
        assert vault.selftest(name, trust=True).passed
        model = vault.load(name, trust=True)
    saved = spec["load"](path, name, keys=keys, example=True)
    assert set(saved) == {"input", "output"}
    with contextlib.closing(spec["open_vault"](path)) as db:
        version = spec["find_version"](db, name)
    method = spec["split_layout"](json.loads(version["layout"]))[1]["method"]
    function = model if method == "__call__" else getattr(model, method)
    answer = function(saved["input"])
    if isinstance(answer, dict):
        identical(saved["output"], answer, f"{name} example")
    else:
        np.testing.assert_allclose(saved["output"], answer, rtol=1e-5, atol=1e-8)


# -- the format-7 vault and the remote ----------------------------------------------------


def describe(frame):
    """A model of a plain function (pickled by reference), asked a DataFrame example."""
    return {"rows": np.array(len(frame)), "columns": np.array([str(c) for c in frame.columns])}


def make_vault(path: Path) -> list[str]:
    """Save a version of every kind into ``path``; returns what is not covered here."""
    skipped = []
    rng = np.random.default_rng(6)
    titled = np.dtype([("a", "<f4"), ("b", "<i2", (2,)), (("Temperature", "t"), "<f4")])
    records = np.zeros(1000, dtype=titled)
    records["a"] = rng.normal(size=1000)
    weights = rng.normal(size=700_000).astype(np.float32)
    arrays = {
        "weights": weights,
        "ids": np.arange(-500, 500, dtype=np.int64),
        "matrix": np.asfortranarray(rng.normal(size=(30, 7))),
        "big_endian": np.arange(5, dtype=">f8"),
        "words": np.array(["ab", "cde"]),
        "times": np.array(["2026-01-01T00:00"], dtype="<M8[ns]"),
        "zero_d": np.array(2.5),
        "scalar": np.float64(0.25),
        "records": records,
        "empty": np.zeros((0, 3), dtype=np.float32),
        "config": {"layers": [64, 32], "name": "net", "flag": True, "x": None,
                   "pair": (1, "two"), "nan": float("nan"), "inf": float("-inf")},
    }
    folder = path.parent / "model"
    (folder / "tokenizer").mkdir(parents=True)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta"])
    (folder / "config.json").write_text('{"dim": 384, "name": "mini\u00e9"}')
    (folder / "tokenizer" / "vocab.txt").write_bytes(" ".join(rng.choice(words, 80_000)).encode())
    (folder / "empty.txt").write_bytes(b"")
    tensors = {"embed": rng.normal(size=(600, 512)).astype(np.float32),
               "bias": rng.normal(size=100).astype(np.float16)}
    save_file(tensors, folder / "model.safetensors")
    with modelvault.open(path) as vault:
        vault.save("arrays", arrays, aliases=["production"], tags={"stage": "base"},
                   metadata={"auc": 0.5}, description="every array kind")
        tuned = dict(arrays, weights=weights + np.float32(1e-6) * weights)
        vault.save("arrays", tuned)
        vault.save("pickle", {"set": {1, 2, 3}, "big": np.linspace(0, 1, 300_000),
                              "labels": ["a", "b"]})
        vault.save_files("files", folder)
        tensors["embed"][:5] += 1e-3
        save_file(tensors, folder / "model.safetensors")
        vault.save_files("files", folder)
        try:
            import ml_dtypes

            vault.save("named", {"bf16": np.arange(12, dtype=ml_dtypes.bfloat16).reshape(3, 4),
                                 "f8": np.ones(5, dtype=ml_dtypes.float8_e4m3fn),
                                 "i4": np.arange(-3, 3, dtype=ml_dtypes.int4)})
        except ImportError:
            skipped.append("ml_dtypes")
        try:
            import torch
        except ImportError:
            skipped.append("torch")
        else:
            torch.manual_seed(6)
            base = torch.arange(20, dtype=torch.float32)
            linear = torch.nn.Linear(8, 4)
            vault.save("tensors", {
                "state": linear.state_dict(),
                "bf16": torch.randn(3, 5).to(torch.bfloat16),
                "f8": torch.ones(4).to(torch.float8_e5m2),
                "whole": base, "slice": base[2:7], "strided": base[::4],
                "param": torch.nn.Parameter(torch.ones(2, 2)),
                "grad": torch.zeros(3).requires_grad_(True),
                "steps": torch.tensor(12), "ints": torch.arange(6, dtype=torch.int16),
            })
            vault.save("module", torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
        from sklearn.linear_model import LogisticRegression

        X = rng.normal(size=(60, 4))
        clf = LogisticRegression().fit(X, (X[:, 0] > 0).astype(int))
        vault.save("clf", clf, example=X[:5])
        try:
            import pandas

            frame = pandas.DataFrame({"n": [1.0, 2.0], "mixed": [1, "a"], "s": ["x", "y"]})
            vault.save("frame", describe, example=frame)
        except ImportError:
            skipped.append("pandas")
        for name, make in FRAMEWORKS.items():
            try:
                model = make(X)
            except ImportError:
                skipped.append(name)
                continue
            vault.save(name, model)
    return skipped


def save_file(tensors: dict, path: Path) -> None:
    """A safetensors file (an 8-byte little-endian header length, the JSON header, the
    tensors' bytes), written without the safetensors package, which tests may lack."""
    header, offset = {}, 0
    for name, array in tensors.items():
        dtype = {"<f4": "F32", "<f2": "F16"}[array.dtype.str]
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text
                     + b"".join(a.tobytes() for a in tensors.values()))


def needs(spec, path: Path, name: str, number: int) -> str | None:
    """The package a version of the fixtures needs to be loaded, beyond the test extra's."""
    with contextlib.closing(spec["open_vault"](path)) as db:
        version = spec["find_version"](db, name, number)
    layout = json.loads(version["layout"])
    if version["kind"] == "framework":
        return spec["FRAMEWORK_PACKAGES"][layout["framework"]][0]
    if '"tensor":' in version["layout"] or '"storages":' in version["layout"]:
        return "torch"
    if any(p["dtype"] in spec["NAMED_DTYPES"] for p in version["parts"]):
        return "ml_dtypes"
    return None


def _xgboost(X):
    import xgboost

    return xgboost.XGBClassifier(n_estimators=3, max_depth=2).fit(X, (X[:, 1] > 0).astype(int))


def _lightgbm(X):
    import lightgbm

    return lightgbm.LGBMClassifier(n_estimators=3, min_child_samples=2, verbose=-1).fit(
        X, np.where(X[:, 1] > 0, "yes", "no"))


def _onnx(X):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    return helper.make_model(graph)


def _huggingface(X):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=8,
                                max_position_embeddings=16))


FRAMEWORKS = {"xgboost": _xgboost, "lightgbm": _lightgbm, "onnx": _onnx,
              "huggingface": _huggingface}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(vault path, its signing key's file, what was skipped, remote folder): a format-7
    vault with every kind, pushed whole to a file:// remote."""
    home = tmp_path_factory.mktemp("spec-home")
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse home comes later
        patch.setenv("MODELVAULT_HOME", str(home))
        path = tmp_path_factory.mktemp("spec") / "all.vault"
        skipped = make_vault(path)
        remote = path.parent / "remote"
        with modelvault.open(path) as vault:
            vault.push(f"file://{remote}")
    return path, home / "private.key", skipped, remote


def fixture_copy(tmp_path: Path, fmt: int) -> Path:
    path = tmp_path / f"format{fmt}.vault"
    shutil.copy(FIXTURES / f"format{fmt}.vault", path)
    return path


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [3, 4, 5, 6, 7])
def test_the_ddl_blocks_are_each_formats_schema(tmp_path, fmt):
    ddl = {int(n): code for n, code in re.findall(
        r"^<!-- spec:ddl (\d) -->\n```sql\n(.*?)\n```$",
        FORMAT.read_text(encoding="utf-8"), re.S | re.M)}
    assert sorted(ddl) == [3, 5, 6, 7]
    if fmt == 7:
        path = tmp_path / "new.vault"
        modelvault.open(path).close()
    else:
        path = fixture_copy(tmp_path, fmt)

    def schema(db):
        return {name: (kind, " ".join(str(sql).split())) for kind, name, sql in db.execute(
            "SELECT type, name, sql FROM sqlite_master") if not name.startswith("sqlite_stat")}

    expected = sqlite3.connect(":memory:")
    for version, code in sorted(ddl.items()):
        if version <= fmt:
            expected.executescript(code)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == fmt
        assert schema(db) == schema(expected)


def test_the_readers_tables_and_limits_are_modelvaults(spec):
    from modelvault import _chunks, _frameworks, _json, _packs, _serialize

    assert (spec["MAX_PACK"], spec["MAX_CHUNK"], spec["MAX_CHAIN"]) == (
        _chunks.MAX_PACK, _chunks.MAX_CHUNK, _packs.MAX_CHAIN)
    assert spec["CODE_FREE"] == _frameworks._SAFE_SUFFIXES
    assert {name: roots for name, (_, _, roots) in _frameworks.HANDLERS.items()} == spec[
        "FRAMEWORK_PACKAGES"]
    deep = "[" * _json.MAX_DEPTH + "]" * _json.MAX_DEPTH
    assert spec["load_json"](deep) == _json.loads(deep)
    with pytest.raises(ValueError):
        spec["load_json"]("[" + deep + "]")
    with pytest.raises(ValueError):
        spec["load_json"]('{"a": 1, "a": 2}')
    named, of_descr = spec["NAMED_DTYPES"], spec["TORCH_OF_DESCR"]
    assert not named.keys() & of_descr.keys()
    assert {ml for _, ml, _ in named.values() if ml} == _serialize.ML_DTYPES
    text = " ".join(FORMAT.read_text(encoding="utf-8").split())
    assert "The chunk codecs are `raw`, `zstd` and `zstd-shuffle`" in text
    assert "The pack codecs are `raw` and `zstd`" in text
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name, (itemsize, ml, _) in named.items():
        if ml is not None:
            assert np.dtype(getattr(ml_dtypes, ml)).itemsize == itemsize, name
    torch = pytest.importorskip("torch")
    from modelvault import _torch

    for name, dtype in _torch._dtypes().items():  # every name modelvault writes, this torch
        assert name in named or name in of_descr, name
        assert spec["torch_dtype"](name) is dtype, name
        if name in named:
            assert named[name][0] == dtype.itemsize, name
    del torch


@pytest.mark.parametrize("fmt", [3, 4, 5, 6])
def test_the_spec_reads_every_version_of_the_old_formats(spec, tmp_path, fmt):
    path = fixture_copy(tmp_path, fmt)
    keys = keys_of(spec, FIXTURES / f"format{fmt}.key")
    found = versions_of(path)
    assert {kind for _, _, kind in found} >= {"arrays", "pickle", "files"}
    with modelvault.open(path, readonly=True) as vault:
        for name, number, kind in found:
            package = needs(spec, path, name, number)
            if package is not None and importlib.util.find_spec(package) is None:
                continue  # this kind is covered where its package is installed
            mine = spec["load"](path, name, number, keys=keys)
            identical(mine, vault.load(f"{name}:{number}", trust=True), f"{name}:{number}")
            with contextlib.closing(spec["open_vault"](path)) as db:
                version = spec["find_version"](db, name, number)
            assert spec["signature_status"](version, keys) == "trusted"
            assert spec["signature_status"](version, {}) == "untrusted"
            if kind == "pickle":
                with pytest.raises(PermissionError):
                    spec["load"](path, name, number)
        if needs(spec, path, "net", 2) is None or importlib.util.find_spec("torch"):
            identical(spec["load"](path, "net", keys=keys), vault.load("net", trust=True))
            identical(spec["load"](path, "net", alias="production", keys=keys),
                      vault.load("net@production", trust=True))
    if fmt >= 5:
        check_example(spec, path, "clf", keys)


def test_the_spec_reads_every_kind_of_the_current_format(spec, made):
    path, key, skipped, _ = made
    keys = keys_of(spec, key)
    found = versions_of(path)
    kinds = {kind for _, _, kind in found}
    assert kinds >= {"arrays", "pickle", "files"}
    assert "framework" in kinds or {"xgboost", "lightgbm", "onnx", "huggingface"} <= set(skipped)
    with modelvault.open(path, readonly=True) as vault:
        for name, number, _ in found:
            mine = spec["load"](path, name, number, keys=keys)
            identical(mine, vault.load(f"{name}:{number}", trust=True), f"{name}:{number}")
        identical(spec["load"](path, "arrays", alias="production", keys=keys),
                  vault.load("arrays@production"))
    with contextlib.closing(sqlite3.connect(path)) as db:
        # What the spec's delta and shuffle code ran on: array deltas, and the tensors of
        # the second safetensors file as shuffled deltas of the first one's.
        deltas = db.execute(
            "SELECT m.name, p.kind, c.codec FROM chunks c JOIN part_chunks pc ON "
            "pc.chunk_id = c.id JOIN parts p ON p.version_id = pc.version_id AND p.part = "
            "pc.part JOIN versions v ON v.id = p.version_id JOIN models m ON m.id = "
            "v.model_id WHERE c.base_id IS NOT NULL").fetchall()
        assert ("arrays", "array", "zstd-shuffle") in deltas
        assert ("files", "file", "zstd-shuffle") in deltas
        packs = {codec for (codec,) in db.execute("SELECT codec FROM packs")}
        assert packs == {"raw", "zstd"}
    check_example(spec, path, "clf", keys)
    if "pandas" not in skipped:
        saved = spec["load"](path, "frame", keys=keys, example=True)
        assert list(saved["input"].columns) == ["n", "mixed", "s"]
        assert saved["input"]["mixed"].tolist() == [1, "a"]
        check_example(spec, path, "frame", keys)


def test_the_spec_refuses_what_a_reader_must_refuse(spec, made, tmp_path):
    path, key, _, _ = made
    keys = keys_of(spec, key)
    with pytest.raises(PermissionError):
        spec["load"](path, "pickle")  # no trusted key: it runs code
    assert spec["load"](path, "pickle", trust=True)["set"] == {1, 2, 3}
    with pytest.raises(ValueError, match="no example"):
        spec["load"](path, "pickle", keys=keys, example=True)
    edited = tmp_path / "edited.vault"
    shutil.copy(path, edited)
    with contextlib.closing(sqlite3.connect(edited)) as db, db:
        db.execute("UPDATE versions SET description = 'changed' WHERE id = "
                   "(SELECT v.id FROM versions v JOIN models m ON m.id = v.model_id "
                   "WHERE m.name = 'pickle')")
        pack, start = db.execute(
            "SELECT c.pack_id, c.start FROM chunks c JOIN packs p ON p.id = c.pack_id "
            "WHERE p.codec = 'raw' AND c.length > 100 LIMIT 1").fetchone()
        data = bytearray(db.execute("SELECT data FROM packs WHERE id = ?", (pack,)).fetchone()[0])
        data[start + 50] ^= 0xFF
        db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(data), pack))
    with pytest.raises(ValueError, match="signature"):
        spec["load"](edited, "pickle", keys=keys)
    damaged = 0
    for name, number, _ in versions_of(edited):
        try:
            spec["load"](edited, name, number, trust=True)
        except ValueError as exc:
            damaged += "damaged" in str(exc)
    assert damaged >= 1


def test_the_spec_reads_a_pushed_remote(remote_spec, made):
    path, key, _, remote = made
    keys = keys_of(remote_spec, key)
    assert (remote / "modelvault-remote.json").read_bytes() == (
        b'{"format":"modelvault-remote","hash":"blake3","version":1}')
    listed = modelvault.Remote(f"file://{remote}").versions()
    get, listing = remote_spec["folder_remote"](remote)
    state = remote_spec["remote_state"](get, listing)
    assert {(r.name, r.version, r.id, r.aliases, tuple(sorted(r.tags.items())))
            for r in listed} == {
        (e["model"], e["number"], u,
         tuple(sorted(a for a, t in state["aliases"].get(e["model"], {}).items() if t == u)),
         tuple(sorted(e["tags"].items()))) for u, e in state["versions"].items()}
    with modelvault.open(path, readonly=True) as vault:
        for record in listed:
            mine = remote_spec["remote_load"](remote, record.name, record.version, keys=keys)
            identical(mine, vault.load(f"{record.name}:{record.version}", trust=True),
                      f"{record.name}:{record.version}")
    saved = remote_spec["remote_load"](remote, "clf", keys=keys, example=True)
    identical(saved, remote_spec["load"](path, "clf", keys=keys, example=True))
    for key_name in listing("packs/"):  # each pack object's name is as remote.md says
        if key_name.endswith(".idx"):
            index = json.loads(get(key_name))
            name = key_name[len("packs/"):-len(".idx")]
            assert get(key_name) == json.dumps(index, sort_keys=True,
                                               separators=(",", ":")).encode()
            described = json.dumps({"blobs": index["blobs"], "chunks": index["chunks"]},
                                   sort_keys=True, separators=(",", ":")).encode()
            import blake3

            assert blake3.blake3(get(f"packs/{name}.pack") + described).hexdigest() == name
    manifest = json.loads(get(f"versions/{listed[0].id}.json"))
    for text in (manifest["version"]["layout"], manifest["version"]["metadata"],
                 manifest["environment"], *(p["shape"] for p in manifest["parts"]
                                            if p["shape"] is not None)):
        assert isinstance(text, str) and isinstance(json.loads(text), (dict, list))
    entry = json.loads(get("log/000000000001.json"))
    assert re.fullmatch(r"[^@]+@.+", entry["by"]) and remote_spec["TIMESTAMP"].fullmatch(
        entry["at"])


def test_a_checkpoint_and_a_repush_after_a_delete_replay_as_modelvault_says(
        remote_spec, tmp_path):
    url = f"file://{tmp_path / 'remote'}"
    with modelvault.open(tmp_path / "v.vault") as vault:
        vault.save("m", np.arange(10.0))
        vault.save("m", np.arange(11.0))
        vault.push(url)
        remote = modelvault.Remote(url)
        gone = remote.delete("m:1")
        vault.push(url)  # nothing named: a version deleted there is not sent again
        assert [r.version for r in modelvault.Remote(url).versions()] == [2]
        get, listing = remote_spec["folder_remote"](tmp_path / "remote")
        state = remote_spec["remote_state"](get, listing)
        assert state["deleted"] == {gone.id} and gone.id not in state["versions"]
        vault.push(url, ["m:1"])  # named: pushed again, under a new number
        state = remote_spec["remote_state"](get, listing)
        assert state["deleted"] == set() and state["versions"][gone.id]["number"] == 3
        for step in range(100 - state["seq"]):  # an entry each: up to entry 100
            vault.tag("m:2", step=str(step))
            vault.push(url, ["m:2"])
    assert listing("checkpoints/") == ["checkpoints/000000000100.json"]
    from_checkpoint = remote_spec["remote_state"](get, listing)
    from_log = remote_spec["remote_state"](get, lambda prefix: [])
    assert from_checkpoint == from_log and from_log["seq"] == 100
    point = json.loads(get("checkpoints/000000000100.json"))
    assert point["deleted"] == [] and set(point) == {"aliases", "deleted", "last", "seq",
                                                     "versions"}
    assert all(set(v) == {"created_at", "digest", "kind", "model", "number", "size", "tags"}
               for v in point["versions"].values())
    records = {(r.name, r.version, r.id, tuple(sorted(r.tags.items())))
               for r in modelvault.Remote(url).versions()}
    assert records == {(e["model"], e["number"], u, tuple(sorted(e["tags"].items())))
                       for u, e in from_log["versions"].items()}


def shell_parts(spec, path: Path) -> list[tuple[str, int, int, bool]]:
    """(model, version, part, readable by sqlite3 and zstd) of every file and pickle part."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [(name, number, part, not shuffled) for name, number, part, shuffled in
                db.execute(
                    "SELECT m.name, v.version, p.part, EXISTS (SELECT 1 FROM part_chunks pc "
                    "JOIN chunks c ON c.id = pc.chunk_id WHERE pc.version_id = v.id AND "
                    "pc.part = p.part AND (c.base_id IS NOT NULL OR c.codec NOT IN "
                    "('raw', 'zstd'))) FROM parts p JOIN versions v ON v.id = p.version_id "
                    "JOIN models m ON m.id = v.model_id WHERE p.kind IN ('file', 'pickle')")]


@pytest.mark.parametrize("fmt", [3, 4, 5, 6, 7])
def test_the_shell_recipe_reads_files_and_pickle_streams(spec, made, tmp_path, fmt):
    missing = [tool for tool in ("sqlite3", "zstd", "bash") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} command here (apt-get install sqlite3 zstd)")
    (recipe,) = marked(FORMAT, "sh")
    path = made[0] if fmt == 7 else fixture_copy(tmp_path, fmt)
    parts = shell_parts(spec, path)
    assert any(readable for *_, readable in parts)
    with contextlib.closing(spec["open_vault"](path)) as db:
        lookup = spec["vault_lookup"](db)
        for name, number, part, readable in parts:
            env = {**os.environ, "VAULT": str(path), "MODEL": name, "VERSION": str(number),
                   "PART": str(part)}
            done = subprocess.run(["bash", "-c", recipe], env=env, capture_output=True,
                                  check=False)
            if not readable:
                assert done.returncode != 0 and b"cannot read" in done.stderr
                continue
            assert done.returncode == 0, done.stderr
            version = spec["find_version"](db, name, number)
            assert done.stdout == spec["part_bytes"](lookup, version["parts"][part])
