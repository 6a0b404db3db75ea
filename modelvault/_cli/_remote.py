"""The commands for remotes on object storage: push, pull, clone, remotes and remote ...."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from .._html import human_bytes
from ._common import (
    _echo_json,
    _echo_prune,
    _open,
    _table,
    endpoint_option,
    json_option,
    prune_options,
    single_writer_option,
    vault_path,
)


@click.command("push")
@vault_path
@click.argument("url")
@click.argument("refs", nargs=-1)
@endpoint_option
@single_writer_option
def push_command(vault: Path, url: str, refs: tuple[str, ...], endpoint_url: str | None,
                 single_writer: bool) -> None:
    """Send VAULT's versions (or REFS) to the remote URL, only the chunks it lacks.

    URL: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///path.
    Credentials come from the usual environment variables and files, never the vault.
    """
    with _open(vault) as v:
        report = v.push(url, list(refs) or None, endpoint_url=endpoint_url,
                        single_writer=single_writer)
    click.echo(str(report))


@click.command("pull")
@vault_path
@click.argument("url")
@click.argument("refs", nargs=-1)
@endpoint_option
@click.option("--theirs", is_flag=True,
              help="Settle aliases and tags moved on both sides by taking the remote's.")
@click.option("--ours", is_flag=True,
              help="Settle aliases and tags moved on both sides by keeping VAULT's.")
def pull_command(vault: Path, url: str, refs: tuple[str, ...], endpoint_url: str | None,
                 theirs: bool, ours: bool) -> None:
    """Bring the remote's versions (or REFS there) that VAULT lacks into VAULT, and
    follow its aliases and tags.

    Every chunk, digest and signature is checked first; numbers that clash are
    renumbered, as merge does. An alias or tag nobody moved in VAULT since the last pull
    moves to where the remote has it; one moved on both sides is listed as a conflict
    and kept, unless --theirs or --ours settles it.
    """
    if theirs and ours:
        raise click.UsageError("--theirs and --ours are exclusive: give one")
    with _open(vault) as v:
        report = v.pull(url, list(refs) or None, endpoint_url=endpoint_url,
                        prefer="theirs" if theirs else "ours" if ours else None)
    click.echo(str(report))


@click.command("clone")
@click.argument("url")
@vault_path
@click.argument("refs", nargs=-1)
@endpoint_option
def clone_command(url: str, vault: Path, refs: tuple[str, ...], endpoint_url: str | None
                  ) -> None:
    """Make the new vault VAULT from the remote URL (every version, or REFS)."""
    from .. import clone

    with clone(url, vault, list(refs) or None, endpoint_url=endpoint_url) as v:
        count = len(v.versions())
    click.echo(f"cloned {count} version{'s' if count != 1 else ''} into {vault} "
               f"({human_bytes(vault.stat().st_size)})")


@click.group("remote")
def remote_group() -> None:
    """A remote on object storage: list, delete, prune, collect."""


@remote_group.command("add")
@vault_path
@click.argument("name")
@click.argument("url")
def remote_add_command(vault: Path, name: str, url: str) -> None:
    """Remember URL as NAME in VAULT (only the URL: credentials stay in the environment)."""
    with _open(vault) as v:
        v.add_remote(name, url)
    click.echo(f"{name} = {url}")


@remote_group.command("remove")
@vault_path
@click.argument("name")
def remote_remove_command(vault: Path, name: str) -> None:
    """Forget the remote NAME (nothing on the remote changes)."""
    with _open(vault) as v:
        v.remove_remote(name)
    click.echo(f"forgot {name}")


@click.command("remotes")
@vault_path
@json_option
def remotes_command(vault: Path, as_json: bool) -> None:
    """The remotes VAULT remembers, by name."""
    with _open(vault) as v:
        found = v.remotes()
    if as_json:
        _echo_json(found)
    else:
        click.echo(_table(["name", "url"], [[n, u] for n, u in found.items()]))


@remote_group.command("ls")
@click.argument("url")
@endpoint_option
@json_option
def remote_ls_command(url: str, endpoint_url: str | None, as_json: bool) -> None:
    """The models and versions on the remote URL, without downloading weights."""
    from .._remote import Remote

    found = Remote(url, endpoint_url=endpoint_url).versions()
    if as_json:
        _echo_json([asdict(v) for v in found])
        return
    click.echo(_table(["version", "kind", "size", "created", "aliases", "tags"],
                      [[v.ref, v.kind, human_bytes(v.size), v.created_at[:19],
                        ",".join(v.aliases), ",".join(f"{k}={t}" for k, t in v.tags.items())]
                       for v in found]))


@remote_group.command("rm")
@click.argument("url")
@click.argument("ref")
@endpoint_option
@single_writer_option
def remote_rm_command(url: str, ref: str, endpoint_url: str | None, single_writer: bool
                      ) -> None:
    """Delete the version REF on the remote URL (its bytes go at the next remote gc)."""
    from .._remote import Remote

    gone = Remote(url, endpoint_url=endpoint_url, single_writer=single_writer).delete(ref)
    click.echo(f"deleted {gone.ref} on the remote")


@remote_group.command("prune")
@click.argument("url")
@click.argument("name", required=False)
@prune_options
@json_option
@endpoint_option
@single_writer_option
def remote_prune_command(url: str, name: str | None, keep_last: int | None,
                         keep_aliased: bool, keep_tagged: bool, keep_since: str | None,
                         dry_run: bool, as_json: bool, endpoint_url: str | None,
                         single_writer: bool) -> None:
    """Delete the versions on the remote URL (of NAME, or of every model) no --keep rule
    keeps, in one log entry.

    Each model's latest version always stays. Their bytes go at the next
    `modelvault remote gc URL`, once its grace period has passed.
    """
    from .._remote import Remote

    report = Remote(url, endpoint_url=endpoint_url, single_writer=single_writer).prune(
        name, keep_last=keep_last, keep_aliased=keep_aliased, keep_tagged=keep_tagged,
        keep_since=keep_since, dry_run=dry_run)
    _echo_prune(report, "modelvault remote gc", as_json)


@remote_group.command("gc")
@click.argument("url")
@endpoint_option
@click.option("--grace", type=float, default=3600.0, show_default=True,
              help="Seconds: objects younger than this are never deleted.")
@single_writer_option
def remote_gc_command(url: str, endpoint_url: str | None, grace: float,
                      single_writer: bool) -> None:
    """Delete what no version on the remote URL uses any more (a push in flight stops it)."""
    from .._remote import Remote

    click.echo(str(Remote(url, endpoint_url=endpoint_url, single_writer=single_writer)
                   .gc(grace)))
