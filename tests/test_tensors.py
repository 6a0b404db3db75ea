"""torch tensors and ml_dtypes arrays stored natively: every dtype, any shape, shared
storages, state dicts into real modules, and objects that hold tensors."""

from __future__ import annotations

import collections
import sqlite3

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelvault

torch = pytest.importorskip("torch", reason="torch is not installed")

# Every dtype torch can hold in a plain tensor (quantized ones are not plain tensors).
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
DTYPES = sorted({d for d in (getattr(torch, n) for n in dir(torch))
                 if isinstance(d, torch.dtype) and d not in QUANTIZED}, key=str)


INTEGERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def raw(tensor):
    """A tensor's elements as bytes, whatever its dtype (bit-exact, NaNs included)."""
    width = INTEGERS[tensor.dtype.itemsize]
    out = torch.empty(tensor.shape, dtype=width)
    out.copy_(tensor.detach().view(width))
    return out.reshape(-1).view(torch.uint8).numpy().tobytes()


def same(a, b):
    return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
            and a.device == b.device and raw(a) == raw(b))


def random_tensor(draw, dtype, shape):
    count = int(np.prod(shape)) if shape else 1
    data = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(
        0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    tensor = random_tensor(draw, dtype, shape)
    if draw(st.booleans()) and tensor.dim() >= 1 and tensor.shape[0] > 1:
        tensor = tensor[::2]  # a strided view: stored contiguous
    if draw(st.booleans()) and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    return tensor


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=5), tensors(), max_size=4), tensors())
def test_every_dtype_and_shape_round_trips_bit_exact(vault, named, alone):
    obj = {"named": named, "alone": alone, "list": [alone, 3], "n": None}
    mv = vault.save("t", obj)
    assert mv.kind == "arrays"
    back = vault.load(mv.ref)
    assert back.keys() == obj.keys() and back["n"] is None and back["list"][1] == 3
    assert back["named"].keys() == named.keys()
    for key, tensor in named.items():
        assert same(back["named"][key], tensor), key
    assert same(back["alone"], alone) and same(back["list"][0], alone)


def test_a_dtype_name_from_a_file_only_picks_from_the_names_modelvault_writes(monkeypatch):
    from modelvault import _torch

    for dtype in {*DTYPES, *QUANTIZED}:  # quantized ones: storages inside a pickle
        assert _torch.torch_dtype(_torch.dtype_name(dtype)) is dtype
    asked = []

    def attribute(name):  # torch's own imports the submodule a name names ("_inductor")
        asked.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, "__getattr__", attribute)
    for name in ("_no_such_attribute", "float32", "nn", "Tensor", ">f4", "k" * 10**6, 3):
        with pytest.raises(ValueError, match="unknown tensor dtype") as raised:
            _torch.torch_dtype(name)
        assert len(str(raised.value)) < 100
    assert asked == []


def test_a_state_dict_goes_into_a_real_module(vault):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model(torch.randn(4, 8))  # BatchNorm's running stats and counter change
    state = model.state_dict()
    mv = vault.save("net", state)
    assert mv.kind == "arrays"
    loaded = vault.load("net")
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(state)
    assert loaded._metadata == state._metadata  # module versions, for load_state_dict
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 2))
    fresh.load_state_dict(loaded)
    model.eval(), fresh.eval()
    x = torch.randn(5, 8)
    assert torch.equal(model(x), fresh(x))


def test_a_state_dict_needs_no_trust_on_another_machine(vault_path, monkeypatch, tmp_path):
    with modelvault.open(vault_path) as vault:
        vault.save("net", torch.nn.Linear(3, 2).state_dict())
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "stranger"))
    with modelvault.open(vault_path) as vault:
        assert vault.get("net").signature == "untrusted"
        assert vault.load("net")["weight"].shape == (2, 3)


def test_tied_weights_and_views_come_back_sharing_one_storage(vault):
    embedding = torch.randn(10, 4)
    obj = {"embed.weight": embedding, "lm_head.weight": embedding,
           "rows": embedding[2:5], "column": embedding[:, 1], "other": torch.randn(3)}
    back = vault.load(vault.save("tied", obj).ref)
    pointers = {k: back[k].untyped_storage().data_ptr() for k in obj}
    assert len({pointers[k] for k in ("embed.weight", "lm_head.weight", "rows", "column")}) == 1
    assert pointers["other"] != pointers["embed.weight"]
    for key, tensor in obj.items():
        assert torch.equal(back[key], tensor), key
        assert back[key].stride() == tensor.stride(), key
    back["embed.weight"][3, 1] = 100.0  # one storage: the change shows through every view
    assert back["lm_head.weight"][3, 1] == 100 and back["rows"][1, 1] == 100
    assert back["column"][3] == 100


def test_parameters_and_requires_grad_come_back(vault):
    obj = {"p": torch.nn.Parameter(torch.randn(3)),
           "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
           "g": torch.randn(2).requires_grad_()}
    back = vault.load(vault.save("p", obj).ref)
    assert type(back["p"]) is torch.nn.Parameter and back["p"].requires_grad
    assert type(back["frozen"]) is torch.nn.Parameter and not back["frozen"].requires_grad
    assert type(back["g"]) is torch.Tensor and back["g"].requires_grad
    assert torch.equal(back["p"].detach(), obj["p"].detach())


def test_device_places_the_tensors(vault):
    vault.save("t", {"w": torch.randn(3), "n": np.arange(3)})
    back = vault.load("t", device="meta")  # a device every torch has, besides the CPU
    assert back["w"].device.type == "meta" and back["w"].shape == (3,)
    assert isinstance(back["n"], np.ndarray)
    assert vault.load("t", device=torch.device("cpu"))["w"].device.type == "cpu"


def test_one_changed_layer_adds_about_that_layer(vault):
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(512, 512) for i in range(4)}
    vault.save("net", state)
    tuned = dict(state, **{"layer3.weight": state["layer3.weight"] + 1e-3})
    added = vault.save("net", tuned).added_bytes
    layer = state["layer3.weight"].numel() * 4
    assert added < 0.7 * layer  # stored as its XOR with layer3 of net:1: about half
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    stored = vault.save("bf16", bf16).added_bytes
    assert stored < sum(v.numel() * 2 for v in bf16.values()) / 1.3


def test_ml_dtypes_arrays_round_trip(vault):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.linspace(-3, 3, 64, dtype=np.float32)
    obj = {name: values.astype(getattr(ml_dtypes, name))
           for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz")}
    obj["int4"] = np.arange(-8, 8).astype(ml_dtypes.int4)
    obj["scalar"] = ml_dtypes.bfloat16(1.5)
    back = vault.load(vault.save("jax", obj).ref)
    for key, array in obj.items():
        assert back[key].dtype == array.dtype, key
        assert np.asarray(back[key]).tobytes() == np.asarray(array).tobytes(), key
    with sqlite3.connect(vault.path) as db:
        names = {r[0] for r in db.execute("SELECT dtype FROM parts")}
    assert {"bfloat16", "float8_e4m3fn", "int4"} <= names  # named, not numpy's "<V2"


def test_a_whole_module_keeps_its_forward(vault):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6, 3))
    model.eval()
    mv = vault.save("module", model)
    assert mv.kind == "pickle"
    with sqlite3.connect(vault.path) as db:
        kinds = [r[0] for r in db.execute(
            "SELECT p.kind FROM parts p JOIN versions v ON v.id = p.version_id")]
    assert kinds.count("buffer") == 4  # every weight's storage left the stream
    loaded = vault.load("module")
    x = torch.randn(2, 2, 8)
    assert torch.equal(loaded(x), model(x))


def test_a_training_checkpoint_round_trips_and_dedups_against_its_parent(vault):
    torch.manual_seed(2)
    model = torch.nn.Linear(300, 300)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 300)).sum().backward()
    optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "epoch": 3}
    first = vault.save("ckpt", checkpoint)
    assert first.kind == "pickle"  # the optimizer's state has int keys
    back = vault.load("ckpt")
    assert back["epoch"] == 3
    assert torch.equal(back["model"]["weight"], model.weight.detach())
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    again = vault.save("ckpt", checkpoint)  # the same tensors: no new chunk bytes
    assert again.added_bytes < 2000


def test_a_vault_with_tensors_says_to_install_torch_when_it_is_missing(vault, monkeypatch):
    import sys

    vault.save("t", {"w": torch.randn(2)})
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(modelvault.VaultError, match="pip install torch"):
        vault.load("t")


def test_storages_that_start_at_one_address_but_differ_in_length(vault):
    array = np.arange(10.0)
    obj = {"head": torch.from_numpy(array[:4]), "full": torch.from_numpy(array)}
    back = vault.load(vault.save("overlap", obj).ref)
    assert torch.equal(back["head"], obj["head"]) and torch.equal(back["full"], obj["full"])
    module = torch.nn.Module()
    module.register_buffer("head", obj["head"])
    module.register_buffer("full", obj["full"])
    loaded = vault.load(vault.save("overlap-pickled", module).ref)
    assert torch.equal(loaded.head, obj["head"]) and torch.equal(loaded.full, obj["full"])


def test_conjugate_and_negative_views_keep_their_values(vault):
    z = torch.randn(4, dtype=torch.complex64)
    obj = {"z": z, "zc": z.conj(), "zn": torch._neg_view(z)}
    back = vault.load(vault.save("conj", obj).ref)
    for key, tensor in obj.items():
        assert torch.equal(back[key], tensor.resolve_conj().resolve_neg()), key


def test_lazy_reads_from_several_threads_give_one_object(vault):
    import threading

    vault.save("t", {"w": torch.randn(300, 300), "v": torch.randn(10)})
    lazy = vault.load("t", lazy=True)
    got = []
    threads = [threading.Thread(target=lambda: got.append(lazy["w"])) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and all(g is got[0] for g in got)


def test_a_damaged_entry_read_by_keys_is_an_integrity_error(vault):
    vault.save("t", {"w": np.arange(12.0), "v": np.ones(3)})
    with sqlite3.connect(vault.path) as db:
        db.execute("UPDATE parts SET shape = '[5]' WHERE dtype = '<f8' AND size = 96")
    db.close()
    with pytest.raises(modelvault.IntegrityError):
        vault.load("t", keys="w")
    with pytest.raises(modelvault.IntegrityError):
        vault.load("t", lazy=True)["w"]
    with pytest.raises(ValueError, match="do not go together"):
        vault.load("t", keys="w", lazy=True)
