"""In-process executor: one Workspace, jobs scored one at a time when ``wait`` is called."""
from __future__ import annotations

import os
import socket
from collections import deque

from ..errors import LBSearchError
from ..objective import score
from ..plan import Plan
from .base import Executor, Job, Outcome


class LocalExecutor(Executor):
    """Scores jobs in this process (tests, debugging, one-worker runs). ``workspace`` is an open
    Workspace or a WorkspaceSpec (opened on first use)."""

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
        job = self._queue.popleft()
        try:
            result = score(self.workspace, Plan.parse(job.plan), job.fidelity, job.tokens)
        except (LBSearchError, RuntimeError, ValueError) as exc:
            return [Outcome(job=job, error=f"{type(exc).__name__}: {exc}"[:500], worker=self.worker)]
        return [Outcome(job=job, result=result, worker=self.worker)]
