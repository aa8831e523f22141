"""One run per ``--out``: an advisory lock on ``OUT/.lock`` that names its holder.

``fcntl.flock`` is released by the kernel when its holder exits, however it exits (``kill -9``
included), so a lock can never be left held by a dead process. The file's text (host, PID, start
time) is emptied on a clean release; text found by a new holder is what a dead run left, and the
new holder says that it takes over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK = ".lock"


class LockHeld(Exception):
    """Another live process holds the folder's lock; the message names it."""


class RunLock:
    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise :class:`LockHeld`. Returns a line to print when the lock was
        taken over from a run that ended without releasing it (killed), else None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise LockHeld(f"{self.path.parent} is in use by another run ({_who(holder)}); wait for it to end, "
                           "or give this run another --out") from None
        left = _read(fd)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return f"taking over {self.path}, left by {_who(left)}, which is no longer running" if left else None

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict | None:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


def _who(holder: dict | None) -> str:
    if not holder:
        return "a process that has not written its name yet"
    if "pid" not in holder:
        return repr(holder.get("text"))
    return f"PID {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
