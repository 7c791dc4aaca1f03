"""The executor interface the search driver talks to, and what travels between them.

The driver submits :class:`Job` s (a plan and a fidelity) and collects :class:`Outcome` s; it
never sees workers. Workers build one :class:`~lbsearch.workspace.Workspace` each from a
picklable :class:`WorkspaceSpec` and score plan after plan with :func:`lbsearch.objective.score`.
Retries belong to the executor: an outcome is final (a result, or an error after the retries).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

from ..objective import TrialResult


@dataclass(frozen=True, kw_only=True)
class WorkspaceSpec:
    """How a worker opens its Workspace (plain data, so it pickles to Ray actors)."""

    space: dict  # SearchSpace.model_dump()
    device: str | None = None
    cache: str | None = None  # LBSEARCH_CACHE for the worker
    model: str | None = None
    library: str | None = None
    transfer: dict | None = None
    defaults: dict | None = None

    def open(self):
        from ..space import SearchSpace
        from ..workspace import Workspace

        return Workspace.open(SearchSpace.model_validate(self.space), device=self.device, cache=self.cache,
                              model=self.model, library=self.library, transfer=self.transfer,
                              defaults=self.defaults, progress=False)


@dataclass(frozen=True, kw_only=True)
class Job:
    """Score ``plan`` (a plan string, exact: Plan.parse gives it back) at ``fidelity``."""

    id: int  # the driver's handle, normally the Optuna trial number
    plan: str
    fidelity: str = "assembled"
    tokens: int | None = None  # healing budget override
    keep: str | None = None  # a folder: keep the healed model there (score(keep=...)); shared storage on a cluster


@dataclass(frozen=True, kw_only=True)
class Outcome:
    job: Job
    result: TrialResult | None = None  # None when the job failed for good
    error: str | None = None  # one line: why it failed
    worker: str = ""  # who scored it (host:pid)
    attempts: int = 1
    details: dict = field(default_factory=dict)


class Executor(abc.ABC):
    """Runs jobs; ``slots`` of them at a time."""

    slots: int = 1

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts when a slot is free."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Finished outcomes; blocks until at least one is ready (or ``timeout`` seconds pass)."""

    @abc.abstractmethod
    def pending(self) -> int:
        """Jobs submitted and not yet returned by ``wait``."""

    def close(self) -> None:
        """Release workers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
