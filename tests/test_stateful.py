"""A vault behaves like a plain dict of models under any sequence of operations."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import modelvault
from modelvault import NotFoundError

NAMES = ["churn", "team/fraud", "x.y-z"]
ALIASES = ["prod", "staging"]
TAG_KEYS = ["stage", "owner"]

# Arrays of a few chunks, shared between saves so that versions share chunks and
# deleting one version must not take another's chunks with it. The last two are
# "fine-tunes" of the one before them: saved after it under the same key, their
# chunks become XOR deltas whose bases must outlive the versions that used them.
_rng = np.random.default_rng(0)
_tuned = _rng.standard_normal(160_000)  # 1.3 MB: two chunks
POOL = [_rng.standard_normal(20_000), np.arange(50_000, dtype=np.int32),
        _rng.integers(0, 256, 140_000, dtype=np.uint8), _tuned,
        _tuned + _rng.standard_normal(160_000) * 1e-9,
        _tuned + _rng.standard_normal(160_000) * 1e-12]

ARRAYS = st.one_of(
    st.sampled_from(range(len(POOL))).map(lambda i: POOL[i]),
    hnp.arrays(dtype=st.sampled_from([np.dtype("<f8"), np.dtype(">i2"), np.dtype("u1")]),
               shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5)),
)
try:  # where torch is installed, tensors (bf16 fine-tunes among them) join the pool
    import torch
except ImportError:
    torch = None
else:
    _weights = torch.from_numpy(_tuned.astype(np.float32)).reshape(400, 400)
    TENSORS = [_weights, _weights.to(torch.bfloat16), (_weights + 1e-3).to(torch.bfloat16),
               torch.arange(12, dtype=torch.int64).reshape(3, 4)[:, ::2]]
    ARRAYS = st.one_of(ARRAYS, st.sampled_from(range(len(TENSORS))).map(lambda i: TENSORS[i]))
VALUES = st.one_of(
    st.dictionaries(st.sampled_from(["w", "b", "emb"]), ARRAYS, max_size=3),
    st.lists(st.integers(-(2**40), 2**40), max_size=5),
)


class Model:
    """What the vault should hold, as plain Python."""

    def __init__(self):
        # name -> {"next": int, "versions": {number: value}, "aliases": {alias: number},
        #          "tags": {number: {key: value}}, "ids": {number: version uuid}}
        self.models = {}
        # What the vault last saw on its remote: (name, alias) -> uuid, (uuid, key) -> value.
        self.seen = {}
        self.seen_tags = {}

    def live(self):
        return {name: m for name, m in self.models.items() if m["versions"]}


def follow(ours, theirs, seen, prefer):
    """One label after a pull, by docs/remote.md's "Labels": (ours, seen, a conflict)."""
    if ours == theirs:
        return ours, theirs, False
    if theirs == seen:
        return ours, seen, False
    if ours == seen or prefer == "theirs":
        return theirs, theirs, False
    return ours, theirs if prefer == "ours" else seen, prefer is None


def set_or_drop(mapping, key, value):
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def assert_same(loaded, expected):
    assert type(loaded) is type(expected)
    if isinstance(expected, np.ndarray):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        np.testing.assert_array_equal(loaded, expected)
    elif torch is not None and isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert list(loaded) == list(expected)
        for key in expected:
            assert_same(loaded[key], expected[key])
    else:
        assert loaded == expected


class VaultMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="modelvault-state-"))
        self.path = self.folder / "models.vault"
        self.vault = modelvault.open(self.path)
        self.model = Model()

    def teardown(self):
        self.vault.close()
        try:
            assert os.listdir(self.folder) == [self.path.name]
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------

    def _pick_version(self, data):
        live = self.model.live()
        name = data.draw(st.sampled_from(sorted(live)), label="name")
        number = data.draw(st.sampled_from(sorted(live[name]["versions"])), label="version")
        return name, number

    def _has_versions(self):
        return bool(self.model.live())

    # -- rules ---------------------------------------------------------------------

    @initialize(name=st.sampled_from(NAMES), value=VALUES)
    def first_save(self, name, value):
        self.save(name, value, None)

    @rule(name=st.sampled_from(NAMES), value=VALUES,
          alias=st.none() | st.sampled_from(ALIASES))
    def save(self, name, value, alias):
        entry = self.model.models.setdefault(
            name, {"next": 1, "versions": {}, "aliases": {}, "tags": {}, "ids": {}})
        mv = self.vault.save(name, value, aliases=[alias] if alias else ())
        assert mv.version == entry["next"]
        assert mv.name == name
        entry["next"] += 1
        entry["versions"][mv.version] = value
        entry["tags"][mv.version] = {}
        entry["ids"][mv.version] = mv.id
        if alias:
            entry["aliases"][alias] = mv.version

    @precondition(_has_versions)
    @rule(data=st.data(), how=st.sampled_from(["latest", "number", "alias", "record"]))
    def load(self, data, how):
        live = self.model.live()
        name = data.draw(st.sampled_from(sorted(live)), label="name")
        entry = live[name]
        if how == "latest":
            ref, number = name, max(entry["versions"])
        elif how == "alias" and entry["aliases"]:
            alias = data.draw(st.sampled_from(sorted(entry["aliases"])), label="alias")
            ref, number = f"{name}@{alias}", entry["aliases"][alias]
        else:
            number = data.draw(st.sampled_from(sorted(entry["versions"])), label="version")
            ref = f"{name}:{number}"
        if how == "record":
            ref = self.vault.get(ref)
        assert self.vault.get(ref).version == number
        assert_same(self.vault.load(ref), entry["versions"][number])

    @precondition(_has_versions)
    @rule(data=st.data())
    def delete_version(self, data):
        name, number = self._pick_version(data)
        assert self.vault.delete(f"{name}:{number}") == 1
        entry = self.model.models[name]
        del entry["versions"][number]
        del entry["tags"][number]
        del entry["ids"][number]
        entry["aliases"] = {a: n for a, n in entry["aliases"].items() if n != number}
        with pytest.raises(NotFoundError):
            self.vault.get(f"{name}:{number}")

    @rule(name=st.sampled_from(NAMES))
    def delete_model(self, name):
        entry = self.model.models.get(name)
        if entry is None:
            # Nothing to delete by that name: the vault says so.
            with pytest.raises(NotFoundError):
                self.vault.delete(name)
            return
        assert self.vault.delete(name) == len(entry["versions"])
        del self.model.models[name]  # numbering starts again from 1
        with pytest.raises(NotFoundError):
            self.vault.get(name)

    @precondition(_has_versions)
    @rule(data=st.data(), alias=st.sampled_from(ALIASES))
    def alias(self, data, alias):
        name, number = self._pick_version(data)
        mv = self.vault.alias(f"{name}:{number}", alias)
        assert alias in mv.aliases
        self.model.models[name]["aliases"][alias] = number

    @rule(name=st.sampled_from(NAMES), alias=st.sampled_from(ALIASES))
    def unalias(self, name, alias):
        entry = self.model.models.get(name)
        if entry is None or alias not in entry["aliases"]:
            with pytest.raises(NotFoundError):
                self.vault.unalias(name, alias)
            return
        self.vault.unalias(name, alias)
        del entry["aliases"][alias]

    @precondition(_has_versions)
    @rule(data=st.data(), key=st.sampled_from(TAG_KEYS),
          value=st.none() | st.text(max_size=5) | st.integers(-5, 5))
    def tag(self, data, key, value):
        name, number = self._pick_version(data)
        mv = self.vault.tag(f"{name}:{number}", {key: value})
        tags = self.model.models[name]["tags"][number]
        if value is None:
            tags.pop(key, None)
        else:
            tags[key] = str(value)
        assert mv.tags == tags

    @rule(collect=st.booleans(), reopen=st.booleans())
    def housekeeping(self, collect, reopen):
        if collect:
            before = self.vault.stats()
            freed = self.vault.gc()
            after = self.vault.stats()
            assert freed >= 0
            assert after.file_bytes == before.file_bytes - freed
            assert after.chunks <= before.chunks
            assert (after.versions, after.raw_bytes) == (before.versions, before.raw_bytes)
        if reopen:
            self.vault.close()
            assert os.listdir(self.folder) == [self.path.name]  # no -journal, -wal or -shm
            self.vault = modelvault.open(self.path)

    @rule()
    def export_and_carry_on_in_the_copy(self):
        # The copy must hold the same versions (same ids and digests, so the same bytes:
        # verify() re-hashes them), and be a vault the next rules can go on using.
        copy_path = self.folder / "copy.vault"
        self.vault.export(copy_path)
        before = {v.ref: (v.id, v.digest, v.aliases, v.tags) for v in self.vault.versions()}
        self.vault.close()
        os.replace(copy_path, self.path)
        self.vault = modelvault.open(self.path)
        assert {v.ref: (v.id, v.digest, v.aliases, v.tags)
                for v in self.vault.versions()} == before
        self.model.seen, self.model.seen_tags = {}, {}  # a copy of the versions only

    @rule(data=st.data(), name=st.sampled_from(NAMES), theirs=VALUES, ours=st.none() | VALUES,
          alias=st.none() | st.sampled_from(ALIASES), forget=st.booleans())
    def merge_a_conflicted_copy(self, data, name, theirs, ours, alias, forget):
        # A copy goes its own way (one save, maybe moving an alias); here a version may
        # be deleted and one saved. Merging the copy back loses nothing: the deleted
        # version returns with its number, theirs gets a new number if ours took it.
        side_path = self.folder / "side.vault"
        self.vault.export(side_path)
        with modelvault.open(side_path) as side:
            mine = side.save(name, theirs, aliases=[alias] if alias else ())
            number = mine.version
        forgotten = None
        if forget and self._has_versions():
            forgotten = self._pick_version(data)
            self.vault.delete("{}:{}".format(*forgotten))  # the model keeps it: it comes back
        entry = self.model.models.setdefault(
            name, {"next": 1, "versions": {}, "aliases": {}, "tags": {}, "ids": {}})
        if ours is not None:
            self.save(name, ours, None)
        report = self.vault.merge(side_path)
        expected = number if number not in entry["versions"] else entry["next"]
        assert report.renumbered == (((name, number, expected),) if expected != number else ())
        assert sorted(v.ref for v in report.added) == sorted(
            [f"{name}:{expected}"] + (["{}:{}".format(*forgotten)] if forgotten else []))
        entry["next"] = expected + 1
        entry["versions"][expected] = theirs
        entry["tags"][expected] = {}
        entry["ids"][expected] = mine.id
        if alias:
            ours_kept = alias in entry["aliases"] and (name, entry["aliases"][alias]) != forgotten
            if not ours_kept:
                entry["aliases"][alias] = expected
        assert self.vault.merge(side_path).added == ()  # again: nothing left to bring
        os.unlink(side_path)

    @rule()
    def push_and_clone(self):
        # Everything pushed so far is on the remote (versions deleted here since stay
        # there), byte for byte; a clone holds each of this vault's versions whole.
        self._push()
        here = {v.id: v.digest for v in self.vault.versions()}
        on_remote = {v.id for v in modelvault.Remote(self.remote).versions()}
        assert on_remote == set(self.pushed)
        clone_path = self.folder / "clone.vault"
        with modelvault.clone(self.remote, clone_path) as clone:
            assert {v.id: v.digest for v in clone.versions()} == self.pushed
            assert clone.verify() == []
            if here:
                some = self.vault.versions()[-1]
                mine = next(v for v in clone.versions() if v.id == some.id)
                assert_same(clone.load(mine), self.vault.load(some))
        os.unlink(clone_path)

    def _push(self):
        """Push every version; the push records where the remote now has the labels it
        left equal on both sides."""
        if not hasattr(self, "remote"):
            self.remote, self.pushed = f"memory://{self.folder.name}", {}
        self.vault.push(self.remote)
        self.pushed.update({v.id: v.digest for v in self.vault.versions()})
        for name in self.model.live():
            for key, ours, theirs, _ in self._labels(name, self.model.seen, aliases=True):
                if ours == theirs:
                    set_or_drop(self.model.seen, key, theirs)
            for key, ours, theirs, _ in self._labels(name, self.model.seen_tags,
                                                     aliases=False):
                if ours == theirs:
                    set_or_drop(self.model.seen_tags, key, theirs)

    def _remote_labels(self):
        """The remote's aliases ((name, alias) -> uuid) and tags ((uuid, key) -> value),
        and its versions by uuid, as it lists them."""
        listed = modelvault.Remote(self.remote).versions()
        aliases = {(v.name, a): v.id for v in listed for a in v.aliases}
        tags = {(v.id, k): t for v in listed for k, t in v.tags.items()}
        return aliases, tags, {v.id: v for v in listed}

    def _labels(self, name, seen, *, aliases):
        """(key, ours, theirs, seen) of each alias of ``name`` (or each tag of its versions
        both here and on the remote) that any of the three has."""
        entry = self.model.models[name]
        number_of = {u: n for n, u in entry["ids"].items()}
        their_aliases, their_tags, there = self._remote_labels()
        if aliases:
            ours = {(name, a): entry["ids"][n] for a, n in entry["aliases"].items()}
            theirs = {k: u for k, u in their_aliases.items() if k[0] == name}
        else:
            both = {u for u in number_of if u in there}
            ours = {(u, k): v for u in both for k, v in entry["tags"][number_of[u]].items()}
            theirs = {k: v for k, v in their_tags.items() if k[0] in both}
        mine = {k: v for k, v in seen.items()
                if (k[0] == name if aliases else k[0] in number_of and k[0] in there)}
        return [(k, ours.get(k), theirs.get(k), mine.get(k))
                for k in sorted(ours.keys() | theirs.keys() | mine.keys())]

    @precondition(_has_versions)
    @rule(data=st.data(), alias=st.sampled_from(ALIASES), key=st.sampled_from(TAG_KEYS),
          value=st.none() | st.sampled_from(["a", "b"]),
          prefer=st.sampled_from([None, "theirs", "ours"]), push=st.booleans(),
          here=st.booleans())
    def pull_after_the_remote_moves_labels(self, data, alias, key, value, prefer, push,
                                           here):
        # Another writer moves (or removes) an alias and sets (or removes) a tag of a model
        # this vault shares with the remote; a pull of that model then follows each label
        # nobody moved here since, keeps those moved here only, and reports the others.
        if push or not hasattr(self, "remote"):
            self._push()
        _, _, there = self._remote_labels()
        shared = {name: sorted(n for n, u in entry["ids"].items() if u in there)
                  for name, entry in self.model.live().items()}
        shared = {name: numbers for name, numbers in shared.items() if numbers}
        if not shared:
            return
        name = data.draw(st.sampled_from(sorted(shared)), label="shared model")
        entry = self.model.models[name]
        target = data.draw(st.none() | st.sampled_from(shared[name]), label="alias there")
        tagged = data.draw(st.sampled_from(shared[name]), label="tagged there")
        elsewhere = sorted(n for n in entry["versions"] if n != target)
        if here and elsewhere:  # and this vault moves it too, elsewhere: a conflict, mostly
            number = data.draw(st.sampled_from(elsewhere), label="alias here")
            self.vault.alias(f"{name}:{number}", alias)
            entry["aliases"][alias] = number
        modelvault.Remote(self.remote).log.commit(lambda state: [
            {"op": "alias", "model": name, "alias": alias,
             "uuid": None if target is None else entry["ids"][target]},
            {"op": "tag", "uuid": entry["ids"][tagged], "key": key, "value": value}])
        number_of = {u: n for n, u in entry["ids"].items()}
        moved, conflicts = 0, 0
        for (_, name_alias), ours, theirs, seen in self._labels(name, self.model.seen,
                                                                aliases=True):
            if theirs is not None and theirs not in number_of:
                continue  # a version deleted here: left as it is
            now, seen_now, conflict = follow(ours, theirs, seen, prefer)
            moved += now != ours
            conflicts += conflict
            set_or_drop(entry["aliases"], name_alias,
                        None if now is None else number_of[now])
            set_or_drop(self.model.seen, (name, name_alias), seen_now)
        for (uuid, tag), ours, theirs, seen in self._labels(name, self.model.seen_tags,
                                                            aliases=False):
            now, seen_now, conflict = follow(ours, theirs, seen, prefer)
            moved += now != ours
            conflicts += conflict
            set_or_drop(entry["tags"][number_of[uuid]], tag, now)
            set_or_drop(self.model.seen_tags, (uuid, tag), seen_now)
        report = self.vault.pull(self.remote, [f"{name}:{there[entry['ids'][tagged]].version}"],
                                 prefer=prefer)
        assert report.added == ()
        assert (len(report.moved), len(report.conflicts)) == (moved, conflicts)
        assert all(self.remote in line for line in report.moved + report.conflicts)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def what_was_seen_on_the_remote_matches(self):
        if not hasattr(self, "remote"):
            return
        with sqlite3.connect(self.path) as db:
            aliases = {(m, a): u for m, a, u in db.execute(
                "SELECT model, alias, uuid FROM remote_aliases WHERE remote = ?",
                (self.remote,))}
            tags = {(u, k): v for u, k, v in db.execute(
                "SELECT uuid, key, value FROM remote_tags WHERE remote = ?", (self.remote,))}
        db.close()
        assert aliases == self.model.seen
        assert tags == self.model.seen_tags

    @invariant()
    def healthy(self):
        assert self.vault.verify() == []

    @invariant()
    def listings_match(self):
        live = self.model.live()
        infos = self.vault.models()
        assert [m.name for m in infos] == sorted(live)
        for info in infos:
            entry = live[info.name]
            assert info.versions == len(entry["versions"])
            assert info.latest == max(entry["versions"])
        for name in NAMES:
            if name not in live:
                with pytest.raises(NotFoundError):
                    self.vault.versions(name)
                continue
            entry = live[name]
            records = self.vault.versions(name)
            assert [r.version for r in records] == sorted(entry["versions"])
            for record in records:
                expected_aliases = sorted(a for a, n in entry["aliases"].items()
                                          if n == record.version)
                assert list(record.aliases) == expected_aliases
                assert record.tags == entry["tags"][record.version]

    @invariant()
    def stats_match(self):
        stats = self.vault.stats()
        live = self.model.live()
        assert stats.models == len(live)
        assert stats.versions == sum(len(e["versions"]) for e in live.values())
        assert stats.stored_bytes <= stats.unique_bytes


def test_vault_behaves_like_a_dict_of_models():
    run_state_machine_as_test(
        VaultMachine,
        settings=settings(max_examples=50, stateful_step_count=25, deadline=None))
