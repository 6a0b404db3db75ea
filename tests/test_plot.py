"""Metric plots (issue #22, item 4): ``Vault.plot`` and ``modelvault plot``.

The image is written and read back; labels and values come from a vault file anyone may
have edited, so the hostile ones (mathtext, NaN, huge numbers, thousands of aliases) are
tested next to the honest ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error

import modelvault

ROOT = Path(__file__).resolve().parent.parent


def matplotlib():
    return pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")


@pytest.fixture
def metrics_vault(vault_path):
    """churn:1..5 with auc 0.70, 0.75, "0.8" (text), none, 0.90, eval.loss nested, and
    @production on churn:4, @staging on churn:5."""
    aucs = [0.70, 0.75, "0.8", None, 0.90]
    with modelvault.open(vault_path) as vault:
        for i, auc in enumerate(aucs):
            metadata = {"eval": {"loss": 1.0 - i / 10}, "epochs": i + 1}
            if auc is not None:
                metadata["auc"] = auc
            vault.save("churn", {"w": np.full(3, float(i))}, metadata=metadata)
        vault.alias("churn:4", "production")
        vault.alias("churn:5", "staging")
    return vault_path


def read_image(path: Path) -> np.ndarray:
    image = pytest.importorskip("matplotlib.image",
                                reason="plots need matplotlib (the plot extra)")
    return image.imread(str(path))


def test_the_png_is_written_and_reads_back_as_a_drawn_image(metrics_vault, tmp_path):
    matplotlib()
    out = tmp_path / "auc.png"
    with modelvault.open(metrics_vault) as vault:
        figure = vault.plot("churn", "auc", path=out)
    pixels = read_image(out)
    height, width = pixels.shape[:2]
    dpi = figure.dpi
    assert (width, height) == (round(8 * dpi), round(4.5 * dpi))
    drawn = (pixels[..., :3] < 0.9).any(axis=-1)  # not white: lines, text, axes
    assert 0.005 < drawn.mean() < 0.5


def test_skipped_values_are_counted_in_the_title(metrics_vault):
    matplotlib()
    with modelvault.open(metrics_vault) as vault:
        (ax,) = vault.plot("churn", "auc").axes
    # "0.8" is text and churn:4 has no auc: two skipped, three points drawn.
    assert ax.get_title() == "churn: auc (2 versions without a number skipped)"
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 5]
    assert list(line.get_ydata()) == [0.70, 0.75, 0.90]
    assert ax.get_xlabel() == "version" and ax.get_ylabel() == "auc"


def test_aliases_are_written_at_their_points(metrics_vault):
    matplotlib()
    with modelvault.open(metrics_vault) as vault:
        (ax,) = vault.plot("churn", ["eval.loss", "epochs"]).axes
    texts = {t.get_text(): t.xy for t in ax.texts}
    assert texts == {"@production": (4, pytest.approx(0.7)), "@staging": (5, 0.6)}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["eval.loss", "epochs"]


def test_several_metrics_and_a_given_axes_and_time_on_x(metrics_vault):
    matplotlib()
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    with modelvault.open(metrics_vault) as vault:
        figure = vault.plot("churn", ["auc", "epochs"], ax=ax, x="created")
        created = [mv.created_at for mv in vault.versions("churn")]
    assert figure is ax.figure
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["auc (2 skipped)", "epochs"]
    assert len(ax.get_lines()[1].get_xdata()) == len(created)
    assert ax.get_xlabel() == "created (UTC)"


def test_unknown_model_or_metric_or_bad_arguments(metrics_vault):
    matplotlib()
    with modelvault.open(metrics_vault) as vault:
        with pytest.raises(modelvault.NotFoundError, match="no model named 'nope'"):
            vault.plot("nope", "auc")
        with pytest.raises(modelvault.NotFoundError,
                           match=r"no metadata 'acc'; its metrics: auc, epochs, eval.loss"):
            vault.plot("churn", "acc")
        with pytest.raises(ValueError, match="x must be one of"):
            vault.plot("churn", "auc", x="step")
        with pytest.raises(ValueError, match="metric must be"):
            vault.plot("churn", [])
        vault.save("text", [1], metadata={"note": "good"})
        with pytest.raises(ValueError, match="no version of text has a number for note"):
            vault.plot("text", "note")


def edit(path: Path, sql: str, *params) -> None:
    with sqlite3.connect(path) as db:
        db.execute(sql, params)
    db.close()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "1e308",
                                   "-1e305", "1" + "0" * 400, "true", "[1]", '{"a": 1}',
                                   "null", '"1.5"'])
def test_hostile_values_are_skipped_never_drawn(metrics_vault, tmp_path, value):
    """A value written into the file by hand: never a number an axis cannot hold (1e308
    and -1e308 on one axis make matplotlib raise while drawing)."""
    matplotlib()
    edit(metrics_vault, f"UPDATE versions SET metadata = '{{\"auc\": {value}}}' "
                        "WHERE version = 1")
    out = tmp_path / "auc.png"
    with modelvault.open(metrics_vault) as vault:
        (ax,) = vault.plot("churn", "auc", path=out).axes
    assert "3 versions without a number skipped" in ax.get_title()
    assert list(ax.get_lines()[0].get_xdata()) == [2, 5]
    assert read_image(out).shape[0] > 0


def test_hostile_labels_are_drawn_as_text(metrics_vault, tmp_path):
    """A key or alias with mathtext that makes matplotlib's parser raise, control
    characters, and thousands of aliases: drawn literally, cut short, bounded."""
    matplotlib()
    key = r"$\frac{$" + "\x00\udcff" + "x" * 200
    # json.dumps writes the lone surrogate as the escape \\udcff, as a forger's file may.
    edit(metrics_vault, "UPDATE versions SET metadata = ?", json.dumps({key: 1.5, "epochs": 2}))
    edit(metrics_vault, "INSERT INTO aliases (model_id, alias, version_id) SELECT model_id, "
                        "'$\\sqrt{' || version || '$', id FROM versions")
    with sqlite3.connect(metrics_vault) as db:
        db.executemany("INSERT INTO aliases (model_id, alias, version_id) SELECT model_id, ?,"
                       " id FROM versions WHERE version = 2", [(f"a{i}",) for i in range(3000)])
    db.close()
    out = tmp_path / "hostile.svg"
    with modelvault.open(metrics_vault) as vault:
        (ax,) = vault.plot("churn", [key, "epochs"], path=out).axes
    label = ax.get_legend().get_texts()[0].get_text()
    assert label.startswith(r"\$\frac{\$??xxx") and len(label) < 50
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 5
    assert r"@\$\sqrt{2\$ @a0 @a1 +2998" in texts
    assert out.read_bytes().startswith(b"<?xml")


def test_many_versions_bound_the_annotations(vault_path):
    matplotlib()
    with modelvault.open(vault_path) as vault:
        for i in range(40):
            vault.save("m", [i], metadata={"loss": 1 / (i + 1)}, aliases=[f"v{i}"])
        (ax,) = vault.plot("m", "loss").axes
    assert [t.get_text() for t in ax.texts] == [f"@v{i}" for i in range(10, 40)]


def test_an_unwritable_format_is_a_value_error(metrics_vault, tmp_path):
    matplotlib()
    with modelvault.open(metrics_vault) as vault, pytest.raises(ValueError, match="xyz"):
        vault.plot("churn", "auc", path=tmp_path / "plot.xyz")


def test_cli_writes_the_image_and_prints_its_path(run, metrics_vault, tmp_path):
    matplotlib()
    out = tmp_path / "plot.png"
    result = run("plot", metrics_vault, "churn", "auc", "eval.loss", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output == f"{out}\n"
    assert read_image(out).shape[:2] == (450, 800)


def test_cli_errors_are_one_line_naming_the_metrics(run, metrics_vault, tmp_path):
    matplotlib()
    out = tmp_path / "plot.png"
    result = run("plot", metrics_vault, "churn", "acc", "-o", out)
    assert result.exit_code == 1
    assert result.output == ("Error: churn has no metadata 'acc'; its metrics: auc, epochs, "
                             "eval.loss\n")
    result = run("plot", metrics_vault, "nope", "auc", "-o", out)
    assert result.exit_code == 1 and "no model named 'nope'" in result.output
    assert len(result.output.splitlines()) == 1
    assert not out.exists()


# `modelvault plot` in a child process where importing matplotlib fails, as on a machine
# without the plot extra.
WITHOUT_MATPLOTLIB = r"""
import importlib.abc, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
from modelvault._cli import main
sys.argv = ["modelvault", *sys.argv[1:]]
main()
"""


def test_cli_without_matplotlib_says_how_to_install_it(metrics_vault, tmp_path):
    out = tmp_path / "plot.png"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, "plot", str(metrics_vault), "churn",
         "auc", "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")})
    assert one_line_error(result), result.stderr
    assert "pip install 'modelvault[plot]'" in result.stderr
    assert not out.exists()
