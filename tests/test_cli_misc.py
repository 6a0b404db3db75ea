import subprocess
import sys

import pytest

from modelvault._cli import cli


def all_commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path,command", list(all_commands(cli)),
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_has_help(run, path, command):
    assert command.help, f"{' '.join(path)} has no help text"
    result = run(*path, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "modelvault", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("modelvault, version ")


def test_demo_runs_end_to_end(run, tmp_path):
    vault = tmp_path / "demo.vault"
    result = run("demo", vault)
    assert result.exit_code == 0, result.output
    assert "unchanged model: added 0 bytes" in result.output
    assert "verify: ok" in result.output
    assert run("verify", vault).exit_code == 0
    assert run("log", vault, "demo/cancer-forest").output.count("\n") == 6


def test_key_export_prints_a_key(run):
    result = run("key", "export")
    assert result.exit_code == 0
    assert result.output.startswith("modelvault-public-v2:")  # the public key, never the private


def test_trust_rejects_a_bad_key_file(run, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("hello")
    result = run("trust", bad)
    assert result.exit_code == 1
    assert "not a modelvault public key" in result.output
