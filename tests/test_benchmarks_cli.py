"""The benchmark entry point's options (the suite itself runs by hand: it measures)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.__main__ import parse_args, report_dir
from benchmarks.report import REPO


def test_out_is_where_the_report_goes_quick_or_not(tmp_path):
    assert report_dir(parse_args(["--quick", "--out", str(tmp_path)])) == tmp_path
    assert report_dir(parse_args(["--out", str(tmp_path)])) == tmp_path
    assert report_dir(parse_args([])) == REPO / "benchmarks" / "results"
    quick = report_dir(parse_args(["--quick"]))
    assert quick != REPO / "benchmarks" / "results" and quick.is_dir()
    Path(quick).rmdir()
