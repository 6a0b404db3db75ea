"""What a version was saved with (Python, platform, the packages its pickle imports) and
where it was made (the git commit and the script)."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from typing import Any

from ._version import __version__


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    from importlib import metadata  # ~20 ms to import; only saves need it

    # Scans every installed package's metadata: slow enough (~50 ms) to do once per process.
    return metadata.packages_distributions()


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _modules(imports: list[str]) -> set[str]:
    """The top-level modules ``imports`` (module.name) come from, and for each class among
    them that is already imported, the modules of its bases: an XGBClassifier's pickle
    names only xgboost, but the class is a scikit-learn estimator too."""
    modules = {name.split(".", 1)[0] for name in imports}
    for name in imports:
        module, _, attribute = name.rpartition(".")
        found = getattr(sys.modules.get(module), attribute, None)  # never imports anything
        if isinstance(found, type):
            modules.update(base.__module__.split(".", 1)[0] for base in found.__mro__)
    return modules


def capture(imports: list[str]) -> dict[str, Any]:
    """Environment record for a version made of ``imports`` (module.name, or a module):
    the globals its pickle imports, the types of its arrays, or its framework's model
    class."""
    packages = {"numpy": _version("numpy")}
    modules = _modules(imports)
    for module in sorted(modules - {"builtins", "copyreg", "__main__", "_codecs", "collections"}):
        for dist in _distributions().get(module, []):
            packages[dist] = _version(dist)
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "modelvault": __version__,
        "packages": {name: v for name, v in sorted(packages.items()) if v},
    }


@functools.cache
def installed(distribution: str) -> str | None:
    """The installed version of ``distribution`` (once per process: loads ask often)."""
    return _version(distribution)


def _minor(version: str) -> tuple[str, ...]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return found.groups() if found else (version,)


def differences(environment: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(name, saved version, version here or None) for Python and each package a version
    recorded whose major.minor differs from what runs here."""
    found = []
    saved_python = environment.get("python")
    if isinstance(saved_python, str) and _minor(saved_python) != _minor(
            platform.python_version()):
        found.append(("Python", saved_python, platform.python_version()))
    packages = environment.get("packages")
    for name, saved in sorted(packages.items()) if isinstance(packages, dict) else []:
        if not isinstance(saved, str):
            continue
        here = installed(name)
        if here is None or _minor(here) != _minor(saved):
            found.append((name, saved, here))
    return found


# What a requirements line may hold: a PEP 508 name and a PEP 440 version, nothing else.
# The record comes from the file, and `pip install -r` follows options (--index-url,
# -e git+...) on any line, so one newline in a forged name would choose where pip
# downloads code from.
_PACKAGE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9])?")
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,99}")
_WORDS = re.compile(r"[ -~]{0,200}")  # one line of printable ASCII, for the comment


def requirements(environment: dict[str, Any]) -> str:
    """A requirements file that rebuilds a version's environment: ``name==version`` lines,
    after a comment naming the Python it ran on. ValueError if a field is not a plain
    package name, version or line of text (a forged or damaged record)."""
    head = [str(environment.get(key, "?")) for key in ("python", "implementation", "platform")]
    packages = environment.get("packages", {})
    if not isinstance(packages, dict):
        raise ValueError("its environment's packages are not a mapping")
    for text in head:
        if not _WORDS.fullmatch(text):
            raise ValueError(f"its environment holds {text[:60]!r}, not one line of text")
    for name, version in packages.items():
        if not (_PACKAGE.fullmatch(name) and isinstance(version, str)
                and _RELEASE.fullmatch(version)):
            raise ValueError(f"its environment names {str(name)[:60]!r} "
                             f"{str(version)[:60]!r}, not a package and its version")
    lines = ["# saved with Python {} ({}) on {}".format(*head)]
    lines += [f"{name}=={version}" for name, version in sorted(packages.items())]
    return "\n".join(lines) + "\n"


def source() -> dict[str, Any]:
    """Where a version is saved from: the script or notebook, and the git commit, branch
    and dirty flag of the repository the current directory is in (none if it is not)."""
    found: dict[str, Any] = {}
    script = _script()
    if script:
        found["script"] = script
    found.update(_git())
    return found


def _script() -> str | None:
    main = sys.modules.get("__main__")
    # VS Code names the notebook in the kernel's namespace. Jupyter names it in an
    # environment variable, which a script the notebook starts inherits: a script's
    # own file comes first.
    notebook = getattr(main, "__vsc_ipynb_file__", None)
    if notebook:
        return str(notebook)
    path = getattr(main, "__file__", None)
    if path is None and os.environ.get("JPY_SESSION_NAME"):
        return os.environ["JPY_SESSION_NAME"]
    path = path or (sys.argv[0] if sys.argv else None)
    if not path or path in ("-c", "-m") or path.startswith("<"):  # python -c, <stdin>
        return None
    return os.path.abspath(path)


def _git() -> dict[str, Any]:
    """The commit, branch and dirty flag (tracked files changed) of the current
    directory's repository, from one `git status`; {} outside one or without git."""
    try:
        # No optional locks: the user's own git commands must never find index.lock
        # taken by us. No fsmonitor: a repository's config must not run a program here.
        # It runs while the save holds the vault's write lock: a short timeout.
        done = subprocess.run(
            ["git", "--no-optional-locks", "-c", "core.fsmonitor=false", "status",
             "--porcelain=v2", "--branch", "--untracked-files=no"],
            capture_output=True, text=True, errors="replace", timeout=5,
            stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return {}
    if done.returncode != 0:
        return {}
    commit = branch = None
    dirty = False
    for line in done.stdout.splitlines():
        if line.startswith("# branch.oid "):
            commit = line.split(" ", 2)[2]
        elif line.startswith("# branch.head "):
            branch = line.split(" ", 2)[2]
        elif line and not line.startswith("#"):
            dirty = True
    return {"git_commit": None if commit == "(initial)" else commit,
            "git_branch": None if branch == "(detached)" else branch, "git_dirty": dirty}


def source_wanted(option: bool) -> bool:
    """Whether to record a version's source: ``option``, unless MODELVAULT_NO_SOURCE
    is set to a true value (1, true, yes)."""
    flag = os.environ.get("MODELVAULT_NO_SOURCE", "").strip().lower()
    return option and flag not in ("1", "true", "yes", "on")
