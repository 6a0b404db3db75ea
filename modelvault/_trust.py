"""Keys, signatures, and what a pickle would import.

Unpickling runs code, so a pickled version loads only if a key this machine
trusts signed it. Each machine gets its own key on first use; it lives outside
every vault (a key stored in the vault would let whoever edits the vault re-sign
it). Teams share keys with ``modelvault key export`` and ``modelvault trust``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
import pickletools
import secrets
from pathlib import Path
from typing import Any, NamedTuple

from . import _atomic
from ._errors import VaultError

KEY_PREFIX = "modelvault-key-v1:"


def home() -> Path:
    """The folder holding this machine's key and the keys it trusts."""
    if os.environ.get("MODELVAULT_HOME"):
        return Path(os.environ["MODELVAULT_HOME"])
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "modelvault"


def key_id(key: bytes) -> str:
    """A short public name for a key, stored next to each signature."""
    return hashlib.sha256(b"modelvault key id" + key).hexdigest()[:16]


def existing_key() -> bytes | None:
    """This machine's signing key, or None if it has none yet."""
    try:
        return parse_key((home() / "key").read_text())
    except FileNotFoundError:
        return None


def own_key() -> bytes:
    """This machine's signing key, created on first use."""
    key = existing_key()
    if key is not None:
        return key
    path = home() / "key"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole beside it, then put into place: the key appears complete or not at
    # all, and if two threads or processes make one at once, both end up with the first.
    partial = _atomic.scratch_path(path, ".partial")
    write_private(partial, format_key(secrets.token_bytes(32)))
    try:
        _atomic.place(partial, path, mode=0o600)
    finally:
        partial.unlink()
    return parse_key(path.read_text())


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write a key file readable by its owner only, from its first byte on."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o600), "w") as f:
        f.write(text)


def format_key(key: bytes) -> str:
    return f"{KEY_PREFIX}{key.hex()}\n"


def parse_key(text: str) -> bytes:
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise VaultError("not a modelvault key file (expected 'modelvault-key-v1:<hex>')")
    try:
        key = bytes.fromhex(text[len(KEY_PREFIX):])
    except ValueError as exc:
        raise VaultError("modelvault key file holds invalid hex") from exc
    if len(key) != 32:
        raise VaultError("modelvault key must be 32 bytes")
    return key


def trusted_keys() -> dict[str, bytes]:
    """Every key whose signatures this machine accepts, by key id (its own included)."""
    keys = {}
    folder = home() / "trusted"
    if folder.is_dir():
        for path in sorted(folder.glob("*.key")):
            try:
                key = parse_key(path.read_text())
            except (OSError, VaultError):
                continue  # one unreadable file must not stop every load
            keys[key_id(key)] = key
    # Reading never creates a key: a read-only home must not stop loads.
    key = existing_key()
    if key is not None:
        keys[key_id(key)] = key
    return keys


def trust_key_file(path: str | os.PathLike[str]) -> str:
    """Accept signatures made with the key in ``path`` from now on; returns its id."""
    key = parse_key(Path(path).read_text())
    kid = key_id(key)
    folder = home() / "trusted"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{kid}.key"
    tmp = folder / f".{kid}.tmp"
    write_private(tmp, format_key(key))
    os.replace(tmp, target)
    return kid


def canonical_json(value: Any) -> bytes:
    """The one byte string a JSON value hashes and signs as."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a str holding a lone surrogate is legal Python and must still hash.
    return text.encode("utf-8", "surrogatepass")


class Manifest(NamedTuple):
    """What a version's signature covers (docs/format.md, "The signature and keys"), as
    stored: ``metadata`` and ``environment`` are the JSON texts of their columns.

    Not the version number: it is a local name, like an alias, and merge renumbers a
    version whose number is taken. The uuid, name and created_at identify the version;
    the chunk list is covered through the digest.
    """

    id: str
    name: str
    kind: str
    digest: str
    created_at: str
    description: str
    metadata: str
    environment: str

    def document(self) -> bytes:
        """The bytes signed: canonical JSON of the fields, the two JSON texts parsed.
        ValueError or TypeError if a text is not JSON (a damaged column)."""
        return canonical_json({**self._asdict(), "metadata": json.loads(self.metadata),
                               "environment": json.loads(self.environment)})


def sign(key: bytes, manifest: Manifest) -> str:
    return hmac.new(key, manifest.document(), hashlib.sha256).hexdigest()


def signature_status(manifest: Manifest, kid: object, signature: object,
                     keys: dict[str, bytes] | None = None) -> str:
    """'trusted', 'invalid' (a trusted key's signature fails), 'untrusted' or 'unsigned'.

    A manifest whose columns cannot be read fails a trusted key's signature. ``keys``
    defaults to the keys trusted right now.
    """
    if not kid or not signature:
        return "unsigned"
    if not isinstance(kid, str) or not isinstance(signature, str):
        return "invalid"  # a damaged column (bytes where text belongs)
    keys = trusted_keys() if keys is None else keys
    if kid not in keys:
        return "untrusted"
    try:
        ok = hmac.compare_digest(sign(keys[kid], manifest), signature)
    except (TypeError, ValueError):
        ok = False
    return "trusted" if ok else "invalid"


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
               "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}


def pickle_imports(stream: bytes) -> list[str]:
    """The ``module.name`` globals a pickle would import, read from its opcodes.

    Nothing is executed. STACK_GLOBAL takes its two names from the stack, so the
    strings pushed (directly or through the memo) are tracked well enough to name them.
    """
    found: list[str] = []
    strings: list[Any] = []  # recent values pushed, strings or None for anything else
    memo: dict[Any, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(stream)):
            name = opcode.name
            if name == "GLOBAL" or name == "INST":
                module, _, qualname = str(arg).partition(" ")
                found.append(f"{module}.{qualname}")
            elif name == "STACK_GLOBAL":
                module, qualname = strings[-2:] if len(strings) >= 2 else (None, None)
                found.append(f"{module}.{qualname}" if module and qualname else "<unknown>")
                strings = strings[:-2]
                strings.append(None)
            elif name in _STRING_OPS:
                strings.append(arg)
            elif name in _MEMO_PUTS:
                memo[arg] = strings[-1] if strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in _MEMO_GETS:
                strings.append(memo.get(arg))
            else:
                strings.append(None)
            del strings[:-16]
    except Exception:  # a damaged stream still yields the imports read so far
        found.append("<unreadable pickle>")
    return sorted(set(found))


class _Stub:
    """Stands in for every class and function a pickle names, accepting whatever the
    stream does with it, so that nothing but our own code runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


class _Recorder(pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.found: set[str] = set()

    def find_class(self, module: str, name: str) -> type:
        self.found.add(f"{module}.{name}")
        return _Stub

    def persistent_load(self, pid: Any) -> Any:  # a tensor storage taken out of the stream
        return _Stub()


def own_pickle_imports(stream: bytes, buffers: list[Any]) -> list[str]:
    """``pickle_imports`` for a stream we just wrote from a live object, at C speed.

    The stream is replayed with every class and function replaced by a stub, so only
    our own code runs; on 20 MB of forest that takes a few milliseconds where reading
    the opcodes in Python takes 40. Anything unusual falls back to reading the opcodes.
    """
    recorder = _Recorder(io.BytesIO(stream), buffers=buffers)
    try:
        recorder.load()
    except Exception:
        return pickle_imports(stream)
    return sorted(recorder.found)
