"""The MLflow importer on real registries made here (a SQLite backend and a file store),
and the hostile registries beside them."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import modelvault

mlflow = pytest.importorskip("mlflow", reason="needs mlflow (the test extra)")



@pytest.fixture(scope="module", autouse=True)
def _mlflow_settings():
    """MLflow 3 refuses a new file store unless asked; its HTTP client retries for minutes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield

MLMODEL = "flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n  sklearn:\n" \
          "    pickled_model: model.pkl\n    serialization_format: cloudpickle\n"


def _weights(version: int) -> bytes:
    """Weights the versions share, and a last row of their own."""
    w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    w[-1] = version
    return w.tobytes()


def _version(client, tmp: Path, model: str, number: int, *, metrics=None, params=None,
             tags=None, run: bool = True):
    """A run logging ``metrics`` and ``params`` and the artifacts of a model, registered
    as the next version of ``model``."""
    experiment = client.get_experiment_by_name("e") or client.get_experiment(
        client.create_experiment("e", artifact_location=(tmp / "artifacts").as_uri()))
    created = client.create_run(experiment.experiment_id)
    run_id = created.info.run_id
    for key, value in (metrics or {"acc": 0.5 + number / 10}).items():
        client.log_metric(run_id, key, value)
    for key, value in (params or {"lr": "0.1"}).items():
        client.log_param(run_id, key, value)
    local = tmp / "staging" / f"{model}-{number}"
    local.mkdir(parents=True)
    (local / "MLmodel").write_text(MLMODEL)
    (local / "weights.bin").write_bytes(_weights(number))
    (local / "notes.txt").write_text(f"version {number}")
    client.log_artifacts(run_id, str(local), "model")
    client.set_terminated(run_id)
    return client.create_model_version(model, f"{created.info.artifact_uri}/model",
                                       run_id if run else None, tags=tags,
                                       description=f"{model} number {number}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite registry: churn (3 versions, @prod on 2, a tag, a stage) and fraud (2)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    for model, count in (("churn", 3), ("fraud", 2)):
        client.create_registered_model(model)
        for number in range(1, count + 1):
            _version(client, tmp, model, number, tags={"owner": "ana"} if number == 1 else None)
    client.set_registered_model_alias("churn", "prod", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stages are deprecated; registries still hold them
        client.transition_model_version_stage("churn", "3", "Staging")
    return f"mlflow:{uri}"


def test_every_registered_model_becomes_a_model_its_versions_a_chain(vault, registry):
    report = vault.import_(registry)
    assert report.name == "churn, fraud" and report.existing == ()
    assert [v.ref for v in report.added] == ["churn:1", "churn:2", "churn:3",
                                             "fraud:1", "fraud:2"]
    churn = vault.versions("churn")
    assert [v.metadata["mlflow_version"] for v in churn] == [1, 2, 3]
    assert [v.ref for v in vault.lineage("churn:3")] == ["churn:2", "churn:1"]
    assert vault.lineage("fraud:1") == []
    first = churn[0].metadata
    assert first["acc"] == 0.6 and first["mlflow_params"] == {"lr": "0.1"}
    assert first["mlflow_flavor"] == "sklearn"
    assert first["mlflow_description"] == "churn number 1"
    assert first["mlflow_source"].endswith("/model") and len(first["mlflow_run_id"]) == 32
    assert churn[0].tags == {"owner": "ana"}
    assert churn[2].tags == {"mlflow_stage": "Staging"}
    assert vault.get("churn@prod").version == 2
    files = vault.load("churn:2")
    assert sorted(files) == ["MLmodel", "notes.txt", "weights.bin"]
    assert files["weights.bin"] == _weights(2) and files["notes.txt"] == b"version 2"
    # The weights two versions share are stored once: the second adds its own row.
    assert churn[1].added_bytes < churn[0].added_bytes / 4


def test_importing_twice_adds_nothing_and_name_selects_one_model(vault, registry):
    vault.import_(registry, name="fraud")
    assert [m.name for m in vault.models()] == ["fraud"]
    again = vault.import_(registry)
    assert [v.ref for v in again.added] == ["churn:1", "churn:2", "churn:3"]
    assert [v.ref for v in again.existing] == ["fraud:1", "fraud:2"]
    last = vault.import_(registry)
    assert last.added == () and len(last.existing) == 5
    assert len(vault.versions("churn")) == 3


def test_a_new_version_in_the_registry_joins_the_chain(vault, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    _version(client, tmp_path, "m", 1)
    vault.import_(f"mlflow:{uri}")
    _version(client, tmp_path, "m", 2)
    report = vault.import_(f"mlflow:{uri}", name="m")
    assert [v.ref for v in report.added] == ["m:2"] and report.existing[0].ref == "m:1"
    assert vault.lineage("m:2")[0].ref == "m:1"


def test_a_file_store_registry_imports_and_a_link_out_is_refused(vault, tmp_path,
                                                                 monkeypatch):
    store = tmp_path / "mlruns"
    # MLflow's file store reads through a client of the process's tracking URI, whose
    # default is mlflow.db in the current folder: the setup's too.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    client = mlflow.MlflowClient(store.as_uri(), store.as_uri())
    client.create_registered_model("m")
    version = _version(client, store, "m", 1)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    report = vault.import_(f"mlflow:{store.as_uri()}")
    assert [v.metadata["mlflow_version"] for v in report.added] == [1]
    assert list(here.iterdir()) == []  # no mlflow.db made where the user stands
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    client.create_registered_model("leaky")
    version = _version(client, store, "leaky", 1)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (Path(version.source.removeprefix("file://")) / "passwd").symlink_to(secret)
    with pytest.raises(modelvault.VaultError, match="passwd links outside"):
        vault.import_(f"mlflow:{store.as_uri()}", name="leaky")
    assert [m.name for m in vault.models()] == ["m"]


def test_hostile_registry_values_are_left_out_with_warnings(vault, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    for model in ("it's", "ok"):
        client.create_registered_model(model)
    _version(client, tmp_path, "it's", 1)
    _version(client, tmp_path, "ok", 1, metrics={"nan": math.nan, "inf": math.inf,
                                                 "huge": 1e308, "mlflow_version": 99.0},
             params={"long": "x" * 5000, "lr": "0.1"},
             tags={"fine": "yes", "big": "y" * 6000})
    gone = _version(client, tmp_path, "ok", 2)
    client.delete_run(gone.run_id)
    _version(client, tmp_path, "ok", 3, run=False)
    client.set_registered_model_alias("ok", "123", "1")  # MLflow's alias, not ours
    with pytest.warns(UserWarning) as caught:
        report = vault.import_(f"mlflow:{uri}")
    messages = " ".join(str(w.message) for w in caught)
    assert "\"it's\" cannot be a vault model name" in messages
    assert "tag 'big' left out" in messages
    assert "alias '123' cannot be a vault alias" in messages
    assert report.name == "ok"
    first, second, third = vault.versions("ok")
    assert first.metadata["huge"] == 1e308 and "nan" not in first.metadata
    # MLflow's SQL store keeps inf as the largest float: finite, so kept.
    assert math.isfinite(first.metadata.get("inf", 0)) and first.metadata["mlflow_version"] == 1
    assert len(first.metadata["mlflow_params"]["long"]) == 1000
    assert first.tags == {"fine": "yes"}
    assert second.metadata["acc"] == 0.7  # a deleted run is still there to read
    assert "mlflow_run_id" not in third.metadata and third.metadata["mlflow_version"] == 3
    # The quoted name is not pasted into a filter: asked for, it is refused as a name.
    with pytest.raises(ValueError, match="invalid model name"):
        vault.import_(f"mlflow:{uri}", name="it's")


def test_a_missing_run_costs_its_metrics_not_the_import(vault, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    version = _version(client, tmp_path, "m", 1)
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # as `mlflow gc` leaves it
        for table in ("metrics", "latest_metrics", "params", "tags"):
            db.execute(f"DELETE FROM {table} WHERE run_uuid = ?", (version.run_id,))
        db.execute("DELETE FROM runs WHERE run_uuid = ?", (version.run_id,))
    with pytest.warns(UserWarning, match="is gone; imported without its metrics"):
        report = vault.import_(f"mlflow:{uri}")
    assert report.added[0].metadata["mlflow_run_id"] == version.run_id
    assert "acc" not in report.added[0].metadata


def test_registries_that_cannot_be_read_are_vault_errors(vault, tmp_path, registry):
    with pytest.raises(modelvault.NotFoundError, match="no such MLflow database"):
        vault.import_(f"mlflow:sqlite:///{tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()  # MLflow would have made an empty one
    other = tmp_path / "other.db"
    import sqlite3

    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(modelvault.VaultError, match="not an MLflow database"):
        vault.import_(f"mlflow:sqlite:///{other}")
    with pytest.raises(modelvault.NotFoundError, match="no such MLflow folder"):
        vault.import_(f"mlflow:{(tmp_path / 'nope').as_uri()}")
    with pytest.raises(modelvault.NotFoundError, match="model 'missing'"):
        vault.import_(registry, name="missing")
    with pytest.raises(modelvault.RemoteError, match="MLflow"):
        vault.import_("mlflow:http://127.0.0.1:9")
    with pytest.raises(modelvault.RemoteError, match="MLflow"):
        vault.import_("mlflow:bogus://x")
    assert vault.models() == []


def test_a_server_that_does_not_answer_is_given_up_on_after_few_tries(vault, monkeypatch):
    """MLflow's HTTP client tries 8 times, backing off for minutes; the import bounds
    that (the user's own setting would win), and leaves MLflow's settings as they were."""
    from urllib3.util.retry import Retry

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    tries = []
    increment = Retry.increment
    monkeypatch.setattr(Retry, "increment",
                        lambda self, *a, **k: tries.append(1) or increment(self, *a, **k))
    monkeypatch.setattr(Retry, "sleep", lambda self, response=None: None)
    with pytest.raises(modelvault.RemoteError, match="MLflow"):
        vault.import_("mlflow:http://127.0.0.1:9")
    assert 1 <= len(tries) <= 3
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_bare_prefix_is_mlflows_own_tracking_uri(vault, registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.removeprefix("mlflow:"))
    report = vault.import_("mlflow:", name="fraud")
    assert [v.ref for v in report.added] == ["fraud:1", "fraud:2"]


def test_the_command_imports_a_registry_and_reports(run, tmp_path, registry):
    path = tmp_path / "cli.vault"
    result = run("import", path, registry, "--name", "churn")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("added churn:1 (mlflow_version=1): ")
    assert lines[1].endswith("@prod")
    assert lines[-1] == "imported 3 version(s) of churn; 0 already there"
    result = run("import", path, registry, "--json")
    found = json.loads(result.output)
    assert found["name"] == "churn, fraud" and len(found["existing"]) == 3
    result = run("import", path, tmp_path / "missing")
    assert result.exit_code == 1 and "no such folder" in result.output


def test_a_progress_bar_counts_versions_when_asked(vault_path, registry, capsys):
    with modelvault.open(vault_path, progress=True) as vault:
        vault.import_(registry, name="fraud")
    assert "import fraud" in capsys.readouterr().err


def test_importing_modelvault_does_not_import_mlflow():
    import subprocess
    import sys

    code = "import sys, modelvault; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def _log_folder(client, tmp: Path, model: str, folder: Path):
    """``folder`` (an MLflow model folder) logged by a run, registered as ``model``'s next
    version."""
    experiment = client.get_experiment_by_name("e") or client.get_experiment(
        client.create_experiment("e", artifact_location=(tmp / "artifacts").as_uri()))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    return client.create_model_version(model, f"{run.info.artifact_uri}/model",
                                       run.info.run_id)


def test_flavors_stored_natively_are_saved_as_models_pickled_ones_stay_files(vault, tmp_path):
    xgboost = pytest.importorskip("xgboost", reason="needs xgboost")
    lightgbm = pytest.importorskip("lightgbm", reason="needs lightgbm")
    onnx = pytest.importorskip("onnx", reason="needs onnx")
    import mlflow.lightgbm
    import mlflow.xgboost

    x = np.random.default_rng(0).random((60, 3))
    y = (x[:, 0] > 0.5).astype(int)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    saved = tmp_path / "saved"
    booster = xgboost.train({}, xgboost.DMatrix(x, y), 2)
    mlflow.xgboost.save_model(booster, saved / "xgb")
    mlflow.xgboost.save_model(xgboost.XGBClassifier(n_estimators=2).fit(x, y), saved / "xgbc")
    mlflow.lightgbm.save_model(lightgbm.train({"verbose": -1}, lightgbm.Dataset(x, y), 2),
                               saved / "lgb")
    mlflow.lightgbm.save_model(lightgbm.LGBMClassifier(n_estimators=2, verbose=-1).fit(x, y),
                               saved / "lgbc")  # a scikit-learn wrapper: serialized, not text
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    (saved / "onnx").mkdir()
    onnx.save(onnx.helper.make_model(graph), str(saved / "onnx" / "model.onnx"))
    (saved / "onnx" / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    # Hostile MLmodels: a class that is no model's, a data file outside the folder.
    for odd, conf in (("odd-class", "model_class: os.system\n    model_format: ubj\n"
                                    "    data: model.ubj"),
                      ("odd-path", "model_class: xgboost.core.Booster\n    model_format: ubj\n"
                                   "    data: ../../../../etc/hostname")):
        (saved / odd).mkdir()
        (saved / odd / "model.ubj").write_bytes((saved / "xgb" / "model.ubj").read_bytes())
        (saved / odd / "MLmodel").write_text(f"flavors:\n  xgboost:\n    {conf}\n")
    for folder in ("xgb", "xgbc", "lgb", "lgbc", "onnx", "odd-class", "odd-path"):
        client.create_registered_model(folder)
        _log_folder(client, tmp_path, folder, saved / folder)
    vault.import_(f"mlflow:{uri}")
    kinds = {m.name: (vault.get(m.name).kind, vault.get(m.name).metadata["mlflow_flavor"])
             for m in vault.models()}
    assert kinds == {"xgb": ("framework", "xgboost"), "xgbc": ("framework", "xgboost"),
                     "lgb": ("framework", "lightgbm"), "lgbc": ("files", "lightgbm"),
                     "onnx": ("framework", "onnx"), "odd-class": ("files", "xgboost"),
                     "odd-path": ("files", "xgboost")}
    assert isinstance(vault.load("xgbc"), xgboost.XGBClassifier)
    assert np.allclose(vault.load("xgb").predict(xgboost.DMatrix(x)),
                       booster.predict(xgboost.DMatrix(x)))
    assert isinstance(vault.load("lgb"), lightgbm.Booster)
    assert vault.load("onnx").graph.node[0].op_type == "Identity"


def test_the_readme_mlflow_section_runs_as_written(tmp_path, monkeypatch, run):
    """The README's "From MLflow": its first command and its Python, on a registry in
    mlflow.db in the current folder."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### From MLflow", 1)[1].split("\n## ", 1)[0]
    command = section.split("```bash\n", 1)[1].splitlines()[0].split("#")[0].split()
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient("sqlite:///mlflow.db", "sqlite:///mlflow.db")
    client.create_registered_model("churn")
    for number in (1, 2):
        _version(client, tmp_path, "churn", number)
    client.set_registered_model_alias("churn", "champion", "2")
    assert command[:2] == ["modelvault", "import"]
    assert run(*command[1:]).exit_code == 0
    with modelvault.open("models.vault") as vault:
        assert vault.get("churn@champion").metadata["mlflow_version"] == 2
    with modelvault.open("other.vault") as vault:
        scope = {"vault": vault}
        exec(code, scope)  # noqa: S102 - our own README
        assert [v.ref for v in scope["report"].added] == ["churn:1", "churn:2"]


def test_an_onnx_model_with_external_data_anywhere_stays_files(vault, tmp_path):
    """External data in a node's attribute, not only in the initializers: saved as a
    model it would be a version that cannot load (its data left behind)."""
    onnx = pytest.importorskip("onnx", reason="needs onnx")
    from onnx import helper, numpy_helper

    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value=tensor)], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    folder = tmp_path / "saved"
    folder.mkdir()
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    (folder / "weights.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    _log_folder(client, tmp_path, "m", folder)
    vault.import_(f"mlflow:{uri}")
    assert vault.get("m").kind == "files"
    assert sorted(vault.load("m")) == ["MLmodel", "model.onnx", "weights.bin"]


def test_an_mlmodel_with_yaml_aliases_is_not_expanded(vault, tmp_path):
    """Merge keys over aliases double at each level: a few hundred bytes that would take
    hours to load. MLflow writes no aliases, so a file with one is read as no MLmodel."""
    lines = ["a0: &a0 {x: 1}"] + [f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}"
                                  for i in range(1, 12)]
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "MLmodel").write_text("\n".join(
        [*lines, "flavors: {onnx: {<<: [*a11, *a11], data: model.onnx}}"]))
    (folder / "model.onnx").write_bytes(b"not onnx")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    _log_folder(client, tmp_path, "m", folder)
    with pytest.warns(UserWarning, match="YAML aliases"):
        vault.import_(f"mlflow:{uri}")
    assert vault.get("m").kind == "files" and "mlflow_flavor" not in vault.get("m").metadata


def test_mlflows_own_download_bars_stay_hidden(vault, registry, monkeypatch, capfd):
    """The vault's progress setting decides what is shown; MLflow's per-version download
    bars would print whatever it is."""
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    vault.import_(registry, name="fraud")
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ


def test_a_locked_registry_database_is_said_to_be_busy_not_foreign(vault, registry):
    import sqlite3

    path = registry.removeprefix("mlflow:sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # MLflow's server in the middle of a write
    try:
        with pytest.raises(modelvault.VaultError, match="database is locked") as caught:
            vault.import_(registry)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "not an MLflow database" not in str(caught.value)


def test_a_server_answering_with_another_models_name_is_refused(vault, registry,
                                                                  monkeypatch):
    """Hostile case: asked for churn, the registry answers with a model of another name
    (one a vault cannot take): a RemoteError, nothing imported."""
    real = mlflow.MlflowClient.get_registered_model

    def lying(self, name):
        model = real(self, name)
        model._name = "it's"
        return model

    monkeypatch.setattr(mlflow.MlflowClient, "get_registered_model", lying)
    with pytest.raises(modelvault.RemoteError, match="was given \"it's\""):
        vault.import_(registry, name="churn")
    assert vault.models() == []


@pytest.mark.parametrize("source", ["{home}/.ssh", "{registry}/%2E%2E/home/.ssh"])
def test_artifacts_outside_the_registrys_folder_are_not_read(vault, tmp_path, source):
    """Hostile case: a stranger's registry whose version names a folder elsewhere on
    this machine (~/.ssh, say) as its source, plainly or climbing out with %2E%2E
    (which MLflow unquotes before copying): refused, nothing of it copied."""
    registry = tmp_path / "project"
    registry.mkdir()
    elsewhere = tmp_path / "home" / ".ssh"
    elsewhere.mkdir(parents=True)
    (elsewhere / "id_ed25519").write_text("PRIVATE KEY")
    uri = f"sqlite:///{registry / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    _version(client, registry, "m", 1)
    client.create_model_version("m", "file://" + source.format(home=tmp_path / "home",
                                                               registry=registry))
    with pytest.raises(modelvault.VaultError, match="outside .*project, the folder the "
                                                    "registry lies in"):
        vault.import_(f"mlflow:{uri}")
    assert [v.metadata["mlflow_version"] for v in vault.versions("m")] == [1]
    assert all(b"PRIVATE KEY" not in content for content in vault.load("m:1").values())


def test_a_file_stores_artifacts_are_read_only_from_inside_it(vault, tmp_path, monkeypatch):
    """Hostile case: a stranger's file store unpacked at ~/mlruns, a version naming
    ~/.ssh: MLflow keeps a file store's artifacts inside it, so the store's folder, not
    the one it lies in (the home folder), bounds what is read."""
    store = tmp_path / "mlruns"
    elsewhere = tmp_path / ".ssh"
    elsewhere.mkdir()
    (elsewhere / "id_ed25519").write_text("PRIVATE KEY")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    client = mlflow.MlflowClient(store.as_uri(), store.as_uri())
    client.create_registered_model("m")
    _version(client, store, "m", 1)
    client.create_model_version("m", elsewhere.as_uri())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(modelvault.VaultError, match="outside .*mlruns"):
        vault.import_(f"mlflow:{store}")
    assert [v.metadata["mlflow_version"] for v in vault.versions("m")] == [1]
