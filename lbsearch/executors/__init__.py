"""Executors score plans for the search driver: in process (local) or on Ray actors (ray)."""
from .base import Executor, Job, Outcome, WorkspaceSpec

__all__ = ["Executor", "Job", "Outcome", "WorkspaceSpec"]
