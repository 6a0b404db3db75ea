"""Cutting byte streams into chunks, naming them by hash, and encoding them for storage.

A chunk's identity is the BLAKE3-256 hash of its raw bytes, so equal bytes are
stored once per vault whatever model or version they came from. BLAKE3 is
cryptographic (a collision would silently swap model bytes, so a checksum like
xxhash will not do) and hashes 2-4x faster than SHA-256 on our machines.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

from ._errors import IntegrityError
from ._lazy import lazy

blake3 = lazy("blake3")
np = lazy("numpy")
zstandard = lazy("zstandard")

# Arrays are cut into fixed 1 MiB pieces from their own start: an unchanged
# array yields the same chunks wherever it sits in the model, and pieces this big
# keep per-chunk overheads (hashing calls, zstd frames, rows) out of the way of
# 1 GB/s loads. A few changed rows still cost little: a changed piece is stored as
# its XOR with the parent version's piece (see ``xor_into``), mostly zeros.
ARRAY_CHUNK = 1024 * 1024
# Opaque streams (pickles, files) are cut by content so that an insertion only
# disturbs the chunks around it: FastCDC with avg_size 64 KiB (like Hugging Face's
# Xet), which with the 16 KiB minimum gives chunks of about 80 KiB on average.
_CDC = {"avg_size": 64 * 1024, "min_size": 16 * 1024, "max_size": 256 * 1024}

# No writer makes a chunk above 1 MiB (arrays; FastCDC stops at 256 KiB); readers refuse
# more, so a damaged size field cannot make them allocate gigabytes.
MAX_CHUNK = ARRAY_CHUNK
# New chunks are written into packs: rows of about this many stored bytes. A row's last
# page is half empty on average: one row per ~20 KiB chunk costs ~25 % of the file in
# 64 KiB pages. In 16 KiB pages, 2 MiB rows lifted a MiniLM-sized bf16 vault's ratio from
# 1.466 to 1.470 (1 MiB rows: 1.466; 4 MiB: 1.470), its codec giving 1.491.
PACK_SIZE = 2 * 1024 * 1024
# Chunks of pickle streams and files go into solid packs: up to this many raw bytes
# compressed as one zstd frame. Compressed one by one, ~80 KiB chunks start every
# time from an empty window: a forest's pickle shrank 4.4x that way, 5.1x in 4 MiB packs.
SOLID_PACK = 4 * 1024 * 1024
# Readers refuse packs whose content declares more (a damaged size must not make them
# allocate gigabytes); writers stay below it.
MAX_PACK = 2 * SOLID_PACK

# zstd 1 on shuffled numeric data is within 1 % of level 3 at 1.5x the speed;
# pickle streams of tree models gain 13 % from level 3 (7.0x -> 7.9x on a forest).
# Byte planes of floats hold no long repeats: matches only displace cheaper
# Huffman-coded literals. A 64-entry hash table (hash_log 6, the least zstd takes)
# all but turns the match finder off, so planes are Huffman coded. all-MiniLM-L6-v2
# in 1 MiB chunks, codec ratio fp32 [bf16], us per MiB to encode / to decompress the
# planes (medians of 7 interleaved rounds, on a shared machine; docs/design.md has more):
#   level 1, min_match 7 (hash_log 14)   1.2074 [1.4617]  1210 / 227  [1860 / 412]
#   + hash_log 6                         1.2171 [1.4911]   689 / 164  [ 863 / 284]
#   + hash_log 8                         1.2168 [1.4901]   757 / 162  [ 989 / 291]
#   + hash_log 6, min_match 5            1.2143 [1.4826]  1137 / 218  [1461 / 377]
#   dfast or greedy, hash and chain_log 6  1.2170 [1.4907], 1.2168 [1.4900]: slower
# Frames made this way are ordinary zstd frames: every reader decodes them unchanged.
ARRAY_LEVEL = 1
STREAM_LEVEL = 3
# Solid packs (up to 4 MiB of pickle or file bytes) get a window that spans the whole
# pack and long-distance matching: a forest's trees repeat structure megabytes apart.
# Long matches from 32 bytes (half of one of scikit-learn's 64-byte tree nodes) found
# the most: the forest's packs come out 3.9 % smaller than without (3.79 -> 3.64 MB;
# the default 64-byte minimum gave 3.69), for ~1.5x the compression time (61 -> 94 ms
# of CPU for its 19 MB; ~15 ms more on its save, on 2 cores).
_PARAMS = {ARRAY_LEVEL: {"hash_log": 6, "min_match": 7},
           STREAM_LEVEL: {"window_log": 22, "enable_ldm": True, "ldm_min_match": 32}}

# In a zstd-shuffle header, a plane length with this bit set is a plane stored as is.
RAW_PLANE = 1 << 31

_local = threading.local()


class NumpyShuffle:
    """``modelvault._shuffle``'s two functions in numpy: the byte (un)shuffle of installs
    that could not build it (no C compiler): 2.5-4x slower, and holding the GIL."""

    @staticmethod
    def shuffle(src: memoryview | bytes, out: memoryview | np.ndarray, itemsize: int) -> None:
        """Plane ``j`` of ``out`` gets byte ``j`` of each ``itemsize``-byte item of ``src``."""
        items = np.frombuffer(src, np.uint8).reshape(-1, itemsize)
        np.copyto(np.frombuffer(out, np.uint8).reshape(itemsize, -1), items.T)

    @staticmethod
    def unshuffle(planes: list[memoryview | bytes], out: memoryview) -> None:
        """Byte ``j`` of item ``i`` of ``out`` gets ``planes[j][i]``."""
        # One stack into the output: 3x faster than a strided column copy per plane.
        # (Building 2- and 4-byte items with integer shifts is 1.5-3x faster on one
        # thread, but moves 6x the bytes: slower with both cores decoding.)
        arrays = [np.frombuffer(plane, np.uint8) for plane in planes]
        np.stack(arrays, axis=1, out=np.frombuffer(out, np.uint8).reshape(-1, len(arrays)))


# The byte (un)shuffle in use: modelvault._shuffle (compiled, GIL released, 2.5-4x numpy's
# speed) or NumpyShuffle where it was not built. Chosen on first use, so that importing
# modelvault does not load it; tests set it to run both.
shuffler: Any = None


def _shuffler() -> Any:
    global shuffler
    if shuffler is None:
        try:
            from . import _shuffle as shuffler
        except ImportError:
            shuffler = NumpyShuffle
    return shuffler


def chunk_hash(data: memoryview | bytes) -> str:
    """Hex BLAKE3-256 of ``data``: the chunk's name."""
    return blake3.blake3(data).hexdigest()


def fixed_cuts(size: int, itemsize: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of an array's bytes, each a whole number of items."""
    step = ARRAY_CHUNK - ARRAY_CHUNK % itemsize if 0 < itemsize <= ARRAY_CHUNK else ARRAY_CHUNK
    return [(offset, min(step, size - offset)) for offset in range(0, size, step)]


def content_cuts(data: memoryview) -> list[tuple[int, int]]:
    """(offset, length) pieces of an opaque stream, cut where its content says."""
    if len(data) == 0:
        return []
    from pyfastcdc import FastCDC

    # A FastCDC object is not safe to share between threads; making one is cheap.
    return [(c.offset, c.length) for c in FastCDC(**_CDC).cut_buf(data)]


def content_pieces(stream: BinaryIO) -> Iterator[bytes]:
    """The pieces ``content_cuts`` would give for a file, read from it one at a time."""
    from pyfastcdc import FastCDC

    for chunk in FastCDC(**_CDC).cut_stream(stream):
        yield bytes(chunk.data)  # the chunker reuses its buffer: copy before the next cut


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe: one per thread and level.
    key = f"c{level}"
    comp = getattr(_local, key, None)
    if comp is None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, write_content_size=True, **_PARAMS.get(level, {}))
        comp = zstandard.ZstdCompressor(compression_params=params)
        setattr(_local, key, comp)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "d", None)
    if dec is None:
        dec = _local.d = zstandard.ZstdDecompressor()
    return dec


def encode(raw: memoryview, itemsize: int, level: int) -> tuple[str, int, bytes]:
    """Encode one chunk; returns (codec, itemsize, stored bytes).

    Numeric chunks (itemsize > 1) are byte-shuffled and each byte plane gets its
    own zstd frame: exponent bytes compress well, mantissa bytes barely, and one
    frame over both loses most of the gain (1.20x vs 1.10x on fp32 weights). The lengths
    lead the blob so a reader can slice them without parsing zstd. A chunk that
    does not shrink is stored raw so that reading it costs nothing.
    """
    if itemsize > 1 and len(raw) % itemsize == 0 and len(raw) >= 4 * itemsize:
        shuffled = np.empty(len(raw), np.uint8)
        _shuffler().shuffle(raw, shuffled, itemsize)
        plane_size = len(raw) // itemsize
        comp = _compressor(level)
        frames, lengths = [], []
        for offset in range(0, len(raw), plane_size):
            plane = shuffled.data[offset:offset + plane_size]
            frame = comp.compress(plane)
            if len(frame) < len(plane):
                frames.append(frame)
                lengths.append(len(frame))
            else:  # mantissa bytes: kept as they are, so loading them needs no zstd call
                frames.append(plane)
                lengths.append(len(plane) | RAW_PLANE)
        stored = b"".join([struct.pack(f"<{itemsize}I", *lengths), *frames])
        codec = "zstd-shuffle"
    else:
        stored = _compressor(level).compress(raw)
        codec, itemsize = "zstd", 1
    if len(stored) >= len(raw):
        return "raw", 1, bytes(raw)
    return codec, itemsize, stored


def solid(pieces: list[memoryview | bytes]) -> tuple[str, bytes]:
    """A solid pack of raw chunk bytes: (pack codec, data)."""
    content = b"".join(pieces)
    frame = _compressor(STREAM_LEVEL).compress(content)
    return ("zstd", frame) if len(frame) < len(content) else ("raw", content)


def pack_content(codec: object, size: object, data: object) -> bytes | str:
    """A pack's content (what chunks' start and length point into), or what is wrong."""
    if not isinstance(data, bytes) or type(size) is not int or not 0 <= size <= MAX_PACK:
        return f"is malformed (codec {codec!r}, size {size!r}, data {type(data).__name__})"
    try:
        if codec == "raw":
            if len(data) != size:
                raise ValueError(f"holds {len(data)} bytes, expected {size}")
            return data
        if codec == "zstd":
            return _decompress_frame(data, size)
        raise ValueError(f"has unknown codec {codec!r}")
    except (ValueError, zstandard.ZstdError) as exc:
        return f"cannot be decoded: {exc}"


def check_row(size: object, codec: object, itemsize: object, pack_id: object,
              start: object, length: object) -> None:
    """IntegrityError unless a chunk row's fields have the types and ranges writers use."""
    if not (type(size) is int and 0 <= size <= MAX_CHUNK and type(itemsize) is int
            and itemsize >= 1 and isinstance(codec, str) and type(pack_id) is int
            and type(start) is int and start >= 0 and type(length) is int
            and 0 <= length <= MAX_CHUNK + 4 * itemsize):
        raise IntegrityError(f"malformed chunk row (size {size!r}, codec {codec!r}, "
                             f"itemsize {itemsize!r}, pack {pack_id!r}, start {start!r}, "
                             f"length {length!r})")


def check_size(size: object) -> int:
    """``size`` if it is a chunk size a writer could have made, else 0 (never allocate more)."""
    return size if type(size) is int and 0 <= size <= MAX_CHUNK else 0


def decode_into(out: memoryview, codec: str, itemsize: int, stored: bytes) -> None:
    """Decode a stored chunk into ``out``, whose length is the chunk's declared raw size.

    Never produces more than ``len(out)`` bytes, so a damaged or hostile chunk
    that declares a huge size cannot exhaust memory.
    """
    size = len(out)
    try:
        if codec == "raw":
            if len(stored) != size:
                raise ValueError(f"raw chunk holds {len(stored)} bytes, expected {size}")
            out[:] = stored
        elif codec == "zstd":
            out[:] = _decompress_frame(stored, size)
        elif codec == "zstd-shuffle":
            if itemsize < 2 or size % itemsize:
                raise ValueError(f"bad item size {itemsize} for a {size}-byte chunk")
            plane_size = size // itemsize
            header = 4 * itemsize
            lengths = struct.unpack_from(f"<{itemsize}I", stored)
            if header + sum(n & ~RAW_PLANE for n in lengths) != len(stored):
                raise ValueError("byte-plane frame lengths do not add up to the chunk")
            view = memoryview(stored)
            offset = header
            planes = []
            for length in lengths:
                if length & RAW_PLANE:
                    length &= ~RAW_PLANE
                    if length != plane_size:
                        raise ValueError(f"raw byte plane of {length} bytes, expected "
                                         f"{plane_size}")
                    plane = view[offset:offset + length]
                else:
                    plane = _decompress_frame(view[offset:offset + length], plane_size)
                planes.append(plane)
                offset += length
            _shuffler().unshuffle(planes, out)
        else:
            raise ValueError(f"unknown codec {codec!r}")
    except (ValueError, struct.error, zstandard.ZstdError) as exc:
        raise IntegrityError(f"cannot decode chunk: {exc}") from exc


def _decompress_frame(frame: memoryview | bytes, size: int) -> bytes:
    """Decompress one zstd frame, which must declare and hold exactly ``size`` bytes."""
    declared = zstandard.frame_content_size(frame)
    if declared != size:
        raise ValueError(f"zstd frame declares {declared} bytes, expected {size}")
    result = _decompressor().decompress(frame)
    if len(result) != size:
        raise ValueError(f"zstd frame gave {len(result)} bytes, expected {size}")
    return result


def xor_into(out: memoryview, other: memoryview | np.ndarray) -> None:
    """``out ^= other``, bytewise: how a delta chunk and its base give the chunk's bytes.

    The XOR of a fine-tuned weight with its parent keeps sign and exponent bits at
    zero, so shuffled and compressed it takes about half of what the weight alone does.
    """
    target = np.frombuffer(out, np.uint8)
    source = np.frombuffer(other, np.uint8)
    if len(target) % 8 == 0:  # eight bytes at a time where the length allows
        target, source = target.view(np.uint64), source.view(np.uint64)
    np.bitwise_xor(target, source, out=target)
