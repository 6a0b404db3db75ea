"""Files that appear whole or not at all: scratch files beside a target, fsync, and
putting a finished file into place.

Owns the file-system side of creating a vault, exporting one and writing a key file.
What goes inside those files is left to ``_schema``, the copier and ``_trust``.
"""

from __future__ import annotations

# glob, socket and shutil are imported by the functions that use them: opening a vault
# that exists needs none of them.
import os
import threading
from pathlib import Path


def scratch_path(path: Path, suffix: str) -> Path:
    """A file beside ``path`` to build it in, named by host, process and thread.

    Scratch files of processes on this host that no longer run (killed mid-build) are
    deleted first, with their journals; another host's (seen through a synced folder)
    are left alone, since its process may still be writing.
    """
    import glob
    import socket

    prefix = f".{path.name}.{socket.gethostname()}."
    # "." + prefix: the scratch file a scratch file was itself created in (a vault
    # exported to DEST is created in DEST's scratch file, which is created in its own).
    for start in (prefix, f".{prefix}"):
        for old in path.parent.glob(f"{glob.escape(start)}*{suffix}*"):
            pid = old.name[len(start):].split(".", 1)[0]
            try:
                if pid.isascii() and pid.isdigit() and not _running(int(pid)):
                    old.unlink(missing_ok=True)
            except (OSError, OverflowError):
                pass  # not ours to delete, or no pid at all: leave it
    return path.with_name(f"{prefix}{os.getpid()}.{threading.get_ident()}{suffix}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def place(built: Path, path: Path, *, mode: int = 0o666) -> None:
    """Put the finished file ``built`` at ``path`` unless a file is there already.

    A hard link makes it appear complete or not at all, and if two threads or
    processes place one at once, the first wins and the other keeps the winner's
    (a plain exclusive create would let a reader meet a file still empty). Where the
    file system has no hard links (FAT, some shares), the bytes are copied into an
    exclusively created file of ``mode`` (less the umask), flushed to disk. ``built``
    stays where it is: the caller deletes it.
    """
    try:
        os.link(built, path)
        return
    except FileExistsError:
        return
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return
    import shutil

    with os.fdopen(fd, "wb") as out, open(built, "rb") as source:
        shutil.copyfileobj(source, out)
        out.flush()
        os.fsync(out.fileno())


def fsync(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Flush a file no connection holds open (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
