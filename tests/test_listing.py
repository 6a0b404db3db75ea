"""Listing many versions, and what importing and listing cost in imports."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np

import modelvault


def test_versions_of_every_model_in_name_then_number_order(vault):
    for name in ("b", "a", "c"):
        for i in range(3):
            vault.save(name, {"w": np.full(3, i)}, metadata={"i": i}, tags={"n": name})
    vault.alias("b:2", "prod")
    listed = vault.versions()
    assert [v.ref for v in listed] == [f"{n}:{i}" for n in "abc" for i in (1, 2, 3)]
    assert listed == [v for n in "abc" for v in vault.versions(n)]
    assert [v.metadata["i"] for v in listed] == [0, 1, 2] * 3
    assert {v.tags["n"] for v in listed} == {"a", "b", "c"}
    assert next(v for v in listed if v.ref == "b:2").aliases == ("prod",)
    assert all(v.signature == "trusted" for v in listed)
    assert vault.get("c:3") == listed[-1]


def test_records_survive_pickling_and_closing_the_vault(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.zeros(2)}, metadata={"auc": 0.5})
        record = vault.versions()[0]
    copy = pickle.loads(pickle.dumps(record))
    assert copy == record and copy.metadata == {"auc": 0.5} and copy.signature == "trusted"
    assert copy.environment["python"]


def test_import_and_listing_leave_numpy_unimported(vault_path):
    with modelvault.open(vault_path) as vault:
        vault.save("m", {"w": np.zeros(2)})
    script = textwrap.dedent(f"""
        import sys
        import modelvault
        with modelvault.open({str(vault_path)!r}) as vault:
            vault.models(), vault.versions(), vault.get("m").metadata
        print("numpy" not in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True"


def test_first_loads_in_several_threads_at_once(tmp_path):
    # numpy and the codecs are imported lazily; threads racing to touch them first
    # must not import them twice.
    script = textwrap.dedent(f"""
        import threading
        import modelvault
        paths = [{str(tmp_path)!r} + f"/{{i}}.vault" for i in range(4)]
        errors = []
        def work(path):
            try:
                with modelvault.open(path) as vault:
                    vault.save("m", {{"x": [1.5, 2]}})
                    assert vault.load("m") == {{"x": [1.5, 2]}}
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(p,)) for p in paths]
        for t in threads: t.start()
        for t in threads: t.join()
        print(errors)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_users_own_numpy_import_races_a_first_save(tmp_path):
    # Our lazy imports must never leave a half-imported module where the user's code,
    # in another thread, could import it.
    script = textwrap.dedent(f"""
        import threading
        import modelvault
        vault = modelvault.open({str(tmp_path / "v.vault")!r})
        barrier, errors = threading.Barrier(2), []
        def user():
            barrier.wait()
            try:
                import numpy
                numpy.zeros(3).sum()
            except BaseException as exc:
                errors.append(exc)
        thread = threading.Thread(target=user)
        thread.start()
        barrier.wait()
        vault.save("m", {{"w": [1, 2]}})
        thread.join()
        print(errors)
    """)
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == "[]"
