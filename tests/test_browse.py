"""modelvault browse (issue #12): Datasette on a vault, read-only, pack bytes never read
on a table page, foreign keys labelled, canned queries. Through Datasette's in-process
client: no port."""

from __future__ import annotations

import asyncio
import sqlite3

import numpy as np
import pytest

import modelvault

pytest.importorskip("datasette", reason="modelvault browse needs the browse extra")
from modelvault import _browse  # noqa: E402


@pytest.fixture
def browsed(vault_path, tmp_path, monkeypatch):
    """A vault with a big pack, a pickle signed elsewhere, and two package versions."""
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "elsewhere"))
    with modelvault.open(vault_path) as vault:
        vault.save("foreign", {"s": {1}})
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "here"))
    rng = np.random.default_rng(0)
    with modelvault.open(vault_path) as vault:
        vault.save("churn", {"w": rng.normal(size=400_000)}, aliases=["prod"],
                   tags={"stage": "dev"})
        vault.save("churn", {"w": rng.normal(size=400_000)}, parent="churn:1")
    return vault_path


def get_all(path, pages):
    ds = _browse.datasette(path)

    async def fetch():
        await ds.invoke_startup()
        return [await ds.client.get(page) for page in pages]

    return asyncio.run(fetch())


def test_every_page_answers_and_pack_bytes_are_never_read(browsed):
    name = _browse.database_name(browsed)
    tables = ["models", "versions", "parts", "chunks", "part_chunks", "packs", "aliases",
              "tags", "environments", "packages", "lineage", "model_versions",
              "model_summary", "pack_sizes"]
    pages = ["/", f"/{name}"] + [f"/{name}/{t}" for t in tables] + [
        f"/{name}/packs.json?_sort_desc=size", f"/{name}/pack_sizes.json?_sort_desc=stored",
        f"/{name}/model_versions.json"]
    responses = get_all(browsed, pages)
    assert [r.status_code for r in responses] == [200] * len(pages)
    packs, sizes, versions = (r.json() for r in responses[-3:])
    assert packs["rows"] and all(row[-1] is None for row in packs["rows"])  # data: not read
    assert len(responses[-3].content) < 5_000  # sizes, never base64 of the bytes
    stored = [row[-1] for row in sizes["rows"]]
    assert stored == sorted(stored, reverse=True) and stored[0] > 100_000
    assert all(row[5] for row in versions["rows"])  # model_versions' stored_size is there


def test_foreign_keys_are_labelled(browsed):
    name = _browse.database_name(browsed)
    (response,) = get_all(browsed, [f"/{name}/versions.json?_labels=on&_shape=objects"])
    models = {row["model_id"]["label"] for row in response.json()["rows"]}
    assert models == {"churn", "foreign"}


def test_canned_queries(browsed):
    name = _browse.database_name(browsed)
    numpy_minor = ".".join(np.__version__.split(".")[:2])
    by_package, storage, unsigned = (r.json() for r in get_all(browsed, [
        f"/{name}/versions_by_package.json?package=numpy&version={numpy_minor}",
        f"/{name}/storage_per_model.json",
        f"/{name}/not_signed_by_a_trusted_key.json"]))
    assert sorted((r[0], r[1]) for r in by_package["rows"]) == [
        ("churn", 1), ("churn", 2), ("foreign", 1)]
    for version in ("", "0.0"):  # no prefix: every version; another one: none
        (found,) = get_all(browsed, [
            f"/{name}/versions_by_package.json?package=numpy&version={version}"])
        assert len(found.json()["rows"]) == (3 if not version else 0)
    (form,) = get_all(browsed, [f"/{name}/versions_by_package.json?package=numpy"])
    assert len(form.json()["rows"]) == 3  # the field not sent at all
    assert {r[0]: r[1] for r in storage["rows"]} == {"churn": 2, "foreign": 1}
    assert [(r[0], r[1]) for r in unsigned["rows"]] == [("foreign", 1)]


def test_sizes_show_in_units_and_environments_fold_to_one_line(browsed):
    import html
    import re

    name = _browse.database_name(browsed)
    page, canned, rows = get_all(browsed, [f"/{name}/model_versions",
                                           f"/{name}/storage_per_model",
                                           f"/{name}/model_versions.json?_shape=objects"])
    text = html.unescape(page.text)
    # The whole JSON is folded under a summary: Python and the packages.
    summaries = re.findall(r"<details><summary>([^<]*)</summary>", text)
    assert len(summaries) == 3
    assert all(re.fullmatch(r"Python [\d.]+, (cloudpickle \S+, )?numpy \S+", s)
               for s in summaries), summaries
    assert '<td class="col-environment type-str">{' not in text
    churn = rows.json()["rows"][0]
    assert type(churn["size"]) is int  # JSON keeps the numbers
    unit = 'style="white-space: nowrap"'  # a size never breaks between number and unit
    assert f'<span title="{churn["size"]:,} bytes" {unit}>3.2 MB</span>' in text
    assert re.search(r'<td class="col-stored_size type-int"><span title="[\d,]+ bytes" '
                     f'{unit}>' r"[\d.]+ MB</span>", text)
    assert re.search(r'col-raw_bytes[^>]*"><span title="[\d,]+ bytes" ' f'{unit}>'
                     r"[\d.]+ MB</span>", html.unescape(canned.text))


def test_the_authorizer_blanks_pack_bytes_but_not_their_length(browsed):
    db = sqlite3.connect(f"{browsed.as_uri()}?mode=ro", uri=True)
    try:
        db.set_authorizer(_browse.authorizer)
        assert db.execute("SELECT data FROM packs").fetchall()[0] == (None,)
        assert db.execute("SELECT max(stored) FROM pack_sizes").fetchone()[0] > 100_000
    finally:
        db.close()


def test_a_trusted_key_id_beside_a_garbage_signature_is_not_signed(browsed):
    """Hostile case: the key id claims this machine's key; the signature is garbage."""
    with sqlite3.connect(browsed) as db:
        db.execute("UPDATE versions SET signature = 'ed25519:' || hex(randomblob(64)) "
                   "WHERE version = 2")
    db.close()
    name = _browse.database_name(browsed)
    (unsigned,) = (r.json() for r in get_all(browsed, [
        f"/{name}/not_signed_by_a_trusted_key.json"]))
    assert sorted((r[0], r[1]) for r in unsigned["rows"]) == [("churn", 2), ("foreign", 1)]


def test_long_metadata_folds_under_its_start_and_short_metadata_stays_whole(vault_path):
    """A Trainer's checkpoint holds its run arguments: a page of JSON in each row, folded;
    a short one is shown as it is. Hostile: markup in the metadata is escaped either way."""
    import html
    import re

    args = {f"arg_{i}": i for i in range(80)}
    with modelvault.open(vault_path) as vault:
        vault.save("bert", {"w": np.zeros(3)}, metadata={"step": 2, "args": args,
                                                          "note": "<b>x</b>"})
        vault.save("small", {"w": np.zeros(3)}, metadata={"auc": 0.9})
    name = _browse.database_name(vault_path)
    page, table = get_all(vault_path, [f"/{name}/model_versions", f"/{name}/versions"])
    for text in (page.text, table.text):
        summaries = re.findall(r"<details><summary>([^<]*)</summary><pre[^>]*>([^<]*)</pre>",
                               text)
        folded = [(html.unescape(a), html.unescape(b)) for a, b in summaries
                  if "arg_0" in html.unescape(b)]
        assert len(folded) == 1
        summary, whole = folded[0]
        assert summary.startswith('{"args": {"arg_0": 0') and summary.endswith("…")
        assert len(summary) == _browse.SUMMARY and '"note": "<b>x</b>"' in whole
        assert "<b>x</b>" not in text
        assert re.search(r'<td class="col-metadata type-str">\{&#34;auc&#34;: 0.9\}</td>',
                         text)


# Metric pages (issue #22, item 4): a chart of a model's metrics across its versions.

@pytest.fixture
def charted(vault_path):
    """churn:1..8 with accuracy and loss (and a text note), @production on 6, @staging on 8."""
    with modelvault.open(vault_path) as vault:
        for i in range(8):
            vault.save("churn", {"w": np.full(3, float(i))}, metadata={
                "accuracy": 0.7 + 0.03 * i, "loss": 0.9 - 0.08 * i, "note": "text"})
        vault.alias("churn:6", "production")
        vault.alias("churn:8", "staging")
        vault.save("team/iris", {"w": np.zeros(3)}, metadata={"auc": 0.9})
    return vault_path


def decoded(response):
    import io

    image = pytest.importorskip("matplotlib.image", reason="charts need matplotlib")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    return image.imread(io.BytesIO(response.content), format="png")


def test_a_models_metrics_page_charts_each_chosen_metric(charted):
    import html
    import re

    index, default, chosen, accuracy, iris = get_all(charted, [
        "/-/metrics", "/-/metrics/churn", "/-/metrics/churn?metric=loss&metric=loss",
        "/-/metrics/churn/chart.png?metric=accuracy", "/-/metrics/team%2Firis"])
    assert [r.status_code for r in (index, default, chosen, iris)] == [200] * 4
    assert 'href="/-/metrics/churn"' in index.text and "team%2Firis" in index.text
    # Every metric offered, the most common first; the text one is no metric.
    offered = re.findall(r'name="metric" value="([^"]*)"( checked)?', default.text)
    assert offered == [("accuracy", " checked"), ("loss", " checked")]
    charts = re.findall(r'<img src="([^"]*)"', chosen.text)
    assert [html.unescape(c) for c in charts] == ["/-/metrics/churn/chart.png?metric=loss"]
    assert "/-/metrics/team%2Firis/chart.png?metric=auc" in iris.text
    pixels = decoded(accuracy)
    assert pixels.shape[:2] == (450, 800)
    assert (pixels[..., :3] < 0.5).any()  # drawn on, not a blank image


def test_metrics_that_change_are_offered_before_fixed_run_arguments(vault_path):
    """A Trainer's versions all hold its fixed arguments (a seed, a batch size): offered
    after the metrics that change, however many versions hold them."""
    import re

    with modelvault.open(vault_path) as vault:
        for i in range(4):
            metrics = {"eval_loss": 1.0 - i / 10} if i % 2 else {}
            vault.save("bert", {"w": np.full(3, float(i))}, metadata={
                "args": {"seed": 42, "batch": 8}, "metrics": metrics, "step": 2 * i})
    page, = get_all(vault_path, ["/-/metrics/bert"])
    offered = re.findall(r'name="metric" value="([^"]*)"( checked)?', page.text)
    assert offered == [("step", " checked"), ("metrics.eval_loss", " checked"),
                       ("args.batch", " checked"), ("args.seed", "")]


def test_model_names_link_to_their_metrics_pages(charted):
    name = _browse.database_name(charted)
    pages = get_all(charted, [f"/{name}/models", f"/{name}/model_summary",
                              f"/{name}/model_versions", f"/{name}/models.json"])
    for page in pages[:3]:
        assert '<a href="/-/metrics/churn"' in page.text
        assert '<a href="/-/metrics/team%2Firis"' in page.text
    assert "/-/metrics" not in pages[3].text  # JSON keeps the names


def test_metric_pages_refuse_what_is_not_the_models(charted, monkeypatch):
    """Hostile case: names and metrics from the URL that the vault does not have."""
    import re

    from modelvault import _browse_metrics

    long = "a" * 5000
    page, too_many, no_model, chart_of_none, no_metric, two, text, bad = get_all(charted, [
        f"/-/metrics/churn?metric=nope&metric=%3Cscript%3E&metric={long}",
        "/-/metrics/churn?" + "&".join(f"metric=m{i}" for i in range(100)) + "&metric=loss",
        "/-/metrics/nope", "/-/metrics/nope/chart.png?metric=loss",
        "/-/metrics/churn/chart.png?metric=nope",
        "/-/metrics/churn/chart.png?metric=loss&metric=accuracy",
        "/-/metrics/churn/chart.png?metric=note", f"/-/metrics/churn/chart.png?metric={long}"])
    assert page.status_code == 200 and "<img" not in page.text
    assert "Not metrics of this model: nope, &lt;script&gt;" in page.text
    assert long not in page.text
    # A hundred unknown names: loss charted, six of them named.
    assert re.findall(r'<img src="([^"]*)"', too_many.text) == [
        "/-/metrics/churn/chart.png?metric=loss"]
    assert "m5" in too_many.text and "m6" not in too_many.text
    assert [r.status_code for r in (no_model, chart_of_none, no_metric, two, text, bad)] == [
        404, 404, 404, 400, 404, 400]
    assert "no model named &#39;nope&#39;" in no_model.text
    monkeypatch.setattr(_browse_metrics, "MAX_CHARTS", 1)
    (capped,) = get_all(charted, ["/-/metrics/churn?metric=loss&metric=accuracy"])
    assert re.findall(r'<img src="([^"]*)"', capped.text) == [
        "/-/metrics/churn/chart.png?metric=loss"]


def test_hostile_names_and_values_from_the_file(charted):
    """Hostile case: a model name of HTML, values NaN, inf, huge and text."""
    with sqlite3.connect(charted) as db:
        db.execute("UPDATE models SET name = '<b>x</b>\"&' WHERE name = 'team/iris'")
        db.execute("""UPDATE versions SET metadata = '{"loss": NaN, "accuracy": "0.9"}'
                      WHERE version = 2 AND model_id = (SELECT id FROM models
                      WHERE name = 'churn')""")
        db.execute("""UPDATE versions SET metadata = '{"loss": 1e999, "accuracy": 1e308}'
                      WHERE version = 3 AND model_id = (SELECT id FROM models
                      WHERE name = 'churn')""")
    db.close()
    quoted = "%3Cb%3Ex%3C%2Fb%3E%22%26"
    name = _browse.database_name(charted)
    index, page, models, loss = get_all(charted, [
        "/-/metrics", f"/-/metrics/{quoted}", f"/{name}/models",
        "/-/metrics/churn/chart.png?metric=loss"])
    for response in (index, page, models):
        assert response.status_code == 200
        assert "<b>x" not in response.text and "&lt;b&gt;x&lt;/b&gt;" in response.text
        assert f'href="/-/metrics/{quoted}"' in response.text or quoted in response.text
    assert decoded(loss).shape[:2] == (450, 800)  # the bad values skipped


def test_a_damaged_vault_gets_an_error_page(charted):
    """Hostile case: a version's metadata no longer JSON, after browse started."""
    ds = _browse.datasette(charted)

    async def fetch():
        await ds.invoke_startup()
        with sqlite3.connect(charted) as db:
            db.execute("UPDATE versions SET metadata = '{not json' WHERE version = 4")
        db.close()
        return [await ds.client.get(p) for p in
                ("/-/metrics/churn", "/-/metrics/churn/chart.png?metric=loss")]

    for response in asyncio.run(fetch()):
        assert response.status_code == 422
        assert "This vault cannot be read" in response.text
        assert "churn:4: metadata is not valid JSON" in response.text
        assert "Traceback" not in response.text


def test_a_model_of_many_versions_charts_its_newest(charted, monkeypatch):
    from modelvault import _browse_metrics

    monkeypatch.setattr(_browse_metrics, "MAX_VERSIONS", 3)
    page, chart = get_all(charted, ["/-/metrics/churn",
                                    "/-/metrics/churn/chart.png?metric=loss"])
    assert "The newest 3 of its 8 versions are charted." in page.text
    assert decoded(chart).shape[:2] == (450, 800)


def test_a_model_of_big_metadata_charts_the_newest_its_bytes_allow(charted, monkeypatch):
    """Hostile case: thousands of keys in each version's metadata; a page reads a bounded
    number of metadata bytes (each chart request walks them again), never fewer than one
    version's."""
    from modelvault import _browse_metrics

    with sqlite3.connect(charted) as db:
        size = db.execute("SELECT max(length(metadata)) FROM versions").fetchone()[0]
    db.close()
    monkeypatch.setattr(_browse_metrics, "MAX_METADATA", 2 * size + 1)
    page, chart = get_all(charted, ["/-/metrics/churn",
                                    "/-/metrics/churn/chart.png?metric=loss"])
    assert "The newest 2 of its 8 versions are charted." in page.text
    assert decoded(chart).shape[:2] == (450, 800)
    monkeypatch.setattr(_browse_metrics, "MAX_METADATA", 1)
    (page,) = get_all(charted, ["/-/metrics/churn"])
    assert "The newest 1 of its 8 versions are charted." in page.text


def test_without_matplotlib_the_page_says_how_to_install_it(charted, monkeypatch):
    import sys

    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    page, chart = get_all(charted, ["/-/metrics/churn",
                                    "/-/metrics/churn/chart.png?metric=loss"])
    assert page.status_code == 200 and "<img" not in page.text
    assert "pip install &#39;modelvault[plot]&#39;" in page.text
    assert chart.status_code == 501 and "modelvault[plot]" in chart.text
