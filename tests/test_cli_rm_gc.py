import json


def test_rm_version_then_gc_frees_space(run, vault_file):
    assert run("rm", vault_file, "team/weights:1").output.strip() == "deleted 1 version"
    result = run("gc", vault_file)
    assert result.exit_code == 0
    assert result.output.startswith("freed ") and not result.output.startswith("freed 0 B")
    names = [m["name"] for m in json.loads(run("ls", vault_file, "--json").output)]
    assert names == ["churn"]


def test_rm_whole_model_asks_first(run, vault_file):
    from click.testing import CliRunner

    from modelvault._cli import cli

    answered_no = CliRunner().invoke(cli, ["rm", str(vault_file), "churn"], input="n\n")
    assert answered_no.exit_code == 1
    assert "delete model churn and all 2 of its versions?" in answered_no.output
    assert run("log", vault_file, "churn").exit_code == 0
    assert run("rm", vault_file, "churn", "--yes").output.strip() == "deleted 2 versions"
    result = run("log", vault_file, "churn")
    assert result.exit_code == 1


def test_write_commands_do_not_create_a_mistyped_vault(run, tmp_path):
    for args in (["rm", "churn:1"], ["alias", "churn:1", "prod"], ["gc"], ["tag", "m:1", "a=b"]):
        result = run(args[0], tmp_path / "typo.vault", *args[1:])
        assert result.exit_code == 1 and "no such vault" in result.output
    assert list(tmp_path.iterdir()) == []


def test_rm_unknown(run, vault_file):
    result = run("rm", vault_file, "churn:7")
    assert result.exit_code == 1
    assert "no version 7" in result.output
