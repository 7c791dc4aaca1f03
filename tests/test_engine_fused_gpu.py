"""GPU paths of the fused step: fused and compiled steps captured in the CUDA graph equal the eager step,
the fused step stays within the issue's kernel budget per decoder layer, and the LSWA feature map inside
the decode kernel saves one kernel per LSWA layer (``pytest -m gpu``)."""
import pytest
import torch
from conftest import FAMILIES, tiny_model

from lbsearch import Plan, apply_plan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PLANS = {"llama": "SL8NS", "mistral": "L8s2f8SNS", "qwen2": "SNL8S", "qwen3": "L8s0L8NS"}
PROMPTS = [[5, 9, 2, 7, 1, 33, 4], [3] * 40, [8, 4], [60, 2, 19, 7] * 5, [11]]
SAMPLED = dict(temperature=0.9, top_p=0.9, top_k=20, seed=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_graph_equals_eager_graph(family):
    from lbsearch.engine import DecodeEngine

    plan = Plan.parse(PLANS[family])
    model = tiny_model(family, layers=len(plan)).cuda()
    with apply_plan(model, plan):
        fused, eager = DecodeEngine(model, 6, 80), DecodeEngine(model, 6, 80, fused=False)
        assert fused._graphs and fused.fused and not eager.fused
        assert fused.generate(PROMPTS, 24) == eager.generate(PROMPTS, 24)
        assert fused.generate(PROMPTS, 24, **SAMPLED) == eager.generate(PROMPTS, 24, **SAMPLED)


def test_compiled_graph_equals_eager():
    from lbsearch.engine import DecodeEngine

    model = tiny_model("qwen3", layers=4).cuda()
    with apply_plan(model, Plan.parse("SL8s2f8NS")):
        compiled, eager = DecodeEngine(model, 6, 80, compile=True), DecodeEngine(model, 6, 80, fused=False)
        assert compiled.compiled and compiled._graphs
        assert compiled.generate(PROMPTS, 24) == eager.generate(PROMPTS, 24)
        assert compiled.generate(PROMPTS, 24, **SAMPLED) == eager.generate(PROMPTS, 24, **SAMPLED)


def test_bf16_fused_logits_close_to_eager():
    from lbsearch.cost import ModelShape
    from lbsearch.engine import DecodeEngine
    from lbsearch.profile import random_model, shape_config

    shape = ModelShape(hidden=576, layers=4, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=4096)
    model = random_model(shape_config(shape), torch.bfloat16, "cuda")
    with apply_plan(model, Plan.parse("SL64NS")):
        logits = []
        for fused in (True, False):
            engine = DecodeEngine(model, 8, 200, fused=fused)
            engine.configure()
            engine.prefill(torch.randint(0, 4096, (8, 100), generator=torch.Generator().manual_seed(0)))
            engine.decode(5)
            logits.append(engine._logits().float())
    err = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert err < 2e-2, err


def test_kernels_per_layer_within_budget():
    """SmolLM2-135M's layer shape: at most 10 CUDA kernels per decoder layer per fused step (the issue's target)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_decode_step import count_kernels
    from transformers import AutoConfig

    from lbsearch.engine import DecodeEngine
    from lbsearch.profile import SHAPES, fake_fill, random_model

    cfg = AutoConfig.for_model("llama", attn_implementation="sdpa", **{**SHAPES["smollm2-135m"], "num_hidden_layers": 6})
    model = random_model(cfg, torch.bfloat16, "cuda")
    for plan in ("SSSSSS", "SSL64L64L64L64", "NNNNNN"):
        with apply_plan(model, Plan.parse(plan)):
            engine = DecodeEngine(model, 32, 400, graph=False)
            fake_fill(engine, 300)
            counts = count_kernels(engine)
        assert counts["per_layer"] <= 10, (plan, counts)


def test_lswa_fmap_kernel_one_kernel_fewer_per_layer(monkeypatch):
    """The feature map inside the LSWA decode kernel: same greedy tokens as the earlier path (feature map
    as its own kernel, the default) and the eager step under CUDA graphs, bf16 logits as
    close, and exactly one CUDA kernel fewer per LSWA layer (SmolLM2-135M's layer shape)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_decode_step import count_kernels
    from transformers import AutoConfig

    from lbsearch.engine import DecodeEngine
    from lbsearch.fused import FMAP_ENV_VAR
    from lbsearch.profile import SHAPES, fake_fill, random_model

    model = tiny_model("qwen3", layers=4).cuda()
    with apply_plan(model, Plan.parse("L8s2f8L8s0f16SL8s1")):
        new = DecodeEngine(model, 6, 80, fmap_in_decode=True).generate(PROMPTS, 24)
        old = DecodeEngine(model, 6, 80).generate(PROMPTS, 24)
        assert new == old == DecodeEngine(model, 6, 80, fused=False).generate(PROMPTS, 24)

    shape = {**SHAPES["smollm2-135m"], "num_hidden_layers": 6}
    cfg = AutoConfig.for_model("llama", attn_implementation="sdpa", **shape)
    model = random_model(cfg, torch.bfloat16, "cuda")
    counts, logits = {}, {}
    with apply_plan(model, Plan.parse("L64" * 6)):
        for fmap in ("1", "0"):
            monkeypatch.setenv(FMAP_ENV_VAR, fmap)
            engine = DecodeEngine(model, 32, 400, graph=False)
            assert engine.decoder.fused_counts()["lswa_fmap_in_decode"] == (6 if fmap == "1" else 0)
            fake_fill(engine, 300)
            counts[fmap] = count_kernels(engine)
            engine.configure()
            engine.prefill(torch.randint(0, cfg.vocab_size, (32, 100), generator=torch.Generator().manual_seed(0)))
            engine.decode(5)
            logits[fmap] = engine._logits().float()
    new, old = counts["1"]["per_layer"], counts["0"]["per_layer"]
    top = counts["0"]["top"]  # where the time goes: kernels by time, within the step's kernel time
    assert top and all(t["us"] > 0 and t["launches"] >= 1 for t in top)
    assert sum(t["us"] for t in top) <= counts["0"]["kernel_us"] + 1e-6
    assert abs(old - new - 1) < 1e-9 and new <= 10, counts
    err = (logits["1"] - logits["0"]).norm() / logits["0"].norm()
    assert err < 1e-2, err
