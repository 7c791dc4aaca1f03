"""In-process executor: one Workspace, jobs scored one at a time when ``wait`` is called."""
from __future__ import annotations

import os
import socket
import time
import traceback
from collections import deque

from ..errors import LBSearchError
from ..objective import score
from ..plan import Plan
from .base import Executor, Job, Outcome


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"[:500]


def describe(exc: Exception) -> tuple[str, dict]:
    """(one-line error, details) of a plan that raised: a traceback too unless it is the user's error."""
    return one_line(exc), ({} if isinstance(exc, LBSearchError) else {"traceback": traceback.format_exc()[-2000:]})


class LocalExecutor(Executor):
    """Scores jobs in this process (tests, debugging, one-worker runs). ``workspace`` is an open
    Workspace or a WorkspaceSpec (opened on first use). Like every executor, a plan that fails
    comes back as an Outcome with ``error`` (one line; ``details["traceback"]`` for bugs)."""

    slots = 1

    def __init__(self, workspace):
        self._workspace, self._queue = workspace, deque()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def workspace(self):
        if not hasattr(self._workspace, "student"):
            self._workspace = self._workspace.open()
        return self._workspace

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def pending(self) -> int:
        return len(self._queue)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self._queue:
            return []
        workspace = self.workspace  # a workspace that cannot open is the user's error, raised as such
        job = self._queue.popleft()
        start = time.perf_counter()
        try:
            result = score(workspace, Plan.parse(job.plan), job.fidelity, job.tokens, job.keep)
        except Exception as exc:  # noqa: BLE001 - a plan's failure is an outcome; the driver goes on
            error, details = describe(exc)
            return [Outcome(job=job, error=error, worker=self.worker,
                            details={**details, "seconds": time.perf_counter() - start})]
        return [Outcome(job=job, result=result, worker=self.worker,
                        details={"seconds": time.perf_counter() - start})]
