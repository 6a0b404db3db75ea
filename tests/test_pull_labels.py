"""Pull follows the remote's aliases and tags the way git follows a remote's branches.

The vault remembers where each label was on the remote when it last pulled (format 7's
remote_aliases and remote_tags); a label nobody moved here since follows the remote,
one moved here only stays, one moved on both sides is a conflict reported in the same
words at every pull until ``prefer`` settles it (docs/remote.md, "Labels").
"""

from __future__ import annotations

import sqlite3
import uuid as uuids

import numpy as np
import pytest

import modelvault

pytest.importorskip("obstore")


@pytest.fixture
def url(tmp_path):
    return f"file://{tmp_path / 'remote'}"


@pytest.fixture
def app(tmp_path, url):
    """A clone (the app's vault) of a remote holding m:1, m:2, m:3 with m@prod on m:1 and
    m:1 tagged stage=base; yields (app vault, {number: version uuid})."""
    with modelvault.open(tmp_path / "trainer.vault") as trainer:
        ids = {n: trainer.save("m", {"w": np.full(3, float(n))},
                               aliases=["prod"] if n == 1 else (),
                               tags={"stage": "base"} if n == 1 else None).id
               for n in (1, 2, 3)}
        trainer.push(url)
    with modelvault.clone(url, tmp_path / "app.vault") as vault:
        yield vault, ids


def on_remote(url, *events):
    """Another writer's log entry on the remote: alias and tag events as they come."""
    modelvault.Remote(url).log.commit(lambda state: list(events))


def labels(vault):
    """m's aliases (alias: number) and m:1's tags, as the vault has them."""
    return ({a: v.version for v in vault.versions("m") for a in v.aliases},
            vault.get("m:1").tags)


def apply_here(vault, changes):
    for label, value in changes.items():
        if label.startswith("@"):
            if value is None:
                vault.unalias("m", label[1:])
            else:
                vault.alias(f"m:{value}", label[1:])
        else:
            vault.tag("m:1", {label: value})


def apply_there(url, ids, changes):
    on_remote(url, *[
        {"op": "alias", "model": "m", "alias": label[1:],
         "uuid": None if value is None else ids[value]} if label.startswith("@")
        else {"op": "tag", "uuid": ids[1], "key": label, "value": value}
        for label, value in changes.items()])


# (case, changed here, changed on the remote, prefer, expected here, a conflict reported)
# Both sides start at m@prod = m:1 and m:1 stage=base; "@x" is an alias (a number, or
# None: removed), else a tag of m:1 (None: removed).
CASES = [
    ("not moved here", {}, {"@prod": 2}, None, {"@prod": 2}, False),
    ("moved here only", {"@prod": 3}, {}, None, {"@prod": 3}, False),
    ("deleted there", {}, {"@prod": None}, None, {"@prod": None}, False),
    ("deleted here only", {"@prod": None}, {}, None, {"@prod": None}, False),
    ("new there", {}, {"@canary": 2}, None, {"@canary": 2, "@prod": 1}, False),
    ("new here", {"@canary": 3}, {}, None, {"@canary": 3, "@prod": 1}, False),
    ("moved both, alike", {"@prod": 2}, {"@prod": 2}, None, {"@prod": 2}, False),
    ("moved both", {"@prod": 3}, {"@prod": 2}, None, {"@prod": 3}, True),
    ("moved both, theirs", {"@prod": 3}, {"@prod": 2}, "theirs", {"@prod": 2}, False),
    ("moved both, ours", {"@prod": 3}, {"@prod": 2}, "ours", {"@prod": 3}, False),
    ("moved here, deleted there", {"@prod": 3}, {"@prod": None}, None, {"@prod": 3}, True),
    ("deleted here, moved there", {"@prod": None}, {"@prod": 2}, None, {"@prod": None},
     True),
    ("new on both sides", {"@canary": 3}, {"@canary": 2}, None, {"@canary": 3}, True),
    ("tag not changed here", {}, {"stage": "live"}, None, {"stage": "live"}, False),
    ("tag changed here only", {"stage": "dev"}, {}, None, {"stage": "dev"}, False),
    ("tag removed there", {}, {"stage": None}, None, {"stage": None}, False),
    ("tag new there", {}, {"owner": "ann"}, None, {"owner": "ann", "stage": "base"}, False),
    ("tag new here", {"owner": "bob"}, {}, None, {"owner": "bob"}, False),
    ("tag changed both", {"stage": "dev"}, {"stage": "live"}, None, {"stage": "dev"}, True),
    ("tag changed both, theirs", {"stage": "dev"}, {"stage": "live"}, "theirs",
     {"stage": "live"}, False),
    ("tag changed both, ours", {"stage": "dev"}, {"stage": "live"}, "ours",
     {"stage": "dev"}, False),
    ("tag new on both sides", {"owner": "bob"}, {"owner": "ann"}, None, {"owner": "bob"},
     True),
]


@pytest.mark.parametrize("case, here, there, prefer, expected, conflict", CASES,
                         ids=[c[0] for c in CASES])
def test_the_rule(app, url, case, here, there, prefer, expected, conflict):
    vault, ids = app
    apply_here(vault, here)
    apply_there(url, ids, there)
    report = vault.pull(url, prefer=prefer)
    aliases, tags = labels(vault)
    for label, value in expected.items():
        found = aliases.get(label[1:]) if label.startswith("@") else tags.get(label)
        assert found == value, (case, label)
    assert report.added == () and len(report.conflicts) == int(conflict), report.conflicts
    # A label taken from the remote is listed as moved; one kept is not.
    taken = {k: v for k, v in there.items() if expected.get(k, "kept") == v
             and here.get(k, "unchanged") != v}
    assert len(report.moved) == len(taken), report.moved
    # Settled: the next pull (preferring nothing) moves nothing, and reports a conflict
    # again only where it was left unsettled.
    again = vault.pull(url)
    assert again.moved == () and again.conflicts == report.conflicts
    assert labels(vault) == (aliases, tags)


def test_the_issues_app_follows_production_after_the_trainer_moves_it(tmp_path, url, run):
    """A team saves churn:2, moves @production to it and pushes; the app's vault, cloned
    with churn@production, pulls: @production is churn:2, and nothing is a conflict."""
    trainer_path, app_path = tmp_path / "trainer.vault", tmp_path / "app.vault"
    with modelvault.open(trainer_path) as trainer:
        trainer.save("churn", {"w": np.zeros(4)}, aliases=["production"])
        trainer.push(url)
    modelvault.clone(url, app_path, ["churn@production"]).close()
    with modelvault.open(trainer_path) as trainer:
        trainer.save("churn", {"w": np.ones(4)}, aliases=["production"])
        trainer.push(url)
    result = run("pull", app_path, url)
    assert result.exit_code == 0, result.output
    assert f"churn@production: churn:1 -> churn:2 (from {url})" in result.output
    assert "conflict" not in result.output
    with modelvault.open(app_path) as app:
        assert app.get("churn@production").version == 2
        np.testing.assert_array_equal(app.load("churn@production")["w"], np.ones(4))
        # The trainer moves it back: the app follows again.
        with modelvault.open(trainer_path) as trainer:
            trainer.alias("churn:1", "production")
            trainer.push(url, ["churn:1"])
        report = app.pull(url, ["churn@production"])
        assert app.get("churn@production").version == 1 and report.conflicts == ()


def test_a_conflict_is_one_line_in_the_same_words_at_every_pull_naming_the_remote(app, url,
                                                                                 run):
    vault, ids = app
    vault.alias("m:3", "prod")
    apply_there(url, ids, {"@prod": 2, "stage": "live"})
    vault.tag("m:1", stage="dev")
    first = vault.pull(url)
    assert first.conflicts == (
        f"m@prod: m:3 here, m:2 on {url} (moved on both sides since the last pull; pull "
        "with --theirs to take the remote's, --ours to keep this one)",
        f"m:1 tag stage: 'dev' here, 'live' on {url} (changed on both sides since the last "
        "pull; pull with --theirs to take the remote's, --ours to keep this one)")
    assert vault.pull(url).conflicts == first.conflicts
    assert not any(".pull-" in c or "\n" in c for c in first.conflicts)
    result = run("pull", vault.path, url)
    assert result.exit_code == 0
    assert [line.strip() for line in result.output.splitlines() if "conflict:" in line] == [
        f"conflict: {c}" for c in first.conflicts]
    result = run("pull", vault.path, url, "--theirs", "--ours")
    assert result.exit_code == 2 and "exclusive" in result.output
    result = run("pull", vault.path, url, "--theirs")
    assert result.exit_code == 0 and "conflict:" not in result.output
    assert f"moved: m@prod: m:3 -> m:2 (from {url})" in result.output
    assert labels(vault) == ({"prod": 2}, {"stage": "live"})
    with pytest.raises(ValueError):
        vault.pull(url, prefer="mine")


def test_a_tag_key_that_is_no_plain_word_is_quoted_and_cut_short_in_report_lines(app, url):
    """Keys are any non-empty text, here as on a remote: a newline or a terminal escape in
    one made two lines of one conflict (or wrote to the terminal), a 1 MB one a 1 MB line."""
    vault, ids = app
    odd, long = "a\n\x1b[2Jconflict: b", "k" * 1_000_000
    vault.tag("m:1", {odd: "here", long: "here"})
    apply_there(url, ids, {odd: "there", long: "there", "owner\tx": "ann"})
    report = vault.pull(url)
    lines = report.conflicts + report.moved
    assert len(lines) == 3 and all(line.isprintable() and len(line) < 400 for line in lines)
    assert report.moved == (f"m:1 tag 'owner\\tx': unset -> 'ann' (from {url})",)
    assert f"m:1 tag {odd!r}: 'here' here, 'there' on {url}" in report.conflicts[0]
    assert len(str(report).splitlines()) == 4


def test_never_seen_labels_that_differ_are_a_conflict_until_settled(app, url):
    """A vault with no record of the remote (upgraded from format 6, or filled by a
    merge): labels equal on both sides are recorded, those that differ are conflicts."""
    vault, ids = app
    with sqlite3.connect(vault.path) as db:
        db.execute("DELETE FROM remote_aliases")
        db.execute("DELETE FROM remote_tags")
    db.close()
    apply_there(url, ids, {"@prod": 2, "@canary": 3})
    report = vault.pull(url)
    assert report.conflicts == (
        f"m@prod: m:1 here, m:2 on {url} (set differently on both sides before any pull "
        "from there; pull with --theirs to take the remote's, --ours to keep this one)",)
    assert labels(vault)[0] == {"prod": 1, "canary": 3}  # new there: taken
    assert vault.pull(url, prefer="ours").conflicts == ()  # settled: m:2 seen there
    assert vault.pull(url).conflicts == ()
    apply_there(url, ids, {"@prod": 3})  # moved there again: a conflict again
    (line,) = vault.pull(url).conflicts
    assert line.startswith(f"m@prod: m:1 here, m:3 on {url} (moved on both sides since")


def test_an_alias_at_a_version_not_pulled_waits_for_it(app, url, tmp_path):
    vault, ids = app
    with modelvault.open(tmp_path / "trainer.vault") as trainer:
        trainer.save("m", {"w": np.full(3, 4.0)}, aliases=["prod"])
        trainer.save("n", {"w": np.zeros(2)}, aliases=["prod"])
        trainer.push(url)
    report = vault.pull(url, ["m:2"])  # m:4 not pulled: m@prod stays, and nothing is said
    assert report.moved == report.conflicts == () and labels(vault)[0] == {"prod": 1}
    report = vault.pull(url, ["m:4"])  # n is not in scope
    assert report.moved == (f"m@prod: m:1 -> m:4 (from {url})",)
    assert [m.name for m in vault.models()] == ["m"]
    report = vault.pull(url)
    assert [v.ref for v in report.added] == ["n:1"]
    assert report.moved == (f"n@prod: unset -> n:1 (from {url})",)


def test_a_push_records_what_it_leaves_equal_so_the_next_pull_follows(app, url, tmp_path):
    vault, ids = app
    mine = vault.save("m", {"w": np.full(3, 9.0)}, aliases=["prod"])
    vault.push(url)  # sends m:4 and m@prod with it
    on_remote(url, {"op": "alias", "model": "m", "alias": "prod", "uuid": ids[2]})
    report = vault.pull(url)
    assert report.conflicts == () and labels(vault)[0] == {"prod": 2}
    # A vault opened read-only pushes, and records nothing.
    vault.alias(mine, "prod")
    vault.push(url, [mine])
    with modelvault.open(vault.path, readonly=True) as readonly:
        assert readonly.push(url).added == ()


def test_a_push_from_a_vault_that_is_behind_does_not_move_the_alias_back(app, url,
                                                                         tmp_path):
    vault, ids = app
    with modelvault.open(tmp_path / "trainer.vault") as trainer:
        trainer.alias("m:2", "prod")
        trainer.push(url, ["m:2"])
    vault.save("other", {"w": np.arange(3)})
    vault.push(url)  # behind: its m@prod is m:1, as it last saw there
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert listed["m:2"].aliases == ("prod",)
    report = vault.pull(url)  # and it still follows
    assert report.conflicts == () and labels(vault)[0] == {"prod": 2}


def test_a_push_naming_a_version_it_is_behind_on_moves_no_label_back(app, url, tmp_path):
    """Named, m:1 goes along with its labels only where this vault moved them since it
    last saw the remote: m@prod and m:1's tag, moved there meanwhile, stay there."""
    vault, ids = app
    apply_there(url, ids, {"@prod": 2, "stage": "tuned"})
    vault.push(url, ["m:1"])  # behind on both: its m@prod and stage are as it saw them
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert listed["m:2"].aliases == ("prod",) and listed["m:1"].tags == {"stage": "tuned"}
    vault.alias("m:3", "prod")  # moved here since: now the push sends it
    vault.push(url, ["m:3"])
    assert {v.ref: v for v in modelvault.Remote(url).versions()}["m:3"].aliases == ("prod",)


def test_a_pull_that_ran_long_does_not_take_back_what_a_later_pull_followed(
        app, url, tmp_path, monkeypatch):
    """Two pulls into one vault: the first reads the log, then gathers a version for a
    while; meanwhile the remote moves m@prod and a second pull follows it. The first then
    settles by the log as it is now: judged by the one it read, m@prod was moved here
    since (to where the other pull put it) and not there, so it moved it back."""
    from modelvault._remote import _pull

    vault, ids = app
    with modelvault.open(tmp_path / "trainer.vault") as trainer:
        trainer.save("m", {"w": np.full(3, 4.0)})
        trainer.push(url)
    gather, calls = _pull._pull_from_good_copies, []

    def meanwhile(*args):
        calls.append(args)
        if len(calls) == 1:
            apply_there(url, ids, {"@prod": 2})
            with modelvault.open(vault.path) as other:
                assert other.pull(url).moved == (f"m@prod: m:1 -> m:2 (from {url})",)
        return gather(*args)

    monkeypatch.setattr(_pull, "_pull_from_good_copies", meanwhile)
    report = vault.pull(url)
    assert report.moved == report.conflicts == () and labels(vault)[0] == {"prod": 2}


def test_a_version_pushed_again_after_a_delete_there_takes_its_tags_along(app, url):
    """Named, a version deleted on the remote goes back with its tags: what was last
    seen of them was of the copy deleted there. (They stayed behind, and the next pull
    took their absence there for a removal and removed them here.)"""
    vault, ids = app
    modelvault.Remote(url).delete("m:1")
    vault.push(url, ["m:1"])
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert listed["m:4"].id == ids[1] and listed["m:4"].tags == {"stage": "base"}
    assert vault.pull(url).conflicts == () and vault.get("m:1").tags == {"stage": "base"}


def test_a_clone_records_the_remotes_labels(app, url):
    vault, ids = app
    with sqlite3.connect(vault.path) as db:
        assert db.execute("SELECT remote, model, alias, uuid FROM remote_aliases"
                          ).fetchall() == [(url, "m", "prod", ids[1])]
        assert db.execute("SELECT remote, uuid, key, value FROM remote_tags").fetchall() == [
            (url, ids[1], "stage", "base")]
    db.close()


def test_a_version_deleted_on_the_remote_leaves_no_record(app, url):
    vault, ids = app
    modelvault.Remote(url).delete("m:1")
    report = vault.pull(url)
    assert labels(vault) == ({}, {"stage": "base"})  # m@prod went with m:1 there
    assert report.moved == (f"m@prod: m:1 -> unset (from {url})",)
    with sqlite3.connect(vault.path) as db:
        assert db.execute("SELECT count(*) FROM remote_tags").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM remote_aliases").fetchone() == (0,)
    db.close()


def test_a_version_deleted_here_comes_back_with_its_tags(app, url):
    """A pull that brings back a version deleted here (a prune, a delete) brings its
    tags with it, as with any version it adds: what was last seen of them describes the
    copy deleted, not a change made here (they stayed behind, unset)."""
    vault, ids = app
    vault.delete("m:1")
    report = vault.pull(url)
    assert [v.id for v in report.added] == [ids[1]] and report.conflicts == ()
    assert vault.get("m:1").tags == {"stage": "base"} and report.moved == ()
    assert vault.pull(url).moved == ()


HOSTILE = [
    ("an integer uuid", "INSERT INTO remote_aliases VALUES (:url, 'm', 'prod', 12345)"),
    ("a blob uuid", "INSERT INTO remote_aliases VALUES (:url, 'm', 'prod', x'00ff')"),
    ("text that is not UTF-8",
     "INSERT INTO remote_aliases VALUES (:url, 'm', 'prod', CAST(x'c328ff' AS TEXT))"),
    ("an unknown uuid", "INSERT INTO remote_aliases VALUES (:url, 'm', 'prod', :unknown)"),
    ("another model's version",
     "INSERT INTO remote_aliases VALUES (:url, 'm', 'prod', :other)"),
    ("a huge uuid",
     "INSERT INTO remote_aliases VALUES (:url, 'm', 'prod', :unknown || zeroblob(9000))"),
    ("a huge value", "INSERT INTO remote_tags VALUES (:url, :m1, 'stage', "
                     "CAST(zeroblob(9000) AS TEXT))"),
    ("a blob value", "INSERT INTO remote_tags VALUES (:url, :m1, 'stage', "
                     "CAST('base' AS BLOB))"),
    ("an empty tag key", "INSERT INTO remote_tags VALUES (:url, :m1, '', 'base')"),
]


@pytest.mark.parametrize("case, sql", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_record_counts_as_absent(app, url, monkeypatch, case, sql):
    """Rows a stranger wrote into the file: of the wrong type, not UTF-8, too long (past
    a log entry's limit, lowered here), naming no version or another model's. Each
    counts as no record: the label differs on both sides and was never seen, so the
    pull reports a conflict and keeps ours, never raises."""
    vault, ids = app
    monkeypatch.setenv("MODELVAULT_REMOTE_MAX_LOG", "8192")
    vault.save("other", {"w": np.zeros(1)})
    with sqlite3.connect(vault.path) as db:
        db.execute("DELETE FROM remote_aliases")
        db.execute("DELETE FROM remote_tags")
        db.execute(sql, {"url": url, "unknown": str(uuids.uuid4()), "m1": ids[1],
                         "other": vault.get("other").id})
    db.close()
    apply_there(url, ids, {"@prod": 2, "stage": "live"})
    vault.tag("m:1", stage="dev")
    report = vault.pull(url)
    what = "m@prod: " if "remote_aliases" in sql else "m:1 tag stage: "
    (line,) = [c for c in report.conflicts if c.startswith(what)]
    assert "before any pull from there" in line
    assert labels(vault) == ({"prod": 1}, {"stage": "dev"}) and vault.verify() == []


@pytest.mark.parametrize("sql", [
    "INSERT INTO aliases (model_id, alias, version_id) SELECT model_id, x'70726f64', id "
    "FROM versions WHERE uuid = :m3",
    "INSERT INTO tags (version_id, key, value) SELECT id, x'6b', 'v' FROM versions "
    "WHERE uuid = :m1",
    "INSERT INTO tags (version_id, key, value) SELECT id, 'k', x'76' FROM versions "
    "WHERE uuid = :m1"], ids=["a blob alias", "a blob tag key", "a blob tag value"])
def test_labels_of_a_stranger_that_are_not_text_are_passed_by(app, url, sql):
    """The vault's own aliases and tags tables are the file's maker's too: a label that
    is a blob is no label to follow or send (sorting it among text ones, or writing it
    into a log entry, raised TypeError)."""
    vault, ids = app
    with sqlite3.connect(vault.path) as db:
        db.execute(sql, {"m1": ids[1], "m3": ids[3]})
    db.close()
    apply_there(url, ids, {"@prod": 2, "stage": "live"})
    report = vault.pull(url)
    assert report.conflicts == () and labels(vault)[0]["prod"] == 2
    assert vault.get("m:1").tags["stage"] == "live"
    vault.alias("m:3", "prod")
    vault.push(url, ["m:1", "m:3"])
    listed = {v.ref: v for v in modelvault.Remote(url).versions()}
    assert listed["m:3"].aliases == ("prod",) and listed["m:1"].tags == {"stage": "live"}


def test_an_alias_row_of_another_model_than_its_version_is_not_pushed(app, url):
    vault, ids = app
    vault.save("n", {"w": np.zeros(1)})
    with sqlite3.connect(vault.path) as db:  # n@canary, on m:3 (the file's maker's row)
        db.execute("INSERT INTO aliases (model_id, alias, version_id) SELECT "
                   "(SELECT id FROM models WHERE name = 'n'), 'canary', id FROM versions "
                   "WHERE uuid = ?", (ids[3],))
    db.close()
    vault.push(url, ["m:3"])  # it sent m@canary, an alias m has nowhere
    assert {v.ref: v for v in modelvault.Remote(url).versions()}["m:3"].aliases == ()


def test_alias_records_with_names_that_are_not_aliases_are_passed_by(app, url):
    vault, ids = app
    with sqlite3.connect(vault.path) as db:
        for alias in ("latest", "7", "a b", "../x", "x" * 300):
            db.execute("INSERT INTO remote_aliases VALUES (?, 'm', ?, ?)",
                       (url, alias, ids[1]))
        db.execute("INSERT INTO remote_aliases VALUES (?, '../m', 'prod', ?)", (url, ids[1]))
    db.close()
    apply_there(url, ids, {"@prod": 2})
    report = vault.pull(url)
    assert report.conflicts == () and labels(vault)[0] == {"prod": 2}
    assert report.moved == (f"m@prod: m:1 -> m:2 (from {url})",)


def test_a_pull_that_changes_nothing_writes_nothing(app, url):
    vault, _ = app
    vault.pull(url)
    before = vault.path.stat().st_mtime_ns, vault.path.read_bytes()
    with modelvault.open(vault.path, readonly=True) as readonly:
        assert readonly.pull(url).moved == ()
    assert (vault.path.stat().st_mtime_ns, vault.path.read_bytes()) == before
    # Nor does a read-only one with no record of the remote (filled by a merge): it would
    # only record what is equal, and raised ReadOnlyError for that.
    with sqlite3.connect(vault.path) as db:
        db.execute("DELETE FROM remote_aliases")
        db.execute("DELETE FROM remote_tags")
    db.close()
    before = vault.path.stat().st_mtime_ns, vault.path.read_bytes()
    with modelvault.open(vault.path, readonly=True) as readonly:
        report = readonly.pull(url)
        assert report.moved == report.conflicts == ()
    assert (vault.path.stat().st_mtime_ns, vault.path.read_bytes()) == before
