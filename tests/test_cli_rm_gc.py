import json


def test_rm_version_then_gc_frees_space(run, vault_file):
    assert run("rm", vault_file, "team/weights:1").output.strip() == "deleted 1 version"
    result = run("gc", vault_file)
    assert result.exit_code == 0
    assert result.output.startswith("freed ") and not result.output.startswith("freed 0 B")
    names = [m["name"] for m in json.loads(run("ls", vault_file, "--json").output)]
    assert names == ["churn"]


def test_rm_whole_model(run, vault_file):
    assert run("rm", vault_file, "churn").output.strip() == "deleted 2 versions"
    result = run("log", vault_file, "churn")
    assert result.exit_code == 1


def test_rm_unknown(run, vault_file):
    result = run("rm", vault_file, "churn:7")
    assert result.exit_code == 1
    assert "no version 7" in result.output
