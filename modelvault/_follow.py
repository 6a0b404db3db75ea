"""A model that follows an alias: loaded once, swapped whole when the alias moves.

``follow`` opens a vault, loads the version a ref names (``churn@production``; a bare
name follows the latest version) and hands back a ``LiveModel``. A daemon thread then
checks every ``every`` seconds: with a remote, it pulls the ref first; then it asks
SQLite whether any other connection committed to the file since the last check
(``PRAGMA data_version`` on a connection of its own, a few microseconds) and whether
the file at the path was replaced (its inode); only then does it resolve the
ref (one query) and, if it names another version, load that version beside the one
serving and swap the one reference both hang on.

Serving reads that reference and nothing else: no lock, no query, no system call. A
check that fails (a pull, a damaged or unsigned version, a lock timeout, a file
replaced by garbage) changes nothing that serves; it is logged once per distinct error
on the "modelvault" logger, kept in ``LiveModel.error``, and tried again later, at
growing intervals while it keeps failing. docs/design.md ("Following an alias") says
more.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The front, from the package root (loaded before this module: see _LATER there).
from . import Vault, clone
from ._connection import Connection
from ._errors import NotAVaultError, ReadOnlyError, VaultError
from ._guard import translated
from ._records import ModelVersion
from ._refs import parse_ref

logger = logging.getLogger("modelvault")

# While checks keep failing, each waits twice as long as the one before, up to this
# many seconds (or ``every``, if longer): a remote that is down for an hour is not
# asked 120 times, and a damaged version is not read again every tick. A commit to the
# file is noticed at the next tick all the same.
MAX_BACKOFF = 300.0
# Seconds a check waits for another process's write lock, as ``modelvault.open``.
TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Serving:
    """A loaded model and the version it was loaded from: what a ``LiveModel`` serves."""

    model: Any
    version: ModelVersion


class LiveModel:
    """A model that stays the version ``ref`` names in a vault; see ``follow``.

    ``model`` is always a whole loaded model, ``version`` the ``ModelVersion`` it came
    from; ``current`` gives both from one moment (read ``model`` and then ``version``,
    and a swap may fall between). Calling the handle calls the model.

    Attributes: ``path``, ``ref``, ``remote`` and ``every`` as given to ``follow``;
    ``error``, why the last check failed (None once one works: a health probe's
    answer); ``checks``, how many checks ran, failed ones too.
    """

    def __init__(self, path: str | os.PathLike[str], ref: str, *, remote: str | None = None,
                 every: float = 30.0, endpoint_url: str | None = None, trust: bool = False,
                 require: str | None = None, device: Any = None, readonly: bool = False,
                 prefer: str | None = None,
                 on_change: Callable[[ModelVersion, ModelVersion], Any] | None = None
                 ) -> None:
        parse_ref(ref)  # a bad ref is refused before anything is opened
        if prefer not in (None, "theirs", "ours"):
            raise ValueError(f"prefer must be None, 'theirs' or 'ours', not {prefer!r}")
        if not every > 0:
            raise ValueError(f"every must be a positive number of seconds, not {every!r}")
        if remote is not None and readonly:
            raise ValueError("a read-only vault cannot pull: give remote or readonly, not both")
        self.path = Path(path)
        self.ref = ref
        self.remote = remote
        self.every = float(every)
        self.error: Exception | None = None
        self.checks = 0
        self._endpoint_url = endpoint_url
        self._trust, self._require, self._device = trust, require, device
        self._readonly = readonly
        self._on_change = on_change
        self._prefer = prefer
        self._failures = 0
        self._retry_at = 0.0  # time.monotonic() before which a failed check is not repeated
        self._logged: set[str] = set()  # the errors logged since the last check that worked
        self._conflicts: set[str] = set()  # what the last pull reported (logged once)
        self._closed = False
        if remote is not None and not self.path.exists():
            if "://" not in remote:
                raise NotAVaultError(f"{self.path}: no such vault; a remote named {remote!r} "
                                     "is looked up in the vault, so give its URL to clone it")
            try:
                clone(remote, self.path, [ref], endpoint_url=endpoint_url).close()
            except FileExistsError:
                pass  # another process following it cloned it meanwhile: open theirs
        self._file: _File | None = _File.open(self.path, self._opening())
        try:
            if remote is not None and self._file.vault.readonly:
                raise ReadOnlyError(f"{self.path} is read-only here, so it cannot pull from "
                                    f"{remote}: follow it without a remote")
            self._serving = self._file.fetch(ref, None, trust=trust, device=device)
        except BaseException:
            self._file.close()
            raise
        # One check at a time, the thread's or refresh()'s; reentrant for an on_change
        # that calls close() or refresh().
        self._checking = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start()
        _LIVE.add(self)

    # -- serving -----------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The model serving now: read it once per request."""
        return self._serving.model

    @property
    def version(self) -> ModelVersion:
        """The version ``model`` was loaded from."""
        return self._serving.version

    @property
    def current(self) -> Serving:
        """The model and its version, from one moment."""
        return self._serving

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._serving.model
        if not callable(model):
            raise TypeError(f"{self._serving.version.ref} is a {type(model).__name__}, which "
                            "cannot be called: use .model")
        return model(*args, **kwargs)

    # -- checking ----------------------------------------------------------------

    def refresh(self) -> bool:
        """Check now, whatever the interval; returns whether the model was swapped.

        Raises what the check raised (the model serving stays). In a child process made
        by fork(), the handle serves the model it had and follows nothing until this is
        called there: it then opens the vault anew and goes on following.
        """
        if self._closed:
            raise VaultError(f"following {self.ref} in {self.path} was stopped (close())")
        swapped = self._check(force=True)
        if self._thread is None:  # a fork child's first refresh
            self._start()
        return swapped

    def _start(self) -> None:
        # The thread holds the handle weakly: a handle dropped without close() is
        # collected, and its thread ends at its next tick.
        self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop,
                                                           self.every),
                                        daemon=True, name=f"modelvault follow {self.ref}")
        self._thread.start()

    def _check(self, *, force: bool) -> bool:
        # The thread's tick passes while refresh() checks, rather than wait for it: an
        # on_change run by refresh() may call close(), which waits for the thread.
        if not self._checking.acquire(blocking=force):
            return False
        try:
            if self._closed:
                return False
            try:
                swapped = self._check_once(force)
            except Exception as exc:
                self._failed(exc)
                if force:
                    raise
                return False
            finally:
                self.checks += 1
            if swapped is None:  # a tick that only waited out the backoff: still failing
                return False
            if self.error is not None:
                logger.info("following %s in %s works again", self.ref, self.path)
            self.error, self._failures, self._retry_at = None, 0, 0.0
            self._logged.clear()
            return swapped
        finally:
            self._checking.release()

    def _check_once(self, force: bool) -> bool | None:
        """One check; None if it tried nothing, waiting out the backoff of a failure."""
        due = force or time.monotonic() >= self._retry_at
        file = self._file
        if file is None or file.identity != _identity(self.path):
            # Replaced (a new export renamed over it), or not yet opened in a fork child.
            # The file in use serves until the new one has given a whole model.
            if not due and file is not None:
                return None
            new = _File.open(self.path, self._opening())
            try:
                serving = new.fetch(self.ref, self._serving.version, trust=self._trust,
                                    device=self._device)
            except BaseException:
                new.close()
                raise
            self._file = new
            if file is not None:
                file.close()
            return self._swap(serving)
        if self.remote is not None and due:
            report = file.vault.pull(self.remote, [self.ref], endpoint_url=self._endpoint_url,
                                     prefer=self._prefer)
            for conflict in set(report.conflicts) - self._conflicts:
                logger.warning("following %s in %s: pull from %s: %s", self.ref, self.path,
                               self.remote, conflict)
            self._conflicts = set(report.conflicts)
        if file.data_version() == file.seen and not force:
            if self.error is None:
                return False
            if not due:
                return None
        return self._swap(file.fetch(self.ref, self._serving.version, trust=self._trust,
                                     device=self._device))

    def _swap(self, serving: Serving | None) -> bool:
        if serving is None:
            return False
        old, self._serving = self._serving, serving  # the one step requests see
        logger.info("%s in %s: now serving %s (was %s)", self.ref, self.path,
                    serving.version.ref, old.version.ref)
        if self._on_change is not None:
            try:
                self._on_change(old.version, serving.version)
            except Exception:  # the swap stands: the callback is the caller's to mend
                logger.exception("on_change for %s raised", self.ref)
        return True

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        # The exponent capped: 2 ** 1024 is no float, and a vault gone for a night fails
        # that many times.
        delay = min(self.every * 2 ** min(self._failures - 1, 64),
                    max(self.every, MAX_BACKOFF))
        self._retry_at = time.monotonic() + delay
        self._log_once(f"{type(exc).__name__}: {exc}",
                       None if isinstance(exc, VaultError) else exc)
        # The traceback would keep the failed load's frames, and what they held, alive.
        cause: BaseException | None = exc
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            cause.__traceback__ = None
            cause = cause.__cause__ or cause.__context__
        self.error = exc

    def _log_once(self, message: str, exc: Exception | None) -> None:
        if message in self._logged:
            return
        self._logged.add(message)
        logger.warning("following %s in %s: %s; still serving %s", self.ref, self.path,
                       message, self._serving.version.ref, exc_info=exc)

    def _opening(self) -> dict[str, Any]:
        """How to open the vault: read-only if asked, or if this process cannot write
        the file or make a journal beside it (a read-only folder or mount)."""
        readonly = self._readonly or not (os.access(self.path, os.W_OK)
                                          and os.access(self.path.parent, os.W_OK))
        return {"readonly": readonly, "require": self._require}

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Stop following and close the vault; ``model`` keeps the last model. Waits for
        a check in progress (a load, a pull) to end."""
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._checking:
            file, self._file = self._file, None
            if file is not None:
                file.close()
        _LIVE.discard(self)

    def __enter__(self) -> LiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<LiveModel {self.ref} in {str(self.path)!r}: "
                f"{self._serving.version.ref}{' (closed)' if self._closed else ''}>")

    def _after_fork(self) -> None:
        """In a fork child: the parent's thread is gone and its locks may have been held
        at the fork. Keep serving; follow again only from ``refresh()``."""
        self._checking = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        # Closing the parent's connections here could roll back and delete a journal of
        # its write in progress: they are kept, unused, for the life of the child.
        if self._file is not None:
            _INHERITED.append(self._file)
        self._file = None


class _File:
    """The vault file being followed: the vault that loads and pulls, a connection of
    its own whose ``PRAGMA data_version`` changes when anyone else commits (the
    vault's own pulls included), and the file's identity."""

    def __init__(self, vault: Any, watcher: Connection, identity: tuple[int, int]) -> None:
        self.vault = vault
        self.watcher = watcher
        self.identity = identity
        self.seen: int | None = None  # the data_version last acted on

    @classmethod
    def open(cls, path: Path, options: dict[str, Any]) -> _File:
        # The identity first: a file renamed over this path between the two is then
        # opened again at the next check, never missed.
        identity = _identity(path)
        vault = Vault(path, create=False, timeout=TIMEOUT, **options)
        try:
            # Writable if the vault is, though it never writes: a writer killed mid-write
            # leaves a hot journal, which only a connection that may write rolls back,
            # and this is the one that reads first.
            watcher = Connection(path, readonly=vault.readonly, create=False,
                                 timeout=TIMEOUT)
        except BaseException:
            vault.close()
            raise
        return cls(vault, watcher, identity)

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the file."""
        with translated(self.vault.path), self.watcher.lock:
            return int(self.watcher.db.execute("PRAGMA data_version").fetchone()[0])

    def fetch(self, ref: str, serving: ModelVersion | None, *, trust: bool,
              device: Any) -> Serving | None:
        """The model ``ref`` names, loaded whole; None if that is ``serving`` still."""
        self.seen = self.data_version()  # what commits after this, the next check sees
        version = self.vault.get(ref)
        if serving is not None and version.id == serving.id:
            return None
        model = self.vault.load(version, trust=trust, device=device)
        # A version is loaded by its number; had the model been deleted and saved anew
        # in between, that number would name another version now.
        if self.vault.get(version).id != version.id:
            raise VaultError(f"{version.ref} in {self.vault.path} changed while it was "
                             "loaded; it is loaded again at the next check")
        return Serving(model, version)

    def close(self) -> None:
        self.watcher.close()
        self.vault.close()


def _run(live: weakref.ref[LiveModel], stop: threading.Event, every: float) -> None:
    """The checking thread: a check every ``every`` seconds until ``stop`` is set or
    the handle is gone."""
    every = min(every, threading.TIMEOUT_MAX)  # a longer wait (math.inf) raises
    while not stop.wait(every):
        handle = live()
        if handle is None:
            return
        handle._check(force=False)
        del handle


def _identity(path: Path) -> tuple[int, int]:
    # os.stat takes no file descriptor, so it cannot drop SQLite's POSIX locks.
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise NotAVaultError(f"{path}: the vault file is gone ({exc.strerror})") from exc
    return stat.st_dev, stat.st_ino


def follow(path: str | os.PathLike[str], ref: str, *, remote: str | None = None,
           every: float = 30.0, endpoint_url: str | None = None, trust: bool = False,
           require: str | None = None, device: Any = None, readonly: bool = False,
           prefer: str | None = None,
           on_change: Callable[[ModelVersion, ModelVersion], Any] | None = None
           ) -> LiveModel:
    """Load the model ``ref`` names in the vault at ``path`` and keep it current.

    ``ref`` is an alias ref (``churn@production``) or a model's name (then its latest
    version). Returns once the model is loaded; a first load that fails raises. A
    thread then checks every ``every`` seconds and, when the ref names another version,
    loads it beside the one serving and swaps it in whole. A check that fails keeps the
    model serving, logs the error once on the "modelvault" logger, keeps it in
    ``.error``, and is tried again.

    ``remote``: a URL (``s3://bucket/prefix``...) or a remote the vault remembers; each
    check pulls ``ref`` from it first (``Vault.pull``), and a missing vault file is
    first cloned from it (URL only). ``trust``, ``device``: as for ``Vault.load``;
    ``require="trusted"``: only versions a trusted key signed are served (see
    ``Vault``). ``readonly`` (also when the file or its folder is not writable): only
    watch, never write; a remote is then refused. ``prefer``: as for ``Vault.pull``;
    ``"theirs"`` lets the remote decide where an alias moved on both sides (an app's
    vault where nobody moves aliases by hand). ``on_change(old, new)`` is called on
    the checking thread after each swap, with the two ``ModelVersion``s.

    >>> import modelvault
    >>> mv = vault.alias("demo:1", "production")
    >>> with modelvault.follow(vault.path, "demo@production") as live:
    ...     live.model, live.version.ref
    ([1, 2, 3], 'demo:1')
    """
    return LiveModel(path, ref, remote=remote, every=every, endpoint_url=endpoint_url,
                     trust=trust, require=require, device=device, readonly=readonly,
                     prefer=prefer, on_change=on_change)


# Every open handle, for the fork hook; and what fork children keep of their parent's.
_LIVE: weakref.WeakSet[LiveModel] = weakref.WeakSet()
_INHERITED: list[_File] = []


def _after_fork_in_child() -> None:
    for live in list(_LIVE):
        live._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
