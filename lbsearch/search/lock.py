"""One driver per run folder: a lock file holding the driver's pid and host.

A lock left by a dead process on this host is stale and taken over; a live one (or one from
another host, which cannot be checked) refuses with a one-line error.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import LBSearchError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLock:
    """``with DriverLock(run_dir / ".driver.lock"):`` — held for the length of a search."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.held = False

    def holder(self) -> dict | None:
        """Who holds the lock (None: nobody, or a stale lock of a dead process on this host)."""
        try:
            info = json.loads(self.path.read_text())
            pid, host = int(info["pid"]), str(info["host"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: a driver that died while writing it
        if host == socket.gethostname() and not _alive(pid):
            return None
        return {"pid": pid, "host": host, "since": info.get("since")}

    def check(self) -> None:
        """Raise when another driver holds the lock (before heavy work; :meth:`acquire` takes it)."""
        who = self.holder()
        if who is not None and not self.held:
            raise LBSearchError(f"{self.path}: another search driver holds this run (pid {who['pid']} on "
                                f"{who['host']}); wait for it, or delete the file if that driver is gone")

    def acquire(self) -> "DriverLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self.check()
                self.path.unlink(missing_ok=True)  # stale: its driver is dead
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
            self.held = True
            return self
        self.check()
        raise LBSearchError(f"{self.path}: could not take the driver lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
