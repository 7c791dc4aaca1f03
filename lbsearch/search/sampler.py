"""Samplers: the base samplers by name, and the sensitivity prior that wraps one.

:class:`SensitivityPriorSampler` wraps a base sampler the way Optuna's ``PartialFixedSampler``
does. While the study has fewer than ``n_startup_trials`` finished trials (complete or pruned,
enqueued threshold plans included — TPE counts them the same way), it returns no relative
search space and draws each layer's choice independently from the prior probabilities
(:func:`lbsearch.search.prior.prior_probabilities`); afterwards it defers to the base sampler.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True, kw_only=True)
class SamplerKind:
    name: str
    help: str
    build: Callable[[int | None, int], BaseSampler]  # (seed, n_startup_trials) -> sampler


def _gp(seed, n_startup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)


SAMPLERS: dict[str, SamplerKind] = {k.name: k for k in (
    SamplerKind(name="tpe", help="multi-objective TPE (constant liar for batched asks)",
                build=lambda seed, n: optuna.samplers.TPESampler(seed=seed, n_startup_trials=n)),
    SamplerKind(name="nsga2", help="NSGA-II (population = the startup trials, at least 8)",
                build=lambda seed, n: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(n, 8))),
    SamplerKind(name="gp", help="Gaussian process (logEHVI)", build=_gp),
    SamplerKind(name="random", help="uniform random", build=lambda seed, n: optuna.samplers.RandomSampler(seed=seed)),
)}


class SensitivityPriorSampler(BaseSampler):
    """``base`` with prior draws during startup; ``probabilities``: param -> {choice: p}."""

    def __init__(self, base: BaseSampler, probabilities: dict[str, dict[str, float]], n_startup_trials: int,
                 seed: int | None = None):
        self._base, self._probs, self._n_startup = base, probabilities, n_startup_trials
        self._rng = np.random.default_rng(seed)
        self._prior_trials: set[int] = set()  # trial ids drawn from the prior

    def is_prior_trial(self, trial_id: int) -> bool:
        """Whether the trial with this storage id was (or is being) drawn from the prior."""
        return trial_id in self._prior_trials

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._base.reseed_rng()

    def before_trial(self, study, trial) -> None:
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if finished < self._n_startup:
            self._prior_trials.add(trial._trial_id)
        self._base.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        if trial._trial_id in self._prior_trials:
            return {}
        return self._base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        return self._base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        probs = self._probs.get(param_name)
        choices = getattr(param_distribution, "choices", None)
        if trial._trial_id in self._prior_trials and probs and choices and set(probs) == set(choices):
            p = np.array([probs[c] for c in choices])
            return choices[int(self._rng.choice(len(choices), p=p / p.sum()))]
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._base.after_trial(study, trial, state, values)


def make_sampler(name: str, seed: int | None, n_startup_trials: int,
                 probabilities: dict[str, dict[str, float]] | None = None) -> BaseSampler:
    """The base sampler ``name``, wrapped in the prior when ``probabilities`` are given."""
    base = SAMPLERS[name].build(seed, n_startup_trials)
    if probabilities is None:
        return base
    return SensitivityPriorSampler(base, probabilities, n_startup_trials, seed=None if seed is None else seed + 1)
