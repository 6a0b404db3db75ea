"""Hostile files and buckets against every command (issue #18, item 3).

A vault file and a shared bucket are inputs from other people. For each attack of the
issue (built by tests/hostile.py) and each command that reads such an input, a child
process runs the command, and the test checks the promise:

* a typed error (the CLI: exit 1 and one ``Error:`` line caused by a VaultError; the
  library: a VaultError) or a right answer (checked where a wrong one is possible: a
  pulled or merged vault verifies and holds the owner's digests, `env` prints only
  ``name==version`` lines, a forged signature is not called trusted, `verify` does not
  say "ok" of a damaged file); an attack's ``refuse`` commands must be refused;
* nothing written outside the command's target: the child's working folder, its
  HOME, XDG folders, TMPDIR, modelvault home and a canary folder the attacks aim at are
  compared before and after (extract's out folder, a merge's or pull's target vault and
  the like are the only new paths allowed; a refused extract leaves its folder empty);
* peak memory under ``BOUND_MB``: the child reads its own VmHWM at exit (a test run
  that imported torch would lend its peak to ru_maxrss);
* a time bound: the harness kills a child after ``TIMEOUT`` seconds, and that fails.
  It detects hangs; it measures nothing (no test here asserts a time).

`pytest` runs a representative set (every attack against open, ls and verify, and the
commands it is aimed at); `pytest -m sweep --full` runs every attack against every
command that reads its kind of input. The property tests at the end draw many
variants of four attacks (file names, pip options, nesting depths, log events) and run
them in this process, cheaply.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import hostile
import pytest
from helpers import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelvault

_SOURCE = str(Path(modelvault.__file__).resolve().parent.parent)
BOUND_MB = 1024  # peak resident memory of a child, whatever the input
TIMEOUT = 60  # seconds before a child counts as hung (a healthy one takes under 2 s)

# -- the child ---------------------------------------------------------------------------

# Runs one command in this process and, at exit, writes what happened and this process's
# own peak resident memory (VmHWM) as JSON to $HOSTILE_REPORT. argv: "cli" and the
# command's arguments, or "lib", the code to run and its globals as JSON.
_CHILD = textwrap.dedent("""
    import atexit, json, os, sys

    report = {}

    def write():
        with open("/proc/self/status") as f:
            report["peak_kb"] = next(int(line.split()[1]) for line in f
                                     if line.startswith("VmHWM"))
        with open(os.environ["HOSTILE_REPORT"], "w") as out:
            json.dump(report, out, default=repr)

    atexit.register(write)
    import modelvault

    if sys.argv[1] == "cli":
        import click
        from modelvault._cli import cli

        try:
            code = cli.main(sys.argv[2:], prog_name="modelvault", standalone_mode=False)
        except click.ClickException as exc:
            # The CLI turns every exception into one line; its cause says whether it
            # was one of ours.
            cause = exc.__cause__
            report["cause"] = None if cause is None else type(cause).__name__
            report["typed"] = cause is None or isinstance(cause, modelvault.VaultError)
            exc.show()
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def wrong(why):
        report["outcome"] = "wrong"
        report.setdefault("why", []).append(str(why)[:500])

    def problems(vault):
        # What verify reports, by the id of the version it names.
        found = {}
        for problem in vault.verify():
            try:
                key = vault.get(f"{problem.model}:{problem.version}").id
            except (modelvault.VaultError, ValueError):
                key = None
            found.setdefault(key, []).append(str(problem))
        return found

    def check(vault, honest, source=None):
        # A vault a command wrote holds only what its owner saved, and verify finds
        # nothing in it but what it finds in the vault it was copied from (a version a
        # merge or export carries over with its flaw stays flagged, so not silently).
        known = {}
        if source is not None:
            try:
                with modelvault.open(source, readonly=True) as v:
                    known = problems(v)
            except modelvault.VaultError:
                known = None  # the source cannot be checked itself: nothing to hold to
        new = {k: v for k, v in problems(vault).items() if k not in known} if (
            known is not None) else {}
        if new:
            wrong(f"verify: {list(new.values())[:3]}")
        for mv in vault.versions():
            if mv.id in honest and mv.digest != honest[mv.id]:
                wrong(f"{mv.ref} ({mv.id}) is not the version its owner saved")

    names = {"modelvault": modelvault, "report": report, "wrong": wrong, "check": check,
             **json.loads(sys.argv[3])}
    try:
        exec(compile(sys.argv[2], "<command>", "exec"), names)
    except modelvault.VaultError as exc:
        report["outcome"] = "typed"
        report["error"] = f"{type(exc).__name__}: {exc}"[:500]
    except BaseException as exc:
        report["outcome"] = "foreign"
        report["error"] = f"{type(exc).__name__}: {exc}"[:500]
        raise
    else:
        report.setdefault("outcome", "ok")
""")

Run = collections.namedtuple("Run", "returncode stdout stderr report hung")


def _child(argv, place, report, timeout=TIMEOUT):
    """Run the child with ``argv`` in ``place.work``; a Run (hung: killed at ``timeout``
    seconds)."""
    home = place.keys.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [_SOURCE, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / ".local"),
        "XDG_STATE_HOME": str(home / ".state"), "TMPDIR": str(home / "tmp"),
        "MODELVAULT_HOME": str(place.keys), "HOSTILE_REPORT": str(report),
        "PYTHONDONTWRITEBYTECODE": "1"}

    def limits():
        # A guard for the machine, not the test's bound: an allocation past it fails in
        # the child (and so the test) instead of taking the memory of other processes.
        # It lies above what the bombs get on a usual machine (2.1 and 3.1 GB),
        # so that they meet the bound, not a MemoryError a command might wrap as ours.
        data = 4 * BOUND_MB << 20
        resource.setrlimit(resource.RLIMIT_DATA, (data, data))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    out, err = report.with_suffix(".out"), report.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, argv)],
                                   cwd=place.work, env=env, stdout=stdout, stderr=stderr,
                                   preexec_fn=limits, start_new_session=True)
        try:
            process.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            hung = True
    found = json.loads(report.read_text()) if report.exists() else {}
    return Run(process.returncode, out.read_text(errors="replace"),
               err.read_text(errors="replace"), found, hung)


# -- the commands ------------------------------------------------------------------------

_OPEN = """
with modelvault.open(V, create=False) as v:
    v.models(), v.stats()
    for mv in v.versions():
        (mv.metadata, mv.environment, mv.source, mv.parent, mv.tags, mv.signer)
        report.setdefault("signatures", {})[mv.ref] = mv.signature
        v.lineage(mv)
"""

_BROWSE = """
import asyncio
from modelvault import _browse

import html
import os
import re
from urllib.parse import quote

# The metrics pages import matplotlib, which keeps its font cache in its own folder (in
# HOME by default): here one the trial may write.
os.environ["MPLCONFIGDIR"] = WORK + "/matplotlib"
with modelvault.open(V, create=False) as v:  # as `modelvault browse` does first
    models = [m.name for m in v.models()][:3]
name = _browse.database_name(__import__("pathlib").Path(V))
pages = ["/", f"/{name}"] + [f"/{name}/{t}" for t in (
    "models", "versions", "parts", "chunks", "part_chunks", "packs", "aliases", "tags",
    "environments", "packages", "lineage", "model_versions", "model_summary",
    "pack_sizes")] + [f"/{name}/model_versions.json", f"/{name}/storage_per_model",
                      f"/{name}/not_signed_by_a_trusted_key",
                      f"/{name}/versions_by_package?package=numpy&version=1",
                      "/-/metrics"] + [f"/-/metrics/{quote(m, safe='')}" for m in models]
ds = _browse.datasette(V)

async def fetch():
    await ds.invoke_startup()
    answers = [(page, await ds.client.get(page)) for page in pages]
    charts = [html.unescape(src) for _, answer in answers
              for src in re.findall(r'<img src="([^"]*)"', answer.text)]
    answers += [(chart, await ds.client.get(chart)) for chart in charts]
    return [(page, answer.status_code) for page, answer in answers]

for page, status in asyncio.run(fetch()):
    if status >= 500:
        wrong(f"{page}: HTTP {status}")
"""

_PUSH = """
try:
    with modelvault.open(OWNER, create=False) as v:
        v.push(URL)
except modelvault.VaultError as exc:  # refused: the remote stays as it was
    report["outcome"] = "typed"
    report["error"] = f"{type(exc).__name__}: {exc}"[:500]
else:  # pushed: the owner's versions, as a colleague then clones them, are the owner's
    try:
        there = {r.id: f"{r.name}:{r.version}" for r in modelvault.Remote(URL).versions()}
        if set(HONEST) - set(there):
            wrong(f"the push reported success; the remote lacks {set(HONEST) - set(there)}")
        with modelvault.clone(URL, WORK + "/check.vault",
                              [there[u] for u in HONEST if u in there]) as c:
            check(c, HONEST)
    except modelvault.VaultError as exc:
        wrong(f"the push reported success; a clone then fails: {type(exc).__name__}: {exc}")
"""

# name -> (cli or lib, the arguments or the code, vault or bucket, new paths it may make)
COMMANDS = {
    "open": ("lib", _OPEN, "vault", ()),
    "ls": ("cli", ["ls", "{V}"], "vault", ()),
    "show": ("cli", ["show", "{V}", "{REF}"], "vault", ()),
    "log": ("cli", ["log", "{V}", "m"], "vault", ()),
    "verify": ("cli", ["verify", "{V}"], "vault", ()),
    "verify lib": ("lib", "with modelvault.open(V, create=False) as v:\n"
                   "    report['outcome'] = 'reported' if v.verify() else 'ok'", "vault", ()),
    "diff": ("lib", "with modelvault.open(V, create=False) as v:\n    v.diff(OTHER, REF)",
             "vault", ()),
    "cli diff": ("cli", ["diff", "{V}", "{OTHER}", "{REF}"], "vault", ()),
    "selftest": ("cli", ["selftest", "{V}"], "vault", ()),
    "selftest lib": ("lib", "with modelvault.open(V, create=False) as v:\n"
                     "    for mv in v.versions():\n        v.selftest(mv)", "vault", ()),
    "env": ("cli", ["env", "{V}", "{REF}"], "vault", ()),
    "extract": ("cli", ["get", "{V}", "{REF}", "-o", "out"], "vault", ("out",)),
    "load": ("lib", "with modelvault.open(V, create=False) as v:\n    v.load(REF)", "vault",
             ()),
    "merge": ("lib", "with modelvault.open(WORK + '/target.vault') as t:\n"
              "    t.merge(V)\n    check(t, HONEST, V)", "vault", ("target.vault",)),
    "cli merge": ("cli", ["merge", "{WORK}/empty.vault", "{V}"], "vault", ("empty.vault",)),
    "export": ("lib", "with modelvault.open(V, create=False) as v:\n"
               "    v.export(WORK + '/export.vault')\n"
               "with modelvault.open(WORK + '/export.vault', readonly=True) as c:\n"
               "    check(c, HONEST, V)", "vault", ("export.vault",)),
    "cli export": ("cli", ["export", "{V}", "{WORK}/export.vault"], "vault",
                   ("export.vault",)),
    "browse": ("lib", _BROWSE, "vault", ("matplotlib",)),
    "remote ls": ("cli", ["remote", "ls", "{URL}"], "bucket", ("home/keys/cache",)),
    # Twice: the second pull meets the versions the first brought (and their labels).
    "pull": ("lib", "with modelvault.open(WORK + '/target.vault') as t:\n"
             "    t.pull(URL)\n    t.pull(URL)\n    check(t, HONEST)", "bucket",
             ("target.vault", "home/keys/cache")),
    "cli pull": ("cli", ["pull", "{WORK}/empty.vault", "{URL}"], "bucket",
                 ("empty.vault", "home/keys/cache")),
    "clone": ("lib", "with modelvault.clone(URL, WORK + '/clone.vault') as c:\n"
              "    check(c, HONEST)", "bucket", ("clone.vault", "home/keys/cache")),
    "cli clone": ("cli", ["clone", "{URL}", "{WORK}/clone.vault"], "bucket",
                  ("clone.vault", "home/keys/cache")),
    "push": ("lib", _PUSH, "bucket", ("bucket", "owner.vault", "check.vault",
                                      "home/keys/cache")),
}

# What `pytest` runs: every attack against open, ls and verify (remote ls, pull and clone
# for a bucket), and the commands it is aimed at. `pytest -m sweep --full` runs every
# command of its kind against every attack.
_FILE_BASICS = ("open", "ls", "verify")
_BUCKET_BASICS = ("remote ls", "pull", "clone")
AIMED = {
    "selftest tofile": ("selftest",),
    "name x/D:/Windows/Temp/evil.dll": ("extract",),
    "name D:evil.txt": ("extract",),
    "name ..": ("extract",),
    "name absolute": ("extract",),
    "name backslash": ("extract",),
    "names a and a/b": ("extract",),
    "name of 300 characters": ("extract",),
    "environment newlines": ("env",),
    "chunk x100000": ("load",),
    "chunk x3000": ("load", "extract"),
    "chunk x3000 files": ("extract",),
    "params dtype": ("load",),
    "subarray dtype": ("load",),
    "sqlite_stat1": (),
    "deep layout": ("load", "diff", "merge"),
    "deep metadata": ("show", "diff", "browse"),
    "deep environment": ("env", "diff"),
    "deep lineage": ("show", "log"),
    "duplicate keys": ("show",),
    "stride 0": ("load", "extract"),
    "truncated": ("load", "export"),
    "bucket: 6 GiB log entry": (),
    "bucket: number 2**64": (),
    "bucket: created_at 5": (),
    "bucket: alias latest": (),
    "bucket: pack ../../x": ("push",),
    "bucket: pre-created manifest": ("push",),
    "bucket: bogus pack index": ("push",),
    "bucket: chunk x3000 manifest": (),
    "bucket: named pipe": ("push",),
}
assert AIMED.keys() == hostile.ATTACKS.keys()


def _pairs(full):
    pairs = []
    for attack in hostile.ATTACKS:
        kind = "bucket" if attack.startswith("bucket:") else "vault"
        every = [c for c, spec in COMMANDS.items() if spec[2] == kind]
        basics = _BUCKET_BASICS if kind == "bucket" else _FILE_BASICS
        chosen = every if full else [*basics, *AIMED[attack]]
        pairs += [(attack, command) for command in every if command in chosen]
    return pairs


def pytest_generate_tests(metafunc):
    if {"attack", "command"} <= set(metafunc.fixturenames):
        pairs = _pairs(metafunc.config.getoption("--full"))
        metafunc.parametrize(("attack", "command"), pairs,
                             ids=[f"{a}-{c}" for a, c in pairs])


# -- checking a run ----------------------------------------------------------------------

_REQUIREMENT = re.compile(r"#[^\n]*|[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")


def _right_answer(command, outcome, run, made):
    """Why a command's answer (``outcome`` 'ok' or 'reported') is wrong for what the
    attack made, or None."""
    if command == "env" and not all(_REQUIREMENT.fullmatch(line)
                                    for line in run.stdout.splitlines()):
        return f"env printed a line pip would take for an option: {run.stdout[-300:]!r}"
    if made.forged and command == "show" and re.search(r"^signature:\s+trusted",
                                                       run.stdout, re.M):
        return "show calls a version edited since it was signed 'trusted'"
    if made.forged and run.report.get("signatures", {}).get(made.ref) == "trusted":
        return "a version edited since it was signed is 'trusted'"
    if (made.damaged or made.forged) and outcome == "ok" and command.startswith("verify"):
        return "verify found nothing wrong"
    return None


def _outcome(command, run, made):
    """'ok', 'reported' (verify/selftest listed problems), 'typed' or a failure text."""
    how = COMMANDS[command][0]
    if run.hung:
        return f"no answer in {TIMEOUT} s: killed"
    # A warning the CLI prints on a line of its own (a file cut short, opened read-only)
    # goes with any outcome.
    run = run._replace(stderr="".join(line for line in run.stderr.splitlines(True)
                                      if not line.startswith("Warning: ")))
    if how == "cli":
        if run.returncode == 0:
            outcome = "ok"
        elif (run.returncode == 1 and not run.stderr.strip() and run.stdout.strip()
              and command in ("verify", "selftest")):
            outcome = "reported"
        elif one_line_error(run) and run.report.get("typed"):
            outcome = "typed"
        elif one_line_error(run):
            return f"a one-line error caused by {run.report.get('cause')}: {run.stderr[:300]}"
        else:
            return f"exit {run.returncode}: {run.stderr[-1500:]}"
    else:
        outcome = run.report.get("outcome")
        if outcome == "wrong":
            return f"a wrong result: {run.report.get('why')}"
        if outcome not in ("ok", "typed", "reported") or run.returncode != 0:
            return (f"exit {run.returncode}, {run.report.get('error')}: "
                    f"{run.stderr[-1500:]}")
    if command in made.refuse and outcome != "typed":
        return f"{outcome}: must be refused (stdout {run.stdout[-300:]!r})"
    if outcome in ("ok", "reported"):
        return _right_answer(command, outcome, run, made) or outcome
    return outcome


def _tree(root):
    """Every path under ``root``: (kind, size, mtime) of files, ("dir",) of folders."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            key = str(path.relative_to(root))
            found[key] = ("dir",) if path.is_dir() and not path.is_symlink() else (
                "file", info.st_size, info.st_mtime_ns)
    return found


def _outside(before, after, allowed):
    """Paths made, changed or removed that are not under one of ``allowed``, nor one of
    the hidden files modelvault keeps beside a target (`.NAME.pull-<id>`, a partial
    clone), which are part of it."""
    def within(path, target):
        folder, name = os.path.split(target)
        beside, own = os.path.split(path)
        return (path == target or path.startswith(target + "/")
                or (beside == folder and own.startswith(".") and name in own))

    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(p for p in changed if not any(within(p, a) for a in allowed))


@pytest.fixture
def place(tmp_path):
    """A trial's folders: scratch/{work,canary,home/keys} and the attacker's, apart."""
    scratch = tmp_path / "scratch"
    made = hostile.Place(scratch / "work", scratch / "canary", scratch / "home" / "keys",
                         tmp_path / "attacker")
    for folder in (made.work, made.canary, made.keys, made.keys.parent / "tmp",
                   made.attacker):
        folder.mkdir(parents=True)
    (made.canary / "keep.txt").write_text("the canary")
    return made


def _make(attack, place):
    need = hostile.NEEDS.get(attack)
    if need is not None:
        pytest.importorskip(need, reason=f"the attack needs {need}")
    return hostile.ATTACKS[attack](place)


def _trial(made, command, place, tmp_path):
    """Run the command on what the attack made, in a child; returns (failures, outcome,
    the Run)."""
    how, what, _, allowed = COMMANDS[command]
    values = {"V": str(made.vault), "REF": made.ref, "OTHER": made.other, "URL": made.url,
              "OWNER": str(made.owner), "WORK": str(place.work), "HONEST": made.honest}
    if command in ("cli merge", "cli pull"):
        modelvault.open(place.work / "empty.vault").close()  # the command's target
    if how == "cli":
        argv = ["cli", *[a.format(**values) for a in what]]
    else:
        argv = ["lib", what, json.dumps(values)]
    scratch = place.work.parent
    before = _tree(scratch)
    run = _child(argv, place, tmp_path / "report.json")
    after = _tree(scratch)
    failures = []
    outcome = _outcome(command, run, made)
    if outcome not in ("ok", "reported", "typed"):
        failures.append(outcome)
    peak = run.report.get("peak_kb")
    if peak is None or peak > BOUND_MB << 10:
        failures.append(f"peak memory {peak and peak >> 10} MB (bound {BOUND_MB} MB)")
    escaped = _outside(before, after, [a if a.startswith("home/") else f"work/{a}"
                                       for a in allowed])
    if escaped:
        failures.append(f"written outside the target: {escaped[:10]}")
    out = place.work / "out"
    if command == "extract" and outcome == "typed" and out.exists() and any(out.iterdir()):
        failures.append(f"refused after writing {sorted(_tree(out))[:5]}")
    return failures, outcome, run


@pytest.mark.sweep
def test_a_hostile_input_gets_a_typed_error_or_a_right_answer(attack, command, place,
                                                              tmp_path):
    made = _make(attack, place)
    failures, outcome, run = _trial(made, command, place, tmp_path)
    print(f"{attack} / {command}: {outcome}; peak {run.report.get('peak_kb', 0) >> 10} MB")
    assert not failures, f"{attack} / {command}:\n" + "\n".join(failures)


@pytest.mark.parametrize("command", ["open", "ls", "show", "log", "verify", "diff",
                                     "selftest", "env", "extract", "load", "merge",
                                     "export", "browse"])
def test_the_harness_passes_an_honest_vault(command, place, tmp_path):
    """The checks themselves: an honest vault passes every one, with room to spare."""
    failures, outcome, run = _trial(_honest(place), command, place, tmp_path)
    assert not failures and outcome == "ok", (failures, outcome, run.stderr[-500:])
    assert run.report["peak_kb"] < (BOUND_MB << 10) // 2


def _honest(place):
    path = place.work / "hostile.vault"
    source = place.attacker / "files"
    source.mkdir()
    (source / "model.bin").write_bytes(b"bytes")
    with hostile.as_machine(place.keys), modelvault.open(path) as vault:
        vault.save_files("m", source)
        (source / "model.bin").write_bytes(b"other bytes")
        vault.save_files("m", source)
    return hostile.Hostile("honest", "m:2", "m:1", vault=path)


def test_the_harness_catches_a_write_outside_and_a_hang(place, tmp_path):
    """A child that writes into the canary folder, and one that sleeps past its time
    (here 1 s), both fail."""
    values = json.dumps({"CANARY": str(place.canary)})
    before = _tree(place.work.parent)
    _child(["lib", "open(CANARY + '/x', 'w').close()", values], place, tmp_path / "r1.json")
    assert _outside(before, _tree(place.work.parent), ["work/out"]) == ["canary/x"]
    run = _child(["lib", "import time; time.sleep(30)", "{}"], place, tmp_path / "r2.json",
                 timeout=1)
    assert run.hung


# -- property tests: many variants of one attack, in this process ------------------------


@contextlib.contextmanager
def _scratch():
    """A trial's folders for one hypothesis example, removed after it."""
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    made = hostile.Place(root / "work", root / "canary", root / "home" / "keys",
                         root / "attacker")
    for folder in (made.work, made.canary, made.keys, made.attacker):
        folder.mkdir(parents=True)
    try:
        yield made
    finally:
        shutil.rmtree(root)


def _answers_or_refuses(*reads):
    """Call each of ``reads``; a VaultError is a fine answer, any other exception fails."""
    for read in reads:
        with contextlib.suppress(modelvault.VaultError):
            read()


def _examples(full, ci):
    return settings(max_examples=ci * 10 if full else ci, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.sweep
def test_no_unsafe_file_name_is_extracted(full):
    @_examples(full, 25)
    @given(hostile.unsafe_names())
    def check(name):
        with _scratch() as place:
            made = hostile.files_named(place, ["ok.bin", name], "unsafe name")
            with modelvault.open(made.vault) as vault:
                with pytest.raises(modelvault.VaultError):
                    vault.extract(made.ref, place.work / "out", trust=True)
            assert sorted(_tree(place.work)) == ["hostile.vault"]
            assert sorted(_tree(place.canary)) == []

    check()


@pytest.mark.sweep
def test_no_pip_option_reaches_a_requirements_line(full):
    from click.testing import CliRunner

    from modelvault._cli import cli

    @_examples(full, 15)
    @given(hostile.pip_options())
    def check(injected):
        with _scratch() as place:
            made = hostile.env_injection(place, injected)
            # Not standalone: a refusal stays an exception, whose cause says if it is ours.
            result = CliRunner().invoke(cli, ["env", str(made.vault), made.ref],
                                        standalone_mode=False)
        if result.exception is None:
            assert all(_REQUIREMENT.fullmatch(line)
                       for line in result.output.splitlines()), result.output
        else:
            cause = result.exception.__cause__
            assert cause is None or isinstance(cause, modelvault.VaultError), repr(cause)

    check()


@pytest.mark.sweep
def test_json_nested_at_any_depth_gets_a_typed_error_or_reads(full):
    @_examples(full, 12)
    @given(st.sampled_from(hostile.DEEP_PLACES), hostile.depths())
    def check(where, depth):
        with _scratch() as place, hostile.as_machine(place.keys):
            made = hostile.nested_deep(place, where, depth)

            def reading(read):
                def call():
                    with modelvault.open(made.vault, create=False) as vault:
                        read(vault)
                return call

            _answers_or_refuses(*map(reading, [
                lambda v: [(mv.metadata, mv.environment, mv.source, mv.signature)
                           for mv in v.versions()],
                lambda v: v.load(made.ref), lambda v: v.verify(),
                lambda v: v.diff(made.other, made.ref)]))

    check()


@pytest.mark.sweep
def test_a_log_event_of_any_shape_is_skipped_or_refused(full):
    @_examples(full, 15)
    @given(hostile.log_edits())
    def check(edits):
        with _scratch() as place, hostile.as_machine(place.keys):
            made = hostile.log_edited(place, *edits)
            _answers_or_refuses(lambda: modelvault.Remote(made.url).versions(),
                                lambda: _pull_twice_and_check(made, place))

    check()


def _pull_twice_and_check(made, place):
    with modelvault.open(place.work / "target.vault") as vault:
        vault.pull(made.url)
        vault.pull(made.url)
        assert vault.verify() == []
        for mv in vault.versions():
            assert made.honest.get(mv.id, mv.digest) == mv.digest
            vault.load(mv)
