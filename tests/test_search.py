"""The search: space -> trial, the sensitivity prior, constraints, repeats, batching, resume, the lock."""
import math
import os
import subprocess
import sys
import time

import optuna
import pytest
from conftest import tiny_model, write_tiny_space
from optuna.trial import TrialState
from search_helpers import FakeExecutor, SpyExecutor, fake_table

from lbsearch.errors import LBSearchError
from lbsearch.executors.local import LocalExecutor
from lbsearch.plan import Plan
from lbsearch.search import SearchConfig, front_from_storage, search
from lbsearch.search.lock import DriverLock
from lbsearch.search.params import constraint_values, feasible, model_shape, params_of, plan_from_trial, searchable
from lbsearch.search.prior import prior_probabilities, threshold_plans
from lbsearch.search.sampler import SAMPLERS, SensitivityPriorSampler
from lbsearch.space import SearchSettings, parse_space
from lbsearch.workspace import Workspace

optuna.logging.set_verbosity(optuna.logging.WARNING)


def config_space(tmp_path, layers: int = 9, **extra):
    """A space over a tiny random llama (the driver reads only its config)."""
    folder = tmp_path / f"cfg{layers}"
    tiny_model(layers=layers).save_pretrained(folder)
    data = {"model": str(folder), "lswa": {"windows": [8, 16], "feature_dims": [16]},
            "kinds": {"layers": {0: ["softmax"]}}, "target": {"device": "local"}, **extra}
    return parse_space(data, "test")


def test_one_categorical_per_searchable_layer_and_round_trip(tmp_path):
    space = config_space(tmp_path, layers=4)
    params = searchable(space, 4)
    assert list(params) == ["layer_1", "layer_2", "layer_3"]  # layer 0 is pinned: no parameter
    assert list(params["layer_1"]) == ["S", "L8f16", "L16f16", "N"]
    study = optuna.create_study(directions=["minimize"])
    plan = Plan.parse("SL16f16NS")
    study.enqueue_trial(params_of(plan, space))
    assert plan_from_trial(study.ask(), space, 4) == plan
    assert plan_from_trial(study.ask(), space, 4).layers[0].kind == "softmax"


def test_constraints_are_optuna_constraints(tmp_path):
    space = config_space(tmp_path, layers=4, constraints={"min_softmax_layers": 2, "max_removed_layers": 1,
                                                          "kv_memory_budget_mb": 1.2, "context": 4096})
    shape = model_shape(space)
    assert feasible(constraint_values(Plan.parse("SSL8f16N"), space, shape))
    for bad in ("SNNS", "SL8f16L8f16N", "SSSS"):  # removed, softmax count, KV budget (4 x 0.5 MB)
        values = constraint_values(Plan.parse(bad), space, shape)
        assert not feasible(values) and set(values) == {"min_softmax_layers", "max_removed_layers",
                                                        "kv_memory_budget_mb"}


def prior_setup(tmp_path, n_startup=1000):
    space = config_space(tmp_path, layers=9, search={"prior_floor": 0.1})
    low, high = [0.01] * 4, [5.0] * 4
    table = fake_table([1.0] + low + high, [1.0] + low + high)
    probs = prior_probabilities(table, space, model_shape(space))
    return space, probs, SensitivityPriorSampler(optuna.samplers.RandomSampler(seed=0), probs, n_startup, seed=1)


def test_prior_draws_follow_the_sensitivity_table(tmp_path):
    space, probs, sampler = prior_setup(tmp_path)
    study = optuna.create_study(directions=["minimize"], sampler=sampler)
    draws = 200
    changed = [0] * 9
    for _ in range(draws):
        trial = study.ask()
        plan = plan_from_trial(trial, space, 9)
        assert sampler.is_prior_trial(trial._trial_id)
        for i, s in enumerate(plan.layers):
            changed[i] += s.kind != "softmax"
        study.tell(trial, [0.0])
    assert changed[0] == 0  # pinned
    # each layer's change rate matches its prior probability (4 sigma), and cheap layers change far more
    for i in range(1, 9):
        p = 1 - probs[f"layer_{i}"]["S"]
        assert abs(changed[i] / draws - p) < 4 * math.sqrt(p * (1 - p) / draws), (i, changed[i], p)
    low, high = sum(changed[1:5]) / (4 * draws), sum(changed[5:9]) / (4 * draws)
    pooled = (low + high) / 2
    z = (low - high) / math.sqrt(2 * pooled * (1 - pooled) / (4 * draws))
    assert low > 0.6 and high < 0.35 and z > 10
    # every choice keeps the floor's mass
    assert min(min(p.values()) for p in probs.values()) >= 0.1 / 4


class CountingSampler(optuna.samplers.RandomSampler):
    def __init__(self):
        super().__init__(seed=0)
        self.calls = {"independent": 0, "before": 0, "after": 0}

    def sample_independent(self, *args):
        self.calls["independent"] += 1
        return super().sample_independent(*args)

    def before_trial(self, study, trial):
        self.calls["before"] += 1
        super().before_trial(study, trial)

    def after_trial(self, *args):
        self.calls["after"] += 1
        super().after_trial(*args)


def test_prior_defers_to_the_base_sampler_after_startup(tmp_path):
    space, probs, _ = prior_setup(tmp_path)
    base = CountingSampler()
    sampler = SensitivityPriorSampler(base, probs, n_startup_trials=5, seed=0)
    study = optuna.create_study(directions=["minimize"], sampler=sampler)
    for n in range(8):
        trial = study.ask()
        plan_from_trial(trial, space, 9)
        assert sampler.is_prior_trial(trial._trial_id) == (n < 5)
        assert base.calls["independent"] == 8 * max(0, n - 4)  # 8 searchable layers per base trial
        study.tell(trial, state=TrialState.PRUNED) if n % 2 else study.tell(trial, [0.0])
    assert base.calls["before"] == 8 and base.calls["after"] == 8


def test_threshold_plans_are_clipped_to_the_constraints(tmp_path):
    space = config_space(tmp_path, layers=9, constraints={"max_removed_layers": 2, "min_softmax_layers": 3},
                         search={"threshold_budgets": [[0.5, 0.5], [0.0, 1.0], [0.0, 0.99]]})
    table = fake_table([float(i) for i in range(9)], [float(9 - i) for i in range(9)])
    plans = threshold_plans(table, space, model_shape(space))
    assert [b for b, _ in plans] == [(2, 4), (0, 6)]  # (0, 1.0) and (0, 0.99) give one plan: no repeat
    for _, params in plans:
        assert sum(v == "N" for v in params.values()) <= 2 and sum(v == "S" for v in params.values()) >= 2


def test_sampler_registry_matches_the_space_settings():
    allowed = SearchSettings.model_fields["sampler"].annotation.__args__
    assert set(SAMPLERS) == set(allowed)


# -- the driver on a tiny workspace -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("search")
    yaml = write_tiny_space(root, tokenizer, extra="constraints: {min_softmax_layers: 1, max_removed_layers: 1, "
                                                   "kv_memory_budget_mb: 1.6}\n")
    from lbsearch.space import load_space

    space = load_space(yaml)
    ws = Workspace.open(space, device="cpu", cache=root / "cache", progress=False)
    return ws.space, ws


def with_search(space, **settings):
    return space.model_copy(update={"search": space.search.model_copy(update=settings)})


def test_scored_plans_satisfy_constraints_and_repeats_are_scored_once(tmp_path, tiny):
    space, ws = tiny
    space = with_search(space, sampler="random", trials=8, rescore_top=0, seed=3)
    spy = SpyExecutor(LocalExecutor(ws))
    report = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False), spy)
    shape = model_shape(space)
    for job in spy.jobs:
        assert feasible(constraint_values(Plan.parse(job.plan), space, shape)), job.plan
    keys = [Plan.parse(j.plan).key for j in spy.jobs]
    assert len(keys) == len(set(keys))  # no plan scored twice
    study = optuna.load_study(study_name=report.study, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 8 and pruned  # random plans on 4 layers break these constraints often
    assert all(t.user_attrs["key"] not in keys for t in pruned)  # pruned plans never reached the executor
    assert all(not feasible(t.constraints) for t in pruned)
    assert {t.user_attrs["key"] for t in complete} == set(keys)
    for t in complete:  # every complete trial holds its result, plan and worker
        assert t.user_attrs["result"]["key"] == t.user_attrs["key"] == Plan.parse(t.user_attrs["plan"]).key
        assert t.user_attrs["worker"]
    assert len(report.front.points) >= 1


def test_equal_plans_are_scored_once_and_slots_stay_busy(tmp_path):
    # two searchable layers of {S, N}: at most 4 plans, so 12 trials must repeat; 3 slots are filled
    space = config_space(tmp_path, layers=3, kinds={"default": ["softmax", "none"], "layers": {0: ["softmax"]}},
                         search={"sampler": "random", "trials": 12, "rescore_top": 0})
    fake = FakeExecutor(slots=3)
    report = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False), fake)
    assert len(fake.jobs) == len({j.plan for j in fake.jobs}) <= 4
    assert fake.peak == 3
    assert report.counts["scored"] + report.counts["reused"] == 12
    study = optuna.load_study(study_name=report.study, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(repeats) == report.counts["reused"] >= 8
    for t in repeats:
        assert t.values == study.trials[t.user_attrs["duplicate_of"]].values


def test_failed_outcomes_are_told_fail(tmp_path):
    space = config_space(tmp_path, layers=3, kinds={"default": ["softmax", "none"], "layers": {0: ["softmax"]}},
                         search={"sampler": "random", "trials": 2, "rescore_top": 0})
    calls = []
    report = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False),
                    FakeExecutor(fail={"SNS"}), callbacks=[lambda *a: calls.append(a[1:])])
    study = optuna.load_study(study_name=report.study, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: boom" and t.user_attrs["plan"] == "SNS"
               for t in failed)
    assert [c[0] for c in calls] == [t.number for t in study.trials]  # one callback per trial, in order
    assert {c[2] for c in calls} <= {TrialState.COMPLETE, TrialState.FAIL}


def test_threshold_plans_and_prior_origin(tmp_path):
    space = config_space(tmp_path, layers=9, search={"trials": 12, "n_startup_trials": 10, "rescore_top": 0})
    table = fake_table([0.01 * i for i in range(9)], [0.1 * (9 - i) for i in range(9)])
    report = search(SearchConfig(space=space, run_dir=tmp_path, table=table, progress=False), FakeExecutor())
    study = optuna.load_study(study_name=report.study, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    origins = [t.user_attrs["origin"] for t in study.trials]
    n_threshold = len(threshold_plans(table, space, model_shape(space)))
    assert origins[:n_threshold] == ["threshold"] * n_threshold  # enqueued first
    assert origins[n_threshold:10] == ["prior"] * (10 - n_threshold) and origins[-1] == "tpe"
    assert len(report.front.thresholds) == n_threshold


def test_multi_fidelity_rescores_the_best_front_plans(tmp_path):
    space = config_space(tmp_path, layers=9, search={"sampler": "random", "trials": 20, "rescore_top": 3})
    fake = FakeExecutor()
    report = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False), fake)
    rescored = [p for p in report.front.points if p.rescored]
    assert len(rescored) == min(3, len(report.front.points))
    assert all(p.rescored["brief"].fidelity == "brief" for p in rescored)
    assert [j.fidelity for j in fake.jobs].count("brief") == len(rescored)
    study = optuna.load_study(study_name=report.study, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert set(study.user_attrs["rescored"]) == {str(p.trial) for p in rescored}
    stored = front_from_storage(f"sqlite:///{tmp_path / 'optuna.db'}", report.study)
    assert [(p.trial, p.rescored) for p in stored.points] == [(p.trial, p.rescored) for p in report.front.points]
    # resuming a finished study runs nothing and re-scores nothing again
    again = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, resume=True, progress=False), fake)
    assert again.counts == {} and again.front == report.front


# -- resume and the lock -------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir, pid: int) -> None:
    import json
    import socket

    (run_dir / ".driver.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": 0}))


def test_resume_after_a_dead_driver(tmp_path, tiny):
    space, ws = tiny
    space = with_search(space, trials=3, rescore_top=0, n_startup_trials=4, seed=1)
    table = fake_table([0.01, 0.02, 0.03, 0.04], [1.0, 0.2, 0.1, 0.3])
    first = SpyExecutor(LocalExecutor(ws))
    cfg = SearchConfig(space=space, run_dir=tmp_path, table=table, progress=False)
    report = search(cfg, first)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name=report.study, storage=url)
    done = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(done) == 3
    # a driver that died mid-trial: an asked trial left RUNNING and its lock left behind
    orphan = study.ask()
    plan_from_trial(orphan, space, ws.n_layers)
    write_lock(tmp_path, dead_pid())
    with pytest.raises(LBSearchError, match="--resume"):
        search(SearchConfig(space=space, run_dir=tmp_path, table=table, progress=False), first)
    second = SpyExecutor(LocalExecutor(ws))
    search(SearchConfig(space=with_search(space, trials=5), run_dir=tmp_path, table=table, resume=True,
                        progress=False), second)
    study = optuna.load_study(study_name=report.study, storage=url)
    trial = study.trials[orphan.number]
    assert trial.state == TrialState.FAIL and "stopped" in trial.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == orphan.params
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 5
    for number, values in done.items():  # finished trials untouched, their plans not scored again
        assert study.trials[number].values == values
    first_keys = {Plan.parse(j.plan).key for j in first.jobs}
    assert not first_keys & {Plan.parse(j.plan).key for j in second.jobs}
    assert not (tmp_path / ".driver.lock").exists()
    assert not study.get_trials(states=(TrialState.RUNNING,))
    stored = front_from_storage(url, report.study)
    assert {n for n, _ in stored.history} >= {t.number for t in complete}


def test_a_live_lock_refuses(tmp_path):
    space = config_space(tmp_path, layers=3, search={"trials": 1})
    write_lock(tmp_path, os.getpid())
    with pytest.raises(LBSearchError, match="another search driver holds this run"):
        search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False), FakeExecutor())
    lock = DriverLock(tmp_path / ".driver.lock")
    write_lock(tmp_path, dead_pid())
    with lock:  # a stale lock is taken over
        assert lock.holder()["pid"] == os.getpid()
    assert not lock.path.exists()


def test_interrupted_search_leaves_no_running_trials(tmp_path):
    space = config_space(tmp_path, layers=9, search={"sampler": "random", "trials": 10, "rescore_top": 0})

    class Boom(FakeExecutor):
        def wait(self, timeout=None):
            if len(self.jobs) >= 3:
                raise KeyboardInterrupt
            return super().wait(timeout)

    with pytest.raises(KeyboardInterrupt):
        search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False), Boom(slots=2))
    study = optuna.load_study(study_name="lbsearch-cfg9", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert not study.get_trials(states=(TrialState.RUNNING,))
    retries = study.get_trials(states=(TrialState.WAITING,))
    assert len(retries) == 2 and all("retry_of" in t.user_attrs for t in retries)
    assert not (tmp_path / ".driver.lock").exists()
    report = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, resume=True, progress=False),
                    FakeExecutor())
    assert report.counts["scored"] + report.counts.get("reused", 0) == 10 - 2


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", pytest.param("gp", marks=pytest.mark.slow)])
def test_every_sampler_searches_under_constraints(tmp_path, sampler):
    space = config_space(tmp_path, layers=9, constraints={"max_removed_layers": 2},
                         search={"sampler": sampler, "trials": 7, "n_startup_trials": 4, "rescore_top": 0})
    table = fake_table([0.01 * i for i in range(9)], [0.1 * (9 - i) for i in range(9)])
    fake = FakeExecutor()
    report = search(SearchConfig(space=space, run_dir=tmp_path, table=table, progress=False), fake)
    assert report.counts["scored"] + report.counts.get("reused", 0) == 7
    assert all(Plan.parse(j.plan).count("none") <= 2 for j in fake.jobs)
    assert report.front.points and report.front.hypervolume > 0


def test_a_time_budget_alone_stops_the_search(tmp_path):
    space = config_space(tmp_path, layers=9, search={"sampler": "random", "trials": None, "time_budget": 1.0,
                                                      "rescore_top": 0})

    class Slow(FakeExecutor):
        def wait(self, timeout=None):
            time.sleep(0.3)
            return super().wait(timeout)

    start = time.perf_counter()
    report = search(SearchConfig(space=space, run_dir=tmp_path, prior=False, progress=False), Slow())
    assert 1.0 <= time.perf_counter() - start < 30 and report.counts["scored"] >= 1
