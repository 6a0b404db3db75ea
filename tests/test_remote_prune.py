"""Retention (issue #21, item 3, on a remote): Remote.prune keeps what Vault.prune keeps
(never a model's latest, never an aliased version unless told), deletes the rest in one
log entry chosen from the state it lands on, and names the bytes the next remote gc
frees; a dry run writes nothing. Each on a file:// and a memory:// remote."""

from __future__ import annotations

import json
import uuid as uuids
from datetime import timezone

import numpy as np
import pytest
from click.testing import CliRunner
from test_prune import RULES

import modelvault
from modelvault import IntegrityError, NotFoundError, Remote
from modelvault._cli import cli
from modelvault._remote import Store, _log

pytest.importorskip("obstore")

ALL = ["m:1", "m:2", "m:3", "m:4", "m:5", "m:6", "n:1", "n:2"]


def _weights(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(50_000).astype(np.float32)}


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path / 'remote'}"
    return f"memory://prune-{uuids.uuid4().hex}"


@pytest.fixture
def series(tmp_path, url):
    """A vault and the remote it pushed to, holding the same versions: m:1..6 (m:2
    @prod, m:3 tagged), n:1..2, each with weights of its own, each pushed alone (so in
    a pack object of its own)."""
    path = tmp_path / "a.vault"
    with modelvault.open(path) as vault:
        for i in range(1, 7):
            vault.save("m", _weights(i), aliases=["prod"] if i == 2 else [],
                       tags={"keep": "yes"} if i == 3 else None, parent=False)
            vault.push(url)
        for i in range(1, 3):
            vault.save("n", _weights(100 + i), parent=False)
            vault.push(url)
    return path, url


def _refs(remote: Remote) -> list[str]:
    return [v.ref for v in remote.versions()]


def _log_keys(remote: Remote) -> list[str]:
    return [m["path"] for m in remote.store.list("log/")]


@pytest.mark.parametrize(("rules", "left"), RULES)
def test_the_rules_keep_what_they_keep_in_a_vault_in_one_log_entry(series, rules, left):
    path, url = series
    remote = Remote(url)
    before = _log_keys(remote)
    report = remote.prune(**rules)
    assert _refs(remote) == left
    assert [v.ref for v in report.deleted] == sorted(set(ALL) - set(left))
    assert all(isinstance(v, modelvault.RemoteVersion) for v in report.deleted)
    assert report.kept == len(left) and not report.dry_run
    assert len(_log_keys(remote)) == len(before) + (left != ALL)  # one entry, or none
    with modelvault.open(path) as vault:  # the same rules, the same answer, as a vault
        local = vault.prune(**rules)
        assert [v.ref for v in vault.versions()] == left
        assert [(v.id, v.ref) for v in local.deleted] == [(v.id, v.ref)
                                                           for v in report.deleted]


def test_keep_since_by_date_string_and_datetime_for_one_model(series):
    path, url = series
    remote = Remote(url)
    times = {v.ref: v.created_at for v in remote.versions()}
    with modelvault.open(path, readonly=True) as vault:
        cut = vault.get("m:5").created_at
    assert times["m:5"] == cut.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert [v.ref for v in remote.prune("m", keep_since=cut, dry_run=True).deleted] == [
        "m:1", "m:3", "m:4"]
    naive = cut.astimezone(timezone.utc).replace(tzinfo=None)
    assert [v.ref for v in remote.prune("m", keep_since=naive, dry_run=True).deleted] == [
        "m:1", "m:3", "m:4"]
    report = remote.prune("m", keep_since="2999-01-01")
    assert [v.ref for v in report.deleted] == ["m:1", "m:3", "m:4", "m:5"]
    assert _refs(remote) == ["m:2", "m:6", "n:1", "n:2"]  # n untouched: prune("m")


def test_a_dry_run_writes_nothing_and_names_what_gc_frees(series, tmp_path):
    _, url = series
    remote = Remote(url)
    log, objects = _log_keys(remote), remote.store.list("")
    dry = remote.prune(keep_last=1, dry_run=True)
    assert dry.dry_run and [v.ref for v in dry.deleted] == ["m:1", "m:3", "m:4", "m:5",
                                                             "n:1"]
    assert _log_keys(remote) == log and remote.store.list("") == objects
    assert _refs(remote) == ALL
    real = remote.prune(keep_last=1)
    assert (real.deleted, real.kept, real.freed_bytes) == (dry.deleted, dry.kept,
                                                            dry.freed_bytes)
    assert real.freed_bytes > 5 * 150_000  # five versions' pack objects, at least
    assert remote.gc().bytes == 0  # nothing younger than the grace period goes
    assert remote.gc(grace=0).bytes == real.freed_bytes
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert [v.ref for v in b.versions()] == ["m:2", "m:6", "n:2"] and b.verify() == []


def test_what_a_kept_version_shares_or_bases_on_is_not_counted_and_stays(tmp_path, url):
    base = _weights(1)
    tuned = {"w": base["w"] + np.float32(1e-4)}
    with modelvault.open(tmp_path / "a.vault") as vault:
        for weights in (base, base, tuned):  # the same chunks again; then a delta of them
            vault.save("m", weights)
            vault.push(url)
    remote = Remote(url)
    manifests = {m["path"]: m["size"] for m in remote.store.list("versions/")}
    report = remote.prune(keep_last=1)
    assert [v.ref for v in report.deleted] == ["m:1", "m:2"]
    gone = {f"versions/{v.id}.json" for v in report.deleted}
    assert report.freed_bytes == sum(manifests[k] for k in gone)  # m:3's delta needs base
    assert remote.gc(grace=0).bytes == report.freed_bytes
    with modelvault.clone(url, tmp_path / "b.vault") as b:
        assert b.verify() == []
        np.testing.assert_array_equal(b.load("m")["w"], tuned["w"])


def _racing(monkeypatch, race):
    """Run ``race`` once, just before the next create-only write of a log entry: after
    a writer chose its events, before it appends them."""
    real = Store.put
    ran = []

    def put(self, key, data, *, create=False):
        if key.startswith("log/") and create and not ran:
            ran.append(key)
            race()
        return real(self, key, data, create=create)

    monkeypatch.setattr(Store, "put", put)
    return ran


def test_a_push_that_gets_in_first_is_judged_and_its_version_stays(series, monkeypatch):
    path, url = series

    def push():
        with modelvault.open(path) as vault:
            vault.save("m", _weights(7), parent=False)
            vault.push(url)

    ran = _racing(monkeypatch, push)
    report = Remote(url).prune("m", keep_last=2)
    assert ran  # the race ran, and the prune's first try lost the entry to it
    assert [v.ref for v in report.deleted] == ["m:1", "m:3", "m:4", "m:5"]  # m:5 is 3rd now
    assert _refs(Remote(url)) == ["m:2", "m:6", "m:7", "n:1", "n:2"]
    assert report.kept == 3


def test_a_version_pushed_again_meanwhile_is_judged_as_it_is_now(series, monkeypatch):
    path, url = series

    def push_again():  # m:5 deleted there and pushed again: now m:7, the latest
        Remote(url).delete("m:5")
        with modelvault.open(path) as vault:
            vault.push(url, ["m:5"])

    _racing(monkeypatch, push_again)
    report = Remote(url).prune("m", keep_last=1, keep_aliased=False)
    assert [v.ref for v in report.deleted] == ["m:1", "m:2", "m:3", "m:4", "m:6"]
    (left,) = [v for v in Remote(url).versions() if v.name == "m"]
    with modelvault.open(path) as vault:
        assert (left.ref, left.id) == ("m:7", vault.get("m:5").id)


def test_a_latest_deleted_by_a_writer_that_gets_in_first_makes_the_next_the_latest(
        series, monkeypatch):
    _, url = series
    _racing(monkeypatch, lambda: Remote(url).delete("m:6"))
    report = Remote(url).prune("m", keep_last=1, keep_aliased=False)
    assert [v.ref for v in report.deleted] == ["m:1", "m:2", "m:3", "m:4"]
    assert _refs(Remote(url)) == ["m:5", "n:1", "n:2"]  # never an emptied model


def test_an_alias_moved_by_a_writer_that_gets_in_first_keeps_its_version(series,
                                                                         monkeypatch):
    path, url = series

    def alias():
        with modelvault.open(path) as vault:
            vault.alias("m:4", "stable")
            vault.push(url, ["m:4"])

    _racing(monkeypatch, alias)
    report = Remote(url).prune("m", keep_last=1)
    assert [v.ref for v in report.deleted] == ["m:1", "m:3", "m:5"]
    assert _refs(Remote(url)) == ["m:2", "m:4", "m:6", "n:1", "n:2"]


def _append(remote: Remote, events: list) -> None:
    """A log entry as anyone who can write the bucket may make it."""
    seq = remote.log.state().seq + 1
    assert remote.store.put(_log.log_key(seq), json.dumps({"events": events}).encode(),
                            create=True)


def test_odd_log_entries_are_skipped_and_only_well_formed_versions_pruned(series):
    _, url = series
    remote = Remote(url)
    (m1,) = [v for v in remote.versions() if v.ref == "m:1"]
    add = {"op": "add", "model": "m", "uuid": str(uuids.uuid4()), "number": 9,
           "created_at": m1.created_at, "kind": "arrays", "size": 24}
    # Hostile: versions that are not well-formed (a number past SQLite's integers, a
    # time that is a number, a model and a uuid that are paths), the alias 'latest' on
    # m:1, a tag with a number, a delete of no uuid; and junk where pack objects lie.
    _append(remote, [{**add, "number": 2**64}, {**add, "created_at": 5},
                     {**add, "model": "../x"}, {**add, "uuid": "../../x"},
                     {"op": "alias", "model": "m", "alias": "latest", "uuid": m1.id},
                     {"op": "tag", "uuid": m1.id, "key": "k", "value": 5},
                     {"op": "delete", "uuid": ["not", "a", "uuid"]}, "junk", None])
    remote.store.put("packs/README", b"not a pack object")
    before = len(_log_keys(remote))
    report = Remote(url).prune(keep_last=1)
    assert [v.ref for v in report.deleted] == ["m:1", "m:3", "m:4", "m:5", "n:1"]
    assert _refs(Remote(url)) == ["m:2", "m:6", "n:2"]
    assert len(_log_keys(remote)) == before + 1
    assert Remote(url).gc(grace=0).bytes == report.freed_bytes


@pytest.mark.parametrize("manifest", [None, b'{"chunks": 5}', b'{"chunks": [[1, 2]]}',
                                      b"[]"])
def test_a_version_whose_manifest_cannot_say_its_chunks_stops_prune_and_gc(series,
                                                                            manifest):
    _, url = series
    remote = Remote(url)
    (m1,) = [v for v in remote.versions() if v.ref == "m:1"]
    phantom = str(uuids.uuid4())  # well-formed in the log: the latest m, kept
    _append(remote, [{"op": "add", "model": "m", "uuid": phantom, "number": 7,
                      "created_at": m1.created_at, "kind": "arrays", "size": 24}])
    if manifest is not None:
        remote.store.put(f"versions/{phantom}.json", manifest)
    log = _log_keys(remote)
    with pytest.raises(IntegrityError, match=phantom):
        Remote(url).prune(keep_last=1)
    with pytest.raises(IntegrityError, match=phantom):
        Remote(url).gc(grace=0)
    assert _log_keys(remote) == log  # nothing deleted
    assert len(Remote(url).versions()) == 9


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ((), {}, ValueError, "needs a rule"),
    ((), {"keep_aliased": False}, ValueError, "needs a rule"),
    ((), {"keep_last": 0}, ValueError, "at least 1"),
    ((), {"keep_since": "yesterday"}, ValueError, "ISO 8601"),
    ((), {"keep_since": 12}, TypeError, "datetime"),
    (("../x",), {"keep_last": 1}, ValueError, "name"),
    (("nope",), {"keep_last": 1}, NotFoundError, "nope"),
])
def test_bad_rules_and_unknown_models_are_refused_before_anything_is_written(
        series, args, kwargs, error, match):
    _, url = series
    remote = Remote(url)
    objects = remote.store.list("")
    with pytest.raises(error, match=match):
        remote.prune(*args, **kwargs)
    assert remote.store.list("") == objects


def test_no_remote_there_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="no modelvault remote"):
        Remote(f"file://{tmp_path}").prune(keep_last=1)


def test_the_cli_prints_what_it_deletes_and_what_remote_gc_frees(series):
    _, url = series
    run = CliRunner().invoke
    dry = run(cli, ["remote", "prune", url, "m", "--keep-last", "1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would delete 4 version(s), kept 2; `modelvault remote gc` "
                                 "would free")
    assert [line.split()[0] for line in dry.output.splitlines()[1:]] == [
        "m:1", "m:3", "m:4", "m:5"]
    done = run(cli, ["remote", "prune", url, "--keep-last", "1", "--keep-tagged",
                     "--drop-aliased", "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.output)
    assert [f"{v['name']}:{v['version']}" for v in out["deleted"]] == [
        "m:1", "m:2", "m:4", "m:5", "n:1"]
    assert out["deleted"][0]["created_at"].endswith("Z") and "id" in out["deleted"][0]
    assert out["kept"] == 3 and out["freed_bytes"] > 0 and out["dry_run"] is False
    refused = run(cli, ["remote", "prune", url])
    assert refused.exit_code != 0 and "needs a rule" in refused.output
    assert _refs(Remote(url)) == ["m:3", "m:6", "n:2"]
    gc = run(cli, ["remote", "gc", url, "--grace", "0"])
    assert gc.exit_code == 0 and f"{out['freed_bytes']:,} bytes" in gc.output
