"""Run the benchmark suite and write its report.

    python -m benchmarks                  # full sizes, medians of 3 runs (10+ minutes)
    python -m benchmarks --quick          # tiny sizes, 1 run: checks the harness (~1 minute)
    python -m benchmarks --only W1,W3 --runs 5 --out /tmp/results

Prints one markdown table per workload and writes it, with the machine's facts, to
OUT/<date>-<hostname>.md, and the raw numbers to the .json beside it. A --quick run
without --out writes its files to a temporary directory, not into benchmarks/results:
its sizes make the targets meaningless.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from .models import FULL, QUICK
from .report import REPO, Section, as_json, machine_facts, markdown
from .timing import cold_allocations
from .app_workloads import w10_app_update
from .remote_workloads import w9_remote
from .torch_workloads import w6_torch, w7_checkpoints
from .workloads import WORKLOADS as _NUMPY_WORKLOADS
from .workloads import Context

WORKLOADS = {**_NUMPY_WORKLOADS, "W6": w6_torch, "W7": w7_checkpoints, "W9": w9_remote,
             "W10": w10_app_update}


def _workload_list(text: str) -> list[str]:
    chosen = {part.strip().upper() for part in text.split(",") if part.strip()}
    unknown = chosen - WORKLOADS.keys()
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown workload {', '.join(sorted(unknown)) or text!r}; "
            f"choose from {','.join(WORKLOADS)}")
    return [key for key in WORKLOADS if key in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 1 run: a smoke test of the harness")
    parser.add_argument("--only", type=_workload_list, default=list(WORKLOADS),
                        metavar="W1,W3", help="run only these workloads")
    parser.add_argument("--runs", type=int, default=None, metavar="N",
                        help="timed runs per measurement, after one warm-up (default 3, "
                             "or 1 with --quick)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where the report goes (default benchmarks/results; with "
                             "--quick, a temporary directory)")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def report_dir(args: argparse.Namespace) -> Path:
    """--out if given; else benchmarks/results, or a new temporary folder for --quick."""
    if args.out is not None:
        return args.out
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="modelvault-bench-quick-"))
    return REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    facts = machine_facts()  # now: the tree may change while the suite runs
    facts["malloc"] = cold_allocations()
    started = time.perf_counter()
    sections: list[Section] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modelvault-bench-") as scratch:
        # Sign with a throwaway key, never the user's, removed with the scratch directory;
        # modelvault reads this when it first needs a key, and child processes inherit it.
        os.environ.setdefault("MODELVAULT_HOME", os.path.join(scratch, "home"))
        context = Context(sizes=sizes, runs=runs, quick=args.quick, scratch=Path(scratch))
        for key in args.only:
            print(f"{key}: {WORKLOADS[key].__doc__.splitlines()[0]}", flush=True)
            start = time.perf_counter()
            try:
                sections.append(WORKLOADS[key](context))
            except Exception as exc:  # one broken workload must not cost the others' figures
                traceback.print_exc()
                failed.append(key)
                sections.append(Section(key, "failed"))
                sections[-1].note(f"failed, no figures: {type(exc).__name__}: {exc}")
            print(f"{key}: done in {time.perf_counter() - start:.0f} s", flush=True)
    elapsed = time.perf_counter() - started
    facts["suite"] = (f"{'--quick, ' if args.quick else ''}workloads {','.join(args.only)}, "
                      f"{runs} run(s) after one warm-up, {elapsed:.0f} s in all")
    header = (
        "Medians of the timed runs after one warm-up; the operations compared are interleaved "
        "within each run, and every ratio divides two figures from this same run. Loads read "
        "from the OS page cache. MB = 10^6 bytes. Numbers from a tree with uncommitted changes "
        "to modelvault/ are provisional."
    )
    if failed:
        header += f" **Failed: {', '.join(failed)}; see the notes there.**"
    if args.quick:
        header += " **Quick run: tiny sizes, so the targets say nothing; it checks the harness.**"
    text = markdown(sections, facts, header)
    print()
    print(text)

    out = report_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{facts['date'][:10]}-{facts['hostname']}"
    options = {"quick": args.quick, "runs": runs, "only": args.only, "sizes": asdict(sizes)}
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(as_json(sections, facts, options))
    print(f"wrote {out / stem}.md and .json")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
