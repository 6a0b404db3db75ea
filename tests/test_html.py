"""Notebook views (``_repr_html_``): each parses as HTML, shows the fields a user looks
for, and shows what a vault file holds as text, bounded, whoever made the file."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from hostile import edit

import modelvault
from modelvault import _html
from modelvault._html import human_bytes
from modelvault._records import VersionList

# Every element and attribute the views write: anything else came from the file.
ELEMENTS = {"div", "strong", "em", "table", "tr", "th", "td", "details", "summary"}
ATTRIBUTES = {"style", "colspan", "cellpadding"}
HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>',
           "bell\x07 escape\x1b[31m nul\x00 rtl\u202eevil", "x" * 1_000_000]


class Page(HTMLParser):
    """The elements and text of an HTML fragment; fails on any tag left open or closed
    out of order."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.elements: set[str] = set()
        self.attributes: set[str] = set()
        self.texts: list[str] = []
        self.feed(markup)
        self.close()
        assert self.open == [], f"left open: {self.open}"

    def handle_starttag(self, tag, attrs):
        self.open.append(tag)
        self.elements.add(tag)
        self.attributes.update(name for name, _ in attrs)

    def handle_startendtag(self, tag, attrs):
        raise AssertionError(f"self-closing <{tag}/>")

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open}"
        self.open.pop()

    def handle_data(self, data):
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def page(markup: str) -> Page:
    """The parsed page, checked to hold only the views' own elements and attributes."""
    found = Page(markup)
    assert found.elements <= ELEMENTS, found.elements - ELEMENTS
    assert found.attributes <= ATTRIBUTES, found.attributes - ATTRIBUTES
    return found


@pytest.fixture
def saved(vault):
    vault.save("churn", {"w": np.zeros(1000)}, metadata={"auc": 0.91, "epochs": 3},
               tags={"team": "growth"}, aliases=["production"], description="first try")
    second = vault.save("churn", {"w": np.ones(1000), "b": np.ones(3)},
                        metadata={"auc": 0.93, "epochs": 4}, parent="churn:1")
    vault.save("team/weights", {"w": np.arange(10.0)})
    return second


def test_a_version_card_shows_its_fields(vault, saved):
    first = vault.get("churn:1")
    shown = page(first._repr_html_()).text
    for field in ("churn:1", "arrays", "first try", "production", "team=growth", "auc",
                  "0.91", "epochs", first.id, "signature", "trusted",
                  f"{first.created_at:%Y-%m-%d %H:%M:%S}",
                  human_bytes(first.size).replace(" ", "\u00a0"), "environment: Python",
                  "numpy"):
        assert field in shown, field
    assert "parent" in page(saved._repr_html_()).text and first.id in page(
        saved._repr_html_()).text
    assert "<details>" in first._repr_html_()  # the environment is folded


def test_plain_reprs_are_one_short_line(vault, saved):
    vault.tag("churn:1", note="y" * 100_000)
    long = vault.save("churn", {"w": np.ones(3)}, description="z\n" * 100_000)
    for record in (long, vault.get("churn:1"), vault.diff("churn:1", "churn:2")):
        assert "\n" not in repr(record) and len(repr(record)) < 100, repr(record)
    assert repr(long) == "<ModelVersion 'churn:3' arrays 24 B>"


def test_versions_list_is_a_plain_list_with_a_table_view(vault, saved):
    listed = vault.versions()
    assert isinstance(listed, VersionList) and isinstance(listed, list)
    assert listed == vault.versions() == list(listed)
    assert [v.ref for v in listed] == ["churn:1", "churn:2", "team/weights:1"]
    assert listed[1:] == list(listed)[1:] and listed[-1].ref == "team/weights:1"
    assert isinstance(vault.versions("churn"), VersionList)
    assert isinstance(vault.lineage("churn:2"), VersionList)
    assert "churn:1" in page(vault.lineage("churn:2")._repr_html_()).text
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(listed, protocol)) == listed
    assert copy.copy(listed) == listed and copy.deepcopy(listed) == listed
    assert json.dumps(VersionList([1, "a"])) == '[1, "a"]'
    assert listed + [] == listed and len(listed) == 3 and listed.count(saved) == 1
    shown = page(listed._repr_html_())
    assert "3 versions" in shown.text
    for ref in ("churn:1", "churn:2", "team/weights:1"):
        assert ref in shown.text
    assert listed._repr_html_().count("<tr>") == 4  # a header and one row each
    assert "0 versions" in page(VersionList()._repr_html_()).text


def test_a_vault_shows_its_models_sizes_and_aliases(vault, saved):
    shown = page(vault._repr_html_()).text
    for field in (str(vault.path), "2 models", "churn", "team/weights", "@production → 1",
                  human_bytes(vault.stats().file_bytes).replace(" ", "\u00a0")):
        assert field in shown, field
    assert page(modelvault.open(vault.path.with_name("empty.vault"))._repr_html_())


def test_floats_read_as_people_write_them_and_sizes_stay_on_one_line(vault):
    mv = vault.save("sums", {"w": np.zeros(3)},
                    metadata={"auc": 0.1 + 0.2, "nested": {"loss": 2 / 3}, "big": 1e300})
    shown = vault.versions("sums")._repr_html_() + mv._repr_html_()
    assert "0.3" in shown and "0.30000000000000004" not in shown
    assert "0.6666667" in shown and "0.6666666666666666" not in shown
    assert "1e+300" in shown
    assert "24\u00a0B" in shown and "24 B" not in shown


def test_a_closed_vault_says_so(vault, saved):
    vault.close()
    shown = page(vault._repr_html_()).text
    assert "closed" in shown and str(vault.path) in shown


def test_a_diff_shows_what_changed(vault, saved):
    d = vault.diff("churn:1", "churn:2")
    shown = page(d._repr_html_()).text
    for field in ("churn:1 → churn:2", "auc", "0.91", "0.93", "production", "first try",
                  "w", "b", "added", "changed", "float64", "100.0%"):
        assert field in shown, field
    same = vault.diff("churn:2", "churn:2")
    assert "no differences" in page(same._repr_html_()).text
    assert "2 entries the same" in page(same._repr_html_()).text


@pytest.mark.parametrize("hostile", HOSTILE, ids=["script", "attribute", "controls", "huge"])
def test_what_the_file_holds_shows_as_bounded_text(vault, hostile):
    vault.save("m", {"w": np.zeros(3)}, metadata={hostile: hostile, "ok": [hostile]},
               tags={"t": hostile}, aliases=["a"], description=hostile)
    vault.save("m", {"w": np.ones(3)})
    diff = vault.diff("m:1", "m:2")
    with edit(vault.path) as db:  # names and aliases the API refuses, as a stranger's file
        db.execute("UPDATE models SET name = ?", (hostile,))
        db.execute("UPDATE aliases SET alias = ?", (hostile,))
    listed = vault.versions()
    for markup in (listed[0]._repr_html_(), listed._repr_html_(), vault._repr_html_(),
                   diff._repr_html_(), _hostile_diff(hostile)._repr_html_()):
        shown = page(markup)  # no element or attribute but the views' own
        assert len(markup) < 100_000, len(markup)
        assert "<script" not in markup and "<img" not in markup
        assert not any(c in shown.text for c in "\x00\x07\x1b\u202e")
        if hostile.startswith("<script"):
            assert "<script>alert(1)</script>" in shown.text  # shown, as text


def _hostile_diff(hostile):
    from modelvault._diff import Changes, Diff, EntryChange

    changes = Changes({hostile: hostile}, {"k": hostile}, {hostile: (hostile, 1)})
    return Diff(hostile, hostile, hostile, changes, changes, changes, changes,
                (hostile, hostile), (EntryChange(hostile, hostile, (hostile, None)),),
                None, 1, 2)


def test_many_versions_models_and_labels_are_bounded(vault):
    vault.save("m", {"w": np.zeros(3)}, metadata={f"k{i}": i for i in range(5000)},
               tags={f"t{i}": "v" for i in range(5000)})
    with edit(vault.path) as db:  # 5,000 models of 2 versions and 50 aliases each
        model = db.execute("SELECT * FROM models").fetchone()
        db.executemany("INSERT INTO models VALUES (?, ?, ?, ?)",
                       [(10 + i, f"n{i:05}", model[2], 2) for i in range(5000)])
        db.executemany("INSERT INTO versions SELECT ?, ?, ?, ?, created_at, kind, layout, "
                       "size, added_bytes, digest, description, '{}', environment_id, "
                       "key_id, signature FROM versions WHERE id = 1",
                       [(100 + 2 * i + n, f"uuid-{i}-{n}", 10 + i, n + 1)
                        for i in range(5000) for n in range(2)])
        db.executemany("INSERT INTO aliases VALUES (?, ?, ?)",
                       [(10, f"a{j}", 100) for j in range(50)])
    listed = vault.versions()
    assert len(listed) == 10_001
    for markup, more in ((listed._repr_html_(), "and 9801 more"),
                         (vault._repr_html_(), "and 4801 more"),
                         (listed[0]._repr_html_(), "and 4800 more")):
        shown = page(markup).text
        assert more in shown, shown[-300:]
        assert len(markup) < 200_000, len(markup)
    assert "5001 models" in page(vault._repr_html_()).text
    shown = page(vault._repr_html_()).text
    assert shown.count("@a") == _html.ALIASES and "\u2026" in shown.split("n00001")[0]


def test_a_model_with_just_the_aliases_shown_has_no_ellipsis(vault):
    vault.save("m", {"w": np.zeros(3)}, aliases=[f"a{i}" for i in range(_html.ALIASES)])
    shown = page(vault._repr_html_()).text
    assert shown.count("@a") == _html.ALIASES and "\u2026" not in shown


def test_damaged_columns_show_as_unreadable(vault):
    vault.save("m", {"w": np.zeros(3)})
    with edit(vault.path) as db:
        db.execute("UPDATE versions SET metadata = '{not json', size = 'lots', "
                   "added_bytes = x'00'")
        db.execute("UPDATE environments SET json = '[1]'")
    record = vault.get("m")
    shown = page(record._repr_html_()).text
    assert "unreadable" in shown and "lots" in shown
    assert page(vault.versions()._repr_html_()) and page(vault._repr_html_())


def test_importing_modelvault_loads_no_view():
    code = "import sys, modelvault; print('modelvault._html' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
