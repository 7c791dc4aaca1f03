"""`lbsearch search` and `lbsearch pareto` through the command line; the real SmolLM2 search (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_space

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lbsearch", *args], capture_output=True, text=True, env=env,
                          cwd=REPO)


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cli")
    return write_tiny_space(root, tokenizer, layers=3), dict(os.environ, LBSEARCH_CACHE=str(root / "cache"))


def test_search_then_pareto_end_to_end(tmp_path, tiny_space, capsys):
    from lbsearch.cli import main

    space, env = tiny_space
    out = tmp_path / "run"
    proc = run_cli("search", "--space", str(space), "--out", str(out), "--device", "cpu", "--trials", "4",
                   "--rescore-top", "0", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Pareto front of lbsearch-tiny" in proc.stdout and "(threshold)" in proc.stdout
    for name in ("optuna.db", "pareto.json", "pareto.csv", "pareto.png", "hypervolume.png",
                 "sensitivity/sensitivity.json"):  # the prior's table was computed, the study and front written
        assert (out / name).is_file(), name
    assert not (out / ".driver.lock").exists()
    first = json.loads((out / "pareto.json").read_text())
    # resuming the finished study with a larger budget adds one trial
    proc = run_cli("search", "--space", str(space), "--out", str(out), "--device", "cpu", "--trials", "5",
                   "--rescore-top", "0", "--resume", "--sampler", "random", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 scored" in proc.stdout or "1 reused" in proc.stdout
    report = tmp_path / "report"
    assert main(["pareto", str(out), "--out", str(report)]) == 0
    assert "Pareto front of lbsearch-tiny" in capsys.readouterr().out
    again = json.loads((report / "pareto.json").read_text())
    assert again["scored_plans"] >= first["scored_plans"] and again["hypervolume"] >= first["hypervolume"]
    assert again["hypervolume_history"][: len(first["hypervolume_history"])] == first["hypervolume_history"]


@pytest.mark.parametrize("args, message", [
    (["search", "--sampler", "cmaes"], "--sampler cmaes: unknown; allowed: tpe, nsga2, gp, random"),
    (["search", "--trials", "-3"], "--trials must be positive"),
    (["search", "--time-budget", "0"], "--time-budget must be positive"),
    (["search", "--fidelity", "quick"], "search.fidelity"),
    (["search", "--out", "/dev/null/run"], "--out /dev/null/run"),
    (["search", "--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open"),
    (["pareto"], "give a RUN_DIR or --storage URL"),
    (["pareto", "/nonexistent/run"], "no optuna.db there"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    from lbsearch.cli import main

    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_bad_flag_through_a_real_process():  # --help of every command: tests/test_cli.py
    proc = run_cli("search", "--sampler", "cmaes")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "lbsearch: error: --sampler cmaes: unknown; allowed: tpe, nsga2, gp, random"]


@pytest.mark.slow
def test_real_search_on_smollm2(tmp_path):
    """Six trials on SmolLM2-135M at the assembled fidelity (windows [64]; the benchmarks' table as prior)."""
    from lbsearch.executors.local import LocalExecutor
    from lbsearch.search import SearchConfig, front_from_storage, search
    from lbsearch.sensitivity import SensitivityTable
    from lbsearch.space import load_space
    from lbsearch.workspace import Workspace

    space = load_space().on_cpu()
    space = space.model_copy(update={"lswa": space.lswa.model_copy(update={"windows": [64]}),
                                     "search": space.search.model_copy(update={"trials": 6, "rescore_top": 0})})
    table = SensitivityTable.load(REPO / "benchmarks" / "results" / "smollm2-135m_sensitivity.json")
    with LocalExecutor(Workspace.open(space, device="cpu", progress=False)) as executor:
        report = search(SearchConfig(space=space, run_dir=tmp_path, table=table, progress=False), executor)
    assert report.counts["scored"] + report.counts.get("reused", 0) == 6
    front = report.front
    assert front.points and front.hypervolume > 0 and front.thresholds
    assert front == front_from_storage(f"sqlite:///{tmp_path / 'optuna.db'}", report.study)
    for p in front.scored:
        assert p.result.cost_source in ("measured", "calibrated") and p.result.throughput_ratio > 0 and p.result.kl >= 0
        assert Path(p.plan) and p.plan.startswith("SS")  # layers 0 and 1 are pinned softmax


@pytest.mark.slow
def test_search_with_two_ray_workers(tmp_path, tiny_space):
    """`lbsearch search --workers 2`: plans scored on two Ray actors, the front from the storage."""
    import sqlite3

    space, env = tiny_space
    out = tmp_path / "ray"
    proc = run_cli("search", "--space", str(space), "--out", str(out), "--device", "cpu", "--trials", "6",
                   "--rescore-top", "0", "--workers", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(out / "optuna.db") as db:
        workers = {w for (w,) in db.execute("select value_json from trial_user_attributes where key = 'worker'")}
    assert len(workers) == 2, workers  # both actors scored plans
    assert "Pareto front of lbsearch-tiny" in proc.stdout
