"""Executors: one conformance test run on every executor, and worker loss on Ray.

The Ray tests share one local Ray (2 CPUs, a 100 MB object store) and one RayExecutor with two
1-CPU workers; the last test closes it, and the module checks that no Ray process is left.
"""
from __future__ import annotations

import os
import re
import signal
import time
from types import SimpleNamespace

import pytest
from conftest import write_tiny_space

from lbsearch import LBSearchError, Plan
from lbsearch.executors.base import Job, WorkspaceSpec
from lbsearch.executors.local import LocalExecutor
from lbsearch.objective import score
from lbsearch.workspace import Workspace

PLANS = ["SSSS", "SL8NL16", "SNNN", "SL8NL16", "SL16SL8", "SNSS", "SSSS"]  # duplicates on purpose
BAD = "SNN"  # 3 layers for a 4-layer model: LBSearchError in the worker
KILLER = "SNNL8"  # the Ray workers of this module SIGKILL themselves on this plan (fault injection)
WORKER = re.compile(r"^[^:]+:\d+$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """The tiny space, its Workspace in this process, and every plan scored directly (which also
    trains the library blocks, so the workers only read them)."""
    root = tmp_path_factory.mktemp("executors")
    space = write_tiny_space(root, tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LBSEARCH_CACHE", os.environ.get("LBSEARCH_CACHE", ""))  # Workspace.open sets it; undone after
        ws = Workspace.open(space, device="cpu", cache=root / "cache", progress=False)
        direct = {p: score(ws, Plan.parse(p)) for p in set(PLANS)}
        spec = WorkspaceSpec(space=ws.space.model_dump(), device="cpu", cache=str(root / "cache"))
        yield SimpleNamespace(ws=ws, spec=spec, direct=direct)


@pytest.fixture(scope="module")
def ray_executor(tiny):
    """One RayExecutor (2 workers x 1 CPU) on a module-wide local Ray; no Ray process survives it."""
    import psutil
    import ray

    from lbsearch.executors.ray import FAULT_ENV, RayExecutor, init_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, KILLER)  # before Ray starts: its workers inherit it
        t = time.perf_counter()
        assert init_ray(num_cpus=2, object_store_memory=100 * 2**20)
        print(f"\nray.init: {time.perf_counter() - t:.1f} s")
        procs = [p for p in psutil.Process().children(recursive=True)]
        executor = RayExecutor(tiny.spec, workers=2, cpus_per_worker=1)
        print(f"2 workers ready in {executor.startup_seconds:.1f} s")
        try:
            yield executor
        finally:
            executor.close()
            procs += psutil.Process().children(recursive=True)
            ray.shutdown()
            assert not survivors(procs), f"processes left after ray.shutdown(): {survivors(procs)}"


def survivors(procs, limit: float = 60.0) -> list[str]:
    """Those of ``procs`` still running (zombies count as gone) after up to ``limit`` seconds."""
    import psutil

    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + limit
    while any(map(running, procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [f"{p.pid} {p.name()}" for p in procs if running(p)]


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.slow)])
def executor(request, tiny):
    if request.param == "local":
        return LocalExecutor(tiny.ws)
    return request.getfixturevalue("ray_executor")


def drain(executor, limit: float = 180.0) -> list:
    """Every outcome of the submitted jobs (wait until none is pending)."""
    out, deadline = [], time.monotonic() + limit
    while executor.pending():
        assert time.monotonic() < deadline, f"{executor.pending()} jobs still pending after {limit} s"
        out += executor.wait(timeout=5.0)
    assert executor.wait(timeout=0.1) == []
    return out


def await_workers(executor, n: int, limit: float = 120.0) -> list[str]:
    """Let replacement workers finish starting; their host:pid names."""
    deadline = time.monotonic() + limit
    while len(executor.worker_names()) < n:
        assert time.monotonic() < deadline, f"only {executor.worker_names()} ready after {limit} s"
        executor.wait(timeout=1.0)
    return executor.worker_names()


def test_every_job_comes_back_once_as_if_scored_directly(executor, tiny):
    jobs = [Job(id=i, plan=p) for i, p in enumerate(PLANS)] + [Job(id=100, plan=BAD)]
    for job in jobs:
        executor.submit(job)
    assert executor.pending() == len(jobs)
    outcomes = drain(executor)
    assert sorted(o.job.id for o in outcomes) == sorted(j.id for j in jobs)
    for o in outcomes:
        assert WORKER.match(o.worker), o.worker
        if o.job.plan == BAD:
            assert o.result is None and o.error.startswith("LBSearchError") and "3 layers" in o.error
            continue
        assert o.error is None and o.attempts == 1
        expected = tiny.direct[o.job.plan]
        assert (o.result.plan, o.result.key, o.result.fidelity) == (expected.plan, expected.key, "assembled")
        assert o.result.kl == pytest.approx(expected.kl, abs=1e-6)
        assert o.result.throughput_ratio == pytest.approx(expected.throughput_ratio)
    # the executor keeps working after a failed plan
    executor.submit(Job(id=101, plan="SNNN"))
    [again] = drain(executor)
    assert again.error is None and again.result.key == Plan.parse("SNNN").key
    assert executor.slots >= 1


def test_bad_worker_counts_fail_before_ray_starts(tiny):
    from lbsearch.executors.ray import RayExecutor

    with pytest.raises(LBSearchError, match="--workers 0: must be at least 1"):
        RayExecutor(tiny.spec, workers=0)
    with pytest.raises(LBSearchError, match="--cpus-per-worker 0"):
        RayExecutor(tiny.spec, workers=1, cpus_per_worker=0)


def test_a_worker_with_other_data_than_the_first_may_not_score(monkeypatch):
    """Workers must score on one corpus and one evaluation text: one opened on other data (another image:
    other packages behind package-docs, another Python behind python-docs) is refused in one line."""
    import lbsearch.executors.ray as rx

    ex = object.__new__(rx.RayExecutor)
    ex._booting, ex._actors, ex._data, ex.workers = {}, [], None, 3
    ex._boot_failures, ex._last_boot_error, ex._serving = 0, "", False
    replies = {"a": ("h1:1", None, "k1"), "b": ("h2:2", None, "k1"), "c": ("h3:3", None, "k2")}
    monkeypatch.setattr(rx.ray, "get", lambda ref: replies[ref])
    monkeypatch.setattr(rx.ray, "kill", lambda handle, no_restart: None)
    actors = {ref: rx._Actor(handle=ref) for ref in replies}
    ex._booting, ex._actors = dict(actors), list(actors.values())
    ex._booted("a")
    ex._booted("b")
    assert actors["a"].ready and actors["b"].ready and ex._last_boot_error == ""
    ex._booted("c")
    assert not actors["c"].ready and actors["c"] not in ex._actors
    assert re.fullmatch(r"worker h3:3 opened other data than worker h1:1 \(data key k2 vs k1\): .*one image",
                        ex._last_boot_error)


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_job_loses_and_duplicates_nothing(ray_executor):
    ex = ray_executor
    before = await_workers(ex, 2)
    slow = Job(id=200, plan="SL8NL16", fidelity="brief", tokens=2048)  # healing: several seconds
    ex.submit(slow)
    victim = ex.running()[slow.id]
    for i, plan in enumerate(["SSSS", "SNNN", "SL16SL8"]):
        ex.submit(Job(id=201 + i, plan=plan))
    time.sleep(1.0)  # inside healing
    os.kill(int(victim.split(":")[1]), signal.SIGKILL)
    outcomes = drain(ex)
    assert sorted(o.job.id for o in outcomes) == [200, 201, 202, 203]  # none lost, none twice
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    [healed] = [o for o in outcomes if o.job.id == slow.id]
    assert healed.attempts == 2 and healed.details["killed"] == [victim] and healed.worker != victim
    assert healed.result.fidelity == "brief" and healed.result.healing_tokens == 2048
    assert ex.slots == 2
    after = await_workers(ex, 2)
    assert victim in before and victim not in after


@pytest.mark.slow
def test_a_plan_that_kills_its_worker_twice_fails_and_the_executor_recovers(ray_executor):
    ex = ray_executor
    await_workers(ex, 2)
    ex.submit(Job(id=300, plan=KILLER))
    ex.submit(Job(id=301, plan="SSSS"))
    outcomes = {o.job.id: o for o in drain(ex)}
    assert set(outcomes) == {300, 301} and outcomes[301].error is None
    killer = outcomes[300]
    assert killer.result is None and killer.error.startswith("killed its worker twice: ")
    assert killer.attempts == 2 and len(set(killer.details["killed"])) == 2
    assert ex.slots == 2
    await_workers(ex, 2)
    ex.submit(Job(id=302, plan="SL8NL16"))
    [after] = drain(ex)
    assert after.error is None and after.result.key == Plan.parse("SL8NL16").key


@pytest.mark.slow
def test_a_workspace_that_cannot_open_is_one_error_line(ray_executor, tiny):
    """Runs last: it closes the shared executor to free Ray's CPUs."""
    from lbsearch.executors.ray import RayExecutor

    ray_executor.close()
    broken = WorkspaceSpec(space={**tiny.spec.space, "model": "/nonexistent/model"}, device="cpu",
                           cache=tiny.spec.cache)
    with pytest.raises(LBSearchError, match="a Ray worker could not open its workspace: .*nonexistent"):
        RayExecutor(broken, workers=1, start_timeout=120)
