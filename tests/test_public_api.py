"""The public surface, pinned: what users import, call and catch (as httpx tests its exports).

A change here is a change users see. Written before the package was split into modules,
so that the split could show it changed nothing of this.
"""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest

import modelvault
from modelvault._cli import cli

EXPORTS = [
    "Changes", "CorruptVaultError", "DamagedVaultWarning", "Diff", "DiskFullError", "EntryChange",
    "EnvironmentWarning",
    "FormatVersionError", "ImportReport", "IntegrityError", "LiveModel", "LockTimeout",
    "MergeReport", "ModelInfo", "ModelVersion", "NotAVaultError", "NotFoundError", "Problem",
    "PruneReport", "PushReport", "ReadOnlyError", "Remote", "RemoteError", "RemoteGcReport",
    "RemoteVersion",
    "SelftestResult", "TooLargeError", "UnpicklableError", "UntrustedError", "Vault",
    "VaultError", "VaultStats", "clone", "follow", "load", "open", "save",
]

PATHLIKE = "str | os.PathLike[str]"
REF = "str | ModelVersion"
LABELS = ("metadata: 'Mapping[str, Any] | None' = None, tags: 'Mapping[str, Any] | None' = "
          "None, aliases: 'Sequence[str]' = (), description: 'str' = ''")
FUNCTIONS = {
    "open": f"(path: '{PATHLIKE}', *, readonly: 'bool' = False, create: 'bool' = True, "
            "timeout: 'float' = 60.0, progress: 'bool | None' = None, require: 'str | None' = "
            "None, max_expansion: 'float | None' = None) -> 'Vault'",
    "save": f"(path: '{PATHLIKE}', name: 'str', obj: 'Any', **options: 'Any') -> 'ModelVersion'",
    "load": f"(path: '{PATHLIKE}', ref: 'str', *, trust: 'bool' = False, device: 'Any' = None) "
            "-> 'Any'",
    "clone": f"(url: 'str', path: '{PATHLIKE}', refs: 'list[str] | None' = None, *, "
             "endpoint_url: 'str | None' = None) -> 'Vault'",
    "follow": f"(path: '{PATHLIKE}', ref: 'str', *, remote: 'str | None' = None, "
              "every: 'float' = 30.0, endpoint_url: 'str | None' = None, trust: 'bool' = "
              "False, require: 'str | None' = None, device: 'Any' = None, readonly: 'bool' = "
              "False, prefer: 'str | None' = None, on_change: "
              "'Callable[[ModelVersion, ModelVersion], Any] | None' = None) -> 'LiveModel'",
}
# What an app reads and calls on the handle follow() returns.
LIVE_MODEL = {"model", "version", "current", "refresh", "close"}
VAULT_METHODS = {
    "__init__": f"(self, path: '{PATHLIKE}', *, readonly: 'bool' = False, create: 'bool' = "
                "True, timeout: 'float' = 60.0, progress: 'bool | None' = None, require: "
                "'str | None' = None, max_expansion: 'float | None' = None) -> 'None'",
    "add_remote": "(self, name: 'str', url: 'str') -> 'None'",
    "alias": f"(self, ref: '{REF}', alias: 'str') -> 'ModelVersion'",
    "close": "(self) -> 'None'",
    "delete": f"(self, ref: '{REF}') -> 'int'",
    "diff": f"(self, a: '{REF}', b: '{REF}') -> '_diff.Diff'",
    "export": f"(self, dest: '{PATHLIKE}', refs: 'Sequence[str | ModelVersion] | None' = None, "
              "*, skip_damaged: 'bool' = False) -> 'Path'",
    "extract": f"(self, ref: '{REF}', out_dir: '{PATHLIKE}', *, trust: 'bool' = False) "
               "-> 'list[Path]'",
    "gc": "(self) -> 'int'",
    "import_": f"(self, source: '{PATHLIKE}', *, name: 'str | None' = None) "
               "-> 'ImportReport'",
    "get": f"(self, ref: '{REF}') -> 'ModelVersion'",
    "lineage": f"(self, ref: '{REF}') -> 'list[ModelVersion]'",
    "load": f"(self, ref: '{REF}', *, trust: 'bool' = False, device: 'Any' = None, "
            "keys: 'str | Sequence[str] | None' = None, lazy: 'bool' = False) -> 'Any'",
    "merge": f"(self, other: '{PATHLIKE} | Vault') -> 'MergeReport'",
    "plot": "(self, name: 'str', metric: 'str | Sequence[str]', *, x: 'str' = 'version', "
            "ax: 'Axes | None' = None, path: 'str | os.PathLike[str] | None' = None) "
            "-> 'Figure'",
    "prune": "(self, name: 'str | None' = None, *, keep_last: 'int | None' = None, "
             "keep_aliased: 'bool' = True, keep_tagged: 'bool' = False, "
             "keep_since: 'datetime | str | None' = None, dry_run: 'bool' = False) "
             "-> 'PruneReport'",
    "models": "(self) -> 'list[ModelInfo]'",
    "pull": "(self, url: 'str', refs: 'Sequence[str] | None' = None, *, endpoint_url: "
            "'str | None' = None, prefer: 'str | None' = None) -> 'MergeReport'",
    "push": "(self, url: 'str', refs: 'Sequence[str | ModelVersion] | None' = None, *, "
            "endpoint_url: 'str | None' = None, single_writer: 'bool' = False) -> 'PushReport'",
    "remotes": "(self) -> 'dict[str, str]'",
    "remove_remote": "(self, name: 'str') -> 'None'",
    "save": f"(self, name: 'str', obj: 'Any', *, {LABELS}, parent: "
            "'str | ModelVersion | bool | None' = None, source: 'bool' = True, "
            "example: 'Any' = None, compress: 'bool' = True) -> 'ModelVersion'",
    "save_files": f"(self, name: 'str', path: '{PATHLIKE} | Sequence[{PATHLIKE}]', *, "
                  f"{LABELS}, parent: 'str | ModelVersion | bool | None' = None, "
                  "source: 'bool' = True, compress: 'bool' = True) -> 'ModelVersion'",
    "selftest": f"(self, ref: '{REF}', *, trust: 'bool' = False) "
                "-> '_selftest.SelftestResult'",
    "stats": "(self) -> 'VaultStats'",
    "tag": f"(self, ref: '{REF}', tags: 'Mapping[str, Any] | None' = None, /, **more: 'Any') "
           "-> 'ModelVersion'",
    "unalias": "(self, name: 'str', alias: 'str') -> 'None'",
    "verify": "(self) -> 'list[Problem]'",
    "versions": "(self, name: 'str | None' = None) -> 'list[ModelVersion]'",
}
RECORDS = {
    "ModelVersion": ["name", "version", "id", "digest", "created_at", "size", "added_bytes",
                     "kind", "tags", "aliases", "description", "columns"],
    "ModelInfo": ["name", "versions", "latest", "updated_at"],
    "VaultStats": ["models", "versions", "chunks", "raw_bytes", "unique_bytes", "stored_bytes",
                   "file_bytes"],
    "Problem": ["message", "model", "version", "chunk"],
    "ImportReport": ["name", "added", "existing"],
    "MergeReport": ["added", "renumbered", "conflicts", "moved"],
    "PruneReport": ["deleted", "kept", "freed_bytes", "dry_run"],
    "PushReport": ["added", "chunks", "uploaded_bytes"],
    "RemoteVersion": ["name", "version", "id", "created_at", "kind", "size", "aliases", "tags"],
    "RemoteGcReport": ["objects", "bytes"],
    "Diff": ["a", "b", "kind", "metadata", "tags", "aliases", "environment", "description",
             "entries", "same_stream", "shared_bytes", "new_bytes"],
    "Changes": ["added", "removed", "changed"],
    "SelftestResult": ["ref", "method", "passed", "compared", "mismatched", "max_abs",
                       "max_rel", "message"],
    "EntryChange": ["name", "change", "dtype", "shape", "size", "max_abs", "rel_l2",
                    "changed_share"],
}
RECORD_PROPERTIES = {
    "ModelVersion": {"ref", "metadata", "environment", "signature", "signer", "key_id",
                     "parent", "source"},
    "VaultStats": {"dedup_ratio", "compression_ratio", "total_ratio"},
    "Diff": {"changed"},
    "RemoteVersion": {"ref"},
}
ERRORS = {
    "VaultError": ("Exception",), "NotFoundError": ("VaultError", "KeyError"),
    "NotAVaultError": ("VaultError",), "FormatVersionError": ("VaultError",),
    "CorruptVaultError": ("VaultError",), "IntegrityError": ("VaultError",),
    "UntrustedError": ("VaultError",), "LockTimeout": ("VaultError", "TimeoutError"),
    "ReadOnlyError": ("VaultError",), "DiskFullError": ("VaultError", "OSError"),
    "RemoteError": ("VaultError",), "TooLargeError": ("VaultError", "MemoryError"),
    "UnpicklableError": ("VaultError", "TypeError"),
}
COMMANDS = {
    "alias": ["vault", "ref", "alias"],
    "clone": ["url", "vault", "refs", "--endpoint-url"],
    "demo": ["vault"],
    "diff": ["vault", "a", "b", "--json"],
    "env": ["vault", "ref", "--trust"],
    "browse": ["vault", "--host", "--port"],
    "selftest": ["vault", "refs", "--trust", "--json"],
    "export": ["vault", "dest", "refs", "--skip-damaged"],
    "gc": ["vault"],
    "import": ["vault", "source", "--name", "--json"],
    "get": ["vault", "ref", "-o/--output", "--trust", "--keys", "--format"],
    "key export": ["-o/--output", "--name"],
    "keys": ["--json"],
    "lineage": ["vault", "ref", "--json"],
    "log": ["vault", "name", "--json"],
    "ls": ["vault", "--json"],
    "merge": ["vault", "other"],
    "put": ["vault", "name", "paths", "--meta", "--tag", "--alias", "-m/--description",
            "--no-compress", "--json"],
    "plot": ["vault", "name", "metrics", "-o/--output", "--x"],
    "prune": ["vault", "name", "--keep-last", "--keep-aliased", "--keep-tagged",
              "--keep-since", "--dry-run", "--json"],
    "pull": ["vault", "url", "refs", "--endpoint-url", "--theirs", "--ours"],
    "push": ["vault", "url", "refs", "--endpoint-url", "--single-writer"],
    "remote add": ["vault", "name", "url"],
    "remote gc": ["url", "--endpoint-url", "--grace", "--single-writer"],
    "remote ls": ["url", "--endpoint-url", "--json"],
    "remote prune": ["url", "name", "--keep-last", "--keep-aliased", "--keep-tagged",
                     "--keep-since", "--dry-run", "--json", "--endpoint-url", "--single-writer"],
    "remote remove": ["vault", "name"],
    "remote rm": ["url", "ref", "--endpoint-url", "--single-writer"],
    "remotes": ["vault", "--json"],
    "rm": ["vault", "ref", "-y/--yes"],
    "show": ["vault", "ref", "--json"],
    "stats": ["vault", "--json"],
    "tag": ["vault", "ref", "tags"],
    "trust": ["keyfile", "--name"],
    "untrust": ["name"],
    "unalias": ["vault", "name", "alias"],
    "verify": ["vault", "--json"],
}


def test_the_package_exports_exactly_its_public_names():
    assert sorted(modelvault.__all__) == EXPORTS
    assert all(hasattr(modelvault, name) for name in EXPORTS)
    assert isinstance(modelvault.__version__, str)


def test_module_functions_keep_their_signatures():
    assert {name: str(inspect.signature(getattr(modelvault, name))) for name in FUNCTIONS} \
        == FUNCTIONS


def test_vault_has_exactly_its_public_methods_with_their_signatures():
    public = {name for name, value in vars(modelvault.Vault).items()
              if callable(value) and not name.startswith("_")}
    assert public == VAULT_METHODS.keys() - {"__init__"}
    assert {name: str(inspect.signature(getattr(modelvault.Vault, name)))
            for name in VAULT_METHODS} == VAULT_METHODS


def test_live_model_has_exactly_its_public_methods_and_properties():
    assert {name for name in vars(modelvault.LiveModel) if not name.startswith("_")} \
        == LIVE_MODEL
    assert str(inspect.signature(modelvault.LiveModel.refresh)) == "(self) -> 'bool'"


def test_vault_attributes_and_context_manager(tmp_path):
    with modelvault.open(tmp_path / "a.vault") as vault:
        assert vault.path == tmp_path / "a.vault" and vault.readonly is False
        assert repr(vault) == f"<Vault {str(tmp_path / 'a.vault')!r}>"


def test_records_are_frozen_dataclasses_with_their_fields():
    for name, expected in RECORDS.items():
        record = getattr(modelvault, name)
        assert dataclasses.is_dataclass(record) and record.__dataclass_params__.frozen, name
        assert [f.name for f in dataclasses.fields(record)] == expected, name
    for name, expected in RECORD_PROPERTIES.items():
        record = getattr(modelvault, name)
        assert expected <= {n for n in dir(record) if not n.startswith("_")}, name


def test_the_exception_tree():
    for name, bases in ERRORS.items():
        assert tuple(b.__name__ for b in getattr(modelvault, name).__bases__) == bases, name


def test_cli_commands_and_their_parameters():
    found = {}

    def walk(group, prefix):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                found[prefix + name] = [
                    "/".join(p.opts) if isinstance(p, click.Option) else p.name
                    for p in command.params]

    walk(cli, "")
    assert found == COMMANDS


def test_the_package_metadata_reads_without_deprecation_warnings():
    # `pip install` printed setuptools' warning for the old `license = { text = ... }` table.
    import warnings
    from pathlib import Path

    pytest.importorskip("setuptools", minversion="77")  # the test extra installs it
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), pyproject)
    assert dist.metadata.license_expression == "MIT"
