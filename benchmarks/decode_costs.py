"""Where a load's CPU goes, per 1 MiB chunk of fp32 weights: the costs behind issue #11's
read-path notes. Run alone: ``python -m benchmarks.decode_costs`` (medians of 200 calls)."""

from __future__ import annotations

import statistics
import struct
import time

import blake3
import numpy as np
import zstandard

from modelvault import _chunks


def per_call(function, calls: int = 200) -> float:
    """Median microseconds of ``function()``."""
    function()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal(262144) * 0.02).astype(np.float32).tobytes()
    codec, itemsize, stored = _chunks.encode(memoryview(raw), 4, _chunks.ARRAY_LEVEL)
    out = memoryview(bytearray(len(raw)))
    lengths = struct.unpack_from("<4I", stored)
    frames, offset = [], 16
    for length in lengths:
        if not length & _chunks.RAW_PLANE:
            frames.append(memoryview(stored)[offset:offset + length])
        offset += length & ~_chunks.RAW_PLANE
    planes = [np.frombuffer(raw[i::4], np.uint8).copy() for i in range(4)]
    items = np.frombuffer(out, np.uint8).reshape(-1, 4)
    decompressor = zstandard.ZstdDecompressor()
    print(f"1 MiB of fp32 weights: {codec}, {len(frames)} zstd plane(s), "
          f"{len(raw) / len(stored):.3f}x")
    for label, function in [
        ("decode_into (zstd planes + unshuffle)", lambda: _chunks.decode_into(
            out, codec, itemsize, stored)),
        ("  zstd of the compressed planes", lambda: [decompressor.decompress(f)
                                                     for f in frames]),
        ("  np.stack unshuffle", lambda: np.stack(planes, axis=1, out=items)),
        ("blake3 of the chunk", lambda: blake3.blake3(out).hexdigest()),
        ("memcpy of the chunk", lambda: out.__setitem__(slice(None), raw)),
    ]:
        print(f"{per_call(function):8.0f} us  {label}")


if __name__ == "__main__":
    main()
