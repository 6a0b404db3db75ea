import json


def test_ls_lists_models(run, vault_file):
    result = run("ls", vault_file)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["model", "versions", "latest", "updated", "(UTC)"]
    assert lines[2].split()[:3] == ["churn", "2", "2"]
    assert lines[3].split()[:3] == ["team/weights", "1", "1"]


def test_ls_json(run, vault_file):
    models = json.loads(run("ls", vault_file, "--json").output)
    assert [(m["name"], m["versions"], m["latest"]) for m in models] == [
        ("churn", 2, 2), ("team/weights", 1, 1)]


def test_ls_missing_vault_is_one_line_error(run, tmp_path):
    result = run("ls", tmp_path / "nope.vault")
    assert result.exit_code != 0
    expected = f"Error: {tmp_path / 'nope.vault'}: no such vault"
    assert result.output.strip().splitlines() == [expected]
    assert not (tmp_path / "nope.vault").exists()


def test_ls_not_a_vault(run, tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    result = run("ls", path)
    assert result.exit_code == 1
    assert "not a modelvault file" in result.output
    assert "Traceback" not in result.output
