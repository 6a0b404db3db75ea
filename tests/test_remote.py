"""Remotes: push, pull and clone through object storage, only the missing chunks.

Most tests use a file:// remote (obstore's local store: the same code path as S3 from
our side); tests/test_remote_servers.py runs the same operations against real S3
servers started on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import warnings

import numpy as np
import pytest

import modelvault
from modelvault import _copier, _remote
from modelvault._remote import _log, _names, _objects, _pull

pytest.importorskip("obstore")


def weights(seed=0, rows=4):
    rng = np.random.default_rng(seed)
    return {f"layer{i}": rng.normal(size=(rows, 65536)).astype(np.float32) for i in range(4)}


@pytest.fixture
def url(tmp_path):
    return f"file://{tmp_path / 'remote'}"


@pytest.fixture
def fetched(monkeypatch):
    """Bytes and objects a pull reads from pack objects, counted."""
    seen = {"bytes": 0, "objects": []}
    real = _remote.Store.ranges

    def ranges(self, key, spans):
        got = real(self, key, spans)
        seen["bytes"] += sum(map(len, got))
        seen["objects"].append(key)
        return got

    monkeypatch.setattr(_remote.Store, "ranges", ranges)
    return seen


def test_push_then_clone_gives_the_same_versions_labels_and_bytes(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        first = a.save("net", weights(0), metadata={"acc": 0.9}, aliases=["prod"],
                       tags={"team": "nlp"})
        a.save("net", weights(1))
        a.save("tree", {"w": np.arange(10)})
        report = a.push(url)
        assert sorted(v.ref for v in report.added) == ["net:1", "net:2", "tree:1"]
        assert report.chunks > 0 and report.uploaded_bytes > 0
        assert a.push(url).added == ()  # nothing new: nothing sent
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert sorted(listed) == ["net:1", "net:2", "tree:1"]
    assert listed["net:1"].aliases == ("prod",) and listed["net:1"].tags == {"team": "nlp"}
    assert listed["net:1"].id == first.id and listed["net:1"].kind == "arrays"
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        mv = b.get("net@prod")
        assert (mv.id, mv.digest, mv.version, mv.metadata) == (first.id, first.digest, 1,
                                                                {"acc": 0.9})
        assert mv.tags == {"team": "nlp"} and mv.signature == "trusted"
        for name, array in weights(1).items():
            np.testing.assert_array_equal(b.load("net:2")[name], array)
        assert b.verify() == []
    with pytest.raises(FileExistsError):
        modelvault.clone(url, tmp_path / "b.vault")


def test_a_fine_tune_pushes_and_pulls_only_its_changed_chunks(tmp_path, url, fetched):
    base = weights(0, rows=8)
    tuned = {**base, "layer3": base["layer3"] + 1}  # one of four tensors changed
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", base)
        whole = a.push(url).uploaded_bytes
        a.save("net", tuned)
        delta = a.push(url)
    assert [v.ref for v in delta.added] == ["net:2"]
    assert delta.uploaded_bytes < 0.3 * whole
    with modelvault.clone(url, tmp_path / "b.vault", ["net:1"]) as b:
        assert [v.version for v in b.versions("net")] == [1]
        before = fetched["bytes"]
        report = b.pull(url)
        assert [v.ref for v in report.added] == ["net:2"]
        assert fetched["bytes"] - before <= 1.05 * delta.uploaded_bytes
        np.testing.assert_array_equal(b.load("net:2")["layer3"], tuned["layer3"])
        assert b.pull(url).added == ()


def test_the_log_numbers_versions_and_a_pull_renumbers_a_clash(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a, modelvault.open(tmp_path / "b.vault") as b:
        mine = a.save("m", {"w": np.zeros(3)})
        theirs = b.save("m", {"w": np.ones(3)})
        a.push(url)
        pushed = b.push(url)
        assert [v.ref for v in pushed.added] == ["m:2"]  # m:1 was given out there
        on_remote = {v.id: v.version for v in modelvault.Remote(url).versions()}
        assert on_remote == {mine.id: 1, theirs.id: 2}
        report = a.pull(url)
        assert [(v.ref, v.id) for v in report.added] == [("m:2", theirs.id)]
        report = b.pull(url)  # b holds theirs as m:1; the remote's m:1 clashes
        assert [(v.id, v.version) for v in report.added] == [(mine.id, 2)]
        assert report.renumbered == (("m", 1, 2),)


def test_aliases_and_tags_move_with_a_push(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)}, aliases=["prod"])
        a.save("m", {"w": np.ones(3)})
        a.push(url)
        a.alias("m:2", "prod")
        a.tag("m:2", stage="live")
        assert a.push(url, ["m:2"]).added == ()
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert listed["m:2"].aliases == ("prod",) and listed["m:1"].aliases == ()
    assert listed["m:2"].tags == {"stage": "live"}
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.get("m@prod").version == 2
        with modelvault.open(tmp_path / "a.vault") as a:  # labels change on the remote
            a.alias("m:1", "stable")
            a.tag("m:1", owner="ann")
            a.alias("m:1", "prod")
            a.push(url, ["m:1"])
        report = b.pull(url)  # nobody moved b's prod since its clone: it follows
        assert report.added == () and b.get("m@stable").version == 1
        assert b.get("m:1").tags == {"owner": "ann"} and b.get("m@prod").version == 1
        assert f"m@prod: m:2 -> m:1 (from {url})" in report.moved
        assert report.conflicts == ()
        b.alias("m:2", "prod")  # moved here only: it stays, for a push to send
        with modelvault.open(tmp_path / "a.vault") as a:
            a.alias("m:2", "stable")
            a.push(url, ["m:2"])
        report = b.pull(url)
        assert b.get("m@prod").version == 2 and b.get("m@stable").version == 2
        assert report.moved == (f"m@stable: m:1 -> m:2 (from {url})",)
        assert report.conflicts == ()


def test_remote_rm_and_gc_drop_only_what_no_version_uses(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("old", weights(5))
        a.save("kept", weights(6))
        a.push(url)
    remote = modelvault.Remote(url)
    assert remote.delete("old:1").ref == "old:1"
    assert [v.ref for v in remote.versions()] == ["kept:1"]
    with modelvault.open(tmp_path / "a.vault") as a:
        assert a.push(url).added == ()  # deleted there: not pushed back unless named
    assert remote.gc().objects == 0  # all younger than the grace period
    report = remote.gc(grace=0)
    assert report.objects >= 1 and report.bytes > 0  # old's manifest at least
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        np.testing.assert_array_equal(b.load("kept")["layer0"], weights(6)["layer0"])
        assert b.verify() == []
    with modelvault.open(tmp_path / "a.vault") as a:
        assert [v.ref for v in a.push(url, ["old:1"]).added] == ["old:2"]  # numbers: never reused


def test_packs_only_one_version_uses_go_with_it(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("old", weights(5))
        a.push(url)
        a.save("kept", weights(6))
        a.push(url)
    packs = tmp_path / "remote" / "packs"
    before = len(list(packs.iterdir()))
    modelvault.Remote(url).delete("old")
    modelvault.Remote(url).gc(grace=0)
    assert len(list(packs.iterdir())) == before - 2  # its pack object and index
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == []


def test_a_push_in_flight_stops_a_remote_gc_and_a_gc_stops_a_push(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)})
        a.push(url)
        remote = modelvault.Remote(url)
        lock = remote.lock("push")
        with pytest.raises(modelvault.RemoteError, match="push is in progress"):
            remote.gc(grace=0)
        remote.store.delete(lock)
        lock = remote.lock("gc")
        a.save("m", {"w": np.ones(3)})
        with pytest.raises(modelvault.RemoteError, match="remote gc is running"):
            a.push(url)
        remote.store.delete(lock)
        assert [v.ref for v in a.push(url).added] == ["m:2"]


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_or_missing_pack_object_is_named_and_nothing_is_pulled(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", weights(3))
        a.push(url)
    (pack,) = (tmp_path / "remote" / "packs").glob("*.pack")
    with modelvault.open(tmp_path / "b.vault") as b:
        b.save("other", {"w": np.zeros(3)})
        saved = pack.read_bytes()
        _flip(pack)
        with pytest.raises(modelvault.IntegrityError, match=f"packs/{pack.stem}.pack"):
            b.pull(url)
        assert [m.name for m in b.models()] == ["other"]
        pack.unlink()
        with pytest.raises(modelvault.IntegrityError, match=f"packs/{pack.stem}.pack"):
            b.pull(url)
        pack.write_bytes(saved)
        assert [v.ref for v in b.pull(url).added] == ["m:1"]
        assert b.verify() == []


def test_a_changed_manifest_is_refused_by_its_digest_or_signature(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("m", {"w": np.zeros(3)}, metadata={"acc": 0.5})
        a.push(url)
    path = tmp_path / "remote" / "versions" / f"{mv.id}.json"
    manifest = json.loads(path.read_text())
    manifest["version"]["metadata"] = json.dumps({"acc": 0.99})
    path.write_text(json.dumps(manifest))
    with pytest.raises(modelvault.IntegrityError, match=f"versions/{mv.id}.json.*signature"):
        modelvault.clone(url, tmp_path / "b.vault")
    assert not (tmp_path / "b.vault").exists()


def test_an_index_that_does_not_match_its_pack_object_counts_for_nothing(tmp_path, url):
    import sqlite3

    with modelvault.open(tmp_path / "scratch.vault") as scratch:
        scratch.save("m", weights(3))
    with sqlite3.connect(tmp_path / "scratch.vault") as db:
        chunks = [[h, size, "raw", 1, None, 0, 0, 10]
                  for h, size in db.execute("SELECT hash, size FROM chunks")]
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("first", {"w": np.zeros(3)})
        a.push(url)
    packs = tmp_path / "remote" / "packs"
    # Hostile: indexes claiming the chunks of a model about to be pushed, in a pack
    # object that is not there, in one shorter than its blobs, and one unreadable.
    bogus = {"a" * 64: ({"pack": "f" * 64, "blobs": [[0, 10, "raw", 10]]}, 10),
             "b" * 64: ({"pack": "b" * 64, "blobs": [[0, 10, "raw", 10]]}, 3),
             "c" * 64: (None, 10),
             "d" * 64: ({"pack": "../../x", "blobs": [[0, 10, "raw", 10]]}, 10),
             # codecs that are lone surrogates (SQLite cannot hold them: a pull raised
             # UnicodeEncodeError writing the blob's or the chunk's row)
             "e" * 64: ({"pack": "e" * 64, "blobs": [[0, 10, "\ud800", 10]]}, 10),
             "0" * 64: ({"pack": "0" * 64, "blobs": [[0, 10, "raw", 10]],
                         "chunks": [[*c[:2], "\ud800", *c[3:]] for c in chunks]}, 10)}
    for name, (idx, size) in bogus.items():
        (packs / f"{name}.pack").write_bytes(b"x" * size)
        (packs / f"{name}.idx").write_text("{" if idx is None else json.dumps(
            {"chunks": chunks, **idx}))
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", weights(3))
        assert a.push(url).chunks >= len(chunks)  # sent, not skipped
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        np.testing.assert_array_equal(b.load("m")["layer2"], weights(3)["layer2"])
    modelvault.Remote(url).gc(grace=0)  # an index that does not count goes, with its pack
    assert not any((packs / f"{name}.{kind}").exists() for name in bogus
                   for kind in ("pack", "idx"))
    with modelvault.clone(url, tmp_path / "c.vault") as c:
        assert c.verify() == []


def test_a_push_sends_what_a_bogus_pack_object_claims_and_a_pull_passes_it_by(tmp_path,
                                                                               url):
    import sqlite3

    with modelvault.open(tmp_path / "scratch.vault") as scratch:
        scratch.save("m", weights(3))
    with sqlite3.connect(tmp_path / "scratch.vault") as db:
        chunks = [[*row, None, 0, 0, 16] for row in db.execute(
            "SELECT hash, size, codec, itemsize FROM chunks")]
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("first", {"w": np.zeros(3)})
        a.push(url)
    # Hostile: a pack object of garbage, of the size its well-formed index gives, which
    # claims the chunks of a model about to be pushed; named to come before any other.
    bogus = tmp_path / "remote" / "packs" / ("0" * 64)
    bogus.with_suffix(".pack").write_bytes(bytes(4096))
    bogus.with_suffix(".idx").write_text(json.dumps(
        {"pack": "0" * 64, "blobs": [[0, 4096, "raw", 4096]], "chunks": chunks}))
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", weights(3))
        assert a.push(url).chunks >= len(chunks)  # compared, found not ours: sent
    with modelvault.clone(url, tmp_path / "b.vault") as b:  # the bogus copy, then ours
        np.testing.assert_array_equal(b.load("m")["layer2"], weights(3)["layer2"])
        assert b.verify() == []
    bogus.with_suffix(".pack").write_bytes(b"x" * 4096)  # now the only copy: named
    for other in bogus.parent.glob("*.idx"):
        if other != bogus.with_suffix(".idx"):
            other.unlink()
    with pytest.raises(modelvault.IntegrityError,
                       match=f"packs/{'0' * 64}.pack does not hold what its index says"):
        modelvault.clone(url, tmp_path / "c.vault", ["m"])


@pytest.mark.parametrize("loss", ["deleted", "renamed"])
def test_a_push_sends_again_the_chunks_of_a_version_there_whose_pack_object_was_lost(
        tmp_path, url, loss):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", weights(4))
        a.push(url)
        (pack,) = (tmp_path / "remote" / "packs").glob("*.pack")
        if loss == "deleted":
            pack.unlink()
        else:  # an index whose "pack" names a key outside packs/: it counts for nothing
            index = json.loads(pack.with_suffix(".idx").read_text())
            pack.with_suffix(".idx").write_text(json.dumps({**index, "pack": "../../x"}))
        with pytest.raises(modelvault.IntegrityError, match="m:1|versions/"):
            modelvault.clone(url, tmp_path / "b.vault")
        report = a.push(url)  # the version is there: its chunks are not, so they go
        assert report.added == () and report.chunks > 0
        assert a.push(url).chunks == 0
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == []
        np.testing.assert_array_equal(b.load("m")["layer1"], weights(4)["layer1"])


def test_a_push_reads_a_copy_it_skips_once_and_never_one_it_sent_or_pulled(
        tmp_path, url, fetched, monkeypatch):
    base = weights(0, rows=8)
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", base)
        whole = a.push(url).uploaded_bytes
        a.save("net", {**base, "layer3": base["layer3"] + 1})
        a.push(url)
        assert fetched["bytes"] == 0  # what it skipped, it had sent itself
        # The same vault on a machine that has not seen the remote: what a push skips
        # is compared with the remote's copy first, once.
        monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "elsewhere"))
        a.save("net", {**base, "layer2": base["layer2"] + 1})
        report = a.push(url)
        assert fetched["bytes"] > 0 and report.uploaded_bytes < 0.3 * whole
        read = fetched["bytes"]
        a.save("net", {**base, "layer2": base["layer2"] + 2})  # shares what net:3 did
        assert a.push(url).uploaded_bytes < 0.3 * whole
        assert fetched["bytes"] == read
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "colleague"))
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == [] and [v.version for v in b.versions("net")] == [1, 2, 3, 4]
        read = fetched["bytes"]
        b.save("net", {**base, "layer0": base["layer0"] + 1})
        assert b.push(url).uploaded_bytes < 0.3 * whole
        assert fetched["bytes"] == read  # the pull checked what the push skips


def test_a_manifest_someone_else_wrote_first_fails_the_push_and_a_swapped_one_the_pull(
        tmp_path, url, monkeypatch):
    with modelvault.open(tmp_path / "a.vault") as a:
        mine = a.save("m", {"w": np.zeros(3)}, metadata={"owner": "ann"})
    with modelvault.open(tmp_path / "x.vault") as x:  # another writer's version, pushed
        theirs = x.save("m", {"w": np.full(3, 666.0)})
        x.push(url)
    versions = tmp_path / "remote" / "versions"
    forged = json.loads((versions / f"{theirs.id}.json").read_text())
    forged["version"].update(uuid=mine.id, key_id=None, signature=None)
    # Hostile: their tensors under the uuid the owner is about to push.
    (versions / f"{mine.id}.json").write_text(json.dumps(forged))
    with modelvault.open(tmp_path / "a.vault") as a:
        with pytest.raises(modelvault.RemoteError, match=f"versions/{mine.id}.json exists"):
            a.push(url)
        assert [v.ref for v in modelvault.Remote(url).versions()] == ["m:1"]  # theirs only
        (versions / f"{mine.id}.json").unlink()
        # A push that stopped after its manifests (here: its log entry failed) runs again.
        real = _log.Log.commit
        monkeypatch.setattr(_log.Log, "commit", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            a.push(url)
        monkeypatch.setattr(_log.Log, "commit", real)
        assert [v.ref for v in a.push(url).added] == ["m:2"]
    # Hostile: the manifest swapped after the push, unsigned, with other contents: every
    # other field copied, and the digest its contents give.
    forged["version"].update({k: v for k, v in json.loads(
        (versions / f"{mine.id}.json").read_text())["version"].items()
        if k not in ("digest", "key_id", "signature")})
    (versions / f"{mine.id}.json").write_text(json.dumps(forged))
    with pytest.raises(modelvault.IntegrityError, match=f"versions/{mine.id}.json.*digest"):
        modelvault.clone(url, tmp_path / "b.vault", ["m:2"])


def test_a_foreign_pickle_from_a_remote_still_needs_trust(tmp_path, url, monkeypatch):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("p", {"a set": {1, 2}})  # a pickle
        a.push(url)
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "bob"))
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.get("p").signature == "untrusted"
        with pytest.raises(modelvault.UntrustedError):
            b.load("p")
        assert b.load("p", trust=True) == {"a set": {1, 2}}


def test_a_signed_only_vault_pulls_only_what_a_trusted_key_signed(tmp_path, url, monkeypatch,
                                                                    fetched):
    """Hostile case: a stranger with write access pushes their own tensors (signed by
    their key) beside the team's. A signed-only app pulls the team's and not a byte of
    the stranger's; it says which it left."""
    from click.testing import CliRunner

    from modelvault._cli import cli

    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "team"))
    with modelvault.open(tmp_path / "team.vault") as team:
        team.save("churn", weights(0))
        team.push(url)
    (tmp_path / "team.key").write_text(CliRunner().invoke(cli, ["key", "export"]).output)
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "stranger"))
    with modelvault.clone(url, tmp_path / "stranger.vault") as stranger:
        stranger.save("churn", weights(1))  # churn:2
        stranger.push(url)
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "app"))
    assert CliRunner().invoke(cli, ["trust", str(tmp_path / "team.key")]).exit_code == 0
    fetched["bytes"] = 0
    with modelvault.open(tmp_path / "app.vault", require="trusted") as app:
        report = app.pull(url)
        assert [v.ref for v in app.versions()] == ["churn:1"]
        assert [c for c in report.conflicts if c.startswith("not pulled: churn:2")]
        assert "untrusted" in " ".join(report.conflicts)
    assert fetched["bytes"] < sum(a.nbytes for a in weights(0).values()) * 1.1
    monkeypatch.setenv("MODELVAULT_REQUIRE", "trusted")  # clone follows it too
    with modelvault.clone(url, tmp_path / "app2.vault") as app2:
        assert [v.ref for v in app2.versions()] == ["churn:1"]


def test_an_endpoint_that_ignores_create_only_writes_is_refused(tmp_path, url, monkeypatch):
    real = _remote.Store.put
    monkeypatch.setattr(_remote.Store, "put",
                        lambda self, key, data, create=False: real(self, key, data))
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)})
        with pytest.raises(modelvault.RemoteError, match="ignores conditional writes"):
            a.push(url)
        assert [v.ref for v in a.push(url, single_writer=True).added] == ["m:1"]


def test_remote_ls_reads_a_checkpoint_and_the_entries_after_it(tmp_path, url, monkeypatch):
    monkeypatch.setattr(_log, "CHECKPOINT_EVERY", 3)
    with modelvault.open(tmp_path / "a.vault") as a:
        for i in range(7):
            a.save("m", {"w": np.full(3, i)})
            a.push(url)
    assert sorted(p.name for p in (tmp_path / "remote" / "checkpoints").iterdir()) == [
        "000000000003.json", "000000000006.json"]
    assert [v.version for v in modelvault.Remote(url).versions()] == list(range(1, 8))


def test_memory_remotes_are_shared_within_a_process(tmp_path):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)})
        a.push("memory://test-shared")
    assert [v.ref for v in modelvault.Remote("memory://test-shared").versions()] == ["m:1"]


def test_the_cli_pushes_lists_pulls_and_clones(tmp_path, url):
    from click.testing import CliRunner

    from modelvault._cli import cli

    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)}, aliases=["prod"])
    run = CliRunner().invoke
    result = run(cli, ["push", str(tmp_path / "a.vault"), url])
    assert result.exit_code == 0 and "pushed 1 version(s)" in result.output
    result = run(cli, ["remote", "ls", url])
    assert result.exit_code == 0 and "m:1" in result.output and "prod" in result.output
    result = run(cli, ["remote", "ls", url, "--json"])
    assert json.loads(result.output)[0]["name"] == "m"
    result = run(cli, ["clone", url, str(tmp_path / "b.vault")])
    assert result.exit_code == 0 and "cloned 1 version" in result.output
    result = run(cli, ["pull", str(tmp_path / "b.vault"), url])
    assert result.exit_code == 0 and "added 0 version(s)" in result.output
    result = run(cli, ["remote", "rm", url, "m:1"])
    assert result.exit_code == 0 and "deleted m:1" in result.output
    result = run(cli, ["remote", "gc", url, "--grace", "0"])
    assert result.exit_code == 0 and "deleted" in result.output
    result = run(cli, ["remote", "ls", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1


def test_a_remote_named_in_the_vault_file_is_used_only_once_added_here(tmp_path, url,
                                                                        monkeypatch, run):
    import shutil
    import sqlite3

    path = tmp_path / "a.vault"
    with modelvault.open(path) as a:
        a.save("m", {"w": np.zeros(3)})
        a.add_remote("origin", url)
        assert [v.ref for v in a.push("origin").added] == ["m:1"]
    # Hostile: a vault file whose remotes table names someone else's URL as origin.
    evil = f"file://{tmp_path / 'evil'}"
    with sqlite3.connect(path) as db:
        db.execute("UPDATE remotes SET url = ? WHERE name = 'origin'", (evil,))
    db.close()
    with modelvault.open(path) as a:
        a.save("m", {"w": np.ones(3)})
        for act in (a.push, a.pull):
            with pytest.raises(modelvault.RemoteError, match=f"names {evil} as its remote "
                               "'origin'.*modelvault remote add"):
                act("origin")
    result = run("push", path, "origin")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "evil").exists()
    # A copy of the file elsewhere, or the file in another user's hands: not added there.
    shutil.copy(path, tmp_path / "copy.vault")
    with modelvault.open(tmp_path / "copy.vault") as copy:
        with pytest.raises(modelvault.RemoteError, match="remote add"):
            copy.push("origin")
    # Confirmed by adding it (as the message says), it is used; removed, it is forgotten.
    assert run("remote", "add", path, "origin", url).exit_code == 0
    with modelvault.open(path) as a:
        assert [v.ref for v in a.push("origin").added] == ["m:2"]
        a.remove_remote("origin")
        a.add_remote("origin", url)
        monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "another-user"))
        with pytest.raises(modelvault.RemoteError, match="remote add"):
            a.pull("origin")


# -- processes ---------------------------------------------------------------------------


def _push_versions(path, url, endpoint, environ, seed, count):
    os.environ.update(environ)
    with modelvault.open(path) as vault:
        for i in range(count):
            vault.save("shared", {"w": np.full(1000, seed * 100 + i)})
            vault.push(url, endpoint_url=endpoint)


def push_from_four_processes(tmp_path, url, endpoint=None):
    """Four processes push five versions each of one model; the remote must hold all 20,
    numbered 1-20, each with its own bytes."""
    context = multiprocessing.get_context("spawn")
    environ = {k: v for k, v in os.environ.items()
               if k.startswith(("AWS_", "AZURE_", "AZURITE_", "MODELVAULT_"))}
    procs = [context.Process(target=_push_versions, args=(
        str(tmp_path / f"{i}.vault"), url, endpoint, environ, i, 5)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    found = modelvault.Remote(url, endpoint_url=endpoint).versions()
    assert sorted(v.version for v in found) == list(range(1, 21))
    assert len({v.id for v in found}) == 20
    with modelvault.clone(url, tmp_path / "all.vault", endpoint_url=endpoint) as vault:
        values = sorted(int(vault.load(f"shared:{n}")["w"][0]) for n in range(1, 21))
        assert values == sorted(s * 100 + i for s in range(4) for i in range(5))


def test_four_processes_pushing_one_model_lose_nothing(tmp_path, url):
    push_from_four_processes(tmp_path, url)


def _push_big(path, url, home, ready):
    os.environ["MODELVAULT_HOME"] = home
    with modelvault.open(path) as vault:
        vault.push(f"{url}-warm", ["m0:1"])  # imports done: the kill lands in the push
        ready.set()
        vault.push(url)


@pytest.mark.sweep
def test_kill_9_during_push_leaves_a_consistent_remote_and_the_next_push_completes(
        tmp_path, url, full):
    rng = np.random.default_rng(0)
    home = os.environ["MODELVAULT_HOME"]
    path = tmp_path / "a.vault"
    with modelvault.open(path) as vault:
        for i in range(6):
            vault.save(f"m{i % 2}", {"w": rng.normal(size=(16, 65536)).astype(np.float32)})
        started = time.monotonic()
        vault.push(f"file://{tmp_path / 'timing'}")
        whole = time.monotonic() - started
    context = multiprocessing.get_context("spawn")
    trials = 50 if full else 8
    tally = {"killed before its log entry": 0, "after": 0}
    for trial in range(trials):
        target = f"file://{tmp_path / f'remote{trial}'}"
        if trial % 2:  # a remote that already holds some of it
            with modelvault.open(path) as vault:
                vault.push(target, ["m0:1"])
        ready = context.Event()
        child = context.Process(target=_push_big, args=(str(path), target, home, ready))
        child.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0, 2 * whole))
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        # Whatever the log shows is whole: every version listed clones and verifies.
        listed = modelvault.Remote(target).versions() if (
            tmp_path / f"remote{trial}" / _remote.DESCRIPTOR).exists() else []
        if listed:
            with modelvault.clone(target, tmp_path / f"check{trial}.vault") as check:
                assert check.verify() == []
                assert len(check.versions()) == len(listed)
        tally["killed before its log entry" if len(listed) <= trial % 2 else "after"] += 1
        with modelvault.open(path) as vault:
            vault.push(target)
        assert len(modelvault.Remote(target).versions()) == 6
    print(f"kill -9 during push: {trials} trials, {tally}")


def _keep_pushing(path, url, home, rounds, retry_on_gc):
    os.environ["MODELVAULT_HOME"] = home
    rng = np.random.default_rng(7)
    with modelvault.open(path) as vault:
        for i in range(rounds):
            vault.save("busy", {"w": rng.normal(size=(4, 65536)).astype(np.float32),
                                "step": np.int64(i)})
            while True:
                try:
                    vault.push(url)
                    break
                except modelvault.RemoteError:
                    if not retry_on_gc:
                        raise
                    time.sleep(0.01)  # a remote gc holds it: try again


def _start_pushing(tmp_path, url, rounds, retry_on_gc):
    """A remote holding busy:1 (step -1), and a process pushing ``rounds`` more."""
    with modelvault.open(tmp_path / "seed.vault") as seed:
        seed.save("busy", {"w": np.zeros((4, 65536), np.float32), "step": np.int64(-1)})
        seed.push(url)
    pusher = multiprocessing.get_context("spawn").Process(
        target=_keep_pushing, args=(str(tmp_path / "a.vault"), url,
                                    os.environ["MODELVAULT_HOME"], rounds, retry_on_gc))
    pusher.start()
    return pusher


def test_pulls_while_another_process_pushes_see_only_whole_versions(tmp_path, url, full):
    rounds = 60 if full else 15
    pusher = _start_pushing(tmp_path, url, rounds, False)
    pulls = 0
    with modelvault.open(tmp_path / "b.vault") as b:
        while pusher.is_alive() or not pulls:
            b.pull(url)
            pulls += 1
        pusher.join(60)
        assert pusher.exitcode == 0
        b.pull(url)
        assert b.verify() == []
        steps = sorted(int(b.load(v)["step"]) for v in b.versions("busy"))
    assert steps == list(range(-1, rounds)) and pulls > 1


def test_a_remote_gc_racing_pushes_deletes_nothing_a_version_uses(tmp_path, url, full):
    rounds = 40 if full else 10
    pusher = _start_pushing(tmp_path, url, rounds, True)
    remote, collected, refused = modelvault.Remote(url), 0, 0
    while pusher.is_alive():
        try:
            remote.gc(grace=0)  # no grace: only the locks keep a push's chunks
            collected += 1
        except modelvault.RemoteError:
            refused += 1  # a push in flight
        if remote.versions()[1:]:
            remote.delete(f"busy:{remote.versions()[0].version}")  # something to collect
    pusher.join(60)
    assert pusher.exitcode == 0 and collected and refused
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == []
        steps = [int(b.load(v)["step"]) for v in b.versions("busy")]
    assert steps == sorted(steps) and steps[-1] == rounds - 1 and len(steps) < rounds


def test_a_push_whose_lock_expired_uploads_again_what_a_gc_took(tmp_path, url, monkeypatch):
    old = weights(8)
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("old", old)
        a.push(url)
    modelvault.Remote(url).delete("old")  # its chunks: on the remote, used by nothing
    monkeypatch.setattr(_remote._remote, "LOCK_LIFE", -1.0)  # as if the push outlived its lock
    real, renewals, ran = _remote.Remote.renew, [], []

    def renew(self, key):
        real(self, key)
        if "push-" in key:
            renewals.append(key)
            if len(renewals) == 3:  # after the push's first pack object: a gc slips in
                ran.append(modelvault.Remote(url).gc(grace=0))

    monkeypatch.setattr(_remote.Remote, "renew", renew)
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("new", {**old, "extra": weights(10)["layer0"]})  # reuses old's chunks
        a.push(url, [mv])
    assert ran and ran[0].objects >= 2  # old's pack object went
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == []
        np.testing.assert_array_equal(b.load("new")["layer1"], old["layer1"])


def test_gc_judges_a_pack_by_the_younger_of_it_and_its_index(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", weights(9))
        a.push(url)
    modelvault.Remote(url).delete("m")
    (pack,) = (tmp_path / "remote" / "packs").glob("*.pack")
    os.utime(pack, (time.time() - 7200, time.time() - 7200))  # an old pack, a young index
    modelvault.Remote(url).gc(grace=600)
    assert pack.exists() and pack.with_suffix(".idx").exists()
    with modelvault.open(tmp_path / "b.vault") as b:  # the same bytes, pushed again
        b.save("m", weights(9))
        b.push(url)
    with modelvault.clone(url, tmp_path / "c.vault") as c:
        assert c.verify() == []


def test_a_vault_that_is_behind_does_not_move_remote_aliases_back(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", {"w": np.zeros(3)}, aliases=["prod"])
        a.push(url)
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        b.save("net", {"w": np.ones(3)})
        b.alias("net:2", "prod")
        b.tag("net:1", stage="retired")
        b.push(url)
        b.push(url, ["net:1"])  # named: its tags go along
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("other", {"w": np.arange(3)})
        a.push(url)  # a still has prod on net:1, and no tag
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert listed["net:2"].aliases == ("prod",) and listed["net:1"].tags == {"stage": "retired"}


def test_malformed_events_are_skipped_by_every_reader_and_stop_nothing(tmp_path, url, run):
    import uuid as uuids

    with modelvault.open(tmp_path / "a.vault") as a:
        first = a.save("m", {"w": np.zeros(3)}, aliases=["prod"])
        a.push(url)
    add = {"op": "add", "model": "m", "uuid": str(uuids.uuid4()), "number": 2,
           "created_at": first.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
           "kind": "arrays", "size": 24}
    # Hostile: a number past SQLite's integers (it gave OverflowError in every pull of m
    # from then on), a timestamp that is a number, the alias 'latest', a model name and
    # a uuid that are paths, a size past SQLite's integers, a tag with a number.
    events = [{**add, "number": 2**64}, {**add, "created_at": 5},
              {"op": "alias", "model": "m", "alias": "latest", "uuid": first.id},
              {"op": "alias", "model": "m", "alias": "7", "uuid": first.id},
              {**add, "model": "../x"}, {**add, "uuid": "../../x"}, {**add, "size": 2**63},
              {**add, "number": True}, {"op": "tag", "uuid": first.id, "key": "k", "value": 5},
              {"op": "delete", "uuid": ["not", "a", "uuid"]},
              # Lone surrogates: JSON spells them, SQLite cannot hold them (every pull and
              # clone raised UnicodeEncodeError at setting the tag, or adding the version).
              {"op": "tag", "uuid": first.id, "key": "k", "value": "\ud800"},
              {"op": "tag", "uuid": first.id, "key": "\udfff", "value": "v"},
              {**add, "kind": "arrays\ud800"}]
    log = tmp_path / "remote" / "log"
    (log / "000000000002.json").write_text(json.dumps({"events": events}))
    # And a checkpoint saying the same: ignored, the log alone decides.
    (tmp_path / "remote" / "checkpoints").mkdir()
    (tmp_path / "remote" / "checkpoints" / "000000000002.json").write_text(json.dumps(
        {"seq": 2, "last": {"m": 2**64}, "versions": {}, "aliases": {}, "deleted": []}))
    result = run("remote", "ls", url)
    assert result.exit_code == 0 and "m:1" in result.output and "latest" not in result.output
    assert [(v.ref, v.aliases, v.tags) for v in modelvault.Remote(url).versions()] == [
        ("m:1", ("prod",), {})]
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.ones(3)})
        assert [v.ref for v in a.push(url).added] == ["m:2"]
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert [v.ref for v in b.versions()] == ["m:1", "m:2"] and b.verify() == []


def test_a_manifest_with_values_of_the_wrong_type_is_refused_by_name(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("m", {"w": np.zeros(3)})
        a.push(url)
    path = tmp_path / "remote" / "versions" / f"{mv.id}.json"
    saved = json.loads(path.read_text())
    # An object where the row holds text; a number past SQLite's integers (OverflowError);
    # a lone surrogate, which JSON spells and SQLite cannot hold (UnicodeEncodeError).
    for field, value in (("metadata", {"acc": 1}), ("added_bytes", 2**64),
                         ("description", "\ud800")):
        path.write_text(json.dumps({**saved, "version": {**saved["version"], field: value}}))
        with modelvault.open(tmp_path / "b.vault") as b:
            with pytest.raises(modelvault.IntegrityError, match=f"versions/{mv.id}.json"):
                b.pull(url)
    # A chunk "hash" that is no hash (it reached SQLite as a lone surrogate, as above).
    path.write_text(json.dumps({**saved, "chunks": [["\ud800"]]}))
    with modelvault.open(tmp_path / "b.vault") as b:
        with pytest.raises(modelvault.IntegrityError, match=f"versions/{mv.id}.json"):
            b.pull(url)


def _sparse(path, size):
    """A file of ``size`` zero bytes that takes no room on disk (as an attacker's would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_huge_remote_object_is_refused_by_size_before_it_is_read(tmp_path, url,
                                                                   monkeypatch, run):
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("m", {"w": np.zeros(3)})
        a.push(url)
    remote = tmp_path / "remote"
    # Hostile: a 6 GiB log entry (it took 12.6 GB of memory, or a Rust abort under a limit).
    _sparse(remote / "log" / "000000000002.json", 6 << 30)
    with pytest.raises(modelvault.IntegrityError,
                       match=r"log/000000000002.json: 6442450944 bytes, more than"):
        modelvault.Remote(url).versions()
    result = run("remote", "ls", url)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    (remote / "log" / "000000000002.json").unlink()
    # A manifest past its cap: the pull names it and adds nothing.
    manifest = remote / "versions" / f"{mv.id}.json"
    saved = manifest.read_bytes()
    _sparse(manifest, _remote.LIMITS["manifest"] + 1)
    with modelvault.open(tmp_path / "b.vault") as b:
        with pytest.raises(modelvault.IntegrityError, match=f"versions/{mv.id}.json: "):
            b.pull(url)
        assert b.models() == []
        manifest.write_bytes(saved)
        # A checkpoint past its cap is ignored (the log alone decides), a lock past its
        # cap counts as expired: neither stops anyone.
        _sparse(remote / "checkpoints" / "000000000001.json", 1 << 40)
        _sparse(remote / "locks" / "gc-0.json", 1 << 40)
        assert [v.ref for v in b.pull(url).added] == ["m:1"]
        b.save("m", {"w": np.ones(3)})
        assert [v.ref for v in b.push(url).added] == ["m:2"]
    # The caps are the caller's to move, never the remote's.
    monkeypatch.setenv("MODELVAULT_REMOTE_MAX_LOG", "10")
    with pytest.raises(modelvault.IntegrityError, match="more than the 10 "):
        modelvault.Remote(url).versions()


def test_reading_a_missing_file_remote_creates_nothing(tmp_path):
    with pytest.raises(modelvault.NotFoundError, match="no modelvault remote"):
        modelvault.Remote(f"file://{tmp_path / 'typo'}").versions()
    assert not (tmp_path / "typo").exists()


@contextlib.contextmanager
def _named_pipe(path):
    """``path`` replaced by a named pipe for a while. A reader that opens it is let go
    (with nothing to read) rather than left waiting: code that would wait fails the
    test instead of hanging it."""
    saved = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    done = threading.Event()

    def let_go():
        while not done.wait(0.05):
            with contextlib.suppress(OSError):  # no reader waiting
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=let_go)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        path.unlink()
        path.write_bytes(saved)


def test_a_named_pipe_in_a_file_remote_is_refused_not_waited_on(tmp_path, url):
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("m", {"w": np.zeros(3)})
        a.push(url)
    remote = tmp_path / "remote"
    # Hostile: an object replaced by a named pipe, which an open() waits on forever.
    with _named_pipe(remote / "modelvault-remote.json"):
        with pytest.raises(modelvault.IntegrityError,
                           match="modelvault-remote.json: not a regular file"):
            modelvault.Remote(url).versions()
    with _named_pipe(remote / "versions" / f"{mv.id}.json"):
        with pytest.raises(modelvault.IntegrityError,
                           match=f"versions/{mv.id}.json: not a regular file"):
            modelvault.clone(url, tmp_path / "b.vault")
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == []


def test_a_push_makes_a_file_remote_folder_only_inside_one_that_exists(tmp_path):
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)})
        typo = tmp_path / "nonexistent" / "dir" / "remote"
        with pytest.raises(modelvault.RemoteError, match="no folder .*nonexistent/dir"):
            a.push(f"file://{typo}")
        assert not (tmp_path / "nonexistent").exists()
        assert [v.ref for v in a.push(f"file://{tmp_path / 'new'}").added] == ["m:1"]


def test_an_interrupted_pull_fetches_only_what_had_not_arrived(tmp_path, url, monkeypatch,
                                                                fetched):
    monkeypatch.setattr(_objects, "PACK_OBJECT", 1 << 20)  # several pack objects
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", weights(11, rows=8))
        a.push(url)
    objects = len(list((tmp_path / "remote" / "packs").glob("*.pack")))
    assert objects >= 4
    real = _remote.Store.ranges

    def cut(self, key, spans):  # the connection drops during the third pack object
        if len(fetched["objects"]) == 2:
            raise ConnectionError("network gone")
        return real(self, key, spans)

    monkeypatch.setattr(_remote.Store, "ranges", cut)
    with modelvault.open(tmp_path / "b.vault") as b:
        with pytest.raises(ConnectionError):
            b.pull(url)
        assert b.models() == []
        first = fetched["bytes"]
        monkeypatch.setattr(_remote.Store, "ranges", real)  # back (still counting)
        assert [v.ref for v in b.pull(url).added] == ["net:1"]
        assert b.verify() == []
        total = sum(p.stat().st_size for p in (tmp_path / "remote" / "packs").glob("*.pack"))
        assert fetched["bytes"] - first <= total - first + 1024  # not the first two again
        assert len(fetched["objects"]) == objects  # 2 before the cut, the rest after
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []



def _pull_whose_merge_fails(vault, url):
    """Pull into ``vault``, the merge failing (the disk gone) once the version is gathered
    beside it."""
    def fail(*args, **kwargs):
        raise OSError("disk gone")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_copier, "copy_from", fail)
        with pytest.raises(OSError):
            vault.pull(url)


def test_a_pull_starts_afresh_from_a_damaged_file_and_relabels_from_the_remote(tmp_path,
                                                                               url):
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("net", {"w": np.arange(1000.0)}, aliases=["prod"])
        a.push(url)
    bundle = _pull.bundle_path(tmp_path / "b.vault", mv.id)
    with modelvault.open(tmp_path / "b.vault") as b:
        bundle.write_bytes(b"not a vault at all")  # as an OS crash might leave it
        assert [v.ref for v in b.pull(url).added] == ["net:1"]
        assert not bundle.exists() and b.get("net@prod").id == mv.id
    # A bundle whose merge failed keeps its fetched chunks, not its labels of the time.
    with modelvault.open(tmp_path / "a.vault") as a:
        other = a.save("net", {"w": np.zeros(10)})
        a.push(url)
    with modelvault.open(tmp_path / "b.vault") as b:
        _pull_whose_merge_fails(b, url)
        assert _pull.bundle_path(b.path, other.id).exists()
        with modelvault.open(tmp_path / "a.vault") as a:
            a.tag(other, stage="live")
            a.push(url, [other])
        assert [v.ref for v in b.pull(url).added] == ["net:2"]
        assert b.get("net:2").tags == {"stage": "live"}  # as the remote says now
        assert not _pull.bundle_path(b.path, other.id).exists()


def test_a_pulls_file_holds_only_the_chunks_it_fetched(tmp_path, url):
    """The version's chunk lists and the delta bases the vault has are taken by hash at
    the merge: the file beside the vault holds no row for a chunk the vault has."""
    import sqlite3

    rng = np.random.default_rng(0)
    base = weights(13)
    tuned = {k: v + np.float32(1e-4) * rng.normal(size=v.shape).astype(np.float32)
             for k, v in base.items()}  # XOR deltas of base's chunks
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", base)
        mv = a.save("net", tuned)
        a.push(url)
    bundle = _pull.bundle_path(tmp_path / "b.vault", mv.id)
    with modelvault.clone(url, tmp_path / "b.vault", ["net:1"]) as b:
        _pull_whose_merge_fails(b, url)
        with sqlite3.connect(bundle) as db:
            fetched = {h for (h,) in db.execute("SELECT hash FROM chunks")}
            assert db.execute("SELECT count(*) FROM packs WHERE size = 0").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM part_chunks").fetchone() == (0,)
        with sqlite3.connect(tmp_path / "b.vault") as db:
            mine = {h for (h,) in db.execute("SELECT hash FROM chunks")}
        assert fetched and not fetched & mine
        assert [v.ref for v in b.pull(url).added] == ["net:2"]
        assert b.verify() == [] and not bundle.exists()
        np.testing.assert_array_equal(b.load("net:2")["layer1"], tuned["layer1"])
    with sqlite3.connect(tmp_path / "b.vault") as db:
        bases = {h for (h,) in db.execute(
            "SELECT b.hash FROM chunks c JOIN chunks b ON b.id = c.base_id")}
    assert bases & mine  # deltas of chunks it had


def test_a_pull_starts_afresh_from_a_file_cut_short(tmp_path, url):
    """A pull's file cut short (an OS crash: it is written with synchronous=OFF) opens
    read-only, as any vault cut short does: the pull starts it afresh, and says nothing."""
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("net", {"w": np.random.default_rng(0).normal(size=50_000)})
        a.push(url)
    bundle = _pull.bundle_path(tmp_path / "b.vault", mv.id)
    with modelvault.open(tmp_path / "b.vault") as b:
        bundle.write_bytes((tmp_path / "a.vault").read_bytes()[:-100])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [v.ref for v in b.pull(url).added] == ["net:1"]
        assert [w.message for w in caught] == []
        assert not bundle.exists() and b.verify() == []


def test_two_pulls_of_one_version_into_one_vault_take_turns(tmp_path, url):
    import threading

    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", weights(12, rows=8))
        a.push(url)
    modelvault.open(tmp_path / "b.vault").close()
    results, errors = [], []

    def pull():
        try:
            with modelvault.open(tmp_path / "b.vault") as b:
                results.append([v.ref for v in b.pull(url).added])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(results) == [[], [], ["net:1"]]
    with modelvault.open(tmp_path / "b.vault") as b:
        assert b.verify() == [] and len(b.versions()) == 1
    assert [p.name for p in tmp_path.iterdir() if ".pull-" in p.name] == []


def _confirm_remotes(path, home, prefix, count, start):
    os.environ["MODELVAULT_HOME"] = str(home)
    start.wait()
    for i in range(count):  # what add_remote does after its write, without the write
        _remote.confirm(path, f"{prefix}{i}", f"file:///tmp/{prefix}{i}")


def test_remotes_added_at_once_by_two_processes_are_all_confirmed(tmp_path, monkeypatch):
    """The confirmed remotes are one file beside the keys: read, changed and replaced
    under a lock, so two `remote add`s at once keep both."""
    home = tmp_path / "home"
    monkeypatch.setenv("MODELVAULT_HOME", str(home))
    path = tmp_path / "a.vault"
    modelvault.open(path).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=_confirm_remotes, args=(path, home, p, 100, start))
               for p in "xy"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    confirmed = _names._confirmed()
    assert len(confirmed) == 200


def test_a_remote_that_cannot_be_recorded_is_a_typed_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MODELVAULT_HOME", str(blocker / "home"))
    with modelvault.open(tmp_path / "a.vault") as vault:
        with pytest.raises(modelvault.RemoteError, match="cannot record the remote"):
            vault.add_remote("origin", "file:///tmp/x")


def _pull_file(vault_path, uuid):
    """Where a pull gathers the version ``uuid`` for ``vault_path``: a public name."""
    return vault_path.with_name(f".{vault_path.name}.pull-{uuid}")


def test_a_planted_pull_file_cannot_add_versions_or_labels(tmp_path, url):
    """A file planted where a pull gathers a version (its name is public: the version's
    id on the remote) used to be emptied of every row but its fetched chunks
    (_keep_fetched_only). Now only ``DELETE FROM models`` runs, which cascades to rows
    that reference a model: rows that reference none (foreign keys are not checked
    when a file is opened) survive and the copier brings them in."""
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("net", {"w": np.zeros(1000)})
        a.push(url)
    evil = _pull_file(tmp_path / "b.vault", mv.id)
    with modelvault.open(evil) as e:
        e.save("evil", {"w": np.full(1000, 666.0)}, aliases=["prod"], tags={"x": "y"})
    db = sqlite3.connect(evil)
    db.execute("PRAGMA foreign_keys = OFF")
    # The model row moves away: the version, its alias and tag now name model 1, which
    # the pull's own model row will be once the file's models are deleted.
    db.execute("UPDATE models SET id = 99")
    db.execute("UPDATE versions SET version = 2, key_id = NULL, signature = NULL")
    db.commit()
    db.close()
    with modelvault.open(tmp_path / "b.vault") as b:
        try:
            report = b.pull(url)
        except modelvault.VaultError:
            report = None  # refused: fine
        if report is not None:
            assert [v.ref for v in report.added] == ["net:1"]
        assert [v.ref for v in b.versions()] in ([], ["net:1"])
        np.testing.assert_array_equal(b.load("net")["w"], np.zeros(1000))


def test_a_pull_resumes_from_a_file_an_older_modelvault_left(tmp_path, url):
    """An interrupted pull of the modelvault before this refactor left, beside the
    vault, rows with no bytes for chunks the vault had then (_rows wrote them, and
    _keep_fetched_only dropped them on the next run). If the vault has lost such a
    chunk since, the next pull must fetch it, not take the empty row for a fetched
    chunk and blame the remote's pack object."""
    with modelvault.open(tmp_path / "a.vault") as a:
        mv = a.save("net", {"w": np.random.default_rng(0).normal(size=5000)})
        a.push(url)
    db = sqlite3.connect(tmp_path / "a.vault")
    chunk_hash, size = db.execute("SELECT hash, size FROM chunks").fetchone()
    db.close()
    bundle = _pull_file(tmp_path / "b.vault", mv.id)
    with modelvault.open(bundle):
        pass
    db = sqlite3.connect(bundle)
    pack = db.execute("INSERT INTO packs (codec, size, data) VALUES ('raw', 0, x'')").lastrowid
    db.execute("INSERT INTO chunks (hash, size, codec, itemsize, base_id, pack_id, start, "
               "length) VALUES (?, ?, 'raw', 1, NULL, ?, 0, 0)", (chunk_hash, size, pack))
    db.commit()
    db.close()
    with modelvault.open(tmp_path / "b.vault") as b:
        assert [v.ref for v in b.pull(url).added] == ["net:1"]
        assert b.verify() == []
