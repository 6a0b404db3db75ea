import json

import numpy as np
import pytest


def test_put_folder_then_get_it_back(run, tmp_path):
    source = tmp_path / "minilm"
    (source / "tokenizer").mkdir(parents=True)
    (source / "model.onnx").write_bytes(bytes(range(256)) * 1000)
    (source / "tokenizer" / "vocab.txt").write_text("hello\nworld\n")
    vault = tmp_path / "m.vault"
    result = run("put", vault, "minilm", source, "--meta", "dim=384", "--meta", "src=hub",
                 "--tag", "team=search", "--alias", "prod", "-m", "first upload")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("saved minilm:1")

    record = json.loads(run("show", vault, "minilm@prod", "--json").output)
    assert record["metadata"] == {"dim": 384, "src": "hub"}
    assert record["tags"] == {"team": "search"}
    assert record["description"] == "first upload"
    assert record["kind"] == "files"

    out = tmp_path / "out"
    result = run("get", vault, "minilm@prod", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert (out / "tokenizer" / "vocab.txt").read_text() == "hello\nworld\n"


def test_put_several_files(run, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.bin"
    a.write_text("{}")
    b.write_bytes(b"\x00" * 10)
    vault = tmp_path / "m.vault"
    assert run("put", vault, "pair", a, b).exit_code == 0
    out = tmp_path / "out"
    assert run("get", vault, "pair", "-o", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.bin"]


def test_put_missing_path(run, tmp_path):
    result = run("put", tmp_path / "m.vault", "x", tmp_path / "missing")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_put_bad_meta(run, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    result = run("put", tmp_path / "m.vault", "x", f, "--meta", "novalue")
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_get_arrays_as_npz(run, vault_file, tmp_path):
    result = run("get", vault_file, "churn:1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out" / "churn-v1.npz") as arrays:
        np.testing.assert_array_equal(arrays["w"], np.arange(10.0))


def test_get_pickled_object_needs_trust_from_a_stranger(run, tmp_path, monkeypatch):
    import pickle

    import modelvault

    vault = tmp_path / "m.vault"
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "alice"))
    modelvault.save(vault, "team/obj", {"a set": {1, 2}})
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "bob"))
    result = run("get", vault, "team/obj", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "no key this machine trusts signed it" in result.output
    result = run("get", vault, "team/obj", "-o", tmp_path / "out", "--trust")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "team_obj-v1.pkl", "rb") as f:
        assert pickle.load(f) == {"a set": {1, 2}}


def test_get_restores_the_permission_bits_recorded_at_put(run, tmp_path):
    import stat

    source = tmp_path / "model"
    source.mkdir()
    modes = {"config.json": 0o644, "run.sh": 0o755, "secret.key": 0o600, "frozen.bin": 0o444}
    for name, mode in modes.items():
        (source / name).write_text(name)
        (source / name).chmod(mode)
    vault = tmp_path / "m.vault"
    assert run("put", vault, "m", source).exit_code == 0
    out = tmp_path / "out"
    assert run("get", vault, "m", "-o", out).exit_code == 0
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == modes
    # Written again over files that are there (one of them read-only): the same bits.
    assert run("get", vault, "m", "-o", out).exit_code == 0
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == modes


def test_get_keys_and_format_write_the_chosen_entries(run, tmp_path):
    import modelvault

    path = tmp_path / "m.vault"
    weights = {"encoder": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                           "b": np.arange(4, dtype=np.int64)}, "head": np.ones(2)}
    with modelvault.open(path) as vault:
        vault.save("net", weights)
    out = tmp_path / "out"
    result = run("get", path, "net", "-o", out, "--keys", "encoder.*", "--format", "npz")
    assert result.exit_code == 0, result.output
    with np.load(out / "net-v1.npz") as npz:
        assert sorted(npz.files) == ["encoder.b", "encoder.w"]
        np.testing.assert_array_equal(npz["encoder.w"], weights["encoder"]["w"])
    result = run("get", path, "net", "-o", out, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    loaded = safetensors_numpy.load_file(str(out / "net-v1.safetensors"))
    assert sorted(loaded) == ["encoder.b", "encoder.w", "head"]
    np.testing.assert_array_equal(loaded["encoder.b"], weights["encoder"]["b"])
    assert run("get", path, "net", "-o", out, "--keys", "nothing").exit_code == 1


def test_get_keys_and_format_write_the_tensors_of_every_kind_that_has_them(run, tmp_path,
                                                                           monkeypatch):
    from test_safetensors_files import write_safetensors

    import modelvault

    path, out = tmp_path / "m.vault", tmp_path / "out"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    weights = {"enc.w": np.arange(6, dtype=np.float32).reshape(2, 3),
               "enc.b": np.ones(3, dtype=np.float32), "head": np.zeros(2, dtype=np.float16)}
    write_safetensors(folder / "model.safetensors", weights)
    (folder / "config.json").write_text("{}")
    assert run("put", path, "files", folder).exit_code == 0
    (tmp_path / "notes.txt").write_text("no tensors")
    assert run("put", path, "text", tmp_path / "notes.txt").exit_code == 0
    result = run("get", path, "files", "-o", out, "--keys", "enc.*", "--format", "npz")
    assert result.exit_code == 0, result.output
    with np.load(out / "files-v1.npz") as npz:
        assert sorted(npz.files) == ["enc.b", "enc.w"]
        np.testing.assert_array_equal(npz["enc.w"], weights["enc.w"])
    result = run("get", path, "text", "-o", out, "--keys", "*")
    assert result.exit_code == 1
    assert "text:1 is a files version without tensors" in result.output
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    with modelvault.open(path) as vault:
        vault.save("net", net)
    monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "stranger"))  # no trust needed
    result = run("get", path, "net", "-o", out, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    loaded = safetensors_torch.load_file(str(out / "net-v1.safetensors"))
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], t) for k, t in net.state_dict().items())
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16))
    with modelvault.open(path) as vault:
        assert vault.save("bert", bert).kind == "framework"
    result = run("get", path, "bert", "-o", out, "--keys", "encoder.layer.0.*", "--format",
                 "safetensors")
    assert result.exit_code == 0, result.output
    loaded = safetensors_torch.load_file(str(out / "bert-v1.safetensors"))
    assert loaded and all(k.startswith("encoder.layer.0.") for k in loaded)
    assert torch.equal(loaded["encoder.layer.0.output.dense.weight"],
                       bert.state_dict()["encoder.layer.0.output.dense.weight"])


def test_get_writes_a_torch_state_dict_as_safetensors(run, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import modelvault

    path = tmp_path / "m.vault"
    state = torch.nn.Linear(3, 2).state_dict()
    state["bf16"] = torch.randn(4).to(torch.bfloat16)
    with modelvault.open(path) as vault:
        vault.save("net", state)
    result = run("get", path, "net", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    loaded = safetensors_torch.load_file(str(tmp_path / "out" / "net-v1.safetensors"))
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


def test_get_of_dotted_model_names_writes_one_file_per_version(run, tmp_path):
    import modelvault

    path = tmp_path / "m.vault"
    with modelvault.open(path) as vault:
        vault.save("bert.base", {"w": np.ones(2)})
        vault.save("bert.base", {"w": np.zeros(2)})
    out = tmp_path / "out"
    for ref in ("bert.base:1", "bert.base:2"):
        assert run("get", path, ref, "-o", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["bert.base-v1.npz", "bert.base-v2.npz"]
