"""The Vault: one SQLite file holding many models and their versions.

The public front. It checks arguments, turns sqlite3 and zstd errors into ours, applies
the trust policy, and puts the steps of each operation in order. The work itself is
done by the pieces it holds: the connection (``_connection``), the catalog of names,
versions and labels (``_catalog``), the pack store of chunks (``_packs``) and the
copier between vaults (``_copier``).
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import sqlite3
import tempfile
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import (
    _atomic,
    _copier,
    _diff,
    _environment,
    _frameworks,
    _json,
    _limits,
    _pickle_tensors,
    _pins,
    _schema,
    _selftest,
    _serialize,
    _trust,
)
from ._catalog import (
    FILE_KINDS,
    Catalog,
    Contents,
    NewVersion,
    VersionRow,
    model_contents,
    now,
    part_row,
)
from ._catalog import digest as content_digest
from ._chunks import np
from ._connection import Connection
from ._errors import (
    DamagedVaultWarning,
    EnvironmentWarning,
    IntegrityError,
    NotFoundError,
    UntrustedError,
    VaultError,
)
from ._guard import api, snapshot
from ._mapping import LazyVersion
from ._packs import Bases, ChunkRow, PackStore, batch_views, tensor_runs
from ._progress import progress
from ._records import (
    MergeReport,
    ModelInfo,
    ModelVersion,
    Problem,
    PushReport,
    VaultStats,
)
from ._refs import Ref, check_alias, check_name, parse_ref
from ._serialize import Part

# Metadata and descriptions are for numbers and notes: far below what readers accept
# of a text column (_schema.MAX_VALUE), so whatever we write, we read back.
MAX_TEXT = 16 * 1024 * 1024


class Vault:
    """A model store in one SQLite file.

    >>> import numpy as np, modelvault
    >>> with modelvault.open(tmp_path / "models.vault") as vault:
    ...     mv = vault.save("iris/weights", {"w": np.ones(3)}, metadata={"acc": 0.9})
    ...     vault.load("iris/weights")["w"].tolist()
    [1.0, 1.0, 1.0]

    Args:
        path: the vault file; created if missing (unless ``readonly`` or not ``create``).
        readonly: open without the right to write; every write raises ReadOnlyError.
            A file cut short opens read-only whatever this says, with a
            DamagedVaultWarning; then every write raises CorruptVaultError.
        create: create the file if it is missing; if False, NotAVaultError instead.
        timeout: seconds to wait for another process's write lock before LockTimeout.
        progress: show progress bars on long saves and loads; default when stderr is a terminal.
        require: "trusted" to read (load, extract, selftest) and pull only versions a
            trusted key signed, arrays and files too, even with ``trust=True``; default
            MODELVAULT_REQUIRE, else None: only what runs code needs a signature.
        max_expansion: how many times the bytes the file stores for a version it may
            expand to when read, past 1 GiB (TooLargeError beyond; see ``_limits``);
            default MODELVAULT_MAX_EXPANSION or 1000, ``float("inf")`` lifts the cap.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 create: bool = True, timeout: float = 60.0,
                 progress: bool | None = None, require: str | None = None,
                 max_expansion: float | None = None) -> None:
        self.path = Path(path)
        self.require = _trust.required(require)
        self._max_expansion = _limits.max_expansion(max_expansion)
        self.progress = progress
        self._connection = Connection(self.path, readonly=readonly, create=create,
                                      timeout=timeout)
        self.readonly = self._connection.readonly  # a damaged file is, whatever was asked
        self._catalog = Catalog(self._connection)
        self._packs = PackStore(self._connection)
        self._lazy: list[weakref.ref[LazyVersion]] = []  # closed with the vault

    def close(self) -> None:
        """Close the file. The vault is again exactly one file on disk."""
        with self._connection.lock:
            self._connection.close()
            for mapping in filter(None, (ref() for ref in self._lazy)):
                mapping.close()  # its lazy mappings read nothing more
            self._lazy.clear()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vault {str(self.path)!r}>"

    # -- saving -----------------------------------------------------------------

    @api
    def save(self, name: str, obj: Any, *, metadata: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None, aliases: Sequence[str] = (),
             description: str = "", parent: str | ModelVersion | bool | None = None,
             source: bool = True, example: Any = None) -> ModelVersion:
        """Save ``obj`` as the next version of model ``name``.

        numpy arrays and scalars, torch tensors (a ``state_dict()``), and
        dicts/OrderedDicts/lists/tuples of them, are stored natively (no pickle). xgboost,
        lightgbm and onnx models and Hugging Face objects with ``save_pretrained`` are
        stored in their framework's own format and load without pickle. Anything else goes
        through cloudpickle, with every torch tensor's storage taken out of the stream
        (a whole ``nn.Module``, an optimizer, a checkpoint). Metadata is immutable once
        saved; tags and aliases can change later.

        An array that changed since the ``parent`` version (by default the model's latest;
        any ref, such as a base model saved under another name; or False for none) is
        stored as its XOR with the parent's array of the same name, shape and dtype
        wherever that is smaller: a full fine-tune then takes about half the space. A
        ``parent`` ref is also recorded as the version's lineage (``lineage()``).

        The version records its source: the git commit, branch and whether the working
        tree had changes (when the current directory is in a git repository), and the
        script or notebook that saved it; ``source=False`` or the environment variable
        ``MODELVAULT_NO_SOURCE=1`` leaves it out.

        ``example``: an input the model takes (numpy, a pandas DataFrame, torch tensors,
        or containers of them). It is stored with the version, with the model's answer
        to it from the first of predict_proba, predict, transform and decision_function
        the model has (or the model called, if it is callable), for ``selftest``.

        Raises ValueError for an invalid name, alias or tag, metadata that is not JSON,
        or metadata or a description over 16 MiB, and for an example the model cannot
        take (before anything is written); NotFoundError for a ``parent`` that does not
        exist; UnpicklableError (a TypeError) for a model holding something pickle
        refuses (a lock, a connection), naming where in the model it is.

        >>> mv = vault.save("demo", {"weights": np.zeros(4)}, metadata={"auc": 0.91})
        >>> mv.ref, mv.metadata
        ('demo:2', {'auc': 0.91})
        """
        check_name(name)
        options = {"metadata": metadata, "tags": tags, "aliases": aliases,
                   "description": description, "parent": parent, "source": source,
                   "example": None if example is None else _example_of(obj, example)}
        handler = _frameworks.find(obj)
        if handler is not None:
            with tempfile.TemporaryDirectory(prefix="modelvault-") as folder:
                try:
                    record = _frameworks.save(handler, obj, Path(folder))
                except ValueError:  # parameters JSON cannot hold: pickled instead
                    pass
                else:
                    parts = _serialize.files_parts([folder])
                    return self._save(name, "framework", {**_files_layout(parts), **record},
                                      parts, **options)
        kind, layout, parts = _serialize.serialize(obj, f"model {name!r}")
        return self._save(name, kind, layout, parts, **options)

    @api
    def save_files(self, name: str,
                   path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                   metadata: Mapping[str, Any] | None = None,
                   tags: Mapping[str, Any] | None = None, aliases: Sequence[str] = (),
                   description: str = "", parent: str | ModelVersion | bool | None = None,
                   source: bool = True) -> ModelVersion:
        """Save a file, a folder's files, or several of either as the next version of ``name``.

        For what frameworks write themselves: ONNX, safetensors, save_pretrained folders.
        ``extract`` writes them back out under the same relative paths, with the
        permission bits they had. Each tensor of a ``.safetensors`` file is chunked from
        its own start and stored as its XOR with the tensor of the same name in the
        ``parent`` version's file of the same path, where that is smaller (``parent`` and
        ``source`` as for ``save``): a fine-tuned checkpoint folder costs what its state
        dict would.

        Raises FileNotFoundError for a path that does not exist; ValueError as ``save``
        does, and for two files that would be stored under one name.
        """
        check_name(name)
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        parts = _serialize.files_parts(paths)
        return self._save(name, "files", _files_layout(parts), parts, metadata=metadata,
                          tags=tags, aliases=aliases, description=description, parent=parent,
                          source=source, example=None)

    def _save(self, name: str, kind: str, layout: Any, parts: list[Part], *,
              metadata: Mapping[str, Any] | None, tags: Mapping[str, Any] | None,
              aliases: Sequence[str], description: str,
              parent: str | ModelVersion | bool | None, source: bool,
              example: tuple[str, str, Any, list[Part]] | None) -> ModelVersion:
        """Parts -> chunks -> packs -> catalog rows, in one write transaction."""
        model_layout, model_parts = layout, parts
        if example is not None:  # its parts after the model's, its descriptor beside
            method, example_kind, example_layout, example_parts = example
            layout = {"model": layout, "example": {
                "method": method, "kind": example_kind, "layout": example_layout,
                "first": len(parts)}}
            parts = [*parts, *example_parts]
        _json.check_depth(layout)  # what we write, we read back (ValueError)
        if isinstance(aliases, str):
            aliases = [aliases]
        aliases = [check_alias(a) for a in aliases]
        tag_items = [(k, v) for k, v in _tag_items(tags) if v is not None]
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
                stream = model_parts[0].data
                return [*_trust.own_pickle_imports(
                    stream.obj if isinstance(stream.obj, bytes) else bytes(stream),
                    [p.data for p in model_parts[1:]]), "cloudpickle"]
            if kind == "arrays":
                return _serialize.native_imports(model_layout, model_parts)
            return [model_layout["class"]] if kind == "framework" else []

        # What the pickle imports (a replay of its stream: ~10 ms for a 20 MB forest) and
        # the first capture in a process (it reads every installed package's metadata,
        # ~0.3 s with many installed) are done beside the chunking.
        environment = _Background(
            lambda: json.dumps(_environment.capture(imports()), sort_keys=True))
        origin = _Background(lambda: json.dumps(
            _environment.source() if _environment.source_wanted(source) else {},
            sort_keys=True))
        key = _trust.own_private()
        size = sum(p.size for p in parts)
        with progress(size, f"save {name}", self.progress) as advance, \
                self._connection.write(size):
            created_at = now()
            model_id, number = self._catalog.next_number(name, created_at)
            bases = self._delta_bases(name, kind, model_layout, model_parts, parent)
            stored = self._packs.put(parts, bases + [None] * (len(parts) - len(bases)),
                                     advance)
            _limits.check(f"{name}:{number}", size,
                          lambda: self._packs.stored_bytes(stored.ids.values()),
                          self._max_expansion, saving=True)
            rows = [part_row(p, i, size) for i, (p, size) in enumerate(zip(parts, stored.sizes,
                                                                           strict=True))]
            ancestor = (None if parent is None or isinstance(parent, bool)
                        else self._catalog.resolve(_as_ref(parent)).uuid)
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
            row = self._catalog.resolve(_as_ref(parent))
        return self._catalog.bases(row, kind, layout,
                                   [part_row(p, i, p.size) for i, p in enumerate(parts)])

    # -- reading ----------------------------------------------------------------

    @api
    @snapshot
    def get(self, ref: str | ModelVersion) -> ModelVersion:
        """The version ``ref`` names (``name``, ``name:N`` or ``name@alias``); reads no model bytes.

        >>> vault.get("demo").version
        1
        """
        return self._catalog.record(_as_ref(ref))

    @api
    @snapshot
    def models(self) -> list[ModelInfo]:
        """Every model with its number of versions and latest version, by name.

        >>> [(m.name, m.versions) for m in vault.models()]
        [('demo', 1)]
        """
        return self._catalog.models()

    @api
    @snapshot
    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version of model ``name``, oldest first; of every model (by name) if None.

        >>> [v.version for v in vault.versions("demo")]
        [1]
        """
        if name is None:
            return self._catalog.every_record()
        check_name(name)
        records = self._catalog.records("WHERE m.name = ? ORDER BY v.version", (name,))
        if not records:
            self._catalog.resolve(Ref(name))  # raises NotFoundError naming what exists
        return records

    @api
    @snapshot
    def load(self, ref: str | ModelVersion, *, trust: bool = False, device: Any = None,
             keys: str | Sequence[str] | None = None, lazy: bool = False) -> Any:
        """Load the model ``ref`` names, checking every chunk's hash.

        A pickled model loads only if a trusted key signed it, or with ``trust=True``;
        otherwise UntrustedError lists what the pickle would import. Arrays and tensors
        never need trust. torch tensors come back on the CPU, or on ``device`` (as
        safetensors' ``device=``: "cuda:0", a torch.device). A files version loads as a
        dict of path to bytes (see ``extract``).

        Of an arrays version (arrays, tensors, a state dict), ``keys`` (a name or glob
        pattern, or a list of them, over the flat names: dict keys and list positions
        joined with '.', as ``encoder.layer.0.*``) loads just those entries as a flat
        dict, decoding only their chunks; KeyError for a pattern that picks none. The
        same for the torch tensors of a pickle (an ``nn.Module`` by its ``state_dict()``
        names, a checkpoint), read without unpickling it and so without trust, and for
        the tensors of safetensors files; ValueError for a version without tensors.
        ``lazy=True`` returns a read-only mapping of every entry by flat name that
        decodes each one when it is first read, until it or this vault is closed (its
        ``close()``, or a ``with`` block); no gc in any process removes its chunks
        before.

        Of a pickled or framework version, warns (EnvironmentWarning) when a package it
        imports has another major.minor here than when it was saved, or none is
        installed, or Python's minor version differs.

        >>> vault.load("demo")
        [1, 2, 3]
        """
        row = self._catalog.resolve(_as_ref(ref))
        # Only a whole load runs a pickle's or a framework's code: entries are read from
        # the stored tensors by modelvault itself.
        whole = keys is None and not lazy
        self._check_signature(row, trust, runs_code=whole)
        # Arrays, tensors and files are rebuilt by modelvault itself, the same under any
        # versions; a pickle or a framework's model runs its packages' code.
        found = (_environment.differences(_environment_of(row))
                 if whole and row.kind in ("pickle", "framework") else [])
        if found:
            warnings.warn(EnvironmentWarning(
                f"{row.where} was saved with " + ", ".join(
                    f"{name} {saved} (here {here or 'not installed'})"
                    for name, saved, here in found)
                + f"; it may behave differently. `modelvault env VAULT {row.where}` prints "
                  "its requirements"), stacklevel=4)  # past _api and _snapshot
        return self._load(row, device=device, keys=keys, lazy=lazy)

    def _load(self, row: VersionRow, *, device: Any, keys: str | Sequence[str] | None,
              lazy: bool) -> Any:
        """Load a version whose signature was checked."""
        if keys is None and not lazy:
            return _rebuild(row, self._read(row), device)
        if keys is not None and lazy:
            raise ValueError("keys= and lazy=True do not go together: a lazy mapping has "
                             "every entry")
        contents = self._contents(row)
        fetch, names = self._entries(row, contents, device)

        def checked(name: str) -> Any:  # a damaged entry is an IntegrityError, as in load()
            try:
                return fetch(name)
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                raise row.error(f"cannot rebuild {name}: {exc}") from exc

        if lazy:
            # Pinned inside this read: see _pins for why gc in any process then keeps them.
            pin = _pins.Pin(self._connection.lock_file,
                            (c.id for chunks in contents.chunks for c in chunks))
            mapping = LazyVersion(row.where, names, checked, self._connection.lock,
                                  pin.release)
            self._lazy = [ref for ref in self._lazy if ref() is not None]
            self._lazy.append(weakref.ref(mapping))
            return mapping
        return {name: checked(name) for name in _serialize.select(
            names, [keys] if isinstance(keys, str) else keys)}

    @api
    @snapshot
    def lineage(self, ref: str | ModelVersion) -> list[ModelVersion]:
        """The versions ``ref`` came from, nearest first: its parent (``save(...,
        parent=...)``), that version's parent, and so on. The chain stops early at a
        parent this vault lacks; the last version's ``parent`` then names its id."""
        return self._catalog.ancestors(self._catalog.resolve(_as_ref(ref)).id)

    @api
    @snapshot
    def selftest(self, ref: str | ModelVersion, *, trust: bool = False
                 ) -> _selftest.SelftestResult:
        """Load the model ``ref`` names, ask it its saved example again (``save(...,
        example=...)``) here, with the packages installed here, and compare its answer
        with the one saved: exactly for integers, booleans and labels, within
        ``RTOL``/``ATOL`` of ``modelvault._selftest`` for floats. The result says
        whether it passed, how many values differ and by how much; ``passed`` is None
        for a version saved without an example. Trust as for ``load``.
        """
        row = self._catalog.resolve(_as_ref(ref))
        example = row.layouts()[1]
        if example is None:
            return _selftest.SelftestResult(row.where, None, None, 0, 0, None, None,
                                            "no example was saved with it")
        model = self.load(ref, trust=trust)
        saved = self._example(row, example, trust)
        # The file never chooses the code to run: only a method of our own list, that
        # this model has (a class may have gained another since the save).
        method = example.get("method")
        if not _selftest.askable(model, method):
            raise row.error(f"its example cannot be asked: it names {str(method)[:80]!r}, "
                            f"not one of {', '.join(_selftest.METHODS)} or __call__ that "
                            f"this {type(model).__name__} has")
        try:
            now = _selftest.answer(model, method, _selftest.decode_example(saved["input"]))
        except Exception as exc:  # the model's own code failing is the finding
            return _selftest.SelftestResult(
                row.where, method, False, 0, 0, None, None,
                f"{method} failed on the saved example: {type(exc).__name__}: {exc}")
        return _selftest.compare(row.where, method, saved["output"], now)

    def _example(self, row: VersionRow, example: dict[str, Any], trust: bool) -> Any:
        """A version's saved example and answer: {"input": ..., "output": ...}."""
        parts = self._read(row, contents=self._contents(row, example=True))
        try:
            if example.get("kind") == "arrays":
                return _serialize.rebuild_native(example["layout"], parts)
            if example.get("kind") == "pickle":
                # It runs code as a pickled model does, whatever the model's own kind.
                status = _trust.signature_status(row.manifest, row.key_id, row.signature)
                if not trust and status != "trusted":
                    _refuse_pickle(row, "has a pickled example",
                                   parts[example["layout"]["pickle"]][1], status)
                return _serialize.unpickle(example["layout"], parts)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise row.error(f"cannot rebuild its example: {exc}") from exc
        raise row.error(f"its example has unknown kind {example.get('kind')!r}")

    @api
    def diff(self, a: str | ModelVersion, b: str | ModelVersion) -> _diff.Diff:
        """What differs from version ``a`` to version ``b``, of one model or two.

        Metadata, tags, aliases, description and environment (Python, platform and
        package versions); of arrays and tensors (arrays versions, and the safetensors
        files of files versions), every entry by flat name: added, removed, dtype or
        shape changed, and for the same dtype and shape the largest absolute change, the
        relative L2 change and the share of elements changed; of files, added, removed
        and changed paths with sizes; of pickles, whether the streams are equal (nothing
        is unpickled, so no trust is needed); and how many of b's bytes a shares.

        ValueError if the two are of different kinds (a pickle and an arrays version).
        """
        with self._connection.read():
            rows = [self._catalog.resolve(_as_ref(ref)) for ref in (a, b)]
            if self.require is not None:  # its values are the version's data too
                for row in rows:
                    _trust.check_required(self.require, _trust.signature_status(
                        row.manifest, row.key_id, row.signature), row.where)
            if rows[0].kind != rows[1].kind:
                raise ValueError(f"cannot diff {rows[0].where}, {rows[0].what}, "
                                 f"with {rows[1].where}, {rows[1].what}")
            records = [self._catalog.records("WHERE v.id = ?", (r.id,))[0] for r in rows]
            contents = [self._contents(r) for r in rows]
        hashes = [[[c.hash for c in chunks] for chunks in found.chunks] for found in contents]
        sizes = {c.hash: c.size for chunks in contents[1].chunks for c in chunks}
        seen = {h for part in hashes[0] for h in part}
        shared = sum(size for h, size in sizes.items() if h in seen)
        kind = rows[0].kind
        entries: list[_diff.EntryChange] = []
        if kind in FILE_KINDS:
            entries += _file_changes(contents, hashes)
        if kind == "arrays" or any(r.layouts()[0].get("tensors") for r in rows):
            entries += self._entry_changes(rows)
        if kind == "arrays":
            entries += _value_changes(rows)
        return _diff.Diff(
            records[0].ref, records[1].ref, kind,
            _diff.Changes.between(*(r.metadata for r in records)),
            _diff.Changes.between(*(r.tags for r in records)),
            _diff.Changes.between(*({alias: r.ref for alias in r.aliases} for r in records)),
            _diff.Changes.between(*(_diff.environment_items(r.environment) for r in records)),
            None if records[0].description == records[1].description
            else (records[0].description, records[1].description),
            tuple(entries),
            hashes[0] == hashes[1] and rows[0].layout == rows[1].layout
            if kind == "pickle" else None,
            shared, sum(sizes.values()) - shared)

    def _entry_changes(self, rows: list[VersionRow]) -> list[_diff.EntryChange]:
        """Each array or tensor of two versions compared, one entry in memory at a time.
        Nothing is unpickled, so no trust is needed; a signature that fails still refuses."""
        maps = []
        for row in rows:
            if _trust.signature_status(row.manifest, row.key_id, row.signature) == "invalid":
                raise row.error("its signature does not match: the version was changed "
                                "after it was saved")
            try:
                maps.append(self._load(row, device=None, keys=None, lazy=True))
            except ValueError:  # a files version without safetensors files
                maps.append({})
        names = list(dict.fromkeys([*maps[0], *maps[1]]))
        return [_diff.compare(name, maps[0][name] if name in maps[0] else None,
                              maps[1][name] if name in maps[1] else None) for name in names]

    def _entries(self, row: VersionRow, contents: Contents, device: Any
                 ) -> tuple[Callable[[str], Any], list[str]]:
        """The flat names of a version's entries, and a function that reads one of them
        (only its chunks): the arrays and tensors of an arrays version, the tensors of a
        pickle (read from its stream, never run), or the tensors of a files or framework
        version's safetensors files."""
        layout = row.layouts()[0]
        if row.kind in ("arrays", "pickle"):
            found = (_serialize.entries(layout) if row.kind == "arrays"
                     else self._pickle_entries(row, contents, layout))

            class Parts(dict):  # a part is read when the rebuilder first asks for it
                def __missing__(parts, index: int) -> Any:
                    parts[index] = self._read_part(row, contents, index)
                    return parts[index]

            rebuilder = _serialize.Rebuilder(Parts(), device)
            return (lambda name: rebuilder.node(found[name])), list(found)
        if row.kind in FILE_KINDS and layout.get("tensors"):
            # A tensor's name, or "file:name" where several files have one of that name.
            found = [(f"{layout['files'][part]}:{run[0]}", run[0], part, run)
                     for part, file_runs in enumerate(layout["tensors"])
                     for run in file_runs or []]
            counts = collections.Counter(name for _, name, _, _ in found)
            runs = {(name if counts[name] == 1 else qualified): (part, run)
                    for qualified, name, part, run in found}
            return (lambda name: self._read_tensor(row, contents, *runs[name], device)), \
                list(runs)
        raise _no_entries(row)

    def _pickle_entries(self, row: VersionRow, contents: Contents, layout: Any
                        ) -> dict[str, dict[str, Any]]:
        """The torch tensors of a pickle version as arrays layout nodes, by name."""
        index = layout.get("pickle") if isinstance(layout, dict) else None
        if not (type(index) is int and 0 <= index < len(contents.parts)):
            raise row.error("its layout names no pickle stream")
        try:
            found = _pickle_tensors.entries(
                self._read(row, only={index}, contents=contents)[index][1], layout)
        except ValueError as exc:
            raise row.error(f"cannot read its tensors' names: {exc}") from exc
        if not found:
            raise _no_entries(row)
        return found

    def _check_signature(self, row: VersionRow, trust: bool, *, runs_code: bool = True
                         ) -> None:
        """Refuse pickles no trusted key signed (and framework files that may run code),
        if loading ``runs_code``, and any version whose signature fails; under
        require="trusted", any version no trusted key signed, whatever ``trust``."""
        if trust and self.require is None:
            return  # nothing to ask the signature (an ed25519 check costs ~0.4 ms)
        status = _trust.signature_status(row.manifest, row.key_id, row.signature)
        _trust.check_required(self.require, status, row.where)
        if trust:
            return
        if runs_code and row.kind == "pickle" and status != "trusted":
            _refuse_pickle(row, "is a pickle", self._read(row, only={0})[0][1], status)
        risky = _frameworks.needs_trust([p.name for p in self._contents(row).parts]) \
            if runs_code and row.kind == "framework" and status != "trusted" else []
        if risky:
            raise UntrustedError(
                f"{row.where} holds files its framework may run code from when it loads "
                f"them ({', '.join(risky)}) and {_trust.untrusted_why(status)}. {_TRUST_ADVICE}",
                imports=risky)
        if status == "invalid":
            raise row.error("its signature does not match: the version was changed after "
                            "it was saved (load with trust=True to read it anyway)")

    @api
    @snapshot
    def extract(self, ref: str | ModelVersion, out_dir: str | os.PathLike[str], *,
                trust: bool = False) -> list[Path]:
        """Write a files version's files below ``out_dir``; returns the paths written.

        Each file gets the permission bits it had when it was saved (versions saved
        before modelvault recorded them: the usual bits for a new file). Like ``load``,
        refuses a version whose signature fails unless ``trust=True``. Raises ValueError
        for a version that holds a Python object rather than files.
        """
        row = self._catalog.resolve(_as_ref(ref))
        if row.kind not in FILE_KINDS:
            raise ValueError(f"{row.where} holds a Python object, not files; use load()")
        self._check_signature(row, trust)
        contents = self._contents(row)
        try:  # every name checked before the first byte is written
            targets = [Path(out_dir).joinpath(*path.parts) for path in
                       _serialize.safe_relative_paths(p.name for p in contents.parts)]
        except ValueError as exc:
            raise row.error(str(exc)) from exc
        modes = _file_modes(row, len(targets))
        with progress(sum(p.size for p in contents.parts),
                            f"extract {row.where}", self.progress) as advance:
            for chunks, target, mode in zip(contents.chunks, targets, modes, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                # Written batch by batch (a checkpoint need not fit in memory) to a side
                # file, renamed only once every chunk checked out: no half-written model.
                partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
                try:
                    # Created as open() creates files (0666 less the umask), then given
                    # the recorded bits, if any.
                    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                    with os.fdopen(fd, "wb") as f:
                        if mode is not None:
                            os.fchmod(f.fileno(), mode)
                        self._fill(row, batch_views(chunks), advance,
                                   done=lambda views, f=f: f.writelines(views))
                    os.replace(partial, target)
                finally:
                    if os.path.exists(partial):
                        os.unlink(partial)
        return targets

    def _contents(self, row: VersionRow, *, example: bool = False) -> Contents:
        """A version's parts and chunk lists, checked against its digest: the model's, or
        if ``example``, those of the example saved with it (the parts after them)."""
        contents = self._catalog.contents(row)
        self._catalog.check(row, contents)
        def stored() -> float:
            try:
                return self._packs.stored_bytes(c.id for chunks in contents.chunks
                                                for c in chunks)
            except sqlite3.DatabaseError as exc:  # its packs' rows on a damaged page
                raise row.error(f"its packs cannot be read ({exc})") from exc

        _limits.check(row.where, sum(p.size for p in contents.parts), stored,
                      self._max_expansion)
        try:
            model = model_contents(contents, row.layouts()[1])
        except (ValueError, TypeError) as exc:
            raise row.error(str(exc)) from exc
        if not example:
            return model
        first = len(model.parts)
        return Contents(contents.parts[first:], contents.chunks[first:])

    def _read(self, row: VersionRow, *, only: set[int] | None = None,
              contents: Contents | None = None) -> list[Any]:
        """Every part of a version as (part row, uint8 buffer), each chunk's hash checked;
        None for the parts not in ``only``, if given (their chunks are not read)."""
        parts, lists = contents if contents is not None else self._contents(row)
        wanted = [i for i in range(len(parts)) if only is None or i in only]
        outs = {i: np.empty(parts[i].size, dtype=np.uint8) for i in wanted}

        def pieces() -> Iterator[tuple[ChunkRow, memoryview]]:
            for i in wanted:
                view, offset = memoryview(outs[i]), 0
                for chunk in lists[i]:
                    yield chunk, view[offset:offset + chunk.size]
                    offset += chunk.size

        with progress(sum(parts[i].size for i in wanted), f"load {row.where}",
                      self.progress) as advance:
            self._fill(row, pieces(), advance)
        return [(part, outs[i]) if i in outs else None for i, part in enumerate(parts)]

    @api
    @snapshot
    def _read_part(self, row: VersionRow, contents: Contents, index: int,
                   chunks: slice = slice(None)) -> Any:
        """One part of a version (or the ``chunks`` of it), as (part row, buffer).

        ``contents`` may be older than this read (a lazy mapping's): the chunks are found
        again by hash if another process's gc moved them since.
        """
        def read(lists: list[list[ChunkRow]]) -> Any:
            mine = list(contents.chunks)
            mine[index] = lists[index][chunks]
            parts = list(contents.parts)
            parts[index] = parts[index]._replace(size=sum(c.size for c in mine[index]))
            return self._read(row, only={index}, contents=Contents(parts, mine))[index]

        try:
            return read(contents.chunks)
        except IntegrityError:
            hashes = [c.hash for c in contents.chunks[index][chunks]]
            found = self._packs.rows(hashes)
            if not all(h in found for h in hashes):
                raise NotFoundError(f"{row.where} was deleted, and its chunks collected, "
                                    "since this lazy mapping was made") from None
            lists = list(contents.chunks)
            lists[index] = [None] * len(lists[index])
            lists[index][chunks] = [found[h] for h in hashes]
            return read(lists)

    def _read_tensor(self, row: VersionRow, contents: Contents, part: int, run: list[Any],
                     device: Any) -> Any:
        """One tensor of a safetensors file part, from its own chunks only."""
        name, dtype, shape, first, count = run
        _, buffer = self._read_part(row, contents, part, slice(first, first + count))
        return _serialize.file_tensor(buffer, dtype, shape, device)

    def _fill(self, row: VersionRow, pieces: Any, advance: Callable[[int], Any],
              done: Callable[[list[memoryview]], Any] | None = None) -> None:
        """The pack store's read, with a failing chunk named as this version's."""
        try:
            self._packs.read(pieces, advance, done)
        except IntegrityError as exc:
            raise row.error(str(exc), exc.chunk) from exc

    # -- changing names ---------------------------------------------------------

    @api
    def alias(self, ref: str | ModelVersion, alias: str) -> ModelVersion:
        """Point ``alias`` at the version ``ref`` names, moving it if it points elsewhere.

        >>> vault.alias("demo:1", "production").aliases
        ('production',)
        """
        check_alias(alias)
        with self._connection.write():
            row = self._catalog.resolve(_as_ref(ref))
            self._catalog.set_alias(row, alias)
            return self._catalog.record(Ref(row.name, version=row.version))

    @api
    def unalias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from model ``name``; NotFoundError if it does not exist."""
        check_name(name)
        check_alias(alias)
        with self._connection.write():
            self._catalog.remove_alias(name, alias)

    @api
    def tag(self, ref: str | ModelVersion, tags: Mapping[str, Any] | None = None,
            /, **more: Any) -> ModelVersion:
        """Set tags on a version; a value of None removes that tag.

        >>> vault.tag("demo:1", stage="prod").tags
        {'stage': 'prod'}
        """
        items = _tag_items({**(tags or {}), **more})
        with self._connection.write():
            row = self._catalog.resolve(_as_ref(ref))
            self._catalog.set_tags(row, items)
            return self._catalog.record(Ref(row.name, version=row.version))

    @api
    def delete(self, ref: str | ModelVersion) -> int:
        """Delete one version (``name:N``, ``name@alias``) or a whole model (``name``).

        Returns the number of versions deleted. Their chunks stay until ``gc()``.
        Numbers of deleted versions are not given out again while the model exists.
        """
        target = _as_ref(ref)
        with self._connection.write():
            return self._catalog.delete(target)

    # -- copies -----------------------------------------------------------------

    @api
    def export(self, dest: str | os.PathLike[str],
               refs: Sequence[str | ModelVersion] | None = None, *,
               skip_damaged: bool = False) -> Path:
        """Write a compact vault holding every version, or the versions ``refs`` name, to
        ``dest``: only their chunks (and the delta bases those need), packed anew.

        The copy is made in a temporary file beside ``dest``, flushed to disk, then
        renamed over it, so ``dest`` is at every moment the complete old file or the
        complete new one: the way to publish a vault into a synced folder or attach it
        to an email. Signatures, aliases and tags go along; so do version numbers.

        ``skip_damaged``: the salvage of a damaged vault. Leave out the versions
        ``verify()`` finds anything wrong with, and name them in a DamagedVaultWarning.
        """
        dest = Path(dest)
        if dest.exists() and dest.resolve() == self.path.resolve():
            raise ValueError(f"{dest} is the vault itself; export to another file")
        with self._connection.read():
            ids = None if refs is None else sorted(
                {self._catalog.resolve(_as_ref(ref)).id for ref in refs})
        if skip_damaged:
            ids = self._whole(ids, dest)
        partial = _atomic.scratch_path(dest, ".partial")
        try:
            with Vault(partial, timeout=self._connection.timeout, progress=False) as copy:
                copy._copy_from(self.path, ids, check=False, action="export",
                                damaged=self._connection.damage is not None)
                copy.gc()  # repacks the packs that came along with chunks left behind
            _atomic.fsync(partial)
            os.replace(partial, dest)
            _atomic.fsync(dest.parent, directory=True)
        finally:
            for leftover in (partial, f"{partial}-journal"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return dest

    def _whole(self, ids: list[int] | None, dest: Path) -> list[int]:
        """The versions ``ids`` (every one if None) that verify() finds nothing wrong
        with; a DamagedVaultWarning names the others."""
        damaged = {(p.model, p.version) for p in self.verify() if p.version is not None}
        with self._connection.read():
            rows = [r for r in self._catalog.rows() if ids is None or r.id in ids]
        left_out = [r.where for r in rows if (r.name, r.version) in damaged]
        if left_out:
            warnings.warn(DamagedVaultWarning(
                f"{self.path}: left out of {dest.name}, damaged: {', '.join(left_out)}"),
                stacklevel=4)
        return [r.id for r in rows if (r.name, r.version) not in damaged]

    @api
    def merge(self, other: str | os.PathLike[str] | Vault) -> MergeReport:
        """Bring in every version of the vault ``other`` that this one lacks, copying only
        the chunks this one lacks. ``other`` is read, never changed.

        Versions are matched by id (``ModelVersion.id``), not number, so two copies of
        one vault that both went on being used (a sync service's "conflicted copy")
        merge without loss. A version brought in keeps its number unless a version here
        holds it; from the first such clash on, a model's versions brought in are
        numbered after this vault's last number, oldest first. An alias or tag that
        differs between the two is left as it is here. The report lists the versions
        added, the numbers changed and the conflicts.

        Every chunk brought in is decoded and its hash checked first: a damaged ``other``
        raises IntegrityError and nothing is merged. ``other`` is read under its read
        lock, while this vault is locked for writing: merging A into B while B is merged
        into A makes one of the two wait for the other, and time out (LockTimeout).
        """
        source = Path(other.path if isinstance(other, Vault) else other)
        if source.exists() and os.path.samefile(source, self.path):  # hard links too
            raise ValueError(f"{source} is the vault itself; merge another file into it")
        # Opening it as a vault first gives the usual errors for a file that is not one
        # (or that needs a writable open to roll back an interrupted write).
        with Vault(source, readonly=True, create=False) as theirs:
            if self.require is None:
                ids, refused = None, []
            else:  # as a pull does: only what a key trusted here signed comes in
                ids, refused = theirs._required_ids(self.require)
        report = self._copy_from(source, ids, check=True, action="merge")
        return MergeReport(report.added, report.renumbered, (*report.conflicts, *refused))

    @api
    @snapshot
    def _required_ids(self, require: str) -> tuple[list[int], list[str]]:
        """The row ids of the versions ``require`` lets in, and a line for each refused."""
        ids, refused = [], []
        for row in self._catalog.rows():
            status = _trust.signature_status(row.manifest, row.key_id, row.signature)
            try:
                _trust.check_required(require, status, row.where)
                ids.append(row.id)
            except UntrustedError as exc:
                refused.append(f"not merged: {exc}")
        return ids, refused

    @api
    def push(self, url: str, refs: Sequence[str | ModelVersion] | None = None, *,
             endpoint_url: str | None = None, single_writer: bool = False) -> PushReport:
        """Send every version, or those ``refs`` name, to the remote at ``url``
        (``s3://bucket/prefix``, ``gs://``, ``az://``, ``file://``, ``memory://``, or
        the name of one ``add_remote`` stored), uploading only the chunks it lacks; a
        version already there is not sent again.

        Versions keep their numbers there unless the remote gave a number out already;
        then they take the next one (``PushReport.added`` says). Aliases and tags of the
        versions pushed go along. S3 credentials, region and endpoint come from the
        usual AWS environment variables and files; ``endpoint_url`` names another
        S3-compatible server. A remote that ignores create-only writes is refused unless
        ``single_writer`` (only this process ever writes to it).
        """
        from . import _remote  # obstore and the network stack only for remotes

        local = _remote.Local(self.path, self._connection, self._catalog, self._packs,
                              self.progress, self.require)
        return _remote.push(local, _remote.Remote(self._remote_url(url),
                                                  endpoint_url=endpoint_url,
                                                  single_writer=single_writer),
                            None if refs is None else [_as_ref(r) for r in refs])

    @api
    def pull(self, url: str, refs: Sequence[str] | None = None, *,
             endpoint_url: str | None = None) -> MergeReport:
        """Bring in every version of the remote at ``url``, or those ``refs`` name
        there, that this vault lacks, downloading only the chunks it lacks.

        As ``merge``: every chunk's hash and every version's digest and signature are
        checked before it is added (IntegrityError naming the remote object at fault,
        and nothing of that version added); numbers that clash here are renumbered;
        aliases and tags come along unless they differ here. A pickle from the remote
        still loads only with trust. Versions are added one by one, so a pull that was
        interrupted, run again, fetches only what had not arrived.
        """
        from . import _remote

        local = _remote.Local(self.path, self._connection, self._catalog, self._packs,
                              self.progress, self.require)
        return _remote.pull(local, _remote.Remote(self._remote_url(url),
                                                  endpoint_url=endpoint_url), refs)

    @api
    @snapshot
    def remotes(self) -> dict[str, str]:
        """The remotes this vault remembers: URL by name (``add_remote``)."""
        if self._connection.format < 6:
            return {}
        return dict(self._connection.db.execute("SELECT name, url FROM remotes ORDER BY name"))

    @api
    def add_remote(self, name: str, url: str) -> None:
        """Remember ``url`` as ``name``, so that ``push(name)`` and ``pull(name)`` reach it.
        Only the URL is stored: credentials stay in the environment, out of the file.
        A name is used only where it was added to this file by this user on this
        machine (docs/remote.md): adding it again confirms one the file came with."""
        from . import _remote

        _remote.check_remote(name, url)
        with self._connection.write() as db:
            db.execute("INSERT OR REPLACE INTO remotes (name, url) VALUES (?, ?)", (name, url))
        _remote.confirm(self.path, name, url)

    @api
    def remove_remote(self, name: str) -> None:
        """Forget the remote ``name`` (nothing on the remote changes)."""
        from . import _remote

        with self._connection.write() as db:
            if not db.execute("DELETE FROM remotes WHERE name = ?", (name,)).rowcount:
                raise NotFoundError(f"no remote named {name!r} in {self.path.name}")
        _remote.confirm(self.path, name, None)

    def _remote_url(self, url: str) -> str:
        """``url`` itself, or the URL of the remote this vault remembers as ``url``, if
        this user added it here (RemoteError otherwise)."""
        from . import _remote

        if "://" in url:
            return url
        found = self.remotes().get(url)
        if found is None:
            raise NotFoundError(f"{url!r} is neither a URL (s3://, gs://, az://, file://) nor "
                                f"a remote {self.path.name} remembers (add_remote)")
        return _remote.named(self.path, url, found)

    def _copy_from(self, source: Path, ids: list[int] | None, *, check: bool,
                   action: str, damaged: bool = False) -> MergeReport:
        return _copier.copy_from(self._connection, self._catalog, self._packs, source, ids,
                                 check=check, action=action, damaged=damaged)

    # -- housekeeping -----------------------------------------------------------

    @api
    def gc(self) -> int:
        """Drop chunks no version uses and give their space back; returns the bytes the
        file shrank by (``stats()`` before and after tells the chunks dropped).

        A chunk that another chunk is a delta of stays while that chunk does, and so
        does every chunk a lazy mapping (``load(..., lazy=True)``) open in any process
        may still read.
        """
        with self._connection.write(exclusive=True):
            before = self._connection.file_bytes()
            self._catalog.drop_unused_environments()
            self._packs.sweep()
            self._connection.vacuum()
            return before - self._connection.file_bytes()

    @api
    @snapshot
    def verify(self) -> list[Problem]:
        """Re-read and re-hash every chunk any version uses; returns the problems ([] = healthy).

        >>> vault.verify()
        []
        """
        problems = self._connection.problems() + self._catalog.problems()
        keys = _trust.trusted()
        users: dict[int, list[tuple[str, int]]] = {}  # every version that uses a chunk
        for row in self._catalog.rows():
            try:
                contents = self._catalog.contents(row)
                for chunk_id in {c.id for chunks in contents.chunks for c in chunks}:
                    users.setdefault(chunk_id, []).append((row.name, row.version))
                self._catalog.check(row, contents)
                if _trust.signature_status(row.manifest, row.key_id, row.signature,
                                           keys) == "invalid":
                    raise IntegrityError("signature does not match: the version was changed "
                                         "after it was saved")
            except IntegrityError as exc:
                problems.append(Problem(str(exc), row.name, row.version, exc.chunk))
            except sqlite3.DatabaseError as exc:  # its rows are on a damaged page
                if not _schema.is_damage(exc):
                    raise
                problems.append(Problem(f"its rows cannot be read ({exc})", row.name,
                                        row.version))
        for bad in self._packs.bad_chunks(self._packs.chunks(live=True)):
            for name, number in users.get(bad.id, [(None, None)]):
                problems.append(Problem(f"chunk {bad.hash}: {bad.problem}", name, number,
                                        bad.hash))
        return problems

    @api
    @snapshot
    def stats(self) -> VaultStats:
        """Sizes of the vault: raw, after dedup, after compression, and the file itself."""
        db = self._connection.db
        models, versions, raw = db.execute(
            "SELECT count(DISTINCT model_id), count(*), coalesce(sum(size), 0) "
            "FROM versions").fetchone()
        chunks, unique, stored = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), "
            "(SELECT coalesce(sum(length(data)), 0) FROM packs) FROM chunks").fetchone()
        return VaultStats(models=models, versions=versions, chunks=chunks, raw_bytes=raw,
                          unique_bytes=unique, stored_bytes=stored,
                          file_bytes=self._connection.file_bytes())


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


def _as_ref(ref: str | ModelVersion) -> Ref:
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)


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


def _tag_items(tags: Mapping[str, Any] | None) -> list[tuple[str, str | None]]:
    items = []
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tag keys are non-empty strings, not {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"tag {key!r}: values are strings (or numbers, stored as text)")
        items.append((key, None if value is None else str(value)))
    return items


def _value_changes(rows: list[VersionRow]) -> list[_diff.EntryChange]:
    """The plain values of two arrays versions (an epoch count beside the weights)."""
    try:
        found = [_diff.values(r.layouts()[0]) for r in rows]
    except (ValueError, TypeError) as exc:
        raise rows[0].error(f"cannot read its layout: {exc}") from exc
    missing = object()
    return [_diff.compare_values(name, found[0].get(name, missing),
                                 found[1].get(name, missing), missing)
            for name in dict.fromkeys([*found[0], *found[1]])]


def _file_changes(contents: list[Contents], hashes: list[list[list[str]]]
                  ) -> list[_diff.EntryChange]:
    """The files of two files versions by path: added, removed, changed or the same."""
    files = [{(part.name or f"part {i}"): (part.size, hashes[side][i])
              for i, part in enumerate(found.parts)} for side, found in enumerate(contents)]
    changes = []
    for path in dict.fromkeys([*files[0], *files[1]]):
        a, b = files[0].get(path), files[1].get(path)
        change = ("added" if a is None else "removed" if b is None
                  else "same" if a[1] == b[1] else "changed")
        changes.append(_diff.EntryChange(path, change, size=(a and a[0], b and b[0])))
    return changes


_TRUST_ADVICE = ("If you trust where this vault came from, load with trust=True (CLI: "
                 "--trust), or trust the saver's key with `modelvault trust KEYFILE`.")


def _refuse_pickle(row: VersionRow, what: str, stream: Any, status: str) -> None:
    """UntrustedError for a pickle of ``row`` no trusted key signed, naming what it would
    import (read from its opcodes, never run)."""
    imports = _trust.pickle_imports(bytes(stream))
    raise UntrustedError(
        f"{row.where} {what} and {_trust.untrusted_why(status)}; unpickling runs code from "
        f"{', '.join(imports) or 'Python builtins only'}. {_TRUST_ADVICE}", imports=imports)


def _no_entries(row: VersionRow) -> ValueError:
    return ValueError(
        f"{row.where} is {row.what} without tensors: keys= and lazy=True read the arrays "
        "and tensors of arrays versions, the torch tensors of pickles and the tensors of "
        "safetensors files")


def _example_of(model: Any, example: Any) -> tuple[str, str, Any, list[Part]]:
    """The model's answer to ``example``, and both as parts to store: (method, kind,
    layout, parts). ValueError if the model cannot take it, before anything is written."""
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
    return method, kind, layout, parts


def _files_layout(parts: list[Part]) -> dict[str, Any]:
    """The layout of a version of files: their names and permission bits, and for each
    safetensors file its tensors' runs of chunks (what later versions' deltas match)."""
    layout: dict[str, Any] = {"files": [p.name for p in parts], "modes": [p.mode for p in parts]}
    runs = [tensor_runs(p) for p in parts]
    if any(r is not None for r in runs):
        layout["tensors"] = runs
    return layout


def _file_modes(row: VersionRow, count: int) -> list[int | None]:
    """The permission bits a files version recorded for each file, or None each (saved
    before modelvault recorded them, or unreadable: the file still comes out)."""
    try:
        modes = row.layouts()[0].get("modes")
    except (ValueError, AttributeError):
        modes = None
    if not (isinstance(modes, list) and len(modes) == count
            and all(type(m) is int and 0 <= m <= 0o777 for m in modes)):
        return [None] * count
    return modes


def _rebuild(row: VersionRow, parts: list[tuple[Any, np.ndarray]], device: Any) -> Any:
    try:
        layout = row.layouts()[0]
        if row.kind == "arrays":
            return _serialize.rebuild_native(layout, parts, device)
        if row.kind == "pickle":
            return _unpickle(row, layout, parts, device)
        if row.kind == "files":
            return {p.name: buf.tobytes() for p, buf in parts}
        if row.kind == "framework":
            if [p.name for p, _ in parts] != layout.get("files"):
                raise ValueError("its files are not the ones its layout lists")
            with tempfile.TemporaryDirectory(prefix="modelvault-") as folder:
                paths = _serialize.safe_relative_paths(part.name for part, _ in parts)
                for (_, buffer), path in zip(parts, paths, strict=True):
                    target = Path(folder).joinpath(*path.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(buffer)
                try:
                    return _frameworks.load(layout, Path(folder), device)
                except (VaultError, ValueError, KeyError, TypeError, IndexError,
                        AttributeError):
                    raise
                except Exception as exc:  # the framework's own error reading its files
                    raise VaultError(f"{row.where}: {layout.get('framework')} could not "
                                     f"load it: {type(exc).__name__}: {exc} (saved with "
                                     f"{_saved_with(row)})") from exc
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise row.error(f"cannot rebuild: {exc}") from exc
    raise row.error(f"unknown kind {row.kind!r}")


def _unpickle(row: VersionRow, layout: Any, parts: list[tuple[Any, np.ndarray]],
              device: Any) -> Any:
    try:
        return _serialize.unpickle(layout, parts, device)
    except VaultError:
        raise
    except Exception as exc:
        # Usually a missing or incompatible package; say what the model was saved with.
        raise VaultError(f"{row.where}: unpickling failed with "
                         f"{type(exc).__name__}: {exc} (saved with {_saved_with(row)})") from exc


def _environment_of(row: VersionRow) -> dict[str, Any]:
    """A version's environment record; empty if it is unreadable (a damaged file)."""
    try:
        env = _json.loads(row.environment)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def _saved_with(row: VersionRow) -> str:
    """What a version was saved with, for messages: Python and its packages."""
    env = _environment_of(row)
    packages = env.get("packages")
    if not env or not isinstance(packages, dict):
        return "an unreadable environment"
    return ", ".join([f"python {env.get('python', '?')}"] + [
        f"{name} {version}" for name, version in packages.items()])
