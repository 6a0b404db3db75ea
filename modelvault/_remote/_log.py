"""The log and its replay: what a remote holds, as every reader agrees it.

Each change to a remote (version added, alias moved, tag set, version deleted) is the
next log entry, created only if absent: two writers racing for one entry, one wins and
the other reads it and takes the next. ``State`` is the log replayed (from the latest
checkpoint); ``Log.commit`` appends an entry, and a checkpoint every CHECKPOINT_EVERY.
Events that are not well-formed are skipped by every reader alike (docs/remote.md,
"The log").
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import _json
from .._catalog import check_number, now, parse_time
from .._errors import IntegrityError, NotFoundError, RemoteError
from .._refs import UUID, check_alias, check_name, parse_ref
from .._reports import RemoteVersion
from ._store import HASH, Store, dumps, is_text, limit

CHECKPOINT_EVERY = 100  # log entries between checkpoints of the replayed state


def _passes(check: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """``check`` (which raises on a bad value) as a yes/no question."""

    def passes(value: Any) -> bool:
        try:
            check(value)
        except (ValueError, TypeError, IntegrityError):
            return False
        return True

    return passes


# What each field of an event may hold (docs/remote.md, "The log"): a value from the
# remote reaches SQLite, a vault's aliases and tags, and object keys, only through these.
_FIELDS: dict[str, Callable[[Any], bool]] = {
    "uuid": lambda v: isinstance(v, str) and UUID.fullmatch(v) is not None,
    "model": _passes(check_name),
    "alias": _passes(check_alias),
    "number": _passes(lambda v: check_number(v, "number")),
    "created_at": _passes(parse_time),
    "kind": is_text,
    "size": lambda v: type(v) is int and 0 <= v < 2**63,
    "key": lambda v: is_text(v) and v != "",
    "value": is_text,
    "digest": lambda v: isinstance(v, str) and HASH.fullmatch(v) is not None,
}
_EVENTS = {"add": ("model", "uuid", "number", "created_at", "kind", "size"),
           "alias": ("model", "alias"), "tag": ("uuid", "key"), "delete": ("uuid",)}


def _well_formed(event: Any) -> bool:
    """Whether ``event`` is one this format defines: an op, the fields it needs, and
    every field it has of its type and range (null only where it means "remove")."""
    return (isinstance(event, dict) and event.get("op") in _EVENTS
            and all(event.get(f) is not None for f in _EVENTS[event["op"]])
            and all(value is None or _FIELDS[f](value) for f, value in event.items()
                    if f in _FIELDS))


@dataclass
class State:
    """The remote as its log tells it, up to entry ``seq``."""

    seq: int = 0
    last: dict[str, int] = field(default_factory=dict)  # model: last number given out
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # uuid: entry
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # model: alias: uuid
    deleted: set[str] = field(default_factory=set)  # uuids deleted there

    @classmethod
    def restore(cls, saved: Any) -> State:
        """The state a checkpoint holds (``dump``); ValueError (or KeyError, TypeError)
        unless it is one replaying well-formed events could give."""
        state = cls(saved["seq"], dict(saved["last"]), dict(saved["versions"]),
                    {m: dict(a) for m, a in saved["aliases"].items()}, set(saved["deleted"]))
        if not (type(state.seq) is int and 0 <= state.seq < 2**62
                and all(_FIELDS["model"](m) and _FIELDS["number"](n)
                        for m, n in state.last.items())
                and all(isinstance(e, dict) and _well_formed({**e, "op": "add", "uuid": u})
                        and e["number"] <= state.last.get(e["model"], 0)
                        and isinstance(e.get("tags"), dict)
                        and all(_FIELDS["key"](k) and _FIELDS["value"](v)
                                for k, v in e["tags"].items())
                        for u, e in state.versions.items())
                and all(_FIELDS["alias"](a) and state.versions.get(u, {}).get("model") == m
                        for m, aliases in state.aliases.items() for a, u in aliases.items())
                and all(_FIELDS["uuid"](u) for u in state.deleted)):
            raise ValueError("not a state the log could give")
        return state

    def apply(self, events: Iterable[dict[str, Any]]) -> None:
        """Replay one entry's events. An event naming what is not there does nothing,
        so every reader replays a log to the same state."""
        for event in events:
            if not _well_formed(event):
                continue  # not an event this format defines: every reader skips it alike
            op = event["op"]
            uuid = event.get("uuid")
            if op == "add" and uuid not in self.versions:
                model = event["model"]
                number = max(event["number"], self.last.get(model, 0) + 1)  # else taken
                if not _FIELDS["number"](number):
                    continue  # the model has given out every number
                self.last[model] = number
                self.deleted.discard(uuid)
                self.versions[uuid] = {"model": model, "number": number, "tags": {},
                                       **{k: event.get(k) for k in ("created_at", "kind",
                                                                   "size", "digest")}}
            elif op == "alias" and (uuid is None or uuid in self.versions):
                aliases = self.aliases.setdefault(event["model"], {})
                if uuid is None:
                    aliases.pop(event["alias"], None)
                elif self.versions[uuid]["model"] == event["model"]:
                    aliases[event["alias"]] = uuid
            elif op == "tag" and uuid in self.versions:
                tags = self.versions[uuid]["tags"]
                if event.get("value") is None:
                    tags.pop(event["key"], None)
                else:
                    tags[event["key"]] = event["value"]
            elif op == "delete" and uuid in self.versions:
                self.deleted.add(uuid)
                model = self.versions.pop(uuid)["model"]
                for alias, target in list(self.aliases.get(model, {}).items()):
                    if target == uuid:
                        del self.aliases[model][alias]

    def resolve(self, text: str) -> str:
        """The uuid of the version ``text`` (name, name:N, name@alias) names."""
        ref = parse_ref(text)
        mine = {u: v for u, v in self.versions.items() if v["model"] == ref.name}
        if not mine:
            raise NotFoundError(f"no model {ref.name!r} on the remote")
        if ref.alias is not None:
            if ref.alias not in self.aliases.get(ref.name, {}):
                raise NotFoundError(f"no alias {ref.name}@{ref.alias} on the remote")
            return self.aliases[ref.name][ref.alias]
        if ref.version is None:
            return max(mine, key=lambda u: mine[u]["number"])
        for uuid, entry in mine.items():
            if entry["number"] == ref.version:
                return uuid
        raise NotFoundError(f"no version {ref.name}:{ref.version} on the remote")

    def record(self, uuid: str) -> RemoteVersion:
        entry = self.versions[uuid]
        aliases = tuple(sorted(a for a, u in self.aliases.get(entry["model"], {}).items()
                               if u == uuid))
        return RemoteVersion(entry["model"], entry["number"], uuid, entry["created_at"],
                             entry["kind"], entry["size"], aliases, dict(entry["tags"]))

    def dump(self) -> dict[str, Any]:
        return {"seq": self.seq, "last": self.last, "versions": self.versions,
                "aliases": self.aliases, "deleted": sorted(self.deleted)}


def log_key(seq: int) -> str:
    return f"log/{seq:012d}.json"


class Log:
    """A remote's log, replayed and appended to through ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self._state = State()

    def state(self) -> State:
        """Replay the log from the last checkpoint (or the state read before)."""
        state = self._state
        if state.seq == 0:
            points = self.store.list("checkpoints/")
            if points:
                try:
                    data = self.store.get(points[-1]["path"], "checkpoint")
                    state = State.restore(_json.loads(data or b""))
                except (ValueError, KeyError, TypeError, IntegrityError):
                    state = State()  # a damaged checkpoint: the log alone decides
        keys = []
        for meta in self.store.list("log/", after=log_key(state.seq)):
            name = meta["path"].rsplit("/", 1)[1].split(".")[0]
            if not name.isdigit() or int(name) != state.seq + 1 + len(keys):
                break  # a gap: entries are created in order, so it is one being made
            keys.append(meta["path"])
        # Fetched side by side (obstore lets go of the GIL), applied in order.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(keys) or 1)) as pool:
            entries = list(pool.map(lambda key: self.store.get(key, "log"), keys))
        for key, data in zip(keys, entries, strict=True):
            try:
                events = _json.loads(data or b"")["events"]
                if not isinstance(events, list):
                    raise TypeError("events is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                raise IntegrityError(f"{self.url}/{key}: unreadable log entry ({exc}); the "
                                     "remote's history cannot be read past it") from exc
            state.apply(events)
            state.seq += 1
        self._state = state
        return state

    def commit(self, make: Callable[[State], list[dict[str, Any]]]) -> tuple[State, int]:
        """Append the events ``make`` gives for the current state as the next log entry,
        reading and trying again when another writer took that entry first. Returns the
        state after it and the entry's number (0 if ``make`` gave no events)."""
        while True:
            state = self.state()
            events = make(state)
            if not events:
                return state, 0

            entry = dumps({"at": now(), "by": f"{os.environ.get('USER', '?')}@"
                           f"{socket.gethostname()}", "events": events})
            if len(entry) > limit("log"):  # readers would refuse it
                raise RemoteError(f"{self.url}: this log entry would be {len(entry)} bytes, "
                                  f"more than the {limit('log')} readers take; push fewer "
                                  "versions at once")
            seq = state.seq + 1
            if self.store.put(log_key(seq), entry, create=True):
                state.apply(events)
                state.seq = seq
                point = dumps(state.dump()) if seq % CHECKPOINT_EVERY == 0 else b""
                if point and len(point) <= limit("checkpoint"):  # else readers ignore it
                    self.store.put(f"checkpoints/{seq:012d}.json", point, create=True)
                return state, seq
