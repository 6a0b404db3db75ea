"""Files versions: a folder's files as parts, the names every system can hold, and the
tensors inside safetensors files (found when saved, read back one by one).

A vault travels between systems and is read by strangers: a name is checked on the way in
(``files_parts``) and again on the way out (``safe_relative_paths``), since the file may
not be one we wrote.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from . import _json, _torch
from ._serialize import ML_DTYPES, FileTensor, Part, array_from_part, array_part, import_torch, np

# Bytes per element of safetensors' dtypes; a dtype not listed is cut as bytes.
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
                         "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                         "BOOL": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "C64": 8}
# safetensors refuses headers above 100 MB; so do we (a damaged length must not make us
# read gigabytes).
_SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_tensors(path: Path, size: int) -> tuple[int, list[FileTensor]] | None:
    """(header bytes, tensors in file order) of the safetensors file at ``path``, or
    None unless it is one: a header that parses, tensors that cover the data exactly.
    A file that is not one is stored as any other file, never refused."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8).ljust(8, b"\xff"), "little")
            if length > min(_SAFETENSORS_MAX_HEADER, size - 8):
                return None
            header = _json.loads(f.read(length))  # a user's file, bounded as ours
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            return None
        if not (isinstance(dtype, str) and isinstance(shape, list)
                and all(type(n) is int and n >= 0 for n in [*shape, begin, end])
                and begin <= end):
            return None
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype, 1)
        if (end - begin) % itemsize:
            itemsize = 1
        tensors.append(FileTensor(name, dtype, shape, 8 + length + begin, end - begin,
                                  itemsize))
    tensors.sort(key=lambda t: t.start)
    offset = 8 + length
    for tensor in tensors:
        if tensor.start != offset:
            return None  # a gap or an overlap: not the format's layout
        offset += tensor.size
    if offset != size:
        return None
    return 8 + length, tensors


# safetensors' dtype names for what modelvault stores (numpy descr or named dtype).
_SAFETENSORS_NAMES = {"<f8": "F64", "<f4": "F32", "<f2": "F16", "bfloat16": "BF16",
                      "<i8": "I64", "<i4": "I32", "<i2": "I16", "|i1": "I8", "<u8": "U64",
                      "<u4": "U32", "<u2": "U16", "|u1": "U8", "|b1": "BOOL",
                      "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
                      "float8_e8m0fnu": "F8_E8M0"}


def file_tensor(buffer: np.ndarray, dtype: str, shape: list[int], device: Any) -> Any:
    """A tensor of a safetensors file from its bytes: a numpy array where numpy (or
    ml_dtypes) has its dtype, else a torch tensor."""
    names = {v: k for k, v in _SAFETENSORS_NAMES.items()}
    name = names.get(dtype)
    if name is None:
        raise ValueError(f"safetensors dtype {dtype} cannot be read back yet")
    if name in ML_DTYPES and "ml_dtypes" not in sys.modules:
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            import_torch()
            return _torch.tensor(_torch.from_buffer(buffer, device), name, shape)
    return array_from_part(buffer, name, shape, False)


def write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """Write numpy arrays and torch tensors as a safetensors file (its format: an 8-byte
    header length, the JSON header, then the tensors' bytes in order). ValueError for a
    dtype safetensors has no name for."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, value in tensors.items():
        if _torch.is_tensor(value):
            dtype, data = _torch.dtype_name(value.dtype), _torch.contiguous_bytes(value)
        else:
            array = np.ascontiguousarray(value)
            if array.dtype.byteorder == ">":  # safetensors is little-endian
                array = array.astype(array.dtype.newbyteorder("<"))
            part = array_part(array)
            dtype, data = str(part.dtype), part.data
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: safetensors has no dtype for {dtype}; use npz")
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.writelines(blobs)


def files_parts(paths: Sequence[str | os.PathLike[str]]) -> list[Part]:
    """Parts for files and folders, named by path relative to what was given.

    A single folder contributes its files relative to itself (``config.json``);
    otherwise a file is named by its base name and a folder's files get the folder's
    name in front (``tokenizer/vocab.txt``). Files are read only while they are
    stored, one at a time, so a folder larger than memory can be saved.
    """
    roots = [Path(p) for p in paths]
    if not roots:
        raise ValueError("no files given")
    files: dict[str, Path] = {}
    for root in roots:
        if root.is_file():
            found = [(root.name, root)]
        elif root.is_dir():
            prefix = "" if len(roots) == 1 else f"{root.resolve().name}/"
            found = [(prefix + p.relative_to(root).as_posix(), p)
                     for p in sorted(root.rglob("*")) if p.is_file()]
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
        for name, file in found:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{file}: file name is not valid UTF-8") from exc
            safe_relative_path(name)  # what extract would refuse is refused now
            if name in files:
                raise ValueError(f"two files would be stored as {name!r}")
            files[name] = file
    safe_relative_paths(files)  # names that would overwrite each other on some system
    parts = []
    for name in sorted(files):
        found = files[name].stat()
        part = Part(kind="file", path=files[name], name=name, size=found.st_size,
                    mode=stat.S_IMODE(found.st_mode) & 0o777)
        if name.lower().endswith(".safetensors"):
            cut = safetensors_tensors(part.path, part.size)  # type: ignore[arg-type]
            if cut is not None:
                part.header, part.tensors = cut
        parts.append(part)
    return parts


# A vault travels between systems, so a file name unsafe on any of them is refused on
# all of them: drive names and streams (":"), separators Windows also splits on ("\\"),
# characters Windows cannot store, device names (NUL.txt is the null device there) and
# trailing dots or spaces (Windows drops them, so "a." would overwrite "a").
_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"\\|?*]')
_DEVICES = re.compile(r"(?i)(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\..*)?")
MAX_NAME_PART = 255  # bytes of one path component: the limit of ext4, APFS and NTFS
MAX_NAME = 4096  # bytes of a whole name (Linux's PATH_MAX)
MAX_NAME_DEPTH = 64  # folders a name may nest


def safe_relative_path(name: str) -> PurePosixPath:
    """``name`` as a relative path that cannot escape the folder it is extracted to, on
    any system; ValueError otherwise."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "replace")) > MAX_NAME:
        raise ValueError(f"unsafe file name in vault: {str(name)[:100]!r}")
    path = PurePosixPath(name)
    for part in name.split("/"):
        if (part in ("", ".", "..") or _NAME_CHARS.search(part) or part[-1] in ". "
                or any(unicodedata.category(c) == "Cf" for c in part)  # HFS+ ignores some
                or _DEVICES.fullmatch(part) or len(part.encode("utf-8")) > MAX_NAME_PART):
            raise ValueError(f"unsafe file name in vault: {name[:100]!r} ({part[:40]!r} is "
                             "not a file name every system can hold)")
    if len(path.parts) > MAX_NAME_DEPTH:
        raise ValueError(f"unsafe file name in vault: {name[:100]!r} (over {MAX_NAME_DEPTH} "
                         "folders deep)")
    return path


def _folded(name: str) -> str:
    """``name`` as macOS and Windows compare names: case folded, and (APFS, HFS+) the
    same in any Unicode normalization form."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def safe_relative_paths(names: Iterable[str]) -> list[PurePosixPath]:
    """Each of ``names`` as ``safe_relative_path`` does, and none the same file or folder
    as another where case is folded (macOS, Windows), nor a file where another needs a
    folder ("a" and "a/b"), also where Unicode normalization does not count (macOS):
    otherwise extracting one would overwrite or block another."""
    paths = [safe_relative_path(name) for name in names]
    files = {_folded(str(p)) for p in paths}
    if len(files) < len(paths):
        raise ValueError("two file names in vault are the same where case and Unicode "
                         "normalization do not count")
    for path in paths:
        for folder in list(path.parents)[:-1]:
            if _folded(str(folder)) in files:
                raise ValueError(f"file name in vault {str(path)[:100]!r} needs a folder "
                                 f"where another file is: {str(folder)[:100]!r}")
    return paths
