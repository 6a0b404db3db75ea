"""What is on disk, read with plain sqlite3; and files that are not healthy vaults, refused."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct

import blake3
import numpy as np
import pytest
import zstandard

import modelvault
from modelvault import (
    CorruptVaultError,
    DamagedVaultWarning,
    FormatVersionError,
    IntegrityError,
    NotAVaultError,
    VaultError,
)

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _db(path):
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def _decode(codec, itemsize, size, data):
    """Decode a stored chunk independently of modelvault's own code."""
    if codec == "raw":
        return bytes(data)
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompress(data)
    assert codec == "zstd-shuffle"
    lengths = struct.unpack_from(f"<{itemsize}I", data)
    offset, planes = 4 * itemsize, []
    for length in lengths:
        frame = data[offset:offset + (length & 0x7FFFFFFF)]
        if length & 0x80000000:  # a plane stored as it is
            planes.append(np.frombuffer(frame, np.uint8))
        else:
            planes.append(np.frombuffer(zstandard.ZstdDecompressor().decompress(frame),
                                        np.uint8))
        offset += length & 0x7FFFFFFF
    assert offset == len(data)
    return np.stack(planes, axis=1).reshape(-1).tobytes()


@pytest.fixture
def saved(vault_path):
    """A closed vault holding float32 weights, incompressible bytes, a pickle and a file."""
    rng = np.random.default_rng(0)
    model = {"weights": rng.standard_normal((256, 300)).astype(np.float32),
             "noise": rng.integers(0, 256, 150_000, dtype=np.uint8)}
    with modelvault.open(vault_path) as vault:
        vault.save("team/churn", model, metadata={"auc": 0.9, "note": "ünï"},
                   tags={"stage": "dev"}, aliases=["prod"], description="d")
        vault.save("pickled", {"s": {1, 2, 3}, "text": "abc" * 50_000})
        blob = vault_path.parent / "blob.bin"
        blob.write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
        vault.save_files("files", blob)
        blob.unlink()
    return vault_path, model


def test_rows_exist_in_every_table_after_save(saved):
    path, model = saved
    with _db(path) as db:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("models", "versions", "parts", "part_chunks", "chunks",
                            "aliases", "tags")}
        assert counts["models"] == 3 and counts["versions"] == 3
        assert counts["parts"] >= 4 and counts["part_chunks"] >= 4 and counts["chunks"] >= 4
        assert counts["aliases"] == 1 and counts["tags"] == 1
        names = [r[0] for r in db.execute("SELECT name FROM models ORDER BY name")]
        assert names == ["files", "pickled", "team/churn"]
        version = db.execute(
            "SELECT v.* FROM versions v JOIN models m ON m.id = v.model_id "
            "WHERE m.name = 'team/churn'").fetchone()
        assert version["version"] == 1 and version["kind"] == "arrays"
        assert version["size"] == sum(a.nbytes for a in model.values())
        assert version["description"] == "d"
        parts = db.execute("SELECT * FROM parts WHERE version_id = ? ORDER BY part",
                           (version["id"],)).fetchall()
        assert [(p["dtype"], json.loads(p["shape"]), p["itemsize"], p["size"]) for p in parts] \
            == [("<f4", [256, 300], 4, model["weights"].nbytes),
                ("|u1", [150_000], 1, model["noise"].nbytes)]
        # Each part's chunks add up to the part, in order.
        for part in parts:
            total = db.execute(
                "SELECT sum(c.size) FROM part_chunks pc JOIN chunks c ON c.id = pc.chunk_id "
                "WHERE pc.version_id = ? AND pc.part = ?",
                (version["id"], part["part"])).fetchone()[0]
            assert total == part["size"]
        assert db.execute("SELECT alias FROM aliases").fetchone()[0] == "prod"
        assert tuple(db.execute("SELECT key, value FROM tags").fetchone()) == ("stage", "dev")


def test_every_chunk_hash_is_blake3_of_its_decoded_bytes(saved):
    path, _ = saved
    codecs, pack_codecs = set(), set()
    with _db(path) as db:
        for pack in db.execute("SELECT id, codec, size, data FROM packs").fetchall():
            pack_codecs.add(pack["codec"])
            content = (zstandard.ZstdDecompressor().decompress(pack["data"])
                       if pack["codec"] == "zstd" else pack["data"])
            assert len(content) == pack["size"]
            for row in db.execute("SELECT hash, size, codec, itemsize, start, length "
                                  "FROM chunks WHERE pack_id = ?", (pack["id"],)):
                stored = content[row["start"]:row["start"] + row["length"]]
                raw = _decode(row["codec"], row["itemsize"], row["size"], stored)
                assert len(raw) == row["size"]
                assert row["hash"] == blake3.blake3(raw).hexdigest()
                codecs.add(row["codec"])
    # Streams (the pickle, the file) sit raw in solid packs; numbers are shuffled, or
    # raw when they do not shrink.
    assert codecs == {"raw", "zstd-shuffle"} and pack_codecs == {"raw", "zstd"}


def test_codecs_chosen_per_content(saved):
    path, model = saved
    with _db(path) as db:
        def chunks_of(part):
            return db.execute(
                "SELECT c.codec, c.itemsize, c.size, c.length AS stored "
                "FROM versions v JOIN models m ON m.id = v.model_id "
                "JOIN part_chunks pc ON pc.version_id = v.id "
                "JOIN chunks c ON c.id = pc.chunk_id "
                "WHERE m.name = 'team/churn' AND pc.part = ? ORDER BY pc.seq", (part,)).fetchall()

        weights = chunks_of(0)
        assert len(weights) == -(-model["weights"].nbytes // (1024 * 1024))
        assert {(c["codec"], c["itemsize"]) for c in weights} == {("zstd-shuffle", 4)}
        assert all(c["stored"] < c["size"] for c in weights)
        noise = chunks_of(1)
        assert {(c["codec"], c["itemsize"]) for c in noise} == {("raw", 1)}
        assert all(c["stored"] == c["size"] for c in noise)
        def pack_codecs(name):
            return db.execute(
                "SELECT DISTINCT c.codec, p.codec FROM versions v "
                "JOIN models m ON m.id = v.model_id JOIN part_chunks pc ON pc.version_id = v.id "
                "JOIN chunks c ON c.id = pc.chunk_id JOIN packs p ON p.id = c.pack_id "
                "WHERE m.name = ?", (name,)).fetchall()

        # Random file bytes are incompressible too: a solid pack kept as it is.
        assert [tuple(r) for r in pack_codecs("files")] == [("raw", "raw")]
        # The repetitive pickle stream is compressed, in one zstd frame per solid pack.
        assert [tuple(r) for r in pack_codecs("pickled")] == [("raw", "zstd")]


def test_text_columns_are_json_and_iso_utc(saved):
    path, _ = saved
    with _db(path) as db:
        for row in db.execute("SELECT created_at, metadata, typeof(metadata) AS t, layout, "
                              "e.json AS environment FROM versions v "
                              "JOIN environments e ON e.id = v.environment_id"):
            assert row["t"] == "text"
            assert isinstance(json.loads(row["metadata"]), dict)
            assert isinstance(json.loads(row["layout"]), dict)
            assert isinstance(json.loads(row["environment"]), dict)
            assert ISO_UTC.fullmatch(row["created_at"]), row["created_at"]
        meta = db.execute("SELECT metadata FROM versions WHERE version = 1 AND model_id = "
                          "(SELECT id FROM models WHERE name = 'team/churn')").fetchone()[0]
        assert json.loads(meta) == {"auc": 0.9, "note": "ünï"}
        for (created,) in db.execute("SELECT created_at FROM models"):
            assert ISO_UTC.fullmatch(created)


def test_file_header_pragmas(saved):
    path, _ = saved
    with _db(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x4D564C54
        assert db.execute("PRAGMA user_version").fetchone()[0] == 7
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096  # small: see test_pages
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental: gc shrinks
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # "MVLT" in the header, where `file` and other tools look for it (offset 68).
    assert path.read_bytes()[68:72] == b"MVLT"
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_views_for_people_browsing_the_file(saved):
    path, model = saved
    with _db(path) as db:
        rows = {r["name"]: r for r in db.execute("SELECT * FROM model_versions")}
        assert rows["team/churn"]["aliases"] == "prod"
        tags = rows["team/churn"]["tags"]
        assert "stage" in tags and "dev" in tags
        assert rows["team/churn"]["size"] == sum(a.nbytes for a in model.values())
        summary = db.execute("SELECT name, versions, latest FROM model_summary").fetchall()
        assert [tuple(r) for r in summary] == [("files", 1, 1), ("pickled", 1, 1),
                                              ("team/churn", 1, 1)]


# -- files that are not healthy vaults ----------------------------------------------------


def _open_fails(path, error):
    """Opening ``path`` read-write and read-only raises ``error`` and leaves the file alone."""
    before = path.read_bytes()
    listing = sorted(os.listdir(path.parent))
    for readonly in (False, True):
        with pytest.raises(error) as info:
            modelvault.open(path, readonly=readonly)
        assert not isinstance(info.value, sqlite3.Error)
        assert isinstance(info.value, VaultError)
        assert str(path.name) in str(info.value)
        assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == listing  # no journal left behind
    return info.value


def test_other_sqlite_database_is_not_a_vault(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('ann')")
    db.close()
    _open_fails(path, NotAVaultError)
    with sqlite3.connect(path) as db:  # untouched: no vault tables were added
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]
    db.close()


def test_empty_sqlite_database_is_not_a_vault(tmp_path):
    path = tmp_path / "empty.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 3")  # forces a header onto disk
    db.close()
    _open_fails(path, NotAVaultError)


def test_other_application_id_is_not_a_vault(saved):
    path, _ = saved
    db = sqlite3.connect(path)
    db.execute("PRAGMA application_id = 7")
    db.close()
    _open_fails(path, NotAVaultError)


@pytest.mark.parametrize("content", [os.urandom(8192), b"hello", b"SQLite format 3\x00" + bytes(84),
                                     b"x" * 100_000], ids=["random", "short", "header-only",
                                                           "text"])
def test_garbage_file_is_not_a_vault(tmp_path, content):
    path = tmp_path / "garbage.vault"
    path.write_bytes(content)
    _open_fails(path, NotAVaultError)


def test_empty_file_is_not_a_vault_and_stays_empty(tmp_path):
    path = tmp_path / "empty.vault"
    path.write_bytes(b"")
    _open_fails(path, NotAVaultError)
    assert path.stat().st_size == 0
    assert os.listdir(tmp_path) == ["empty.vault"]


def test_missing_file_readonly_and_directory(tmp_path):
    with pytest.raises(NotAVaultError):
        modelvault.open(tmp_path / "missing.vault", readonly=True)
    assert not (tmp_path / "missing.vault").exists()
    (tmp_path / "folder.vault").mkdir()
    for readonly in (False, True):
        with pytest.raises(NotAVaultError):
            modelvault.open(tmp_path / "folder.vault", readonly=readonly)


def test_newer_format_version_is_refused(saved):
    path, _ = saved
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    error = _open_fails(path, FormatVersionError)
    assert "99" in str(error) and "upgrade" in str(error)


@pytest.mark.parametrize("ddl,what", [
    ("CREATE TRIGGER sneaky AFTER INSERT ON chunks BEGIN DELETE FROM tags; END", "trigger sneaky"),
    ("CREATE VIEW extra AS SELECT 1", "view extra"),
    ("CREATE TABLE extra (x)", "table extra"),
])
def test_added_schema_objects_are_refused(saved, ddl, what):
    path, _ = saved
    db = sqlite3.connect(path)
    db.execute(ddl)
    db.commit()
    db.close()
    error = _open_fails(path, CorruptVaultError)
    assert what in str(error)


def test_statistics_tables_as_analyze_writes_them_are_allowed(saved):
    path, model = saved
    db = sqlite3.connect(path)
    db.execute("ANALYZE")  # as a SQLite browser may
    db.commit()
    db.close()
    with modelvault.open(path) as vault:
        assert np.array_equal(vault.load("team/churn")["weights"], model["weights"])
        vault.save("more", {"w": np.ones(3)})
        assert vault.verify() == []


@pytest.mark.parametrize("sql", [
    "CREATE TABLE sqlite_stat1(tbl,idx,stat,extra)",
    "CREATE TABLE sqlite_stat1(tbl,idx,stat AS (upper(tbl)))",
    "CREATE TABLE sqlite_stat4(tbl,idx,neq,nlt,ndlt,sample AS (tbl))",
])
def test_statistics_tables_not_as_sqlite_writes_them_are_refused(saved, sql):
    path, _ = saved
    name = sql.split()[2].split("(")[0]
    db = sqlite3.connect(path, isolation_level=None)
    # SQLite refuses to create a name starting with sqlite_: rename a table in place.
    db.execute("CREATE TABLE stand_in (x)")
    db.execute("PRAGMA writable_schema = ON")
    db.execute("UPDATE sqlite_master SET name = ?, tbl_name = ?, sql = ? "
               "WHERE name = 'stand_in'", (name, name, sql))
    db.close()
    error = _open_fails(path, CorruptVaultError)
    assert f"table {name}" in str(error)


def test_missing_table_is_refused(saved):
    path, _ = saved
    db = sqlite3.connect(path)
    db.execute("DROP TABLE tags")
    db.commit()
    db.close()
    error = _open_fails(path, CorruptVaultError)
    assert "tags" in str(error)


def test_truncated_file_opens_read_only_and_verify_names_what_cannot_be_read(saved):
    path, _ = saved
    os.truncate(path, path.stat().st_size // 2)
    with pytest.warns(DamagedVaultWarning, match="cut short"):
        vault = modelvault.open(path)
    with vault:
        assert vault.readonly
        problems = vault.verify()
        assert problems[0].message.startswith("the file is damaged")
        named = {(p.model, p.version) for p in problems if p.model is not None}
        for name in ("team/churn", "pickled", "files"):
            try:
                vault.load(name, trust=True)
            except IntegrityError as exc:
                assert (exc.model, exc.version) in named
            else:
                assert (name, 1) not in named
        with pytest.raises(CorruptVaultError, match="cut short"):
            vault.tag("files:1", stage="x")


# -- damaged contents ------------------------------------------------------------------------


def test_changed_chunk_bytes_are_caught(saved, flip_chunk_byte):
    path, _ = saved
    db = sqlite3.connect(path)
    (chunk_id,) = db.execute(
        "SELECT c.id FROM chunks c JOIN part_chunks pc ON pc.chunk_id = c.id "
        "JOIN versions v ON v.id = pc.version_id JOIN models m ON m.id = v.model_id "
        "WHERE m.name = 'team/churn' AND pc.part = 1 AND pc.seq = 0").fetchone()
    flip_chunk_byte(db, chunk_id, index=100)  # a raw chunk: same length, one byte flipped
    db.commit()
    db.close()
    with modelvault.open(path) as vault:
        with pytest.raises(IntegrityError) as info:
            vault.load("team/churn")
        assert info.value.model == "team/churn" and info.value.version == 1
        problems = vault.verify()
        assert [(p.model, p.version) for p in problems] == [("team/churn", 1)]
        assert vault.load("pickled")["s"] == {1, 2, 3}
        assert vault.load("files")  # other versions still load


def test_missing_chunk_row_is_caught(saved):
    path, _ = saved
    db = sqlite3.connect(path)  # foreign keys are off in a plain connection
    db.execute("DELETE FROM chunks WHERE id = (SELECT chunk_id FROM part_chunks pc "
               "JOIN versions v ON v.id = pc.version_id JOIN models m ON m.id = v.model_id "
               "WHERE m.name = 'files' LIMIT 1)")
    db.commit()
    db.close()
    with modelvault.open(path) as vault:
        with pytest.raises(IntegrityError, match="missing"):
            vault.load("files")
        problems = vault.verify()
        assert {p.model for p in problems} == {"files", None}
        assert any("missing chunks row" in p.message for p in problems)
        vault.load("team/churn")
