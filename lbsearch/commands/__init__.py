"""The ``lbsearch`` commands: one module each, each exporting one :class:`Command` record."""
from __future__ import annotations

from . import bench, heal, plan, sensitivity
from .common import Command

COMMANDS: dict[str, Command] = {c.name: c for c in (sensitivity.COMMAND, heal.COMMAND, bench.COMMAND,
                                                     plan.COMMAND)}

__all__ = ["COMMANDS", "Command"]
