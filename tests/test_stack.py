"""The docker-compose stack's services, started directly from its commands (tests/stack.py), work
together: Optuna on PostgreSQL, the MLflow server, a two-node Ray cluster with token auth and job
submission, optuna-dashboard; they survive a PostgreSQL restart; nothing is left running.
About 55 s on the 2-core CPU machine (20 s of it starting the stack)."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from stack import Stack, console_script, missing_requirements

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
