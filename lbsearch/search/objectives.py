"""The search's objectives: one record each (direction, how a TrialResult gives it, its worst value).

The worst value is the hypervolume reference: a plan that bad or worse is worth nothing. It is
derived once from the model and the space (KL of a uniform guess, the teacher's speed and KV
memory, ...) and written into the study, so every hypervolume of a study uses the same point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..cost import ModelShape, kv_bytes_per_seq
from ..errors import LBSearchError
from ..objective import TrialResult
from ..plan import Plan


@dataclass(frozen=True, kw_only=True)
class Objective:
    name: str
    direction: str  # "minimize" | "maximize" (Optuna's words)
    label: str
    get: Callable[[TrialResult], float]
    worst: Callable[[ModelShape, object], float]  # (shape, space) -> the hypervolume reference

    @property
    def sign(self) -> float:
        """Multiply by this to get a loss (every objective minimised)."""
        return 1.0 if self.direction == "minimize" else -1.0


def _teacher_kv_mb(shape: ModelShape, space) -> float:
    t = space.target
    return kv_bytes_per_seq(shape, Plan.softmax(shape.layers), t.prompt + t.output) / 2**20


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective(name="kl", direction="minimize", label="KL to the teacher (nats/token)", get=lambda r: r.kl,
              worst=lambda shape, space: math.log(shape.vocab)),  # a uniform guess is at most this far
    Objective(name="perplexity", direction="minimize", label="perplexity", get=lambda r: r.perplexity,
              worst=lambda shape, space: float(shape.vocab)),  # a uniform guess's perplexity
    Objective(name="agreement", direction="maximize", label="top-1 agreement with the teacher",
              get=lambda r: r.agreement, worst=lambda shape, space: 0.0),
    Objective(name="throughput", direction="maximize", label="predicted decode throughput / teacher's",
              get=lambda r: r.throughput_ratio, worst=lambda shape, space: 1.0),  # no faster than the teacher
    Objective(name="memory", direction="minimize", label="KV cache MB per sequence",
              get=lambda r: r.kv_mb_per_seq, worst=_teacher_kv_mb),
)}


def objectives_of(space) -> list[Objective]:
    names = list(space.objectives)
    if len(set(names)) != len(names):
        raise LBSearchError(f"space: objectives: {names} lists an objective twice")
    return [OBJECTIVES[n] for n in names]


def reference_point(space, shape: ModelShape) -> list[float]:
    """The hypervolume reference in the objectives' own units (``search.reference`` overrides)."""
    return [float(space.search.reference.get(o.name, o.worst(shape, space))) for o in objectives_of(space)]


def values_of(result: TrialResult, objectives: list[Objective]) -> list[float]:
    return [float(o.get(result)) for o in objectives]


def as_loss(values, directions: list[str]) -> np.ndarray:
    """Objective values (rows) in study directions -> losses, every column minimised."""
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(signs)) * signs
