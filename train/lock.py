"""One training process per output directory: a lock file holding the holder's pid and host.

A second ``bla train`` on the same ``out_dir`` is refused with a message naming the holder; a
lock left by a process that died (same host, pid gone), or a lock file that names no holder, is
taken over. The lock is a hard link to a file already holding its holder: creating it is atomic,
so two processes racing for it cannot both win, and none ever sees it empty.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".bla-train.lock"


class OutDirLocked(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's holder, or None for a file that names none (damaged, or not ours): treated as stale.
    The lock is published whole (``acquire``), so a file being written is never seen."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or isinstance(holder.get("pid"), bool) or not isinstance(holder.get("pid"), int):
        return None
    return holder


def acquire(out_dir: Path, log=print) -> Path:
    """Take ``out_dir``'s lock for this process; raises OutDirLocked if a live process holds it."""
    path = Path(out_dir) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    # the lock is written under a private name and linked into place: it appears with its holder
    # in it, so a racing process never reads an empty lock and takes it for stale
    mine = path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}")
    mine.write_text(json.dumps(me))
    try:
        return _take(path, mine, me, out_dir, log)
    finally:
        mine.unlink(missing_ok=True)


def _take(path: Path, mine: Path, me: dict, out_dir: Path, log) -> Path:
    for _ in range(2):  # a second try after removing a stale lock
        try:
            os.link(mine, path)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder.get("host") != me["host"]:
                raise OutDirLocked(
                    f"{out_dir} is locked by pid {holder.get('pid')} on host {holder.get('host')} ({path}); "
                    f"if that run is gone, delete the lock file"
                ) from None
            if holder is not None and _alive(holder["pid"]):
                raise OutDirLocked(
                    f"{out_dir} is in use by another training process (pid {holder['pid']} on this host; "
                    f"lock {path}): use another out_dir, or wait for it to finish"
                ) from None
            log(f"taking over the stale lock {path} (holder {holder} is not running)")
            path.unlink(missing_ok=True)
            continue
        return path
    raise OutDirLocked(f"could not take the lock {path}: another process keeps creating it")


def release(path: Path | None) -> None:
    """Remove the lock if this process still holds it."""
    if path is None:
        return
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
