"""What goes into a vault comes back out: arrays, files, pickles, names, records, gc, stats."""

from __future__ import annotations

import collections
import math
import os
import re
from datetime import timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import modelvault
from modelvault import NotFoundError, VaultError
from modelvault._chunks import ARRAY_CHUNK

CHUNK = ARRAY_CHUNK

# One vault is shared by every example of a hypothesis test: saving many versions into
# one file is itself part of what is tested.
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

NUMERIC = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
           "f2", "f4", "f8", "c8", "c16"]


def _with_orders(codes):
    out = []
    for code in codes:
        dt = np.dtype(code)
        if dt.itemsize == 1:
            out.append(dt)
        else:
            out.extend([dt.newbyteorder("<"), dt.newbyteorder(">")])
    return out


NUMERIC_DTYPES = _with_orders(NUMERIC)


def assert_same_array(loaded, original):
    assert type(loaded) is np.ndarray
    assert loaded.dtype == original.dtype
    assert loaded.dtype.str == original.dtype.str  # byte order too
    assert loaded.shape == original.shape
    np.testing.assert_array_equal(loaded, original)
    # Byte-exact: NaN payloads, -0.0 and padding bytes survive too.
    assert np.ascontiguousarray(loaded).tobytes() == np.ascontiguousarray(original).tobytes()
    assert loaded.flags.writeable


def sample(dtype, count, seed=0):
    """``count`` values of ``dtype`` covering its range, special floats included."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=count).astype(dtype)
    arr = raw.view(dtype).copy()
    if dtype.kind in "fc" and count >= 4:
        arr[:4] = np.array([np.nan, np.inf, -np.inf, -0.0]).astype(dtype)
    return arr


# -- numeric arrays -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_every_numeric_dtype_round_trips_across_several_chunks(vault, dtype):
    count = 3 * CHUNK // dtype.itemsize + 7  # several full chunks and a ragged tail
    arr = sample(dtype, count)
    mv = vault.save("arrays/big", arr)
    assert mv.kind == "arrays"
    assert mv.size == arr.nbytes
    assert_same_array(vault.load(mv.ref), arr)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_zero_d_and_empty_arrays(vault, dtype):
    for arr in (sample(dtype, 1).reshape(()), np.empty((0,), dtype=dtype),
                np.empty((3, 0), dtype=dtype), np.empty((0, 4, 0), dtype=dtype)):
        mv = vault.save("arrays/small", arr)
        loaded = vault.load(mv.ref)
        assert_same_array(loaded, arr)
        assert mv.size == arr.nbytes


@pytest.mark.parametrize("dtype", [np.dtype("<f8"), np.dtype(">i4"), np.dtype("u1"),
                                   np.dtype("<c8")], ids=str)
def test_non_contiguous_slices(vault, dtype):
    base = sample(dtype, 40 * 30, seed=1).reshape(40, 30)
    views = {"step": base[::3], "cols": base[:, ::4], "both": base[5:35:2, 1::3],
             "reversed": base[::-1, ::-2], "flat_step": base.reshape(-1)[::7]}
    for key, view in views.items():
        assert not view.flags.c_contiguous or key == "reversed"
        mv = vault.save(f"slices/{key}", view)
        assert mv.size == view.nbytes
        assert_same_array(vault.load(mv.ref), view)


@pytest.mark.parametrize("dtype", [np.dtype("<f4"), np.dtype(">f8"), np.dtype("i2")], ids=str)
def test_fortran_arrays_come_back_fortran_ordered(vault, dtype):
    big = np.asfortranarray(sample(dtype, 600 * 300, seed=2).reshape(600, 300))
    cube = np.asfortranarray(sample(dtype, 4 * 5 * 6, seed=3).reshape(4, 5, 6))
    for arr in (big, cube):
        assert arr.flags.f_contiguous and not arr.flags.c_contiguous
        loaded = vault.load(vault.save("fortran", arr).ref)
        assert_same_array(loaded, arr)
        assert loaded.flags.f_contiguous


@SETTINGS
@given(arr=hnp.arrays(dtype=st.sampled_from(NUMERIC_DTYPES),
                      shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)),
       layout=st.sampled_from(["c", "fortran", "step", "transpose"]))
def test_hypothesis_arrays_round_trip(vault, arr, layout):
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "step" and arr.ndim:
        arr = arr[::2]
    elif layout == "transpose":
        arr = arr.T
    assert_same_array(vault.load(vault.save("hyp/array", arr).ref), arr)


# -- other dtypes ---------------------------------------------------------------------

OTHER_DTYPES = [
    np.dtype("<M8[ns]"), np.dtype(">M8[D]"), np.dtype("<m8[s]"), np.dtype(">m8[us]"),
    np.dtype("S1"), np.dtype("S7"), np.dtype("<U1"), np.dtype("<U5"), np.dtype(">U5"),
    np.dtype("V7"),
    np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]),
    np.dtype([("x", [("y", ">i2"), ("z", "U2")]), ("w", "<f4", (2, 2))]),
    np.dtype([("a", "u1"), ("b", "<i8")], align=True),  # padding bytes between fields
    np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [0, 8],
              "itemsize": 16}),
    np.dtype([(("a title", "a"), "<i4"), ("b", "<f4")]),  # titled field
    np.dtype([("outer", [(("inner title", "i"), ">u2"), ("j", "S2")])]),
]


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_datetime_structured_and_string_dtypes(vault, dtype):
    for count in (0, 1, 5, CHUNK // max(dtype.itemsize, 1) * 2 + 3):
        arr = np.zeros(count, dtype=dtype)
        arr.view(np.uint8)[:] = np.random.default_rng(count).integers(0, 256, arr.nbytes)
        if dtype.kind in "MmU" or dtype.names:
            # Only valid values: code points, and datetimes in range (NaT included).
            arr = _valid(arr, dtype)
        mv = vault.save("other", arr)
        loaded = vault.load(mv.ref)
        assert loaded.dtype == dtype
        assert loaded.shape == arr.shape
        assert loaded.tobytes() == arr.tobytes()
        assert loaded.flags.writeable
        if not dtype.names:
            np.testing.assert_array_equal(loaded, arr)


def _valid(arr, dtype):
    if dtype.kind in "Mm":
        out = np.arange(arr.size, dtype=np.int64).astype(dtype)
        if arr.size:
            out[0] = np.array("NaT", dtype=dtype)
        return out
    if dtype.kind == "U":
        return np.array([chr(65 + i % 26) * (i % (dtype.itemsize // 4 + 1))
                         for i in range(arr.size)], dtype=dtype).reshape(arr.shape)
    out = np.zeros(arr.shape, dtype=dtype)
    out.view(np.uint8)[:] = arr.view(np.uint8) % 2  # bytes 0/1 are valid for U (as \0, \1)
    return out


def test_structured_dtype_with_overlapping_fields_is_refused_at_save(vault):
    dtype = np.dtype({"names": ["b", "a"], "formats": ["<i4", "<i4"], "offsets": [4, 0]})
    with pytest.raises(ValueError):
        vault.save("odd", np.zeros(3, dtype=dtype))
    # Refused before anything was stored.
    assert vault.models() == []
    assert vault.verify() == []


# -- object arrays ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    np.array([1, "a", None], dtype=object),
    {"w": np.ones(3), "labels": np.array(["a", "b"], dtype=object)},
    [np.zeros(2), (np.array([{}], dtype=object),)],
    np.zeros(3, dtype=[("a", "<i4"), ("o", "O")]),
], ids=["bare", "in-dict", "nested", "structured-with-object"])
def test_object_arrays_are_refused_with_a_clear_type_error(vault, value):
    with pytest.raises(TypeError) as info:
        vault.save("objects", value)
    message = str(info.value)
    assert "object" in message and "dtype" in message
    assert "convert" in message  # says what to do instead
    with pytest.raises(NotFoundError):
        vault.get("objects")


def test_object_array_refusal_does_not_depend_on_item_order(vault):
    """Beside something only pickle can store, an object array is simply pickled."""
    labels = np.array(["a", 1], dtype=object)
    for value in ({"labels": labels, "ids": {1, 2}}, {"ids": {1, 2}, "labels": labels},
                  [labels, {1}], [{1}, labels]):
        mv = vault.save("mixed", value)
        assert mv.kind == "pickle"
        loaded = vault.load(mv.ref)
        assert type(loaded) is type(value)


# -- opaque streams (files) --------------------------------------------------------------

BOUNDARY_SIZES = [0, 1, 16383, 16384, 16385, 65535, 65536, 65537,
                  262143, 262144, 262145, 1_000_003]


def _content(size, pattern, seed):
    rng = np.random.default_rng(seed)
    if pattern == "random":
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if pattern == "zeros":
        return bytes(size)
    # compressible but not trivial: a text-like stream
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"\x00\x01"]
    pieces = [words[i] for i in rng.integers(0, len(words), size // 4 + 1)]
    return b"".join(pieces)[:size]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
@pytest.mark.parametrize("pattern", ["random", "zeros", "text"])
def test_files_around_chunk_boundaries_round_trip(vault, tmp_path, size, pattern):
    data = _content(size, pattern, seed=size)
    src = tmp_path / "src" / "model.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    mv = vault.save_files("files/one", src)
    assert mv.kind == "files"
    assert mv.size == size
    out = tmp_path / "out"
    written = vault.extract(mv.ref, out)
    assert written == [out / "model.bin"]
    assert (out / "model.bin").read_bytes() == data
    assert vault.load(mv.ref) == {"model.bin": data}


@SETTINGS
@given(contents=st.dictionaries(
    st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?\.(bin|txt)", fullmatch=True),
    st.one_of(st.binary(max_size=3000),
              st.tuples(st.sampled_from(BOUNDARY_SIZES[:-1]),
                        st.sampled_from(["random", "zeros", "text"]),
                        st.integers(0, 2**16)).map(lambda t: _content(*t))),
    min_size=1, max_size=4))
def test_hypothesis_folders_of_files_round_trip(vault, tmp_path_factory, contents):
    # No file may also be a folder's name ("a.bin" and "a.bin/x.bin").
    names = sorted(contents)
    if any(other.startswith(name + "/") for name in names for other in names):
        return
    src = tmp_path_factory.mktemp("src")
    for name, data in contents.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    mv = vault.save_files("files/folder", src)
    assert mv.size == sum(len(d) for d in contents.values())
    assert vault.load(mv.ref) == contents
    out = tmp_path_factory.mktemp("out")
    vault.extract(mv.ref, out)
    for name, data in contents.items():
        assert (out / name).read_bytes() == data


def test_extract_of_a_python_object_is_refused(vault, tmp_path):
    mv = vault.save("obj", [1, 2])
    with pytest.raises(ValueError, match="load"):
        vault.extract(mv.ref, tmp_path / "out")


# -- pickled objects --------------------------------------------------------------------


class Holder:
    """A user class: saved through pickle, its big buffers out of band."""

    def __init__(self, weights, bias, name):
        self.weights = weights
        self.bias = bias
        self.name = name


class Registry(dict):
    """A dict subclass is not a plain dict: it must come back as itself."""


def test_large_buffers_in_custom_objects_round_trip_writable(vault):
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((512, 640)).astype(np.float32)  # 1.25 MiB: out of band
    big_f = np.asfortranarray(rng.standard_normal((400, 400)))  # 1.2 MiB, Fortran order
    small = np.arange(10.0)  # in band
    obj = Holder(weights, small, "layer")
    od = collections.OrderedDict([("z", big_f), ("a", weights), ("note", {"x"})])  # a set: pickled
    reg = Registry(first=weights, second=rng.integers(0, 9, 2**18, dtype=np.int64))

    for value in (obj, od, reg):
        mv = vault.save("pickled", value)
        assert mv.kind == "pickle"
        loaded = vault.load(mv.ref)
        assert type(loaded) is type(value)
        if isinstance(value, Holder):
            pairs = [(loaded.weights, weights), (loaded.bias, small)]
            assert loaded.name == "layer"
        else:
            assert list(loaded) == list(value)  # order too
            pairs = [(loaded[k], v) for k, v in value.items() if isinstance(v, np.ndarray)]
            assert loaded.get("note") == value.get("note")
        for got, want in pairs:
            assert_same_array(got, want)
            got[...] = 0  # writable for real, not just flagged
        if isinstance(value, collections.OrderedDict):
            assert loaded["z"].flags.f_contiguous
    # The large buffers were stored like arrays, next to the pickle stream.
    assert vault.get("pickled:1").size > weights.nbytes


def test_a_class_of_the_saving_script_loads_where_the_script_is_not(vault_path, tmp_path):
    # Pickled by reference, the instance would name __main__.Thing, which a process
    # running another script cannot find: it is pickled by value instead.
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        import modelvault

        class Thing:
            def __init__(self):
                self.weights = list(range(5))

            def answer(self):
                return sum(self.weights)

        modelvault.save(sys.argv[1], "thing", Thing())
    """))
    source = str(Path(modelvault.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, str(script), str(vault_path)], env=env, check=True)
    assert modelvault.load(vault_path, "thing", trust=True).answer() == 10


def test_a_bound_builtin_method_pickles_as_the_pickler_reduces_it(vault):
    # {}.get pickles as getattr(the dict, "get"): no module is looked for it. Looked for
    # all the same, every module in sys.modules is searched, and torch.classes raises
    # RuntimeError for any name asked of it (the save failed with it).
    pytest.importorskip("torch")
    table = {"a": 1}
    vault.save("m", {"get": table.get, "size": len})
    loaded = vault.load("m", trust=True)
    assert loaded["get"]("a") == 1 and loaded["size"]([1, 2]) == 2


def test_a_model_pickle_refuses_names_what_in_it_is_refused(vault, vault_path):
    import threading

    client = Holder(None, None, {"pool": [1, threading.Lock()]})
    model = Holder(np.ones(2_000_000), client, "net")  # a large buffer, left out of trials
    with pytest.raises(modelvault.UnpicklableError) as info:
        vault.save("net", model)
    assert isinstance(info.value, TypeError)
    assert info.value.path == ".bias.name['pool'][1]"
    message = str(info.value)
    assert "model 'net' (Holder)" in message and "is a _thread.lock" in message
    assert "__getstate__" in message and "state_dict()" in message  # what to do
    with pytest.raises(modelvault.UnpicklableError) as info:  # nothing in it to name
        vault.save("lock", threading.Lock())
    assert info.value.path is None and "cannot pickle" in str(info.value)
    assert vault.models() == []


def test_shared_buffer_identity_survives_pickling(vault):
    big = np.random.default_rng(0).standard_normal(300_000)
    loaded = vault.load(vault.save("shared", {"a": big, "b": big, "s": {1}}).ref)
    assert loaded["a"] is loaded["b"]


# -- nested native containers -------------------------------------------------------------

SMALL_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.dtype("f8"), np.dtype(">i4"), np.dtype("u1"), np.dtype("?"),
                           np.dtype("<U3")]),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80),
                    st.floats(allow_nan=False), st.text(max_size=10))
NESTED = st.recursive(
    st.one_of(SCALARS, SMALL_ARRAYS),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.lists(inner, max_size=4).map(tuple),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=15)


def assert_same_tree(loaded, original):
    assert type(loaded) is type(original), (loaded, original)
    if isinstance(original, np.ndarray):
        assert_same_array(loaded, original)
    elif isinstance(original, dict):
        assert list(loaded) == list(original)  # key order kept
        for key in original:
            assert_same_tree(loaded[key], original[key])
    elif isinstance(original, (list, tuple)):
        assert len(loaded) == len(original)
        for a, b in zip(loaded, original, strict=True):
            assert_same_tree(a, b)
    elif isinstance(original, float):
        assert loaded == original and math.copysign(1, loaded) == math.copysign(1, original)
    else:
        assert loaded == original


@SETTINGS
@given(value=NESTED)
def test_hypothesis_nested_containers_keep_exact_types(vault, value):
    mv = vault.save("nested", value)
    assert mv.kind == "arrays"
    assert_same_tree(vault.load(mv.ref), value)


def test_nested_containers_example(vault):
    value = {"layers": [np.ones((2, 3)), (np.arange(4), None)], "cfg": {"lr": 0.1, "n": 3,
             "on": True, "name": "adam", "empty": (), "nothing": None, "big": 2**70,
             "inf": float("inf")}}
    loaded = vault.load(vault.save("nested", value).ref)
    assert_same_tree(loaded, value)
    assert isinstance(loaded["layers"][1], tuple)


# -- scikit-learn ----------------------------------------------------------------------------


def _sklearn_models():
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": LogisticRegression(max_iter=500),
        "forest": RandomForestClassifier(n_estimators=20, random_state=0),
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
    }


@pytest.mark.parametrize("kind", ["logreg", "forest", "pipeline"])
def test_sklearn_models_predict_the_same_after_load(vault, kind):
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=300, n_features=12, n_informative=6,
                               n_classes=3, random_state=0)
    labels = np.array(["cat", "dog", "eel"])[y]  # string classes: object arrays inside
    model = _sklearn_models()[kind].fit(X, labels)
    mv = vault.save(f"sk/{kind}", model, metadata={"kind": kind})
    assert mv.kind == "pickle"
    loaded = vault.load(mv.ref)  # signed by this machine's own key: no trust=True needed
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


# -- names and references -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["churn", "team/churn", "a.b-c_d", "_x", "A1/b2/c3",
                                  "x" * 200])
def test_valid_names(vault, name):
    mv = vault.save(name, [1])
    assert mv.name == name
    assert vault.load(name) == [1]
    assert vault.load(f"{name}:1") == [1]


@pytest.mark.parametrize("name", ["", "a b", "a:b", "a@b", "/a", "a/", "a//b", "../x", "x/../y",
                                  ".hidden", "-a", "a\nb", "é", "x" * 300, "x" * 201])
def test_invalid_names_are_value_errors(vault, name):
    with pytest.raises(ValueError, match="invalid model name"):
        vault.save(name, [1])
    if ":" not in name and "@" not in name:  # 'a:b' and 'a@b' are references, not names
        with pytest.raises(ValueError):
            vault.load(name)
    with pytest.raises(ValueError):
        vault.versions(name)
    assert vault.models() == []


@pytest.mark.parametrize("ref", ["churn:0", "churn:x", "churn@", "churn:", "churn:-1",
                                 "churn:1.5", "churn@1", "churn@a b", "churn@a@b", ":1", "@a",
                                 "churn:" + "9" * 20, f"churn:{2**63}", "churn:\u00b2",
                                 "churn:\uff11"])
def test_invalid_references_are_value_errors(vault, ref):
    vault.save("churn", [1])
    with pytest.raises(ValueError):
        vault.load(ref)
    with pytest.raises(ValueError):
        vault.get(ref)


def test_non_string_reference_is_a_type_error(vault):
    with pytest.raises(TypeError):
        vault.get(3)


@pytest.mark.parametrize("alias", ["", "a b", "123", "a/b", "a:b", "-x"])
def test_invalid_aliases_are_value_errors(vault, alias):
    vault.save("churn", [1])
    with pytest.raises(ValueError, match="invalid alias"):
        vault.alias("churn:1", alias)
    with pytest.raises(ValueError):
        vault.save("churn", [2], aliases=[alias])
    assert [v.version for v in vault.versions("churn")] == [1]


# -- not found --------------------------------------------------------------------------


def test_not_found_errors_say_what_was_asked_and_what_exists(vault):
    vault.save("churn", [1])
    vault.save("churn", [2], aliases=["staging"])
    vault.save("fraud", [3])

    with pytest.raises(NotFoundError) as info:
        vault.load("chrun")
    message = str(info.value)
    assert "'chrun'" in message and "churn" in message and "fraud" in message

    with pytest.raises(NotFoundError) as info:
        vault.load("churn:7")
    message = str(info.value)
    assert "7" in message and "churn" in message and "1, 2" in message

    with pytest.raises(NotFoundError) as info:
        vault.get("churn@prod")
    message = str(info.value)
    assert "'prod'" in message and "staging" in message

    with pytest.raises(NotFoundError):
        vault.get(f"churn:{2**63 - 1}")  # the largest number a reference may hold

    for ref in ("chrun", "churn:7", "churn@prod"):
        with pytest.raises(KeyError):
            vault.get(ref)
        with pytest.raises(VaultError):
            vault.get(ref)
    # str() is the message itself, not KeyError's quoted repr.
    assert not str(info.value).startswith(("'", '"'))


def test_not_found_on_an_empty_vault(vault):
    with pytest.raises(NotFoundError, match="none"):
        vault.load("anything")
    with pytest.raises(NotFoundError):
        vault.versions("anything")
    with pytest.raises(NotFoundError):
        vault.delete("anything")
    with pytest.raises(NotFoundError):
        vault.unalias("anything", "prod")
    assert vault.models() == []


# -- records -----------------------------------------------------------------------------


def test_version_numbers_are_never_reused(vault):
    numbers = [vault.save("m", [i]).version for i in range(3)]
    assert numbers == [1, 2, 3]
    assert vault.delete("m:3") == 1
    assert vault.save("m", [9]).version == 4
    vault.delete("m:4")
    vault.delete("m:2")
    assert vault.save("m", [10]).version == 5
    assert [v.version for v in vault.versions("m")] == [1, 5]
    assert vault.load("m") == [10]
    with pytest.raises(NotFoundError):
        vault.get("m:3")


def test_model_version_fields(vault):
    w = np.arange(1000, dtype=np.float32)
    b = np.zeros((3, 4), dtype=np.int64)
    mv = vault.save("team/churn", {"w": w, "b": b, "note": "hi"},
                    metadata={"auc": np.float32(0.91), "n": np.int64(7), "lr": 0.1,
                              "layers": [1, 2], "arr": np.arange(3), "ok": True, "none": None},
                    tags={"stage": "dev", "epoch": 3, "frac": 0.5, "flag": True, "gone": None},
                    aliases=["candidate"], description="first try")
    assert mv.name == "team/churn" and mv.version == 1 and mv.ref == "team/churn:1"
    assert mv.kind == "arrays"
    assert mv.size == w.nbytes + b.nbytes
    assert mv.added_bytes > 0
    assert re.fullmatch(r"[0-9a-f]{64}", mv.digest)
    assert re.fullmatch(r"[0-9a-f-]{36}", mv.id)
    assert mv.description == "first try"
    assert mv.created_at.tzinfo is not None
    assert mv.created_at.utcoffset() == timedelta(0)
    assert mv.created_at.tzinfo == timezone.utc
    assert mv.metadata == {"auc": pytest.approx(0.91, rel=1e-6), "n": 7, "lr": 0.1,
                           "layers": [1, 2], "arr": [0, 1, 2], "ok": True, "none": None}
    assert type(mv.metadata["auc"]) is float and type(mv.metadata["n"]) is int
    assert mv.tags == {"stage": "dev", "epoch": "3", "frac": "0.5", "flag": "True"}
    assert mv.aliases == ("candidate",)
    assert isinstance(mv.environment, dict)

    # What get() reads back from the file equals what save() returned.
    assert vault.get("team/churn:1") == mv
    assert vault.get("team/churn@candidate") == mv
    assert vault.get(mv) == mv

    mv2 = vault.save("team/churn", {"w": w, "b": b, "note": "hi"})
    assert mv2.version == 2
    assert mv2.digest == mv.digest  # same content, same digest
    assert mv2.id != mv.id
    assert mv2.created_at >= mv.created_at
    assert mv2.metadata == {} and mv2.tags == {} and mv2.aliases == ()


@pytest.mark.parametrize("metadata,error", [
    ({"loss": float("nan")}, ValueError),
    ({"loss": float("inf")}, ValueError),
    ({"loss": np.float64("nan")}, ValueError),
    ({"when": object()}, TypeError),
    ({"s": {1, 2}}, TypeError),
    ({(1, 2): "tuple key"}, TypeError),
    ([("a", 1)], TypeError),
])
def test_bad_metadata_is_refused(vault, metadata, error):
    with pytest.raises(error):
        vault.save("m", [1], metadata=metadata)
    with pytest.raises(NotFoundError):
        vault.get("m")  # nothing was saved


def test_bad_tags_are_refused(vault):
    with pytest.raises(TypeError):
        vault.save("m", [1], tags={"k": [1, 2]})
    with pytest.raises(ValueError):
        vault.save("m", [1], tags={"": "v"})
    vault.save("m", [1])
    with pytest.raises(TypeError):
        vault.tag("m:1", k={"a": 1})
    assert vault.get("m:1").tags == {}


def test_aliases_tags_and_listings(vault):
    for i in range(3):
        vault.save("churn", [i])
    vault.save("fraud", [0])

    assert vault.alias("churn:1", "prod").aliases == ("prod",)
    assert vault.load("churn@prod") == [0]
    moved = vault.alias("churn:3", "prod")  # moves, never duplicates
    assert moved.version == 3 and moved.aliases == ("prod",)
    assert vault.get("churn:1").aliases == ()
    assert vault.get("churn@prod").version == 3
    assert vault.load("churn@prod") == [2]
    vault.alias("churn:3", "latest-good")
    assert vault.get("churn:3").aliases == ("latest-good", "prod")
    # Aliases belong to a model: the same alias on another model is independent.
    vault.alias("fraud:1", "prod")
    assert vault.get("churn@prod").version == 3
    assert vault.get("fraud@prod").version == 1

    vault.unalias("churn", "prod")
    with pytest.raises(NotFoundError):
        vault.get("churn@prod")
    with pytest.raises(NotFoundError):
        vault.unalias("churn", "prod")
    assert vault.get("fraud@prod").version == 1

    assert vault.tag("churn:2", stage="dev", score=0.5).tags == {"score": "0.5", "stage": "dev"}
    assert vault.tag("churn:2", {"stage": "prod"}).tags == {"score": "0.5", "stage": "prod"}
    assert vault.tag("churn:2", stage=None).tags == {"score": "0.5"}
    assert vault.tag("churn:2", missing=None).tags == {"score": "0.5"}

    assert [v.version for v in vault.versions("churn")] == [1, 2, 3]
    infos = {m.name: m for m in vault.models()}
    assert [m.name for m in vault.models()] == ["churn", "fraud"]
    assert (infos["churn"].versions, infos["churn"].latest) == (3, 3)
    assert (infos["fraud"].versions, infos["fraud"].latest) == (1, 1)
    assert infos["churn"].updated_at == vault.get("churn:3").created_at

    vault.delete("churn:3")  # its aliases go with it
    with pytest.raises(NotFoundError):
        vault.get("churn@latest-good")
    assert vault.get("churn").version == 2
    assert vault.models()[0].versions == 2 and vault.models()[0].latest == 2


def test_save_aliases_move_from_older_versions(vault):
    vault.save("m", [1], aliases=["prod"])
    vault.save("m", [2], aliases="prod")  # a single string is one alias
    assert vault.get("m:1").aliases == ()
    assert vault.get("m@prod").version == 2


# -- delete and gc -------------------------------------------------------------------------


def test_delete_then_gc_gives_space_back(vault_path):
    rng = np.random.default_rng(3)
    keep = rng.standard_normal(100_000)
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"keep": keep})
        added = [vault.save("m", {"keep": keep, "extra": rng.standard_normal(200_000)})
                 .added_bytes for _ in range(3)]
        vault.save("other", [keep[:10]])
    size_full = os.path.getsize(vault_path)

    with modelvault.open(vault_path) as vault:
        assert vault.delete("m:2") == 1
        assert vault.delete("m:3") == 1
        freed = vault.gc()
        # The two "extra" arrays only those versions used: their stored bytes go back.
        assert freed >= 0.95 * (added[1] + added[2])
        assert vault.gc() == 0  # nothing left to free
        assert vault.verify() == []
        np.testing.assert_array_equal(vault.load("m:1")["keep"], keep)
        np.testing.assert_array_equal(vault.load("m:4")["keep"], keep)
        assert vault.load("other")[0].tolist() == keep[:10].tolist()
    assert os.path.getsize(vault_path) <= size_full - freed
    assert os.listdir(vault_path.parent) == [vault_path.name]

    with modelvault.open(vault_path) as vault:
        assert vault.delete("m") == 2
        with pytest.raises(NotFoundError):
            vault.get("m")
        with pytest.raises(NotFoundError):
            vault.load("m:1")
        assert [m.name for m in vault.models()] == ["other"]
        assert vault.gc() > 0
        assert vault.verify() == []
        assert vault.stats().chunks >= 1
        # A deleted model's name starts again from version 1.
        assert vault.save("m", [1]).version == 1
    assert os.path.getsize(vault_path) < size_full / 4


def test_deleted_chunks_shared_with_kept_versions_stay(vault):
    shared = np.random.default_rng(1).standard_normal(50_000)
    vault.save("a", {"w": shared})
    vault.save("b", {"w": shared, "x": np.ones(10)})
    vault.delete("a")
    vault.gc()
    assert vault.verify() == []
    np.testing.assert_array_equal(vault.load("b")["w"], shared)


# -- stats -------------------------------------------------------------------------------------


def test_stats_are_consistent(vault):
    assert vault.stats().raw_bytes == 0 and vault.stats().versions == 0
    rng = np.random.default_rng(5)
    # Big enough that the empty vault's pages (one 64 KiB page per table) do not dominate.
    model = {"w": rng.standard_normal((1000, 1000)).astype(np.float32),
             "noise": rng.integers(0, 256, 200_000, dtype=np.uint8)}
    vault.save("m", model)
    once = vault.stats()
    vault.save("m", model)
    vault.save("n", [1, 2])  # no parts at all
    twice = vault.stats()
    sizes = [v.size for name in ("m", "n") for v in vault.versions(name)]
    assert twice.raw_bytes == sum(sizes)
    assert (twice.models, twice.versions) == (2, 3)
    assert twice.unique_bytes == once.unique_bytes  # the second save added no chunk
    assert twice.chunks == once.chunks
    assert twice.raw_bytes >= twice.unique_bytes
    # A chunk that would not shrink is stored raw, so compression never loses bytes.
    assert twice.stored_bytes <= twice.unique_bytes
    assert twice.file_bytes >= twice.stored_bytes
    assert twice.dedup_ratio == pytest.approx(2.0)
    assert twice.compression_ratio >= 1.0
    assert twice.total_ratio > 1.0
    assert once.dedup_ratio == pytest.approx(1.0)


def test_large_file_is_extracted_batch_by_batch(vault, tmp_path):
    """A file spanning several read batches (64 chunks each) comes back byte for byte."""
    source = tmp_path / "weights.bin"
    data = np.random.default_rng(1).integers(0, 256, 12_000_000, dtype=np.uint8).tobytes()
    source.write_bytes(data)
    vault.save_files("big", source)
    source.unlink()  # the vault holds its own copy, nothing points back at the file
    written = vault.extract("big", tmp_path / "out")
    assert written == [tmp_path / "out" / "weights.bin"]
    assert written[0].read_bytes() == data
    assert vault.load("big") == {"weights.bin": data}


def test_damaged_file_chunk_leaves_no_half_written_file(vault_path, tmp_path):
    import sqlite3

    source = tmp_path / "model.onnx"
    source.write_bytes(np.random.default_rng(2).integers(0, 256, 2_000_000, np.uint8).tobytes())
    with modelvault.open(vault_path) as vault:
        vault.save_files("m", source)
    with sqlite3.connect(vault_path) as db:
        db.execute("UPDATE packs SET data = zeroblob(length(data)) WHERE id = "
                   "(SELECT max(id) FROM packs)")
    db.close()
    with modelvault.open(vault_path) as vault:
        with pytest.raises(modelvault.IntegrityError):
            vault.extract("m", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
