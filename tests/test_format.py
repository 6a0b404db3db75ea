"""docs/format.md is enough to read a vault: these tests read vaults that modelvault
wrote, following the doc, with sqlite3, zstandard, blake3, numpy, json and pickle
only (hashlib, and cryptography's Ed25519 for the signature). modelvault is used to
write, never to read. tests/test_spec.py runs the doc's own reference reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import sqlite3
import struct
from pathlib import Path

import blake3
import numpy as np
import zstandard

import modelvault

DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"


# -- a reader written from docs/format.md ---------------------------------------------


@contextlib.contextmanager
def opened(path):
    """A read-only connection, as a browsing tool would open the file."""
    db = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def version_row(db, name, version=None):
    """A versions row by model name and number; the latest (highest existing) by default."""
    sql = ("SELECT v.*, m.name, e.json AS environment FROM versions v "
           "JOIN models m ON m.id = v.model_id JOIN environments e ON e.id = v.environment_id "
           "WHERE m.name = ?")
    if version is None:
        return db.execute(sql + " ORDER BY v.version DESC LIMIT 1", (name,)).fetchone()
    return db.execute(sql + " AND v.version = ?", (name, version)).fetchone()


def parts_of(db, version_id):
    rows = db.execute("SELECT * FROM parts WHERE version_id = ? ORDER BY part",
                      (version_id,)).fetchall()
    assert [r["part"] for r in rows] == list(range(len(rows)))
    return rows


def chunks_of(db, version_id, part):
    return db.execute(
        "SELECT pc.seq, c.* FROM part_chunks pc JOIN chunks c ON c.id = pc.chunk_id "
        "WHERE pc.version_id = ? AND pc.part = ? ORDER BY pc.seq",
        (version_id, part)).fetchall()


def pack_content(db, pack_id):
    """What chunks' start and length point into: the pack's data, or its one zstd frame
    decompressed."""
    p = db.execute("SELECT codec, size, data FROM packs WHERE id = ?", (pack_id,)).fetchone()
    if p["codec"] == "raw":
        content = p["data"]
    else:
        assert p["codec"] == "zstd"
        content, rest = zstd_frame(p["data"], p["size"])
        assert rest == b""
    assert len(content) == p["size"]
    return content


def chunk_bytes(db, chunk_id, depth=0):
    """A chunk's raw bytes: its slice of its pack decoded, XORed with its base's if a delta."""
    assert depth <= 4  # modelvault writes chains of at most 4 deltas
    c = db.execute("SELECT * FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
    content = pack_content(db, c["pack_id"])
    stored = content[c["start"]:c["start"] + c["length"]]
    assert len(stored) == c["length"]
    raw = decode_chunk(c["codec"], c["itemsize"], c["size"], stored)
    if c["base_id"] is not None:
        base = chunk_bytes(db, c["base_id"], depth + 1)
        raw = np.bitwise_xor(np.frombuffer(raw, np.uint8), np.frombuffer(base, np.uint8)).tobytes()
    assert blake3.blake3(raw).hexdigest() == c["hash"]
    return raw


def zstd_frame(data, size):
    """The first zstd frame of ``data``, which must declare ``size`` bytes; (bytes, rest)."""
    assert zstandard.frame_content_size(data) == size
    dobj = zstandard.ZstdDecompressor().decompressobj()
    raw = dobj.decompress(data)
    assert len(raw) == size
    return raw, dobj.unused_data


def decode_chunk(codec, itemsize, size, data):
    data = bytes(data)
    if codec == "raw":
        assert itemsize == 1
        raw = data
    elif codec == "zstd":
        assert itemsize == 1
        raw, rest = zstd_frame(data, size)
        assert rest == b""  # modelvault writes one frame and nothing after it
    elif codec == "zstd-shuffle":
        k = itemsize
        assert k >= 2 and size % k == 0
        lengths = struct.unpack_from(f"<{k}I", data)
        assert 4 * k + sum(n & 0x7FFFFFFF for n in lengths) == len(data)
        planes, offset = [], 4 * k
        for length in lengths:
            if length & 0x80000000:  # top bit: the plane is stored as it is
                length &= 0x7FFFFFFF
                plane = data[offset:offset + length]
                assert len(plane) == size // k
            else:
                plane, rest = zstd_frame(data[offset:offset + length], size // k)
                assert rest == b""
            planes.append(plane)
            offset += length
        # plane j holds byte j of every item: undo with a k x n transpose.
        raw = np.frombuffer(b"".join(planes), np.uint8).reshape(k, -1).T.tobytes()
    else:
        raise AssertionError(f"unknown codec {codec!r}")
    assert len(raw) == size
    return raw


def read_part(db, part_row):
    """A part's bytes: its chunks decoded and concatenated in seq order."""
    chunks = chunks_of(db, part_row["version_id"], part_row["part"])
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    data = b"".join(chunk_bytes(db, c["id"]) for c in chunks)
    assert len(data) == part_row["size"]
    return data


def dtype_from_text(text):
    """parts.dtype: a descr string, or JSON for structured dtypes ([title, name] -> tuple)."""
    if not text.startswith("["):
        return np.lib.format.descr_to_dtype(text)

    def fields(descr):
        if not isinstance(descr, list):
            return descr
        out = []
        for name, sub, *shape in descr:
            out.append((tuple(name) if isinstance(name, list) else name, fields(sub),
                        *(tuple(s) for s in shape)))
        return out

    return np.lib.format.descr_to_dtype(fields(json.loads(text)))


def array_from_part(part_row, data):
    dtype = dtype_from_text(part_row["dtype"])
    assert not dtype.hasobject
    shape = json.loads(part_row["shape"])
    assert int(np.prod(shape, dtype=np.int64)) * dtype.itemsize == len(data)
    flat = np.frombuffer(data, dtype=dtype) if data else np.empty(0, dtype=dtype)
    if part_row["fortran_order"]:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def rebuild(node, arrays):
    (tag, value), = node.items()
    if tag == "array":
        return arrays[value]
    if tag == "dict":
        return {key: rebuild(item, arrays) for key, item in value}
    if tag == "list":
        return [rebuild(item, arrays) for item in value]
    if tag == "tuple":
        return tuple(rebuild(item, arrays) for item in value)
    if tag == "value":
        return value
    raise AssertionError(f"unknown layout node {tag!r}")


def canonical_json(value):
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def descriptors(db, version_id):
    return [{"kind": p["kind"], "name": p["name"], "dtype": p["dtype"],
             "shape": None if p["shape"] is None else json.loads(p["shape"]),
             "fortran_order": p["fortran_order"], "itemsize": p["itemsize"],
             "size": p["size"], "chunks": [c["hash"] for c in chunks_of(db, version_id,
                                                                           p["part"])]}
            for p in parts_of(db, version_id)]


def digest_of(kind, layout, parts):
    return blake3.blake3(canonical_json(
        {"kind": kind, "layout": layout, "parts": parts})).hexdigest()


def fixed_pieces(size, itemsize):
    """Chunk sizes of an array part, as the doc says arrays are cut."""
    step = 2**20 - 2**20 % itemsize if itemsize <= 2**20 else 2**20
    return [min(step, size - offset) for offset in range(0, size, step)]


# -- the tests -----------------------------------------------------------------------


def test_arrays_version_is_rebuilt_from_the_tables(tmp_path):
    rng = np.random.default_rng(7)
    titled = np.dtype([("a", "<f4"), ("b", "<i2", (2,)), (("Temperature", "t"), "<f4")])
    records = np.zeros(100_000, dtype=titled)
    records["a"] = rng.normal(size=100_000)
    records["b"] = rng.integers(-100, 100, size=(100_000, 2))
    records["t"] = rng.normal(size=100_000)
    obj = {
        "weights": rng.normal(size=700_000).astype(np.float32).round(2),  # 2.8 MB: 3 chunks
        "ids": np.arange(-5_000, 5_000, dtype=np.int64),
        "matrix": np.asfortranarray(rng.normal(size=(300, 70))),
        "scale": np.array(2.5),
        "records": records,
        "config": {"layers": [64, 32], "name": "net", "dropout": 0.1, "flag": True, "x": None},
        "pair": (np.zeros(0, dtype=np.float32), "label"),
    }
    assert obj["matrix"].flags.f_contiguous and not obj["matrix"].flags.c_contiguous
    path = tmp_path / "arrays.vault"
    with modelvault.open(path) as vault:
        vault.save("net", obj)

    with opened(path) as db:
        row = version_row(db, "net")
        assert (row["kind"], row["version"]) == ("arrays", 1)
        parts = parts_of(db, row["id"])
        arrays = [array_from_part(p, read_part(db, p)) for p in parts]
        rebuilt = rebuild(json.loads(row["layout"]), arrays)
        by_name = {p["part"]: p for p in parts}
        layout = dict(json.loads(row["layout"])["dict"])

        for p in parts:
            assert p["kind"] == "array" and p["name"] is None
            sizes = [c["size"] for c in chunks_of(db, row["id"], p["part"])]
            assert sizes == fixed_pieces(p["size"], p["itemsize"])
        assert row["size"] == sum(p["size"] for p in parts)

        weights = by_name[layout["weights"]["array"]]
        assert (weights["dtype"], json.loads(weights["shape"])) == ("<f4", [700_000])
        codecs = {(c["codec"], c["itemsize"]) for c in chunks_of(db, row["id"], weights["part"])}
        assert codecs == {("zstd-shuffle", 4)}
        assert len(chunks_of(db, row["id"], weights["part"])) == 3
        matrix = by_name[layout["matrix"]["array"]]
        assert (matrix["fortran_order"], json.loads(matrix["shape"])) == (1, [300, 70])
        scale = by_name[layout["scale"]["array"]]
        assert (json.loads(scale["shape"]), scale["size"]) == ([], 8)
        structured = by_name[layout["records"]["array"]]
        assert structured["dtype"].startswith("[") and structured["itemsize"] == 12
        assert [c["size"] for c in chunks_of(db, row["id"], structured["part"])][0] == 2**20 - 4

    assert rebuilt.keys() == obj.keys()
    for key in ("weights", "ids", "matrix", "scale", "records"):
        assert rebuilt[key].dtype == obj[key].dtype
        assert rebuilt[key].shape == obj[key].shape
        np.testing.assert_array_equal(rebuilt[key], obj[key])
    assert rebuilt["matrix"].flags.f_contiguous
    assert rebuilt["config"] == obj["config"]
    assert isinstance(rebuilt["pair"], tuple) and rebuilt["pair"][1] == "label"
    assert rebuilt["pair"][0].shape == (0,) and rebuilt["pair"][0].dtype == np.float32


def test_digest_is_recomputed_from_the_tables(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"dim": 384, "name": "mini\u00e9"}')
    (folder / "weights.bin").write_bytes(np.arange(50_000, dtype=np.int32).tobytes())
    path = tmp_path / "digest.vault"
    with modelvault.open(path) as vault:
        vault.save("arr", {"w": np.linspace(0, 1, 300_000), "\u00fcber": [1.5, "t\u00e9"]})
        vault.save("obj", {"big": np.ones(200_000), "s": {1, 2}}, metadata={"auc": 0.9})
        vault.save_files("files", folder)

    with opened(path) as db:
        rows = db.execute("SELECT id, kind, layout, digest FROM versions").fetchall()
        assert sorted(r["kind"] for r in rows) == ["arrays", "files", "pickle"]
        for row in rows:
            parts = descriptors(db, row["id"])
            layout = json.loads(row["layout"])
            assert re.fullmatch(r"[0-9a-f]{64}", row["digest"])
            assert digest_of(row["kind"], layout, parts) == row["digest"]
            # The digest covers the chunk order and each part's description.
            multi = next(p for p in parts if len(set(p["chunks"])) > 1)
            reordered = [dict(p, chunks=p["chunks"][::-1]) if p is multi else p for p in parts]
            assert digest_of(row["kind"], layout, reordered) != row["digest"]
            resized = [dict(p, size=p["size"] + 1) if p is multi else p for p in parts]
            assert digest_of(row["kind"], layout, resized) != row["digest"]


def test_files_version_is_rebuilt_from_the_tables(tmp_path):
    rng = np.random.default_rng(3)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
                      "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho"])
    text = " ".join(rng.choice(words, size=60_000)).encode()  # ~340 kB: several CDC chunks
    noise = rng.integers(0, 256, size=100_000, dtype=np.uint8).tobytes()  # incompressible
    folder = tmp_path / "bert"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "vocab.txt").write_bytes(text)
    (folder / "model.bin").write_bytes(noise)
    (folder / "tokenizer" / "empty.json").write_bytes(b"")
    expected = {"vocab.txt": text, "model.bin": noise, "tokenizer/empty.json": b""}
    path = tmp_path / "files.vault"
    with modelvault.open(path) as vault:
        vault.save_files("bert", folder)

    with opened(path) as db:
        row = version_row(db, "bert", 1)
        assert row["kind"] == "files"
        parts = parts_of(db, row["id"])
        names = json.loads(row["layout"])["files"]
        assert names == [p["name"] for p in parts] == sorted(expected)
        got = {}
        for p in parts:
            assert (p["kind"], p["itemsize"], p["dtype"], p["shape"]) == ("file", 1, None, None)
            got[p["name"]] = read_part(db, p)
            chunks = chunks_of(db, row["id"], p["part"])
            assert all(c["size"] <= 256 * 1024 for c in chunks)
            assert all(c["size"] >= 16 * 1024 for c in chunks[:-1])
            # File chunks sit raw in solid packs: one zstd frame for many chunks, or
            # the bytes as they are when that does not shrink them.
            assert {c["codec"] for c in chunks} <= {"raw"}
            packs = {db.execute("SELECT codec FROM packs WHERE id = ?", (c["pack_id"],))
                     .fetchone()[0] for c in chunks}
            if p["name"] == "vocab.txt":
                assert len(chunks) >= 2 and packs == {"zstd"}
            if p["name"] == "model.bin":
                assert packs == {"raw"}
            if p["name"] == "tokenizer/empty.json":
                assert p["size"] == 0 and chunks == []
    assert got == expected


def test_pickle_version_is_signed_and_rebuilt(tmp_path, _private_key_home):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    big = np.linspace(0, 1, 200_000)  # 1.6 MB: leaves the pickle stream as a buffer part
    obj = {"big": big, "small": np.arange(10), "labels": {"a", "b"}}
    path = tmp_path / "pickle.vault"
    with modelvault.open(path) as vault:
        vault.save("obj", obj, metadata={"auc": 0.91, "note": "caf\u00e9"})

    key_text = (_private_key_home / "private.key").read_text()
    assert key_text.startswith("modelvault-private-v2:") and key_text.endswith("\n")
    seed = bytes.fromhex(key_text.strip()[len("modelvault-private-v2:"):])
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    public_raw = public.public_bytes_raw()

    with opened(path) as db:
        row = version_row(db, "obj")
        parts = parts_of(db, row["id"])
        assert json.loads(row["layout"]) == {"pickle": 0, "buffers": [1]}
        assert [(p["kind"], p["itemsize"]) for p in parts] == [("pickle", 1), ("buffer", 8)]
        assert parts[1]["size"] == big.nbytes
        # Check the signature before unpickling: with the public key alone.
        assert row["key_id"] == hashlib.sha256(b"modelvault public key"
                                               + public_raw).hexdigest()[:16]
        parent, source = db.execute("SELECT parent, source FROM lineage WHERE version_id = ?",
                                    (row["id"],)).fetchone()
        manifest = {"id": row["uuid"], "name": row["name"],
                    "kind": row["kind"], "digest": row["digest"],
                    "created_at": row["created_at"], "description": row["description"],
                    "metadata": json.loads(row["metadata"]),
                    "environment": json.loads(row["environment"]),
                    "lineage": {"parent": parent, "source": json.loads(source)}}
        assert digest_of(row["kind"], json.loads(row["layout"]),
                         descriptors(db, row["id"])) == row["digest"]

        def holds(m):
            assert row["signature"].startswith("ed25519:")
            try:
                public.verify(bytes.fromhex(row["signature"][len("ed25519:"):]),
                              canonical_json(m))
            except InvalidSignature:
                return False
            return True

        assert holds(manifest)
        assert not holds(dict(manifest, version=2))
        assert not holds(dict(manifest, metadata={"auc": 0.99}))
        assert not holds(dict(manifest, lineage={"parent": None, "source": {}}))
        stream, *buffers = [bytearray(read_part(db, p)) for p in parts]
    rebuilt = pickle.loads(stream, buffers=buffers)
    assert rebuilt.keys() == obj.keys() and rebuilt["labels"] == {"a", "b"}
    np.testing.assert_array_equal(rebuilt["big"], big)
    np.testing.assert_array_equal(rebuilt["small"], obj["small"])


def test_file_settings_and_one_file_at_rest(tmp_path):
    path = tmp_path / "settings.vault"
    with modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(100_000.0)})
        vault.save("m", {"w": np.arange(100_001.0)})
    with modelvault.open(path) as vault:  # every kind of write, then close
        vault.alias("m:1", "prod")
        vault.tag("m:2", stage="test")
        vault.delete("m:1")
        vault.gc()

    def side_files():
        return [s for s in ("-journal", "-wal", "-shm") if path.with_name(path.name + s).exists()]

    assert side_files() == []
    header = path.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\x00"
    assert header[68:72] == b"MVLT"
    assert header[60:64] == (7).to_bytes(4, "big")
    assert header[18:20] == b"\x01\x01"  # rollback journal, not WAL
    with opened(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x4D564C54
        assert db.execute("PRAGMA user_version").fetchone()[0] == 7
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096  # small: see test_pages
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert side_files() == []


def test_schema_in_the_file_is_the_documented_ddl(tmp_path):
    path = tmp_path / "schema.vault"
    modelvault.open(path).close()

    def squeeze(text):
        return " ".join(text.split())

    doc = squeeze(DOC.read_text(encoding="utf-8"))
    with opened(path) as db:
        objects = db.execute("SELECT type, name, sql FROM sqlite_master "
                             "WHERE sql IS NOT NULL ORDER BY name").fetchall()
    assert {(o["type"], o["name"]) for o in objects} == {
        ("table", "models"), ("table", "versions"), ("table", "parts"), ("table", "chunks"),
        ("table", "part_chunks"), ("table", "aliases"), ("table", "tags"),
        ("table", "packs"), ("table", "environments"), ("table", "lineage"),
        ("table", "packages"), ("index", "packages_by_name"), ("table", "remotes"),
        ("table", "remote_aliases"), ("table", "remote_tags"),
        ("index", "part_chunks_by_chunk"), ("index", "aliases_by_version"),
        ("view", "model_versions"), ("view", "model_summary"), ("view", "pack_sizes")}
    for obj in objects:
        assert squeeze(obj["sql"]) + ";" in doc, f"{obj['name']} is not documented as created"


def test_views_list_versions_and_models(tmp_path):
    path = tmp_path / "views.vault"
    with modelvault.open(path) as vault:
        vault.save("churn", {"w": np.arange(10.0)}, aliases=["production", "stable"],
                   metadata={"auc": 0.8}, description="first")
        vault.save("churn", {"w": np.arange(12.0)}, tags={"team": "growth", "auc": 0.91})
        vault.save("churn", {"w": np.arange(14.0)})
        vault.delete("churn:3")
        vault.save("team/other", np.ones((20, 20)))

    with opened(path) as db:
        db.execute("PRAGMA trusted_schema = OFF")  # careful readers' setting; views must work
        rows = db.execute("SELECT * FROM model_versions").fetchall()
        assert [(r["name"], r["version"]) for r in rows] == [
            ("churn", 1), ("churn", 2), ("team/other", 1)]
        first, second, other = rows
        assert sorted(first["aliases"].split(", ")) == ["production", "stable"]
        assert second["aliases"] is None and other["aliases"] is None
        assert first["tags"] is None
        assert sorted(second["tags"].split(", ")) == ["auc=0.91", "team=growth"]
        assert json.loads(first["metadata"]) == {"auc": 0.8}
        assert first["description"] == "first"
        for r in rows:
            assert r["kind"] == "arrays" and r["stored_size"] > 0 and r["size"] > 0
            stored = version_row(db, r["name"], r["version"])
            assert (r["digest"], r["uuid"], r["created_at"]) == (
                stored["digest"], stored["uuid"], stored["created_at"])
            assert json.loads(r["environment"])["modelvault"] == modelvault.__version__

        summary = [tuple(r) for r in db.execute("SELECT * FROM model_summary")]
        assert summary == [("churn", 2, 2, second["created_at"]),
                           ("team/other", 1, 1, other["created_at"])]
        # "Latest" is the highest existing version; numbers are never given out again.
        assert version_row(db, "churn")["version"] == 2
        assert db.execute("SELECT last_version FROM models WHERE name = 'churn'"
                          ).fetchone()[0] == 3

    with modelvault.open(path) as vault:
        assert vault.save("churn", {"w": np.arange(16.0)}).version == 4
    with opened(path) as db:
        assert version_row(db, "churn")["version"] == 4


def test_a_files_version_without_recorded_modes_extracts_with_the_usual_bits(tmp_path):
    # Versions saved before modelvault recorded permission bits have a layout of names
    # alone ({"files": [...]}): written out, their files get what open() gives a new
    # file (0666 less the umask), not the 0600 of a temporary file.
    import os
    import stat

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "config.json").chmod(0o640)
    path = tmp_path / "old.vault"
    with modelvault.open(path) as vault:
        vault.save_files("m", folder)
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT id, kind, layout FROM versions").fetchone()
        layout = json.loads(row["layout"])
        assert layout == {"files": ["config.json"], "modes": [0o640]}
        old = {"files": layout["files"]}
        db.execute("UPDATE versions SET layout = ?, digest = ?, signature = NULL WHERE id = ?",
                   (json.dumps(old), digest_of("files", old, descriptors(db, row["id"])),
                    row["id"]))
    db.close()
    umask = os.umask(0)
    os.umask(umask)
    with modelvault.open(path) as vault:
        (written,) = vault.extract("m", tmp_path / "out")
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask


def test_the_documents_blake3_vector_and_format_version_are_right():
    from modelvault._schema import FORMAT_VERSION, OLDEST_FORMAT

    text = " ".join(DOC.read_text(encoding="utf-8").split())
    vector = re.search(r"BLAKE3 hash of the 3 bytes `abc` is `([0-9a-f]{64})`", text)
    assert vector and blake3.blake3(b"abc").hexdigest() == vector.group(1)
    known = list(range(OLDEST_FORMAT, FORMAT_VERSION + 1))
    assert (f"`user_version` is a version the reader knows "
            f"({', '.join(map(str, known[:-1]))} or {known[-1]})") in text
    older = [f"`{v}`" for v in reversed(known[:-1])]
    assert (f"`PRAGMA user_version` is `{FORMAT_VERSION}` (or {', '.join(older[:-1])} or "
            f"{older[-1]}") in text
