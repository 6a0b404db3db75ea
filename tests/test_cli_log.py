import json


def test_log_lists_versions_oldest_first(run, vault_file):
    result = run("log", vault_file, "churn")
    assert result.exit_code == 0
    rows = result.output.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    assert "production" in rows[0]
    assert "team=growth" in rows[1]


def test_log_json(run, vault_file):
    versions = json.loads(run("log", vault_file, "churn", "--json").output)
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["aliases"] == ["production"]
    assert versions[1]["metadata"] == {"auc": 0.91}


def test_log_unknown_model(run, vault_file):
    result = run("log", vault_file, "nope")
    assert result.exit_code == 1
    assert "no model named 'nope'" in result.output and "churn" in result.output
