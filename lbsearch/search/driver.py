"""The search driver: Optuna ask/tell over an executor; the only writer of the study.

Asks are batched so every executor slot stays busy. Each asked trial becomes a plan
(:func:`~lbsearch.search.params.plan_from_trial`); an infeasible plan is told PRUNED without
reaching a worker; a plan the study already scored is told its stored result; the rest become
executor jobs. Every finished trial appends ``[number, hypervolume]`` to the study's
``hypervolume`` attribute and calls the callbacks ``cb(study, trial_number, outcome, state)``
(``outcome`` is None for pruned trials; re-scores of front plans call them with ``state=None``).

Resume: a lock file keeps one driver per run; trials a dead driver left RUNNING are told FAIL
and their parameters enqueued again (``retry_of``); finished trials are never run again.
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from ..errors import LBSearchError
from ..executors.base import Executor, Job, Outcome
from ..io import stable_hash
from ..objective import FIDELITIES, TrialResult
from ..sensitivity import SensitivityTable
from ..space import SearchSpace
from .lock import DriverLock
from .objectives import as_loss, objectives_of, reference_point, values_of
from .pareto import (Front, Scored, build_front, contributions, hypervolume, pareto_mask, results_by_fidelity,
                     scored_from_trial)
from .params import constraint_values, feasible, model_shape, plan_from_trial, searchable
from .prior import prior_probabilities, threshold_plans
from .sampler import SensitivityPriorSampler, make_sampler
from .store import open_storage, shown, sqlite_url, study_names

Callback = Callable[[optuna.Study, int, "Outcome | None", "TrialState | None"], None]
MAX_PRUNED_IN_A_ROW, MAX_FAILED_IN_A_ROW, MAX_REUSED_IN_A_ROW = 1000, 10, 200


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One search: the space as it runs (its ``search:`` section is the settings) and where it lives."""

    space: SearchSpace  # as it runs: after ``space.on(device)``
    run_dir: Path  # holds the driver lock, and the SQLite storage by default
    storage: str | None = None  # an Optuna RDB URL; default sqlite:///<run_dir>/optuna.db
    study_name: str | None = None  # default lbsearch-<model name>
    table: SensitivityTable | None = None  # the prior's source; None: no prior
    prior: bool = True
    resume: bool = False
    progress: bool = True
    finalists: Path | None = None  # re-scored (healed) plans are kept in finalists/<plan key>/healed

    @property
    def storage_url(self) -> str:
        return self.storage or sqlite_url(self.run_dir)

    @property
    def name(self) -> str:
        return self.study_name or default_study_name(self.space)


def default_study_name(space) -> str:
    ref = Path(space.model)
    return f"lbsearch-{ref.stem if ref.suffix == '.gguf' else ref.name}"


def space_key(space) -> str:
    """What makes two studies' numbers comparable: the space without its search settings."""
    return stable_hash(space.model_dump(mode="json", exclude={"search", "cpu"}))


@dataclass(frozen=True, kw_only=True)
class SearchReport:
    study: str
    storage: str  # password hidden
    front: Front
    counts: dict  # this session: scored, reused, pruned, failed, retried, rescored
    seconds: float


class Driver:
    """See the module docstring; :func:`search` runs one."""

    def __init__(self, config: SearchConfig, executor: Executor, callbacks: Sequence[Callback] = ()):
        self.config, self.executor, self.callbacks = config, executor, list(callbacks)
        self.space, self.settings = config.space, config.space.search
        if self.settings.trials is None and self.settings.time_budget is None:
            raise LBSearchError("search: give a trial budget (--trials) or a time budget (--time-budget)")
        self.shape = model_shape(self.space)
        self.n_layers = self.shape.layers
        if not searchable(self.space, self.n_layers):
            raise LBSearchError("space: every layer is pinned to one choice; there is nothing to search")
        self.objectives = objectives_of(self.space)
        self.directions = [o.direction for o in self.objectives]
        self.counts: Counter = Counter()
        self.known: dict[str, tuple[int, dict]] = {}  # plan key -> (trial number, result dict)
        self.scored: list[Scored] = []
        self.inflight: dict[str, list] = {}  # plan key -> trials waiting for its job (the first submitted it)
        self.jobs: dict[int, str] = {}  # job id -> plan key
        self.complete, self.hv, self.front_size = 0, 0.0, 0
        self.study = self.bar = self.deadline = None
        self._pruned_row = self._failed_row = self._reused_row = 0

    # -- the study ---------------------------------------------------------------------------
    def open(self) -> None:
        storage, name, s = open_storage(self.config.storage_url), self.config.name, self.settings
        if name in study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
            n_trials = len(study.get_trials(deepcopy=False))
            if n_trials and not self.config.resume:
                raise LBSearchError(f"study {name!r} in {shown(self.config.storage_url)} has {n_trials} trials; "
                                    "pass --resume to continue it, or another --out / --study")
            if n_trials and "reference_point" not in study.user_attrs:
                raise LBSearchError(f"study {name!r}: not made by `lbsearch search`; use another --study")
            self._check_same(study)
        else:
            study = optuna.create_study(storage=storage, study_name=name, directions=self.directions)
        attrs = {"objectives": [o.name for o in self.objectives], "fidelity": s.fidelity,
                 "reference_point": reference_point(self.space, self.shape), "space_key": space_key(self.space),
                 "model": self.space.model, "n_layers": self.n_layers, "hypervolume": [], "rescored": {}}
        for key, value in attrs.items():
            if key not in study.user_attrs:  # written once: the reference point never changes
                study.set_user_attr(key, value)
        self.study = study
        self.reference = study.user_attrs["reference_point"]
        probs = None
        if self.config.prior and self.config.table is not None:
            probs = prior_probabilities(self.config.table, self.space, self.shape)
        seed = s.seed + len(study.trials)  # a resumed study does not replay the first run's draws
        study.sampler = make_sampler(s.sampler, seed, s.n_startup_trials, probs)
        self._recover()
        if probs is not None:
            for (n_none, n_lswa), params in threshold_plans(self.config.table, self.space, self.shape):
                study.enqueue_trial(params, user_attrs={"origin": "threshold", "threshold": [n_none, n_lswa]},
                                    skip_if_exists=True)
        self._load()

    def _check_same(self, study) -> None:
        attrs, name = study.user_attrs, study.study_name
        checks = {"objectives": [o.name for o in self.objectives], "fidelity": self.settings.fidelity,
                  "space_key": space_key(self.space)}
        if [d.name.lower() for d in study.directions] != self.directions:
            raise LBSearchError(f"study {name!r}: has directions {[d.name.lower() for d in study.directions]}, "
                                f"this search {self.directions}; use another --study or --out")
        for key, want in checks.items():
            if key in attrs and attrs[key] != want:
                raise LBSearchError(f"study {name!r}: was made with {key} {attrs[key]!r}, this search has "
                                    f"{want!r}; use another --study or --out")

    def _recover(self) -> None:
        """Trials a dead driver left RUNNING: FAIL, and their parameters enqueued again."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self._retire(t._trial_id, t.number, dict(t.params), t.user_attrs.get("origin"),
                         "the driver stopped before this trial finished")

    def _retire(self, trial_id: int, number: int, params: dict, origin: str | None, reason: str) -> None:
        optuna.trial.Trial(self.study, trial_id).set_user_attr("fail_reason", reason)
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        if set(params) == set(searchable(self.space, self.n_layers)):
            attrs = {"retry_of": number, **({"origin": origin} if origin else {})}
            self.study.enqueue_trial(params, user_attrs=attrs)  # not skip_if_exists: it matches FAIL trials
            self.counts["retried"] += 1

    def _load(self) -> None:
        attrs = self.study.user_attrs
        self.rescored = dict(attrs.get("rescored", {}))
        self.history = [list(h) for h in attrs.get("hypervolume", [])]
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self.complete += 1
            key = t.user_attrs.get("key")
            if "result" in t.user_attrs and feasible(t.constraints) and key not in self.known:
                self.known[key] = (t.number, t.user_attrs["result"])
                self.scored.append(scored_from_trial(t))
        self._update_front()

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        s = self.settings
        self.deadline = time.monotonic() + s.time_budget if s.time_budget else None
        self.bar = tqdm(total=s.trials, initial=min(self.complete, s.trials or self.complete), unit="trial",
                        desc="search", disable=not self.config.progress, dynamic_ncols=True)
        self._postfix()
        try:
            while True:
                self._fill()
                if not self.jobs:
                    break
                for outcome in self.executor.wait(timeout=5.0):
                    self._collect(outcome)
        finally:
            self._abandon()
            self.bar.close()

    def _budget_left(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self._reused_row >= MAX_REUSED_IN_A_ROW:
            return False  # the sampler keeps proposing scored plans: the space looks exhausted
        waiting = sum(len(v) for v in self.inflight.values())
        return self.settings.trials is None or self.complete + waiting < self.settings.trials

    def _fill(self) -> None:
        while self._budget_left() and self.executor.pending() < self.executor.slots:
            trial = self.study.ask()
            self._start(trial, plan_from_trial(trial, self.space, self.n_layers))

    def _start(self, trial, plan) -> None:
        key = plan.key
        trial.set_user_attr("plan", str(plan))
        trial.set_user_attr("key", key)
        if "origin" not in trial.user_attrs:
            prior = isinstance(self.study.sampler, SensitivityPriorSampler) and \
                self.study.sampler.is_prior_trial(trial._trial_id)
            trial.set_user_attr("origin", "prior" if prior else self.settings.sampler)
        constraints = constraint_values(plan, self.space, self.shape)
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        if not feasible(constraints):
            broken = [f"{k} (+{v:g})" for k, v in constraints.items() if v > 0]
            trial.set_user_attr("infeasible", ", ".join(broken))
            self.study.tell(trial, state=TrialState.PRUNED)
            self.counts["pruned"] += 1
            self._pruned_row += 1
            if self._pruned_row >= MAX_PRUNED_IN_A_ROW:
                raise LBSearchError(f"{self._pruned_row} proposed plans in a row broke the constraints "
                                    f"(last: {', '.join(broken)}); loosen the space's constraints")
            self._finished(trial.number, None, TrialState.PRUNED)
        elif key in self.known:
            number, result = self.known[key]
            outcome = Outcome(job=Job(id=trial.number, plan=str(plan), fidelity=self.settings.fidelity),
                              result=TrialResult.from_dict(result), worker="study", details={"duplicate_of": number})
            self.counts["reused"] += 1
            self._complete(trial, outcome, duplicate_of=number)
            self._reused_row += 1
            if self._reused_row == MAX_REUSED_IN_A_ROW:
                tqdm.write(f"lbsearch: {MAX_REUSED_IN_A_ROW} proposed plans in a row were scored before: "
                           "stopping (the space looks exhausted)", file=sys.stderr)
        elif key in self.inflight:
            self.inflight[key].append(trial)
        else:
            self.inflight[key] = [trial]
            self.jobs[trial.number] = key
            self.executor.submit(Job(id=trial.number, plan=str(plan), fidelity=self.settings.fidelity))

    def _collect(self, outcome: Outcome) -> None:
        key = self.jobs.pop(outcome.job.id, None)
        if key is None:
            return
        trials = self.inflight.pop(key)
        error = outcome.error or ("no result" if outcome.result is None else None)
        if error is None and not all(map(math.isfinite, values_of(outcome.result, self.objectives))):
            error = f"non-finite objective values {values_of(outcome.result, self.objectives)}"
        for i, trial in enumerate(trials):
            if error is None:
                self.counts["scored" if i == 0 else "reused"] += 1
                self._complete(trial, outcome, duplicate_of=trials[0].number if i else None)
            else:
                self._fail(trial, outcome, error)

    def _complete(self, trial, outcome: Outcome, duplicate_of: int | None = None) -> None:
        result = outcome.result
        for name, value in {"result": result.to_dict(), "worker": outcome.worker, "attempts": outcome.attempts,
                            **({"duplicate_of": duplicate_of} if duplicate_of is not None else {})}.items():
            trial.set_user_attr(name, value)
        values = values_of(result, self.objectives)
        self.study.tell(trial, values)
        self.complete += 1
        self._pruned_row = self._failed_row = 0
        if duplicate_of is None:
            self._reused_row = 0
        if result.key not in self.known:
            self.known[result.key] = (trial.number, result.to_dict())
            self.scored.append(Scored(trial=trial.number, plan=result.plan, key=result.key, values=tuple(values),
                                      result=result, origin=trial.user_attrs.get("origin", "")))
            self._update_front()
        self._finished(trial.number, outcome, TrialState.COMPLETE)

    def _fail(self, trial, outcome: Outcome, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason[:1000])
        trial.set_user_attr("worker", outcome.worker)
        self.study.tell(trial, state=TrialState.FAIL)
        self.counts["failed"] += 1
        self._failed_row += 1
        self._finished(trial.number, outcome, TrialState.FAIL)
        if self._failed_row >= MAX_FAILED_IN_A_ROW:
            raise LBSearchError(f"{self._failed_row} trials failed in a row; last: {reason[:300]}")

    def _abandon(self) -> None:
        """Trials still in flight when the loop stops early: FAIL, and enqueued again for a resume."""
        for trials in self.inflight.values():
            for t in trials:
                self._retire(t._trial_id, t.number, t.params, t.user_attrs.get("origin"),
                             "the search stopped before this trial finished")
        self.inflight.clear()
        self.jobs.clear()

    # -- after every trial -------------------------------------------------------------------------
    def _update_front(self) -> None:
        loss = as_loss([s.values for s in self.scored], self.directions)
        mask = pareto_mask(loss)
        self.front_size = int(mask.sum())
        self.hv = hypervolume(loss[mask], as_loss(self.reference, self.directions)[0])

    def _finished(self, number: int, outcome: Outcome | None, state: TrialState | None) -> None:
        self.history.append([number, self.hv])
        self.study.set_user_attr("hypervolume", self.history)
        if state == TrialState.COMPLETE:
            self.bar.update(1)
        self._postfix()
        self._notify(number, outcome, state)

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(front=self.front_size, hv=f"{self.hv:.4g}", pruned=self.counts["pruned"],
                                 failed=self.counts["failed"], refresh=False)

    def _notify(self, number: int, outcome: Outcome | None, state: TrialState | None) -> None:
        for cb in self.callbacks:
            try:
                cb(self.study, number, outcome, state)
            except Exception as exc:  # noqa: BLE001 - tracking must not stop a search
                tqdm.write(f"lbsearch: warning: callback {getattr(cb, '__name__', cb)!s} failed on trial {number}: "
                           f"{type(exc).__name__}: {exc}", file=sys.stderr)

    # -- the front ---------------------------------------------------------------------------------
    def front(self) -> Front:
        scored = [replace(s, rescored=results_by_fidelity(self.rescored.get(str(s.trial), {})))
                  for s in self.scored]
        return build_front(scored, study=self.study.study_name, objectives=[o.name for o in self.objectives],
                           directions=self.directions, reference=self.reference, fidelity=self.settings.fidelity,
                           history=self.history)

    def rescore(self) -> None:
        """Re-score the front's plans with the largest hypervolume contributions at the next fidelity."""
        s = self.settings
        if not s.rescore_fidelity or not s.rescore_top or FIDELITIES.index(s.rescore_fidelity) <= \
                FIDELITIES.index(s.fidelity):
            return  # re-scoring only ever moves up the fidelities
        points = self.front().points
        gain = contributions(as_loss([p.values for p in points], self.directions),
                             as_loss(self.reference, self.directions)[0]) if points else []
        best = [p for _, p in sorted(zip(gain, points), key=lambda gp: -gp[0])][: s.rescore_top]
        todo = [p for p in best if s.rescore_fidelity not in self.rescored.get(str(p.trial), {})]
        keep = self.config.finalists
        for p in todo:
            self.executor.submit(Job(id=p.trial, plan=p.plan, fidelity=s.rescore_fidelity,
                                     keep=str(keep / p.key) if keep else None))
        bar = tqdm(total=len(todo), desc=f"re-score at {s.rescore_fidelity}", unit="plan",
                   disable=not self.config.progress or not todo)
        while self.executor.pending():
            for outcome in self.executor.wait(timeout=5.0):
                entry = outcome.result.to_dict() if outcome.result else {"error": outcome.error or "no result"}
                self.rescored.setdefault(str(outcome.job.id), {})[outcome.job.fidelity] = entry
                self.study.set_user_attr("rescored", self.rescored)
                self.counts["rescored"] += 1
                bar.update(1)
                self._notify(outcome.job.id, outcome, None)
        bar.close()


def search(config: SearchConfig, executor: Executor, callbacks: Sequence[Callback] = ()) -> SearchReport:
    """Run (or resume) a search until its trial or time budget is spent, re-score the front's best
    plans at the next fidelity, and return the front. The caller owns (and closes) the executor."""
    start = time.perf_counter()
    driver = Driver(config, executor, callbacks)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with DriverLock(Path(config.run_dir) / ".driver.lock"):
            driver.open()
            driver.run()
            driver.rescore()
            return SearchReport(study=driver.study.study_name, storage=shown(config.storage_url),
                                front=driver.front(), counts=dict(driver.counts),
                                seconds=time.perf_counter() - start)
    finally:
        optuna.logging.set_verbosity(verbosity)
