"""Framework models in their own formats: xgboost, lightgbm, onnx and Hugging Face
objects load without pickle, on another machine without trust, and as they were."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import modelvault


@pytest.fixture
def iris():
    from sklearn.datasets import load_iris

    return load_iris(return_X_y=True)


@pytest.fixture
def stranger(monkeypatch, tmp_path):
    """Switch to another machine's key: nothing saved so far is signed by a trusted key."""
    def switch():
        monkeypatch.setenv("MODELVAULT_HOME", str(tmp_path / "stranger"))
    return switch


def check_loads_as_saved(vault_path, stranger, models, predict):
    with modelvault.open(vault_path) as vault:
        for name, model in models.items():
            mv = vault.save(name, model)
            assert mv.kind == "framework", name
    stranger()
    with modelvault.open(vault_path) as vault:
        for name, model in models.items():
            assert vault.get(name).signature == "untrusted"
            loaded = vault.load(name)  # no trust=True: no pickle in it
            assert type(loaded) is type(model), name
            np.testing.assert_array_equal(predict(loaded), predict(model), err_msg=name)
        assert vault.verify() == []


def test_xgboost_boosters_and_wrappers(vault_path, stranger, iris):
    xgboost = pytest.importorskip("xgboost")
    X, y = iris
    models = {"classifier": xgboost.XGBClassifier(n_estimators=8, max_depth=3).fit(X, y),
              "regressor": xgboost.XGBRegressor(n_estimators=8, missing=-1.0).fit(X, y),
              "booster": xgboost.train({"max_depth": 2}, xgboost.DMatrix(X, y), 5)}

    def predict(model):
        if isinstance(model, xgboost.Booster):
            return model.predict(xgboost.DMatrix(X))
        return model.predict_proba(X) if hasattr(model, "predict_proba") else model.predict(X)

    check_loads_as_saved(vault_path, stranger, models, predict)
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("regressor")
        assert loaded.get_params()["missing"] == -1.0 and loaded.n_estimators == 8
        assert "xgboost" in " ".join(vault.get("classifier").environment["packages"])


def test_lightgbm_boosters_and_wrappers(vault_path, stranger, iris):
    lightgbm = pytest.importorskip("lightgbm")
    X, y = iris
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    models = {"classifier": lightgbm.LGBMClassifier(n_estimators=8, verbose=-1).fit(X, labels),
              "regressor": lightgbm.LGBMRegressor(n_estimators=8, verbose=-1).fit(X, y),
              "booster": lightgbm.train({"verbose": -1}, lightgbm.Dataset(X, y), 5)}

    def predict(model):
        return model.predict_proba(X) if hasattr(model, "predict_proba") else model.predict(X)

    check_loads_as_saved(vault_path, stranger, models, predict)
    with modelvault.open(vault_path) as vault:
        assert list(vault.load("classifier").predict(X[:2])) == list(labels[:2])


def test_onnx_models(vault_path, stranger):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    with modelvault.open(vault_path) as vault:
        assert vault.save("add", model).kind == "framework"
    stranger()
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("add")
        assert isinstance(loaded, onnx.ModelProto) and loaded == model
        written = vault.extract("add", vault_path.parent / "out")
        assert [p.name for p in written] == ["model.onnx"]
        assert onnx.load(str(written[0])) == model


@pytest.fixture
def tiny_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_a_bert_model_as_an_object_and_as_a_folder(vault_path, stranger, tiny_bert, tmp_path):
    import torch

    x = torch.randint(0, 120, (2, 9))
    expected = tiny_bert(x).last_hidden_state
    folder = tmp_path / "bert"
    tiny_bert.save_pretrained(folder)
    with modelvault.open(vault_path) as vault:
        assert vault.save("bert", tiny_bert).kind == "framework"
        vault.save_files("bert-folder", folder)
    stranger()
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("bert").eval()
        assert type(loaded).__name__ == "BertModel"
        assert vault.load("bert", device="meta").device.type == "meta"
        assert torch.equal(loaded(x).last_hidden_state, expected)
        out = tmp_path / "out"
        vault.extract("bert-folder", out)
        again = type(tiny_bert).from_pretrained(out).eval()
        assert torch.equal(again(x).last_hidden_state, expected)


def test_a_fine_tune_of_a_bert_adds_about_half_of_it(vault_path, tiny_bert):
    import torch

    with modelvault.open(vault_path) as vault:
        base = vault.save("bert", tiny_bert)
        with torch.no_grad():
            for parameter in tiny_bert.parameters():
                parameter.mul_(1 + torch.randn_like(parameter) * 1e-3)  # 0.1 % each
        tuned = vault.save("bert", tiny_bert)
        assert tuned.added_bytes < 0.75 * base.added_bytes
        x = torch.randint(0, 120, (1, 5))
        assert torch.equal(vault.load("bert").eval()(x).last_hidden_state,
                           tiny_bert(x).last_hidden_state)


def test_a_tokenizer(vault_path, stranger, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello",
                                "world", "##s"]))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    with modelvault.open(vault_path) as vault:
        assert vault.save("tok", tokenizer).kind == "framework"
    stranger()
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("tok")
    assert loaded("hello worlds")["input_ids"] == tokenizer("hello worlds")["input_ids"]


def test_sentence_transformers(vault_path, stranger, tiny_bert, tmp_path):
    pytest.importorskip("sentence_transformers")
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models

    folder = tmp_path / "bert"
    tiny_bert.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(115)]))
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    encoder = models.Transformer(str(folder))
    model = SentenceTransformer(modules=[encoder, models.Pooling(32)], device="cpu")
    expected = model.encode(["w1 w2 w3", "w4"], convert_to_tensor=True)
    with modelvault.open(vault_path) as vault:
        assert vault.save("st", model).kind == "framework"
    stranger()
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("st")
    assert type(loaded) is SentenceTransformer
    assert torch.allclose(loaded.encode(["w1 w2 w3", "w4"], convert_to_tensor=True), expected)


def test_a_diffusers_pipeline(vault_path, stranger):
    diffusers = pytest.importorskip("diffusers")
    import torch

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                 block_out_channels=(8, 8), layers_per_block=1,
                                 norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(
        num_train_timesteps=10))
    with modelvault.open(vault_path) as vault:
        assert vault.save("ddpm", pipeline).kind == "framework"
    stranger()
    with modelvault.open(vault_path) as vault:
        loaded = vault.load("ddpm")
    assert type(loaded) is type(pipeline)
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    sample = torch.randn(1, 1, 8, 8)
    # diffusers' own save_pretrained and from_pretrained give outputs within 1e-6.
    assert torch.allclose(loaded.unet(sample, 3).sample, pipeline.unet.eval()(sample, 3).sample,
                          atol=1e-5)


def test_only_files_that_carry_no_code_load_without_trust():
    from modelvault._frameworks import needs_trust

    assert needs_trust(["config.json", "pytorch_model.bin", "model.py"]) == [
        "pytorch_model.bin", "model.py"]
    assert needs_trust(["config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                        "spiece.model", "README.md"]) == []


def test_a_missing_framework_says_what_to_install(vault_path, monkeypatch, iris):
    xgboost = pytest.importorskip("xgboost")
    X, y = iris
    with modelvault.open(vault_path) as vault:
        vault.save("m", xgboost.XGBRegressor(n_estimators=2).fit(X, y))
        monkeypatch.setitem(sys.modules, "xgboost", None)
        monkeypatch.setitem(sys.modules, "xgboost.sklearn", None)
        with pytest.raises(modelvault.VaultError, match="pip install xgboost"):
            vault.load("m")


def test_import_modelvault_imports_no_framework():
    code = ("import sys, modelvault\n"
            "print([m for m in ('torch', 'transformers', 'xgboost', 'lightgbm', 'onnx', "
            "'sentence_transformers', 'diffusers', 'ml_dtypes', 'sklearn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_parameter_json_cannot_hold_falls_back_to_a_pickle(vault, iris):
    xgboost = pytest.importorskip("xgboost")
    X, y = iris
    model = xgboost.XGBRegressor(n_estimators=2, objective=_squared_error).fit(X, y)
    mv = vault.save("custom", model)
    assert mv.kind == "pickle"
    np.testing.assert_array_equal(vault.load("custom").predict(X), model.predict(X))


def _squared_error(y_true, y_pred):
    return y_pred - y_true, np.ones_like(y_pred)


def test_an_unfitted_lightgbm_model_is_pickled(vault):
    lightgbm = pytest.importorskip("lightgbm")
    assert vault.save("m", lightgbm.LGBMClassifier()).kind == "pickle"


def test_files_renamed_under_the_layout_need_trust_and_do_not_load(vault_path, stranger):
    """An edit that renames a framework version's file to one that could run code, keeping
    the layout's list and fixing the digest, is refused: trust is judged on the files as
    stored, and the files must be the ones the layout lists."""
    import json
    import sqlite3

    from test_format import descriptors, digest_of  # the reader written from the doc

    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    with modelvault.open(vault_path) as vault:
        vault.save("m", helper.make_model(graph))
    with sqlite3.connect(vault_path) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT id, kind, layout FROM versions").fetchone()
        db.execute("UPDATE parts SET name = 'pytorch_model.bin' WHERE version_id = ?",
                   (row["id"],))
        digest = digest_of(row["kind"], json.loads(row["layout"]), descriptors(db, row["id"]))
        db.execute("UPDATE versions SET digest = ?, signature = NULL", (digest,))
    db.close()
    stranger()
    with modelvault.open(vault_path) as vault:
        with pytest.raises(modelvault.UntrustedError, match="pytorch_model.bin"):
            vault.load("m")
        with pytest.raises(modelvault.IntegrityError, match="not the ones its layout lists"):
            vault.load("m", trust=True)
