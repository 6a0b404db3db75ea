"""Partial and lazy loads: only the chunks of the entries asked for are read.

Tested on what they read: the other entries' chunks are damaged, so reading them would
raise IntegrityError. Never on time.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3

import numpy as np
import pytest

import modelvault


def model():
    rng = np.random.default_rng(0)
    return {"encoder": {"layer": [{"weight": rng.normal(size=(200, 300)),
                                   "bias": rng.normal(size=300)} for _ in range(3)]},
            "embeddings": rng.normal(size=(500, 64)).astype(np.float32),
            "step": 7, "scale": np.float64(0.5)}


def damage_all_but(path, keep):
    """Flip a byte in every chunk of the version's parts but those of ``keep`` (flat
    names), through the layout the format documents."""
    import json

    from modelvault._serialize import entries, leaf_part

    with sqlite3.connect(path) as db:
        layout = json.loads(db.execute("SELECT layout FROM versions").fetchone()[0])
        found = entries(layout)
        keep_parts = {leaf_part(found[name]) for name in keep}
        rows = db.execute("SELECT pc.part, c.pack_id, c.start, c.length FROM part_chunks pc "
                          "JOIN chunks c ON c.id = pc.chunk_id").fetchall()
        for part, pack, start, length in rows:
            if part in keep_parts:
                continue
            data = bytearray(db.execute("SELECT data FROM packs WHERE id = ?",
                                        (pack,)).fetchone()[0])
            data[start + length // 2] ^= 0xFF
            db.execute("UPDATE packs SET data = ? WHERE id = ?", (bytes(data), pack))
    db.close()


def test_keys_pick_entries_by_name_or_pattern_as_a_flat_dict(vault):
    obj = model()
    vault.save("net", obj)
    picked = vault.load("net", keys="encoder.layer.*.bias")
    assert list(picked) == [f"encoder.layer.{i}.bias" for i in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(picked[f"encoder.layer.{i}.bias"],
                                      obj["encoder"]["layer"][i]["bias"])
    both = vault.load("net", keys=["embeddings", "encoder.layer.1.weight", "scale"])
    assert list(both) == ["encoder.layer.1.weight", "embeddings", "scale"]  # layout order
    assert both["scale"] == 0.5 and both["embeddings"].dtype == np.float32
    with pytest.raises(KeyError, match="no entry named or matching 'decoder"):
        vault.load("net", keys="decoder.*")


def test_keys_read_only_the_chunks_of_those_entries(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("net", model())
    damage_all_but(vault_path, ["encoder.layer.2.weight", "embeddings"])
    with modelvault.open(vault_path) as vault:
        got = vault.load("net", keys=["encoder.layer.2.weight", "embeddings"])
        np.testing.assert_array_equal(got["embeddings"], model()["embeddings"])
        with pytest.raises(modelvault.IntegrityError, match="net:1"):
            vault.load("net")
        with pytest.raises(modelvault.IntegrityError):
            vault.load("net", keys="encoder.layer.0.bias")


def test_a_lazy_mapping_decodes_each_entry_when_first_read(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("net", model())
    damage_all_but(vault_path, ["embeddings"])
    with modelvault.open(vault_path) as vault:
        lazy = vault.load("net", lazy=True)  # reads no chunk yet
        assert len(lazy) == 8 and "encoder.layer.0.weight" in lazy
        assert list(lazy)[:2] == ["encoder.layer.0.weight", "encoder.layer.0.bias"]
        first = lazy["embeddings"]
        np.testing.assert_array_equal(first, model()["embeddings"])
        assert lazy["embeddings"] is first  # decoded once
        with pytest.raises(modelvault.IntegrityError):
            lazy["encoder.layer.0.bias"]
        with pytest.raises(KeyError):
            lazy["nothing"]
        with pytest.raises(TypeError):
            lazy["embeddings"] = 1  # read-only


def test_a_lazy_mapping_after_close_says_so(vault):
    vault.save("net", model())
    lazy = vault.load("net", lazy=True)
    vault.close()
    with pytest.raises(modelvault.VaultError, match="closed"):
        lazy["embeddings"]


def test_a_lazy_mapping_closes_and_lets_go_of_its_pins(vault_path):
    obj = model()
    with modelvault.open(vault_path) as vault:
        vault.save("net", obj)
        count = chunk_count(vault_path)
        with vault.load("net", lazy=True) as lazy:
            np.testing.assert_array_equal(lazy["embeddings"], obj["embeddings"])
            vault.delete("net")
            vault.gc()
            assert chunk_count(vault_path) == count  # pinned while it is open
        assert lazy.closed and "closed" in repr(lazy)
        with pytest.raises(modelvault.VaultError, match="net:1: this lazy mapping is closed"):
            lazy["embeddings"]  # decoded before, but let go of
        assert "embeddings" in lazy and len(lazy) == 8  # its names stay
        vault.gc()
        assert chunk_count(vault_path) == 0
        lazy.close()  # again: nothing
        assert not os.path.exists(f"{vault_path}-lock")


def _in_another_process(path, home, action):
    import os

    os.environ["MODELVAULT_HOME"] = home
    with modelvault.open(path) as vault:
        if action == "repack":
            vault.delete("other:1")  # shares its packs with net:1
        elif action == "delete":
            vault.delete("net:1")
        vault.gc()


def _run(path, action):
    import os

    process = multiprocessing.get_context("spawn").Process(
        target=_in_another_process, args=(str(path), os.environ["MODELVAULT_HOME"], action))
    process.start()
    process.join(60)
    assert process.exitcode == 0


def chunk_count(path):
    with sqlite3.connect(path) as db:
        count = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    db.close()
    return count


def test_a_lazy_mapping_keeps_its_chunks_from_another_processs_delete_and_gc(vault_path):
    # other:1 is eight 1 MiB chunks that compress well, so they share one pack; net:1's
    # "shared" entry is the same bytes as the first of them, so it is that chunk. Once
    # other:1 is gone, gc repacks the pack's one live chunk elsewhere.
    big = np.repeat(np.arange(8.0), 131072) + np.tile(np.arange(131072) % 7, 8)
    obj = {**model(), "shared": big[:131072].copy()}
    with modelvault.open(vault_path) as vault:
        vault.save("other", {"big": big})
        vault.save("net", obj)
        with sqlite3.connect(vault_path) as db:
            packs = {r[0] for r in db.execute("SELECT pack_id FROM chunks WHERE size = ?",
                                              (1 << 20,))}
        assert len(packs) == 1
        net_chunks = chunk_count(vault_path) - 7
        lazy = vault.load("net", lazy=True)
        lock = f"{vault_path}-lock"
        assert os.path.exists(lock)
        _run(vault_path, "repack")  # gc moved the shared chunk into a new pack
        with sqlite3.connect(vault_path) as db:
            assert db.execute("SELECT count(*) FROM packs WHERE id = ?",
                              (packs.pop(),)).fetchone()[0] == 0
        np.testing.assert_array_equal(lazy["shared"], obj["shared"])
        _run(vault_path, "delete")  # deleted and collected, but for what lazy may read
        assert chunk_count(vault_path) == net_chunks
        assert vault.models() == []
        np.testing.assert_array_equal(lazy["embeddings"], obj["embeddings"])
        for i in range(3):
            np.testing.assert_array_equal(lazy[f"encoder.layer.{i}.weight"],
                                          obj["encoder"]["layer"][i]["weight"])
        del lazy  # its pins go with it
        assert not os.path.exists(lock)  # one file again
        _run(vault_path, "collect")
        assert chunk_count(vault_path) == 0


def _hold_a_lazy_mapping(path, home, ready):
    import os
    import time

    os.environ["MODELVAULT_HOME"] = home
    vault = modelvault.open(path)
    lazy = vault.load("net", lazy=True)
    ready.set()
    time.sleep(120)
    print(lazy)


def test_the_pins_of_a_killed_reader_go_with_it(vault_path):
    import signal

    with modelvault.open(vault_path) as vault:
        vault.save("net", model())
        count = chunk_count(vault_path)
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        reader = context.Process(target=_hold_a_lazy_mapping,
                                 args=(str(vault_path), os.environ["MODELVAULT_HOME"], ready))
        reader.start()
        try:
            assert ready.wait(60)
            vault.delete("net")
            vault.gc()
            assert chunk_count(vault_path) == count  # the reader may still read them
        finally:
            os.kill(reader.pid, signal.SIGKILL)
            reader.join(60)
        vault.gc()
        assert chunk_count(vault_path) == 0


def test_lazy_mappings_of_this_process_keep_their_chunks_from_its_gc(vault_path):
    obj = model()
    with modelvault.open(vault_path) as vault, modelvault.open(vault_path) as other:
        vault.save("net", obj)
        count = chunk_count(vault_path)
        first, second = vault.load("net", lazy=True), other.load("net", lazy=True)
        vault.delete("net")
        vault.gc()
        other.gc()
        assert chunk_count(vault_path) == count
        other.close()  # releases second's pins; first still holds the same chunks
        vault.gc()
        assert chunk_count(vault_path) == count
        np.testing.assert_array_equal(first["embeddings"], obj["embeddings"])
        del first
        vault.gc()
        assert chunk_count(vault_path) == 0
        with pytest.raises(modelvault.VaultError, match="closed"):
            second["embeddings"]


def test_keys_and_lazy_read_tensors_and_keep_views_shared(vault):
    torch = pytest.importorskip("torch")
    weight = torch.randn(50, 8)
    vault.save("tied", {"embed": weight, "head": weight, "other": torch.ones(3)})
    lazy = vault.load("tied", lazy=True)
    assert lazy["embed"].untyped_storage().data_ptr() == lazy["head"].untyped_storage().data_ptr()
    assert torch.equal(vault.load("tied", keys="he*")["head"], weight)
    assert vault.load("tied", keys="other", device="meta")["other"].device.type == "meta"


def test_keys_are_for_versions_with_tensors(vault):
    vault.save("obj", {"s": {1, 2}})
    with pytest.raises(ValueError, match="obj:1 is a pickle version without tensors: keys= "
                                         "and lazy=True read the arrays and tensors of"):
        vault.load("obj", keys="s")


def test_keys_and_lazy_read_a_pickled_modules_tensors_by_state_dict_name(vault_path,
                                                                         monkeypatch):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):  # local: cloudpickle pickles the class by value
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            self.head = torch.nn.Linear(4, 2)
            self.tied = self.head  # one module, two names, as in state_dict()
            self.register_buffer("scratch", torch.ones(2), persistent=False)

    torch.manual_seed(0)
    net = Net()
    net.body[0].weight.requires_grad_(False)
    state = net.state_dict()
    with modelvault.open(vault_path) as vault:
        vault.save("net", net)
        vault.save("plain", torch.nn.Sequential(torch.nn.Linear(2, 2)))  # by reference
        vault.save("checkpoint", {"model": net, "epoch": 3})
    monkeypatch.setenv("MODELVAULT_HOME", str(vault_path.parent / "stranger"))
    with modelvault.open(vault_path) as vault:
        with pytest.raises(modelvault.UntrustedError):
            vault.load("net")  # unpickling runs code: refused
        picked = vault.load("net", keys="*")  # reading its tensors runs none
        assert list(picked) == list(state)
        for name, tensor in state.items():
            assert torch.equal(picked[name], tensor) and picked[name].dtype == tensor.dtype
        assert type(picked["head.weight"]) is torch.nn.Parameter
        assert not picked["body.0.weight"].requires_grad and picked["body.0.bias"].requires_grad
        assert picked["tied.weight"].data_ptr() == picked["head.weight"].data_ptr()
        assert list(vault.load("plain", lazy=True)) == ["0.weight", "0.bias"]
        with vault.load("checkpoint", lazy=True) as lazy:
            assert list(lazy) == [f"model.{name}" for name in state]
            assert torch.equal(lazy["model.body.1.running_mean"],
                               state["body.1.running_mean"])


class _Touch:
    """Unpickled, it would create ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_reading_a_pickles_tensors_runs_none_of_its_code(vault, tmp_path):
    marker = tmp_path / "ran"
    vault.save("payload", {"a": _Touch(str(marker)), "b": [_Touch(str(marker))]})
    with pytest.raises(ValueError, match="without tensors"):
        vault.load("payload", lazy=True)
    assert not marker.exists()
    vault.load("payload")  # trusted here: the same stream does run, so the test can fail
    assert marker.exists()


@pytest.mark.parametrize("stream, problem", [
    # A 5-byte LONG_BINPUT for which pickle's C unpickler would ask for 64 GiB of memo.
    (b"\x80\x05N" + b"r" + (2**32 - 16).to_bytes(4, "little") + b".", "memo index"),
    (b"\x80\x05" + b")" * 2_000_000 + b".", "more than 1,000,000 opcodes"),
    (b"\x80\x05\x8c\x03abc", "cannot be read"),  # truncated
    (b"\x80\x05Q.", "cannot be read: opcode 1 \\(BINPERSID\\) takes more objects"),
    (b"\x80\x05NQ.", "a persistent id that is not a storage's \\(a NoneType\\)"),
])
def test_a_hostile_pickle_stream_is_refused_before_it_is_replayed(stream, problem):
    from modelvault import _pickle_tensors

    with pytest.raises(ValueError, match=problem):
        _pickle_tensors.entries(stream, {"pickle": 0, "storages": []})


def test_deep_and_cyclic_objects_in_a_pickle_are_walked_within_bounds():
    import pickle

    from modelvault import _pickle_tensors

    loop = {"self": None, "values": [1, 2]}
    loop["self"] = loop  # a cycle is walked once
    assert _pickle_tensors.entries(pickle.dumps(loop, protocol=5), {}) == {}
    deep = []
    for _ in range(200):
        deep = [deep, 1]
    with pytest.raises(ValueError, match="nested more than 64 deep"):
        _pickle_tensors.entries(pickle.dumps(deep, protocol=5), {})


def test_walking_a_pickle_counts_each_item_of_each_object_each_time_it_is_reached():
    import pickle

    from modelvault import _pickle_tensors

    # One dict of 1,100 keys no name is made of, listed 1,000 times through the memo: a
    # step per item visited is 1.1 million; a step per object was 1,001, so a stream of
    # this shape 200 KB long walked for hours.
    keys = {float(i): None for i in range(1_100)}
    with pytest.raises(ValueError, match="more than 1,000,000 steps to walk"):
        _pickle_tensors.entries(pickle.dumps([keys] * 1_000, protocol=5), {})


@pytest.mark.parametrize("obj", [
    {n * (2**61 - 1): None for n in range(1, 20)},  # ints that all hash to 0
    {(1, 2): None},  # the hash of a tuple of numbers can be chosen as well
    {2**64},
    {frozenset({1.5})},
    frozenset({(1, "a")}),
])
def test_a_pickle_whose_keys_hash_as_it_chooses_is_refused_before_it_is_replayed(obj):
    import pickle

    from modelvault import _pickle_tensors

    # 330,000 keys hashing alike take pickle's C unpickler nine minutes to put in a dict.
    with pytest.raises(ValueError, match="hashes an object whose hash it chooses"):
        _pickle_tensors.entries(pickle.dumps(obj, protocol=5), {})


def test_keys_whose_hashes_a_pickle_cannot_choose_are_replayed():
    import pickle

    from modelvault import _pickle_tensors

    obj = {"a": 1, 7: [2**64, (1, 2)], 2.5: {-3, "b", None}, ("x", b"y"): None,
           None: frozenset({"z"})}
    for protocol in range(6):
        assert _pickle_tensors.entries(pickle.dumps(obj, protocol=protocol), {}) == {}


def test_a_bad_persistent_id_is_named_by_its_type_only():
    import io
    import pickle

    from modelvault import _pickle_tensors

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            # A list holding one 1 KiB bytes object 1,000 times: a 1 KiB stream whose
            # repr is 4 MB (a 1 MiB one listed a million times, a terabyte).
            return [b"x" * 1024] * 1_000 if obj == "here" else None

    out = io.BytesIO()
    Pickler(out, protocol=5).dump(["here"])
    with pytest.raises(ValueError, match=r"a persistent id that is not a storage's \(a list\)"
                       ) as raised:
        _pickle_tensors.entries(out.getvalue(), {})
    assert len(str(raised.value)) < 200


def _view_stream(shape, stride):
    """A pickle of {"w": a view of storage 0 with this shape and stride}, as torch's own
    tensors pickle (their storage taken out as modelvault's persistent id)."""
    import io
    import pickle

    import torch

    from modelvault._torch import STORAGE_TAG

    storage = object()

    class View:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 0, shape, stride, False, None)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return (STORAGE_TAG, 0, "<f4") if obj is storage else None

    out = io.BytesIO()
    Pickler(out, protocol=5).dump({"w": View()})
    return out.getvalue()


def test_a_tensor_view_from_a_pickle_is_of_a_few_plain_ints():
    pytest.importorskip("torch")
    from modelvault import _pickle_tensors

    node = _pickle_tensors.entries(_view_stream((3, 2), (1, 3)), {"storages": [1]})["w"]
    assert (node["shape"], node["stride"], node["offset"]) == ([3, 2], [1, 3], 0)
    # A stride that holds a list of one 1 KiB bytes object 1,000 times: its repr, in a
    # "bad view" error, would be 4 MB.
    for shape, stride in [((2,), ([b"x" * 1024] * 1_000,)), ((1,) * 65, (1,) * 65),
                          ((2**64,), (1,)), ((2,), (-1,))]:
        with pytest.raises(ValueError, match="shape, stride or offset other than at most 64 "
                                             "ints from 0 to 2") as raised:
            _pickle_tensors.entries(_view_stream(shape, stride), {"storages": [1]})
        assert len(str(raised.value)) < 200


def test_a_tensors_name_is_counted_before_it_is_made():
    import pickle
    import tracemalloc

    torch = pytest.importorskip("torch")
    from modelvault import _pickle_tensors, _torch

    key = "k" * 2**20  # pickled once, reached on each of 20 levels through the memo
    obj = torch.ones(1)
    for _ in range(20):
        obj = {key: obj}
    stream, _ = _torch.dumps(obj, pickle.Pickler, None)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="names take more than 16,777,216 characters"):
            _pickle_tensors.entries(stream, {"storages": [1]})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # the 20 MiB name was never joined


def _replace_and_collect(path, home, rounds):
    import os

    os.environ["MODELVAULT_HOME"] = home
    rng = np.random.default_rng(1)
    with modelvault.open(path) as vault:
        for _ in range(rounds):
            vault.save("net", {f"w{i}": rng.normal(size=40000) for i in range(6)})
            for mv in vault.versions("net")[:-1]:
                vault.delete(mv)
            vault.gc()


@pytest.mark.sweep
def test_lazy_mappings_race_a_process_that_replaces_and_collects_versions(vault_path, full):
    # Every mapping is made of the latest version, then read while the other process
    # deletes it and collects. Without pins most reads failed (NotFoundError) in this race.
    with modelvault.open(vault_path) as vault:
        vault.save("net", {"w0": np.ones(3)})
        writer = multiprocessing.get_context("spawn").Process(
            target=_replace_and_collect,
            args=(str(vault_path), os.environ["MODELVAULT_HOME"], 300 if full else 40))
        writer.start()
        read = 0
        while writer.is_alive() or not read:
            lazy = vault.load("net", lazy=True)
            for name in lazy:
                assert lazy[name].shape in ((3,), (40000,))
            read += 1
            del lazy
        writer.join(60)
        assert writer.exitcode == 0


def test_a_forked_child_neither_drops_nor_keeps_its_parents_pins(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("net", model())
        count = chunk_count(vault_path)
        lazy = vault.load("net", lazy=True)
        pid = os.fork()
        if pid == 0:  # the child: its own mapping, then close (the parent's pins are not its)
            try:
                mine = vault.load("net", lazy=True)
                assert mine["embeddings"].shape == (500, 64)
                vault.close()
                os._exit(0)
            except BaseException:
                os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0
        vault.delete("net")
        vault.gc()
        assert chunk_count(vault_path) == count  # the parent's pins held through it all
        np.testing.assert_array_equal(lazy["embeddings"], model()["embeddings"])


def test_keys_of_a_checkpoint_holding_an_object_made_without_init(vault):
    """An optimizer in a checkpoint is rebuilt by NEWOBJ, which never calls __init__:
    its stand-in must still be walkable (a raw AttributeError before)."""
    torch = pytest.importorskip("torch", reason="a checkpoint needs torch")
    net = torch.nn.Linear(3, 2)
    checkpoint = {"model": net, "opt": torch.optim.SGD(net.parameters(), lr=0.1)}
    vault.save("ckpt", checkpoint, source=False)
    found = vault.load("ckpt", keys="model.*")
    assert sorted(found) == ["model.bias", "model.weight"]
    assert torch.equal(found["model.weight"], net.weight.detach())
