"""The ``lbsearch`` commands: one module each, each exporting one :class:`Command` record."""
from __future__ import annotations

from . import bench, export, heal, pareto, plan, run, search, sensitivity
from .common import Command

COMMANDS: dict[str, Command] = {c.name: c for c in (run.COMMAND, sensitivity.COMMAND, heal.COMMAND, bench.COMMAND,
                                                     plan.COMMAND, search.COMMAND, pareto.COMMAND, export.COMMAND)}

__all__ = ["COMMANDS", "Command"]
