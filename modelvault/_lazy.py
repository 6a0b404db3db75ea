"""Modules imported on first use.

``import modelvault``, opening a vault and listing what is in it need neither numpy
(~100 ms to import) nor the codecs; only reading and writing model bytes do.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for a module and imports it when an attribute is first read.

    Not importlib's LazyLoader: that puts a half-made module into ``sys.modules``, where
    the user's own ``import numpy`` in another thread could meet it mid-import (Python
    3.11). This proxy stays private; ``importlib.import_module`` does the importing,
    under the import system's own locks.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attribute)


def lazy(name: str) -> Any:
    """``name``, imported when first used."""
    return LazyModule(name)
