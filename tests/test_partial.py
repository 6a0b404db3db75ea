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
    (b"\x80\x05Q.", "cannot be read"),  # a persistent id that is not a storage's
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
