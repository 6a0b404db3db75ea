"""Issue #21's two-process trial against a real S3 server: a trainer process saves,
pushes and moves @production N times; an app process follows @production through
pulls (``modelvault.follow`` with a remote) and serves predictions in a loop. Mid-way,
the S3 server is stopped and started again on the same port.

The server is moto's, threaded in this process, which only orchestrates: its objects
live in this process's memory, so they outlast the restart, as a real bucket's would;
the trainer and the app see connections refused meanwhile. Bounds are in the handle's
checks, never in seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections import Counter

import pytest

import modelvault
from modelvault import RemoteError

moto_server = pytest.importorskip("moto.server", reason="the S3 server (pip install moto)")
pytest.importorskip("obstore", reason="remotes need obstore")
boto3 = pytest.importorskip("boto3", reason="the bucket is made with boto3")

from test_follow import EVERY, PATIENCE, _report, _save, check_trial, serve  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
BUCKET = "follow-trial"
OUTAGE = 1.5  # seconds the server stays down


class _Server:
    """moto's S3 server on 127.0.0.1, stopped and started again on the same port."""

    def __init__(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0,
                                                      verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        self._server.stop()

    def up(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                                      verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


def _push(vault, url: str, endpoint: str, failures: Counter[str]) -> None:
    """Push until it works: while the server is down, each try fails with RemoteError."""
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            vault.push(url, endpoint_url=endpoint)
            return
        except RemoteError:
            failures["pushes that failed (server down)"] += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _trainer(path, url, endpoint, rounds: int, moved, served, progress, down) -> None:
    """Each round: a checkpoint that never goes to production, then one that does, both
    pushed, @production moved to the second; say so and wait until the app serves it.
    Half-way, the push starts only once the server is down (``down``)."""
    os.environ.update(CREDENTIALS)
    failures: Counter[str] = Counter()
    with modelvault.open(path) as vault:
        for round_ in range(1, rounds + 1):
            _save(vault, 2 * round_ - 1)
            production = 2 * round_
            _save(vault, production, aliases=["production"])
            if round_ == rounds // 2:
                progress.put("pushing")
                down.get(timeout=PATIENCE)
                failures["pushes while the server was down"] += 1
            _push(vault, url, endpoint, failures)
            moved.put(production)
            if served.get(timeout=PATIENCE) != production:
                break
    moved.put(None)
    progress.put(dict(failures))


def _app(path, url, endpoint, moved, served, results) -> None:
    os.environ.update(CREDENTIALS)
    with modelvault.follow(path, "churn@production", remote=url, endpoint_url=endpoint,
                           every=EVERY) as live:
        counts = serve(live, moved, served)
    results.put(dict(counts))


@pytest.fixture
def server(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = _Server()
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def test_an_app_following_a_trainer_through_s3_survives_a_server_restart(tmp_path, full,
                                                                          server):
    rounds = 100 if full else 20
    url = f"s3://{BUCKET}/models"
    trainer_path, app_path = tmp_path / "trainer.vault", tmp_path / "app.vault"
    with modelvault.open(trainer_path) as vault:
        _save(vault, 0, aliases=["production"])
        vault.push(url, endpoint_url=server.endpoint)
    # app.vault does not exist: follow clones churn@production into it.
    context = multiprocessing.get_context("spawn")
    moved, served, progress, results, down = (context.Queue() for _ in range(5))
    trainer = context.Process(target=_trainer, args=(
        trainer_path, url, server.endpoint, rounds, moved, served, progress, down))
    app = context.Process(target=_app, args=(app_path, url, server.endpoint, moved, served,
                                              results))
    app.start()
    trainer.start()
    counts: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + PATIENCE * 5
        while True:
            try:
                message = progress.get(timeout=1.0)
            except queue.Empty:
                failed = [p for p in (trainer, app) if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    pytest.fail(f"the trial stopped: trainer exit {trainer.exitcode}, app "
                                f"exit {app.exitcode} (their tracebacks are in the output)")
                continue
            if isinstance(message, dict):  # the trainer's last word: its failures
                counts.update(message)
                break
            if message == "pushing":  # the trainer's push, and the app's pulls, meet
                server.down()        # a server that is down (obstore retries a while)
                down.put(True)
                time.sleep(OUTAGE)
                server.up()
                counts["server restarts"] += 1
        counts.update(results.get(timeout=PATIENCE * 5))
    finally:
        for process in (trainer, app):
            process.join(PATIENCE)
            if process.is_alive():
                process.kill()
    _report("app following a trainer through S3, server restarted mid-way", rounds, counts)
    check_trial(counts, rounds)
    assert trainer.exitcode == 0 and app.exitcode == 0
    assert counts["server restarts"] == 1 and counts["pushes while the server was down"] == 1
    # Nothing was lost: every version the trainer saved is on the remote, and the app's
    # vault holds whole every version it served.
    remote = {v.ref for v in modelvault.Remote(url, endpoint_url=server.endpoint).versions()}
    assert remote == {f"churn:{n}" for n in range(1, 2 * rounds + 2)}
    with modelvault.open(app_path) as vault:
        assert vault.verify() == []
        assert vault.get("churn@production").metadata["seq"] == 2 * rounds
        assert {v.metadata["seq"] for v in vault.versions()} <= {0, *range(2, 2 * rounds + 1, 2)}


def test_the_app_serves_while_the_server_is_down(tmp_path, server):
    """The server stopped: the handle's checks fail (RemoteError, in ``error``), the
    model it had keeps serving, and once the server is back a move is served."""
    url = f"s3://{BUCKET}/down"
    churn = tmp_path / "churn.vault"
    with modelvault.open(churn) as vault:
        _save(vault, 0, aliases=["production"])
        vault.push(url, endpoint_url=server.endpoint)
    with modelvault.follow(tmp_path / "app.vault", "churn@production", remote=url,
                           endpoint_url=server.endpoint, every=EVERY) as live:
        server.down()
        try:
            start = live.checks
            deadline = time.monotonic() + PATIENCE
            while live.checks < start + 2 and time.monotonic() < deadline:
                time.sleep(EVERY)
            assert isinstance(live.error, RemoteError)
            assert live.model["a0"][0] == 0 and live.version.ref == "churn:1"
        finally:
            server.up()
        with modelvault.open(churn) as vault:
            _save(vault, 2, aliases=["production"])
            vault.push(url, endpoint_url=server.endpoint)
        live.refresh()  # or the thread's own check got there first
        assert live.version.metadata["seq"] == 2 and live.error is None

