"""What a version was saved with: Python, platform, and the packages its pickle imports."""

from __future__ import annotations

import functools
import platform
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


def capture(imports: list[str]) -> dict[str, Any]:
    """Environment record for a version whose pickle imports ``imports`` (module.name)."""
    packages = {"numpy": _version("numpy")}
    modules = {name.split(".", 1)[0] for name in imports}
    for module in sorted(modules - {"builtins", "copyreg", "__main__", "_codecs", "collections"}):
        for dist in _distributions().get(module, []):
            packages[dist] = _version(dist)
    if imports:
        packages["cloudpickle"] = _version("cloudpickle")
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "modelvault": __version__,
        "packages": {name: v for name, v in sorted(packages.items()) if v},
    }
