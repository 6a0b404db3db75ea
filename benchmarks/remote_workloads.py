"""W9: remotes, against an S3 server (moto's) started on 127.0.0.1 for the run.

The server runs in a process of its own, so it does not share this process's GIL; the
baseline is obstore itself, putting and getting the same bytes as one object on the
same server. moto keeps objects in memory (about 1 GiB of RSS per GiB stored).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import modelvault
from modelvault import _remote

from . import models
from .report import MB, Section, Target, ratio
from .timing import Op, measure, median
from .workloads import Context, fresh_save, open_vault

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


class _Moto:
    """moto's S3 server in a child process on a free port of 127.0.0.1."""

    def __enter__(self) -> _Moto:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        os.environ.update(CREDENTIALS)
        import boto3

        self._client = boto3.client("s3", endpoint_url=self.endpoint)
        self._count = 0
        return self

    def bucket(self) -> str:
        self._count += 1
        name = f"bench{self._count}"
        self._client.create_bucket(Bucket=name)
        return f"s3://{name}/models"

    def drop(self, url: str) -> None:
        """Empty and delete a bucket: moto holds objects in memory."""
        name = url.split("/")[2]
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=name, Delete={"Objects": keys})
        self._client.delete_bucket(Bucket=name)

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait(10)


class _Counted:
    """Bytes a remote's store sent and received, counted around a block."""

    def __enter__(self) -> _Counted:
        self.sent = self.received = 0
        self._saved = (_remote.Store.put, _remote.Store.get, _remote.Store.ranges)
        put, get, ranges = self._saved
        counter = self

        def counted_put(store: Any, key: str, data: bytes | list[bytes], *,
                        create: bool = False) -> bool:
            counter.sent += len(data) if isinstance(data, bytes) else sum(map(len, data))
            return put(store, key, data, create=create)

        def counted_get(store: Any, key: str, kind: str) -> bytes | None:
            data = get(store, key, kind)
            counter.received += len(data or b"")
            return data

        def counted_ranges(store: Any, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
            got = ranges(store, key, spans)
            counter.received += sum(map(len, got))
            return got

        _remote.Store.put, _remote.Store.get, _remote.Store.ranges = (
            counted_put, counted_get, counted_ranges)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        _remote.Store.put, _remote.Store.get, _remote.Store.ranges = self._saved


def w9_remote(ctx: Context) -> Section:
    """Remotes: push, pull and clone against an S3 server (moto) on 127.0.0.1."""
    section = Section("W9", "push / pull / clone through an S3 server (moto, its own process "
                            "on 127.0.0.1), against obstore put / get of the same bytes")
    if not (ctx.peer(section, "obstore", "W9") and ctx.peer(section, "moto", "W9")):
        return section
    import obstore
    from obstore.store import from_url

    s = ctx.sizes
    with _Moto() as moto:
        endpoint = moto.endpoint
        # push and pull of the W2 weights, and obstore moving the same bytes
        weights = models.bert_fp32(s.bert)
        raw = models.nbytes(weights)
        work = ctx.workdir("w9")
        vault = work / "w2.vault"
        fresh_save(vault, "bert", weights)
        blob = b"".join(np.ascontiguousarray(w).tobytes() for w in weights.values())
        del weights
        urls: dict[str, str] = {}

        def fresh(name: str) -> None:
            if name in urls:
                moto.drop(urls[name])
            urls[name] = moto.bucket()

        def push() -> None:
            with open_vault(vault) as v:
                v.push(urls["push"], endpoint_url=endpoint)

        def put() -> None:
            store = from_url(urls["put"], client_options={"allow_http": True},
                             endpoint=endpoint)
            obstore.put(store, "weights.bin", blob)

        fresh("pull")
        with open_vault(vault) as v:
            v.push(urls["pull"], endpoint_url=endpoint)
        store = from_url(urls["pull"], client_options={"allow_http": True}, endpoint=endpoint)
        obstore.put(store, "weights.bin", blob)
        clone_path = work / "clone.vault"

        def clone_setup() -> None:
            clone_path.unlink(missing_ok=True)

        def clone() -> None:
            modelvault.clone(urls["pull"], clone_path, endpoint_url=endpoint).close()

        def get() -> None:
            obstore.get(store, "weights.bin").bytes()

        ops = {"push": Op(push, setup=lambda: fresh("push")),
               "put": Op(put, setup=lambda: fresh("put")),
               "clone": Op(clone, setup=clone_setup), "get": Op(get)}
        print(f"  W9: push / clone of {raw / MB:.0f} MB, {ctx.runs} runs each", flush=True)
        t = {name: median(runs) for name, runs in measure(ops, ctx.runs).items()}
        for name in ("push", "put", "clone", "get"):
            section.add(f"W2 fp32 ({raw / MB:.0f} MB): {name}", t[name], "s")
        section.add("push / obstore put of the same bytes, throughput", ratio(t["put"], t["push"]),
                    "x", target=Target(">=", 0.8))
        section.add("pull (clone) / obstore get of the same bytes, throughput",
                    ratio(t["get"], t["clone"]), "x", target=Target(">=", 0.8))
        for url in urls.values():
            moto.drop(url)
        del blob, store

        _fine_tune_bytes(ctx, section, moto, work)
        _forest_clone(ctx, section, moto, work)
        _ls(ctx, section, moto, work)
    return section


def _fine_tune_bytes(ctx: Context, section: Section, moto: _Moto, work: Path) -> None:
    shape = ctx.sizes.minilm
    base = models.bert_fp32(shape)
    print("  W9: fine-tunes pushed after their base", flush=True)
    rng = np.random.default_rng(2)
    nudged = {k: w + models.normal(rng, w.shape, std=0.00002) for k, w in base.items()}
    last = (f"encoder.layer.{shape.layers - 1}.", "pooler.")
    changed = {k: models.normal(rng, w.shape) for k, w in base.items() if k.startswith(last)}
    for label, version_two, target, against in (
            ("full fine-tune (all weights + 0.1 % of their std)", nudged, 0.55, "alone"),
            ("last layer + pooler retrained", {**base, **changed}, 1.05, "changed")):
        url, alone_url = moto.bucket(), moto.bucket()
        path = work / "ft.vault"
        path.unlink(missing_ok=True)
        with open_vault(path) as v:
            v.save("ft", base)
            v.push(url, endpoint_url=moto.endpoint)
            v.save("ft", version_two)
            with _Counted() as counted:
                v.push(url, endpoint_url=moto.endpoint)
            uploaded = counted.sent
        alone_path = work / "alone.vault"
        alone_path.unlink(missing_ok=True)
        with open_vault(alone_path) as v:
            v.save("ft", version_two if against == "alone" else changed)
            with _Counted() as counted:
                v.push(alone_url, endpoint_url=moto.endpoint)
            alone = counted.sent
        what = "its standalone push" if against == "alone" else "the changed tensors pushed alone"
        section.add(f"{label}: bytes uploaded after its base", uploaded, "B")
        section.add(f"{label}: uploaded / {what}", uploaded / alone, "x",
                    target=Target("<=", target))
        moto.drop(url)
        moto.drop(alone_url)


def _forest_clone(ctx: Context, section: Section, moto: _Moto, work: Path) -> None:
    import copy

    s = ctx.sizes
    X, y = models.classification_data(s)
    forest = copy.deepcopy(models.forest(s))
    forest.set_params(warm_start=True)
    path = work / "series.vault"
    path.unlink(missing_ok=True)
    print(f"  W9: clone of {s.forest_versions} warm-started forests", flush=True)
    with open_vault(path) as v:
        for i in range(s.forest_versions):
            if i:
                forest.n_estimators += 5
                forest.fit(X, y)
            v.save("forest", forest)
    url = moto.bucket()
    with open_vault(path) as v:
        v.push(url, endpoint_url=moto.endpoint)
    target = work / "series-clone.vault"
    target.unlink(missing_ok=True)
    with _Counted() as counted:
        modelvault.clone(url, target, endpoint_url=moto.endpoint).close()
    size = path.stat().st_size
    section.add(f"forest series ({s.forest_versions} versions): vault file", size, "B")
    section.add("forest series: bytes downloaded by clone", counted.received, "B")
    section.add("forest series: clone download / vault file", counted.received / size, "x",
                target=Target("<=", 1.2))
    moto.drop(url)


def _ls(ctx: Context, section: Section, moto: _Moto, work: Path) -> None:
    count = 50 if ctx.quick else 1000
    url = moto.bucket()
    path = work / "many.vault"
    path.unlink(missing_ok=True)
    print(f"  W9: {count} versions pushed in {count // 5} pushes, then remote ls", flush=True)
    with open_vault(path) as v:
        for i in range(count):
            v.save(f"m{i % 20:02d}", {"w": np.full(10, float(i))})
            if i % 5 == 4:
                v.push(url, endpoint_url=moto.endpoint)
    ops = {"ls": Op(lambda: modelvault.Remote(url, endpoint_url=moto.endpoint).versions())}
    runs = measure(ops, 5)["ls"]
    section.add(f"remote ls of {count} versions ({count // 5} log entries)", median(runs), "s",
                target=Target("<=", 1.0), runs=runs)
    moto.drop(url)
    shutil.rmtree(work, ignore_errors=True)
