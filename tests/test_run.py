"""`lbsearch run` end to end on a tiny teacher: MLflow store (SQLite, a real server, `mlflow ui`),
pareto.json against the storage, cached steps, export round trip, kill and resume, bad settings."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_space
from stack import free_port
from test_tracking import mlflow_process, server_args

import lbsearch
from lbsearch.cli import main
from lbsearch.export import load_healed
from lbsearch.search import front_from_storage
from lbsearch.search.store import sqlite_url
from lbsearch.tracking import ui_command

REPO = Path(__file__).resolve().parents[1]
SPACE_EXTRA = "search: {n_startup_trials: 4, rescore_top: 2}\n"
ARTIFACTS = {"space.yaml", "data_sources.json", "sensitivity", "pareto.json", "pareto.csv", "pareto.png",
             "front.html", "hypervolume.png", "export"}


def run_cli(*args, env, wait=True):
    cmd = [sys.executable, "-m", "lbsearch", "run", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)


def finished_trials(out: Path, storage: str | None = None, study: str | None = None) -> dict[int, str]:
    """trial number -> state of every finished trial in the run's Optuna storage: the run folder's
    optuna.db, or the study ``study`` at the RDB URL ``storage`` (PostgreSQL)."""
    if storage is not None:
        from lbsearch.search.store import load_study

        trials = load_study(storage, study).get_trials(deepcopy=False)
        return {t.number: t.state.name for t in trials if t.state.name not in ("RUNNING", "WAITING")}
    with sqlite3.connect(out / "optuna.db") as db:
        rows = db.execute("select number, state from trials where state != 'RUNNING' and state != 'WAITING'")
        return dict(rows.fetchall())


def mlflow_runs(uri: str, experiment: str | None = None):
    """(client, parent runs, child runs) in the store at ``uri`` (only ``experiment``'s, when given)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        ids = [client.get_experiment_by_name(experiment).experiment_id]
    runs = client.search_runs(ids, max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, kids


def check_run(out: Path, uri: str, storage: str | None = None, experiment: str | None = None) -> tuple:
    """What every complete run must hold; returns (client, parent, children by trial number).

    ``out``: the run folder; ``uri``: the MLflow store; ``storage``: the Optuna RDB URL (default:
    the run folder's optuna.db); ``experiment``: the MLflow experiment of the run (default: the
    store holds this run alone)."""
    client, parents, kids = mlflow_runs(uri, experiment)
    assert len(parents) == 1
    parent = parents[0]
    study = parent.data.tags.get("lbsearch.study", "lbsearch-tiny")
    finished = finished_trials(out, storage, study)
    numbers = [int(k.data.tags["trial_number"]) for k in kids]
    assert len(numbers) == len(set(numbers)), "an MLflow child was duplicated"
    assert set(numbers) == set(finished), "one child run per finished trial"
    assert all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids)
    assert {"model", "sampler", "seed", "budgets.eval_tokens", "target.device", "target.batch"} <= set(parent.data.params)
    assert {"lbsearch.study", "lbsearch.storage"} <= set(parent.data.tags) or "study" in str(parent.data.tags)
    by_number = {int(k.data.tags["trial_number"]): k for k in kids}
    complete = [n for n, s in finished.items() if s == "COMPLETE"]
    for n in complete:
        kid = by_number[n]
        assert {"kl", "perplexity", "agreement", "throughput_ratio", "kv_mb_per_seq", "trial_seconds"} <= \
            set(kid.data.metrics)
        assert {"plan", "n_softmax", "n_lswa", "n_none", "windows"} <= set(kid.data.params)
        assert kid.data.tags["state"] == "COMPLETE" and kid.data.tags["fidelity"] == "assembled"
        assert kid.data.tags["worker"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= ARTIFACTS
    stored = front_from_storage(storage or sqlite_url(out), study)
    written = json.loads((out / "pareto.json").read_text())
    assert [p["plan"] for p in written["front"]] == [p.plan for p in stored.points]
    assert written["hypervolume"] == pytest.approx(stored.hypervolume)
    return client, parent, by_number


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("run")
    space = write_tiny_space(root, tokenizer, layers=4, extra=SPACE_EXTRA)
    return root, space, dict(os.environ, LBSEARCH_CACHE=str(root / "cache"))


@pytest.fixture(scope="module")
def finished(tiny):
    """One complete run of 6 trials, in a subprocess, as a user starts it."""
    root, space, env = tiny
    out = root / "first"
    proc = run_cli("--space", str(space), "--out", str(out), "--trials", "6", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_complete_run_has_mlflow_parent_children_artifacts_and_the_storage_front(finished):
    out, proc = finished
    assert "Pareto front of lbsearch-tiny" in proc.stdout
    assert ui_command(out) in proc.stdout and "Show all" in proc.stdout
    assert f"exported plans: {out / 'export' / 'plans'}" in proc.stdout
    client, parent, kids = check_run(out, f"sqlite:///{out / 'mlflow.db'}")
    assert parent.info.status == "FINISHED"
    healed = [p for p in (out / "finalists").iterdir() if (p / "healed" / "weights.safetensors").is_file()]
    assert len(healed) == 2  # rescore_top: 2, each kept for export
    finalists = [k for k in kids.values() if k.data.tags.get("finalist") == "true"]
    assert len(finalists) == 2 and all("healed_kl" in k.data.metrics for k in finalists)
    index = json.loads((out / "export" / "plans" / "index.json").read_text())
    assert len(index["plans"]) == len(json.loads((out / "pareto.json").read_text())["front"])
    sources = json.loads((out / "data_sources.json").read_text())  # each source named, with the tokens it gave
    (source,) = sources["corpus"]["sources"]
    assert source["kind"] == "file" and source["tokens"] > 0 and sources["healing"] == "the corpus's train split"
    assert parent.data.params["data_sources.0.kind"] == "file"
    assert int(parent.data.params["data_sources.0.tokens"]) == source["tokens"]


@pytest.mark.slow
def test_mlflow_ui_on_the_run_store_lists_the_study(finished):
    out, _ = finished
    port = free_port()
    with mlflow_process(ui_command(out, port).split()[1:-4], port, out.parent / "ui.log"):
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        with urllib.request.urlopen(f"{base}/experiments/search?max_results=10", timeout=30) as resp:
            ids = [e["experiment_id"] for e in json.load(resp)["experiments"]]
        body = json.dumps({"experiment_ids": ids, "max_results": 1000}).encode()
        req = urllib.request.Request(f"{base}/runs/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            runs = json.load(resp)["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r["info"]["run_id"] for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
        assert len(parents) == 1
        assert sum(t.get("mlflow.parentRunId") == parents[0] for t in tags) == len(finished_trials(out))
        with urllib.request.urlopen(f"{base}/artifacts/list?run_id={parents[0]}", timeout=30) as resp:
            assert {f["path"] for f in json.load(resp)["files"]} >= ARTIFACTS


def test_rerun_does_only_what_is_missing(tiny, finished):
    root, space, env = tiny
    out, _ = finished
    stamp = (out / "sensitivity" / "sensitivity.json").stat().st_mtime_ns
    before = finished_trials(out)
    proc = run_cli("--space", str(space), "--out", str(out), "--trials", "6", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sensitivity:" not in proc.stderr and "block library: training" not in proc.stderr
    assert "re-score" not in proc.stderr  # the finalists were healed already
    assert finished_trials(out) == before
    assert (out / "sensitivity" / "sensitivity.json").stat().st_mtime_ns == stamp
    check_run(out, f"sqlite:///{out / 'mlflow.db'}")


def test_exported_finalist_round_trips(tiny, finished, capsys):
    root, space, env = tiny
    out, _ = finished
    front = json.loads((out / "pareto.json").read_text())["front"]
    finalist = next(p for p in front if (out / "finalists" / p["key"] / "healed").is_dir())
    os.environ["LBSEARCH_CACHE"] = env["LBSEARCH_CACHE"]
    model_dir = root / "model"
    assert main(["export", str(out), "--plan", str(finalist["trial"]), "--model-out", str(model_dir)]) == 0
    exported = lbsearch.load_model(model_dir)
    teacher = lbsearch.load_teacher(str(root / "tiny"))
    load_healed(teacher, out / "finalists" / finalist["key"] / "healed")
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = teacher(ids).logits, exported(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    tokens = exported.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 13)


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_or_duplicating(tiny):
    root, space, env = tiny
    out = root / "killed"
    proc = start_search(space, out, env, complete=4, finalists=1)  # kill it mid-search
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = finished_trials(out)
    assert sum(s == "COMPLETE" for s in done.values()) < 40
    stamp = (out / "sensitivity" / "sensitivity.json").stat().st_mtime_ns
    again = run_cli("--out", str(out), "--resume", env=env)  # settings come from the run folder
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sensitivity:" not in again.stderr and "block library: training" not in again.stderr
    assert (out / "sensitivity" / "sensitivity.json").stat().st_mtime_ns == stamp
    after = finished_trials(out)
    assert all(after[n] == s for n, s in done.items()), "finished trials are kept as they were"
    assert sum(s == "COMPLETE" for s in after.values()) == 40
    check_run(out, f"sqlite:///{out / 'mlflow.db'}")


@pytest.mark.slow
def test_run_logs_to_a_real_mlflow_server(tiny, tmp_path):
    root, space, env = tiny
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "served"
    with mlflow_process(server_args(tmp_path), port, tmp_path / "server.log"):
        proc = run_cli("--space", str(space), "--out", str(out), "--trials", "3", "--finalists", "0",
                       "--mlflow-uri", uri, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"MLflow: open {uri}" in proc.stdout
        check_run(out, uri)
    assert not (out / "mlflow.db").exists()


def test_unreachable_mlflow_server_fails_before_any_compute(tiny, tmp_path):
    root, space, env = tiny
    out = tmp_path / "nowhere"
    start = time.monotonic()
    proc = run_cli("--space", str(space), "--out", str(out), "--mlflow-uri", f"http://127.0.0.1:{free_port()}",
                   env=dict(env, LBSEARCH_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 2 and time.monotonic() - start < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MLflow server not reachable" in lines[0]
    assert not (out / "sensitivity").exists() and not (out / "optuna.db").exists()
    assert not (tmp_path / "cache").exists(), "no model was loaded"


def test_config_file_gives_the_settings_and_flags_override_it(tiny, tmp_path):
    from lbsearch.commands.run import add_args, config_of

    root, space, _ = tiny
    config = tmp_path / "run.yaml"
    config.write_text(f"space: {space}\ntrials: 7\nsampler: nsga2\nworkers: 2\nbudgets: {{eval_tokens: 64}}\n")
    import argparse

    parser = argparse.ArgumentParser()
    add_args(parser)
    cfg = config_of(parser.parse_args(["--config", str(config), "--trials", "9", "--sensitivity-tokens", "32"]))
    assert (cfg.trials, cfg.sampler, cfg.workers, cfg.space) == (9, "nsga2", 2, str(space))
    assert cfg.budgets == {"eval_tokens": 64, "sensitivity_tokens": 32} and cfg.uses_ray
    ran = cfg.space_as_run(cfg.load_space(), "cpu")
    assert ran.search.trials == 9 and ran.budgets.eval_tokens == 64 and ran.search.sampler == "nsga2"


@pytest.mark.parametrize("text, flags, message", [
    ("trials: -2\n", [], "trials"),
    ("trails: 5\n", [], "trails: unknown setting; allowed: space, model"),
    ("budgets: {eval_tokenz: 5}\n", [], "budgets.eval_tokenz: unknown budget; allowed: calibration_tokens"),
    ("sampler: cmaes\n", [], "sampler"),
    ("- trials\n", [], "expected a mapping"),
    ("", ["--workers", "0"], "workers"),
    ("", ["--resume", "--out", "/nonexistent/run"], "--resume"),
    ("", ["--space", "/nonexistent/space.yaml"], "search space file not found"),
    ("", ["--storage", "nosuchdb://x"], "--storage nosuchdb://x"),
])
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, text, flags, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    args = (["--config", str(config)] if text else []) + flags
    if "--out" not in flags:
        args += ["--out", str(tmp_path / "out")]
    proc = run_cli(*args, env=dict(os.environ, LBSEARCH_CACHE=str(tmp_path / "cache")))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "cache").exists(), "no model was loaded"


def test_finalists_benchmark_is_measured_cached_and_logged(tmp_path, tokenizer):
    """The serving benchmark step (GPU runs) on the CPU engine: every re-scored plan measured
    against the base at the target's sizes, cached per plan, and logged as bench_* metrics."""
    from lbsearch import run_steps as steps
    from lbsearch.executors.local import LocalExecutor
    from lbsearch.search import SearchConfig, search
    from lbsearch.tracking import Tracker
    from lbsearch.workspace import Workspace

    space = write_tiny_space(tmp_path, tokenizer, layers=3, extra=SPACE_EXTRA + "target: {batch: 2, prompt: 8, "
                             "output: 4}\n")
    ws = Workspace.open(space, device="cpu", progress=False)
    config = SearchConfig(space=ws.space.model_copy(update={"search": ws.space.search.model_copy(
        update={"trials": 4})}), run_dir=tmp_path / "run", progress=False, prior=False,
        finalists=tmp_path / "run" / "finalists")
    with LocalExecutor(ws) as executor:
        front = search(config, executor).front
    finalists = [p for p in front.points if p.rescored]
    assert finalists
    bench = steps.bench_finalists(ws, front, tmp_path / "run", on_cpu=True)
    assert set(bench) == {p.key for p in finalists}
    for row in bench.values():
        assert row["decode_tps"] > 0 and row["speedup"] > 0 and row["batch"] == 2
    assert steps.bench_finalists(ws, front, tmp_path / "run") == {}  # CPU, not asked: nothing
    (tmp_path / "run" / steps.BENCH_FILE).write_text(json.dumps({k: {**v, "decode_tps": -1.0} for k, v in
                                                                 bench.items()}))
    again = steps.bench_finalists(ws, front, tmp_path / "run", on_cpu=True)
    assert all(v["decode_tps"] == -1.0 for v in again.values()), "measured plans are not measured again"
    tracker = Tracker.open(None, tmp_path / "run")
    tracker.start_study(front.study, {"model": "tiny"})
    steps.log_finalists(tracker, front, bench)
    _, _, kids = mlflow_runs(tracker.uri)
    logged = {int(k.data.tags["trial_number"]): k.data.metrics for k in kids}
    for p in finalists:
        assert logged[p.trial]["bench_decode_tps"] == bench[p.key]["decode_tps"]
        assert "healed_kl" in logged[p.trial]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_a_rerun_finishes(tiny):
    root, space, env = tiny
    out = root / "interrupted"
    proc = start_search(space, out, env, complete=1, finalists=0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("lbsearch: interrupted; finished steps are kept, run the same "
                                               "command again to continue")
    again = run_cli("--out", str(out), "--resume", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(s == "COMPLETE" for s in finished_trials(out).values()) == 40
    check_run(out, f"sqlite:///{out / 'mlflow.db'}")



def start_search(space, out: Path, env, complete: int, finalists: int):
    """`lbsearch run` of 40 trials in a subprocess, returned once ``complete`` trials are finished."""
    proc = run_cli("--space", str(space), "--out", str(out), "--trials", "40", "--finalists", str(finalists),
                   "--sampler", "random", env=env, wait=False)
    deadline = time.monotonic() + 240
    while not (out / "optuna.db").is_file() or \
            sum(s == "COMPLETE" for s in _safe_trials(out).values()) < complete:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


def _safe_trials(out: Path) -> dict:
    try:
        return finished_trials(out)
    except sqlite3.OperationalError:  # the driver is creating the tables
        return {}


@pytest.mark.parametrize("text, message", [
    ("{garbage", "run.json: damaged (not JSON)"),
    ('{"trials": -4}', "run.json: trials: Input should be greater than 0"),
    ("[1]", "run.json: expected a mapping"),
])
def test_a_damaged_run_json_is_one_line_on_resume(tmp_path, text, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(text)
    proc = run_cli("--out", str(out), "--resume", env=dict(os.environ, LBSEARCH_CACHE=str(tmp_path / "cache")))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_a_damaged_sensitivity_table_is_computed_again(tmp_path, tokenizer):
    from lbsearch import run_steps as steps
    from lbsearch.workspace import Workspace

    ws = Workspace.open(write_tiny_space(tmp_path, tokenizer, layers=3), device="cpu", progress=False)
    table = steps.sensitivity_table(ws, tmp_path / "sens")
    (tmp_path / "sens" / "sensitivity.json").write_text("{bad")
    again = steps.sensitivity_table(ws, tmp_path / "sens")
    assert again.n_layers == table.n_layers == 3
    assert again.column("none") == pytest.approx(table.column("none"))
