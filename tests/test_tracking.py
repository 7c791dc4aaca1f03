"""MLflow tracking: a fake study (TrialResults built by hand) logged to the run folder's SQLite
store, to a real `mlflow server` that is stopped and restarted mid-run, and read back through
`mlflow ui`'s REST API."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from stack import console_script, free_port

from lbsearch.errors import LBSearchError
from lbsearch.objective import TrialResult
from lbsearch.tracking import (QUEUE_FILE, Tracker, flatten, front_html, plan_params, storage_tag,
                               ui_command)

PLANS = {0: ("SSL8N", 0.10, 1.4), 1: ("SNNN", 0.90, 2.5), 2: ("SL16L8S", 0.25, 1.2)}
STORAGE = "postgresql+psycopg2://optuna:s3cret@127.0.0.1:5432/optuna"
PARAMS = {"model": "tiny", "space": {"kinds": {"default": ["softmax", "lswa", "none"]},
                                     "lswa": {"windows": [8, 16]}}, "sampler": "tpe", "seed": 0}


def result(plan: str, kl: float, thr: float, fidelity: str = "assembled") -> TrialResult:
    return TrialResult(plan=plan, key="k", fidelity=fidelity, kl=kl, perplexity=10 + kl, agreement=0.9 - kl / 10,
                       eval_tokens=128, real_text={"python-docs": {"kl": 2 * kl, "perplexity": 20.0, "agreement": 0.8}},
                       throughput_ratio=thr, tokens_per_s=1000 * thr, kv_bytes_per_seq=2**20,
                       max_concurrency=10, cost_source="analytic", seconds=0.5)


def log_study(tracker: Tracker, trials=PLANS, artifacts: dict | None = None) -> list[bool]:
    done = [tracker.log_trial(n, result(*v), "COMPLETE", f"host:{n}") for n, v in trials.items()]
    done.append(tracker.log_trial(3, None, "FAIL", "host:3", fail_reason="worker died", plan="SSSS"))
    done.append(tracker.log_finalist(0, result("SSL8N", 0.05, 1.4, "brief"), {"tokens_per_s": 123.0}))
    if artifacts:
        done.append(tracker.log_artifacts(artifacts))
    return done


def children(client, parent_id: str) -> dict[int, object]:
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    out = {}
    for run in runs:
        n = int(run.data.tags["trial_number"])
        assert n not in out, f"trial {n} has two child runs"
        out[n] = run
    return out


def artifact_files(tmp: Path) -> dict[str, Path]:
    (tmp / "space.yaml").write_text("model: tiny\n")
    (tmp / "pareto.json").write_text(json.dumps({"front": []}))
    rows = [{"trial_number": n, "plan": p, "result": result(p, kl, thr).to_dict()} for n, (p, kl, thr) in PLANS.items()]
    (tmp / "pareto.html").write_text(front_html(rows[:1], rows[1:]))
    return {"space.yaml": tmp / "space.yaml", "pareto/pareto.json": tmp / "pareto.json",
            "pareto/front.html": tmp / "pareto.html", "absent.png": tmp / "absent.png"}


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory):
    """A fake study logged to the default store of a run folder (working directory elsewhere)."""
    tmp = tmp_path_factory.mktemp("tracking")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        tracker = Tracker.open(None, tmp / "run", "lbsearch-test")
        parent = tracker.start_study("study-a", PARAMS, {"extra": "yes"}, storage=STORAGE)
        done = log_study(tracker, artifacts=artifact_files(tmp))
        assert tracker.finish() and all(done)
    finally:
        os.chdir(cwd)
    return tmp, tracker, parent


# ------------------------------------------------------------------------- names

def test_names_flatten_plan_params_and_hidden_password():
    flat = flatten(PARAMS)
    assert flat["space.kinds.default"] == "softmax,lswa,none" and flat["space.lswa.windows"] == "8,16"
    assert flat["seed"] == "0" and flatten({"x": "y" * 7000})["x"] == "y" * 6000
    params = plan_params("SL16L8NN")
    assert params["n_softmax"] == "1" and params["n_lswa"] == "2" and params["n_none"] == "2"
    assert params["windows"] == "8,16" and plan_params("SSN")["windows"] == "-"
    assert "s3cret" not in storage_tag(STORAGE) and "***" in storage_tag(STORAGE)
    assert ui_command("/x/run") == "mlflow ui --backend-store-uri sqlite:////x/run/mlflow.db --host 127.0.0.1 --port 5000"


def test_front_html_is_self_contained_with_tooltips():
    rows = [{"trial_number": n, "plan": p, "result": result(p, kl, thr).to_dict(),
             "rescored": {"brief": result(p, kl / 2, thr, "brief").to_dict()}} for n, (p, kl, thr) in PLANS.items()]
    page = front_html(rows[:2], rows[2:], title="front <x>")
    assert page.count('class="pareto"') == 2 and page.count('class="other"') == 1
    assert "SNNN" in page and "brief: KL 0.45" in page and "<title>" in page and "front &lt;x&gt;" in page
    assert "http://" not in page and "https://" not in page and " src=" not in page


def test_file_store_and_unreachable_server_are_one_line_errors(tmp_path):
    with pytest.raises(LBSearchError, match="file stores"):
        Tracker.open(f"file://{tmp_path}/mlruns", tmp_path, "x")
    start = time.monotonic()
    with pytest.raises(LBSearchError) as err:
        Tracker.open(f"http://127.0.0.1:{free_port()}", tmp_path, "x")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value) and "not reachable" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------- SQLite store

def test_sqlite_store_has_parent_children_params_metrics_artifacts(sqlite_run):
    tmp, tracker, parent_id = sqlite_run
    client = tracker.client
    assert tracker.uri == f"sqlite:///{tmp / 'run' / 'mlflow.db'}"
    assert not (tmp / "mlruns").exists() and (tmp / "run" / "mlartifacts").is_dir()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-a"
    assert parent.data.params["space.lswa.windows"] == "8,16" and parent.data.params["model"] == "tiny"
    tags = parent.data.tags
    assert tags["lbsearch.study"] == "study-a" and "s3cret" not in tags["lbsearch.storage"]
    assert tags["lbsearch.code_version"] and tags["extra"] == "yes"
    kids = children(client, parent_id)
    assert sorted(kids) == [0, 1, 2, 3]
    one = kids[1].data
    assert one.params["plan"] == "SNNN" and one.params["n_none"] == "3" and one.params["windows"] == "-"
    assert one.tags["fidelity"] == "assembled" and one.tags["worker"] == "host:1" and one.tags["state"] == "COMPLETE"
    assert one.metrics["kl"] == 0.9 and one.metrics["throughput_ratio"] == 2.5 and one.metrics["kv_mb_per_seq"] == 1.0
    assert one.metrics["real_python_docs_kl"] == 1.8 and one.metrics["trial_seconds"] == 0.5
    assert {"perplexity", "agreement", "tokens_per_s", "max_concurrency"} <= set(one.metrics)
    assert kids[0].data.params["windows"] == "8" and kids[2].data.params["windows"] == "8,16"
    assert kids[0].data.metrics["healed_kl"] == 0.05 and kids[0].data.metrics["bench_tokens_per_s"] == 123.0
    assert kids[0].data.tags["healed_fidelity"] == "brief"
    failed = kids[3]
    assert failed.info.status == "FAILED" and failed.data.tags["fail_reason"] == "worker died"
    assert failed.data.params["plan"] == "SSSS" and not failed.data.metrics
    assert all(kids[n].info.status == "FINISHED" for n in PLANS)
    top = {a.path for a in client.list_artifacts(parent_id)}
    assert top == {"space.yaml", "pareto"}
    assert {a.path for a in client.list_artifacts(parent_id, "pareto")} == {"pareto/pareto.json", "pareto/front.html"}


def test_resume_continues_the_parent_and_duplicates_nothing(sqlite_run):
    tmp, first, parent_id = sqlite_run
    tracker = Tracker.open(None, tmp / "run", "lbsearch-test")
    changed = {**PARAMS, "seed": 1, "budget": 5}
    assert tracker.start_study("study-a", changed, storage=STORAGE) == parent_id
    assert tracker.client.get_run(parent_id).info.status == "RUNNING"
    assert all(log_study(tracker)) and tracker.finish("KILLED")
    run = tracker.client.get_run(parent_id)
    assert run.info.status == "KILLED" and run.data.params["seed"] == "0" and run.data.params["budget"] == "5"
    assert run.data.tags["changed.seed"] == "1" and tracker.changed == {"seed": "1"}
    kids = children(tracker.client, parent_id)
    assert sorted(kids) == [0, 1, 2, 3]
    assert len(tracker.client.get_metric_history(kids[1].info.run_id, "kl")) == 1
    other = tracker.start_study("study-b", PARAMS, storage=STORAGE)
    assert other != parent_id and Tracker.locate(None, tmp / "run", "study-a", STORAGE).parent_id == parent_id


def test_queued_calls_survive_a_crash_and_replay_on_the_next_tracker(sqlite_run, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    tmp = sqlite_run[0]
    tracker = Tracker.open(None, tmp / "run", "lbsearch-test")
    tracker.start_study("study-q", PARAMS, storage=STORAGE)

    def down(*args, **kwargs):
        raise MlflowException("API request to http://x failed with exception ConnectionError", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(tracker.client, "create_run", down)
    assert not tracker.log_trial(0, result(*PLANS[0]), "COMPLETE", "w") and not tracker.finish()
    assert (tmp / "run" / QUEUE_FILE).is_file()
    again = Tracker.open(None, tmp / "run", "lbsearch-test")  # the driver died; a resumed one replays the queue
    parent_id = again.start_study("study-q", PARAMS, storage=STORAGE)
    assert not any(item["op"] == "end" for item in again._queue)  # a resumed study is not ended by the replay
    assert again.client.get_run(parent_id).info.status == "RUNNING"
    assert again.finish() and not (tmp / "run" / QUEUE_FILE).exists()
    assert again.log_trial(0, result(*PLANS[0]), "COMPLETE", "w")  # once more, in the session that created it
    kids = children(again.client, parent_id)
    assert sorted(kids) == [0] and kids[0].data.metrics["kl"] == 0.1
    assert len(again.client.get_metric_history(kids[0].info.run_id, "kl")) == 1


def test_front_html_takes_the_search_front():
    from lbsearch.search.pareto import Scored, build_front

    scored = [Scored(trial=n, plan=p, key=str(n), values=(kl, thr), result=result(p, kl, thr),
                     rescored={"brief": result(p, kl / 2, thr, "brief")} if n == 0 else {})
              for n, (p, kl, thr) in PLANS.items()]
    front = build_front(scored, study="s", objectives=["kl", "throughput"], directions=["minimize", "maximize"],
                        reference=[10.0, 0.0], fidelity="assembled")
    page = front_html(front)
    assert page.count('class="pareto"') == 2 and page.count('class="other"') == 1 and "brief: KL 0.05" in page


# ------------------------------------------------------------------------- real servers

@contextlib.contextmanager
def mlflow_process(args: list[str], port: int, log: Path, timeout: float = 120):
    """`mlflow <args>` on 127.0.0.1:port, waited for (/health), killed by its process group at the end."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([console_script("mlflow"), *args, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"mlflow exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            assert time.monotonic() < deadline, f"mlflow not healthy: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def server_args(tmp: Path) -> list[str]:
    return ["server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination",
            str(tmp / "server-artifacts"), "--workers", "1"]


@pytest.mark.slow
def test_real_server_restart_mid_run_loses_nothing(tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with mlflow_process(server_args(tmp_path), port, tmp_path / "server.log"):
        tracker = Tracker.open(uri, tmp_path / "run", "lbsearch-test")
        parent_id = tracker.start_study("study-a", PARAMS, storage=STORAGE)
        assert tracker.log_trial(0, result(*PLANS[0]), "COMPLETE", "host:0")
    # server down: MLflow's own retries would wait minutes, so make them fail fast for the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    done = log_study(tracker, {n: v for n, v in PLANS.items() if n}, artifact_files(tmp_path))
    assert not any(done) and (tmp_path / "run" / QUEUE_FILE).is_file()
    assert not tracker.finish()
    queued = [json.loads(line)["op"] for line in (tmp_path / "run" / QUEUE_FILE).read_text().splitlines()]
    assert queued == ["trial", "trial", "trial", "finalist", "artifacts", "end"]
    with mlflow_process(server_args(tmp_path), port, tmp_path / "server.log"):
        assert tracker.finish()
        assert not (tmp_path / "run" / QUEUE_FILE).exists()
        kids = children(tracker.client, parent_id)
        assert sorted(kids) == [0, 1, 2, 3] and kids[0].data.metrics["healed_kl"] == 0.05
        assert tracker.client.get_run(parent_id).info.status == "FINISHED"
        assert {a.path for a in tracker.client.list_artifacts(parent_id)} == {"space.yaml", "pareto"}
        again = Tracker.open(uri, tmp_path / "run", "lbsearch-test")
        assert again.start_study("study-a", PARAMS, storage=STORAGE) == parent_id


@pytest.mark.slow
def test_mlflow_ui_rest_api_lists_parent_children_and_artifacts(sqlite_run):
    tmp, tracker, parent_id = sqlite_run
    port = free_port()
    command = ui_command(tmp / "run", port).split()
    assert command[:2] == ["mlflow", "ui"]
    with mlflow_process(command[1:-4], port, tmp / "ui.log"):
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        body = json.dumps({"experiment_ids": [tracker.experiment_id], "max_results": 100}).encode()
        req = urllib.request.Request(f"{base}/runs/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            runs = json.load(resp)["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        assert parent_id in tags
        kids = [t for t in tags.values() if t.get("mlflow.parentRunId") == parent_id]
        assert sorted(int(t["trial_number"]) for t in kids) == [0, 1, 2, 3]
        with urllib.request.urlopen(f"{base}/artifacts/list?run_id={parent_id}&path=pareto", timeout=30) as resp:
            files = {f["path"] for f in json.load(resp)["files"]}
        assert files == {"pareto/pareto.json", "pareto/front.html"}


def test_a_locked_store_queues_in_one_line_without_a_traceback(tmp_path, capfd, caplog):
    """MLflow logs a store's SQL errors with a traceback; the tracker says them in one line and queues."""
    import sqlite3

    tracker = Tracker.open(None, tmp_path / "run", "lbsearch-test")
    tracker.start_study("study-locked", PARAMS, storage=STORAGE)
    capfd.readouterr()
    lock = sqlite3.connect(tmp_path / "run" / "mlflow.db", timeout=0)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        assert not tracker.log_trial(0, result(*PLANS[0]), "COMPLETE", "w")
    finally:
        lock.rollback()
        lock.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and not [r for r in caplog.records if r.exc_info], err[-3000:]
    assert "database is locked); queuing logging calls" in caplog.text
    assert tracker.finish() and sorted(children(tracker.client, tracker.parent_id)) == [0]
