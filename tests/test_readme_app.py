"""The README's "Ship it with an app" flow, run as written against moto's S3 server.

The section's shell block starts a server and sets the environment; here the server is
moto's threaded one on a free port, and the environment is the block's own `export`
line with that port. The Python blocks run in order: the team's in one namespace, the
app's in another, as two programs would, in a scratch folder. Each `print` must print
what its comment says.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("obstore", reason="remotes need obstore")
pytest.importorskip("sklearn", reason="the section trains a scikit-learn model")
moto_server = pytest.importorskip("moto.server", reason="the S3 server (pip install moto)")
boto3 = pytest.importorskip("boto3", reason="the section makes its bucket with boto3")

README = Path(__file__).resolve().parent.parent / "README.md"


def section_blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Ship it with an app", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def _expected_prints(code: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in code.splitlines()
            if line.startswith("print(") and "#" in line]


def test_the_ship_it_with_an_app_flow_runs_as_written(tmp_path, monkeypatch):
    blocks = section_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "python", "python", "python", "python"]
    shell = blocks[0][1]
    export = next(line for line in shell.splitlines() if line.startswith("export "))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server.get_host_and_port()[1]
        for assignment in shlex.split(export)[1:]:
            name, value = assignment.split("=", 1)
            monkeypatch.setenv(name, re.sub(r":\d+$", f":{port}", value))
        bucket = re.search(r"Bucket='([^']+)'", shell).group(1)
        boto3.client("s3").create_bucket(Bucket=bucket)
        monkeypatch.chdir(tmp_path)
        team: dict = {}
        app: dict = {}
        try:
            for (_, code), namespace in zip(blocks[1:], (team, app, team, app), strict=True):
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
                assert printed.getvalue().splitlines() == _expected_prints(code), code
        finally:
            if "live" in app:
                app["live"].close()
    finally:
        server.stop()
    assert {p.name for p in tmp_path.iterdir()} >= {"models.vault", "app.vault"}
