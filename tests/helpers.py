"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import``)."""

from __future__ import annotations

import numpy as np


def same(expected, got):
    """Equal values of equal types, arrays equal in dtype, shape and every element."""
    if isinstance(expected, np.ndarray):
        return (isinstance(got, np.ndarray) and got.dtype == expected.dtype
                and got.shape == expected.shape and np.array_equal(got, expected))
    if isinstance(expected, (dict, list, tuple)):
        if type(got) is not type(expected) or len(got) != len(expected):
            return False
        if isinstance(expected, dict):
            return expected.keys() == got.keys() and all(same(expected[k], got[k])
                                                         for k in expected)
        return all(same(e, g) for e, g in zip(expected, got, strict=True))
    return type(got) is type(expected) and got == expected


def one_line_error(result) -> bool:
    """True if a command failed the way the CLI promises: exit 1, one "Error:" line on
    stderr, no traceback (``result`` has ``returncode`` and ``stderr``)."""
    return (result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
            and "Traceback" not in result.stderr and result.stderr.startswith("Error: "))
