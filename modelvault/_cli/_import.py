"""`modelvault import`: a folder of checkpoint folders, a Hugging Face cache folder or an
MLflow registry, brought into a vault (``Vault.import_``)."""

from __future__ import annotations

from pathlib import Path

import click

from .._html import human_bytes
from .._vault import Vault
from ._common import _echo_json, _version_json, json_option, vault_path


@click.command("import")
@vault_path
# Not a click.Path: an MLflow registry is a URI; a missing folder is import_'s error.
@click.argument("source")
@click.option("--name", help="The model to import into (default: from SOURCE's name); "
              "of an MLflow registry, the one registered model to import.")
@json_option
def import_command(vault: Path, source: str, name: str | None, as_json: bool) -> None:
    """Import SOURCE into VAULT: a training output folder of checkpoint-N folders (one
    version per checkpoint, in step order, each the parent of the next), a Hugging
    Face cache folder models--org--name (one version per snapshot revision), or an
    MLflow registry mlflow:TRACKING_URI (mlflow:sqlite:///mlflow.db: one model per
    registered model, one version per model version). Run again, it adds only what is
    new."""
    with Vault(vault) as v:
        report = v.import_(source, name=name)
    if as_json:
        _echo_json({"name": report.name, "added": [_version_json(mv) for mv in report.added],
                    "existing": [mv.ref for mv in report.existing]})
        return
    for mv in report.added:
        label = " ".join(f"{k}={mv.metadata[k]}" for k in ("step", "revision", "mlflow_version")
                         if k in mv.metadata)
        click.echo(f"added {mv.ref} ({label}): {human_bytes(mv.size)}, added "
                   f"{human_bytes(mv.added_bytes)}" + (f" @{', @'.join(mv.aliases)}"
                                                       if mv.aliases else ""))
    click.echo(f"imported {len(report.added)} version(s) of {report.name}; "
               f"{len(report.existing)} already there")
