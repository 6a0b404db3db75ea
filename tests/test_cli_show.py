import json


def test_show_by_alias(run, vault_file):
    result = run("show", vault_file, "churn@production")
    assert result.exit_code == 0
    assert "ref:         churn:1" in result.output
    assert "kind:        arrays" in result.output


def test_show_json_has_every_field(run, vault_file):
    record = json.loads(run("show", vault_file, "churn", "--json").output)
    assert record["version"] == 2 and record["name"] == "churn"
    assert record["metadata"] == {"auc": 0.91}
    assert record["tags"] == {"team": "growth"}
    assert len(record["digest"]) == 64
    assert record["environment"]["python"]


def test_show_bad_reference(run, vault_file):
    result = run("show", vault_file, "churn:x")
    assert result.exit_code == 1
    assert "invalid reference" in result.output
    result = run("show", vault_file, "churn:9")
    assert result.exit_code == 1
    assert "no version 9" in result.output and "1, 2" in result.output
