"""The package's version, in a leaf module: code inside the package imports it from here,
never from the package root (which imports everything else)."""

__version__ = "0.1.0"
