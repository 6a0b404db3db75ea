"""Model names, aliases, and references such as ``churn``, ``churn:3``, ``churn@prod``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._records import ModelVersion

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_ALIAS = re.compile(_SEGMENT)
MAX_NAME = 200
LATEST = "latest"  # name@latest is the highest existing version, like a bare name
# A version's id (versions.uuid) as modelvault writes it: a lowercase UUID.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None


def check_name(name: object) -> str:
    """``name`` if it is a valid model name, else ValueError saying what is allowed."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and '/' for "
            f"namespaces (e.g. 'team/churn'), starting each part with a letter, digit or '_'")
    return name


def check_alias(alias: object) -> str:
    if not isinstance(alias, str) or len(alias) > MAX_NAME or not _ALIAS.fullmatch(alias) \
            or alias.isdigit() or alias == LATEST:
        raise ValueError(
            f"invalid alias {alias!r}: use letters, digits, '.', '_' and '-', not only digits; "
            f"'{LATEST}' always means the newest version")
    return alias


def parse_ref(ref: object) -> Ref:
    """Split ``name``, ``name:N`` or ``name@alias``; ValueError for anything else."""
    if not isinstance(ref, str):
        raise TypeError(f"a model reference is a string like 'churn:3', not {type(ref).__name__}")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if alias == LATEST:
            return Ref(check_name(name))
        return Ref(check_name(name), alias=check_alias(alias))
    if ":" in ref:
        name, _, number = ref.partition(":")
        # ASCII digits only ('²'.isdigit() is True), and small enough for SQLite's integers.
        if not (number.isascii() and number.isdigit()) or not 1 <= int(number) < 2**63:
            raise ValueError(f"invalid reference {ref!r}: the version after ':' is a number >= 1")
        return Ref(check_name(name), version=int(number))
    return Ref(check_name(ref))


def as_ref(ref: str | ModelVersion) -> Ref:
    """The reference a string or a ``ModelVersion`` names."""
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)
