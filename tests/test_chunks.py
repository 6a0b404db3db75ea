"""Chunk codecs: the byte (un)shuffle, compiled and in numpy, and what the encoder writes.

Every codec test runs twice, once with each implementation (the ``shuffler`` fixture), so
the numpy path stays tested where the extension is built.
"""

from __future__ import annotations

import struct
import sys
import sysconfig

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_format import decode_chunk  # the reader written from docs/format.md

import modelvault
from modelvault import IntegrityError, _chunks

try:
    from modelvault import _shuffle as compiled
except ImportError:
    compiled = None

IMPLEMENTATIONS = {"compiled": compiled, "numpy": _chunks.NumpyShuffle}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def shuffler(request, monkeypatch):
    """The byte (un)shuffle the codec uses for this test: each in turn."""
    implementation = IMPLEMENTATIONS[request.param]
    if implementation is None:
        pytest.skip("modelvault._shuffle is not built (no C compiler at install)")
    monkeypatch.setattr(_chunks, "shuffler", implementation)
    return implementation


def _c_compiler_problem() -> str | None:
    """Why no C extension can be built here, or None if a compiler builds against Python.h.
    Writes in the current folder."""
    from setuptools._distutils import ccompiler
    from setuptools._distutils import sysconfig as build_config

    with open("probe.c", "w") as source:
        source.write("#include <Python.h>\nint probe(void) { return 0; }\n")
    try:
        compiler = ccompiler.new_compiler()
        build_config.customize_compiler(compiler)
        compiler.compile(["probe.c"], include_dirs=[sysconfig.get_paths()["include"]])
    except Exception as exc:  # no compiler at all, or one that fails: what the build meets
        return f"no C compiler builds against Python.h here: {exc}"
    return None


def test_the_extension_is_built_where_a_c_compiler_works(tmp_path, monkeypatch):
    # The build is optional, so a broken one would pass unseen and leave every load slow.
    monkeypatch.chdir(tmp_path)
    problem = _c_compiler_problem()
    if problem:
        pytest.skip(problem)
    assert compiled is not None, ("modelvault._shuffle is missing although a C compiler "
                                  "works: see the output of `pip install -e .`")
    monkeypatch.setattr(_chunks, "shuffler", None)
    assert _chunks._shuffler() is compiled


def test_the_numpy_path_is_used_where_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(_chunks, "shuffler", None)
    monkeypatch.setitem(sys.modules, "modelvault._shuffle", None)  # import fails
    monkeypatch.delattr(modelvault, "_shuffle", raising=False)
    assert _chunks._shuffler() is _chunks.NumpyShuffle
    raw = np.arange(1000, dtype=np.float32).tobytes()
    codec, itemsize, stored = _chunks.encode(memoryview(raw), 4, _chunks.ARRAY_LEVEL)
    out = bytearray(len(raw))
    _chunks.decode_into(memoryview(out), codec, itemsize, stored)
    assert codec == "zstd-shuffle" and out == raw


# Item counts around the 16 items the SIMD code moves at a time, and a 1 MiB chunk's.
@pytest.mark.parametrize("items", [4, 15, 16, 17, 33, 4096 + 7, 262144])
@pytest.mark.parametrize("itemsize", [2, 3, 4, 8, 16])
def test_planes_are_as_the_format_defines(shuffler, itemsize, items):
    raw = np.random.default_rng(items).integers(0, 256, items * itemsize, np.uint8)
    planes = np.empty(len(raw), np.uint8)
    shuffler.shuffle(memoryview(raw), planes, itemsize)
    # docs/format.md: plane[j][i] = bytes[i*k + j]
    assert np.array_equal(planes.reshape(itemsize, items), raw.reshape(items, itemsize).T)
    out = bytearray(len(raw))
    shuffler.unshuffle(list(np.split(planes, itemsize)), memoryview(out))
    assert out == raw.tobytes()


@settings(max_examples=200, deadline=None)
@given(itemsize=st.integers(1, 20), data=st.binary(max_size=4000))
def test_compiled_and_numpy_give_the_same_bytes(itemsize, data):
    if compiled is None:
        pytest.skip("modelvault._shuffle is not built")
    data = data[:len(data) - len(data) % itemsize]
    by_c, by_numpy = bytearray(len(data)), bytearray(len(data))
    compiled.shuffle(data, by_c, itemsize)
    _chunks.NumpyShuffle.shuffle(data, by_numpy, itemsize)
    assert by_c == by_numpy
    n = len(data) // itemsize
    planes = [bytes(by_c[j * n:(j + 1) * n]) for j in range(itemsize)]
    by_c, by_numpy = bytearray(len(data)), bytearray(len(data))
    compiled.unshuffle(planes, by_c)
    _chunks.NumpyShuffle.unshuffle(planes, by_numpy)
    assert by_c == by_numpy == data


@pytest.mark.parametrize("call, error", [
    (lambda c: c.unshuffle([], bytearray(0)), ValueError),
    (lambda c: c.unshuffle([b"ab", b"a"], bytearray(3)), ValueError),
    (lambda c: c.unshuffle([b"ab", b"ab"], bytearray(3)), ValueError),
    (lambda c: c.unshuffle([b"ab", b"ab"], bytearray(5)), ValueError),
    (lambda c: c.unshuffle([b"ab", b"ab"], b"abcd"), TypeError),  # not writable
    (lambda c: c.unshuffle([b"ab", 7], bytearray(4)), TypeError),
    (lambda c: c.unshuffle(7, bytearray(4)), TypeError),
    (lambda c: c.unshuffle([memoryview(b"abcd")[::2]], bytearray(2)), TypeError),
    (lambda c: c.unshuffle([b"ab"]), TypeError),
    (lambda c: c.shuffle(b"abc", bytearray(3), 2), ValueError),
    (lambda c: c.shuffle(b"abcd", bytearray(3), 2), ValueError),
    (lambda c: c.shuffle(b"abcd", bytearray(4), 0), ValueError),
    (lambda c: c.shuffle(b"abcd", bytearray(4), -2), ValueError),
    (lambda c: c.shuffle(b"abcd", bytearray(4), 2**70), ValueError),
    (lambda c: c.shuffle(b"abcd", b"abcd", 2), TypeError),
    (lambda c: c.shuffle(b"abcd", bytearray(4), "2"), TypeError),
    (lambda c: c.shuffle(np.zeros((4, 4), np.uint8)[:, :2], bytearray(8), 2), TypeError),
])
def test_the_extension_refuses_bad_arguments(call, error):
    if compiled is None:
        pytest.skip("modelvault._shuffle is not built")
    with pytest.raises(error):
        call(compiled)


def _weights(count: int, dtype: str) -> bytes:
    """Normal weights of the size real layers have, as fp32 or bf16 (fp32's top 16 bits)."""
    values = (np.random.default_rng(count).standard_normal(count) * 0.02).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes() if dtype == "bf16" \
        else values.tobytes()


@pytest.mark.parametrize("raw, itemsize", [
    (_weights(262144, "fp32"), 4),
    (_weights(524288, "bf16"), 2),
    (_weights(1001, "fp32"), 4),
    (np.arange(131072, dtype=np.int64).tobytes(), 8),
    (bytes(3 * 5000), 3),
    (np.random.default_rng(0).bytes(4096), 4),  # does not shrink: stored raw
    (b"abcabcabcabc" * 100, 1),
])
def test_encoded_chunks_decode_here_and_in_the_doc_reader(shuffler, raw, itemsize):
    codec, stored_itemsize, stored = _chunks.encode(memoryview(raw), itemsize,
                                                    _chunks.ARRAY_LEVEL)
    out = bytearray(len(raw))
    _chunks.decode_into(memoryview(out), codec, stored_itemsize, stored)
    assert out == raw
    # The reader of docs/format.md, with a stock zstd decompressor: the format is unchanged.
    assert decode_chunk(codec, stored_itemsize, len(raw), stored) == raw
    assert _chunks.encode(memoryview(raw), itemsize, _chunks.ARRAY_LEVEL) == \
        (codec, stored_itemsize, stored)


def test_both_paths_write_the_same_bytes(monkeypatch):
    if compiled is None:
        pytest.skip("modelvault._shuffle is not built")
    raw = memoryview(_weights(262144, "fp32"))
    monkeypatch.setattr(_chunks, "shuffler", compiled)
    by_c = _chunks.encode(raw, 4, _chunks.ARRAY_LEVEL)
    monkeypatch.setattr(_chunks, "shuffler", _chunks.NumpyShuffle)
    assert _chunks.encode(raw, 4, _chunks.ARRAY_LEVEL) == by_c


def test_exponent_planes_of_weights_are_compressed_and_mantissa_planes_kept():
    codec, itemsize, stored = _chunks.encode(memoryview(_weights(262144, "fp32")), 4,
                                             _chunks.ARRAY_LEVEL)
    lengths = struct.unpack_from("<4I", stored)
    assert codec == "zstd-shuffle" and itemsize == 4
    # little-endian fp32: planes 0-1 low mantissa (kept), 3 sign and exponent (compressed)
    assert lengths[0] == lengths[1] == 262144 | _chunks.RAW_PLANE
    assert lengths[3] < 262144 // 2


_FP32 = _weights(4096, "fp32")
_STORED = _chunks.encode(memoryview(_FP32), 4, _chunks.ARRAY_LEVEL)[2]
_RAW = _chunks.RAW_PLANE
_LAST = struct.unpack_from("<4I", _STORED)[3]  # planes 0-2 are kept raw, 3 is a frame
_OTHER_SIZE = _chunks._compressor(_chunks.ARRAY_LEVEL).compress(bytes(4095))


@pytest.mark.parametrize("itemsize, stored", [
    (4, _STORED[:-1]),                                               # truncated
    (4, _STORED + b"\0"),                                            # a byte too many
    (4, _STORED[:8]),                                                # header cut short
    (3, _STORED),                                                    # size not a multiple
    (1, _STORED),                                                    # itemsize below 2
    (4, struct.pack("<4I", 4095 | _RAW, 4097 | _RAW, 4096 | _RAW, _LAST)
     + _STORED[16:]),                                                # raw planes of wrong sizes
    (4, struct.pack("<4I", 4096 | _RAW, 4096 | _RAW, 4096 | _RAW, _LAST - 1)
     + _STORED[16:-1]),                                              # frame cut short
    (4, struct.pack("<4I", 4096 | _RAW, 4096 | _RAW, 4096 | _RAW, len(_OTHER_SIZE))
     + _STORED[16:16 + 3 * 4096] + _OTHER_SIZE),                     # frame of 4095 bytes
])
def test_damaged_shuffled_chunks_raise_integrity_error(shuffler, itemsize, stored):
    out = memoryview(bytearray(len(_FP32)))
    with pytest.raises(IntegrityError):
        _chunks.decode_into(out, "zstd-shuffle", itemsize, stored)


def test_a_vault_saved_with_one_path_loads_with_the_other(tmp_path, monkeypatch):
    if compiled is None:
        pytest.skip("modelvault._shuffle is not built")
    rng = np.random.default_rng(1)
    model = {"w": rng.standard_normal((700, 500)).astype(np.float32),
             "h": rng.standard_normal(300001).astype(np.float16),
             "i": np.arange(200000, dtype=np.int64)}
    tuned = {**model, "w": model["w"] + np.float32(1e-3)}  # stored as deltas of "w"
    for writer, reader in [(compiled, _chunks.NumpyShuffle), (_chunks.NumpyShuffle, compiled)]:
        path = tmp_path / f"{writer.__name__}.vault"
        monkeypatch.setattr(_chunks, "shuffler", writer)
        with modelvault.open(path) as vault:
            vault.save("m", model)
            vault.save("m", tuned)
        monkeypatch.setattr(_chunks, "shuffler", reader)
        with modelvault.open(path) as vault:
            for version, expected in [(1, model), (2, tuned)]:
                loaded = vault.load(f"m:{version}")
                assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
