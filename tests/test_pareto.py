"""Hypervolume (exact, checked against Optuna's own), the front from the storage, the report files."""
import json

import numpy as np
import optuna
import pytest
from conftest import tiny_model
from optuna._hypervolume import compute_hypervolume
from search_helpers import FakeExecutor

from lbsearch.search import SearchConfig, front_from_storage, hypervolume, search
from lbsearch.search.pareto import contributions, pareto_mask
from lbsearch.search.report import render, write_report
from lbsearch.space import parse_space


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_hypervolume_is_exact(dim):
    rng = np.random.default_rng(dim)
    for trial in range(30 if dim < 4 else 5):
        n = int(rng.integers(1, 40 if dim < 4 else 12))
        pts = rng.random((n, dim))
        if trial % 3 == 0:  # ties and repeated points
            pts = np.round(pts, 1)
        ref = np.full(dim, 1.1)
        assert hypervolume(pts, ref) == pytest.approx(compute_hypervolume(pts, ref), rel=1e-12, abs=1e-15)


def test_hypervolume_edges():
    ref = np.array([1.0, 1.0])
    assert hypervolume(np.zeros((0, 2)), ref) == 0.0
    assert hypervolume([[0.5, 0.5]], ref) == pytest.approx(0.25)
    # points not better than the reference in every objective add nothing (Optuna's raises on them)
    assert hypervolume([[0.5, 0.5], [2.0, 0.0], [1.0, 0.2]], ref) == pytest.approx(0.25)
    # the 2-D sweep by hand: two boxes overlapping in [0.5, 1] x [0.5, 1]
    assert hypervolume([[0.0, 0.5], [0.5, 0.0]], ref) == pytest.approx(0.75)


def test_pareto_mask_and_contributions():
    loss = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.6, 0.6], [0.5, 0.5]])
    assert pareto_mask(loss).tolist() == [True, True, True, False, True]
    ref = np.array([2.0, 2.0])
    c = contributions(loss[:3], ref)
    assert c.tolist() == pytest.approx([0.5, 0.5, 0.25])


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    tiny_model(layers=6).save_pretrained(root / "tiny6")
    space = parse_space({"model": str(root / "tiny6"), "lswa": {"windows": [8], "feature_dims": [16]},
                         "objectives": ["kl", "throughput", "memory"],
                         "search": {"sampler": "nsga2", "trials": 24, "rescore_top": 2}})
    report = search(SearchConfig(space=space, run_dir=root, prior=False, progress=False), FakeExecutor())
    return root, report


def test_front_equals_the_one_recomputed_from_storage(study_dir):
    root, report = study_dir
    url = f"sqlite:///{root / 'optuna.db'}"
    stored = front_from_storage(url, report.study)
    assert stored == report.front
    front = report.front
    assert [p.trial for p in front.points] and front.hypervolume > 0
    # Optuna's own Pareto front (feasible trials) holds the same plans
    study = optuna.load_study(study_name=report.study, storage=url)
    best = {t.user_attrs["key"] for t in study.best_trials}
    assert best == {p.key for p in front.points}
    # the reference point is the study's, fixed at creation; the series ends at the front's hypervolume
    assert study.user_attrs["reference_point"] == front.reference
    assert front.history[-1][1] == pytest.approx(front.hypervolume)
    assert all(a[1] <= b[1] + 1e-12 for a, b in zip(front.history, front.history[1:]))  # never decreases
    loss = np.array([p.values for p in front.points]) * np.array([1, -1, 1])
    ref = np.array(front.reference) * np.array([1, -1, 1])
    inside = loss[np.all(loss < ref, axis=1)]  # the fake all-softmax-ish plans use more KV than the teacher
    assert 0 < len(inside) < len(loss)
    assert front.hypervolume == pytest.approx(compute_hypervolume(inside, ref))


def test_report_files(study_dir, tmp_path):
    root, report = study_dir
    front = report.front
    paths = write_report(front, tmp_path, "sqlite:///x")
    data = json.loads(paths["json"].read_text())
    assert len(data["front"]) == len(front.points) and data["search_fidelity"] == "assembled"
    rescored = [row for row in data["front"] if row["quality_fidelity"] == "brief"]
    assert len(rescored) == 2 and all(r["kl"] == pytest.approx(r["search_kl"] / 2) for r in rescored)
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].startswith("trial,plan,key,origin,n_softmax,n_lswa,n_none,kl,")
    assert len(lines) == len(front.points) + 1
    for name in ("png", "hypervolume"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render(front)
    assert f"{len(front.points)} plans" in text and "brief" in text and "assembled" in text
