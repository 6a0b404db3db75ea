"""Modules imported on first use.

``import modelvault``, opening a vault and listing what is in it need neither numpy
(~100 ms to import) nor the codecs; only reading and writing model bytes do.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def lazy(name: str) -> ModuleType:
    """``name`` as a module object that imports itself when an attribute is first read."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load(*modules: ModuleType) -> None:
    """Finish importing lazy ``modules`` now, one thread at a time.

    Python 3.11's LazyLoader is not thread-safe: two threads touching a module first
    would both run it. Everything that touches model bytes calls this first, in the
    calling thread, before any worker thread starts.
    """
    with _lock:
        for module in modules:
            _ = module.__name__  # any attribute read finishes the import
