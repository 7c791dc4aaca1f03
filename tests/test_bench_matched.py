"""benchmarks/bench_matched.py: the search's plan matched to a heuristic at equal predicted speed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_match_takes_the_lowest_kl_plan_at_least_as_fast_and_never_the_heuristic_or_teacher():
    import bench_matched as bench

    from lbsearch.plan import Plan

    heuristic = Plan.parse("SSNN")
    trials = [
        {"trial": 0, "plan": "SSNN", "kl": 0.01, "throughput_ratio": 1.5},   # the heuristic itself
        {"trial": 1, "plan": "SSSS", "kl": 0.0, "throughput_ratio": 1.0},    # the teacher
        {"trial": 2, "plan": "SNSN", "kl": 0.30, "throughput_ratio": 1.40},
        {"trial": 3, "plan": "SSSN", "kl": 0.05, "throughput_ratio": 1.20},  # better, but slower
        {"trial": 4, "plan": "SNNS", "kl": 0.20, "throughput_ratio": 1.45},
    ]
    assert bench.match(heuristic, 1.4, trials, 4)["trial"] == 4
    assert bench.match(heuristic, 1.5, trials, 4) is None
    assert bench.match(heuristic, 0.9, trials, 4)["trial"] == 3
