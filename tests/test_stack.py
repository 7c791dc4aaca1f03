"""The docker-compose stack's services, started directly from its commands (tests/stack.py), work
together: Optuna on PostgreSQL, the MLflow server, a two-node Ray cluster with token auth and job
submission, optuna-dashboard; they survive a PostgreSQL restart; nothing is left running.
`lbsearch run` submitted as a Ray job the way docs/cluster.md shows it (study in PostgreSQL,
tracking on the MLflow server, workers on both nodes), then the same run through faults: a Ray
node lost mid-trial, the driver killed and resumed, the MLflow server and PostgreSQL restarted
mid-run, each followed by the same check (tests/test_run.py's check_run, plus every planned trial
completed exactly once). About 5 minutes on the 2-core CPU machine (20 s starting the stack,
40-65 s per run)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import write_tiny_space
from stack import Stack, console_script, missing_requirements
from test_run import check_run

pytestmark = [pytest.mark.slow, pytest.mark.stack]


@pytest.fixture(scope="module")
def stack():
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    s = Stack()
    try:
        yield s.start()
    finally:
        s.stop()
        left = s.alive_pids()
        assert not left, f"processes left running by the stack: {left}"


@pytest.fixture(scope="module")
def storage(stack):
    optuna = pytest.importorskip("optuna")
    return optuna.storages.RDBStorage(stack.storage_url, engine_kwargs={"pool_pre_ping": True})


def _ray(stack, *args, timeout=120):
    return subprocess.run([console_script("ray"), *args], env=stack.env, capture_output=True, text=True,
                          timeout=timeout)


def _status(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_optuna_study_in_postgres(stack, storage):
    import optuna

    study = optuna.create_study(storage=storage, study_name="stack-roundtrip", directions=["minimize", "minimize"])
    for i in range(3):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("plan", f"S{i}")
        study.tell(trial, [x, 1 - x])
    # A second client (fresh engine) reads what the first wrote.
    other = optuna.load_study(study_name="stack-roundtrip", storage=optuna.storages.RDBStorage(stack.storage_url))
    assert [t.state for t in other.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.user_attrs["plan"] for t in other.trials] == ["S0", "S1", "S2"]
    assert len(other.best_trials) == 3  # (x, 1-x), both minimised: every trial is on the Pareto front


def test_optuna_dashboard_reads_the_study(stack, storage):
    import optuna

    optuna.create_study(storage=storage, study_name="stack-dashboard").optimize(lambda t: t.suggest_int("n", 0, 3), 2)
    with urllib.request.urlopen(f"{stack.optuna_dashboard_url}/api/studies", timeout=10) as r:
        names = [s["study_name"] for s in json.load(r)["study_summaries"]]
    assert "stack-dashboard" in names


def test_mlflow_server_rest_api(stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = client.create_experiment("stack-test")
    run = client.create_run(exp, tags={"lbsearch.plan": "SSLN"})
    client.log_metric(run.info.run_id, "kl", 0.125, step=1)
    client.log_text(run.info.run_id, "hello", "notes/hello.txt")  # proxied to --artifacts-destination
    client.set_terminated(run.info.run_id)
    got = MlflowClient(tracking_uri=stack.mlflow_uri).get_run(run.info.run_id)
    assert got.data.metrics["kl"] == 0.125 and got.data.tags["lbsearch.plan"] == "SSLN"
    assert list((stack.tmp / "mlartifacts").rglob("hello.txt")), "artifact not under --artifacts-destination"
    # --allowed-hosts from docker-compose.yml: the service name passes, a foreign Host header does not
    # (/health is exempt from the check, so ask the REST API).
    search = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search, {"Host": "mlflow:5000"}) == 200
    assert _status(search, {"Host": "evil.example:5000"}) == 403


def test_ray_cluster_has_two_nodes_and_needs_the_token(stack):
    for _ in range(20):
        res = _ray(stack, "status", "--address", stack.ray_address)
        active = res.stdout.split("Active:")[-1].split("Pending:")[0]
        if res.returncode == 0 and active.count("node_") == 2:
            break
        time.sleep(1)
    assert res.returncode == 0 and active.count("node_") == 2, res.stdout + res.stderr
    # The dashboard's job API refuses requests without the token, accepts them with it.
    assert _status(f"{stack.ray_dashboard_url}/api/jobs/") in (401, 403)
    token = stack.env["RAY_AUTH_TOKEN"]
    assert _status(f"{stack.ray_dashboard_url}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200


def test_ray_job_submit(stack, tmp_path):
    """A job runs on both nodes, and reaches the study with no password on its command line
    (the head's PGPASSWORD from docker-compose.yml)."""
    (tmp_path / "script.py").write_text(
        "import sys, optuna, ray\n"
        "ray.init()\n"
        "@ray.remote(num_cpus=1)\n"
        "def where():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "nodes = set(ray.get([where.remote() for _ in range(4)]))\n"
        "study = optuna.create_study(storage=sys.argv[1], study_name='from-a-ray-job')\n"
        "study.optimize(lambda t: t.suggest_float('x', 0, 1), 1)\n"
        "print('lbsearch-job-ok', len(ray.nodes()), 'nodes')\n")
    url = stack.storage_url.replace(":" + stack.variables["OPTUNA_DB_PASSWORD"] + "@", "@")
    assert stack.variables["OPTUNA_DB_PASSWORD"] not in url
    res = _ray(stack, "job", "submit", "--address", stack.ray_dashboard_url, "--working-dir", str(tmp_path),
               "--", "python", "script.py", url)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lbsearch-job-ok 2 nodes" in res.stdout


def test_services_survive_a_postgres_restart(stack, storage):
    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.create_study(storage=storage, study_name="stack-pg-restart")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), 1)
    stack.restart_postgres()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), 1)  # the pooled connection is stale: pre-ping
    assert len(optuna.load_study(study_name="stack-pg-restart", storage=storage).trials) == 2
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    run = client.create_run(client.create_experiment("stack-after-pg-restart"))
    client.log_metric(run.info.run_id, "ppl", 11.6)
    assert client.get_run(run.info.run_id).data.metrics["ppl"] == 11.6


def test_mlflow_stop_and_start(stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    run = client.create_run(client.create_experiment("stack-mlflow-restart"))
    client.log_metric(run.info.run_id, "kl", 0.5)
    stack.stop_mlflow()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{stack.mlflow_uri}/health", timeout=3)
    stack.start_mlflow()
    assert MlflowClient(tracking_uri=stack.mlflow_uri).get_run(run.info.run_id).data.metrics["kl"] == 0.5


# ---------------------------------------------------------------- `lbsearch run` as a Ray job

REPO = Path(__file__).resolve().parents[1]
HOLD_ENV = "LBSEARCH_FAULT_HOLD_FILE"  # lbsearch/executors/ray.py: workers wait while this file exists


def test_checkout_imports_its_own_kernels_ahead_of_the_installed_package(tmp_path):
    """What `ray job submit --working-dir .` does to the job: the uploaded repository comes first on
    PYTHONPATH. The import guard in lbsearch/__init__.py maps the checkout's top-level kernels/ and
    search_spaces/ (the installed package maps them at install time); without it the import fails
    where lbsearch is installed normally (the Ray image). The editable install's finder is removed
    to stand for that."""
    copy = tmp_path / "checkout"
    for name in ("lbsearch", "kernels", "search_spaces"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
             "getattr(f, '__module__', '')]\n"
             "import importlib.resources as r, lbsearch, lbsearch.kernels.lswa\n"
             "print(lbsearch.__file__, lbsearch.kernels.lswa.__file__, "
             "r.files('lbsearch.search_spaces').joinpath('smollm2-135m.yaml').is_file())\n")
    env = dict(os.environ, PYTHONPATH=str(copy))

    def run():
        return subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    res = run()
    assert res.returncode == 0, res.stderr[-3000:]
    package, kernels, space_found = res.stdout.split()
    assert package.startswith(str(copy)) and kernels.startswith(str(copy / "kernels")) and space_found == "True"
    init = copy / "lbsearch" / "__init__.py"  # the same checkout without the guard: broken
    init.write_text(init.read_text().replace("\n_map_checkout_folders()\n", "\n"))
    res = run()
    assert res.returncode != 0 and "lbsearch.kernels" in res.stderr


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("stack-run")
    return write_tiny_space(root, tokenizer, layers=4, extra="search: {n_startup_trials: 4, rescore_top: 1}\n")


def job_storage_url(stack) -> str:
    """The study database as the README's job command names it: no password (the head's PGPASSWORD)."""
    return f"postgresql+psycopg2://{stack.variables['OPTUNA_DB_USER']}@127.0.0.1:{stack.ports['postgres']}/optuna"


class RunJob:
    """`lbsearch run` submitted as the README shows it (`ray job submit --working-dir . -- lbsearch
    run ...` from the repository), its client running in the background; ``stop()`` ends both."""

    def __init__(self, stack, name: str, log: Path, args: list[str], env_vars: dict | None = None):
        self.stack, self.id, self.log = stack, f"{name}-{stack.id}-{time.monotonic_ns()}", log
        runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        cmd = [console_script("ray"), "job", "submit", "--address", stack.ray_dashboard_url, "--submission-id",
               self.id, "--working-dir", ".", *runtime, "--", "lbsearch", "run", *args]
        with open(log, "wb") as fh:
            self.client = subprocess.Popen(cmd, cwd=REPO, env=stack.env, stdout=fh, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.client.poll() is None

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        """The client's exit code (0: the job succeeded) and its output (the job's log)."""
        self.client.wait(timeout=timeout)
        return self.client.returncode, self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the job (if it still runs) and the client, by PID."""
        if self.client.poll() is None:
            _ray(self.stack, "job", "stop", "--address", self.stack.ray_dashboard_url, self.id, timeout=60)
            self.client.send_signal(signal.SIGKILL)
            self.client.wait(timeout=30)


def run_args(stack, out: Path, name: str, space: Path, trials: int, *extra: str) -> list[str]:
    return ["--space", str(space), "--out", str(out), "--trials", str(trials), "--workers", "2",
            "--storage", job_storage_url(stack), "--mlflow-uri", stack.mlflow_uri, "--study", name,
            "--experiment", name, *extra]


def study_trials(storage, name: str, states=None):
    """The study's trials (one storage for every poll: each RDBStorage holds its own connections),
    or [] while the study does not exist yet."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False, states=states)


def wait_for(what: str, ready, job: RunJob, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert job.running(), f"the job ended before {what}:\n{job.log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.3)


def n_complete(storage, name: str) -> int:
    from optuna.trial import TrialState

    return len(study_trials(storage, name, (TrialState.COMPLETE,)))


def wait_complete(storage, name: str, n: int, job: RunJob) -> None:
    wait_for(f"{n} complete trials", lambda: n_complete(storage, name) >= n, job)


def hold_workers(hold: Path, job: RunJob, workers: int = 2) -> None:
    """Hold the workers at their next plan (mid-trial: the trial is RUNNING, the plan on the worker)."""
    hold.touch()
    wait_for(f"{workers} held workers", lambda: len(list(hold.parent.glob(hold.name + ".*"))) >= workers, job)


def check_stack_run(stack, storage, out: Path, name: str, trials: int):
    """check_run on the stack (PostgreSQL study, MLflow server), plus: the planned trials completed
    exactly once (none left running or waiting, no plan scored twice, every failed trial retried)."""
    from optuna.trial import TrialState

    client, parent, kids = check_run(out, stack.mlflow_uri, storage=stack.storage_url, experiment=name)
    assert parent.info.status == "FINISHED"
    trials_ = study_trials(storage, name)
    complete = [t for t in trials_ if t.state == TrialState.COMPLETE]
    assert len(complete) == trials
    assert not [t.number for t in trials_ if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    scored = [t.user_attrs["key"] for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(scored) == len(set(scored)), "a plan was scored twice"
    retried = {t.user_attrs.get("retry_of") for t in trials_}
    failed = [t for t in trials_ if t.state == TrialState.FAIL]
    assert all(t.number in retried for t in failed), "a failed trial was not run again"
    assert not (out / "tracking-queue.jsonl").exists(), "MLflow calls left queued"
    return trials_, kids


def test_lbsearch_run_as_a_ray_job(stack, storage, tiny_space, tmp_path):
    """The README's command: the job on the head, actors on both nodes, the study in PostgreSQL,
    tracking on the MLflow server; then `lbsearch export` from the cluster's study."""
    out, name = tmp_path / "run", "run-main"
    job = RunJob(stack, name, tmp_path / "job.log", run_args(stack, out, name, tiny_space, 10, "--finalists", "1"))
    try:
        rc, log = job.wait()
    finally:
        job.stop()
    assert rc == 0 and "succeeded" in log, log[-4000:]
    trials, kids = check_stack_run(stack, storage, out, name, 10)
    workers = {t.user_attrs["worker"] for t in trials if t.user_attrs.get("worker") not in (None, "study")}
    assert len(workers) == 2, f"one actor per node (each offers 1 CPU): {workers}"
    assert [k for k in kids.values() if k.data.tags.get("finalist") == "true"]
    # The README's export and pareto from the cluster's study, from the host (password in PGPASSWORD).
    env = dict(os.environ, PGPASSWORD=stack.variables["OPTUNA_DB_PASSWORD"])
    for command in ("export", "pareto"):
        res = subprocess.run([sys.executable, "-m", "lbsearch", command, "--storage", job_storage_url(stack),
                              "--study", name, "--out", str(tmp_path / command)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    front = sorted(p["plan"] for p in json.loads((out / "pareto.json").read_text())["front"])
    index = json.loads((tmp_path / "export" / "plans" / "index.json").read_text())
    assert sorted(p["plan"] for p in index["plans"]) == front
    assert sorted(p["plan"] for p in json.loads((tmp_path / "pareto" / "pareto.json").read_text())["front"]) == front


def test_run_survives_losing_a_ray_node_mid_trial(stack, storage, tiny_space, tmp_path):
    """Lose the second node (SIGKILL all its processes) while its worker holds a plan: the plan goes
    to the head's worker, the run finishes with every trial once."""
    out, name, hold = tmp_path / "run", "run-node-loss", tmp_path / "hold"
    job = RunJob(stack, name, tmp_path / "job.log", run_args(stack, out, name, tiny_space, 16, "--finalists", "0"),
                 {HOLD_ENV: str(hold)})
    try:
        wait_complete(storage, name, 3, job)
        hold_workers(hold, job)
        held = {int(mark.suffix[1:]) for mark in hold.parent.glob(hold.name + ".*")}
        node = stack.procs["ray_node"]
        lost = stack.lose_ray_node()
        node.wait(timeout=60)
        assert held & set(lost), f"no held worker on the lost node: held {held}, lost {lost}"
        hold.unlink()
        rc, log = job.wait()
    finally:
        hold.unlink(missing_ok=True)
        job.stop()
        if stack.procs["ray_node"].poll() is not None:
            stack.start_ray_node()
    assert rc == 0, log[-4000:]
    trials, _ = check_stack_run(stack, storage, out, name, 16)
    assert any(t.user_attrs.get("attempts", 1) >= 2 for t in trials), "no plan was lost with the node"


def test_killed_driver_resumes(stack, storage, tiny_space, tmp_path):
    """SIGKILL `lbsearch run` (the job's driver) with two trials on the workers, then
    `lbsearch run --resume --out DIR` as a new job: the two are failed and run again, nothing twice."""
    from optuna.trial import TrialState

    out, name, hold = tmp_path / "run", "run-driver-kill", tmp_path / "hold"
    job = RunJob(stack, name, tmp_path / "job.log", run_args(stack, out, name, tiny_space, 16, "--finalists", "0"),
                 {HOLD_ENV: str(hold)})
    again = None
    try:
        wait_complete(storage, name, 3, job)
        hold_workers(hold, job)
        running = {t.number for t in study_trials(storage, name, (TrialState.RUNNING,))}
        drivers = stack.processes_with_args("--out", str(out))
        assert len(drivers) == 1, drivers
        os.kill(drivers[0], signal.SIGKILL)
        hold.unlink()
        rc, log = job.wait()
        assert rc != 0 and f"Job '{job.id}' failed" in log, log[-4000:]
        again = RunJob(stack, name + "-resume", tmp_path / "resume.log", ["--resume", "--out", str(out)])
        rc, log = again.wait()
    finally:
        hold.unlink(missing_ok=True)
        job.stop()
        if again is not None:
            again.stop()
    assert rc == 0, log[-4000:]
    trials, _ = check_stack_run(stack, storage, out, name, 16)
    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    assert len(running) >= 2 and failed == running


def test_run_survives_an_mlflow_restart(stack, storage, tiny_space, tmp_path):
    """Stop the MLflow server mid-run: trials go on, their logging queues (MLflow's own retries
    off, so the queue is what is tested), and catches up once the server is back."""
    out, name, hold = tmp_path / "run", "run-mlflow-restart", tmp_path / "hold"
    env = {HOLD_ENV: str(hold), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    job = RunJob(stack, name, tmp_path / "job.log", run_args(stack, out, name, tiny_space, 20, "--finalists", "0"),
                 env)
    try:
        wait_complete(storage, name, 3, job)
        hold_workers(hold, job)
        stack.stop_mlflow()
        done = n_complete(storage, name)
        hold.unlink()
        wait_for("3 more trials", lambda: n_complete(storage, name) >= done + 3, job)
        hold_workers(hold, job)
        assert (out / "tracking-queue.jsonl").is_file(), "nothing queued while the server was down"
        stack.start_mlflow()
        hold.unlink()
        rc, log = job.wait()
    finally:
        hold.unlink(missing_ok=True)
        job.stop()
        if "mlflow" not in stack.procs:
            stack.start_mlflow()
    assert rc == 0, log[-4000:]
    assert "queuing logging calls" in log
    check_stack_run(stack, storage, out, name, 20)


def test_run_survives_a_postgres_restart(stack, storage, tiny_space, tmp_path):
    """PostgreSQL goes down for 3 s while the driver tells finished trials: it waits and goes on."""
    out, name, hold = tmp_path / "run", "run-pg-restart", tmp_path / "hold"
    job = RunJob(stack, name, tmp_path / "job.log", run_args(stack, out, name, tiny_space, 16, "--finalists", "0"),
                 {HOLD_ENV: str(hold)})
    try:
        wait_complete(storage, name, 3, job)
        hold_workers(hold, job)
        stack.stop_postgres()
        try:
            hold.unlink()  # the held trials finish now: the driver's tell meets a database that is down
            time.sleep(3)
        finally:
            stack.start_postgres()
        rc, log = job.wait()
    finally:
        hold.unlink(missing_ok=True)
        job.stop()
    assert rc == 0, log[-4000:]
    assert "the study database is unreachable" in log
    check_stack_run(stack, storage, out, name, 16)


def test_killing_the_second_nodes_raylet_takes_the_node_down(stack):
    import psutil

    node = stack.procs["ray_node"]
    raylet = stack.kill_ray_node_raylet()
    node.wait(timeout=30)  # `ray start --block` notices and takes the node's other processes down
    assert not psutil.pid_exists(raylet) or psutil.Process(raylet).status() == psutil.STATUS_ZOMBIE
    assert _status(f"{stack.ray_dashboard_url}/api/gcs_healthz") == 200  # the head is unaffected


def test_stop_leaves_no_process(stack):
    pids = set(stack.pids)
    assert len(pids) > 10  # postgres, mlflow, dashboard, two Ray nodes and their children
    stack.stop()
    assert stack.alive_pids() == []
