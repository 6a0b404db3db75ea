"""Remotes: versions pushed to and pulled from object storage, only the missing chunks.

A remote is a folder of objects in a store obstore reaches (``s3://``, ``gs://``,
``az://``, ``file://``, ``memory://``). Nothing there is ever overwritten: chunks travel
in content-named pack objects with an index each, versions as manifests named by their
id, and every change (version added, alias moved, tag set, version deleted) as the next
entry of a log, created only if absent. Two pushers racing for one entry: one wins, the
other reads it and takes the next. No lock server, no server of our own.

docs/remote.md is the layout and protocol. The pieces, one concept each:

    _store    the object-store client: reads, writes, size limits, URLs, credentials
    _names    the vault's remotes by name, and the ones this user confirmed
    _log      the log and its replay (State), checkpoints, appending an entry
    _objects  pack objects and their indexes: reading, the checked cache, the writer
    _remote   a remote as a whole (Remote): descriptor, locks, delete and gc; and
              Local, the vault's pieces that push and pull work on
    _push     push
    _pull     pull and clone, through the copier (so numbers and checks are merge's)
    _labels   the aliases and tags a pull follows: what the vault last saw on each
              remote, and the rule that settles them
"""

from ._names import add, check_remote, confirm, listed, named, remove, url_of
from ._pull import clone, pull
from ._push import push
from ._remote import DESCRIPTOR, Local, Remote
from ._store import LIMITS, Store

__all__ = ["DESCRIPTOR", "LIMITS", "Local", "Remote", "Store", "add", "check_remote",
           "clone", "confirm", "listed", "named", "pull", "push", "remove", "url_of"]
