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
    assert f'<span title="{churn["size"]:,} bytes">3.2 MB</span>' in text
    assert re.search(r'<td class="col-stored_size type-int"><span title="[\d,]+ bytes">'
                     r"[\d.]+ MB</span>", text)
    assert re.search(r'col-raw_bytes[^>]*"><span title="[\d,]+ bytes">[\d.]+ MB</span>',
                     html.unescape(canned.text))


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
