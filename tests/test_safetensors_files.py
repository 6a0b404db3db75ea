"""safetensors files inside files versions: cut tensor by tensor, delta-encoded against
the parent's file of the same path, and given back byte-identical."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sqlite3
import struct

import numpy as np
import pytest

import modelvault


def write_safetensors(path, tensors, *, metadata=None, pad=True):
    """A safetensors file as the format describes it (no library needed)."""
    header, offset, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = {"float32": "F32", "float16": "F16", "int64": "I64", "uint8": "U8",
                 "uint16": "BF16"}[array.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(seed, scale=0.0):
    rng = np.random.default_rng(seed)
    base = {f"layer{i}.weight": rng.normal(size=(384, 384)).astype(np.float32)
            for i in range(4)}
    base["embeddings"] = rng.normal(size=(2000, 64)).astype(np.float16)
    base["position_ids"] = np.arange(512, dtype=np.int64)
    base["bf16"] = rng.integers(0, 2**16, size=30_000, dtype=np.uint16)  # bf16 bits
    if scale:
        noise = np.random.default_rng(seed + 1)
        base = {k: (v + (noise.normal(size=v.shape) * scale).astype(v.dtype)
                    if v.dtype.kind == "f" else v) for k, v in base.items()}
    return base


@pytest.fixture
def checkpoints(tmp_path):
    """A base folder and a full fine-tune of it (every float changed a little)."""
    for name, scale in (("base", 0.0), ("tuned", 1e-3)):
        folder = tmp_path / name
        folder.mkdir()
        write_safetensors(folder / "model.safetensors", weights(0, scale),
                          metadata={"format": "pt"})
        (folder / "config.json").write_text('{"hidden": 384}')
    return tmp_path / "base", tmp_path / "tuned"


def test_each_tensor_is_its_own_run_of_numeric_chunks_and_comes_back_identical(
        vault, checkpoints, tmp_path):
    base, _ = checkpoints
    mv = vault.save_files("bert", base)
    written = vault.extract(mv, tmp_path / "out")
    assert {p.name: sha256(p) for p in written} == {
        p.name: sha256(p) for p in (base / "config.json", base / "model.safetensors")}
    with sqlite3.connect(vault.path) as db:
        codecs = [(r[0], r[1]) for r in db.execute(
            "SELECT c.codec, c.itemsize FROM part_chunks pc JOIN chunks c ON c.id = pc.chunk_id "
            "JOIN parts p ON p.version_id = pc.version_id AND p.part = pc.part "
            "WHERE p.name = 'model.safetensors' ORDER BY pc.seq")]
        layout = json.loads(db.execute("SELECT layout FROM versions").fetchone()[0])
    # The header first (raw, in a solid pack), then every float tensor byte-shuffled by
    # its own element size.
    assert codecs[0] == ("raw", 1)
    assert {("zstd-shuffle", 4), ("zstd-shuffle", 2)} <= set(codecs)
    runs = layout["tensors"][layout["files"].index("model.safetensors")]
    assert [r[0] for r in runs] == ["layer0.weight", "layer1.weight", "layer2.weight",
                                    "layer3.weight", "embeddings", "position_ids", "bf16"]
    assert layout["tensors"][layout["files"].index("config.json")] is None


def test_a_full_fine_tune_costs_what_its_state_dict_would(tmp_path, checkpoints):
    base, tuned = checkpoints
    size = (tuned / "model.safetensors").stat().st_size
    with modelvault.open(tmp_path / "files.vault") as vault:
        vault.save_files("bert", base)
        as_files = vault.save_files("bert", tuned).added_bytes
    with modelvault.open(tmp_path / "alone.vault") as vault:
        alone = vault.save_files("bert", tuned).added_bytes
    with modelvault.open(tmp_path / "arrays.vault") as vault:
        vault.save("bert", weights(0))
        as_arrays = vault.save("bert", weights(0, 1e-3)).added_bytes
    assert as_files < 0.75 * alone  # deltas against the parent's tensors
    assert as_files < 1.1 * as_arrays + 20_000  # what the same weights cost as arrays
    assert as_files < size


def test_deltas_follow_the_tensors_by_name_whatever_their_order_and_other_files(
        tmp_path, checkpoints):
    base, _ = checkpoints
    tuned = weights(0, 1e-3)
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    write_safetensors(reordered / "model.safetensors",
                      dict(reversed(list(tuned.items()))))
    (reordered / "extra.txt").write_text("a new file in front of nothing")
    with modelvault.open(tmp_path / "v.vault") as vault:
        vault.save_files("bert", base)
        moved = vault.save_files("bert", reordered)
        whole = vault.save_files("other", reordered, parent=False)
        assert moved.added_bytes < 0.75 * (reordered / "model.safetensors").stat().st_size
        assert whole.added_bytes == 0  # the same chunks as bert:2, whatever their encoding
        out = vault.extract("bert:2", tmp_path / "out")
        assert sha256(next(p for p in out if p.name == "model.safetensors")) == sha256(
            reordered / "model.safetensors")
        assert vault.verify() == []


@pytest.mark.parametrize("damage", ["header length too large", "header not JSON",
                                    "a gap between tensors", "offsets past the end",
                                    "not an object", "shape of strings", "empty file"])
def test_a_malformed_header_falls_back_to_plain_chunking(vault, tmp_path, damage):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.arange(100_000, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    if damage == "header length too large":
        data[:8] = struct.pack("<Q", 2**40)
    elif damage == "header not JSON":
        data[8] = ord("!")
    elif damage == "empty file":
        data = bytearray()
    else:
        if damage == "a gap between tensors":
            header["w"]["data_offsets"] = [8, 400_008]
        elif damage == "offsets past the end":
            header["w"]["data_offsets"] = [0, 900_000]
        elif damage == "not an object":
            header = [1, 2]
        elif damage == "shape of strings":
            header["w"]["shape"] = ["a"]
        text = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(text)) + text + data[8 + length:])
    path.write_bytes(bytes(data))
    mv = vault.save_files("odd", path)
    (written,) = vault.extract(mv, tmp_path / "out")
    assert written.read_bytes() == bytes(data)
    assert vault.verify() == []


def test_real_safetensors_files_round_trip(vault, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"a": np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32),
               "b": np.arange(7, dtype=np.int64), "empty": np.zeros((0, 3), np.float16)}
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"note": "x"})
    (written,) = vault.extract(vault.save_files("m", path), tmp_path / "out")
    assert sha256(written) == sha256(path)
    loaded = safetensors_numpy.load_file(str(written))
    for key, array in tensors.items():
        np.testing.assert_array_equal(loaded[key], array)


def test_keys_and_lazy_read_single_tensors_of_safetensors_files(vault, checkpoints):
    base, _ = checkpoints
    vault.save_files("bert", base)
    expected = weights(0)
    picked = vault.load("bert", keys=["layer2.weight", "position_ids"])
    assert list(picked) == ["layer2.weight", "position_ids"]
    np.testing.assert_array_equal(picked["layer2.weight"], expected["layer2.weight"])
    np.testing.assert_array_equal(picked["position_ids"], expected["position_ids"])
    lazy = vault.load("bert", lazy=True)
    assert list(lazy) == ["layer0.weight", "layer1.weight", "layer2.weight",
                          "layer3.weight", "embeddings", "position_ids", "bf16"]
    np.testing.assert_array_equal(lazy["embeddings"], expected["embeddings"])
    if importlib.util.find_spec("ml_dtypes"):  # else bf16 comes back as a torch tensor
        assert lazy["bf16"].dtype.name == "bfloat16"
        assert lazy["bf16"].view(np.uint16).tolist() == expected["bf16"].tolist()
    with pytest.raises(KeyError, match="no entry named or matching 'x'"):
        vault.load("bert", keys="x")


def test_a_tensor_of_a_file_reads_only_its_own_chunks(vault_path, checkpoints):
    base, _ = checkpoints
    with modelvault.open(vault_path) as vault:
        vault.save_files("bert", base)
    with sqlite3.connect(vault_path) as db:  # damage every chunk of the file but layer1's
        layout = json.loads(db.execute("SELECT layout FROM versions").fetchone()[0])
        part = layout["files"].index("model.safetensors")
        run = next(r for r in layout["tensors"][part] if r[0] == "layer1.weight")
        keep = range(run[3], run[3] + run[4])
        for seq, pack, start, length in db.execute(
                "SELECT pc.seq, c.pack_id, c.start, c.length FROM part_chunks pc JOIN chunks c "
                "ON c.id = pc.chunk_id WHERE pc.part = ?", (part,)).fetchall():
            if seq in keep:
                continue
            codec, data = db.execute("SELECT codec, data FROM packs WHERE id = ?",
                                     (pack,)).fetchone()
            data = bytearray(data)
            data[start + length // 2 if codec == "raw" else len(data) // 2] ^= 0xFF
            db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(data), pack))
    db.close()
    with modelvault.open(vault_path) as vault:
        got = vault.load("bert", keys="layer1.weight")["layer1.weight"]
        np.testing.assert_array_equal(got, weights(0)["layer1.weight"])
        with pytest.raises(modelvault.IntegrityError):
            vault.load("bert", keys="layer0.weight")


def test_tensors_of_the_same_name_in_two_files_are_named_by_file(vault, tmp_path):
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    write_safetensors(folder / "unet" / "model.safetensors",
                      {"conv_in.weight": np.ones(4, np.float32), "only": np.zeros(2, np.float32)})
    write_safetensors(folder / "vae" / "model.safetensors",
                      {"conv_in.weight": np.full(4, 2, np.float32)})
    vault.save_files("p", folder)
    lazy = vault.load("p", lazy=True)
    assert sorted(lazy) == ["only", "unet/model.safetensors:conv_in.weight",
                            "vae/model.safetensors:conv_in.weight"]
    assert lazy["vae/model.safetensors:conv_in.weight"].tolist() == [2.0] * 4
    assert lazy["unet/model.safetensors:conv_in.weight"].tolist() == [1.0] * 4
