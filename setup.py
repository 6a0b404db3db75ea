"""The compiled byte (un)shuffle; everything else about the package is in pyproject.toml.

``optional=True``: where no C compiler works, the install still succeeds and modelvault
uses its numpy path for the same bytes (modelvault/_chunks.py), 2.5-4x slower.
"""

import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "modelvault._shuffle", ["modelvault/_shuffle.c"], optional=True,
    extra_compile_args=[] if sys.platform == "win32" else ["-O3"])])
