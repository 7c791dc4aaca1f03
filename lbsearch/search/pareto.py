"""The Pareto front and its hypervolume, from the study's storage alone.

Hypervolume is exact in any dimension: a sweep in two objectives, slicing along the last
objective above that. Every objective is a loss here (maximised ones negated); a point that is
not better than the reference in every objective adds nothing. The front holds feasible COMPLETE
trials, one per plan (the first trial that scored it), none dominated by another.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..objective import TrialResult
from .objectives import as_loss


# -- hypervolume ---------------------------------------------------------------------------
def hypervolume(loss, reference) -> float:
    """Volume dominated by the rows of ``loss`` (minimised) and bounded by ``reference``."""
    pts, ref = np.asarray(loss, dtype=float), np.asarray(reference, dtype=float)
    pts = pts.reshape(-1, ref.size)
    pts = pts[np.all(pts < ref, axis=1)]
    return float(_volume(pts, ref)) if len(pts) else 0.0


def _volume(pts: np.ndarray, ref: np.ndarray) -> float:
    if pts.shape[1] == 1:
        return ref[0] - pts[:, 0].min()
    if pts.shape[1] == 2:
        area, top = 0.0, ref[1]
        for x, y in pts[np.lexsort((pts[:, 1], pts[:, 0]))]:
            if y < top:
                area += (ref[0] - x) * (top - y)
                top = y
        return area
    pts = pts[np.argsort(pts[:, -1], kind="stable")]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if upper > pts[i, -1]:
            below = pts[: i + 1, :-1]
            if below.shape[1] > 2:  # the 2-D sweep skips dominated points by itself
                below = below[pareto_mask(below)]
            volume += (upper - pts[i, -1]) * _volume(below, ref[:-1])
    return volume


def pareto_mask(loss) -> np.ndarray:
    """Rows no other row dominates (<= everywhere, < somewhere); equal rows all stay."""
    pts = np.asarray(loss, dtype=float)
    if not len(pts):
        return np.zeros(0, dtype=bool)
    le = np.all(pts[:, None, :] <= pts[None, :, :], axis=2)  # le[j, i]: row j <= row i everywhere
    lt = np.any(pts[:, None, :] < pts[None, :, :], axis=2)
    return ~np.any(le & lt, axis=0)


def contributions(loss, reference) -> np.ndarray:
    """Each row's exclusive hypervolume (what the front loses without it)."""
    pts = np.asarray(loss, dtype=float)
    total = hypervolume(pts, reference)
    return np.array([total - hypervolume(np.delete(pts, i, axis=0), reference) for i in range(len(pts))])


# -- the front -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Scored:
    """One scored plan as the study holds it."""

    trial: int
    plan: str
    key: str
    values: tuple[float, ...]  # in the study's objective order and directions
    result: TrialResult  # at the search fidelity
    origin: str = ""  # threshold | prior | <sampler> | retry
    rescored: dict = field(default_factory=dict)  # fidelity -> TrialResult, or {"error": ...}


@dataclass(frozen=True, kw_only=True)
class Front:
    study: str
    objectives: list[str]
    directions: list[str]
    reference: list[float]
    fidelity: str  # the search's
    points: list[Scored]  # the front, by the first objective
    scored: list[Scored]  # every feasible scored plan (one per plan)
    hypervolume: float
    history: list[list[float]] = field(default_factory=list)  # [trial number, hypervolume]

    @property
    def thresholds(self) -> list[Scored]:
        return [s for s in self.scored if s.origin == "threshold"]


def unique_plans(scored: list[Scored]) -> list[Scored]:
    """The first trial of every plan."""
    first: dict[str, Scored] = {}
    for s in sorted(scored, key=lambda s: s.trial):
        first.setdefault(s.key, s)
    return list(first.values())


def build_front(scored: list[Scored], *, study: str, objectives: list[str], directions: list[str],
                reference: list[float], fidelity: str, history=()) -> Front:
    """The front of ``scored`` (feasible plans; repeats of a plan are dropped)."""
    scored = unique_plans(scored)
    loss = as_loss([s.values for s in scored], directions) if scored else np.zeros((0, len(directions)))
    ref = as_loss(reference, directions)[0]
    mask = pareto_mask(loss)
    points = sorted((s for s, m in zip(scored, mask) if m), key=lambda s: (s.values, s.trial))
    return Front(study=study, objectives=list(objectives), directions=list(directions), reference=list(reference),
                 fidelity=fidelity, points=points, scored=scored, hypervolume=hypervolume(loss[mask], ref),
                 history=[list(h) for h in history])


def scored_from_trial(trial, rescored: dict | None = None) -> Scored:
    attrs = trial.user_attrs
    return Scored(trial=trial.number, plan=attrs["plan"], key=attrs["key"], values=tuple(trial.values),
                  result=TrialResult.from_dict(attrs["result"]), origin=attrs.get("origin", ""),
                  rescored=results_by_fidelity(rescored or {}))


def results_by_fidelity(by_fidelity: dict) -> dict:
    """A stored ``rescored`` entry: fidelity -> TrialResult (or the error dict)."""
    return {f: (r if "error" in r else TrialResult.from_dict(r)) for f, r in by_fidelity.items()}


def load_front(study) -> Front:
    """The front of an Optuna study written by the driver (feasible COMPLETE trials)."""
    from optuna.trial import TrialState

    attrs = study.user_attrs
    rescored = attrs.get("rescored", {})
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "result" in t.user_attrs and all(v <= 0 for v in t.constraints.values())]
    scored = [scored_from_trial(t, rescored.get(str(t.number))) for t in trials]
    return build_front(scored, study=study.study_name, objectives=attrs["objectives"],
                       directions=[d.name.lower() for d in study.directions], reference=attrs["reference_point"],
                       fidelity=attrs.get("fidelity", ""), history=attrs.get("hypervolume", []))


def front_from_storage(storage_url: str, study_name: str) -> Front:
    """Recompute the front from the storage alone (no driver state)."""
    from .store import load_study

    return load_front(load_study(storage_url, study_name))
