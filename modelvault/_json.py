"""JSON texts read from a vault file or a bucket: input from whoever made the file.

Parsed with a bound on nesting (json.loads of 50,000 nested lists raises RecursionError,
and every walker of a layout or manifest recurses too) and without duplicate keys: JSON
leaves them undefined, Python keeps the last and SQLite's json_extract the first, so one
signed text could show two different values to two readers. modelvault never writes
either, so both mean the text was forged or damaged: ValueError, which every reader
already turns into a typed error naming the version.
"""

from __future__ import annotations

import json
from typing import Any

# Far deeper than any layout, manifest or record modelvault writes (a layout nests about
# three levels per level of nested dicts saved: 100 of those), far shallower than
# Python's stack, which every walker of a layout uses about once per three levels.
MAX_DEPTH = 300


def loads(text: str | bytes) -> Any:
    """``text`` parsed; ValueError if it is not JSON, nests deeper than MAX_DEPTH or
    repeats a key in one object (TypeError if it is not text)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")  # UnicodeDecodeError: a ValueError, as json.loads's
    if not isinstance(text, str):
        raise TypeError(f"JSON text must be str or bytes, not {type(text).__name__}")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if text.count("[") + text.count("{") > MAX_DEPTH:
        check_depth(value)  # else it cannot nest deeper: most texts skip the walk
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        keys = [key for key, _ in pairs]
        twice = next(key for i, key in enumerate(keys) if key in keys[:i])
        raise ValueError(f"JSON object repeats the key {twice[:60]!r}")
    return found


# One decoder for every text: json.loads(..., object_pairs_hook=) builds a new one per
# call, a third of the cost of parsing a part's shape.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def check_depth(value: Any) -> None:
    """ValueError if ``value`` (parsed JSON) nests deeper than MAX_DEPTH; walked without
    recursion, so any depth is safe to ask about."""
    level = [value]
    for _ in range(MAX_DEPTH):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
