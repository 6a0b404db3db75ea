import json


def test_rm_version_then_gc_frees_space(run, vault_file):
    assert run("rm", vault_file, "team/weights:1").output.strip() == "deleted 1 version"
    result = run("gc", vault_file)
    assert result.exit_code == 0
    assert result.output.startswith("dropped 1 unused chunk (720.0 KB of model bytes); the "
                                     "file shrank by ")
    assert "shrank by 0 B" not in result.output
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


def test_gc_says_what_it_dropped_when_the_file_keeps_its_size(run, tmp_path):
    # One small chunk dropped from a pack still mostly in use: the file cannot shrink,
    # and the report says so instead of "freed 0 B".
    import numpy as np

    import modelvault

    path = tmp_path / "m.vault"
    with modelvault.open(path) as vault:
        vault.save("big", np.arange(100_000.0))
        vault.save("small", np.arange(1_000.0), parent=False)
        vault.delete("small")
    output = run("gc", path).output
    assert output.startswith("dropped 1 unused chunk (8.0 KB of model bytes); the file "
                             "shrank by 0 B"), output
    assert "still at least half in use" in output
    assert run("gc", path).output.startswith("dropped 0 unused chunks (0 B of model bytes)")
