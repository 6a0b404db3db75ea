"""The read side: from a version's row to its objects, files and entries.

Owns the trust refusal (``check_signature``), a version's contents checked against its
digest and the expansion cap (``contents``), reading its parts chunk by chunk (``read``),
rebuilding the object a whole load returns (and unpickling it), the entries of
``keys=`` and ``lazy=True`` with the lazy mappings still open, the example saved with a
version, and writing a files version's files out (``extract``). The Vault front
resolves refs and hands the rows here; diff and selftest read through it too.
"""

from __future__ import annotations

import collections
import os
import sqlite3
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import _json, _limits, _pins, _serialize, _trust
from ._catalog import FILE_KINDS, Catalog, Contents, VersionRow, model_contents
from ._chunks import np
from ._connection import Connection
from ._errors import (
    EnvironmentWarning,
    IntegrityError,
    NotFoundError,
    UntrustedError,
    VaultError,
)
from ._guard import api, snapshot
from ._lazy import lazy
from ._mapping import LazyVersion
from ._packs import ChunkRow, PackStore, batch_views
from ._progress import progress

# Only some kinds of version need these: a load of arrays imports none of them.
_environment = lazy("modelvault._environment")
_files = lazy("modelvault._files")
_frameworks = lazy("modelvault._frameworks")
_pickle_tensors = lazy("modelvault._pickle_tensors")


class Reader:
    """Reads versions of one vault: its connection, catalog and pack store, under its
    ``require`` policy, expansion cap (``max_expansion``) and ``progress`` flag."""

    def __init__(self, connection: Connection, catalog: Catalog, packs: PackStore, *,
                 require: str | None, max_expansion: float, progress: bool | None) -> None:
        self._connection = connection
        self.path = connection.path  # for the errors of a lazy mapping's reads (_guard)
        self._catalog = catalog
        self._packs = packs
        self.require = require
        self.max_expansion = max_expansion
        self.progress = progress
        self._lazy: list[weakref.ref[LazyVersion]] = []  # closed with the vault

    def close(self) -> None:
        """Close the lazy mappings still open: they read nothing more. Called with the
        connection's lock held."""
        for mapping in filter(None, (ref() for ref in self._lazy)):
            mapping.close()
        self._lazy.clear()

    def check_signature(self, row: VersionRow, trust: bool, *, runs_code: bool = True
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
            _refuse_pickle(row, "is a pickle", self.read(row, only={0})[0][1], status)
        risky = _frameworks.needs_trust([p.name for p in self.contents(row).parts]) \
            if runs_code and row.kind == "framework" and status != "trusted" else []
        if risky:
            raise UntrustedError(
                f"{row.where} holds files its framework may run code from when it loads "
                f"them ({', '.join(risky)}) and {_trust.untrusted_why(status)}. {_TRUST_ADVICE}",
                imports=risky)
        if status == "invalid":
            raise row.error("its signature does not match: the version was changed after "
                            "it was saved (load with trust=True to read it anyway)")

    def load(self, row: VersionRow, *, device: Any = None,
             keys: str | Sequence[str] | None = None, lazy: bool = False) -> Any:
        """Load a version whose signature was checked: the whole object, the entries
        ``keys`` picks as a flat dict, or (``lazy``) a mapping of every entry."""
        if keys is None and not lazy:
            # Arrays, tensors and files are rebuilt by modelvault itself, the same under
            # any versions; a pickle or a framework's model runs its packages' code.
            found = (_environment.differences(_environment_of(row))
                     if row.kind in ("pickle", "framework") else [])
            if found:
                warnings.warn(EnvironmentWarning(
                    f"{row.where} was saved with " + ", ".join(
                        f"{name} {saved} (here {here or 'not installed'})"
                        for name, saved, here in found)
                    + f"; it may behave differently. `modelvault env VAULT {row.where}` "
                      "prints its requirements"),
                    stacklevel=5)  # past this, Vault.load and its api and snapshot guards
            return _rebuild(row, self.read(row), device)
        if keys is not None and lazy:
            raise ValueError("keys= and lazy=True do not go together: a lazy mapping has "
                             "every entry")
        contents = self.contents(row)
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

    def example(self, row: VersionRow, example: dict[str, Any], trust: bool) -> Any:
        """A version's saved example and answer: {"input": ..., "output": ...}, read by
        its descriptor ``example`` (``row.layouts()[1]``)."""
        parts = self.read(row, contents=self.contents(row, example=True))
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

    def extract(self, row: VersionRow, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write the files of a files version whose signature was checked below
        ``out_dir``, with their recorded permission bits; returns the paths written."""
        contents = self.contents(row)
        try:  # every name checked before the first byte is written
            targets = [Path(out_dir).joinpath(*path.parts) for path in
                       _files.safe_relative_paths(p.name for p in contents.parts)]
        except ValueError as exc:
            raise row.error(str(exc)) from exc
        modes = _file_modes(row, len(targets))
        with progress(sum(p.size for p in contents.parts),
                            f"extract {row.where}", self.progress) as advance:
            for chunks, target, mode in zip(contents.chunks, targets, modes, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                # Written batch by batch (a checkpoint need not fit in memory) to a side
                # file, renamed only once every chunk checked out: no half-written model.
                partial = target.with_name(f".{target.name}.{os.urandom(6).hex()}.partial")
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

    def contents(self, row: VersionRow, *, example: bool = False) -> Contents:
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
                      self.max_expansion)
        try:
            model = model_contents(contents, row.layouts()[1])
        except (ValueError, TypeError) as exc:
            raise row.error(str(exc)) from exc
        if not example:
            return model
        first = len(model.parts)
        return Contents(contents.parts[first:], contents.chunks[first:])

    def read(self, row: VersionRow, *, only: set[int] | None = None,
             contents: Contents | None = None) -> list[Any]:
        """Every part of a version as (part row, uint8 buffer), each chunk's hash checked;
        None for the parts not in ``only``, if given (their chunks are not read)."""
        parts, lists = contents if contents is not None else self.contents(row)
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
            return self.read(row, only={index}, contents=Contents(parts, mine))[index]

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
        _, dtype, shape, first, count = run
        _, buffer = self._read_part(row, contents, part, slice(first, first + count))
        return _files.file_tensor(buffer, dtype, shape, device)

    def _fill(self, row: VersionRow, pieces: Any, advance: Callable[[int], Any],
              done: Callable[[list[memoryview]], Any] | None = None) -> None:
        """The pack store's read, with a failing chunk named as this version's."""
        try:
            self._packs.read(pieces, advance, done)
        except IntegrityError as exc:
            raise row.error(str(exc), exc.chunk) from exc

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
                self.read(row, only={index}, contents=contents)[index][1], layout)
        except ValueError as exc:
            raise row.error(f"cannot read its tensors' names: {exc}") from exc
        if not found:
            raise _no_entries(row)
        return found


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
            import tempfile

            with tempfile.TemporaryDirectory(prefix="modelvault-") as folder:
                paths = _files.safe_relative_paths(part.name for part, _ in parts)
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
