"""Damaged and tampered vaults (issue #4, rows 1, 5 and 6).

* Every byte of a stored chunk flipped, one at a time: load and verify() both
  name the model, version and chunk.
* Edited manifests, chunk lists and parts: the signature or the digest catches
  every edit; pickles never load without trust=True.
* A malicious pickle saved under another machine's key: refused, never run,
  through the library and the command line.

Edits are made the way an attacker or a broken tool would: plain sqlite3 on the file.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error, redigest, version_id

import modelvault
from modelvault import IntegrityError, UntrustedError

# The command line runs from this checkout, whatever is installed.
_SOURCE = str(Path(modelvault.__file__).resolve().parent.parent)


def _cli(*args):
    """Run ``python -m modelvault ARGS`` in a child process; returns CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [_SOURCE, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "modelvault", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def _use_home(monkeypatch, path):
    """Act as another machine: its own signing key and trusted keys live in ``path``."""
    monkeypatch.setenv("MODELVAULT_HOME", str(path))


# -- row 1: every byte of a stored chunk ----------------------------------------------------


def _words():
    rng = random.Random(0)
    return collections.UserDict(  # not a plain dict: pickled, in a solid zstd pack
        ("".join(rng.choice("abcdefghij") for _ in range(8)), i) for i in range(160))


@pytest.mark.sweep
@pytest.mark.parametrize("which", ["array chunk in a raw pack", "pickle chunk in a solid pack"])
def test_every_byte_of_a_stored_chunk_flipped_is_named_by_load_and_verify(vault_path, which,
                                                                          full):
    weights = {"w": np.random.default_rng(0).normal(size=400).astype(np.float32)}
    with modelvault.open(vault_path) as vault:
        vault.save("weights", weights)
        vault.save("words", _words())
    name = "weights" if which.startswith("array") else "words"
    db = sqlite3.connect(vault_path, isolation_level=None)
    chunk_hash, codec, pack_id, start, length = db.execute(
        "SELECT c.hash, c.codec, c.pack_id, c.start, c.length FROM chunks c "
        "JOIN part_chunks pc ON pc.chunk_id = c.id WHERE pc.version_id = ?",
        (version_id(db, name),)).fetchone()
    pack_codec, data = db.execute("SELECT codec, data FROM packs WHERE id = ?",
                                  (pack_id,)).fetchone()
    if name == "weights":
        # A shuffled float chunk: plane lengths, zstd frames and planes stored as they are.
        assert (codec, pack_codec) == ("zstd-shuffle", "raw")
        where = range(start, start + length)  # its stored bytes within the pack
    else:
        # The chunk is the only one in its pack, so at rest its bytes are the pack's
        # zstd frame: that is what gets flipped.
        assert (codec, pack_codec) == ("raw", "zstd")
        assert db.execute("SELECT count(*) FROM chunks WHERE pack_id = ?",
                          (pack_id,)).fetchone()[0] == 1
        where = range(len(data))
    assert 1000 < len(where) < 3000  # a few KB: every byte is cheap to flip
    # A whole byte inverted in a normal run; under --full, also each of its 8 bits alone.
    masks = [0xFF] + ([1 << b for b in range(8)] if full else [])
    expected = [(name, 1, chunk_hash)]
    counts = collections.Counter()
    failures = []
    with modelvault.open(vault_path) as vault:
        for mask in masks:
            for index in where:
                damaged = bytearray(data)
                damaged[index] ^= mask
                db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(damaged), pack_id))
                counts["flips"] += 1
                try:
                    loaded = vault.load(name)
                except IntegrityError as exc:
                    named = (exc.model, exc.version, exc.chunk) == expected[0] and all(
                        str(s) in str(exc) for s in expected[0])
                    counts["load named it" if named else "load misnamed it"] += 1
                    if not named:
                        failures.append((index, mask, "load", str(exc)))
                    loaded = None
                problems = [(p.model, p.version, p.chunk) for p in vault.verify()]
                if loaded is not None:
                    # Only possible if zstd decoded the damaged frame to the very same
                    # bytes (their hash was checked): a bit the decoder never looks at.
                    right = (np.array_equal(loaded["w"], weights["w"]) if name == "weights"
                             else loaded == _words())
                    counts["load right (bit zstd ignores)" if right else "load wrong"] += 1
                    if not right or problems or mask == 0xFF:
                        failures.append((index, mask, "load did not notice", problems))
                elif problems == expected:
                    counts["verify named it"] += 1
                else:
                    failures.append((index, mask, "verify", problems))
        db.execute("UPDATE packs SET data = ? WHERE id = ?", (data, pack_id))
        assert vault.verify() == [] and vault.load("words") == _words()
    db.close()
    print(f"{which}: {dict(counts)}")
    assert not failures, f"{dict(counts)}; first failures: {failures[:10]}"
    assert counts["flips"] == len(where) * len(masks)
    assert counts["load named it"] == counts["verify named it"] >= len(where)


# -- row 5: tampered manifests, chunk lists and parts ---------------------------------------


def _template(folder):
    """A vault with two versions each of an arrays, a pickle and a files model."""
    path = folder / "template.vault"
    originals = {}
    with modelvault.open(path) as vault:
        for number in (1, 2):
            arrays = {"w": np.arange(1000, dtype=np.float32) * number}
            pickled = collections.UserDict(a=number, s="x" * 100 * number)
            files = folder / f"model{number}"
            files.mkdir()
            (files / "model.bin").write_bytes(bytes(range(256)) * 8 * number)
            vault.save("arr", arrays, metadata={"auc": 0.5}, description="weights")
            vault.save("obj", pickled, metadata={"auc": 0.5}, description="a pickle")
            vault.save_files("files", files, metadata={"auc": 0.5}, description="a file")
            originals[number] = {"arr": arrays, "obj": pickled,
                                 "files": {"model.bin": (files / "model.bin").read_bytes()}}
        assert [v.kind for v in vault.versions()] == ["arrays"] * 2 + ["files"] * 2 + \
            ["pickle"] * 2
    return path, originals


def _point_at_version_2(db, vid, name):
    """Give version 1 the parts and chunk list of version 2 (another content)."""
    other = version_id(db, name, 2)
    db.execute("DELETE FROM part_chunks WHERE version_id = ?", (vid,))
    db.execute("INSERT INTO part_chunks SELECT ?, part, seq, chunk_id FROM part_chunks "
               "WHERE version_id = ?", (vid, other))
    db.execute("UPDATE parts SET size = (SELECT p.size FROM parts p WHERE p.version_id = ? "
               "AND p.part = parts.part) WHERE version_id = ?", (other, vid))


_PART_EDITS = {  # one parts-row edit per kind of version
    "arr": "UPDATE parts SET dtype = '<i4' WHERE version_id = ?",  # floats read as ints
    "obj": "UPDATE parts SET itemsize = 2 WHERE version_id = ?",
    "files": "UPDATE parts SET name = '../outside.bin' WHERE version_id = ?",
}

# Edits of what the signature covers; the version's content is untouched.
_MANIFEST_EDITS = {
    "metadata": lambda db, vid, name: db.execute(
        "UPDATE versions SET metadata = '{\"auc\": 0.99}' WHERE id = ?", (vid,)),
    "description": lambda db, vid, name: db.execute(
        "UPDATE versions SET description = 'approved' WHERE id = ?", (vid,)),
    "created_at": lambda db, vid, name: db.execute(
        "UPDATE versions SET created_at = '2020-01-01T00:00:00.000000Z' WHERE id = ?", (vid,)),
    "id": lambda db, vid, name: db.execute(
        "UPDATE versions SET uuid = '00000000-0000-4000-8000-000000000000' WHERE id = ?",
        (vid,)),
    "environment": lambda db, vid, name: db.execute(
        "UPDATE environments SET json = json_set(json, '$.python', '2.7.18') WHERE id = "
        "(SELECT environment_id FROM versions WHERE id = ?)", (vid,)),
    "model name": lambda db, vid, name: db.execute(
        "UPDATE models SET name = ? || '-renamed' WHERE id = "
        "(SELECT model_id FROM versions WHERE id = ?)", (name, vid)),
    "signature": lambda db, vid, name: db.execute(
        "UPDATE versions SET signature = (SELECT v.signature FROM versions v "
        "WHERE v.id <> versions.id AND v.signature IS NOT NULL LIMIT 1) WHERE id = ?", (vid,)),
}


def _layout_edit(db, vid, name):
    db.execute("UPDATE versions SET layout = json_object('edited', json(layout)) WHERE id = ?",
               (vid,))


# Edits of the content: caught by the digest, or, where the editor recomputed the
# digest, by the signature (which covers the digest).
_CONTENT_EDITS = {
    "chunk list": _point_at_version_2,
    "parts row": lambda db, vid, name: db.execute(_PART_EDITS[name], (vid,)),
    "layout": _layout_edit,
}


def _tamper_trials():
    trials = [(edit, "manifest") for edit in _MANIFEST_EDITS]
    trials += [(edit, "content, digest recomputed") for edit in _CONTENT_EDITS]
    trials += [(edit, "content, digest kept") for edit in _CONTENT_EDITS]
    trials += [("digest", "digest"), ("signature removed", "unsigned")]
    return trials


@pytest.mark.filterwarnings("ignore::modelvault.EnvironmentWarning")  # edits the environment
def test_every_tampered_manifest_or_content_is_refused(tmp_path):
    template, originals = _template(tmp_path)
    counts = collections.Counter()
    failures = []
    for edit, group in _tamper_trials():
        for name in ("arr", "obj", "files"):
            path = tmp_path / "trial.vault"
            shutil.copy(template, path)
            with sqlite3.connect(path) as db:
                vid = version_id(db, name)
                if group == "manifest":
                    _MANIFEST_EDITS[edit](db, vid, name)
                elif group.startswith("content"):
                    _CONTENT_EDITS[edit](db, vid, name)
                    if group == "content, digest recomputed":
                        redigest(db, vid)
                elif group == "digest":
                    db.execute("UPDATE versions SET digest = ? WHERE id = ?", ("0" * 64, vid))
                else:
                    db.execute("UPDATE versions SET signature = NULL, key_id = NULL "
                               "WHERE id = ?", (vid,))
                ref = f"{name}-renamed:1" if edit == "model name" else f"{name}:1"
            db.close()
            counts["trials"] += 1
            try:
                outcome = _check_tampered(path, ref, name, group, originals[1][name],
                                          tmp_path / "out")
            except AssertionError as exc:
                failures.append((edit, name, str(exc).splitlines()[0]))
                continue
            counts[outcome] += 1
    print(dict(counts))
    assert not failures, f"{dict(counts)}; failures: {failures}"
    assert counts["trials"] == 3 * len(_tamper_trials()) == 45


def _check_tampered(path, ref, name, group, original, out):
    """Check one tampered vault; returns what happened, for the tally."""
    kind = {"arr": "arrays", "obj": "pickle", "files": "files"}[name]
    with modelvault.open(path) as vault:
        status = vault.get(ref).signature
        problems = [p for p in vault.verify() if (p.model, p.version) == (ref[:-2], 1)]
        try:
            vault.load(ref)
            error = None
        except modelvault.VaultError as exc:
            error = exc
        try:
            trusted = vault.load(ref, trust=True)
        except modelvault.VaultError as exc:
            trusted = exc
        if kind == "files":  # extract refuses what load refuses, before writing anything
            shutil.rmtree(out, ignore_errors=True)
            try:
                vault.extract(ref, out)
                assert error is None, f"extract wrote what load refused ({error!r})"
            except modelvault.VaultError:
                assert error is not None, "extract refused what load read"
                assert not out.exists() or not any(out.rglob("*")), "extract wrote files"
    if group == "unsigned":
        # docs/format.md: a NULL signature makes pickles refuse to load, but nothing
        # complains for arrays and files, which need no signature.
        assert status == "unsigned"
        if kind == "pickle":
            assert isinstance(error, UntrustedError), f"pickle loaded unsigned: {error!r}"
            return "unsigned pickle refused"
        assert error is None and not problems, f"{kind} unsigned: {error!r} {problems}"
        return f"unsigned {kind} loaded (documented)"
    # The digest is covered by the signature; an edit that leaves it in place is caught
    # by the digest check instead, on every read, and the signature still holds.
    assert status == ("trusted" if group == "content, digest kept" else "invalid"), status
    assert problems, "verify() reported nothing"
    if kind == "pickle" and status == "invalid" and group != "digest":
        # The pickle is never unpickled: what it would import is listed instead.
        assert isinstance(error, UntrustedError), repr(error)
        assert "signature does not match" in str(error), str(error)
    else:
        # A pickle whose digest was edited fails the digest check while modelvault reads
        # its stream to list the imports: an IntegrityError, before any unpickling.
        assert isinstance(error, IntegrityError), repr(error)
        assert (error.model, error.version) == (ref[:-2], 1), (error.model, error.version)
    if group == "manifest":
        # trust=True reads a version whose signature fails: its content is intact.
        if kind == "arrays":
            assert np.array_equal(trusted["w"], original["w"]), trusted
        else:
            assert trusted == original, trusted
        return f"{kind}: signature invalid, refused, loads with trust"
    if group in ("content, digest kept", "digest"):
        assert isinstance(trusted, IntegrityError), f"loaded with trust: {trusted!r}"
        assert "digest" in str(trusted), str(trusted)
        return f"{kind}: digest mismatch, refused even with trust"
    return f"{kind}: signature invalid, refused"


# -- row 6: a malicious pickle from another machine -----------------------------------------


class RunsShell:
    """Unpickling this runs a shell command: what an attacker's pickle would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class RunsSubprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


class RunsOwnCode:
    """Its code travels in the pickle (cloudpickle pickles a local function by value)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        marker = self.marker

        def payload():
            with open(marker, "w"):
                pass

        return (payload, ())


_PAYLOADS = {  # payload -> an import the refusal must name
    RunsShell: f"{os.system.__module__}.system",  # posix.system
    RunsPython: "builtins.exec",
    RunsSubprocess: "subprocess.call",
    RunsOwnCode: "cloudpickle",
}


def test_a_foreign_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    path = tmp_path / "shared.vault"
    markers = {}
    _use_home(monkeypatch, tmp_path / "alice")  # the attacker's machine and key
    for i, payload in enumerate(_PAYLOADS):
        markers[payload] = tmp_path / f"ran-{payload.__name__}"
        # Hidden inside a harmless-looking model.
        modelvault.save(path, f"evil{i}", {"weights": np.arange(3.0),
                                            "config": payload(markers[payload])})
    assert not any(m.exists() for m in markers.values())  # saving ran nothing either

    _use_home(monkeypatch, tmp_path / "bob")  # the victim
    counts = collections.Counter()
    for i, (payload, imported) in enumerate(_PAYLOADS.items()):
        ref = f"evil{i}"
        with modelvault.open(path) as vault:
            assert vault.get(ref).signature == "untrusted"
            with pytest.raises(UntrustedError) as info:
                vault.load(ref)
            assert any(imported in name for name in info.value.imports), info.value.imports
            assert imported in str(info.value)
            counts["library load refused"] += 1
            assert vault.verify() == []  # another key's signature is not damage
        with pytest.raises(UntrustedError):
            modelvault.load(path, ref)
        counts["one-call load refused"] += 1
        result = _cli("get", path, ref, "-o", tmp_path / "out")
        assert one_line_error(result), result.stderr
        assert imported in result.stderr and "--trust" in result.stderr
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        counts["CLI get refused"] += 1
        assert not markers[payload].exists(), f"{payload.__name__} ran"
    assert counts == {"library load refused": 4, "one-call load refused": 4,
                      "CLI get refused": 4}

    # The payloads are live: trusting the file runs them. (That is what trust means.)
    with modelvault.open(path) as vault:
        vault.load("evil0", trust=True)
    assert markers[RunsShell].exists()


@pytest.mark.parametrize("digest", ["kept", "recomputed"])
def test_a_trusted_version_pointed_at_a_foreign_pickle_never_runs_it(tmp_path, monkeypatch,
                                                                    digest):
    # Someone who can write the file points a version the victim signed at the chunks
    # of a pickle saved with another key.
    path = tmp_path / "shared.vault"
    marker = tmp_path / "ran"
    _use_home(monkeypatch, tmp_path / "alice")
    modelvault.save(path, "evil", RunsShell(marker))
    _use_home(monkeypatch, tmp_path / "bob")
    modelvault.save(path, "model", collections.UserDict(a=1))
    with sqlite3.connect(path) as db:
        vid, evil = version_id(db, "model"), version_id(db, "evil")
        db.execute("DELETE FROM part_chunks WHERE version_id = ?", (vid,))
        db.execute("INSERT INTO part_chunks SELECT ?, part, seq, chunk_id FROM part_chunks "
                   "WHERE version_id = ?", (vid, evil))
        db.execute("UPDATE parts SET size = (SELECT size FROM parts WHERE version_id = ?) "
                   "WHERE version_id = ?", (evil, vid))
        if digest == "recomputed":
            redigest(db, vid)
    db.close()
    with modelvault.open(path) as vault:
        # Kept, the digest no longer matches the chunks; recomputed, the signature fails.
        error = IntegrityError if digest == "kept" else UntrustedError
        with pytest.raises(error):
            vault.load("model")
        assert any(p.model == "model" for p in vault.verify())
    result = _cli("get", path, "model", "-o", tmp_path / "out")
    assert one_line_error(result), result.stderr
    assert not marker.exists()
