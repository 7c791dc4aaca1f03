"""Cost model: removing attention never predicts slower, lswa memory is flat in context, the memory
budget decides max concurrency as by hand, calibration recovers costs, tables are cached."""
import random

import pytest

from lbsearch import cost
from lbsearch.plan import LayerSpec, Plan

SHAPE = cost.ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256)
MACHINE = cost.Machine("test", bandwidth=4e12, flop_rate=7e14)
L64 = LayerSpec.lswa(64)


def table(batch=200, context=1152):
    return cost.analytic_table(SHAPE, batch, context, [LayerSpec(kind="softmax"), LayerSpec(kind="none"), L64], MACHINE)


def random_plan(rng, n=16):
    return Plan(tuple(rng.choice([LayerSpec(kind="softmax"), LayerSpec(kind="none"), L64]) for _ in range(n)))


@pytest.mark.parametrize("batch,context", [(1, 128), (50, 1152), (200, 8192)])
def test_removing_attention_never_predicts_slower(batch, context):
    t, rng = table(batch, context), random.Random(batch)
    assert t.source == "analytic"
    for _ in range(20):
        plan = random_plan(rng)
        for i in range(len(plan)):
            slower = plan.with_layer(i, LayerSpec(kind="none"))
            assert t.step_time(slower) <= t.step_time(plan)
    base = cost.predict(t, Plan.softmax(16))
    assert base["decode_ratio"] == pytest.approx(1.0)
    if batch == 200:  # KV-bound: lswa pays off (at context 128 its fp32 linear state outweighs the KV)
        assert cost.predict(t, Plan.parse("SS" + "L64" * 14))["decode_ratio"] > 1.5


def test_lswa_memory_does_not_grow_with_context():
    plan = Plan.parse("SS" + "L64" * 14)
    lswa_only = Plan.uniform(16, L64)
    assert cost.kv_bytes_per_seq(SHAPE, lswa_only, 1024) == cost.kv_bytes_per_seq(SHAPE, lswa_only, 131072)
    small, big = (cost.kv_bytes_per_seq(SHAPE, plan, c) for c in (1024, 2048))
    assert big - small == 2 * 2 * 8 * 1024 * 64 * 2  # only the two softmax layers grow
    assert cost.kv_bytes_per_seq(SHAPE, Plan.parse("N" * 16), 5000) == 0


def test_memory_budget_sets_max_concurrency_by_hand():
    base = Plan.softmax(16)
    weights = (16 * (2048 * 48 * 64 + 32 * 64 * 2048 + 3 * 2048 * 8192) + 128256 * 2048) * 2
    assert SHAPE.stored_weight_bytes() == weights
    per_seq = 16 * 2 * 8 * 1280 * 64 * 2  # 16 layers x (k, v) x 8 kv heads x 1280 tokens x 64 x bf16
    for budget_gb in (8, 40, 80):
        budget = budget_gb * 2**30
        assert cost.max_concurrency(SHAPE, base, 1280, budget) == (budget - weights) // per_seq
    assert cost.max_concurrency(SHAPE, base, 1280, weights // 2) == 0
    half = Plan.parse("SN" * 8)
    assert cost.max_concurrency(SHAPE, half, 1280, 40 * 2**30) == (40 * 2**30 - weights) // (per_seq // 2)


def test_calibration_recovers_costs_from_measurements():
    prior = table()
    truth = cost.CostTable(**{**vars(prior), "head": prior.head * 1.3,
                              "layer": {k: v * f for (k, v), f in zip(prior.layer.items(), (1.6, 0.8, 1.2))}})
    rng = random.Random(0)
    plans = [Plan.softmax(16)] + [random_plan(rng) for _ in range(7)]
    fitted = cost.calibrate(prior, [(p, truth.step_time(p)) for p in plans], strength=1e-4)
    assert fitted.source == "calibrated"
    for p in [random_plan(rng) for _ in range(5)]:
        assert cost.relative_error(fitted.step_time(p), truth.step_time(p)) < 0.01
        assert cost.relative_error(prior.step_time(p), truth.step_time(p)) > 0.05


def test_table_for_caches_on_disk(cache_home, monkeypatch):
    from lbsearch import profile

    specs = [LayerSpec(kind="softmax"), LayerSpec(kind="none")]
    monkeypatch.setattr(profile, "measure_machine", lambda device: MACHINE)
    first = profile.table_for(SHAPE, 8, 256, specs, "cpu")
    assert first.source == "analytic" and len(list((cache_home / "cost").glob("*.json"))) == 1
    monkeypatch.setattr(profile, "analytic_table", lambda *a: pytest.fail("rebuilt instead of cached"))
    assert profile.table_for(SHAPE, 8, 256, specs, "cpu").layer == first.layer


def test_predict_prefill_and_kv_ratios():
    t = table()
    pred = cost.predict(t, Plan.parse("SN" * 8), prompt_len=1024)
    assert pred["kv_ratio"] == pytest.approx(0.5)
    assert 0 < pred["prefill_ratio"] < 1
    with pytest.raises(KeyError, match="L128"):
        t.step_time(Plan.parse("L128" * 16))
