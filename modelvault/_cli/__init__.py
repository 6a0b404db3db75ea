"""The ``modelvault`` command: a thin layer over the library.

The first argument of every vault command is the vault file. Output is a table
for people, or JSON with ``--json``. Errors print one line and exit 1.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .. import _trust
from .._errors import IntegrityError
from .._html import human_bytes
from .._records import ModelVersion
from .._vault import Vault
from .._version import __version__
from . import _import, _remote
from ._common import (
    _echo_json,
    _echo_prune,
    _Group,
    _open,
    _pairs,
    _table,
    _version_json,
    json_option,
    prune_options,
    vault_path,
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelvault")
def cli() -> None:
    """Every model and version in one SQLite file.

    Most commands take the vault file first, e.g. `modelvault ls models.vault`.
    """


@cli.command("ls")
@vault_path
@json_option
def ls_command(vault: Path, as_json: bool) -> None:
    """List the models in VAULT with their version counts."""
    with _open(vault) as v:
        models = v.models()
    if as_json:
        _echo_json([{**asdict(m), "updated_at": m.updated_at.isoformat()} for m in models])
        return
    if not models:
        click.echo("no models")
        return
    click.echo(_table(["model", "versions", "latest", "updated (UTC)"],
                      [[m.name, m.versions, m.latest, f"{m.updated_at:%Y-%m-%d %H:%M}"]
                       for m in models]))


@cli.command("log")
@vault_path
@click.argument("name")
@json_option
def log_command(vault: Path, name: str, as_json: bool) -> None:
    """List every version of model NAME, oldest first."""
    with _open(vault) as v:
        versions = v.versions(name)
    if as_json:
        _echo_json([_version_json(mv) for mv in versions])
        return
    click.echo(_table(
        ["version", "created (UTC)", "size", "added", "aliases", "tags", "description"],
        [[mv.version, f"{mv.created_at:%Y-%m-%d %H:%M:%S}", human_bytes(mv.size),
          human_bytes(mv.added_bytes), ", ".join(mv.aliases),
          " ".join(f"{k}={val}" for k, val in mv.tags.items()), mv.description]
         for mv in versions]))


@cli.command("show")
@vault_path
@click.argument("ref")
@json_option
def show_command(vault: Path, ref: str, as_json: bool) -> None:
    """Show one version: REF is NAME, NAME:VERSION or NAME@ALIAS."""
    with _open(vault) as v:
        mv = v.get(ref)
        found = v.lineage(mv)[:1]
    parent = (found[0].ref + f" ({mv.parent})" if found else
              f"{mv.parent} (not in this vault)" if mv.parent else None)
    if as_json:
        _echo_json(_version_json(mv))
        return
    lines = [
        ("ref", mv.ref), ("id", mv.id), ("kind", mv.kind),
        ("created", mv.created_at.isoformat()), ("size", human_bytes(mv.size)),
        ("added", human_bytes(mv.added_bytes)), ("digest", mv.digest),
        ("aliases", ", ".join(mv.aliases)), ("description", mv.description),
        ("signature", _signature_line(mv)),
    ]
    for label, value in lines:
        click.echo(f"{label + ':':<13}{value}")
    for title, mapping in (("tags", mv.tags), ("metadata", mv.metadata)):
        click.echo(f"{title}:")
        for key, value in mapping.items():
            click.echo(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    env = mv.environment
    click.echo(f"environment: python {env.get('python', '?')}, " + ", ".join(
        f"{k} {val}" for k, val in env.get("packages", {}).items()))
    if parent is not None:
        click.echo(f"parent:      {parent}")
    if mv.source:
        click.echo(f"source:      {_source_line(mv.source)}")


def _signature_line(mv: ModelVersion) -> str:
    status, signer = mv.signature, mv.signer
    if status == "trusted":
        return f"trusted, signed by {signer} (key {mv.key_id})"
    if status == "untrusted":
        return f"untrusted: signed by key {mv.key_id}, which this machine does not trust"
    if status == "invalid":
        return f"INVALID: the version changed after key {mv.key_id} signed it"
    return status


def _source_line(source: dict[str, Any]) -> str:
    git = source.get("git_commit")
    parts = []
    if git or source.get("git_branch"):
        parts.append(f"git {str(git or '(no commit)')[:12]}"
                     + (f" on {source['git_branch']}" if source.get("git_branch") else "")
                     + (", with uncommitted changes" if source.get("git_dirty") else ""))
    if source.get("script"):
        parts.append(f"script {source['script']}")
    return "; ".join(parts) or json.dumps(source)


@cli.command("diff")
@vault_path
@click.argument("a")
@click.argument("b")
@json_option
def diff_command(vault: Path, a: str, b: str, as_json: bool) -> None:
    """What differs from version A to version B (of one model or two): metadata, tags,
    aliases, environment, and every array, tensor or file; for pickles, whether the
    bytes are equal. Exits 0 whether or not they differ."""
    with _open(vault) as v:
        d = v.diff(a, b)
    if as_json:
        _echo_json(_finite(asdict(d)))
        return
    click.echo(f"{d.a} -> {d.b} ({d.kind} versions): "
               + ("they differ" if d else "no differences"))
    for title, changes in (("metadata", d.metadata), ("tags", d.tags),
                           ("aliases", d.aliases), ("environment", d.environment)):
        if changes:
            click.echo(f"{title}:")
            for key, value in sorted(changes.removed.items()):
                click.echo(f"  - {key}: {_shown(value)}")
            for key, value in sorted(changes.added.items()):
                click.echo(f"  + {key}: {_shown(value)}")
            for key, (old, new) in sorted(changes.changed.items()):
                click.echo(f"  ~ {key}: {_shown(old)} -> {_shown(new)}")
    if d.description is not None:
        click.echo(f"description: {d.description[0]!r} -> {d.description[1]!r}")
    if d.same_stream is not None:
        click.echo("pickle: " + ("the same bytes" if d.same_stream else "different bytes"))
    if d.entries:
        counts = {c: sum(e.change == c for e in d.entries)
                  for c in ("same", "changed", "added", "removed")}
        click.echo("entries: " + ", ".join(f"{n} {c}" for c, n in counts.items()))
        rows = [[{"changed": "~", "added": "+", "removed": "-"}[e.change], e.name,
                 *_entry_cells(e)] for e in d.changed]
        if rows:
            click.echo(_table(["", "name", "dtype", "shape", "size", "max |change|",
                               "relative L2", "changed"], rows))
    click.echo(f"bytes: {human_bytes(d.shared_bytes)} of {d.b} shared with {d.a}, "
               f"{human_bytes(d.new_bytes)} new")


def _finite(value: Any) -> Any:
    """``value`` with inf and NaN floats as the strings "inf", "-inf", "nan": JSON has
    no numbers for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _entry_cells(e: Any) -> list[str]:
    """dtype, shape, size, max change, relative L2 and share changed of an entry, each
    as "a -> b" where the two sides differ."""
    def pair(values: tuple[Any, Any], show: Any = str) -> str:
        shown = [show(v) for v in values if v is not None]  # one side for added, removed
        return shown[0] if len(set(shown)) == 1 else " -> ".join(shown)

    return [pair(e.dtype), pair(e.shape, lambda s: "x".join(map(str, s)) or "scalar"),
            pair(e.size, human_bytes),
            "" if e.max_abs is None else f"{e.max_abs:.4g}",
            "" if e.rel_l2 is None else f"{e.rel_l2:.3g}",
            "" if e.changed_share is None else f"{e.changed_share:.1%}"]


@cli.command("lineage")
@vault_path
@click.argument("ref")
@json_option
def lineage_command(vault: Path, ref: str, as_json: bool) -> None:
    """REF and the versions it came from, nearest first (see `save(..., parent=...)`)."""
    with _open(vault) as v:
        mv = v.get(ref)
        chain = [mv, *v.lineage(mv)]
    if as_json:
        _echo_json([_version_json(m) for m in chain])
        return
    for depth, m in enumerate(chain):
        click.echo(f"{'  ' * depth}{m.ref}  {m.created_at:%Y-%m-%d %H:%M:%S}"
                   + (f"  {_source_line(m.source)}" if m.source else ""))
    if chain[-1].parent is not None:
        click.echo(f"{'  ' * len(chain)}{chain[-1].parent} (not in this vault)")


@cli.command("plot")
@vault_path
@click.argument("name")
@click.argument("metrics", nargs=-1, required=True, metavar="METRIC...")
@click.option("-o", "--output", "out", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The image to write; its suffix picks the format (.png, .svg, .pdf).")
@click.option("--x", "x", type=click.Choice(["version", "created"]), default="version",
              show_default=True, help="The x axis: version number or time saved.")
def plot_command(vault: Path, name: str, metrics: tuple[str, ...], out: Path, x: str) -> None:
    """Plot metadata METRICs (nested ones as eval.loss) across the versions of NAME,
    aliases marked, into an image; prints its path. Needs `pip install
    'modelvault[plot]'`."""
    with _open(vault) as v:
        try:
            v.plot(name, list(metrics), x=x, path=out)
        except ImportError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(out)


@cli.command("selftest")
@vault_path
@click.argument("refs", nargs=-1)
@click.option("--trust", is_flag=True, help="Load pickles no trusted key signed.")
@json_option
def selftest_command(vault: Path, refs: tuple[str, ...], trust: bool, as_json: bool) -> None:
    """Ask each model its saved example again, here, and compare with the saved answer
    (REFs, or every version saved with an example). Exits 1 if any answers differently."""
    with _open(vault) as v:
        targets = list(refs) or [mv.ref for mv in v.versions()]
        results = [v.selftest(ref, trust=trust) for ref in targets]
    if not refs:  # over the whole vault, versions without an example are only counted
        skipped = sum(r.passed is None for r in results)
        results = [r for r in results if r.passed is not None]
    if as_json:
        _echo_json([asdict(r) for r in results])
    else:
        for r in results:
            verdict = {True: "ok", False: "FAILED", None: "skipped"}[r.passed]
            click.echo(f"{r.ref}  {verdict}: {r.message}")
        if not refs:
            click.echo(f"{len(results)} version(s) with an example"
                       + (f"; {skipped} without one" if skipped else ""))
    if any(r.passed is False for r in results):
        sys.exit(1)


@cli.command("browse")
@vault_path
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=int)
def browse_command(vault: Path, host: str, port: int) -> None:
    """Browse VAULT in Datasette, read-only (needs `pip install 'modelvault[browse]'`):
    every table and view, foreign keys labelled, and queries for versions by package
    version, storage per model, and versions not signed by a key trusted here."""
    try:
        from .. import _browse
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise click.ClickException(str(exc)) from exc
    with _open(vault):  # a vault this modelvault reads, or one clear error
        pass
    try:
        import datasette  # noqa: F401
    except ImportError as exc:
        raise click.ClickException("modelvault browse needs Datasette: pip install "
                                   "'modelvault[browse]'") from exc
    click.echo(f"browsing {vault} read-only at http://{host}:{port}/ (Ctrl-C to stop)")
    _browse.serve(vault, host, port)


@cli.command("env")
@vault_path
@click.argument("ref")
@click.option("--trust", is_flag=True,
              help="Print it even if REF's signature fails (it was changed after saving).")
def env_command(vault: Path, ref: str, trust: bool) -> None:
    """Print a requirements file (name==version lines) of the packages REF was saved
    with, after a comment naming its Python: `pip install -r` it to rebuild that
    environment."""
    from .. import _environment, _trust

    with _open(vault) as v:
        mv = v.get(ref)
        _trust.check_required(v.require, mv.signature, mv.ref)
    if mv.signature == "invalid" and not trust:
        raise click.ClickException(f"{mv.ref}: its signature does not match: the version, "
                                   "its environment too, was changed after it was saved "
                                   "(--trust to print it anyway)")
    try:
        click.echo(_environment.requirements(mv.environment), nl=False)
    except ValueError as exc:  # a forged or damaged record: the version's own error
        raise IntegrityError(f"{mv.ref}: {exc}", model=mv.name, version=mv.version) from exc


@cli.command("put")
@vault_path
@click.argument("name")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--meta", multiple=True, metavar="KEY=VALUE",
              help="Metadata; VALUE is parsed as JSON when it can be (auc=0.91 is a number).")
@click.option("--tag", multiple=True, metavar="KEY=VALUE", help="A tag; repeat for more.")
@click.option("--alias", multiple=True, metavar="ALIAS", help="Point ALIAS at the new version.")
@click.option("-m", "--description", default="", help="A line about this version.")
@click.option("--no-compress", is_flag=True,
              help="Store the new chunks as they are: faster loads, a bigger file.")
@json_option
def put_command(vault: Path, name: str, paths: tuple[Path, ...], meta: tuple[str, ...],
                tag: tuple[str, ...], alias: tuple[str, ...], description: str,
                no_compress: bool, as_json: bool) -> None:
    """Store files or folders (ONNX, safetensors, ...) as the next version of NAME."""
    with Vault(vault) as v:
        mv = v.save_files(name, list(paths), metadata=_pairs(meta, "--meta", parse_json=True),
                          tags=_pairs(tag, "--tag"), aliases=list(alias),
                          description=description, compress=not no_compress)
    if as_json:
        _echo_json(_version_json(mv))
    else:
        click.echo(f"saved {mv.ref}: {human_bytes(mv.size)}, added {human_bytes(mv.added_bytes)}")


@cli.command("get")
@vault_path
@click.argument("ref")
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder to write into.")
@click.option("--trust", is_flag=True,
              help="Write a model out even if no trusted key signed it (unpickling runs its "
                   "code) or its signature fails.")
@click.option("--keys", multiple=True, metavar="PATTERN",
              help="Only these arrays or tensors (names or glob patterns over the flat "
                   "names, e.g. 'encoder.layer.0.*'); repeat for more.")
@click.option("--format", "form", type=click.Choice(["safetensors", "npz"]),
              help="Write the version's arrays or tensors as one file of this format.")
def get_command(vault: Path, ref: str, out_dir: Path, trust: bool, keys: tuple[str, ...],
                form: str | None) -> None:
    """Write version REF out to a folder.

    Files come back under their stored paths, and so do framework models (an xgboost
    model.ubj, a save_pretrained folder). Arrays and tensors are written as
    NAME-vN.npz (numpy arrays) or NAME-vN.safetensors (torch tensors) when they are
    one array or a flat dict of them; other models as a pickle file NAME-vN.pkl
    (loadable with pickle.load). With --keys or --format, the arrays and tensors of any
    version that has them (a state dict, a pickled torch module, safetensors files) are
    written as one such file, by flat name, without running a pickle.
    """
    with _open(vault) as v:
        mv = v.get(ref)
        if keys or form:
            entries = v.load(mv, keys=list(keys) or ["*"], trust=trust)
            written = [_write_entries({k or "array": a for k, a in entries.items()}, mv,
                                      out_dir, form)]
        elif mv.kind in ("files", "framework"):
            written = v.extract(mv, out_dir, trust=trust)
        else:
            written = [_write_object(v.load(mv, trust=trust), mv, out_dir)]
    for path in written:
        click.echo(str(path))


def _write_entries(entries: dict[str, Any], mv: ModelVersion, out_dir: Path,
                   form: str | None) -> Path:
    """A flat dict of arrays or tensors as one .npz or .safetensors file."""
    import numpy as np

    from .._files import write_safetensors

    out_dir.mkdir(parents=True, exist_ok=True)
    numpy_only = all(isinstance(a, (np.ndarray, np.generic)) for a in entries.values())
    form = form or ("npz" if numpy_only else "safetensors")
    target = out_dir / f"{mv.name.replace('/', '_')}-v{mv.version}.{form}"
    if form == "safetensors":
        write_safetensors(target, entries)
        return target
    if not numpy_only:
        raise click.UsageError("torch tensors are written as safetensors: use --format "
                               "safetensors")
    with open(target, "wb") as f:
        np.savez(f, **{k: np.asarray(a) for k, a in entries.items()})
    return target


def _write_object(obj: Any, mv: ModelVersion, out_dir: Path) -> Path:
    import numpy as np

    from .._torch import is_tensor

    flat = {"array": obj} if isinstance(obj, np.ndarray) or is_tensor(obj) else obj
    if mv.kind == "arrays" and isinstance(flat, dict) and flat and all(
            isinstance(a, np.ndarray) or is_tensor(a) for a in flat.values()):
        return _write_entries(flat, mv, out_dir, None)
    import cloudpickle

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{mv.name.replace('/', '_')}-v{mv.version}.pkl"
    with open(target, "wb") as f:
        cloudpickle.dump(obj, f, protocol=5)
    return target


@cli.command("alias")
@vault_path
@click.argument("ref")
@click.argument("alias")
def alias_command(vault: Path, ref: str, alias: str) -> None:
    """Point ALIAS at version REF (moving it if it points elsewhere)."""
    with _open(vault) as v:
        mv = v.alias(ref, alias)
    click.echo(f"{mv.name}@{alias} -> {mv.ref}")


@cli.command("unalias")
@vault_path
@click.argument("name")
@click.argument("alias")
def unalias_command(vault: Path, name: str, alias: str) -> None:
    """Remove ALIAS from model NAME."""
    with _open(vault) as v:
        v.unalias(name, alias)
    click.echo(f"removed {name}@{alias}")


@cli.command("tag")
@vault_path
@click.argument("ref")
@click.argument("tags", nargs=-1, required=True, metavar="KEY=VALUE...")
def tag_command(vault: Path, ref: str, tags: tuple[str, ...]) -> None:
    """Set tags on version REF; KEY= with nothing after it removes that tag."""
    pairs = {k: (val if val != "" else None) for k, val in _pairs(tags, "TAGS").items()}
    with _open(vault) as v:
        mv = v.tag(ref, pairs)
    click.echo(f"{mv.ref}: " + " ".join(f"{k}={val}" for k, val in mv.tags.items()))


@cli.command("rm")
@vault_path
@click.argument("ref")
@click.option("-y", "--yes", is_flag=True, help="Delete a whole model without asking.")
def rm_command(vault: Path, ref: str, yes: bool) -> None:
    """Delete version REF (NAME:N or NAME@ALIAS), or a whole model given by bare NAME.

    Space comes back with `modelvault gc`.
    """
    with _open(vault) as v:
        if ":" not in ref and "@" not in ref and not yes:
            count = len(v.versions(ref))
            click.confirm(f"delete model {ref} and all {count} of its versions?", abort=True)
        count = v.delete(ref)
    click.echo(f"deleted {count} version{'s' if count != 1 else ''}")


@cli.command("export")
@vault_path
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("refs", nargs=-1)
@click.option("--skip-damaged", is_flag=True,
              help="Leave out the versions `verify` finds damaged (and name them): the "
                   "salvage of a damaged vault.")
def export_command(vault: Path, dest: Path, refs: tuple[str, ...], skip_damaged: bool
                   ) -> None:
    """Write a compact copy of VAULT, or of the versions REFS name, to DEST.

    DEST is replaced in one step (a temporary file beside it, flushed, then renamed):
    safe to run into a synced folder.
    """
    with _open(vault) as v:
        v.export(dest, list(refs) or None, skip_damaged=skip_damaged)
    with Vault(dest, readonly=True) as copy:
        count = len(copy.versions())
    click.echo(f"exported {count} version{'s' if count != 1 else ''} to {dest} "
               f"({human_bytes(dest.stat().st_size)})")


@cli.command("merge")
@vault_path
@click.argument("other", type=click.Path(dir_okay=False, path_type=Path))
def merge_command(vault: Path, other: Path) -> None:
    """Bring every version of OTHER that VAULT lacks into VAULT; OTHER is not changed.

    Versions are matched by id, so two copies of one vault that both changed (a sync
    service's "conflicted copy") merge without loss. Numbers that clash are renumbered;
    aliases and tags that differ stay as they are in VAULT. Both are listed.
    """
    with _open(vault) as v:
        report = v.merge(other)
    click.echo(str(report))


@cli.command("gc")
@vault_path
def gc_command(vault: Path) -> None:
    """Drop chunks no version uses and shrink the file."""
    with _open(vault) as v:
        before = v.stats()
        shrank = v.gc()
        after = v.stats()
    dropped = before.chunks - after.chunks
    line = (f"dropped {dropped} unused chunk{'' if dropped == 1 else 's'} "
            f"({human_bytes(before.unique_bytes - after.unique_bytes)} of model bytes); the file "
            f"shrank by {human_bytes(shrank)} to {human_bytes(after.file_bytes)}")
    if dropped and not shrank:
        line += (" (the packs those chunks were in are still at least half in use: their "
                 "space is reused by later saves, and handed back once they are not)")
    click.echo(line)


@cli.command("prune")
@vault_path
@click.argument("name", required=False)
@prune_options
@json_option
def prune_command(vault: Path, name: str | None, keep_last: int | None, keep_aliased: bool,
                  keep_tagged: bool, keep_since: str | None, dry_run: bool,
                  as_json: bool) -> None:
    """Delete the versions (of NAME, or of every model) no --keep rule keeps.

    Each model's latest version always stays. Run `modelvault gc VAULT` afterwards to
    shrink the file by what it freed.
    """
    with _open(vault) as v:
        report = v.prune(name, keep_last=keep_last, keep_aliased=keep_aliased,
                         keep_tagged=keep_tagged, keep_since=keep_since, dry_run=dry_run)
    _echo_prune(report, "modelvault gc", as_json)


@cli.command("verify")
@vault_path
@json_option
def verify_command(vault: Path, as_json: bool) -> None:
    """Re-hash every stored chunk; exit 1 if anything is wrong."""
    with _open(vault) as v:
        problems = v.verify()
        stats = v.stats()
    if as_json:
        _echo_json([asdict(p) for p in problems])
    elif not problems:
        click.echo(f"ok: {stats.versions} versions, {stats.chunks} chunks verified")
    for problem in problems if not as_json else []:
        click.echo(str(problem))
    if problems:
        sys.exit(1)


@cli.command("stats")
@vault_path
@json_option
def stats_command(vault: Path, as_json: bool) -> None:
    """Sizes of VAULT: raw, deduplicated, compressed, and on disk."""
    with _open(vault) as v:
        s = v.stats()
    if as_json:
        _echo_json({**asdict(s), "dedup_ratio": s.dedup_ratio,
                    "compression_ratio": s.compression_ratio, "total_ratio": s.total_ratio})
        return
    click.echo(f"models:       {s.models}\nversions:     {s.versions}\nchunks:       {s.chunks}")
    click.echo(f"raw:          {human_bytes(s.raw_bytes)}  (every version stored whole)")
    click.echo(f"deduplicated: {human_bytes(s.unique_bytes)}  ({s.dedup_ratio:.2f}x)")
    click.echo(f"compressed:   {human_bytes(s.stored_bytes)}  ({s.compression_ratio:.2f}x)")
    if not s.raw_bytes:
        versus = "no model bytes in it"
    elif s.file_bytes <= s.raw_bytes:
        versus = f"{s.raw_bytes / s.file_bytes:.2f}x smaller than raw"
    else:
        versus = f"{s.file_bytes / s.raw_bytes:.2f}x larger than raw"
    click.echo(f"file:         {human_bytes(s.file_bytes)}  ({versus})")


@cli.group("key")
def key_group() -> None:
    """This machine's signing key pair."""


@key_group.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the key to a file instead of stdout.")
@click.option("--name", help="The name it suggests to whoever trusts it (default: user@host).")
def key_export_command(output: Path | None, name: str | None) -> None:
    """Print this machine's public key, for teammates to `modelvault trust`.

    Only the public key: it lets others check what this machine signed, never sign as
    it. The private key stays in MODELVAULT_HOME (mode 0600)."""
    private = _trust.own_private()
    public = _trust.public_bytes(private)
    text = _trust.format_public(public, _trust.check_name(name) if name
                                else _trust.default_name())
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote public key {_trust.public_key_id(public)} to {output}", err=True)


@cli.command("trust")
@click.argument("keyfile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="What to call the key (default: the name in the file).")
def trust_command(keyfile: Path, name: str | None) -> None:
    """Load pickled models signed with the public key in KEYFILE without asking from now on."""
    key = _trust.trust_file(keyfile, name)
    click.echo(f"trusted {key.name} (key {key.key_id})")


@cli.command("untrust")
@click.argument("name")
def untrust_command(name: str) -> None:
    """Stop trusting the key trusted as NAME (see `modelvault keys`)."""
    key = _trust.untrust(name)
    click.echo(f"no longer trusted: {key.name} (key {key.key_id})")


@cli.command("keys")
@json_option
def keys_command(as_json: bool) -> None:
    """The keys whose signatures this machine accepts: name, fingerprint and kind."""
    keys = sorted(_trust.trusted().values(), key=lambda k: (k.name != _trust.OWN, k.name))
    if as_json:
        _echo_json([{"name": k.name, "key_id": k.key_id, "kind": k.kind} for k in keys])
        return
    click.echo(_table(["name", "key id", "kind"],
                      [[k.name, k.key_id, k.kind + (" (legacy, versions before format 5)"
                                                    if k.kind == "hmac" else "")]
                       for k in keys]))


@cli.command("demo")
@click.argument("vault", required=False, default="modelvault-demo.vault",
                type=click.Path(dir_okay=False, path_type=Path))
def demo_command(vault: Path) -> None:
    """Train a small model, save a few versions, show what dedup saved, load it back."""
    from .._demo import run

    run(vault, echo=click.echo)


for command in (_import.import_command, _remote.push_command, _remote.pull_command,
                _remote.clone_command, _remote.remote_group, _remote.remotes_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="modelvault")
