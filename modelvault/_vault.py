"""The Vault: one SQLite file holding many models and their versions.

The public front. It checks arguments, turns sqlite3 and zstd errors into ours, applies
the trust policy, and puts the steps of each operation in order. The work itself is
done by the pieces it holds: the connection (``_connection``), the catalog of names,
versions and labels (``_catalog``), the pack store of chunks (``_packs``), the reader
of versions (``_reader``) and the copier between vaults (``_copier``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _limits, _trust
from ._catalog import (
    FILE_KINDS,
    Catalog,
)
from ._connection import Connection
from ._guard import api, snapshot
from ._packs import PackStore
from ._reader import Reader
from ._records import (
    ModelInfo,
    ModelVersion,
    Problem,
    VaultStats,
    VersionList,
)
from ._refs import Ref, check_alias, check_name
from ._refs import as_ref as _as_ref

# What only saves, merges, diffs, selftests, gc and verify use is imported by them: a
# process that opens a vault to load pays for none of it.
if TYPE_CHECKING:
    from datetime import datetime

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from . import _diff, _selftest
    from ._catalog import ModelSummary
    from ._reports import ImportReport, MergeReport, PruneReport, PushReport
    from ._writer import Writer

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
        # A bad policy or cap is refused before the file is made.
        require, cap = _trust.required(require), _limits.max_expansion(max_expansion)
        self._connection = Connection(self.path, readonly=readonly, create=create,
                                      timeout=timeout)
        self.readonly = self._connection.readonly  # a damaged file is, whatever was asked
        self._catalog = Catalog(self._connection)
        self._packs = PackStore(self._connection)
        self._reader = Reader(self._connection, self._catalog, self._packs,
                              require=require,
                              max_expansion=cap, progress=progress)

    @property
    def require(self) -> str | None:
        """"trusted" if only what a trusted key signed is read and pulled, else None (the
        reader holds it: set here, it applies there too)."""
        return self._reader.require

    @require.setter
    def require(self, value: str | None) -> None:
        self._reader.require = value

    @property
    def progress(self) -> bool | None:
        """Whether progress bars show; None: for long work when stderr is a terminal."""
        return self._reader.progress

    @progress.setter
    def progress(self, value: bool | None) -> None:
        self._reader.progress = value

    def close(self) -> None:
        """Close the file. The vault is again exactly one file on disk."""
        with self._connection.lock:
            self._connection.close()
            self._reader.close()  # its lazy mappings read nothing more

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vault {str(self.path)!r}>"

    def _repr_html_(self) -> str:  # a notebook's view: the file, its models and sizes
        from ._html import vault

        return vault(self.path, self._summaries)

    @api
    @snapshot
    def _summaries(self, models: int, aliases: int) -> tuple[list[ModelSummary], int, int]:
        """The first ``models`` models at a glance, their number and the file's size."""
        return (*self._catalog.summaries(models, aliases), self._connection.file_bytes())

    # -- saving -----------------------------------------------------------------

    @api
    def save(self, name: str, obj: Any, *, metadata: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None, aliases: Sequence[str] = (),
             description: str = "", parent: str | ModelVersion | bool | None = None,
             source: bool = True, example: Any = None, compress: bool = True) -> ModelVersion:
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

        ``compress=False`` stores the version's new chunks as they are, and no chunk as a
        delta of its parent's: loads then cost a read and a hash check per chunk (about
        twice as fast as compressed weights), for a file ~20 % (fp32) to ~45 % (bf16)
        bigger. Chunks the vault already holds stay as they are stored.

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
        return self._writer().save(name, obj, metadata=metadata, tags=tags, aliases=aliases,
                                   description=description, parent=parent, source=source,
                                   example=example, compress=compress)

    @api
    def save_files(self, name: str,
                   path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                   metadata: Mapping[str, Any] | None = None,
                   tags: Mapping[str, Any] | None = None, aliases: Sequence[str] = (),
                   description: str = "", parent: str | ModelVersion | bool | None = None,
                   source: bool = True, compress: bool = True) -> ModelVersion:
        """Save a file, a folder's files, or several of either as the next version of ``name``.

        For what frameworks write themselves: ONNX, safetensors, save_pretrained folders.
        ``extract`` writes them back out under the same relative paths, with the
        permission bits they had. Each tensor of a ``.safetensors`` file is chunked from
        its own start and stored as its XOR with the tensor of the same name in the
        ``parent`` version's file of the same path, where that is smaller (``parent``,
        ``source`` and ``compress`` as for ``save``): a fine-tuned checkpoint folder costs
        what its state dict would.

        Raises FileNotFoundError for a path that does not exist; ValueError as ``save``
        does, and for two files that would be stored under one name.
        """
        check_name(name)
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        return self._writer().save_files(name, paths, metadata=metadata, tags=tags,
                                         aliases=aliases, description=description,
                                         parent=parent, source=source, compress=compress)

    @api
    def import_(self, source: str | os.PathLike[str], *, name: str | None = None
                ) -> ImportReport:
        """Import a folder of ``checkpoint-N`` folders or a Hugging Face cache folder as
        versions of ``name``, or an MLflow registry ``mlflow:TRACKING_URI`` (every
        registered model, or the one ``name`` names, ``_mlflow``), skipping what an
        earlier import saved (``_importers``)."""
        from ._importers import import_source

        return import_source(self, source, name)

    def _writer(self) -> Writer:
        from ._writer import Writer

        return Writer(self._connection, self._catalog, self._packs,
                      max_expansion=self._reader.max_expansion, progress=self.progress)

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
            return VersionList(self._catalog.every_record())
        check_name(name)
        records = self._catalog.records("WHERE m.name = ? ORDER BY v.version", (name,))
        if not records:
            self._catalog.resolve(Ref(name))  # raises NotFoundError naming what exists
        return VersionList(records)

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
        self._reader.check_signature(row, trust, runs_code=keys is None and not lazy)
        return self._reader.load(row, device=device, keys=keys, lazy=lazy)

    @api
    @snapshot
    def lineage(self, ref: str | ModelVersion) -> list[ModelVersion]:
        """The versions ``ref`` came from, nearest first: its parent (``save(...,
        parent=...)``), that version's parent, and so on. The chain stops early at a
        parent this vault lacks; the last version's ``parent`` then names its id."""
        return VersionList(self._catalog.ancestors(self._catalog.resolve(_as_ref(ref)).id))

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
        from . import _selftest

        row = self._catalog.resolve(_as_ref(ref))
        return _selftest.run(self._reader, row, lambda: self.load(ref, trust=trust), trust)

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
        from . import _diff

        return _diff.diff(self._connection, self._catalog, self._reader,
                          [_as_ref(a), _as_ref(b)])

    def plot(self, name: str, metric: str | Sequence[str], *, x: str = "version",
             ax: Axes | None = None, path: str | os.PathLike[str] | None = None) -> Figure:
        """A matplotlib Figure of metadata ``metric`` (a key, a dotted path into nested
        metadata as "eval.loss", or a list of them) across the versions of model ``name``,
        by version number (``x="created"``: by time saved), aliases written at their
        points; drawn into ``ax`` if given, saved to ``path`` if given (its suffix picks
        the format). Versions without a plain finite number for it are skipped and
        counted in the title or legend. Needs matplotlib (``pip install
        'modelvault[plot]'``), else ImportError; NotFoundError for an unknown model or
        metric, naming the model's metrics.
        """
        from . import _plot

        return _plot.plot(name, self.versions(name), metric, x=x, ax=ax, path=path)

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
        self._reader.check_signature(row, trust)
        return self._reader.extract(row, out_dir)

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
        from ._writer import tag_changes

        items = tag_changes({**(tags or {}), **more})
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

    @api
    def prune(self, name: str | None = None, *, keep_last: int | None = None,
              keep_aliased: bool = True, keep_tagged: bool = False,
              keep_since: datetime | str | None = None, dry_run: bool = False) -> PruneReport:
        """Delete the versions (of model ``name``, or of every model) that no rule keeps.

        A version is kept if it is one of its model's ``keep_last`` newest, if an alias
        points at it (unless ``keep_aliased=False``), if it has tags and ``keep_tagged``,
        or if it was saved at or after ``keep_since`` (a datetime, naive meaning UTC, or
        an ISO 8601 date or time in UTC). Each model's latest version is always kept.
        At least one of ``keep_last``, ``keep_since`` and ``keep_tagged`` must be given.
        The report lists what went (``dry_run``: what would go, deleting nothing) and
        the stored bytes ``gc()`` then frees; until gc the file keeps its size.

        >>> vault.prune("demo", keep_last=1).deleted
        ()
        """
        from ._prune import prune

        if name is not None:
            check_name(name)
        return prune(self._connection, self._catalog, self._packs, name,
                     keep_last=keep_last, keep_aliased=keep_aliased, keep_tagged=keep_tagged,
                     keep_since=keep_since, dry_run=dry_run)

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
        from ._copier import export

        return export(self._connection, self._catalog, self._packs, dest, ids,
                      skip_damaged=skip_damaged)

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
        from ._copier import merge

        return merge(self._connection, self._catalog, self._packs, source, self.require)

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

        return _remote.push(self._local(), _remote.Remote(self._remote_url(url),
                                                  endpoint_url=endpoint_url,
                                                  single_writer=single_writer),
                            None if refs is None else [_as_ref(r) for r in refs])

    @api
    def pull(self, url: str, refs: Sequence[str] | None = None, *,
             endpoint_url: str | None = None, prefer: str | None = None) -> MergeReport:
        """Bring in every version of the remote at ``url``, or those ``refs`` name
        there, that this vault lacks, downloading only the chunks it lacks; then follow
        the remote's aliases and tags (of every model, or of those ``refs`` name).

        As ``merge``: every chunk's hash and every version's digest and signature are
        checked before it is added (IntegrityError naming the remote object at fault,
        and nothing of that version added); numbers that clash here are renumbered. A
        pickle from the remote still loads only with trust. Versions are added one by
        one, so a pull that was interrupted, run again, fetches only what had not
        arrived.

        Labels follow the remote the way git follows a remote's branches: the vault
        remembers where each alias and tag was on that remote when it last pulled. One
        that nobody moved here since moves to the remote's position (``moved`` in the
        report); one moved here only stays, for a push to send; one moved on both sides
        is a conflict, reported in the same words at every pull and left as it is here,
        unless ``prefer`` is "theirs" (take the remote's) or "ours" (keep this one, and
        stop reporting it until the remote moves it again).
        """
        from . import _remote

        return _remote.pull(self._local(), _remote.Remote(self._remote_url(url),
                                                  endpoint_url=endpoint_url), refs, prefer)

    def _local(self) -> Any:
        """The pieces push and pull work on (``_remote.Local``), with today's settings."""
        from . import _remote

        return _remote.Local(self.path, self._connection, self._catalog, self._packs,
                             self.progress, self.require)

    @api
    def remotes(self) -> dict[str, str]:
        """The remotes this vault remembers: URL by name (``add_remote``)."""
        from . import _remote

        return _remote.listed(self._connection)

    @api
    def add_remote(self, name: str, url: str) -> None:
        """Remember ``url`` as ``name``, so that ``push(name)`` and ``pull(name)`` reach it.
        Only the URL is stored: credentials stay in the environment, out of the file.
        A name is used only where it was added to this file by this user on this
        machine (docs/remote.md): adding it again confirms one the file came with."""
        from . import _remote

        _remote.add(self._connection, self.path, name, url)

    @api
    def remove_remote(self, name: str) -> None:
        """Forget the remote ``name`` (nothing on the remote changes)."""
        from . import _remote

        _remote.remove(self._connection, self.path, name)

    def _remote_url(self, url: str) -> str:
        """``url`` itself, or the URL of the remote this vault remembers as ``url``, if
        this user added it here (RemoteError otherwise)."""
        from . import _remote

        return _remote.url_of(self._connection, self.path, url)

    # -- housekeeping -----------------------------------------------------------

    @api
    def gc(self) -> int:
        """Drop chunks no version uses and give their space back; returns the bytes the
        file shrank by (``stats()`` before and after tells the chunks dropped).

        A chunk that another chunk is a delta of stays while that chunk does, and so
        does every chunk a lazy mapping (``load(..., lazy=True)``) open in any process
        may still read.
        """
        from ._gc import collect_garbage

        return collect_garbage(self._connection, self._catalog, self._packs)

    @api
    @snapshot
    def verify(self) -> list[Problem]:
        """Re-read and re-hash every chunk any version uses; returns the problems ([] = healthy).

        >>> vault.verify()
        []
        """
        from ._verify import verify

        return verify(self._connection, self._catalog, self._packs)

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
