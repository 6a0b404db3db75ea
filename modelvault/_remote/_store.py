"""The object-store client: one folder of a store obstore reaches, and what may be read.

``Store`` gets, ranged-gets, lists, puts (create-only where asked) and deletes objects,
and turns every refusal of the store (no bucket, no credentials, permissions, network)
into one line of RemoteError naming the object. What one read may bring into memory is
capped by kind (``limit``); the URLs a remote can have are checked here too. Every
object a remote holds is written as ``dumps`` writes JSON; chunks and pack objects are
named by hex BLAKE3 (``HASH``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._errors import IntegrityError, RemoteError

# What one read of a remote object may bring into memory, by kind (docs/remote.md, "Size
# limits"): far above what writers make, far below what would exhaust a machine; a
# 6 GiB log entry must not. The caller may raise one (MODELVAULT_REMOTE_MAX_<KIND>, in
# bytes), never the remote.
LIMITS = {"descriptor": 64 << 10, "lock": 64 << 10, "log": 16 << 20, "index": 64 << 20,
          "manifest": 256 << 20, "checkpoint": 256 << 20, "pack": 256 << 20}


def limit(kind: str) -> int:
    """The size cap on a remote object of ``kind`` (a key of LIMITS), in bytes."""
    name = f"MODELVAULT_REMOTE_MAX_{kind.upper()}"
    value = os.environ.get(name, "")
    if not value:
        return LIMITS[kind]
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name}={value!r}: a number of bytes")
    return int(value)


SCHEMES = ("s3://", "gs://", "az://", "abfs://", "file://", "memory://", "http://",
           "https://")


def store_url(url: object) -> str | None:
    """``url`` with its scheme in lower case (``S3://b`` is ``s3://b``), or None if it
    is not one of the schemes a remote can have."""
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    found = f"{scheme.lower()}{sep}"
    return f"{found}{rest}" if sep and found in SCHEMES else None


HASH = re.compile(r"[0-9a-f]{64}")  # a chunk's or pack object's name: hex BLAKE3


def is_text(value: object) -> bool:
    """Whether ``value`` is text SQLite can hold: a str without a lone surrogate, which
    JSON's ``\\u`` escapes can spell and UTF-8 cannot (binding one raises
    UnicodeEncodeError). modelvault never writes one: its text comes from SQLite."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps(value: Any) -> bytes:
    """``value`` as a remote's objects hold JSON: sorted keys, no spaces (docs/remote.md)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


_NO_AWS_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY (or run where an instance role gives them)")


def _aws_credentials() -> bool:
    """Whether the environment names AWS credentials (or says to go without)."""
    return any(os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    ) or os.environ.get("AWS_SKIP_SIGNATURE", "").lower() == "true"


def _no_bucket(exc: BaseException) -> bool:
    """Whether ``exc`` says the bucket (S3, GCS) or container (Azure) does not exist."""
    text = str(exc)
    return any(code in text for code in ("<Code>NoSuchBucket</Code>", "ContainerNotFound",
                                         "The specified bucket does not exist"))


def _absent(exc: BaseException) -> bool:
    """Whether ``exc`` says an object is missing (and not its whole bucket)."""
    from obstore.exceptions import NotFoundError as Missing

    return isinstance(exc, (Missing, FileNotFoundError)) and not _no_bucket(exc)


def _first_line(exc: BaseException) -> str:
    """What went wrong, in one line: obstore's first line (its debug dump follows), and
    the code and message of a server's XML error."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300].rstrip(": ") if text else type(exc).__name__
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    if code:
        first += f" ({code[1]}{f': {message[1]}' if message else ''})"
    return first


_MEMORY: dict[str, Any] = {}  # memory:// stores by URL: shared within a process (tests)


class Store:
    """One folder of an object store, through obstore: keys are relative to it."""

    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        try:
            import obstore
            from obstore.store import from_url
        except ImportError:
            raise ImportError("remotes need obstore: pip install 'modelvault[remote]'"
                              ) from None

        found = store_url(url)
        if found is None:
            raise RemoteError(f"{url}: not a remote URL; use one of {', '.join(SCHEMES)}")
        self.url = found.rstrip("/")
        self._obstore = obstore
        self._folder: Path | None = None  # file:// only
        options: dict[str, Any] = {}
        client: dict[str, Any] = {}
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        if self.url.startswith("s3://") and endpoint:
            options["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                client["allow_http"] = True
        if self.url.startswith("s3://") and not _aws_credentials() and os.environ.get(
                "AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            raise RemoteError(f"{self.url}: {_NO_AWS_CREDENTIALS}")
        if self.url.startswith(("az://", "abfs://")) and os.environ.get(
                "AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true"):
            client["allow_http"] = True  # Azurite, at AZURITE_BLOB_STORAGE_URL
        if self.url.startswith("memory://"):  # one store per name, in this process
            from obstore.store import MemoryStore

            self._store = _MEMORY.setdefault(self.url, MemoryStore())
        elif self.url.startswith("file://"):
            # Made on the first write (a read of a mistyped path creates nothing).
            self._folder = Path(self.url[len("file://"):])
            self._store = None
        else:
            try:
                self._store = from_url(self.url, client_options=client or None, **options)
            except Exception as exc:  # obstore's errors for a URL it cannot use
                raise RemoteError(f"{self.url}: not a store URL obstore can open "
                                  f"({_first_line(exc)})") from exc

    def _reach(self, *, write: bool = False) -> Any:
        """The obstore store; None for a file:// folder that does not exist (yet)."""
        if self._store is None and self._folder is not None:
            folder = self._folder
            if not folder.is_dir():
                if not write:
                    return None
                # Only the remote's own folder is made: a mistyped path must not
                # silently become a new remote.
                if not folder.parent.is_dir():
                    raise RemoteError(f"{self.url}: no folder {folder.parent}; a file:// "
                                      "remote's folder is made only inside one that exists")
                folder.mkdir(exist_ok=True)
            from obstore.store import LocalStore

            self._store = LocalStore(folder)
        return self._store

    def _regular(self, key: str) -> None:
        """IntegrityError naming ``key`` if, in a file:// folder, it is there but not a
        regular file (or a link to one): a named pipe would block a read forever, a
        device never end. Checked before obstore opens it, by path as obstore does."""
        if self._folder is None:
            return
        try:
            mode = os.stat(self._folder / key).st_mode
        except OSError:
            return  # missing (obstore says so) or unreachable (obstore's error names it)
        if not stat.S_ISREG(mode):
            raise IntegrityError(f"{self.url}/{key}: not a regular file (a named pipe, "
                                 "a device or a folder); a remote holds only files")

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """obstore's errors as ours, in one line naming the object: a remote that refuses
        us (no bucket, no credentials, permissions, network) is a RemoteError, never a
        raw obstore exception (some of which are built-in OSErrors) or a server's XML."""
        from obstore.exceptions import BaseError

        try:
            yield
        except (BaseError, OSError) as exc:
            text = str(exc)
            if _no_bucket(exc):
                bucket = self.url.split("://", 1)[1].split("/", 1)[0]
                raise RemoteError(f"{self.url}: there is no bucket {bucket!r}") from exc
            if "/latest/api/token" in text or "/latest/meta-data" in text:
                # Credentials came from nowhere, so the client asked the EC2 instance
                # metadata service last, and that refused (we are not on EC2).
                raise RemoteError(f"{self.url}: {_NO_AWS_CREDENTIALS}") from exc
            raise RemoteError(f"{self.url}/{key}: {_first_line(exc)}") from exc

    def get(self, key: str, kind: str) -> bytes | None:
        """An object's bytes; None if there is none. IntegrityError, before it is read,
        if it holds more than an object of ``kind`` may (``limit``)."""
        store = self._reach()
        if store is None:
            return None
        cap = limit(kind)
        self._regular(key)
        with self._errors(key):
            try:
                found = self._obstore.get(store, key)
                data = bytearray()
                if found.meta["size"] <= cap:  # the size as listed; then read with a bound
                    for piece in found.stream():
                        data += piece
                        if len(data) > cap:
                            break
            except Exception as exc:
                if _absent(exc):
                    return None
                raise
        if found.meta["size"] > cap or len(data) > cap:
            raise IntegrityError(
                f"{self.url}/{key}: {max(found.meta['size'], len(data))} bytes, more than "
                f"the {cap} a remote's {kind} object may hold (MODELVAULT_REMOTE_MAX_"
                f"{kind.upper()} raises that)")
        return bytes(data)

    def ranges(self, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
        """The byte ranges [start, end) of an object; FileNotFoundError if it is missing."""
        store = self._reach()
        got = None
        if store is not None:
            self._regular(key)
            with self._errors(key):
                try:
                    got = self._obstore.get_ranges(store, key, starts=[s for s, _ in spans],
                                                   ends=[e for _, e in spans])
                except Exception as exc:
                    if not _absent(exc):
                        raise
        if got is None:
            raise FileNotFoundError(f"{self.url}/{key}")
        return [bytes(b) for b in got]

    def put(self, key: str, data: bytes | list[bytes], *, create: bool = False) -> bool:
        """Write an object (``data``: its bytes, or its pieces in order); with ``create``,
        only if absent (False if it was there)."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        store = self._reach(write=True)
        with self._errors(key):
            try:
                self._obstore.put(store, key, data, mode="create" if create else "overwrite")
            except (AlreadyExistsError, PreconditionError):
                return False
        return True

    def list(self, prefix: str, after: str | None = None) -> list[dict[str, Any]]:
        """Objects under ``prefix`` (keys after ``after``, if given), by key."""
        store = self._reach()
        if store is None:
            return []
        found: list[dict[str, Any]] = []
        with self._errors(prefix):
            for batch in self._obstore.list(store, prefix=prefix, offset=after):
                found.extend(batch)
        found.sort(key=lambda meta: meta["path"])
        return found

    def delete(self, key: str) -> None:
        from obstore.exceptions import NotFoundError as Missing

        store = self._reach()
        if store is None:
            return
        with self._errors(key):
            try:
                self._obstore.delete(store, key)
            except (Missing, FileNotFoundError):
                pass  # gone already
