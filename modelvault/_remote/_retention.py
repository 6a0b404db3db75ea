"""Retention on a remote: prune's keep-rules applied to its log, and what a remote gc
deletes there (``garbage``), which prune also reports as the bytes gc then frees.

The rules are ``_prune``'s, judged on the log's records; the deletions are one log entry,
chosen afresh from the state each attempt to append it sees, so a writer that got in
first (a push, an alias moved, a version deleted) is judged too. gc and prune share
``garbage``, so the bytes prune names are the bytes a gc deletes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from .._errors import IntegrityError
from .._prune import doomed, rules
from .._refs import check_name
from .._reports import PruneReport, RemoteVersion
from ._log import Log, State
from ._objects import PackObjects


class Remote(Protocol):
    """A remote (``_remote.Remote``, which imports this module) as retention uses it."""

    url: str
    log: Log
    packs: PackObjects

    def check_descriptor(self, *, create: bool) -> None: ...
    def probe(self) -> None: ...
    def manifest(self, uuid: str) -> dict[str, Any]: ...


def chunks(remote: Remote, uuids: Iterable[str]) -> dict[str, set[str]]:
    """Each version's chunk hashes, as its manifest lists them. IntegrityError for a
    manifest that is missing or whose lists are not lists of text: a gc or prune that
    cannot tell what a version uses stops before it deletes anything."""
    found = {}
    for uuid in uuids:
        manifest = remote.manifest(uuid)
        lists = manifest.get("chunks") if isinstance(manifest, dict) else None
        if not (isinstance(lists, list) and all(
                isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)
                for hashes in lists)):
            raise IntegrityError(f"{remote.url}/versions/{uuid}.json: its chunks are not "
                                 "lists of chunk hashes")
        found[uuid] = {h for hashes in lists for h in hashes}
    return found


def garbage(packs: PackObjects, versions: Mapping[str, set[str]], cutoff: float
            ) -> dict[str, int]:
    """What a remote gc deletes when ``versions`` (uuid: its chunks, as ``chunks``
    gives them) are the versions there, of the objects last written at or before
    ``cutoff`` (a Unix time): each with its size, in the order to delete them.

    Those are pack objects holding no chunk a version uses nor a delta base of one,
    judged with their index as a pair by the younger of the two (the index goes first:
    never a listed index without its pack); indexes without their pack; and manifests
    of versions not there.
    """
    packs.index()
    live = set().union(*versions.values())
    todo = list(live)
    while todo:  # and their delta bases, those of every copy of a chunk
        for base in packs.bases_of.get(todo.pop(), ()):
            if base not in live:
                live.add(base)
                todo.append(base)
    used = {pack for pack, hashes in packs.packs_of.items() if hashes & live}
    listed = {m["path"]: m for m in packs.store.list("packs/")}

    def old(*keys: str) -> bool:
        return max(listed[k]["last_modified"].timestamp() for k in keys) <= cutoff

    found: dict[str, int] = {}
    for key in sorted(listed):
        stem = key[:-len(".pack")]
        if not key.endswith(".pack") or stem.rsplit("/", 1)[-1] in used:
            continue
        pair = [k for k in (f"{stem}.idx", key) if k in listed]
        if old(*pair):
            found.update((k, listed[k]["size"]) for k in pair)
    found.update((key, m["size"]) for key, m in listed.items() if key.endswith(".idx")
                 and f"{key[:-len('.idx')]}.pack" not in listed and old(key))
    found.update((m["path"], m["size"]) for m in packs.store.list("versions/")
                 if m["path"].rsplit("/", 1)[-1][:-len(".json")] not in versions
                 and m["last_modified"].timestamp() <= cutoff)
    return found


def prune(remote: Remote, name: str | None, *, keep_last: int | None, keep_aliased: bool,
          keep_tagged: bool, keep_since: datetime | str | None,
          dry_run: bool) -> PruneReport:
    """Delete the versions on ``remote`` (of model ``name``, or of every model) no rule
    keeps, in one log entry; with ``dry_run``, only say which. Either way, say what a
    remote gc then frees (once its grace period has passed)."""
    when = rules(keep_last, keep_tagged, keep_since)
    if name is not None:
        check_name(name)
    remote.check_descriptor(create=False)
    chosen: list[RemoteVersion] = []
    judged = 0

    def choose(state: State) -> list[dict[str, Any]]:
        nonlocal judged
        if name is not None:
            state.resolve(name)  # NotFoundError naming the model
        records = [state.record(uuid) for uuid, entry in state.versions.items()
                   if name is None or entry["model"] == name]
        chosen[:] = doomed(records, keep_last=keep_last, keep_aliased=keep_aliased,
                           keep_tagged=keep_tagged, keep_since=when)
        judged = len(records)
        return [{"op": "delete", "uuid": v.id} for v in chosen]

    state = remote.log.state()
    choose(state)
    # The manifests of the versions that stay, read before the write: one that cannot be
    # read stops the prune with nothing deleted, not after.
    gone = {v.id for v in chosen}
    used = chunks(remote, [uuid for uuid in state.versions if uuid not in gone])
    if chosen and not dry_run:
        remote.probe()
        state, _ = remote.log.commit(choose)
        gone = {v.id for v in chosen}
    left = [uuid for uuid in state.versions if uuid not in gone]
    used.update(chunks(remote, [uuid for uuid in left if uuid not in used]))  # pushed since
    freed = garbage(remote.packs, {uuid: used[uuid] for uuid in left}, math.inf)
    return PruneReport(tuple(chosen), judged - len(chosen), sum(freed.values()), dry_run)
