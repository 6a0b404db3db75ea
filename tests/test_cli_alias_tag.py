import json


def test_alias_moves(run, vault_file):
    result = run("alias", vault_file, "churn:2", "production")
    assert result.exit_code == 0
    assert result.output.strip() == "churn@production -> churn:2"
    assert json.loads(run("show", vault_file, "churn@production", "--json").output)["version"] == 2


def test_unalias(run, vault_file):
    assert run("unalias", vault_file, "churn", "production").exit_code == 0
    result = run("show", vault_file, "churn@production")
    assert result.exit_code == 1
    assert "no alias 'production'" in result.output


def test_alias_rejects_bad_names(run, vault_file):
    result = run("alias", vault_file, "churn:1", "no spaces")
    assert result.exit_code == 1
    assert "invalid alias" in result.output


def test_tag_sets_and_removes(run, vault_file):
    assert run("tag", vault_file, "churn:1", "stage=prod", "owner=ana").exit_code == 0
    tags = json.loads(run("show", vault_file, "churn:1", "--json").output)["tags"]
    assert tags == {"owner": "ana", "stage": "prod"}
    assert run("tag", vault_file, "churn:1", "owner=").exit_code == 0
    tags = json.loads(run("show", vault_file, "churn:1", "--json").output)["tags"]
    assert tags == {"stage": "prod"}
