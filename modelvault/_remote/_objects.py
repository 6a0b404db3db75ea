"""Pack objects and their indexes: where a remote's chunks are, and which copies are good.

A pack object (``packs/<h>.pack``) holds blobs of chunk data; its index
(``packs/<h>.idx``) says which chunks lie where. ``PackObjects`` reads the indexes that
count (kept in a cache folder on this machine, as pack objects never change), remembers
the copies this machine checked (``<h>.ok``) and takes a pack object a pull found bad as
absent. ``PackWriter`` gathers blobs into pack objects and uploads each with its index.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .. import _chunks, _json
from .._errors import IntegrityError
from ._store import HASH, Store, dumps, is_text, limit

PACK_OBJECT = 64 * 1024 * 1024  # a pack object's bytes, about
INDEX_ROWS = 100_000  # chunks in one pack object at most: its index stays far below its cap
_CHUNK_FIELDS = ("hash", "size", "codec", "itemsize", "base", "blob", "start", "length")


def _cache_dir(url: str) -> Path | None:
    """Where this machine keeps the pack indexes of the remote at ``url`` (None for
    memory:// remotes, which live no longer than the process)."""
    if url.startswith("memory://"):
        return None
    if os.environ.get("MODELVAULT_HOME"):
        base = Path(os.environ["MODELVAULT_HOME"]) / "cache"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelvault"
    import hashlib

    return base / "remotes" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _read_cached(cache: Path | None, name: str) -> bytes | None:
    try:
        return None if cache is None else (cache / name).read_bytes()
    except OSError:
        return None


def _write_cached(cache: Path | None, name: str, data: bytes) -> None:
    """Keep ``data`` as ``name`` in the cache; a cache that cannot be written is skipped."""
    if cache is None or not data:
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{name}.{secrets.token_hex(4)}"
        partial.write_bytes(data)
        os.replace(partial, cache / name)
    except OSError:
        pass


def _read_index(name: str, data: bytes, size: int) -> list[dict[str, Any]] | None:
    """The chunks (a dict of _CHUNK_FIELDS, "pack" and "span" each) the index ``data``
    of the pack object ``name``, listed with ``size`` bytes, gives; None unless it is
    well-formed (docs/remote.md) and matches that object: its ``pack`` is ``name``, its
    blobs lie back to back from byte 0 to ``size``, and every chunk lies in its blob."""
    try:
        idx = _json.loads(data)
        blobs, rows = idx["blobs"], idx["chunks"]
        if not (idx["pack"] == name and HASH.fullmatch(name) and size <= limit("pack")
                and isinstance(blobs, list) and isinstance(rows, list)):
            return None
        at = 0
        for blob in blobs:
            offset, stop, codec, content = blob
            if not (offset == at and type(stop) is int and at <= stop
                    <= at + 2 * _chunks.MAX_PACK and is_text(codec)
                    and type(content) is int and 0 <= content <= _chunks.MAX_PACK):
                return None
            at = stop
        if at != size:
            return None
        entries = []
        for row in rows:
            entry = dict(zip(_CHUNK_FIELDS, row, strict=True))
            _chunks.check_row(entry["size"], entry["codec"], entry["itemsize"], 0,
                              entry["start"], entry["length"])
            blob = entry["blob"]
            if not (is_text(entry["codec"]) and isinstance(entry["hash"], str)
                    and HASH.fullmatch(entry["hash"])
                    and (entry["base"] is None or (isinstance(entry["base"], str)
                                                   and HASH.fullmatch(entry["base"])))
                    and type(blob) is int and 0 <= blob < len(blobs)
                    and entry["start"] + entry["length"] <= blobs[blob][3]):
                return None
            entries.append({**entry, "pack": name, "span": blobs[blob]})
        return entries
    except (ValueError, KeyError, TypeError, IntegrityError):
        return None


class PackObjects:
    """The pack objects of the remote in ``store``, as far as this machine knows them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self._index: dict[str, dict[str, Any]] = {}  # chunk hash: where it is
        self._indexed: set[str] = set()  # pack indexes read into _index
        self.packs_of: dict[str, set[str]] = {}  # pack object name: its chunk hashes
        self.orphans: list[str] = []  # pack indexes whose .pack is missing
        self.bases_of: dict[str, set[str]] = {}  # chunk hash: its delta bases, every copy
        self.distrusted: dict[str, str] = {}  # pack object: what a pull found wrong in it
        self._checked: dict[str, set[str]] = {}  # pack object: its chunks checked here
        self._cache = _cache_dir(self.url)

    def index(self) -> dict[str, dict[str, Any]]:
        """Every chunk on the remote by hash: a pack object holding it, its blob and place.

        Only pack objects whose ``.pack`` and ``.idx`` are both listed count (a push
        writes the pack first; a gc deletes the index first), and of those only where
        the index is well-formed and matches its ``.pack`` as listed (``_read_index``):
        a push must not skip a chunk an index claims in a pack object that is not there,
        or every pull would fail and no push would mend it. Pack indexes never change
        once written (their names are their content's hash), so they are kept in a
        cache folder on this machine: a push or pull lists the pack objects and fetches
        only the indexes it has not seen, or whose listed size is not the one kept (one
        rewritten there counts as it is now). ``self.packs_of`` gives every pack
        object's chunk hashes. A pack object a pull found bad (``distrust``) does not
        count.
        """
        cache = self._cache
        listed = {m["path"]: m["size"] for m in self.store.list("packs/")}
        pairs = sorted(k for k in listed if k.endswith(".idx") and f"{k[:-4]}.pack" in listed)
        self.orphans = sorted(k for k in listed if k.endswith(".idx") and k not in pairs)
        for key in pairs:
            name = key.rsplit("/", 1)[1]
            if key in self._indexed or name[:-4] in self.distrusted:
                continue
            data = _read_cached(cache, name)
            if data is None or len(data) != listed[key]:  # new here, or changed there
                try:
                    data = self.store.get(key, "index")
                except IntegrityError:
                    data = b""  # too large to be a writer's: it does not count
                if data is None:
                    continue  # a remote gc deleted it after the listing: not there
                _write_cached(cache, name, data)
            entries = _read_index(name[:-4], data, listed[f"{key[:-4]}.pack"])
            if entries is None:
                continue  # as if absent: a push sends its chunks again, gc deletes it
            for entry in entries:
                self._index.setdefault(entry["hash"], entry)
                if entry["base"]:
                    self.bases_of.setdefault(entry["hash"], set()).add(entry["base"])
            self.packs_of[name[:-4]] = {entry["hash"] for entry in entries}
            self._indexed.add(key)
        if not self._indexed <= set(pairs):  # a gc deleted some: rebuild (from the cache)
            self._forget()
            return self.index()
        if cache is not None and cache.is_dir():  # of pack objects a remote gc deleted
            names = {key.rsplit("/", 1)[1][:-4] for key in pairs}
            for stale in os.listdir(cache):
                if stale.endswith((".idx", ".ok")) and stale.rsplit(".", 1)[0] not in names:
                    (cache / stale).unlink(missing_ok=True)
        return self._index

    def _forget(self) -> None:
        """Drop the chunk index read so far: the next ``index`` reads it again."""
        self._index, self._indexed, self.packs_of, self.bases_of = {}, set(), {}, {}

    def distrust(self, pack: str, why: str) -> None:
        """Take the pack object ``pack`` as absent from now on (a pull found that it
        does not hold what its index says, ``why``): its chunks come from other copies."""
        self.distrusted[pack] = why
        self._forget()

    def checked(self) -> set[str]:
        """The chunks this machine has checked in a pack object that holds them (it
        pushed them there, pulled them from it, or compared them with its own): a push
        need not read those again. Pack objects never change, so this is kept in the
        cache folder beside their indexes, as ``<h>.ok`` (the chunks' hashes)."""
        found: set[str] = set()
        for name, hashes in self.packs_of.items():
            found |= self._checked_in(name) & hashes
        return found

    def mark_checked(self, pack: str, hashes: Iterable[str]) -> None:
        """Remember that the chunks ``hashes`` of the pack object ``pack`` were checked."""
        hashes, known = set(hashes), self._checked_in(pack)
        if not known.issuperset(hashes):
            known.update(hashes)
            _write_cached(self._cache, f"{pack}.ok", "\n".join(sorted(known)).encode())

    def _checked_in(self, pack: str) -> set[str]:
        if pack not in self._checked:
            data = _read_cached(self._cache, f"{pack}.ok") or b""
            self._checked[pack] = set(data.decode("ascii", "replace").split())
        return self._checked[pack]

    def lost(self, chunk: str) -> str:
        """Why ``chunk`` is in no pack object: one whose index names it but whose
        ``.pack`` is missing, or that a pull found bad, if there is one."""
        whys = {key: "is missing" for key in self.orphans}
        whys.update({f"packs/{name}.idx": why for name, why in self.distrusted.items()})
        for key, why in whys.items():
            try:
                data = self.store.get(key, "index") or b""
            except IntegrityError:
                continue  # too big to be one of ours
            if chunk.encode() in data:
                return f"{self.url}/{key[:-4]}.pack {why} (its index names chunk {chunk})"
        return f"{self.url}: chunk {chunk} is in no pack object"


def by_object(index: dict[str, Any], hashes: Iterable[str]
              ) -> list[tuple[str, dict[int, list[str]]]]:
    """The pack objects ``index`` places ``hashes`` in, each with its blobs holding them
    and theirs, by name."""
    found: dict[str, dict[int, list[str]]] = {}
    for h in hashes:
        e = index[h]
        found.setdefault(e["pack"], {}).setdefault(e["blob"], []).append(h)
    return sorted(found.items())


def spans(index: dict[str, Any], blobs: dict[int, list[str]]) -> list[tuple[int, int]]:
    """The byte ranges of a pack object's ``blobs`` (``by_object``), in blob order."""
    found = [index[blobs[b][0]]["span"] for b in sorted(blobs)]
    return [(start, end) for start, end, *_ in found]


class Placed(NamedTuple):
    """A chunk as a blob holds it: what a pack object's index says of it, but the blob."""

    hash: str
    size: int
    codec: str
    itemsize: int
    base: str | None  # its delta base's hash
    start: int  # in the blob's content
    length: int


@dataclass
class Sent:
    """What a push uploaded: chunks, and bytes of pack objects."""

    chunks: int = 0
    bytes: int = 0


class PackWriter:
    """Blobs (vault packs) gathered into pack objects of about PACK_OBJECT bytes, each
    uploaded with its index once full, on a thread of its own: the next object is read
    from the vault while the last one uploads (obstore lets go of the GIL). Counts what
    it sent in ``sent``."""

    def __init__(self, objects: PackObjects, advance: Callable[[int], Any],
                 renew: Callable[[], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._renew = renew
        self._objects = objects
        self.sent = Sent()
        self._advance = advance
        self._blobs: list[bytes] = []
        self._spans: list[list[Any]] = []
        self._chunks: list[list[Any]] = []
        self._bytes = 0
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="modelvault-push")
        self._uploading: Any = None

    def add(self, codec: str, size: int, data: bytes, placed: list[Placed]) -> None:
        """Add a blob: ``data``, a ``codec`` blob whose content is ``size`` bytes, holding
        the chunks ``placed``."""
        blob = len(self._blobs)
        self._spans.append([self._bytes, self._bytes + len(data), codec, size])
        self._blobs.append(data)
        self._bytes += len(data)
        for c in placed:
            self._chunks.append([c.hash, c.size, c.codec, c.itemsize, c.base, blob, c.start,
                                 c.length])
        self._advance(sum(c.length for c in placed))
        if self._bytes >= PACK_OBJECT or len(self._chunks) >= INDEX_ROWS:
            self._send()

    def _send(self) -> None:
        if not self._blobs:
            return
        data = self._blobs  # uploaded piece by piece, never joined into one copy
        # Named by its bytes and what its index says of them: equal bytes can hold other
        # chunks (the same XOR delta between two other pairs of versions).
        described = dumps({"blobs": self._spans, "chunks": self._chunks})
        hasher = _chunks.blake3.blake3()
        for blob in data:
            hasher.update(blob)
        hasher.update(described)
        name = hasher.hexdigest()
        index = dumps({"pack": name, "blobs": self._spans, "chunks": self._chunks})
        self._wait()
        self._uploading = self._uploader.submit(self._upload, name, data, index,
                                                [row[0] for row in self._chunks])
        self.sent.chunks += len(self._chunks)
        self.sent.bytes += self._bytes
        self._blobs, self._spans, self._chunks, self._bytes = [], [], [], 0

    def _upload(self, name: str, data: list[bytes], index: bytes, hashes: list[str]
                ) -> None:
        # Data first, then its index: an index never names bytes that are not there.
        self._objects.store.put(f"packs/{name}.pack", data)
        self._objects.store.put(f"packs/{name}.idx", index)
        self._objects.mark_checked(name, hashes)  # our own bytes: no need to read them
        self._renew()

    def _wait(self) -> None:
        if self._uploading is not None:
            uploading, self._uploading = self._uploading, None
            uploading.result()

    def flush(self) -> None:
        """Send what is gathered and wait for every upload (raising what one raised)."""
        self._send()
        self._wait()

    def shutdown(self) -> None:
        self._uploader.shutdown(wait=True)
