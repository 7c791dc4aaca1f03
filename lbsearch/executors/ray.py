"""Ray executor: actors that each open one Workspace and score plan after plan.

One actor per GPU (``num_gpus=1``), or per ``cpus_per_worker`` CPUs. Ray never retries anything
(``max_restarts=0``, ``max_task_retries=0``): when an actor dies mid-plan (SIGKILL, OOM, lost
node) this executor starts a replacement and gives the plan to a live actor; a plan that killed
two workers comes back as an :class:`Outcome` with an error. ``wait`` never raises for a plan.

Without ``address`` (and without ``RAY_ADDRESS``) a private local Ray is started with only the
CPUs and GPUs the workers need and no dashboard; ``RAY_AUTH_MODE`` is ``disabled`` there unless
the user set it. With an address the user's Ray environment (token auth) is used as it is.

Test-only fault injection (off unless set): an actor whose environment has
``LBSEARCH_FAULT_KILL_PLAN`` set to a plan string SIGKILLs itself when it is given that plan; with
``LBSEARCH_FAULT_HOLD_FILE`` set to a path, an actor given a plan waits while that file exists
(and shows it waits with a file ``<path>.<pid>``), so a test can hold workers mid-trial, inject a
fault (node loss, driver kill, server restart) and let them go on.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from ..errors import LBSearchError
from ..io import stable_hash
from .base import Executor, Job, Outcome, WorkspaceSpec
from .local import describe, one_line

FAULT_ENV = "LBSEARCH_FAULT_KILL_PLAN"
HOLD_ENV = "LBSEARCH_FAULT_HOLD_FILE"
MAX_KILLS = 2  # a plan that killed this many workers is failed, not retried


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_memory: int = 100 * 2**20) -> bool:
    """Connect to Ray; returns True when this call started a private local instance.

    ``address`` (or ``RAY_ADDRESS``) attaches to a running cluster with the user's environment.
    Otherwise a new local instance is started (never an unrelated ``ray start`` one) with
    ``num_cpus``/``num_gpus``, a small object store and no dashboard. Already connected: no-op.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **quiet)
            return False
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance on this host only
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory,
                 include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"Ray at {address}" if address else "a local Ray"
        raise LBSearchError(f"cannot start or reach {where}: {str(exc).splitlines()[0][:200]}") from None
    return True


class _Worker:
    """The actor: one Workspace, scoring one plan at a time."""

    def __init__(self, spec: WorkspaceSpec, threads: int):
        import torch

        self.name = f"{socket.gethostname()}:{os.getpid()}"
        if threads:
            torch.set_num_threads(threads)
        self.error, self.ws = None, None
        try:
            self.ws = _open_workspace(spec)
        except Exception as exc:  # noqa: BLE001 - reported by ready(), the executor decides
            self.error = one_line(exc)

    def ready(self) -> tuple[str, str | None, str | None]:
        """(host:pid, None, the Workspace's data key) once it is open, or (host:pid, why it could not open,
        None)."""
        return self.name, self.error, None if self.ws is None else self.ws.data_key()

    def score(self, job: Job) -> tuple[str, object, str | None, dict]:
        """(host:pid, TrialResult or None, error or None, details)."""
        from ..objective import score
        from ..plan import Plan

        if os.environ.get(FAULT_ENV) == job.plan:  # test-only fault injection, see the module docstring
            os.kill(os.getpid(), signal.SIGKILL)
        _hold(os.environ.get(HOLD_ENV))
        try:
            return self.name, score(self.ws, Plan.parse(job.plan), job.fidelity, job.tokens, job.keep), None, {}
        except Exception as exc:  # noqa: BLE001 - a plan's failure is an outcome, not a dead worker
            return (self.name, None, *describe(exc))


def _hold(path: str | None) -> None:
    """Test-only (see the module docstring): wait while the file ``path`` exists."""
    if not path or not os.path.exists(path):
        return
    mark = f"{path}.{os.getpid()}"
    open(mark, "w").close()
    try:
        while os.path.exists(path):
            time.sleep(0.05)
    finally:
        if os.path.exists(mark):
            os.unlink(mark)


def _open_workspace(spec: WorkspaceSpec):
    """``spec.open()``; on a cold cache the first worker of a machine fills it alone (the teacher
    copy, corpus and teacher logits), the others wait for it and then open in parallel."""
    from filelock import FileLock

    from ..io import cache_dir

    if spec.cache:
        os.environ["LBSEARCH_CACHE"] = spec.cache
    folder = cache_dir("workers")
    marker = folder / f"{stable_hash(spec.space, spec.model, spec.device, spec.transfer, spec.defaults)}.ready"
    if marker.exists():
        return spec.open()
    with FileLock(str(marker) + ".lock"):
        ws = spec.open()
        marker.touch()
    return ws


@dataclass(eq=False)
class _Actor:
    handle: object
    name: str = ""  # host:pid, known once ready
    ready: bool = False
    task: "_Task | None" = None


@dataclass(eq=False)
class _Task:
    job: Job
    attempts: int = 0
    killed: list[str] = field(default_factory=list)  # workers that died running it
    started: float = 0.0


class RayExecutor(Executor):
    """Scores jobs on Ray actors; see the module docstring.

    ``workers``: how many actors; by default one per GPU when the spec's device allows CUDA and
    GPUs exist (``gpus`` forces it either way), else the CPUs // ``cpus_per_worker`` (of this
    machine for a local Ray, of the cluster when attached). The constructor blocks until every
    worker has opened its Workspace (at most ``start_timeout`` s; it goes on with those that
    did) and raises LBSearchError when one cannot open it. ``slots`` is the number of live
    actors (ready or starting); ``startup_seconds`` how long the start took.
    """

    def __init__(self, spec: WorkspaceSpec, *, workers: int | None = None, cpus_per_worker: int = 1,
                 gpus: bool | None = None, address: str | None = None, object_store_memory: int = 100 * 2**20,
                 start_timeout: float = 1800.0):
        if workers is not None and workers < 1:
            raise LBSearchError(f"--workers {workers}: must be at least 1")
        if cpus_per_worker < 1:
            raise LBSearchError(f"--cpus-per-worker {cpus_per_worker}: must be at least 1")
        started = time.perf_counter()
        self._owns_ray, workers, gpus = _connect(spec, workers, cpus_per_worker, gpus, address, object_store_memory)
        if spec.cache is None and os.environ.get("LBSEARCH_CACHE"):
            spec = replace(spec, cache=os.environ["LBSEARCH_CACHE"])  # workers share the driver's cache
        if gpus:
            spec = replace(spec, device="cuda")  # Ray shows each actor its own GPU as cuda:0
        self.spec, self.workers, self.cpus_per_worker, self.gpus = spec, workers, cpus_per_worker, gpus
        self._options = {"num_cpus": cpus_per_worker, "num_gpus": 1 if gpus else 0, "max_restarts": 0,
                         "max_task_retries": 0, "max_concurrency": 1}
        self._actors: list[_Actor] = []
        self._booting: dict = {}  # ready ref -> _Actor
        self._running: dict = {}  # score ref -> _Actor
        self._queue: deque[_Task] = deque()
        self._done: list[Outcome] = []
        self._boot_failures, self._last_boot_error, self._serving = 0, "", False
        self._data: tuple[str, str | None] | None = None  # (first worker, its data key)
        for _ in range(workers):
            self._start_actor()
        self._await_workers(start_timeout)
        self._serving = True
        self.startup_seconds = time.perf_counter() - started

    # -- the Executor interface -------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return len(self._actors)

    def submit(self, job: Job) -> None:
        self._queue.append(_Task(job))
        self._dispatch()  # starts now if a worker is free

    def pending(self) -> int:
        return len(self._queue) + len(self._running) + len(self._done)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if self._done:
                out, self._done = self._done, []
                return out
            refs = list(self._running) + list(self._booting)
            if not refs:
                return []
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(refs, num_returns=1, timeout=left)
            if not ready:
                return []
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                if ref in self._booting:
                    self._booted(ref)
                else:
                    self._finished(ref)

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor.handle, no_restart=True)
        self._actors, self._booting, self._running = [], {}, {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    # -- extras for progress displays and tests ----------------------------------------------------
    def worker_names(self) -> list[str]:
        """host:pid of every actor that has opened its Workspace."""
        return [a.name for a in self._actors if a.ready]

    def running(self) -> dict[int, str]:
        """Job id -> host:pid of the actor scoring it now."""
        return {a.task.job.id: a.name for a in self._running.values()}

    # -- actors ----------------------------------------------------------------------------------
    def _start_actor(self) -> None:
        threads = 0 if self.gpus else self.cpus_per_worker
        handle = ray.remote(_Worker).options(**self._options).remote(self.spec, threads)
        actor = _Actor(handle)
        self._actors.append(actor)
        self._booting[handle.ready.remote()] = actor

    def _await_workers(self, timeout: float) -> None:
        """Block until every worker is up (or ``timeout``: then go on with those that are)."""
        deadline = time.monotonic() + timeout
        while self._booting:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(self._booting), num_returns=1, timeout=max(0.0, left))
            if not ready:
                break
            self._booted(ready[0])
            if self._last_boot_error:  # the workers all open the same spec: it would fail again
                self.close()
                raise LBSearchError(f"a Ray worker could not open its workspace: {self._last_boot_error}")
        if not any(a.ready for a in self._actors):
            res = ray.available_resources()
            self.close()
            raise LBSearchError(f"no Ray worker started within {timeout:.0f} s (free: {res.get('CPU', 0):g} CPU, "
                                f"{res.get('GPU', 0):g} GPU; each worker needs {self.cpus_per_worker} CPU"
                                f"{' and 1 GPU' if self.gpus else ''})")

    def _booted(self, ref) -> None:
        """A worker finished opening its Workspace, or failed to: then it is replaced, unless
        replacements keep failing (``workers`` times in a row)."""
        actor = self._booting.pop(ref)
        try:
            actor.name, error, key = ray.get(ref)
        except RayError as exc:
            error, key = one_line(exc), None
        if error is None:
            error = self._other_data(actor.name, key)
        if error is None:
            actor.ready, self._boot_failures = True, 0
            return
        self._last_boot_error = error
        self._boot_failures += 1
        self._drop(actor)
        if self._serving and self._boot_failures <= self.workers:
            self._start_actor()

    def _other_data(self, name: str, key: str | None) -> str | None:
        """Why a worker may not score: its corpus or evaluation text differ from the first worker's (the
        data key names both; another image has other packages for package-docs, another Python other
        python-docs), so its scores would not compare. None when they agree."""
        if self._data is None:
            self._data = (name, key)
            return None
        first, want = self._data
        if key == want:
            return None
        return (f"worker {name} opened other data than worker {first} (data key {key} vs {want}): the corpus "
                "depends on the installed packages (package-docs), the Python (python-docs) and the device "
                "kind; run every worker from one image")

    def _drop(self, actor: _Actor) -> None:
        ray.kill(actor.handle, no_restart=True)
        if actor in self._actors:
            self._actors.remove(actor)

    # -- jobs ------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        for actor in self._actors:
            if not self._queue:
                break
            if actor.ready and actor.task is None:
                task = self._queue.popleft()
                task.attempts += 1
                task.started = time.perf_counter()
                actor.task = task
                self._running[actor.handle.score.remote(task.job)] = actor
        if self._queue and not self._actors:  # every worker is gone and none could be restarted
            why = f"no live Ray worker ({self._last_boot_error or 'all died'})"
            while self._queue:
                task = self._queue.popleft()
                self._done.append(Outcome(job=task.job, error=why, attempts=task.attempts,
                                          details={"killed": task.killed}))

    def _finished(self, ref) -> None:
        actor = self._running.pop(ref)
        task, actor.task = actor.task, None
        seconds = time.perf_counter() - task.started
        try:
            name, result, error, details = ray.get(ref)
        except RayActorError as exc:  # the worker died (or is unreachable) while scoring
            self._lost(actor, task, exc)
            return
        except RayTaskError as exc:  # the method itself raised: the worker lives, the plan failed
            name, result, error, details = actor.name, None, one_line(exc), {}
        except RayError as exc:  # anything else Ray reports: treat the worker as lost
            self._lost(actor, task, exc)
            return
        self._done.append(Outcome(job=task.job, result=result, error=error, worker=name, attempts=task.attempts,
                                  details={**details, "seconds": seconds, "killed": task.killed}))

    def _lost(self, actor: _Actor, task: _Task, exc: BaseException) -> None:
        task.killed.append(actor.name)
        self._drop(actor)
        self._start_actor()
        if len(task.killed) >= MAX_KILLS:
            self._done.append(Outcome(job=task.job, error=f"killed its worker twice: {one_line(exc)}"[:500],
                                      worker=actor.name, attempts=task.attempts, details={"killed": task.killed}))
        else:
            self._queue.appendleft(task)


def _connect(spec: WorkspaceSpec, workers: int | None, cpus_per_worker: int, gpus: bool | None,
             address: str | None, object_store_memory: int) -> tuple[bool, int, bool]:
    """Start or attach to Ray and size the pool: (started a local Ray, workers, on GPUs)."""
    cuda_ok = spec.device is None or spec.device.startswith("cuda")
    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        owns = init_ray(address)
        res = ray.cluster_resources()
        gpus = cuda_ok and res.get("GPU", 0) > 0 if gpus is None else gpus
        fits = int(res.get("GPU", 0)) if gpus else int(res.get("CPU", 1)) // cpus_per_worker
    else:
        gpus = cuda_ok and _local_gpus() > 0 if gpus is None else gpus
        fits = _local_gpus() if gpus else (os.cpu_count() or 1) // cpus_per_worker
        workers = workers or max(1, fits)
        owns = init_ray(num_cpus=workers * cpus_per_worker, num_gpus=workers if gpus else 0,
                        object_store_memory=object_store_memory)
    return owns, workers or max(1, fits), bool(gpus)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
