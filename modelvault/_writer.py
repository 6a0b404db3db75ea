"""The writer: the save path, object -> parts -> chunks -> packs -> catalog row.

An object is turned into parts (``_serialize``, or a framework's own files), its
arrays matched against the parent version's for deltas, the parts chunked into packs
(``_packs``), and the version's rows, manifest and signature added to the catalog, all
in one write transaction. Nothing here reads a version back.
"""

from __future__ import annotations

import json
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import _environment, _files, _frameworks, _json, _limits, _selftest, _serialize, _trust
from ._catalog import Catalog, NewVersion, now, part_row
from ._catalog import digest as content_digest
from ._chunks import np
from ._connection import Connection
from ._errors import NotFoundError
from ._packs import Bases, PackStore, tensor_runs
from ._progress import progress
from ._records import ModelVersion
from ._refs import Ref, as_ref, check_alias
from ._serialize import Part

# Metadata and descriptions are for numbers and notes: far below what readers accept
# of a text column (_schema.MAX_VALUE), so whatever we write, we read back.
MAX_TEXT = 16 * 1024 * 1024


class Example(NamedTuple):
    """A model's saved example and its answer, as parts stored after the model's."""

    method: str  # what answered it (see _selftest.METHODS)
    kind: str
    layout: Any
    parts: list[Part]


class Writer:
    """Saves versions into one vault's pieces; see ``Vault.save`` for what a save records.

    ``max_expansion``: the cap on how far a version may expand when read (``_limits``),
    checked before a version goes in. ``progress``: show a progress bar (None: when
    stderr is a terminal).
    """

    def __init__(self, connection: Connection, catalog: Catalog, packs: PackStore, *,
                 max_expansion: float, progress: bool | None) -> None:
        self._connection = connection
        self._catalog = catalog
        self._packs = packs
        self._max_expansion = max_expansion
        self._progress = progress

    def save(self, name: str, obj: Any, *, example: Any, **options: Any) -> ModelVersion:
        """Save ``obj`` as the next version of ``name``: in its framework's own format if
        it has one that takes it, else as arrays or a pickle."""
        found = None if example is None else _example_of(obj, example)
        handler = _frameworks.find(obj)
        if handler is not None:
            with tempfile.TemporaryDirectory(prefix="modelvault-") as folder:
                try:
                    record = _frameworks.save(handler, obj, Path(folder))
                except ValueError:  # parameters JSON cannot hold: pickled instead
                    pass
                else:
                    parts = _files.files_parts([folder])
                    return self._save(name, "framework", {**_files_layout(parts), **record},
                                      parts, example=found, **options)
        kind, layout, parts = _serialize.serialize(obj, f"model {name!r}")
        return self._save(name, kind, layout, parts, example=found, **options)

    def save_files(self, name: str, paths: Sequence[Any], **options: Any) -> ModelVersion:
        """Save files, or folders' files, as the next version of ``name``."""
        parts = _files.files_parts(paths)
        return self._save(name, "files", _files_layout(parts), parts, example=None,
                          **options)

    def _save(self, name: str, kind: str, layout: Any, parts: list[Part], *,
              metadata: Mapping[str, Any] | None, tags: Mapping[str, Any] | None,
              aliases: Sequence[str], description: str,
              parent: str | ModelVersion | bool | None, source: bool,
              example: Example | None, compress: bool) -> ModelVersion:
        """Parts -> chunks -> packs -> catalog rows, in one write transaction."""
        model_layout, model_parts = layout, parts
        if example is not None:  # its parts after the model's, its descriptor beside
            layout = {"model": layout, "example": {
                "method": example.method, "kind": example.kind, "layout": example.layout,
                "first": len(parts)}}
            parts = [*parts, *example.parts]
        _json.check_depth(layout)  # what we write, we read back (ValueError)
        if isinstance(aliases, str):
            aliases = [aliases]
        aliases = [check_alias(a) for a in aliases]
        tag_items = [(k, v) for k, v in tag_changes(tags) if v is not None]
        if not isinstance(description, str):
            raise TypeError("description must be a string")
        if len(description) > MAX_TEXT:
            raise ValueError(f"description is {len(description):,} characters; the limit is "
                             f"{MAX_TEXT:,}")
        metadata_json = _metadata_json(metadata)
        # What the pickle imports, or what the arrays or the framework's model are made
        # of, decides which package versions the environment records.
        def imports() -> list[str]:
            if kind == "pickle":  # and cloudpickle, which pickled it
                return [*(model_parts[0].imports or []), "cloudpickle"]
            if kind == "arrays":
                return _serialize.native_imports(model_layout, model_parts)
            return [model_layout["class"]] if kind == "framework" else []

        # The first capture in a process (it reads every installed package's metadata,
        # ~0.3 s with many installed) is done beside the chunking.
        environment = _Background(
            lambda: json.dumps(_environment.capture(imports()), sort_keys=True))
        origin = _Background(lambda: json.dumps(
            _environment.source() if _environment.source_wanted(source) else {},
            sort_keys=True))
        key = _trust.own_private()
        size = sum(p.size for p in parts)
        with progress(size, f"save {name}", self._progress) as advance, \
                self._connection.write(size):
            created_at = now()
            model_id, number = self._catalog.next_number(name, created_at)
            # Uncompressed, a delta saves nothing and costs its base's decoding at a load.
            bases = self._delta_bases(name, kind, model_layout, model_parts,
                                      parent if compress else False)
            stored = self._packs.put(parts, bases + [None] * (len(parts) - len(bases)),
                                     advance, compress=compress)
            _limits.check(f"{name}:{number}", size,
                          lambda: self._packs.stored_bytes(stored.ids.values()),
                          self._max_expansion, saving=True)
            rows = [part_row(p, i, size) for i, (p, size) in enumerate(zip(parts, stored.sizes,
                                                                           strict=True))]
            ancestor = (None if parent is None or isinstance(parent, bool)
                        else self._catalog.resolve(as_ref(parent)).uuid)
            if isinstance(parent, ModelVersion) and ancestor != parent.id:
                raise NotFoundError(f"{parent.ref} (id {parent.id}) is not in this vault: "
                                    "a version of the same name and number is another one")
            where_from = origin.result()
            manifest = _trust.Manifest(
                str(uuid.uuid4()), name, kind, content_digest(kind, layout, rows, stored.hashes),
                created_at, description, metadata_json, environment.result(),
                _trust.lineage_text(ancestor, where_from))
            # Chunks went in first; the version's rows make it visible, and all of it
            # commits together.
            self._catalog.add(NewVersion(
                manifest, model_id, number, json.dumps(layout), stored.added,
                *_trust.sign(key, manifest), ancestor, where_from, rows,
                [[stored.ids[h] for h in hashes] for hashes in stored.hashes], tag_items,
                aliases))
            # Read before the commit: once it is in, another process may delete it.
            return self._catalog.record(Ref(name, version=number))

    def _delta_bases(self, name: str, kind: str, layout: Any, parts: list[Part],
                     parent: str | ModelVersion | bool | None) -> list[Bases | None]:
        """Per part, the parent version's chunks that new chunks may be XORed against."""
        if parent is False:
            return [None] * len(parts)
        if parent is None or parent is True:
            try:
                row = self._catalog.resolve(Ref(name))
            except NotFoundError:  # the model's first version
                return [None] * len(parts)
        else:
            row = self._catalog.resolve(as_ref(parent))
        return self._catalog.bases(row, kind, layout,
                                   [part_row(p, i, p.size) for i, p in enumerate(parts)])


class _Background:
    """``function()`` run on a thread of its own; ``result()`` waits for it and returns
    its value, or raises what it raised."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = function()
            except BaseException as exc:  # handed to the caller by result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="modelvault-background", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays turn up in metrics all the time (auc=np.float32(0.91)).
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON")


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping of str to JSON values")
    try:
        # A round trip leaves plain JSON types, so what is signed is what is stored.
        value = _json.loads(json.dumps(dict(metadata), default=_json_default, allow_nan=False))
    except RecursionError:
        raise ValueError(f"metadata nests deeper than {_json.MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise ValueError(f"metadata is not valid JSON: {exc}") from exc
    text = json.dumps(value, sort_keys=True)
    if len(text) > MAX_TEXT:
        raise ValueError(f"metadata is {len(text):,} characters of JSON; the limit is "
                         f"{MAX_TEXT:,} (store large things as a model of their own)")
    return text


def tag_changes(tags: Mapping[str, Any] | None) -> list[tuple[str, str | None]]:
    """Tags checked and as stored: (key, value as text), or (key, None) to remove one."""
    items = []
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tag keys are non-empty strings, not {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"tag {key!r}: values are strings (or numbers, stored as text)")
        items.append((key, None if value is None else str(value)))
    return items


def _example_of(model: Any, example: Any) -> Example:
    """The model's answer to ``example``, and both as parts to store. ValueError if the
    model cannot take it, before anything is written."""
    method = _selftest.method_of(model)
    try:
        answer = _selftest.answer(model, method, example)
    except Exception as exc:  # whatever the model's code raises: the example does not fit
        raise ValueError(f"the model cannot take this example: {method} raised "
                         f"{type(exc).__name__}: {exc}") from exc
    stored = {"input": _selftest.encode_example(example), "output": answer}
    try:
        kind, layout, parts = _serialize.serialize(stored, "the example")
    except TypeError:  # object arrays (mixed values): pickled, signed with the version
        kind, layout, parts = _serialize.pickled(stored, "the example")
    return Example(method, kind, layout, parts)


def _files_layout(parts: list[Part]) -> dict[str, Any]:
    """The layout of a version of files: their names and permission bits, and for each
    safetensors file its tensors' runs of chunks (what later versions' deltas match)."""
    layout: dict[str, Any] = {"files": [p.name for p in parts], "modes": [p.mode for p in parts]}
    runs = [tensor_runs(p) for p in parts]
    if any(r is not None for r in runs):
        layout["tensors"] = runs
    return layout
