"""score(workspace, plan, fidelity) -> TrialResult: quality against the teacher, predicted serving cost."""
import pytest
from conftest import write_tiny_space

from lbsearch import LBSearchError, Plan
from lbsearch.objective import FIDELITIES, TrialResult, score
from lbsearch.workspace import Workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("obj")
    space = write_tiny_space(root, tokenizer)
    text = space.read_text().replace("seq_len: 32}", "seq_len: 32, eval_sources: [python-docs]}")
    space.write_text(text)
    return Workspace.open(space, device="cpu", cache=root / "cache", progress=False)


def test_every_fidelity_scores_and_round_trips(ws):
    plan = ws.parse_plan("SL8NL16")
    results = {f: score(ws, plan, f) for f in FIDELITIES}
    for fidelity, r in results.items():
        assert r.fidelity == fidelity and r.plan == str(plan) and r.key == plan.key
        assert r.kl > 0 and r.perplexity > 1 and 0 <= r.agreement <= 1 and r.eval_tokens == ws.heldout.blocks.numel()
        assert set(r.real_text) == {"python-docs"} and r.real_text["python-docs"]["kl"] > 0
        assert r.counts == {"softmax": 1, "lswa": 2, "none": 1}
        assert TrialResult.from_json(r.to_json()) == r
        assert Plan.parse(r.plan) == plan  # the string is exact whatever the space's defaults
    assert results["assembled"].healing_tokens == 0
    assert results["brief"].healing_tokens == 128 and results["full"].healing_tokens == 256
    # the cost model: no measured table for this toy shape, so analytic, and it says so
    r = results["assembled"]
    assert r.cost_source == "analytic" and "no measured cost table" in r.cost_note
    assert r.throughput_ratio > 1 and r.tokens_per_s > 0 and r.max_concurrency > 0
    assert r.target == "h200 batch 200 prompt 1024 output 256"


def test_the_teacher_scores_as_the_teacher(ws):
    r = score(ws, ws.parse_plan("SSSS"))
    assert r.kl == pytest.approx(0, abs=1e-6) and r.agreement == 1.0
    assert r.throughput_ratio == pytest.approx(1.0)
    removed = score(ws, ws.parse_plan("SNNN"))
    outside = score(ws, Plan.parse("SL8f8SS"))  # a spec the space does not list still gets a cost
    assert outside.throughput_ratio > 0
    assert removed.kv_bytes_per_seq < r.kv_bytes_per_seq and removed.throughput_ratio > 1


def test_unknown_fidelity(ws):
    with pytest.raises(LBSearchError, match="allowed: assembled, brief, full"):
        score(ws, Plan.parse("SSSS"), "quick")
