"""What every ``modelvault`` command shares: the error-to-one-line group, tables, JSON,
the vault argument and options, and how a command opens an existing vault."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._errors import VaultError
from .._html import human_bytes
from .._records import ModelVersion
from .._vault import Vault

if TYPE_CHECKING:
    from .._reports import PruneReport


class _Group(click.Group):
    """Turns our errors (and bad arguments) into one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (VaultError, ValueError, TypeError, OSError) as exc:
            raise click.ClickException(str(exc) or type(exc).__name__) from exc
        except Exception as exc:  # e.g. a model's own code failing while it unpickles
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _warning_line(message: Warning | str, *_: Any, **__: Any) -> None:
    """Show a warning (a damaged vault, another environment) as one line on stderr."""
    click.echo(f"Warning: {message}", err=True)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _version_json(mv: ModelVersion) -> dict[str, Any]:
    record = {f.name: getattr(mv, f.name) for f in fields(mv) if f.name != "columns"}
    record.update(created_at=mv.created_at.isoformat(), aliases=list(mv.aliases),
                  metadata=mv.metadata, environment=mv.environment, signature=mv.signature,
                  signer=mv.signer, key_id=mv.key_id, parent=mv.parent, source=mv.source)
    return record


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _pairs(values: tuple[str, ...], what: str, parse_json: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        if parse_json:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            # A number only when it reads back the same: "1.10" or "1e5" stays text.
            keep_text = isinstance(parsed, (int, float)) and json.dumps(parsed) != value
            result[key] = value if keep_text else parsed
        else:
            result[key] = value
    return result


vault_path = click.argument("vault", type=click.Path(dir_okay=False, path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def _open(path: Path) -> Vault:
    """An existing vault; only `put` and `demo` create one, so a typo makes no new file.

    Reads open it writable too: after an interrupted write, only a connection that
    may write lets SQLite roll the leftover journal back.
    """
    if not path.exists():
        raise click.ClickException(f"{path}: no such vault")
    return Vault(path, create=False)


endpoint_option = click.option(
    "--endpoint-url", help="An S3-compatible server other than AWS (also AWS_ENDPOINT_URL).")
single_writer_option = click.option(
    "--single-writer", is_flag=True,
    help="Use a store that ignores create-only writes: only if no other process ever "
         "writes to it.")


def prune_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The keep-rules of `prune` and `remote prune` (Vault.prune's), and --dry-run."""
    for option in reversed([
            click.option("--keep-last", type=click.IntRange(min=1), metavar="N",
                         help="Keep each model's N newest versions."),
            click.option("--keep-aliased/--drop-aliased", default=True, show_default=True,
                         help="Keep the versions an alias points at."),
            click.option("--keep-tagged", is_flag=True,
                         help="Keep the versions that have tags."),
            click.option("--keep-since", metavar="DATE",
                         help="Keep the versions saved at or after DATE (ISO 8601, UTC: "
                              "2026-12-01)."),
            click.option("--dry-run", is_flag=True,
                         help="Say what would be deleted; delete nothing.")]):
        command = option(command)
    return command


def _echo_prune(report: PruneReport, gc: str, as_json: bool) -> None:
    """Print what a prune deleted (or would) and what the command ``gc`` then frees."""
    if as_json:
        _echo_json({"deleted": [_version_json(v) if isinstance(v, ModelVersion) else asdict(v)
                                for v in report.deleted],
                    "kept": report.kept, "freed_bytes": report.freed_bytes,
                    "dry_run": report.dry_run})
        return
    verb, frees = ("would delete", "would free") if report.dry_run else ("deleted", "frees")
    click.echo(f"{verb} {len(report.deleted)} version(s), kept {report.kept}; `{gc}` "
               f"{frees} {human_bytes(report.freed_bytes)}")
    for v in report.deleted:
        at = v.created_at if isinstance(v.created_at, str) else v.created_at.isoformat()
        click.echo(f"  {v.ref}  {at[:16].replace('T', ' ')}  {human_bytes(v.size)}")
